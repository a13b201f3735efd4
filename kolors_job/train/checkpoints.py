"""Training checkpoints: the ``checkpoints/step-N/`` layout, on local disk and in the output store.

A checkpoint directory holds accelerate's state (LoRA via the trainer's save hook, optimizer, lr
schedule, the LoRA's EMA with ``train.ema``, every rank's RNG), ``state.json`` (step, losses, run
fingerprint) and ``COMPLETE``, written last. Only a directory with ``COMPLETE`` counts, locally and in
the store (where ``upload_dir`` sends completion markers last), so a job killed mid-write or mid-upload
never resumes from a torn copy.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from collections.abc import Callable, Collection, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kolors_job.train.fingerprint import VERSION as FINGERPRINT_VERSION

if TYPE_CHECKING:
    from accelerate import Accelerator

    from kolors_job.storage import Store

log = logging.getLogger(__name__)

ROOT = "checkpoints"
STATE_NAME = "state.json"
COMPLETE_NAME = "COMPLETE"
EMA_DIR = "ema"
"""With ``train.ema``, a checkpoint's averaged LoRA (what an export of that step takes), beside the trained one
(what a resume loads): ``checkpoints/step-N/ema/``."""
KEEP_LOCAL_CHECKPOINTS = 2
"""Older local checkpoints are deleted once a newer one is complete (and handed to ``on_checkpoint``)."""


def step_key(step: int) -> str:
    """The store prefix of one checkpoint (no trailing slash)."""
    return f"{ROOT}/step-{step}"


def step_dir(work_dir: Path, step: int) -> Path:
    """Where a checkpoint lives (is written, or downloaded to resume) under a run's work dir."""
    return work_dir / step_key(step)


# ------------------------------------------------------------------------------------------- local disk


def lora_of(path: Path) -> Path:
    """The directory holding checkpoint ``path``'s exportable LoRA: its EMA's when it has one."""
    return path / EMA_DIR if (path / EMA_DIR).is_dir() else path


def check_checkpoint(path: Path) -> dict[str, Any]:
    """A resume source must carry ``COMPLETE`` (written last): anything else may be half-written."""
    path = Path(path)
    if not (path / COMPLETE_NAME).is_file():
        raise ValueError(
            f"{path}: not a complete checkpoint (no {COMPLETE_NAME} marker); refusing to resume from it"
        )
    return json.loads((path / STATE_NAME).read_text())


def save_checkpoint(
    accelerator: Accelerator,
    work_dir: Path,
    step: int,
    state: dict[str, Any],
    on_checkpoint: Callable[[Path, int], None] | None,
) -> Path:
    """``accelerate.save_state`` into a temp dir, ``state.json``, ``COMPLETE`` last, rename into place.

    One rank per node prepares and publishes the node's directory (nodes do not share a disk; every
    rank writes its RNG state into its own node's copy); rank 0 alone hands it to ``on_checkpoint``.
    """
    final = step_dir(work_dir, step)
    tmp = work_dir / ROOT / f".step-{step}.partial"
    node_main = accelerator.is_local_main_process
    if node_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    with _quiet("accelerate"):
        accelerator.save_state(str(tmp))  # every rank: each writes its own RNG state
    accelerator.wait_for_everyone()
    if node_main:
        (tmp / STATE_NAME).write_text(json.dumps(state, indent=1) + "\n")
        (tmp / COMPLETE_NAME).write_text(f"step {step}\n")
        shutil.rmtree(final, ignore_errors=True)
        os.rename(tmp, final)
    if accelerator.is_main_process:
        log.info("checkpoint", extra={"step": step, "path": str(final)})
        if on_checkpoint is not None:
            on_checkpoint(final, step)
    if node_main:  # after the upload: a stale newer step-N left in the work dir must not evict this one first
        prune_local(final.parent, keep=KEEP_LOCAL_CHECKPOINTS)
    accelerator.wait_for_everyone()
    return final


def prune_local(root: Path, *, keep: int) -> None:
    """Delete all but the ``keep`` newest complete ``step-N`` directories under ``root``."""
    done = sorted(
        (int(p.name.removeprefix("step-")), p)
        for p in root.glob("step-*")
        if p.name.removeprefix("step-").isdigit() and (p / COMPLETE_NAME).is_file()
    )
    for _, path in done[:-keep]:
        shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def _quiet(name: str) -> Iterator[None]:
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        logger.setLevel(level)


# ------------------------------------------------------------------------------------------- output store


def complete_steps(store: Store) -> list[int]:
    """Steps N of ``checkpoints/step-N/`` whose ``COMPLETE`` marker exists (torn ones never count), sorted."""
    steps = set()
    for key in store.list(f"{ROOT}/"):
        parts = key.split("/")
        if len(parts) == 3 and parts[2] == COMPLETE_NAME and parts[1].startswith("step-"):
            steps.add(int(parts[1].removeprefix("step-")))
    return sorted(steps)


def newest_complete(store: Store, identity: str | None = None) -> int | None:
    """The step to resume from: the newest complete checkpoint in the store, or None. With ``identity`` (the
    job's manifest digest), one recorded by another job, or by a kolors-job whose fingerprints were made
    otherwise (``fingerprint.VERSION``), is passed over, never resumed."""
    for step in reversed(complete_steps(store)):
        if identity is None:
            return step
        try:
            state = json.loads(store.read_bytes(f"{step_key(step)}/{STATE_NAME}"))
            recorded, version = state["fingerprint"].get("job"), state["fingerprint"].get("version", 1)
        except Exception:  # unreadable: not a checkpoint this job can vouch for
            recorded, version = None, None
        if recorded == identity and version == FINGERPRINT_VERSION:
            return step
        why = "another job" if recorded != identity else f"kolors-job with fingerprints of version {version}"
        log.warning("checkpoint %s was written by %s: not resumed", step_key(step), why)
    return None


def download(store: Store, step: int, work_dir: Path) -> Path:
    """Replace ``work_dir/checkpoints/step-N`` with the store's copy (the resume source); returns it."""
    local = step_dir(work_dir, step)
    shutil.rmtree(local, ignore_errors=True)
    store.download_dir(step_key(step) + "/", local)
    return local


def upload(store: Store, path: Path, step: int) -> None:
    """Publish a local checkpoint; ``upload_dir`` sends ``COMPLETE`` last, so a torn upload never counts."""
    store.upload_dir(path, step_key(step) + "/")


def prune(store: Store, *, keep: int, protect: Collection[int] = ()) -> None:
    """Delete complete checkpoints beyond the ``keep`` newest (the resume sources); a torn one is never
    counted, so it never evicts a complete one; ``protect`` (the selected checkpoint) is never deleted."""
    for old in complete_steps(store)[:-keep]:
        if old in protect:
            continue
        for key in store.list(step_key(old) + "/"):
            store.delete(key)
