"""``kolors-job``: validate / run / schema / demo / sample (+ render / submit from :mod:`kolors_job.launch`).

Every expected failure prints one line (``error: …`` or ``field.path: …``), never a traceback,
and exits with the code of :class:`kolors_job.core.errors.ExitCode`.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import os
import sys
from collections.abc import Iterator, Sequence
from typing import Any

import kolors_job.sources.transport  # noqa: F401 - first: the hub clients' environment, before any imports them
from kolors_job import __version__, storage
from kolors_job.core.errors import ExitCode, JobError, ManifestError
from kolors_job.core.redact import scrub
from kolors_job.plan.cli import add_card_args, check_fits
from kolors_job.plan.cli import register_cli as register_plan
from kolors_job.sweep import cli as sweep_cli


def _print_error(err: JobError) -> None:
    from kolors_job.core.log import say

    problems = err.problems if isinstance(err, ManifestError) else [str(err)]
    for line in problems:
        say(scrub(line), logging.ERROR, exit_code=int(err.exit_code))


def cmd_validate(args: argparse.Namespace) -> int:
    from kolors_job.manifest.load import load_manifest

    if args.manifest and args.manifest_opt and args.manifest != args.manifest_opt:
        raise ManifestError("validate: give the manifest once (MANIFEST or --manifest), not two different ones")
    manifest = load_manifest(args.manifest or args.manifest_opt)
    check_fits(manifest, args)  # with --gpu/--gpu-memory: exit 2 when the job cannot fit that card
    print(manifest.to_yaml(), end="")
    print(f"# job id: {args.job_id or manifest.job_id}  digest: {manifest.digest()[:16]}", file=sys.stderr)
    for field, uri, problem in unready_uris(manifest.model_dump(mode="json")):
        print(f"# note: {field}: {uri} {problem}", file=sys.stderr)
    return ExitCode.OK


def unready_uris(doc: object, path: str = "") -> list[tuple[str, str, str]]:
    """``(field path, uri, what is missing)`` of every storage URI in ``doc`` whose backend says this environment
    lacks something to open it (OSS: an endpoint), as the storage registry tells."""
    if isinstance(doc, dict):
        return [hit for k, v in doc.items() for hit in unready_uris(v, f"{path}.{k}" if path else str(k))]
    if isinstance(doc, list):
        return [hit for i, v in enumerate(doc) for hit in unready_uris(v, f"{path}[{i}]")]
    problem = storage.setup_problem(doc) if isinstance(doc, str) else None
    return [(path, doc, problem)] if isinstance(doc, str) and problem else []


def cmd_schema(args: argparse.Namespace) -> int:
    from kolors_job.manifest.load import json_schema

    print(json.dumps(json_schema(), indent=2, ensure_ascii=False))
    return ExitCode.OK


COMPILE_CACHES = {"TORCHINDUCTOR_CACHE_DIR": "torchinductor", "TRITON_CACHE_DIR": "triton"}
"""torch.compile's artifacts on the cache volume (these directories under it), so a rerun or the next job skips
the compile: set where the environment does not (the image sets them; this covers pip installs), before the
stages import torch."""


def _settings_and_logging(args: argparse.Namespace):
    from kolors_job.core.log import setup_logging
    from kolors_job.core.settings import Settings

    settings = Settings()
    setup_logging(args.log_format or settings.log_format, settings.log_level)
    for var, sub in COMPILE_CACHES.items():
        os.environ.setdefault(var, str(settings.cache_dir / sub))
    return settings


def cmd_run(args: argparse.Namespace) -> int:
    with _imports_frozen(args):
        from kolors_job.manifest.load import load_manifest
        from kolors_job.sweep import trial

        settings = _settings_and_logging(args)
        run = trial.prepare(args, load_manifest(args.manifest))  # --set, --trial, metric sinks
        from kolors_job.job.context import Job  # the stages (torch) only after logging is set up, the manifest read
        from kolors_job.runner import run_job

    job = Job(
        run.manifest,
        settings=settings,
        job_id=run.job_id or args.job_id or os.environ.get("KOLORS_JOB_ID") or None,
        output_uri=args.output,
        force=args.force,
        allow_cpu=args.allow_cpu or settings.allow_cpu,
    )
    if run.metrics is not None:
        job.observers.append(run.metrics)
    outcome = run_job(job)
    trial.finish(run.metrics, job, outcome)
    _say_outcome(outcome, f"{outcome.state}: {outcome.output_uri}")
    return outcome.exit_code


@contextlib.contextmanager
def _imports_frozen(args: argparse.Namespace) -> Iterator[None]:
    """In a process of its own, what a job imports (torch, diffusers, transformers: ~4,000 modules, ~500k objects)
    lives until it exits. So the collector is off while they import (its full passes over the growing heap were
    ~1 CPU-s of a cold start; the little they freed, the one collection after frees), then ``gc.freeze()``: each
    ``free_memory()`` between stages and checkpoints walks only what the job made since (~0.3 s a walk otherwise).
    An in-process caller keeps its heap and its collector as they were."""
    if not args.own_process:
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
    gc.collect()  # only once the imports succeeded: a start that failed exits without freezing anything
    gc.freeze()
    log = logging.getLogger("kolors_job.cli")
    if log.isEnabledFor(logging.DEBUG):  # counting walks every frozen object: ~60 ms, for a debug line only
        log.debug("imports frozen", extra={"frozen_objects": gc.get_freeze_count(), "collector_on": gc.isenabled()})


def _say_outcome(outcome: Any, ok_line: str) -> None:
    """The run's last line: ``error: …`` (or the success line); a JSON record in JSON mode."""
    from kolors_job.core.log import say

    fields = {"state": outcome.state, "exit_code": int(outcome.exit_code), "output": outcome.output_uri}
    if outcome.exit_code != ExitCode.OK and outcome.message:
        say(f"error: {outcome.message}", logging.ERROR, **fields)
    else:
        say(ok_line, logging.INFO, **fields)


def cmd_demo(args: argparse.Namespace) -> int:
    from kolors_job.demo import demo_manifest, resumes

    with _imports_frozen(args):
        settings = _settings_and_logging(args)
        from kolors_job.job.context import Job  # the stages (torch) only after logging is set up
        from kolors_job.runner import run_job

    manifest = demo_manifest(settings, output=args.output)
    # An interrupted demo resumes (what its Ctrl-C message promises); a finished or foreign one starts over.
    outcome = run_job(Job(manifest, settings=settings, force=not resumes(manifest, settings)))
    _say_outcome(outcome, f"demo finished: open {outcome.output_uri}report.html")
    return outcome.exit_code


def _add_log_format(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--log-format",
        choices=["auto", "json", "text"],
        help="json: one JSON object per stderr line, whichever library wrote it; text: readable lines and "
        "progress bars; auto (default, $KOLORS_JOB_LOG_FORMAT): text on a terminal, else json",
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kolors-job",
        description="Job manifest in; Kolors LoRA, an 8-frame story, aesthetic scores and a report out.",
        epilog="Every expected failure prints one line and exits with a distinct code: 1 internal error (a bug), "
        "2 invalid manifest, 3 quality gate, 4 invalid input, 5 storage denied, 6 output conflict, "
        "7 the platform cannot start the job (submit), 75 retry (resumes).",
    )
    p.add_argument("--version", action="version", version=f"kolors-job {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    v = sub.add_parser("validate", help="check a manifest and print it fully resolved")
    where = f"a path or a {storage.listed_schemes()} URI (default: $KOLORS_JOB_MANIFEST[_URI])"
    v.add_argument("manifest", nargs="?", help=where)
    v.add_argument("--manifest", dest="manifest_opt", metavar="MANIFEST", help="the same, as `run` takes it")
    v.add_argument("--job-id")
    add_card_args(v, required=False)
    v.set_defaults(func=cmd_validate)
    register_plan(sub)

    s = sub.add_parser("schema", help="print the manifest's JSON Schema")
    s.set_defaults(func=cmd_schema)

    r = sub.add_parser("run", help="run the job: train, draw the story, score, report")
    r.add_argument("--manifest", help=where)
    r.add_argument("--job-id", help="output goes to <output.uri>/<job id>/ (default: metadata.name)")
    r.add_argument("--output", help="override spec.output.uri")
    r.add_argument("--force", action="store_true", help="recompute even if the output has _SUCCESS")
    r.add_argument(
        "--allow-cpu", action="store_true",
        help="run a full-size model on the CPU when no GPU is usable (hours; without it the job stops, exit 4)",
    )
    _add_log_format(r)
    sweep_cli.add_run_arguments(r)  # --set, --trial, --objective, metric lines (sweep trials)
    r.set_defaults(func=cmd_run)

    d = sub.add_parser("demo", help="the whole job on CPU with a tiny random Kolors (about 7 s on 2 idle cores)")
    d.add_argument("--output", default="demo-output", help="output dir or URI (default: ./demo-output)")
    _add_log_format(d)
    d.set_defaults(func=cmd_demo)

    from kolors_job.sample.cli import register_cli as register_sample

    register_sample(sub)

    try:
        from kolors_job.launch import register_cli
    except ImportError:  # launch extras not present
        pass
    else:
        register_cli(sub)
    sweep_cli.add_sweep_parser(sub)
    return p


def _map_exit(code: int) -> int:
    """Kubeflow's ``restartPolicy: ExitCode`` retries only 128–255: let the spec remap our 75."""
    remap = os.environ.get("KOLORS_JOB_RETRYABLE_EXIT_CODE")
    if code == ExitCode.TEMPORARY and remap and remap.isdigit():
        return int(remap)
    return int(code)


def main(argv: Sequence[str] | None = None, *, own_process: bool = False) -> int:
    """``own_process``: this call is the whole process (:func:`entry`), not a caller's function call."""
    from kolors_job.core.log import json_mode, restore_stderr, say

    args = build_parser().parse_args(argv)
    args.own_process = own_process
    try:
        code = args.func(args)
    except JobError as e:
        _print_error(e)
        code = e.exit_code
    except KeyboardInterrupt:
        say("error: interrupted", logging.ERROR, exit_code=int(ExitCode.TEMPORARY))
        code = ExitCode.TEMPORARY
    except Exception as e:  # a bug outside the runner's own handling: in JSON mode its traceback is JSON too
        if not json_mode():
            raise
        logging.getLogger("kolors_job.cli").exception("internal error: %s", scrub(f"{type(e).__name__}: {e}"),
                                                      extra={"exit_code": int(ExitCode.INTERNAL)})  # fmt: skip
        code = ExitCode.INTERNAL
    finally:
        restore_stderr()  # JSON mode's stand-in for sys.stderr ends with the command (in-process callers)
    return _map_exit(int(code))


def entry() -> int:
    """``kolors-job`` and ``python -m kolors_job``: :func:`main` as the process itself."""
    return main(own_process=True)


if __name__ == "__main__":
    sys.exit(entry())
