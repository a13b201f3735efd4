"""``bench.gpu``'s whole-job measurements: ``train_lora`` and ``generate_story`` themselves on a full-size model
written in diffusers layout, with the time each phase took (from the job's own log lines) and the host's peak
memory."""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import shutil
import statistics
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from bench.context import CannotRunError, Ctx
from bench.facts import BENCH_VERSION, CAPTION, GIB, MIN_FREE_DISK_BYTES, STORY_FRAMES_PER_BATCH


class _LogTimes(logging.Handler):
    """Timestamps of the job's own log records (``step``, ``batch``, ...): per-step times without touching its code."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.events: list[tuple[float, str, dict[str, Any]]] = []

    def emit(self, record: logging.LogRecord) -> None:
        extra = {k: getattr(record, k) for k in ("seconds", "step", "images") if hasattr(record, k)}
        self.events.append((time.perf_counter(), record.getMessage(), extra))

    def times(self, message: str) -> list[float]:
        return [t for t, m, _ in self.events if m == message]

    def extra(self, message: str, key: str) -> list[Any]:
        return [e[key] for _, m, e in self.events if m == message and key in e]


@contextlib.contextmanager
def _capture(*names: str) -> Iterator[_LogTimes]:
    handler = _LogTimes()
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
        lg.setLevel(logging.INFO)
    try:
        yield handler
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.removeHandler(handler)
            lg.setLevel(level)


class _HostPeak:
    """This process's peak private (``RssAnon``) and total resident memory while the block runs, sampled every
    20 ms. Private memory is what each DDP rank adds to its pod (``launch.pod.HOST_MEMORY_PER_RANK_GIB``); the rest
    is the page-cached weight files every rank maps, counted once per pod (``launch.pod.HOST_MEMORY_BASE_GIB``)."""

    def __init__(self) -> None:

        self.private = self.resident = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def _now() -> tuple[int, int]:
        fields = {}
        with contextlib.suppress(OSError):
            for line in Path("/proc/self/status").read_text().splitlines():
                key, _, value = line.partition(":")
                if key in ("RssAnon", "VmRSS"):
                    fields[key] = int(value.split()[0]) * 1024
        return fields.get("RssAnon", 0), fields.get("VmRSS", 0)

    def _run(self) -> None:
        while True:
            private, resident = self._now()
            self.private, self.resident = max(self.private, private), max(self.resident, resident)
            if self._stop.wait(0.02):
                return

    def __enter__(self) -> _HostPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def record(self) -> dict[str, float]:
        return {"host_private_peak_gib": round(self.private / GIB, 2),
                "host_resident_peak_gib": round(self.resident / GIB, 2)}


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def m_job_write_model(ctx: Ctx) -> dict[str, Any]:
    """The full-size random Kolors in diffusers layout (what ``resolve_model`` hands the job), once per machine.

    Built on the GPU by ``build_full_size_kolors_random`` (bf16, ≈17 GB), saved like ``build_tiny_kolors``
    saves the tiny one (real tokenizer files and scheduler config verbatim), published with ``atomic_dir`` so a
    second run on the same warm machine reuses it.
    """
    from kolors_job.models.tiny import build_tiny_kolors
    from kolors_job.storage.atomic import COMPLETE_MARKER, atomic_dir

    if ctx.tiny:
        t = time.perf_counter()
        path = build_tiny_kolors(ctx.work_dir / "model-tiny")
        ctx.shared["model_dir"] = path
        return {"kind": "job", "s": round(time.perf_counter() - t, 2), "path": str(path),
                "bytes": _dir_bytes(path)}
    path = ctx.work_dir / "model-full-size-random-bf16"
    info = {"kind": "full-size-random-kolors", "dtype": "bf16", "bench_version": BENCH_VERSION}
    reused = (path / COMPLETE_MARKER).is_file()
    if not reused:
        ctx.work_dir.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(ctx.work_dir).free
        if free < MIN_FREE_DISK_BYTES:
            raise CannotRunError(
                f"only {free / 1e9:.0f} GB free under {ctx.work_dir}; the model needs ~17 GB (40 GB asked)"
            )
    times: dict[str, float] = {}

    def write(out: Path) -> None:
        from diffusers import KolorsPipeline

        from kolors_job.models.configs import KOLORS_SCHEDULER_CONFIG
        from kolors_job.models.tiny import build_full_size_kolors_random, chatglm_tokenizer_dir

        t = time.perf_counter()
        unet, vae, text_encoder, tokenizer, scheduler = build_full_size_kolors_random(ctx.dev, torch.bfloat16)
        ctx.sync()
        times["build_s"] = time.perf_counter() - t
        t = time.perf_counter()
        unet, vae, text_encoder = unet.to("cpu"), vae.to("cpu"), text_encoder.to("cpu")
        free(ctx)
        KolorsPipeline(
            vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
            force_zeros_for_empty_prompt=False,
        ).save_pretrained(out, safe_serialization=True)
        shutil.rmtree(out / "tokenizer")
        shutil.copytree(chatglm_tokenizer_dir(), out / "tokenizer")
        (out / "scheduler" / "scheduler_config.json").write_text(json.dumps(KOLORS_SCHEDULER_CONFIG, indent=2) + "\n")
        times["save_s"] = time.perf_counter() - t

    t = time.perf_counter()
    atomic_dir(path, info, write, replace_stale=True)
    ctx.shared["model_dir"] = path
    return {"kind": "job", "s": round(time.perf_counter() - t, 2), "reused": reused, "path": str(path),
            "bytes": _dir_bytes(path), **{k: round(v, 2) for k, v in times.items()}}


def _dataset(ctx: Ctx) -> list[Any]:
    """``--images`` JPEGs at the training resolution (smooth random colour fields): real files for ``train_lora``."""
    import numpy as np
    from PIL import Image

    from kolors_job.data.images import ImageItem

    root = ctx.work_dir / f"dataset-{ctx.res}-{ctx.args.images}"
    root.mkdir(parents=True, exist_ok=True)
    items = []
    for i in range(ctx.args.images):
        path = root / f"img_{i:03d}.jpg"
        if not path.is_file():
            rng = np.random.default_rng(i)
            small = Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))
            small.resize((ctx.res, ctx.res), Image.Resampling.BICUBIC).save(path, quality=90)
        items.append(ImageItem(path, CAPTION, ctx.res, ctx.res))
    return items


def m_job_train(ctx: Ctx) -> dict[str, Any]:
    """``train_lora`` itself on the written model: load, encode captions, cache latents, N steps, save the LoRA."""
    from kolors_job.manifest.train import TrainSpec
    from kolors_job.train.loop import train_lora

    model_dir = ctx.shared.get("model_dir")
    if model_dir is None:
        raise CannotRunError("no model on disk (job_write_model did not run or failed)")
    items = _dataset(ctx)
    spec = TrainSpec(steps=ctx.args.train_steps, checkpoint_every=10**6, resolution=ctx.res)
    work = ctx.work_dir / "job-train"
    shutil.rmtree(work, ignore_errors=True)
    ctx.reset_peak()
    with _capture("kolors_job.train") as logs, _HostPeak() as host:
        t = time.perf_counter()
        result = train_lora(model_dir, items, spec, work_dir=work, device=str(ctx.dev), progress=False)
        wall = time.perf_counter() - t
    ctx.shared["lora_dir"] = result.lora_dir
    steps = logs.times("step")
    start = logs.times("training")
    loop_start = start[0] if start else (steps[0] if steps else t)
    intervals = [b - a for a, b in itertools.pairwise([loop_start, *steps])]
    steady = intervals[2:] if len(intervals) > 4 else intervals
    step_ms = statistics.median(steady) * 1e3 if steady else None
    setup_s = loop_start - t
    return {
        "kind": "job", "s": round(wall, 2), "steps": result.steps, "images": len(items),
        "setup_s": round(setup_s, 2), "loop_s": round((steps[-1] - loop_start) if steps else 0.0, 2),
        "after_loop_s": round(wall - ((steps[-1] - t) if steps else wall), 2),
        "step_ms": round(step_ms, 2) if step_ms else None,
        "steps_per_s": round(1e3 / step_ms, 3) if step_ms else None,
        "first_step_ms": round(intervals[0] * 1e3, 1) if intervals else None,
        "encode_captions_s": (logs.extra("encoded captions", "seconds") or [None])[0],
        "cache_latents_s": (logs.extra("cached latents", "seconds") or [None])[0],
        "peak_gib": round(result.peak_memory_bytes / GIB, 2) if result.peak_memory_bytes else None,
        **host.record(),
        "precision": result.precision, "gradient_checkpointing": result.gradient_checkpointing,
        "loss_first": result.losses[0] if result.losses else None,
        "loss_last": result.losses[-1] if result.losses else None,
        "config": {"spec": spec.model_dump(mode="json", include={"rank", "alpha", "batch_size", "resolution",
                                                                  "precision", "gradient_checkpointing", "compile"})},
    }


def m_job_story(ctx: Ctx, *, compile_story: bool) -> dict[str, Any]:
    """``generate_story`` itself: load the pipeline (+ LoRA), 8 frames × ``--story-steps`` steps in one batch of 8,
    decode, write PNGs. The wall time includes loading and, with ``compile``, compilation: that is job time."""
    from kolors_job.manifest.story import StorySpec
    from kolors_job.story.draw import generate_story

    if compile_story and not ctx.cuda:
        raise CannotRunError("compile: CUDA only (generate.py ignores spec.story.compile on the CPU)")
    model_dir = ctx.shared.get("model_dir")
    if model_dir is None:
        raise CannotRunError("no model on disk (job_write_model did not run or failed)")
    lora_dir = ctx.shared.get("lora_dir")
    spec = StorySpec(steps=ctx.args.story_steps, width=ctx.res, height=ctx.res,
                     batch_size=STORY_FRAMES_PER_BATCH, compile=compile_story)
    out = ctx.work_dir / ("job-story-compile" if compile_story else "job-story")
    shutil.rmtree(out, ignore_errors=True)
    ctx.reset_peak()
    with _capture("kolors_job.story") as logs, _HostPeak() as host:
        t = time.perf_counter()
        frames = generate_story(model_dir, spec, out_dir=out, lora_dir=lora_dir, device=str(ctx.dev), progress=False)
        wall = time.perf_counter() - t
    batches = logs.extra("batch", "seconds")
    render = float(sum(batches)) if batches else None
    n = len(frames)
    return {
        "kind": "job", "s": round(wall, 2), "frames": n, "steps": spec.steps, "batch_size": spec.batch_size,
        "render_s": round(render, 2) if render is not None else None,
        "load_and_write_s": round(wall - render, 2) if render is not None else None,
        "per_step_ms": round(render / spec.steps * 1e3, 1) if render else None,
        "per_image_cfg_step_ms": round(render / (spec.steps * max(n, 1)) * 1e3, 2) if render else None,
        "peak_gib": ctx.peak_gib(), **host.record(), "lora": str(lora_dir) if lora_dir else None,
        "config": {"compile": compile_story, "lora_scale": spec.lora_scale, "scheduler": spec.scheduler},
    }
