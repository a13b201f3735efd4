"""The numbers ``bench.gpu`` runs with and measures against: FLOP counts of the full-size model, the devices'
dense bf16 rates, the issue's goals, the reference's anchors from docs/design.md, the measurements' sizes."""

from __future__ import annotations

GIB = float(1 << 30)


CFG_TFLOP = 13.93
"""One CFG denoising step at 1024² (UNet forward, batch 2, 256 tokens), counted on the meta device."""


TRAIN_TFLOP_PER_SAMPLE = 14.55
"""One LoRA training sample at 1024² (forward 7.01 + backward 7.54), counted on the meta device; grad-ckpt
recomputes the forward on top (≈21.6 executed), which this floor does not count."""


PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H200", 790.0),  # measured on this workplace's H200 (KINDS.md): 769-798 on an 8192³ bf16 matmul
    ("H100", 800.0),  # measured here: 798 on an 8192³ bf16 matmul (dense; datasheet 989)
    ("H800", 800.0),
    ("H20", 148.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("A10", 125.0),
    ("L4", 121.0),
)
"""Dense bf16 matmul rate by device-name substring (first match wins: A100 before A10)."""


GOALS = {
    "train_vs_ref_as_run": 6.0,
    "train_vs_ref_no_ckpt": 2.0,
    "cfg_step_ms": 30.0,
    "story_s": 30.0,
    "job_s": 150.0,
    "peak_gib": 20.0,
}
"""The issue's targets: training ≥ 6× the reference as it runs and ≥ 2× it without grad-ckpt (per sample),
≤ 30 ms per CFG step, story ≤ 30 s including compile, the whole reference job (500 steps + 8 frames × 50 steps)
≤ 2.5 min, peak GPU memory ≤ 20 GiB."""


REFERENCE_ANCHORS = {
    "ref_train_ckpt": "1223 ms, 6.2 GiB",
    "ref_train_no_ckpt": "417 ms, 12.7 GiB",
    "ours_train_bf16": "629 ms, 12.7 GiB (556 ms with cudnn.benchmark)",
    "ours_train_bf16_ckpt": "1368 ms, 5.9 GiB",
    "ref_cfg_fp16": "60 ms",
    "cfg_bf16_eager": "116 ms",
    "cfg_fp16_eager": "122 ms",
    "cfg_bf16_fused_cl": "65 ms",
    "cfg_bf16_fused_cl_compile": "36 ms after a 127 s compile",
    "vae_decode_fp16": "92 ms",
}
"""docs/design.md §2 (2026-11-24, one H100, torch 2.11, a throwaway script): shown beside ours, never as ours."""


BENCH_VERSION = 1


TRAIN_STEPS_FULL = 500


TRAIN_STEPS_QUICK = 20


STORY_STEPS = 50


STORY_FRAMES_PER_BATCH = 8


MIN_FREE_DISK_BYTES = 40e9


REF_TARGETS = ["to_q", "to_k", "to_v", "to_out"]


CAPTION = "二次元"
