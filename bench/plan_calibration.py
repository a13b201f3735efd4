"""The memory planner against measured peaks: each measured configuration predicted on the CPU, side by side.

``python -m bench.plan_calibration`` prints the table (bench/README.md holds a copy) and exits 1 when a row is more
than 10 % off. The predictions come from ``bench/plan_calibration.json`` unless ``--recompute`` (about 4 minutes
on 2 CPU cores; ``tests/test_plan.py`` recomputes rows and checks the file). ``bench.gpu`` records the planner's
prediction beside every peak it measures (:func:`predicted_gib`), so each lent GPU checks the planner again.

The measured rows: one H100 80GB, 2026-11-24, torch 2.11, random full-size Kolors weights, 1024²,
``torch.cuda.max_memory_allocated`` (weights included), by the throwaway script quoted in docs/design.md §2.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from kolors_job.plan.meta import DTYPES, SEQ, Result, Sim
from kolors_job.plan.simulate import Denoise, TextEncode, VaeDecode, VaeEncode
from kolors_job.plan.train_step import LOSS_SCALE, TrainStep, lora_step

if TYPE_CHECKING:
    from kolors_job.plan.table import Results

GIB = float(1 << 30)
TOLERANCE = 0.10
TABLE = Path(__file__).with_name("plan_calibration.json")
SOURCE = "one H100 80GB, 2026-11-24, torch 2.11, random full-size weights"
REF_TARGETS = ("to_q", "to_k", "to_v", "to_out")


@dataclass(frozen=True)
class ReferenceTrainStep(Sim):
    """The seed baseline's step (``bench.reference.m_ref_train``): DiffSynth 1.1.9 ``SDXLUNet(is_kolors=True)``, fp16
    weights, peft LoRA r16 fp32 on ``to_q,to_k,to_v,to_out`` (``inject_adapter_in_model``), Lightning
    ``16-mixed`` (autocast fp16, GradScaler), plain AdamW (foreach on CUDA), DiffSynth's own checkpointing."""

    kind: ClassVar[str] = "ref_train_step"
    checkpointing: bool
    batch: int = 1
    resolution: int = 1024

    def run(self) -> Result:
        from peft import LoraConfig, inject_adapter_in_model

        from bench.reference import load_diffsynth_sdxl_unet
        from kolors_job.plan.fake import materialize, simulation

        with torch.device("meta"):
            model = load_diffsynth_sdxl_unet()(is_kolors=True).requires_grad_(False)
            model = inject_adapter_in_model(LoraConfig(r=16, lora_alpha=4.0, target_modules=list(REF_TARGETS)), model)
        b, lat, r = self.batch, self.resolution // 8, self.resolution
        half = torch.float16

        def inputs() -> dict[str, torch.Tensor]:
            return {
                "sample": torch.empty(b, 4, lat, lat, dtype=half),
                "noise": torch.empty(b, 4, lat, lat, dtype=half),
                "timestep": torch.tensor([499.0]),
                "encoder_hidden_states": torch.empty(b, SEQ, 4096, dtype=half),
                "add_text_embeds": torch.empty(b, 4096, dtype=half),
                "add_time_id": torch.tensor([r, r, 0, 0, r, r]).repeat(b),
            }

        def forward(m: torch.nn.Module, x: dict[str, torch.Tensor]) -> torch.Tensor:
            return m(x["sample"], timestep=x["timestep"], encoder_hidden_states=x["encoder_hidden_states"],
                     add_time_id=x["add_time_id"], add_text_embeds=x["add_text_embeds"],
                     use_gradient_checkpointing=self.checkpointing)  # fmt: skip

        def dtype_of(_name: str, t: torch.Tensor) -> torch.dtype:
            return t.dtype if not t.is_floating_point() else DTYPES["fp32"] if t.requires_grad else half

        with simulation():
            materialize(model, dtype_of)
            model.train()
            return lora_step(model, forward, inputs, mixed="fp16", optimizer="adamw_foreach", loss_scale=LOSS_SCALE)


@dataclass(frozen=True)
class Row:
    name: str
    what: str
    measured_gib: float
    sim: Callable[[], Sim]


_BF16 = {"resolution": 1024, "weights": "bf16", "mixed": "bf16", "batch": 1}
ROWS: tuple[Row, ...] = (
    Row("diffusers_bf16_ckpt", "diffusers UNet, bf16, LoRA r16 on to_q/k/v/out.0 (fp32 LoRA), AdamW, batch 1, "
        "gradient checkpointing", 5.9,
        lambda: TrainStep(**_BF16, checkpointing=True, optimizer="adamw_foreach")),
    Row("diffusers_bf16", "the same without gradient checkpointing", 12.7,
        lambda: TrainStep(**_BF16, checkpointing=False, optimizer="adamw_foreach")),
    Row("diffusers_bf16_compile", "the same, torch.compile + channels-last + fused AdamW", 10.1,
        lambda: TrainStep(**_BF16, checkpointing=False, optimizer="adamw_fused", compile="whole")),
    Row("diffsynth_fp16_ckpt", "DiffSynth 1.1.9 SDXLUNet(is_kolors=True), fp16, peft LoRA r16 fp32, 16-mixed, "
        "gradient checkpointing", 6.2, lambda: ReferenceTrainStep(checkpointing=True)),
    Row("diffsynth_fp16", "the same without gradient checkpointing", 12.7,
        lambda: ReferenceTrainStep(checkpointing=False)),
    Row("chatglm_encode", "ChatGLM3-6B encode, 2 × 256 tokens, fp16", 11.9, lambda: TextEncode(batch=2, dtype="fp16")),
)  # fmt: skip


def predict(row: Row) -> float:
    """The row's predicted peak in GiB, computed now."""
    return row.sim().run().peak / GIB


def stored() -> dict[str, Any]:
    return json.loads(TABLE.read_text())


def table(predicted: dict[str, float]) -> str:
    """The markdown table of bench/README.md."""
    lines = [
        "| configuration | measured GiB | predicted GiB | error |",
        "|---|---:|---:|---:|",
    ]
    for row in ROWS:
        p = predicted[row.name]
        lines.append(f"| {row.what} | {row.measured_gib:.1f} | {p:.2f} | {100 * (p / row.measured_gib - 1):+.1f} % |")
    return "\n".join(lines)


def off_rows(predicted: dict[str, float]) -> list[str]:
    return [r.name for r in ROWS if abs(predicted[r.name] / r.measured_gib - 1) > TOLERANCE]


def bench_predictions(results: Results, rows: dict[str, float]) -> dict[str, float]:
    """The planner's peak (GiB) for each ``bench.gpu`` measurement of the full-size model at 1024² that our code
    path makes (regional compile and DiffSynth's sampling are not simulated). ``ours_train_batch@N``: batch N.
    ``rows``: the calibration rows' predictions (the reference trainer's steps are two of them)."""
    gib = {"ref_train_ckpt": rows["diffsynth_fp16_ckpt"], "ref_train_no_ckpt": rows["diffsynth_fp16"]}

    def peak(sim: Sim) -> int:
        return results.get(sim).peak

    bf16 = {"resolution": 1024, "weights": "bf16", "mixed": "bf16"}
    out = {
        **gib,
        "ours_train_bf16_cl_fused": peak(TrainStep(1, **bf16, checkpointing=False)) / GIB,
        "ours_train_bf16": peak(TrainStep(1, **bf16, checkpointing=False, optimizer="adamw_foreach")) / GIB,
        "ours_train_bf16_ckpt": peak(TrainStep(1, **bf16, checkpointing=True)) / GIB,
        **{f"ours_train_batch@{b}": peak(TrainStep(b, **bf16, checkpointing=False)) / GIB for b in (8, 4, 2)},
        "cfg_bf16_eager": peak(Denoise(1, 1024, 1024, "bf16")) / GIB,
        "cfg_fp16_eager": peak(Denoise(1, 1024, 1024, "fp16")) / GIB,
        "cfg_bf16_fused_cl": peak(Denoise(1, 1024, 1024, "bf16", fuse_qkv=True)) / GIB,
        "vae_decode_bf16": peak(VaeDecode(1, 1024, 1024, "bf16", sliced=False)) / GIB,
        "vae_decode_bf16_tiled": peak(VaeDecode(1, 1024, 1024, "bf16", sliced=False, tiled=True)) / GIB,
        "vae_decode_fp16": peak(VaeDecode(1, 1024, 1024, "fp16", sliced=False)) / GIB,
        "vae_decode_bf16_b8": peak(VaeDecode(8, 1024, 1024, "bf16", sliced=False)) / GIB,
    }
    # job_train: train_lora on bf16 files, precision auto (fp16 on CUDA, the VAE in fp32), 8 images per VAE call,
    # no checkpointing on a large card, no aesthetic predictor; its peak counts the encode and the latents too.
    out["job_train"] = max(peak(TextEncode(1, "fp16")), peak(VaeEncode(8, 1024, "fp32")),
                           peak(TrainStep(1, 1024, "fp16", "fp16", checkpointing=False))) / GIB  # fmt: skip
    # job_story: ChatGLM alone, then the fp16 UNet (LoRA merged, q/k/v fused) + VAE; batch 8; fp32 sliced decode.
    story = results.get(Denoise(8, 1024, 1024, "fp16", fuse_qkv=True))
    vae16 = results.get(VaeDecode(1, 1024, 1024, "fp16")).start
    out["job_story"] = max(peak(TextEncode(1, "fp16")), story.peak + vae16,
                           story.start + peak(VaeDecode(8, 1024, 1024, "fp32"))) / GIB  # fmt: skip
    return {k: round(v, 3) for k, v in out.items()}


def predicted_gib(name: str, entry: dict[str, Any]) -> float | None:
    """The stored prediction for a ``bench.gpu`` measurement (None when the planner has none for it)."""
    key = f"{name}@{entry.get('batch')}" if name == "ours_train_batch" else name
    return stored().get("bench_predicted_gib", {}).get(key)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.plan_calibration", description=__doc__.splitlines()[0])
    p.add_argument("--recompute", action="store_true", help="simulate every row now and rewrite the stored table")
    args = p.parse_args(argv)
    if args.recompute:
        predicted = {}
        for row in ROWS:
            t0 = time.monotonic()
            predicted[row.name] = round(predict(row), 3)
            print(f"{row.name}: {predicted[row.name]:.3f} GiB ({time.monotonic() - t0:.0f} s)", file=sys.stderr)
        from kolors_job.plan.table import Results

        doc = {"source": SOURCE, "torch": torch.__version__, "predicted_gib": predicted,
               "measured_gib": {r.name: r.measured_gib for r in ROWS},
               "bench_predicted_gib": bench_predictions(Results(), predicted)}  # fmt: skip
        TABLE.write_text(json.dumps(doc, indent=2) + "\n")
    else:
        predicted = stored()["predicted_gib"]
    print(table(predicted))
    print(f"\nmeasured: {SOURCE}")
    bad = off_rows(predicted)
    if bad:
        print(f"off by more than {TOLERANCE:.0%}: {', '.join(bad)}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
