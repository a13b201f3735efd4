"""Full-size GPU benchmark: the reference trainer vs our code path on the real Kolors architecture, random weights.

``python -m bench.gpu [--quick] [--out bench/results.json]`` on a CUDA machine; ``python -m bench.gpu --smoke``
runs the same code paths on the tiny Kolors on the CPU (tests/test_bench.py), so the script is exercised without
a GPU. Why it looks like this:

* Lent GPU time is short (one ~15 min lease, start-up included), so every measurement runs in its own
  try/except, results are written after each one (to ``--out`` and ``$OUT``), the list runs most important first
  (reference step, our step, CFG step eager vs fused, story, whole job; compile runs last), and with a time
  budget (``--quick``: 390 s) a measurement whose estimate no longer fits is skipped, not started.
* Random weights make outputs meaningless but timings and memory real: the full-size modules are built directly
  on the GPU (seconds), never loaded.
* "The reference" is what the seed baseline runs: DiffSynth 1.1.9's ``SDXLUNet(is_kolors=True)``, fp16 weights,
  peft LoRA r16/α4 on ``to_q,to_k,to_v,to_out`` (fp32), Lightning ``16-mixed`` (autocast fp16 + GradScaler),
  AdamW lr 1e-4, gradient checkpointing on; sampling runs CFG as two batch-1 passes with the LoRA unmerged.
* "Ours" goes through the job's own functions: ``kolors_job.train.loop``'s set-up steps and ``train_step`` (what
  ``train_lora``'s loop calls), and ``train_lora``/``generate_story`` themselves on a model written in diffusers
  layout. Compile always uses the default mode (max-autotune's compile time never pays back here)
  and the compile seconds are reported, because compile time is job time.
* FLOP counts were counted with ``torch.utils.flop_counter.FlopCounterMode`` on the meta device (full-size
  UNet, LoRA r16, 1024², 256 tokens): 13.93 TFLOP per CFG step (forward, batch 2), 7.01 TFLOP forward and
  14.55 TFLOP forward+backward per training sample.
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import os
import platform
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bench.context import CannotRunError, Ctx, free
from bench.facts import (
    CFG_TFLOP,
    GOALS,
    REFERENCE_ANCHORS,
    STORY_STEPS,
    TRAIN_STEPS_FULL,
    TRAIN_STEPS_QUICK,
    TRAIN_TFLOP_PER_SAMPLE,
)
from bench.ours import m_cfg, m_device, m_ours_train, m_ours_train_batch, m_vae_decode
from bench.plan_calibration import predicted_gib
from bench.reference import m_ref_cfg, m_ref_lora_injection, m_ref_train
from bench.summary import peak_tflops, short, versions
from bench.whole_job import m_job_story, m_job_train, m_job_write_model

GIB = float(1 << 30)





log = logging.getLogger("bench.gpu")




# ------------------------------------------------------------------------------------------------ context










# ------------------------------------------------------------------------------------------------ reference
















# ------------------------------------------------------------------------------------------------ ours: training






# ------------------------------------------------------------------------------------------------ ours: sampling








# ------------------------------------------------------------------------------------------------ the job


















# ------------------------------------------------------------------------------------------------ registry


@dataclass(frozen=True)
class Task:
    name: str
    est_s: float
    """Seconds on an H100 (--quick iteration counts), for the budget: a task that would overrun is skipped."""
    fn: Callable[[Ctx], dict[str, Any]]
    quick: bool = True
    """False: not in --quick (low value per device second)."""
    reference: bool = False
    compile: bool = False
    """Compiles (CUDA only: the job ignores compile on the CPU); dynamo's caches are reset afterwards."""


def tasks(args: argparse.Namespace) -> list[Task]:
    """Most important first: a timeout or the budget cuts from the end."""
    bf16, fp16 = torch.bfloat16, torch.float16
    steps = args.train_steps
    out = [
        Task("device_matmul", 3, m_device),
        Task("ref_lora_injection", 15, m_ref_lora_injection, reference=True),
        Task("ref_train_ckpt", 14, lambda c: m_ref_train(c, ckpt=True), reference=True),
        Task("ref_train_no_ckpt", 8, lambda c: m_ref_train(c, ckpt=False), reference=True),
        Task("ours_train_bf16_cl_fused", 8, lambda c: m_ours_train(c)),
        Task("cfg_bf16_eager", 6, lambda c: m_cfg(c, dtype=bf16)),
        Task("cfg_bf16_fused_cl", 6, lambda c: m_cfg(c, dtype=bf16, fuse=True, channels_last=True)),
        Task("cfg_fp16_eager", 6, lambda c: m_cfg(c, dtype=fp16)),
        Task("ref_cfg_fp16", 6, lambda c: m_ref_cfg(c, batched=False, lora=False), reference=True),
        Task("ref_cfg_fp16_lora", 6, lambda c: m_ref_cfg(c, batched=False, lora=True), reference=True),
        Task("ours_train_bf16", 8, lambda c: m_ours_train(c, channels_last=False, fused=False)),
        Task("ours_train_bf16_ckpt", 10, lambda c: m_ours_train(c, ckpt=True)),
        Task("vae_decode_bf16", 4, lambda c: m_vae_decode(c, dtype=bf16)),
        Task("vae_decode_bf16_tiled", 4, lambda c: m_vae_decode(c, dtype=bf16, tiled=True)),
        Task("ours_train_batch", 30, m_ours_train_batch),
        Task("job_write_model", 60, m_job_write_model),
        Task("job_train", 30 + 0.6 * steps, m_job_train),
        Task("job_story", 65, lambda c: m_job_story(c, compile_story=False)),
        Task("cfg_bf16_fused_cl_compile_blocks", 60, lambda c: m_cfg(c, dtype=bf16, fuse=True, channels_last=True,
                                                                    compile_mode="blocks"), compile=True),
        Task("ours_train_bf16_cl_fused_compile_blocks", 120, lambda c: m_ours_train(c, compile_blocks=True),
             compile=True),
        Task("cfg_bf16_fused_cl_compile", 150, lambda c: m_cfg(c, dtype=bf16, fuse=True, channels_last=True,
                                                              compile_mode="whole"), compile=True),
        Task("job_story_compile", 220, lambda c: m_job_story(c, compile_story=True), compile=True),
        Task("ref_cfg_fp16_b2", 6, lambda c: m_ref_cfg(c, batched=True, lora=False), quick=False, reference=True),
        Task("vae_decode_fp16", 4, lambda c: m_vae_decode(c, dtype=fp16), quick=False),
        Task("vae_decode_bf16_b8", 8, lambda c: m_vae_decode(c, dtype=bf16, batch=8), quick=False),
    ]
    return out


def _selected(name: str, patterns: list[str]) -> bool:
    return any(name == p or name.startswith(p) for p in patterns)


def run_task(ctx: Ctx, task: Task) -> None:
    """Run one measurement in isolation: budget check, try/except, timing, memory release, incremental write."""
    args = ctx.args
    base: dict[str, Any] = {"est_s": task.est_s}
    reason = None
    if args.only and not _selected(task.name, args.only):
        reason = "not selected (--only)"
    elif args.skip and _selected(task.name, args.skip):
        reason = "skipped (--skip)"
    elif task.name == "ref_lora_injection":
        if not (args.with_reference or args.only):
            reason = "meta-device LoRA check: pass --with-reference"
    elif task.reference and ctx.tiny:
        reason = "DiffSynth's UNet is full size only: needs CUDA without --tiny"
    elif task.compile and not ctx.cuda:
        reason = "compile: CUDA only (train_lora and generate_story ignore compile on the CPU)"
    elif (args.quick or args.smoke) and not task.quick and not args.only:
        reason = "not in --quick"
    elif ctx.budget_s is not None and not args.only:
        left = ctx.budget_s - ctx.elapsed()
        est = 2.0 if (task.name == "job_write_model" and ctx.tiny) else task.est_s
        if est > left:
            reason = f"budget: needs ~{est:.0f} s, {max(left, 0):.0f} s of {ctx.budget_s:.0f} s left"
    if reason:
        ctx.record(task.name, {**base, "status": "skipped", "reason": reason})
        print(f"[{ctx.elapsed():7.1f}s] {task.name}: skipped ({reason})", flush=True)
        return
    print(f"[{ctx.elapsed():7.1f}s] {task.name}: running", flush=True)
    ctx.record(task.name, {**base, "status": "running", "started_s": round(ctx.elapsed(), 1)})
    free(ctx)
    t = time.perf_counter()
    entry: dict[str, Any]
    try:
        entry = {"status": "ok", **task.fn(ctx)}
    except CannotRunError as exc:
        entry = {"status": "skipped", "reason": str(exc)}
    except torch.cuda.OutOfMemoryError as exc:
        entry = {"status": "oom", "error": one_line(exc)}
    except Exception as exc:
        entry = {"status": "error", "error": f"{type(exc).__name__}: {one_line(exc)}",
                 "traceback": traceback.format_exc(limit=-6)[-3000:]}
    if ctx.interrupted:
        entry = {"status": "interrupted", "reason": f"signal during the run; partial result: {short(entry)}"}
    entry = {**base, **entry, "wall_s": round(time.perf_counter() - t, 2)}
    if entry.get("peak_gib") is not None and not ctx.tiny:  # the memory planner's prediction, to check it
        entry["predicted_peak_gib"] = predicted_gib(task.name, entry)
    if entry["status"] in ("error", "oom") and ctx.cuda:
        entry["peak_gib"] = ctx.peak_gib()
    free(ctx, dynamo=task.compile)
    ctx.record(task.name, entry)
    print(f"[{ctx.elapsed():7.1f}s] {task.name}: {short(entry)}", flush=True)
    if ctx.interrupted:
        raise KeyboardInterrupt


def one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:400] + ("..." if len(text) > 400 else "")




# ------------------------------------------------------------------------------------------------ summary
















# ------------------------------------------------------------------------------------------------ main




def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="the lent-GPU run: 390 s budget, 20 train steps, no extras")
    p.add_argument("--smoke", action="store_true", help="--tiny --device cpu with minimal steps (tests)")
    p.add_argument("--tiny", action="store_true", help="the tiny Kolors instead of the full-size architecture")
    p.add_argument("--device", help="cuda (default when available) or cpu (needs --tiny)")
    p.add_argument("--with-reference", action="store_true",
                   help="tiny mode: build DiffSynth's and our full-size UNets on the meta device and check the LoRA")
    p.add_argument("--out", type=Path, default=Path("bench/results.json"))
    p.add_argument("--only", type=lambda s: [x for x in s.split(",") if x], default=[],
                   help="comma-separated task names or prefixes (ignores the budget)")
    p.add_argument("--skip", type=lambda s: [x for x in s.split(",") if x], default=[])
    p.add_argument("--budget-s", type=float, help="skip tasks whose estimate would overrun (default: 390 with --quick)")
    p.add_argument("--work-dir", type=Path, help="model, dataset and job outputs (default: $TMPDIR/kolors-bench)")
    p.add_argument("--train-steps", type=int, help=f"job_train steps (default {TRAIN_STEPS_QUICK} with --quick, "
                                                  f"{TRAIN_STEPS_FULL} otherwise, 2 with --smoke)")
    p.add_argument("--story-steps", type=int, help=f"denoising steps per frame (default {STORY_STEPS}; 2 with --smoke)")
    p.add_argument("--images", type=int, help="training images written for job_train (default 8; 2 with --smoke)")
    p.add_argument("--target-s", type=float, help="timed seconds per measurement (default 2 quick, 6 otherwise)")
    p.add_argument("--iters", type=int, help="fixed timed iterations per measurement (overrides --target-s)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's; 1 with --smoke, which on a "
                                              "shared 2-core machine avoids OpenMP spin-waits 10x slower than work)")
    p.add_argument("--list", action="store_true", help="print the tasks in run order and exit")
    args = p.parse_args(argv)
    if args.smoke:
        args.tiny = True
        args.device = args.device or "cpu"
    args.train_steps = args.train_steps or (2 if args.smoke else TRAIN_STEPS_QUICK if args.quick else TRAIN_STEPS_FULL)
    args.story_steps = args.story_steps or (2 if args.smoke else STORY_STEPS)
    args.images = args.images or (2 if args.smoke else 8)
    args.target_s = args.target_s or (2.0 if (args.quick or args.smoke) else 6.0)
    if args.smoke and not args.iters:
        args.iters = 1
    if args.smoke and not args.threads:
        args.threads = 1
    if args.budget_s is None and args.quick:
        args.budget_s = 390.0
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.list:
        for task in tasks(args):
            print(f"{task.name:45s} ~{task.est_s:5.0f} s{'' if task.quick else '  (not in --quick)'}")
        return 0
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cpu" and not args.tiny:
        print("error: the full-size architecture needs a GPU; use --tiny (or --smoke) on the CPU", file=sys.stderr)
        return 2
    if dev.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 2
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    work_dir = args.work_dir or Path(tempfile.gettempdir()) / ("kolors-bench-tiny" if args.tiny else "kolors-bench")
    out_paths = [args.out.resolve()]
    env_out = os.environ.get("OUT")
    if env_out and not str(out_paths[0]).startswith(str(Path(env_out).resolve()) + os.sep):
        out_paths.append(Path(env_out).resolve() / "bench.json")
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else (platform.processor() or platform.machine())
    meta: dict[str, Any] = {
        "command": "python -m bench.gpu " + " ".join(argv),
        "argv": argv,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "mode": mode,
        "tiny": args.tiny,
        "device": str(dev),
        "device_name": name,
        "gpu_memory_gib": round(torch.cuda.get_device_properties(dev).total_memory / GIB, 1)
        if dev.type == "cuda" else None,
        "cpu_count": os.cpu_count(),
        "load_avg": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "versions": versions(),
        "peak_tflops_assumed": peak_tflops(name) if dev.type == "cuda" else None,
        "flops": {"cfg_step_tflop": CFG_TFLOP, "train_sample_tflop": TRAIN_TFLOP_PER_SAMPLE,
                  "how": "FlopCounterMode on the meta device, full-size UNet, 1024², 256 tokens, LoRA r16"},
        "budget_s": args.budget_s,
        "settings": {"train_steps": args.train_steps, "story_steps": args.story_steps, "images": args.images,
                     "target_s": args.target_s, "iters": args.iters, "work_dir": str(work_dir)},
        "goals": GOALS,
        "reference_anchors": {"source": "docs/design.md §2 (2026-11-24, H100, torch 2.11; not measured by this run)",
                              **REFERENCE_ANCHORS},
    }
    ctx = Ctx(args=args, dev=dev, tiny=args.tiny, mode=mode, budget_s=args.budget_s, work_dir=work_dir,
              out_paths=out_paths, doc={"meta": meta, "results": {}, "goals": [], "estimates": {}, "table_md": ""})
    print(f"bench.gpu: {mode} on {name} ({dev}), budget {args.budget_s} s, results -> "
          f"{', '.join(map(str, out_paths))}", flush=True)
    ctx.write()

    def on_signal(signum: int, _frame: Any) -> None:
        ctx.interrupted = True
        raise KeyboardInterrupt(signal.Signals(signum).name)

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    code = 0
    current = None
    try:
        for task in tasks(args):
            current = task.name
            run_task(ctx, task)
        current = None
    except KeyboardInterrupt:  # `timeout -s INT`: keep what was measured
        if current and ctx.doc["results"].get(current, {}).get("status") == "running":
            ctx.doc["results"][current] = {"status": "interrupted", "reason": "signal (timeout?) during this task"}
        code = 130
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    ctx.doc["meta"]["total_s"] = round(ctx.elapsed(), 1)
    ctx.write()
    print()
    print(ctx.doc["table_md"])
    return code


if __name__ == "__main__":
    raise SystemExit(main())
