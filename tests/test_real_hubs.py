"""The default job, every source left at its hub default, through the real clients and the hub emulators.

The manifest is what a new user writes: ``output.uri`` plus small CPU sizes. Kolors-diffusers is served
fp16-only with a 3-shard ChatGLM (its real layout, ``tests/hub_servers/artifacts.py``), the predictor as
``pytorch_model.bin``, lowres_anime as parquet shards. The emulators count the bytes they send, so these
tests prove the job downloads exactly the files its loaders read, and nothing twice.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from kolors_job.core.errors import ExitCode
from tests.cli_lines import last_message
from tests.hub_servers import hf_hub as hf_ids
from tests.hub_servers import modelscope_hub as ms_ids
from tests.hub_servers.artifacts import VAE_FP16_FIX_FILES, fp16_loader_files

ROOT = Path(__file__).resolve().parents[1]

SMALL: dict[str, Any] = {
    "train": {"steps": 2, "resolution": 64},
    "story": {"width": 64, "height": 64, "steps": 2},
    "score": {"threshold": 0.0},
}
"""Only sizes: every source stays at the manifest's default."""


def _run_job(tmp_path: Path, spec: dict[str, Any], *, cache: Path, extra_env: dict[str, str] | None = None):
    manifest = tmp_path / "job.yaml"
    manifest.write_text(yaml.safe_dump({"spec": spec}))
    env = {
        **os.environ,
        "KOLORS_JOB_CACHE_DIR": str(cache),
        "KOLORS_JOB_WORK_DIR": str(tmp_path / "work"),
        "KOLORS_JOB_LOG_FORMAT": "json",
        "PYTHONPATH": str(ROOT),
        **(extra_env or {}),
    }
    return subprocess.run(
        [sys.executable, "-m", "kolors_job", "run", "--manifest", str(manifest)],
        env=env, capture_output=True, text=True, timeout=900, cwd=tmp_path,
    )


def _assert_story(out: Path) -> dict[str, Any]:
    assert (out / "_SUCCESS").is_file()
    assert sorted(p.name for p in (out / "images").glob("*.png")) == [f"{i:02d}.png" for i in range(1, 9)]
    assert (out / "lora" / "pytorch_lora_weights.safetensors").is_file()
    return json.loads((out / "report.json").read_text())


def test_default_manifest_on_the_modelscope_emulator(modelscope_env, tmp_path: Path) -> None:
    hub = modelscope_env
    cache = tmp_path / "cache"
    res = _run_job(tmp_path, {"output": {"uri": str(tmp_path / "out")}, **SMALL}, cache=cache)
    assert res.returncode == ExitCode.OK, res.stderr[-3000:]
    report = _assert_story(tmp_path / "out" / "kolors-lora-story")

    # Kolors: exactly the fp16 files the loaders read, each once, and report.json says so
    expected = fp16_loader_files(hub.artifacts["kolors"])
    fetched = hub.downloads(ms_ids.KOLORS_ID)
    assert fetched == expected
    sources = {s["uri"]: s for s in report["sources"]}
    base = sources[f"modelscope://{ms_ids.KOLORS_ID}"]
    assert base["bytes_downloaded"] == sum(expected.values()) == base["bytes_total"]
    # the listing gives each file the last commit that touched it (the real shape); the job records the repo's
    # commit, pinned: every file was requested at it
    kolors = hub.repo("model", ms_ids.KOLORS_ID)
    assert len({kolors.file_commit(p)[0] for p in expected}) > 1
    assert (base["commit"], base["pinned"], base.get("file_revisions")) == (kolors.commit, True, None)
    assert base["variants"] == {"unet": "fp16", "vae": "fp16", "text_encoder": "fp16"}
    # the predictor from its pickle, with the processor files and nothing else
    predictor = hub.downloads(ms_ids.PREDICTOR_ID)
    assert "pytorch_model.bin" in predictor and not [p for p in predictor if p.endswith((".md", ".py"))]
    assert sources[f"modelscope://{ms_ids.PREDICTOR_ID}"]["commit"] == hub.repo("model", ms_ids.PREDICTOR_ID).commit
    # the dataset: the train split's shards only, and the default filters keep the three large images
    assert sorted(hub.downloads(ms_ids.ANIME_ID)) == [
        "README.md", "data/train-00000-of-00002.parquet", "data/train-00001-of-00002.parquet",
    ]
    assert report["dataset"]["kept"] == 3
    filters = report["dataset"]["filters"]  # what each filter dropped, plainly: the 512 px image, the 2 odd shapes
    assert {k: (v["setting"], v["dropped"]) for k, v in filters.items()} == {
        "min_size": ("1024x1024", 1), "aspect_ratio": ("0.5-2", 2), "max_pixels": ("64000000", 0),
    }
    assert "dropped by min_size (1024x1024)" in (tmp_path / "out" / "kolors-lora-story" / "report.html").read_text()
    anime = hub.repo("dataset", ms_ids.ANIME_ID)
    dataset_src = sources[f"modelscope://{ms_ids.ANIME_ID}"]
    assert (dataset_src["commit"], dataset_src["pinned"], dataset_src["layout"]) == (anime.commit, True, "parquet")
    assert dataset_src["bytes_downloaded"] == sum(hub.downloads(ms_ids.ANIME_ID).values())
    assert len(report["story"]["frames"]) == 8 and all(0.0 <= f["score"] <= 10.0 for f in report["story"]["frames"])
    # the reference recipe's training VAE: the one file DiffSynth's download_models fetches, + its config
    vae_files = hub.downloads(ms_ids.VAE_FP16_FIX_ID)
    assert sorted(vae_files) == sorted(VAE_FP16_FIX_FILES)
    vae_src = sources[f"modelscope://{ms_ids.VAE_FP16_FIX_ID}"]
    assert vae_src["kind"] == "vae" and vae_src["bytes_downloaded"] == sum(vae_files.values())
    assert report["recipe"]["name"] == "reference" and report["model"]["train_vae"] == vae_src["uri"]

    # a second job on the same cache downloads nothing, and says the bytes were reused
    hub.reset_downloads()
    res = _run_job(tmp_path, {"output": {"uri": str(tmp_path / "out2")}, **SMALL}, cache=cache)
    assert res.returncode == ExitCode.OK, res.stderr[-3000:]
    report = _assert_story(tmp_path / "out2" / "kolors-lora-story")
    assert hub.downloads(ms_ids.KOLORS_ID) == {} and hub.downloads(ms_ids.ANIME_ID) == {}
    base = {s["uri"]: s for s in report["sources"]}[f"modelscope://{ms_ids.KOLORS_ID}"]
    assert (base["bytes_downloaded"], base["bytes_reused"]) == (0, sum(expected.values()))
    dataset_src = {s["uri"]: s for s in report["sources"]}[f"modelscope://{ms_ids.ANIME_ID}"]
    assert dataset_src["bytes_downloaded"] == 0 and dataset_src["bytes_reused"] > 0


def test_a_job_on_a_local_copy_in_the_fp16_only_layout(hub_artifacts, tmp_path: Path) -> None:
    """The issue's reproduction: Kolors-diffusers' fp16-only files in a plain folder as ``model.base``."""
    spec = {
        "output": {"uri": str(tmp_path / "out")},
        "model": {"base": str(hub_artifacts["kolors"]), "train_vae": str(hub_artifacts["vae_fp16_fix"])},
        "score": {**SMALL["score"], "aesthetic_model": str(hub_artifacts["predictor"])},
        "train": SMALL["train"],
        "story": SMALL["story"],
    }
    assert not [p for p in hub_artifacts["kolors"].rglob("diffusion_pytorch_model.safetensors")]
    images = tmp_path / "images"
    images.mkdir()
    from PIL import Image

    for i in range(2):
        Image.new("RGB", (1024, 1024), (40 * i, 90, 160)).save(images / f"{i}.png")
    spec["dataset"] = {"source": str(images)}
    res = _run_job(tmp_path, spec, cache=tmp_path / "cache")
    assert res.returncode == ExitCode.OK, res.stderr[-3000:]
    report = _assert_story(tmp_path / "out" / "kolors-lora-story")
    assert report["sources"][0]["uri"] == str(hub_artifacts["kolors"])


def _hf_spec(tmp_path: Path) -> dict[str, Any]:
    """The small job with every source on the Hugging Face emulator."""
    return {
        "output": {"uri": str(tmp_path / "out")},
        "model": {"base": f"hf://{hf_ids.KOLORS_ID}", "train_vae": f"hf://{hf_ids.VAE_FP16_FIX_ID}"},
        "dataset": {"source": f"hf://{hf_ids.ANIME_ID}"},
        "score": {**SMALL["score"], "aesthetic_model": f"hf://{hf_ids.PREDICTOR_ID}"},
        "train": SMALL["train"],
        "story": SMALL["story"],
    }


def test_default_manifest_with_hf_sources_on_the_hf_emulator(hf_env, tmp_path: Path) -> None:
    hub = hf_env
    spec = _hf_spec(tmp_path)
    res = _run_job(tmp_path, spec, cache=tmp_path / "cache")
    assert res.returncode == ExitCode.OK, res.stderr[-3000:]
    report = _assert_story(tmp_path / "out" / "kolors-lora-story")
    expected = fp16_loader_files(hub.artifacts["kolors"])
    assert hub.downloads(hf_ids.KOLORS_ID) == expected
    base = {s["uri"]: s for s in report["sources"]}[f"hf://{hf_ids.KOLORS_ID}"]
    assert base["bytes_downloaded"] == sum(expected.values())
    assert base["commit"] == hub.repo("model", hf_ids.KOLORS_ID).commit
    assert sorted(hub.downloads(hf_ids.ANIME_ID)) == [
        "README.md", "data/train-00000-of-00002.parquet", "data/train-00001-of-00002.parquet",
    ]
    assert report["dataset"]["kept"] == 3
    assert sorted(hub.downloads(hf_ids.VAE_FP16_FIX_ID)) == sorted(VAE_FP16_FIX_FILES)


def test_the_training_vae_goes_through_the_hub_path_and_its_free_space_check(modelscope_env, tmp_path: Path) -> None:
    """``model.train_vae``'s default is planned, size-checked and downloaded like every other hub source: a
    cache that cannot hold it stops before any byte with the same one line; otherwise exactly the config and
    ``diffusion_pytorch_model.safetensors`` arrive, and load as an fp16-safe VAE (``force_upcast: false``)."""
    from kolors_job.core.errors import InputError
    from kolors_job.core.settings import Settings
    from kolors_job.manifest.spec import ModelSpec
    from kolors_job.models.loading import load_vae, vae_force_upcast
    from kolors_job.sources import fetch_model

    uri = ModelSpec().train_vae
    assert uri == f"modelscope://{ms_ids.VAE_FP16_FIX_ID}"
    full = Settings(cache_dir=tmp_path / "full", cache_reserve_mb=10**9)
    with pytest.raises(InputError, match=rf"^the cache .* needs .*\(vae '{uri}' .*free"):
        fetch_model(uri, kind="vae", settings=full)
    assert modelscope_env.downloads(ms_ids.VAE_FP16_FIX_ID) == {}
    path, record = fetch_model(uri, kind="vae", settings=Settings(cache_dir=tmp_path / "cache"))
    assert sorted(modelscope_env.downloads(ms_ids.VAE_FP16_FIX_ID)) == sorted(VAE_FP16_FIX_FILES)
    assert record.commit == modelscope_env.repo("model", ms_ids.VAE_FP16_FIX_ID).commit
    assert not vae_force_upcast(path)
    import torch

    assert load_vae(path, torch.float16).dtype == torch.float16


def test_the_default_job_from_a_shell_with_the_emulator_script(hub_artifacts, tmp_path: Path) -> None:
    """As a person would: start ``tests/hub_servers/modelscope_hub.py --port N``, set MODELSCOPE_ENDPOINT,
    run ``python -m kolors_job run``: the same job finishes."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    root = next(iter(hub_artifacts.values())).parent
    server = subprocess.Popen(
        [sys.executable, str(ROOT / "tests" / "hub_servers" / "modelscope_hub.py"), "--port", str(port),
         "--root", str(root)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        assert server.stdout is not None
        assert server.stdout.readline().startswith(f"serving http://127.0.0.1:{port}")
        env = {
            "MODELSCOPE_ENDPOINT": f"http://127.0.0.1:{port}",
            "MODELSCOPE_CACHE": str(tmp_path / "ms"),
            "HTTP_PROXY": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9", "NO_PROXY": "127.0.0.1",
        }
        started = time.monotonic()
        res = _run_job(tmp_path, {"output": {"uri": str(tmp_path / "out")}, **SMALL}, cache=tmp_path / "c", extra_env=env)
        assert res.returncode == ExitCode.OK, res.stderr[-3000:]
        _assert_story(tmp_path / "out" / "kolors-lora-story")
        assert time.monotonic() - started < 600
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.fixture
def small_cache(tmp_path: Path) -> Any:
    """A 2 MiB tmpfs as the cache volume (root can mount one here and in CI); else None."""
    import shutil

    mnt = tmp_path / "small-cache"
    mnt.mkdir()
    if os.geteuid() != 0 or not shutil.which("mount"):
        yield None
        return
    ok = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], capture_output=True).returncode == 0
    yield mnt if ok else None
    if ok:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_a_cache_too_small_is_exit_4_and_nothing_is_marked_complete(
    modelscope_env, tmp_path: Path, small_cache: Path | None
) -> None:
    """The listing says how many bytes are coming: a cache that cannot hold them stops before the download.

    On a 2 MiB tmpfs the tiny Kolors (about 4 MB of fp16 files) does not fit; where no tmpfs can be
    mounted, a reserve larger than any disk here stands in for it (same check, same line)."""
    tiny = sum(fp16_loader_files(modelscope_env.artifacts["kolors"]).values())
    if small_cache is not None:
        assert tiny > 2 << 20, "the tiny Kolors must be larger than the tmpfs for this test to mean anything"
        cache, env = small_cache, {"KOLORS_JOB_CACHE_RESERVE_MB": "0"}
    else:
        cache, env = tmp_path / "cache", {"KOLORS_JOB_CACHE_RESERVE_MB": str(10**9)}
    res = _run_job(tmp_path, {"output": {"uri": str(tmp_path / "out")}, **SMALL}, cache=cache, extra_env=env)
    assert res.returncode == ExitCode.INVALID_INPUT, res.stderr[-3000:]
    last = last_message(res.stderr)  # the CLI's last line (a JSON record off a terminal)
    assert last.startswith(f"error: the cache {cache} needs "), last
    for what in (f"pipeline 'modelscope://{ms_ids.KOLORS_ID}'", f"dataset 'modelscope://{ms_ids.ANIME_ID}'"):
        assert what in last, last  # every source, the dataset included, before any download
    assert "free" in last and "KOLORS_JOB_CACHE_DIR" in last
    assert modelscope_env.downloads(ms_ids.KOLORS_ID) == {}
    assert not list(cache.rglob(".kolors_job_source.json"))


@pytest.mark.parametrize("hub_kind", ["modelscope", "hf"])
def test_a_hub_that_stalls_mid_file_is_exit_75_within_the_deadline_and_the_partial_file_resumes(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, hub_kind: str
) -> None:
    """The hub stops sending half-way through the UNet, its connection left open (ModelScope: its CDN). One
    setting bounds it on both hubs: ``KOLORS_JOB_STORAGE_READ_TIMEOUT_S`` (20 s by default; 1 s here) and the
    storage deadline (240 s; 8 s here) → exit 75 with one line naming the source, nothing marked complete,
    the partial file kept. The next attempt resumes it (here at the source level: the rest of the job is
    what ``test_default_manifest_on_the_modelscope_emulator`` runs) and counts only the bytes it received."""
    from kolors_job.core.settings import Settings
    from kolors_job.sources import fetch_model, records

    hub = request.getfixturevalue("modelscope_env" if hub_kind == "modelscope" else "hf_env")
    ids = ms_ids if hub_kind == "modelscope" else hf_ids
    path = "unet/diffusion_pytorch_model.fp16.safetensors"
    size = hub.repo("model", ids.KOLORS_ID).files[path].size
    spec = {"output": {"uri": str(tmp_path / "out")}, **SMALL} if hub_kind == "modelscope" else _hf_spec(tmp_path)
    cache = tmp_path / "cache"
    env = {"KOLORS_JOB_STORAGE_READ_TIMEOUT_S": "1", "KOLORS_JOB_STORAGE_DEADLINE_S": "8"}
    monkeypatch.setattr(hub.cdn, "ttl_s", 3)  # the stalled attempt's signed URL has expired when the rerun comes
    with hub.stalled(path, size // 2):
        started = time.monotonic()
        res = _run_job(tmp_path, spec, cache=cache, extra_env=env)
        took = time.monotonic() - started
    assert res.returncode == ExitCode.TEMPORARY, res.stderr[-3000:]
    last = last_message(res.stderr)  # the CLI's last line (a JSON record off a terminal)
    uri = f"{hub_kind}://{ids.KOLORS_ID}"
    assert last.startswith("error: ") and uri in last and "stopped sending" in last and "resume" in last, last
    print(f"\nstalled {hub_kind}: exit {res.returncode} after {took:.0f} s: {last}")
    assert took < 8 + 60, took  # the deadline plus the job's start-up on a busy 2-core box
    assert not list(cache.rglob(records.RECORD_NAME))
    partial = records.partial_bytes(next(cache.glob("hub/*/Kwai-Kolors/Kolors-diffusers/default")))
    # ModelScope's client writes what arrives (1 MB reads): the partial file holds every byte sent. Hugging
    # Face's writes in 10 MB chunks, so of this 2.6 MB UNet it kept nothing (of a 5 GB one, all but < 10 MB).
    assert partial == (size // 2 if hub_kind == "modelscope" else 0)
    assert not (tmp_path / "out" / "kolors-lora-story" / "_SUCCESS").exists()

    hub.reset_downloads()
    settings = Settings(cache_dir=cache)
    dest, rec = fetch_model(uri, kind="pipeline", settings=settings)
    sent = hub.downloads(ids.KOLORS_ID)
    assert sent[path] == size - partial  # resumed from what the stalled attempt kept
    lfs = [p for _, p in hub.log.requests if p.startswith("/hub-lfs/")]
    assert lfs and all("Signature=" in p for p in lfs)  # through the CDN host, with freshly signed URLs
    assert rec.bytes_downloaded == sum(sent.values()) and rec.bytes_reused == rec.bytes_total - rec.bytes_downloaded
    assert (dest / path).read_bytes() == hub.repo("model", ids.KOLORS_ID).files[path].local.read_bytes()
