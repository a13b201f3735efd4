"""Job errors and the exit codes they map to.

Exit codes are a contract with schedulers (k8s ``podFailurePolicy``, PAI-DLC retries):
``75`` (EX_TEMPFAIL) is the only one worth retrying; everything else fails fast.
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    INTERNAL = 1  # a bug: report it
    INVALID_MANIFEST = 2  # the manifest is malformed: fix it, do not retry
    QUALITY_GATE = 3  # the job ran but the mean aesthetic score is under the threshold
    INVALID_INPUT = 4  # model/dataset files are missing or unusable
    STORAGE_DENIED = 5  # access denied / no such bucket: credentials or config are wrong
    OUTPUT_CONFLICT = 6  # the output prefix holds another manifest's run
    NOT_STARTED = 7  # submit: the platform cannot start the job's pods (image pull, Secret, volume, scheduling)
    TEMPORARY = 75  # preempted, storage unreachable: retrying resumes from the last checkpoint


class JobError(Exception):
    """An expected failure: printed as one line, no traceback, and a distinct exit code."""

    exit_code: ExitCode = ExitCode.INTERNAL

    def __init__(self, message: str, *, exit_code: ExitCode | None = None) -> None:
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class ManifestError(JobError):
    """The manifest is invalid; ``problems`` holds one ``field.path: message`` line each."""

    exit_code = ExitCode.INVALID_MANIFEST

    def __init__(self, problems: list[str] | str) -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("; ".join(self.problems))


class InputError(JobError):
    exit_code = ExitCode.INVALID_INPUT


class QualityGateError(JobError):
    exit_code = ExitCode.QUALITY_GATE


class OutputConflictError(JobError):
    exit_code = ExitCode.OUTPUT_CONFLICT


class StorageError(JobError):
    """Base for storage failures; subclasses say whether a retry can help."""

    exit_code = ExitCode.INTERNAL


class StorageDeniedError(StorageError):
    """Permanent: 403, missing bucket, bad credentials. Retrying will not help."""

    exit_code = ExitCode.STORAGE_DENIED


class StorageNotFoundError(StorageError):
    """The object does not exist (callers often treat this as a normal answer)."""

    exit_code = ExitCode.INVALID_INPUT


class StorageTemporaryError(StorageError):
    """Transient: 5xx, throttling, timeouts, resets that outlived the retry budget."""

    exit_code = ExitCode.TEMPORARY


class ClaimLostError(JobError):
    """Another run took the output prefix over (this one was paused or cut off past its lease): the store
    refused this run's write, and it writes nothing more. A rerun resumes from what the prefix holds."""

    exit_code = ExitCode.TEMPORARY


class JobInterruptedError(JobError):
    """SIGTERM/SIGINT: state was checkpointed; a rerun resumes."""

    exit_code = ExitCode.TEMPORARY
