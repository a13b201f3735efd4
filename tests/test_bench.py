"""bench/gpu.py without a GPU: its smoke mode runs the same code paths on the tiny Kolors on the CPU.

The full-size run happens only on a lent GPU (bench/run_on_gpu.sh), once, with minutes of budget: a typo
found there costs the whole lease. So every measurement function the GPU run calls on our code path is run
here, and the summary/goal arithmetic is checked on known numbers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import gpu, reference, summary  # noqa: E402

CPU_OK = [
    "device_matmul",
    "ours_train_bf16_cl_fused",
    "ours_train_bf16",
    "ours_train_bf16_ckpt",
    "cfg_bf16_eager",
    "cfg_bf16_fused_cl",
    "cfg_fp16_eager",
    "vae_decode_bf16",
    "vae_decode_bf16_tiled",
    "ours_train_batch",
    "job_write_model",
    "job_train",
    "job_story",
]
"""Everything that can run on a CPU must run in the smoke: these are the paths the GPU run depends on."""


def _run(tmp_path: Path, *args: str, timeout: int = 600) -> tuple[dict, subprocess.CompletedProcess[str]]:
    out = tmp_path / "r.json"
    env = {k: v for k, v in os.environ.items() if k != "OUT"}  # $OUT would get a second copy
    proc = subprocess.run(
        [sys.executable, "-m", "bench.gpu", "--smoke", "--out", str(out), "--work-dir", str(tmp_path / "work"), *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text()), proc


def test_smoke_runs_every_cpu_path_and_writes_the_expected_json(tmp_path: Path) -> None:
    doc, proc = _run(tmp_path)
    assert set(doc) >= {"meta", "results", "goals", "estimates", "table_md"}
    meta = doc["meta"]
    assert meta["mode"] == "smoke" and meta["tiny"] is True and meta["device"] == "cpu"
    assert meta["command"].startswith("python -m bench.gpu --smoke")
    assert {"torch", "diffusers", "transformers", "peft", "accelerate", "diffsynth"} <= set(meta["versions"])
    for key in ("date", "device_name", "python", "flops", "settings", "goals", "reference_anchors", "total_s"):
        assert key in meta, key

    results = doc["results"]
    assert list(results) == [t.name for t in gpu.tasks(gpu.parse_args(["--smoke"]))], "every task is recorded, in order"
    broken = {n: results[n] for n in CPU_OK if results[n]["status"] != "ok"}
    assert not broken, broken
    for name, r in results.items():
        assert r["status"] in ("ok", "skipped"), (name, r)
        if r["status"] == "skipped":
            assert r["reason"], name
    for name in ("ref_train_ckpt", "ref_cfg_fp16", "cfg_bf16_fused_cl_compile", "job_story_compile"):
        assert results[name]["status"] == "skipped", name

    for name in CPU_OK:
        r = results[name]
        assert ("ms" in r) or ("s" in r), (name, r)
        if "ms" in r:
            assert r["ms"] > 0 and r["iters"] >= 1 and r["warmup_s"], name
    assert results["ours_train_bf16_ckpt"]["config"]["grad_ckpt"] is True
    assert results["ours_train_bf16_cl_fused"]["loss_finite"] is True
    assert results["ours_train_batch"]["batch"] == 2
    train = results["job_train"]
    assert train["steps"] == 2 and train["step_ms"] > 0 and train["images"] == 2
    story = results["job_story"]
    assert story["frames"] == 8 and story["steps"] == 2 and story["render_s"] > 0
    for r in (train, story):  # what one rank holds privately vs with the mapped weight files
        assert 0 < r["host_private_peak_gib"] <= r["host_resident_peak_gib"], r

    goal_names = [g["goal"] for g in doc["goals"]]
    assert any(g.startswith("CFG step") for g in goal_names) and any(g.startswith("story") for g in goal_names)
    md = (tmp_path / "r.md").read_text()
    assert md == doc["table_md"] and "| measurement | time |" in md and "| goal | target |" in md
    assert "| goal | target |" in proc.stdout  # the table is printed last (the device reply shows the tail)


def test_summary_ratios_floors_and_goals_on_known_numbers() -> None:
    ok = {"status": "ok"}
    doc = {
        "meta": {"tiny": False, "peak_tflops_assumed": 800.0, "device_name": "NVIDIA H100 80GB HBM3"},
        "results": {
            "ref_train_ckpt": {**ok, "kind": "train", "batch": 1, "ms": 1200.0, "peak_gib": 6.2},
            "ref_train_no_ckpt": {**ok, "kind": "train", "batch": 1, "ms": 400.0, "peak_gib": 12.7},
            "ours_train_bf16_cl_fused": {**ok, "kind": "train", "batch": 1, "ms": 250.0, "peak_gib": 12.0},
            "ours_train_batch": {**ok, "kind": "train", "batch": 4, "ms": 800.0, "peak_gib": 40.0},
            "ref_cfg_fp16_lora": {**ok, "kind": "cfg", "batch": 2, "ms": 70.0},
            "cfg_bf16_fused_cl": {**ok, "kind": "cfg", "batch": 2, "ms": 28.0},
            "job_train": {**ok, "kind": "job", "s": 40.0, "steps": 20, "images": 8, "step_ms": 200.0},
            "job_story": {**ok, "kind": "job", "s": 25.0},
            "job_story_compile": {"status": "skipped", "reason": "budget"},
        },
    }
    summary.summarize(doc)
    r = doc["results"]
    assert r["ours_train_bf16_cl_fused"]["speedup_vs_ref_as_run"] == pytest.approx(4.8)
    assert r["ours_train_bf16_cl_fused"]["speedup_vs_ref_no_ckpt"] == pytest.approx(1.6)
    assert r["ours_train_batch"]["speedup_vs_ref_as_run"] == pytest.approx(6.0)  # per sample: 200 ms
    assert r["cfg_bf16_fused_cl"]["speedup_vs_ref"] == pytest.approx(2.5)
    assert r["cfg_bf16_fused_cl"]["floor_ms"] == pytest.approx(17.4, abs=0.1)  # 13.93 TFLOP / 800 TFLOP/s
    assert r["ours_train_bf16_cl_fused"]["tflops"] == pytest.approx(58.2)
    goals = {g["goal"]: g for g in doc["goals"]}
    best = next(g for k, g in goals.items() if k.startswith("train ≥ 6×") and "best" in k)
    assert best["met"] is False and best["from"] == "ours_train_bf16_cl_fused"  # the b4 run is over 20 GiB
    cfg = next(g for k, g in goals.items() if k.startswith("CFG step"))
    assert cfg["met"] is True and cfg["value"] == 28.0
    assert doc["estimates"]["our_job_s"] == pytest.approx(40 + 480 * 0.2 + 25)
    assert doc["estimates"]["reference_job_unet_s"] == pytest.approx(500 * 1.2 + 400 * 0.07)
    assert "| job_story_compile | skipped |" in doc["table_md"]


def test_diffsynth_unet_class_loads_without_importing_diffsynth() -> None:
    """The reference UNet must load on the device image, where ``import diffsynth`` fails (transformers 5)."""
    from kolors_job.models.tiny import chatglm_tokenizer_dir

    before = "diffsynth" in sys.modules
    cls = reference.load_diffsynth_sdxl_unet()
    assert cls.__name__ == "SDXLUNet"
    assert ("diffsynth" in sys.modules) == before
    assert (chatglm_tokenizer_dir() / "tokenizer.model").is_file()


@pytest.mark.slow
def test_reference_lora_injection_matches_ours_on_meta(tmp_path: Path) -> None:
    doc, _ = _run(tmp_path, "--with-reference", "--only", "ref_lora_injection")
    r = doc["results"]["ref_lora_injection"]
    assert r["status"] == "ok", r
    assert r["reference_lora_tensors"] == r["our_lora_tensors"] == 1120 and r["shapes_match"]


def test_device_scripts_parse() -> None:
    for script in ("bench/run_on_gpu.sh", "bench/fetch_wheels.sh"):
        subprocess.run(["bash", "-n", script], cwd=ROOT, check=True)
    lock = (ROOT / "requirements.lock").read_text().lower().replace("_", "-")
    text = (ROOT / "bench/fetch_wheels.sh").read_text()
    carry = text.split("carry=(", 1)[1].split(")", 1)[0].split()
    assert "transformers" in carry and "diffsynth" in carry
    for name in carry:
        assert f"\n{name.lower().replace('_', '-')}==" in lock, f"{name} is not pinned in requirements.lock"
