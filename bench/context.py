"""What every measurement of ``bench.gpu`` runs in: the settings, the device, timing with device syncs, the
full-size modules built directly on the device with random weights, and the results document, rewritten
atomically after each measurement (a kill leaves the last complete file)."""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import os
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from bench.facts import GIB
from bench.summary import summarize


class CannotRunError(Exception):
    """A measurement that cannot run here (no CUDA, no disk, a prerequisite missing): recorded, not an error."""


@dataclass
class Ctx:
    """Everything a measurement needs: settings, the device, the results document and its writers."""

    args: argparse.Namespace
    dev: torch.device
    tiny: bool
    mode: str
    budget_s: float | None
    work_dir: Path
    out_paths: list[Path]
    doc: dict[str, Any]
    t0: float = field(default_factory=time.perf_counter)
    shared: dict[str, Any] = field(default_factory=dict)
    interrupted: bool = False
    """Set by SIGINT/SIGTERM (``timeout``): a compile step may swallow the KeyboardInterrupt, this flag cannot be."""

    @property
    def cuda(self) -> bool:
        return self.dev.type == "cuda"

    @property
    def unet_cfg(self) -> dict[str, Any]:
        from kolors_job.models.configs import KOLORS_UNET_CONFIG
        from kolors_job.models.tiny import TINY_UNET_CONFIG

        return TINY_UNET_CONFIG if self.tiny else KOLORS_UNET_CONFIG

    @property
    def vae_cfg(self) -> dict[str, Any]:
        from kolors_job.models.configs import KOLORS_VAE_CONFIG
        from kolors_job.models.tiny import TINY_VAE_CONFIG

        return TINY_VAE_CONFIG if self.tiny else KOLORS_VAE_CONFIG

    @property
    def latent(self) -> int:
        return int(self.unet_cfg["sample_size"])

    @property
    def res(self) -> int:
        return self.latent * 8

    @property
    def seq(self) -> int:
        return 256

    @property
    def text_dim(self) -> int:
        return int(self.unet_cfg["encoder_hid_dim"])

    @property
    def pooled_dim(self) -> int:
        cfg = self.unet_cfg
        return int(cfg["projection_class_embeddings_input_dim"]) - 6 * int(cfg["addition_time_embed_dim"])

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def dtype(self, want: torch.dtype) -> torch.dtype:
        """The dtype a variant asks for on CUDA; fp32 on the CPU (the smoke checks code paths, not precisions)."""
        return want if self.cuda else torch.float32

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.dev)

    def reset_peak(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.dev)

    def peak_gib(self) -> float | None:
        return round(torch.cuda.max_memory_allocated(self.dev) / GIB, 2) if self.cuda else None

    # ---- timing

    def bench(
        self, fn: Callable[[], Any], *, warmup: int = 2, min_iters: int = 3, max_iters: int = 30
    ) -> dict[str, Any]:
        """Median wall time of ``fn`` with a device sync around each call, after ``warmup`` untimed calls.

        Iterations adapt to the last warm-up's duration so each measurement costs about ``--target-s`` of
        timed work (a 1.2 s step gets 3, a 60 ms step 30); warm-up times are kept (compile shows up there).
        """
        warm: list[float] = []
        if self.args.smoke:
            warmup = 1  # the smoke checks code paths; its numbers are not timings
        for _ in range(max(1, warmup)):
            self.sync()
            t = time.perf_counter()
            fn()
            self.sync()
            warm.append(time.perf_counter() - t)
        if self.args.iters:
            iters = self.args.iters
        else:
            iters = int(self.args.target_s / max(warm[-1], 1e-4))
            iters = max(min_iters, min(max_iters, iters))
        times: list[float] = []
        for _ in range(iters):
            self.sync()
            t = time.perf_counter()
            fn()
            self.sync()
            times.append(time.perf_counter() - t)
        med = statistics.median(times)
        return {
            "ms": round(med * 1e3, 3),
            "ms_min": round(min(times) * 1e3, 3),
            "ms_max": round(max(times) * 1e3, 3),
            "iters": iters,
            "warmup_s": [round(w, 3) for w in warm],
            "ms_all": [round(x * 1e3, 2) for x in times],
        }

    # ---- builders (random weights, directly on the device)

    def build_unet(self, dtype: torch.dtype) -> torch.nn.Module:
        from diffusers import UNet2DConditionModel

        torch.manual_seed(0)
        with torch.device(self.dev):
            unet = UNet2DConditionModel(**copy.deepcopy(self.unet_cfg))
        # nn.Module.to: diffusers' own .to(dtype) warns about fp32-only modules even when there are none.
        return torch.nn.Module.to(unet, dtype=dtype)

    def build_vae(self, dtype: torch.dtype) -> torch.nn.Module:
        from diffusers import AutoencoderKL

        torch.manual_seed(0)
        with torch.device(self.dev):
            vae = AutoencoderKL(**copy.deepcopy(self.vae_cfg))
        return torch.nn.Module.to(vae, dtype=dtype)

    # ---- results

    def record(self, name: str, entry: dict[str, Any]) -> None:
        self.doc["results"][name] = entry
        self.write()

    def write(self) -> None:
        """Rewrite the JSON (and the markdown table beside it) atomically: a kill leaves the last complete file."""
        summarize(self.doc)
        text = json.dumps(self.doc, indent=1, ensure_ascii=False, default=str) + "\n"
        for path in self.out_paths:
            _atomic_write(path, text)
            _atomic_write(path.with_suffix(".md"), self.doc["table_md"])


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def free(ctx: Ctx, *, dynamo: bool = False) -> None:
    """Drop what a measurement left behind so the next one starts from an empty GPU."""
    if dynamo:
        with contextlib.suppress(Exception):
            torch._dynamo.reset()
    gc.collect()
    if ctx.cuda:
        torch.cuda.empty_cache()


@contextlib.contextmanager
def cuda_flags(ctx: Ctx, *, benchmark: bool) -> Iterator[None]:
    """cudnn.benchmark/TF32 as the code under test sets them: train_lora turns all on, Lightning leaves them off."""
    if not ctx.cuda:
        yield
        return
    old = (torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cudnn.benchmark = benchmark
    torch.backends.cuda.matmul.allow_tf32 = benchmark
    torch.backends.cudnn.allow_tf32 = benchmark
    try:
        yield
    finally:
        (torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32,
         torch.backends.cudnn.allow_tf32) = old
