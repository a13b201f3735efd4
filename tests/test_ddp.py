"""DDP for real: ``torchrun --standalone --nproc_per_node=2`` (gloo, CPU) runs ``python -m kolors_job.train``.

Checks: both ranks end with the same LoRA (digest of the tensors each rank holds), rank 0 alone wrote
the outputs (rank 1's own work dir holds only accelerate's per-process RNG file), and 2 processes x
batch 1 equal 1 process x batch 2 (the same samples and noise by construction) to float tolerance.

Not bitwise: DDP averages two per-sample gradients after the backward (all-reduce, then / 2) while
one process differentiates the mean over a batch of 2, so the sums associate differently (~1e-7
relative); Adam's g/√v then amplifies last-bit differences of near-zero gradients, so after 4 steps at
lr 1e-2 the LoRA tensors agree to ~1e-4 absolute (bound: 2e-3, a fifth of one step's size).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kolors_job.manifest import TrainSpec
from kolors_job.tiny import build_tiny_kolors
from kolors_job.train import LORA_WEIGHT_NAME, train_lora

ROOT = Path(__file__).resolve().parents[1]
SPEC = TrainSpec(
    rank=4,
    alpha=2.0,
    learning_rate=1e-2,
    steps=4,
    batch_size=1,
    resolution=64,
    checkpoint_every=2,
    seed=3,
    random_flip=True,
)


def test_two_ranks_match_each_other_and_one_process(shared_cache: Path, tmp_path: Path) -> None:
    import numpy as np
    from PIL import Image
    from safetensors.torch import load_file

    from kolors_job.dataset import ImageItem

    model = build_tiny_kolors(shared_cache / "tiny-kolors", seed=0)
    rng = np.random.default_rng(2)
    rows = []
    for i, (w, h) in enumerate([(64, 80), (80, 64), (64, 64)]):
        path = tmp_path / f"{i}.png"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
        rows.append({"path": str(path), "caption": f"二次元 {i}", "width": w, "height": h})
    (tmp_path / "items.json").write_text(json.dumps(rows))
    (tmp_path / "spec.json").write_text(SPEC.model_dump_json())

    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "kolors_job.train",
        "--model-dir",
        str(model),
        "--items-json",
        str(tmp_path / "items.json"),
        "--spec-json",
        str(tmp_path / "spec.json"),
        "--work-dir",
        str(tmp_path / "work{rank}"),
        "--device",
        "cpu",
        "--result-json",
        str(tmp_path / "result{rank}.json"),
        "--no-progress",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    # Started first: the one-process reference trains here while the ranks import torch.
    log = (tmp_path / "torchrun.log").open("w")  # a file, not a pipe: a full pipe would block the ranks
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        single = train_lora(
            model,
            [ImageItem(Path(r["path"]), r["caption"], r["width"], r["height"]) for r in rows],
            SPEC.model_copy(update={"batch_size": 2}),
            work_dir=tmp_path / "single",
            device="cpu",
            progress=False,
        )
        proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
    assert proc.returncode == 0, (tmp_path / "torchrun.log").read_text()[-4000:]

    r0, r1 = (json.loads((tmp_path / f"result{r}.json").read_text()) for r in (0, 1))
    assert r0["steps"] == r1["steps"] == 4 and r0["samples_seen"] == 4 * 2
    assert r0["lora_sha256"] == r1["lora_sha256"]  # identical weights on both ranks
    assert r0["losses"] == r1["losses"]  # the logged loss is the mean over ranks
    lora0 = tmp_path / "work0" / "lora"
    assert (lora0 / LORA_WEIGHT_NAME).is_file()
    assert {p.name for p in (tmp_path / "work0" / "checkpoints").iterdir()} == {"step-2", "step-4"}
    written_by_1 = sorted(p.name for p in (tmp_path / "work1").rglob("*") if p.is_file())
    assert written_by_1 == ["random_states_1.pkl", "random_states_1.pkl"]  # one per checkpoint, nothing else

    assert single.samples_seen == 8
    assert single.losses == pytest.approx(r0["losses"], rel=1e-5)
    ddp, one = load_file(str(lora0 / LORA_WEIGHT_NAME)), load_file(str(single.lora_dir / LORA_WEIGHT_NAME))
    assert ddp.keys() == one.keys()
    worst = max(float((ddp[k] - one[k]).abs().max()) for k in ddp)
    assert worst < 2e-3, worst
    moved = max(float(one[k].abs().max()) for k in one if ".lora.up." in k)
    assert moved > 10 * worst  # the tolerance is far below what training moved
