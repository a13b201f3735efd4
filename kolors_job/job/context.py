"""One run of one manifest: what every stage is given (the manifest, the settings, the output store, the work
dir, the device, the process's place in a DDP group, status.json, the stop flag).

A stage is a function ``run(job, inputs) -> output`` (:mod:`kolors_job.job.stage`); it reads its settings from
``job.manifest.spec``, writes its files under ``job.work`` and publishes them through ``job.store``. It does not
know which stage ran before it or comes next: ``kolors_job.runner`` does.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from kolors_job.core.device import pick_device
from kolors_job.core.errors import JobInterruptedError, ManifestError
from kolors_job.core.log import progress_enabled
from kolors_job.core.redact import redact_uri
from kolors_job.core.settings import Settings
from kolors_job.core.stop import StopFlag
from kolors_job.job.status import StatusWriter
from kolors_job.manifest.fields import JOB_ID_PATTERN
from kolors_job.manifest.load import format_validation_error
from kolors_job.manifest.spec import Manifest, OutputSpec
from kolors_job.storage import Store, open_store
from kolors_job.storage.base import RETRIES

if TYPE_CHECKING:
    from accelerate import PartialState

    from kolors_job.job.claim import OutputClaim
    from kolors_job.job.scratch import ScratchOwner
    from kolors_job.plan.planner import Plan

__all__ = ["Job"]

log = logging.getLogger(__name__)


def _env_int(name: str, default: int) -> int:
    """torchrun / the Kubeflow operator / PAI-DLC set RANK, LOCAL_RANK and WORLD_SIZE. Read from the environment,
    not from accelerate's process group, which joins over the network: the device check comes first."""
    raw = os.environ.get(name, "")
    return int(raw) if raw.isdigit() else default


def _run_dir_name(world: int) -> str:
    """This run's scratch directory name: the process alone, or under DDP the torchrun group (every
    rank of a node must agree, so it is derived from the rendezvous torchrun gives them all)."""
    if world == 1:
        return f"run-{os.getpid()}-{os.urandom(3).hex()}"
    group = ":".join(os.environ.get(v, "") for v in ("TORCHELASTIC_RUN_ID", "MASTER_ADDR", "MASTER_PORT"))
    return "ddp-" + hashlib.sha256(group.encode()).hexdigest()[:12]


class Job:
    """One run of one manifest: holds the context every stage needs."""

    def __init__(
        self,
        manifest: Manifest,
        *,
        settings: Settings,
        job_id: str | None = None,
        output_uri: str | None = None,
        force: bool = False,
        stop: StopFlag | None = None,
        allow_cpu: bool = False,
    ) -> None:
        if output_uri:  # --output: validated like the manifest's own field
            try:
                output = OutputSpec.model_validate({**manifest.spec.output.model_dump(), "uri": output_uri})
            except ValidationError as e:
                raise ManifestError([p.replace("uri:", "--output:", 1) for p in format_validation_error(e)]) from None
            manifest = manifest.model_copy(update={"spec": manifest.spec.model_copy(update={"output": output})})
        self.manifest = manifest
        self.settings = settings
        self.job_id = job_id or manifest.job_id
        if not re.fullmatch(JOB_ID_PATTERN, self.job_id):
            # --job-id / KOLORS_JOB_ID bypass the manifest's own validation: the id becomes a path
            raise ManifestError(
                f"job id {self.job_id!r} is unsafe: use 1-63 lower-case letters, digits, '.', '_' or '-' "
                "(it names a directory)"
            )
        self.force = force
        self.stop = stop or StopFlag()
        self.digest = manifest.digest()
        self.rank = _env_int("RANK", 0)
        self.world = _env_int("WORLD_SIZE", 1)
        self.main = self.rank == 0
        # One process per node prepares that node's work dir (LoRA copy, downloads): disks are per node.
        self.local_main = _env_int("LOCAL_RANK", 0) == 0
        self.store: Store = open_store(manifest.spec.output.uri, settings).child(self.job_id)
        # Scratch is per run: two processes of one job (a rerun racing a zombie, a waiting second run)
        # never share files. A rerun resumes from the output store, never from scratch.
        self.run_root = self.work = settings.resolved_work_dir / self.job_id / _run_dir_name(self.world)
        if self.world > _env_int("LOCAL_WORLD_SIZE", self.world):
            # Several nodes: the work dir may be one shared volume (a ReadWriteMany cache PVC), and each
            # node's ranks write their own LoRA copy and checkpoints there. torchrun sets GROUP_RANK.
            self.work = self.work / f"node-{_env_int('GROUP_RANK', 0)}"
        self.status = StatusWriter(self.store if self.main else None, self.job_id, self.digest)
        self.timings: dict[str, float] = {}
        self.retries_before = RETRIES.value  # the process-wide count when this run began (tests run several)
        self.owns_output = False  # set once prepare_output has checked the prefix is ours
        self.claim: OutputClaim | None = None  # rank 0's exclusive claim on the output prefix
        self.scratch_owner: ScratchOwner | None = None  # this process's record in its scratch directory
        self.allow_cpu = allow_cpu
        # one GPU per rank, as torchrun assigns them
        self.device = pick_device(manifest.spec.device, world=self.world, local_rank=_env_int("LOCAL_RANK", 0))
        self.progress = settings.log_format == "text" or (settings.log_format == "auto" and progress_enabled())
        self.memory_plan: Plan | None = None  # a full-size model on a GPU: the plan check_device made
        self.observers: list[Any] = []
        """Told each validation point (``validation_point(dict)``): a sweep trial's metric lines."""

    @functools.cached_property
    def dist(self) -> PartialState | None:
        """accelerate's process state under DDP (joins torchrun's process group); None in one process."""
        if self.world == 1:
            return None
        from accelerate import PartialState

        return PartialState(cpu=self.device == "cpu")

    def main_first(self) -> AbstractContextManager[None]:
        """Rank 0 runs the block first, the others after it: they see what it decided and wrote."""
        return self.dist.main_process_first() if self.dist else nullcontext()

    def local_main_first(self) -> AbstractContextManager[None]:
        """One rank per node fills the node's caches first; the others then find them complete."""
        return self.dist.local_main_process_first() if self.dist else nullcontext()

    def barrier(self) -> None:
        if self.dist:
            self.dist.wait_for_everyone()

    def leave_group(self) -> None:
        """Leave torchrun's process group at the end of the run, if this process joined it. Left to the
        interpreter's exit, the group's threads can abort a rank that already reported success ("terminate called
        without an active exception", exit -6), and torchrun then stops the other ranks mid-work."""
        if self.__dict__.get("dist") is not None:  # the cached state: never joins a group just to leave it
            self.dist.destroy_process_group()

    @property
    def output_uri(self) -> str:
        return redact_uri(self.store.uri)

    def put_json(self, key: str, data: Any) -> None:
        if self.main:
            self.store.write_bytes(key, json.dumps(data, ensure_ascii=False, indent=2, default=str).encode())

    def get_json(self, key: str) -> Any | None:
        return json.loads(self.store.read_bytes(key)) if self.store.exists(key) else None

    def upload(self, key: str, path: Path) -> None:
        if self.main:
            self.store.upload_file(key, path)

    def upload_dir(self, path: Path, prefix: str) -> None:
        if self.main:
            self.store.upload_dir(path, prefix)

    def check_stop(self) -> None:
        if self.stop():
            raise JobInterruptedError(f"interrupted by {self.stop.signal_name or 'a stop request'}; rerun to resume")

    @contextmanager
    def stage(self, name: str, total: int | None = None) -> Iterator[None]:
        self.check_stop()
        log.info("stage %s: started", name, extra={"stage": name})
        self.status.stage_started(name, total)
        t0 = time.perf_counter()
        yield
        seconds = time.perf_counter() - t0
        self.timings[name] = round(seconds, 3)
        self.status.stage_finished(name, seconds)
        log.info("stage %s: done in %.1fs", name, seconds, extra={"stage": name, "seconds": round(seconds, 3)})
