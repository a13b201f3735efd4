"""``torchrun`` that keeps the workers' exit codes: ``python -m kolors_job.launch.torchrun [torchrun args]``.

Plain torchrun ends with exit 1 whenever a worker fails, so a scheduler can no longer tell "invalid
manifest, do not retry" (2) from "preempted, retry" (75, or 203 under Kubeflow's ExitCode policy).
This wrapper runs torchrun's own launcher and exits with the code of the first worker that failed.

It also bridges ``MASTER_ADDR``/``MASTER_PORT`` (set by the Kubeflow operator and PAI-DLC) to the
``PET_*`` variables torchrun reads, when those are not set already, and gives the workers the pod's
grace period to checkpoint after SIGTERM: torchrun's own default is 30 s before it SIGKILLs them,
whatever ``terminationGracePeriodSeconds`` says.
"""

from __future__ import annotations

import os
import signal
import sys

from kolors_job.core.errors import ExitCode

DEFAULT_GRACE_SECONDS = 120
"""The platform's SIGTERM→SIGKILL window (k8s ``terminationGracePeriodSeconds``, DLC's setting)."""
LAUNCHER_EXIT_MARGIN_SECONDS = 10
"""Kept back from the grace period for torchrun itself to collect the ranks and exit before SIGKILL."""
GRACE_ENV = "KOLORS_JOB_GRACE_SECONDS"


def shutdown_timeout(grace_seconds: int) -> int:
    """Seconds torchrun lets its workers finish after forwarding SIGTERM: the grace period less a margin."""
    return max(1, grace_seconds - min(LAUNCHER_EXIT_MARGIN_SECONDS, grace_seconds // 4))


def _with_shutdown_timeout(argv: list[str], environ: dict[str, str] | os._Environ[str]) -> list[str]:
    """``argv`` plus ``--shutdown-timeout`` from ``KOLORS_JOB_GRACE_SECONDS`` unless one is given already."""
    given = any(a.split("=")[0] in ("--shutdown-timeout", "--shutdown_timeout") for a in argv)
    if given or environ.get("PET_SHUTDOWN_TIMEOUT") or environ.get("TORCH_ELASTIC_SHUTDOWN_TIMEOUT"):
        return argv
    raw = environ.get(GRACE_ENV, "")
    grace = int(raw) if raw.isdigit() and int(raw) > 0 else DEFAULT_GRACE_SECONDS
    return [f"--shutdown-timeout={shutdown_timeout(grace)}", *argv]


def _bridge_env(environ: dict[str, str] | os._Environ[str]) -> None:
    for src, dst in (("MASTER_ADDR", "PET_MASTER_ADDR"), ("MASTER_PORT", "PET_MASTER_PORT")):
        if environ.get(src) and not environ.get(dst):
            environ[dst] = environ[src]


def retryable_code(environ: dict[str, str] | os._Environ[str] | None = None) -> int:
    """75, or ``KOLORS_JOB_RETRYABLE_EXIT_CODE`` where the scheduler needs a 128+ code to retry."""
    env = os.environ if environ is None else environ
    raw = env.get("KOLORS_JOB_RETRYABLE_EXIT_CODE", "")
    return int(raw) if raw.isdigit() and 0 < int(raw) < 256 else int(ExitCode.TEMPORARY)


def exit_code_of(failures: dict[int, object]) -> int:
    """The earliest failure with a real exit code; a signal death N becomes 128 + N like a shell's."""
    ordered = sorted(failures.values(), key=lambda f: getattr(f, "timestamp", 0))
    for f in ordered:
        code = int(getattr(f, "exitcode", 1))
        if code > 0:
            return min(code, 255)
    code = int(getattr(ordered[0], "exitcode", 1)) if ordered else 1
    return 128 + (-code) if code < 0 else 1


def main(argv: list[str] | None = None) -> int:
    from kolors_job.core.log import setup_logging
    from kolors_job.core.settings import Settings

    settings = Settings()
    setup_logging(settings.log_format, settings.log_level)  # before torch: its import-time warnings demoted
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    _bridge_env(os.environ)
    args = parse_args(_with_shutdown_timeout(sys.argv[1:] if argv is None else argv, os.environ))
    try:
        run(args)
    except ChildFailedError as e:
        return exit_code_of(e.failures)
    except SignalException as e:
        # SIGTERM reached the launcher: the workers were told to checkpoint; a rerun resumes.
        print(f"torchrun: stopped by {signal.Signals(e.sigval).name}; exiting retryable", file=sys.stderr)
        return retryable_code()
    return 0


if __name__ == "__main__":
    sys.exit(main())
