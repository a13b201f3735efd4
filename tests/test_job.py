"""The whole job on the tiny model: output contract, quality gate, hostile dataset, idempotence."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from PIL import Image
from pydantic import BaseModel

from kolors_job.core.errors import ExitCode
from kolors_job.core.settings import Settings
from kolors_job.demo import build_demo_dataset, tiny_job
from kolors_job.job.context import Job
from kolors_job.manifest.recipe import SWITCHES, describe
from kolors_job.manifest.spec import Manifest
from kolors_job.models.schedulers import reference_timesteps
from kolors_job.report.html import tile_frames
from kolors_job.report.model import Report
from kolors_job.runner import STAGES, JobOutcome, run_job
from tests.cli_lines import json_records

CONTRACT = [
    "manifest.resolved.yaml",
    "status.json",
    "lora/pytorch_lora_weights.safetensors",
    "lora/README.md",
    *[f"images/{i:02d}.png" for i in range(1, 9)],
    "prompts.json",
    "story.jpg",
    "report.json",
    "report.html",
    "submission/README.md",
    "_SUCCESS",
]


TINY = {"dataset.caption": {"fixed": None}, "train.steps": 4, "train.batch_size": 2, "train.checkpoint_every": 2,
        "train.learning_rate": 1e-3, "story.steps": 3}


def tiny_manifest(data: Path, output: str, **overrides: Any) -> Manifest:
    return Manifest.model_validate(tiny_job(data, output, {**TINY, **overrides}))


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_demo_dataset(tmp_path_factory.mktemp("data") / "ds", n=6)


def run(manifest: Manifest, settings: Settings, **kwargs: Any) -> JobOutcome:
    return run_job(Job(manifest, settings=settings, **kwargs))


def undeclared(model: BaseModel, path: str = "") -> list[str]:
    """Keys a report section holds that its model does not declare (kept, but outside the definition)."""
    found = [path + key for key in model.model_extra or {}]
    for name in model.model_fields_set:
        value = getattr(model, name)
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, BaseModel):
                found += undeclared(item, f"{path}{name}.")
    return found


def test_job_to_s3_leaves_the_output_contract(tiny_s3_jobs: Any, s3_backend: Any, storage_env: Settings,
                                              job_env: Path, shared_cache: Path) -> None:
    """The shared tiny job (``tiny_s3_job``, tests/scenarios.py: ``python -m kolors_job run`` into this S3 server)
    left the output contract; a rerun on its prefix is a no-op and another manifest there is refused."""
    from kolors_job.storage import open_store

    job = tiny_s3_jobs(s3_backend)
    assert job.returncode == ExitCode.OK, job.log.decode(errors="replace")[-3000:]
    objects = job.objects  # the prefix as the run left it
    keys = set(objects)
    assert set(CONTRACT) <= keys, sorted(set(CONTRACT) - keys)
    status = json.loads(objects["status.json"])
    assert status["state"] == "succeeded" and status["exit_code"] == 0
    assert list(status["stages"]) == [s.name for s in STAGES]  # every stage of the table ran, in its order
    report = json.loads(objects["report.json"])
    assert report["model"]["random_weights"] is True
    assert len(report["score"]["per_image"]) == 8
    assert report["score"]["mean"] == pytest.approx(sum(report["score"]["per_image"]) / 8)
    assert len(report["train"]["losses"]) == 4
    assert report["submission"]["problems"] == []
    # a job process moved what it imported out of the collector's sight before its first stage, the collector off
    # while they imported and on again for the job (cli._imports_frozen)
    frozen = [r for r in json_records(job.log.splitlines()) if r.get("msg") == "imports frozen"]
    assert len(frozen) == 1 and frozen[0]["frozen_objects"] > 100_000 and frozen[0]["collector_on"] is True, frozen
    # report_model.Report is report.json's one definition: every key declared, and it reads back unchanged
    parsed = Report.model_validate(report)
    assert undeclared(parsed) == [] and parsed.to_json_dict() == report
    assert json.dumps(parsed.to_json_dict(), ensure_ascii=False, indent=2) + "\n" == objects["report.json"].decode()
    resolved = yaml.safe_load(objects["manifest.resolved.yaml"])
    assert resolved["spec"]["train"]["rank"] == 16
    story = Image.open(io.BytesIO(objects["story.jpg"]))
    assert story.size == (1024, 2048)  # the reference: 4 rows of 2 frames, resized to 1024x2048
    # the default recipe, recorded with every switch in report.json and prompts.json; story.jpg tiled as the
    # notebook tiles (tests/test_reference_oracle.py checks that tiling against the notebook's cell)
    manifest = Manifest.model_validate(job.doc)
    prompts = json.loads(objects["prompts.json"])
    assert report["recipe"] == prompts["recipe"] == describe(manifest.spec)
    assert report["recipe"]["name"] == "reference" and report["recipe"]["switches"]["train.jpeg_reencode"] == 2
    frames = [Image.open(io.BytesIO(objects[f"images/{i:02d}.png"])).convert("RGB") for i in range(1, 9)]
    buf = io.BytesIO()
    tile_frames(frames, "notebook").save(buf, format="JPEG", quality=92)
    assert objects["story.jpg"] == buf.getvalue()

    # idempotent: a second run sees _SUCCESS and recomputes (and rewrites) nothing
    settings = storage_env.model_copy(update={"cache_dir": shared_cache, "work_dir": job_env / "work"})
    store = open_store(job.output + f"{job.name}/", settings)
    before = {k: store.read_bytes(k) for k in ("report.json", "status.json", "manifest.resolved.yaml")}
    assert before == {k: objects[k] for k in before}
    again = run(manifest, settings)
    assert again.exit_code == ExitCode.OK and again.state == "skipped"
    # another manifest under the same job id is refused, nothing overwritten
    other = run(Manifest.model_validate(job.manifest_doc(overrides={"train.rank": 4})), settings)
    assert other.exit_code == ExitCode.OUTPUT_CONFLICT
    assert "different manifest" in other.message
    assert {k: store.read_bytes(k) for k in before} == before


def test_quality_gate_flips_the_result(job_env: Path, demo_data: Path, shared_cache: Path) -> None:
    """Also the whole job with ``recipe: tuned`` (Lanczos, posterior samples, crop time ids, a shuffle per
    epoch, EXIF turned, original bytes, the model's own VAE, Lanczos tiling)."""
    settings = Settings(cache_dir=shared_cache, work_dir=job_env / "work")
    out = job_env / "out"
    tuned = {"recipe": "tuned", "model.train_vae": None}
    ok = run(tiny_manifest(demo_data, str(out), **tuned), settings, job_id="gate-low")
    assert ok.exit_code == ExitCode.OK
    recipe = json.loads((out / "gate-low" / "report.json").read_text())["recipe"]
    assert recipe["name"] == "tuned" and recipe["overridden"] == []
    assert recipe["switches"] == {p: v[1] for p, v in SWITCHES.items()}
    frames = [Image.open(out / "gate-low" / "images" / f"{i:02d}.png").convert("RGB") for i in range(1, 9)]
    buf = io.BytesIO()
    tile_frames(frames, "lanczos").save(buf, format="JPEG", quality=92)
    assert (out / "gate-low" / "story.jpg").read_bytes() == buf.getvalue()
    # the sampler actually used, in prompts.json and report.json: the reference grid (oracle-tested against
    # DiffSynth in test_reference_oracle.py), ending clean, fp32 on the CPU with the LoRA unfused
    sampler = json.loads((out / "gate-low" / "prompts.json").read_text())["sampler"]
    assert sampler["name"] == sampler["scheduler"] == "reference"
    assert sampler["timesteps"] == reference_timesteps(3, 1100) and sampler["final_sigma"] == 0
    assert (sampler["precision"], sampler["lora_fused"], sampler["lora_fusion_dtype"]) == ("fp32", False, None)
    recorded = json.loads((out / "gate-low" / "report.json").read_text())["story"]["sampler"]
    assert recorded == {k: v for k, v in sampler.items() if k in recorded} and len(recorded) == 7
    mean = json.loads((out / "gate-low" / "report.json").read_text())["score"]["mean"]
    high = tiny_manifest(demo_data, str(out), **tuned, **{"score.threshold": min(10.0, mean + 0.5)})
    failed = run(high, settings, job_id="gate-high")
    assert failed.exit_code == ExitCode.QUALITY_GATE
    assert "below the threshold" in failed.message
    job_dir = out / "gate-high"
    assert not (job_dir / "_SUCCESS").exists()
    report = json.loads((job_dir / "report.json").read_text())
    assert report["score"]["passed"] is False and report["score"]["mean"] == pytest.approx(mean)
    assert json.loads((job_dir / "status.json").read_text())["exit_code"] == ExitCode.QUALITY_GATE


def _hostile_dataset(root: Path) -> Path:
    build_demo_dataset(root, n=4)
    buf = io.BytesIO()
    Image.new("CMYK", (96, 96), (10, 200, 30, 0)).save(buf, "JPEG")
    (root / "cmyk.jpg").write_bytes(buf.getvalue())
    (root / "cmyk.txt").write_text("二次元", encoding="utf-8")
    Image.fromarray((torch.full((96, 96), 30000, dtype=torch.int32)).numpy().astype("uint16")).save(root / "deep.png")
    (root / "deep.txt").write_text("二次元", encoding="utf-8")
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (128, 96), (0, 0, 255)).save(root / "rotated.jpg", exif=exif)
    (root / "rotated.txt").write_text("二次元", encoding="utf-8")
    Image.new("RGB", (300, 300)).resize((30, 30)).save(root / "small.png")  # 30x30 < min 64
    return root


def test_hostile_dataset_trains_and_counts_every_skip(job_env: Path, shared_cache: Path) -> None:
    data = _hostile_dataset(job_env / "hostile")
    settings = Settings(cache_dir=shared_cache, work_dir=job_env / "work")
    outcome = run(tiny_manifest(data, str(job_env / "out")), settings)
    assert outcome.exit_code == ExitCode.OK, outcome.message
    ds = json.loads((job_env / "out" / "tiny-job" / "report.json").read_text())["dataset"]
    assert ds["kept"] == 4 + 3  # the demo images + CMYK + 16-bit + EXIF-rotated
    assert ds["skipped"] == {"corrupt": 1, "not_image": 1, "too_small": 2, "zero_byte": 1}


def test_empty_dataset_is_an_input_error(job_env: Path, shared_cache: Path) -> None:
    (job_env / "empty").mkdir()
    Image.new("RGB", (8, 8)).save(job_env / "empty" / "tiny.png")
    settings = Settings(cache_dir=shared_cache, work_dir=job_env / "work")
    outcome = run(tiny_manifest(job_env / "empty", str(job_env / "out")), settings)
    assert outcome.exit_code == ExitCode.INVALID_INPUT
    assert "no image survived the filters" in outcome.message and "too_small" in outcome.message
    status = json.loads((job_env / "out" / "tiny-job" / "status.json").read_text())
    assert status["state"] == "failed" and status["stage"] == "dataset"
    assert not (job_env / "out" / "tiny-job" / "_SUCCESS").exists()


def test_cli_run_prints_one_line_errors(job_env: Path, tmp_path: Path) -> None:
    bad = tmp_path / "m.yaml"
    # a private output dir: a shared one may hold another run (another manifest: exit 6 before the model check)
    bad.write_text(f"spec: {{output: {{uri: {tmp_path / 'out'}}}, model: {{base: /does/not/exist}}}}")
    env = {**os.environ, "KOLORS_JOB_ALLOW_CPU": "1"}  # the missing model, not the missing GPU, is under test
    res = subprocess.run([sys.executable, "-m", "kolors_job", "run", "--manifest", str(bad)],
                         capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == ExitCode.INVALID_INPUT, res.stderr
    records = [json.loads(line) for line in res.stderr.strip().splitlines()]  # JSON logs (job_env): every line
    last = records[-1]
    assert last["msg"].startswith("error: ") and "/does/not/exist" in last["msg"] and last["exit_code"] == 4
    assert "Traceback" not in res.stderr


def test_full_size_job_without_a_gpu_is_refused_at_once(
    job_env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``docker run IMAGE`` without ``--gpus``: one line and exit 4 before the model is read, not days on the CPU.

    The model is the tiny Kolors with its UNet weight file grown (sparsely) past a gigabyte: full-size
    is judged by the UNet's bytes, as it is from a hub listing before any download."""
    import logging
    import shutil

    from kolors_job.cli import main
    from kolors_job.core.settings import Settings
    from kolors_job.models.tiny import build_tiny_kolors
    from kolors_job.models.weights import FULL_SIZE_UNET_BYTES

    tiny = build_tiny_kolors(Settings().cache_dir / "tiny" / "kolors-refuse-test", seed=0)
    big = tmp_path / "big-kolors"
    shutil.copytree(tiny, big)
    (weights,) = (big / "unet").glob("*.safetensors")
    os.truncate(weights, FULL_SIZE_UNET_BYTES)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("KOLORS_JOB_ALLOW_CPU", raising=False)
    monkeypatch.setenv("KOLORS_JOB_LOG_FORMAT", "text")
    m = tmp_path / "m.yaml"
    m.write_text(f"spec: {{output: {{uri: '{tmp_path}/out'}}, model: {{base: '{big}'}}}}")
    try:
        assert main(["run", "--manifest", str(m)]) == ExitCode.INVALID_INPUT
    finally:
        for h in [h for h in logging.getLogger().handlers if getattr(h, "_kolors_job", False)]:
            logging.getLogger().removeHandler(h)
    (line,) = capsys.readouterr().err.strip().splitlines()[-1:]
    assert line.startswith(f"error: model '{big}' is a full-size Kolors and "), line
    assert "KOLORS_JOB_ALLOW_CPU=1" in line and "docker --gpus" in line
    # stopped before the output was touched: nothing written, no claim taken
    assert not (tmp_path / "out").exists()


def test_no_gpu_is_found_before_any_network_call(tmp_path: Path) -> None:
    """A CPU node without network: exit 4 "no GPU" in its first seconds, not exit 75 after minutes of hub and
    storage retries. The hub and the output bucket are one loopback listener that counts connections: none."""
    import socket
    import threading
    import time

    listener = socket.create_server(("127.0.0.1", 0))
    connections: list[object] = []

    def accept() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            connections.append(conn)

    threading.Thread(target=accept, daemon=True).start()
    url = f"http://127.0.0.1:{listener.getsockname()[1]}"
    m = tmp_path / "m.yaml"
    m.write_text("spec: {output: {uri: 's3://kolors-out/runs/'}}")  # every source at its hub default
    env = {k: v for k, v in os.environ.items() if k != "KOLORS_JOB_ALLOW_CPU"}
    env.update(MODELSCOPE_ENDPOINT=url, KOLORS_JOB_S3_ENDPOINT_URL=url, CUDA_VISIBLE_DEVICES="",
               KOLORS_JOB_LOG_FORMAT="json", AWS_ACCESS_KEY_ID="x", AWS_SECRET_ACCESS_KEY="y")  # fmt: skip
    started = time.monotonic()
    try:
        res = subprocess.run([sys.executable, "-m", "kolors_job", "run", "--manifest", str(m)],
                             capture_output=True, text=True, timeout=300, env=env)  # fmt: skip
    finally:
        listener.close()
    assert res.returncode == ExitCode.INVALID_INPUT, res.stderr[-3000:]
    last = json.loads(res.stderr.strip().splitlines()[-1])
    assert last["exit_code"] == 4 and last["msg"].startswith(
        "error: model 'modelscope://Kwai-Kolors/Kolors-diffusers' is a hub or bucket model"), last
    assert connections == [], "the hub or the bucket was contacted before the device check"
    assert time.monotonic() - started < 60


def test_compile_caches_default_to_the_cache_volume(job_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """torch.compile's inductor/triton caches go under KOLORS_JOB_CACHE_DIR unless already set."""
    import argparse
    import os

    from kolors_job.cli import _settings_and_logging

    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.setenv("TRITON_CACHE_DIR", "/elsewhere/triton")
    settings = _settings_and_logging(argparse.Namespace(log_format="json"))
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(settings.cache_dir / "torchinductor")
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"].startswith(os.environ["KOLORS_JOB_CACHE_DIR"])
    assert os.environ["TRITON_CACHE_DIR"] == "/elsewhere/triton"  # an explicit setting wins


def _write_test_peft(src: Any, out_dir: Path) -> dict[str, Path]:
    """A test-only format: plain peft keys (``<module>.lora_A/B.weight``) with α/r baked into B."""
    from kolors_job.export.lora_io import file_metadata, resolve_info, save_lora, scaled

    info, modules, scale = resolve_info(src.info, src.state_dict, src.metadata)
    tensors = {}
    for module, (a, b) in modules.items():
        tensors[f"{module}.lora_A.weight"] = scaled(a, 1.0)
        tensors[f"{module}.lora_B.weight"] = scaled(b, scale)
    path = out_dir / f"{info.slug}_peft.safetensors"
    return {"test-peft": save_lora(tensors, path, file_metadata(info, "test-peft", alpha_baked="true"))}


def test_an_added_lora_format_is_accepted_by_the_manifest_and_written_by_a_job(
    job_env: Path, demo_data: Path, shared_cache: Path
) -> None:
    """docs/adding-a-lora-format.md, followed once: one registration, and the manifest, the runner, report.json
    and the model card all know the format; unregistered, the manifest refuses it again."""
    from pydantic import ValidationError

    from kolors_job.export import ExportFormat, load_lora_file, lora_modules, register, unregister
    from kolors_job.manifest.load import json_schema

    overrides = {"output.lora_formats": ["diffusers", "test-peft"]}
    out = job_env / "out"
    with pytest.raises(ValidationError, match="test-peft"):
        tiny_manifest(demo_data, str(out), **overrides)
    register(ExportFormat(
        name="test-peft", title="peft (test)", write=_write_test_peft, default=False,
        file_names=lambda info: {"test-peft": f"{info.slug}_peft.safetensors"},
        card_rows=lambda info, load_alpha: {"test-peft": ("peft `set_peft_model_state_dict`", "α/r baked into B")},
    ))
    try:
        enum = json_schema()["$defs"]["OutputSpec"]["properties"]["lora_formats"]["items"]["enum"]
        assert enum == ["diffusers", "kohya", "diffsynth", "test-peft"]
        manifest = tiny_manifest(demo_data, str(out), **overrides)
        assert Manifest.model_validate(tiny_job(demo_data, str(out))).spec.output.lora_formats == [
            "diffusers", "kohya", "diffsynth"]  # not a default format: the default list is unchanged
        outcome = run(manifest, Settings(cache_dir=shared_cache, work_dir=job_env / "work"), job_id="added-format")
    finally:
        unregister("test-peft")
    assert outcome.exit_code == ExitCode.OK, outcome.message
    lora = out / "added-format" / "lora"
    assert sorted(p.name for p in lora.iterdir()) == [
        "README.md", "added-format_peft.safetensors", "lora_config.json", "pytorch_lora_weights.safetensors"]
    report = json.loads((out / "added-format" / "report.json").read_text())
    assert report["lora_files"]["test-peft"] == "lora/added-format_peft.safetensors"
    card = (lora / "README.md").read_text(encoding="utf-8")
    assert "| `added-format_peft.safetensors` | peft `set_peft_model_state_dict` | α/r baked into B |" in card
    # the same trained update as the diffusers export (both baked), read back through the export's own reader
    ours, _ = lora_modules(load_lora_file(lora / "added-format_peft.safetensors")[0])
    theirs, _ = lora_modules(load_lora_file(lora)[0])
    assert ours.keys() == theirs.keys() and len(ours) > 0
    assert all(torch.equal(ours[m][0], theirs[m][0]) and torch.equal(ours[m][1], theirs[m][1]) for m in ours)
    with pytest.raises(ValidationError, match="test-peft"):
        tiny_manifest(demo_data, str(out), **overrides)
