"""The hub emulators, driven by the REAL pinned clients (modelscope, huggingface_hub, datasets).

These prove the emulators speak each client's protocol and serve the real layouts: a snapshot of
the fp16 files loads with ``variant="fp16"`` in diffusers/transformers, the predictor loads from its
pickle, the dataset rows are PIL images of the served sizes, and the bytes the emulator records equal
the files fetched.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import requests
from packaging.version import Version

from tests.hub_servers.artifacts import ANIME_IMAGES, KOLORS_FP16_LOADER_FILES, fp16_loader_files
from tests.hub_servers.hf_hub import ANIME_ID as HF_ANIME_ID
from tests.hub_servers.hf_hub import PREDICTOR_ID as HF_PREDICTOR_ID
from tests.hub_servers.modelscope_hub import ANIME_ID, KOLORS_BOTH_ID, KOLORS_ID, PREDICTOR_CUSTOM_ID, PREDICTOR_ID

ROOT = Path(__file__).resolve().parents[1]

PLAIN_WEIGHT = re.compile(r"(diffusion_pytorch_model|model)(-\d{5}-of-\d{5})?\.(safetensors|bin)$")

DATASETS_TOO_NEW = pytest.mark.xfail(
    Version(__import__("datasets").__version__) > Version("4.8.4"),
    reason="modelscope 1.40.2 declares datasets<=4.8.4: its MsDataset.load passes verification_mode to "
    "DatasetBuilder.as_dataset, which datasets 5 removed (TypeError)",
    raises=TypeError,
    strict=True,
)


def _files(folder: Path) -> dict[str, int]:
    return {p.relative_to(folder).as_posix(): p.stat().st_size for p in folder.rglob("*") if p.is_file()}


def _expected_fp16(artifact: Path) -> dict[str, int]:
    return fp16_loader_files(artifact)


def _load_fp16_components(path: Path) -> None:
    """UNet, VAE and ChatGLM load from the fp16 files, and as float16 tensors equal to the served ones."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.pipelines.kolors.text_encoder import ChatGLMModel
    from safetensors.torch import load_file

    unet = UNet2DConditionModel.from_pretrained(path / "unet", variant="fp16", torch_dtype=torch.float16)
    vae = AutoencoderKL.from_pretrained(path / "vae", variant="fp16", torch_dtype=torch.float16)
    text_encoder = ChatGLMModel.from_pretrained(path / "text_encoder", variant="fp16", torch_dtype=torch.float16)
    served = load_file(path / "unet" / "diffusion_pytorch_model.fp16.safetensors")
    assert {t.dtype for t in served.values()} == {torch.float16}
    name, tensor = next(iter(served.items()))
    assert torch.equal(unet.state_dict()[name], tensor)
    assert next(vae.parameters()).dtype == torch.float16
    shard = load_file(path / "text_encoder" / "model.fp16-00003-of-00003.safetensors")
    name, tensor = next(iter(shard.items()))
    assert torch.equal(text_encoder.state_dict()[name], tensor)
    with pytest.raises(OSError, match="diffusion_pytorch_model"):  # the bug: no plain-named file
        UNet2DConditionModel.from_pretrained(path / "unet")


# ------------------------------------------------------------------------------------------ ModelScope


def test_modelscope_listing_is_the_real_fp16_only_layout(modelscope_env) -> None:
    from modelscope.hub.api import HubApi

    files = HubApi().get_model_files(KOLORS_ID, revision="master", recursive=True)
    paths = {f["Path"] for f in files if f["Size"]}
    assert {
        "unet/diffusion_pytorch_model.fp16.safetensors",
        "vae/diffusion_pytorch_model.fp16.safetensors",
        "text_encoder/model.safetensors.index.fp16.json",
        "text_encoder/model.fp16-00001-of-00003.safetensors",
        "text_encoder/model.fp16-00002-of-00003.safetensors",
        "text_encoder/model.fp16-00003-of-00003.safetensors",
        "README.md",
    } <= paths
    assert not [p for p in paths if PLAIN_WEIGHT.search(p)]

    # The raw listing, as the product may read it: sizes and digests are those of the served bytes.
    raw = requests.get(
        f"{modelscope_env.url}/api/v1/models/{KOLORS_ID}/repo/files",
        params={"Revision": "master", "Recursive": "True"},
        timeout=10,
    ).json()["Data"]
    art = modelscope_env.artifacts["kolors"]
    blobs = [e for e in raw["Files"] if e["Type"] == "blob"]
    assert {e["Path"]: e["Size"] for e in blobs} == _files(art)
    for e in blobs:
        assert e["Sha256"] == hashlib.sha256((art / e["Path"]).read_bytes()).hexdigest()
    # As the recorded real listing has it: each file's Revision is the commit that last touched it; only the
    # files of the head commit (here README.md and .gitattributes) carry the repo's commit, LatestCommitter.Id
    head = modelscope_env.repo("model", KOLORS_ID).commit
    assert raw["LatestCommitter"]["Id"] == head and head.startswith(raw["LatestCommitter"]["ShortId"])
    revisions = {e["Path"]: e["Revision"] for e in blobs}
    assert {p for p, r in revisions.items() if r == head} == {"README.md", ".gitattributes"}
    assert revisions["unet/diffusion_pytorch_model.fp16.safetensors"] != revisions["vae/config.json"]
    assert len(set(revisions.values())) > 3


def test_modelscope_snapshot_of_fp16_files_fetches_exactly_those_and_loads(modelscope_env, tmp_path) -> None:
    from modelscope import snapshot_download

    path = Path(snapshot_download(KOLORS_ID, cache_dir=str(tmp_path / "ms"), allow_patterns=KOLORS_FP16_LOADER_FILES))
    expected = _expected_fp16(modelscope_env.artifacts["kolors"])
    assert _files(path) == expected
    assert modelscope_env.downloads(KOLORS_ID) == expected  # bytes sent == the files the loader uses
    assert "README.md" not in modelscope_env.downloads(KOLORS_ID)
    _load_fp16_components(path)

    modelscope_env.reset_downloads()  # a second snapshot is served from the client's cache
    snapshot_download(KOLORS_ID, cache_dir=str(tmp_path / "ms"), allow_patterns=KOLORS_FP16_LOADER_FILES)
    assert modelscope_env.downloads(KOLORS_ID) == {}

    commit = modelscope_env.repo("model", KOLORS_ID).commit  # pinning the commit id works too
    pinned = snapshot_download(KOLORS_ID, revision=commit, cache_dir=str(tmp_path / "ms"), allow_patterns=["*.json"])
    assert Path(pinned).name == commit
    with pytest.raises(requests.HTTPError, match="404"):
        snapshot_download(KOLORS_ID, revision="v9.9", cache_dir=str(tmp_path / "ms"), allow_patterns=["*.json"])


def test_modelscope_extra_repos_for_variant_choice_and_custom_code(modelscope_env, tmp_path) -> None:
    """Not real ids: a Kolors with fp32 plain AND fp16 files, and the predictor with its 2024 custom code."""
    import torch
    from aesthetics_predictor import AestheticsPredictorV2Linear
    from diffusers import UNet2DConditionModel
    from modelscope import snapshot_download

    path = Path(snapshot_download(KOLORS_BOTH_ID, cache_dir=str(tmp_path / "ms"), allow_patterns=["unet/*"]))
    plain = UNet2DConditionModel.from_pretrained(path / "unet")
    half = UNet2DConditionModel.from_pretrained(path / "unet", variant="fp16", torch_dtype=torch.float16)
    assert next(plain.parameters()).dtype == torch.float32
    assert torch.allclose(next(plain.parameters()).half(), next(half.parameters()))

    path = Path(snapshot_download(PREDICTOR_CUSTOM_ID, cache_dir=str(tmp_path / "ms")))
    assert {"configuration_predictor.py", "modeling_v2.py", "pytorch_model.bin"} <= set(_files(path))
    assert "auto_map" in (path / "config.json").read_text()
    assert AestheticsPredictorV2Linear.from_pretrained(path).layers[-1].out_features == 1


def test_modelscope_predictor_loads_from_its_pickle(modelscope_env, tmp_path) -> None:
    from aesthetics_predictor import AestheticsPredictorV2Linear
    from modelscope import snapshot_download

    path = Path(snapshot_download(PREDICTOR_ID, cache_dir=str(tmp_path / "ms")))
    assert "pytorch_model.bin" in _files(path)
    assert not list(path.glob("*.safetensors"))
    assert modelscope_env.downloads(PREDICTOR_ID) == _files(modelscope_env.artifacts["predictor"])
    model = AestheticsPredictorV2Linear.from_pretrained(path)
    assert model.layers[-1].out_features == 1


@DATASETS_TOO_NEW
def test_modelscope_msdataset_yields_pil_rows_of_the_served_sizes(modelscope_env, tmp_path) -> None:
    from modelscope.msdatasets import MsDataset

    ds = MsDataset.load(ANIME_ID, subset_name="default", split="train", cache_dir=str(tmp_path / "ds"))
    assert [row["image"].convert("RGB").size for row in ds] == [size for _, size, _ in ANIME_IMAGES]
    fetched = modelscope_env.downloads(ANIME_ID)
    assert not [p for p in fetched if "miku" in p]  # another split's file is not fetched


def test_modelscope_dataset_snapshot_loads_with_datasets(modelscope_env, tmp_path) -> None:
    """The version-independent route: fetch the split's files, then ``datasets`` reads the local repo."""
    import datasets
    from modelscope.hub.snapshot_download import dataset_snapshot_download

    path = dataset_snapshot_download(
        ANIME_ID, cache_dir=str(tmp_path / "ms"), allow_patterns=["README.md", "data/train-*"]
    )
    ds = datasets.load_dataset(path, split="train", cache_dir=str(tmp_path / "hf-ds"))
    assert [row["image"].size for row in ds] == [size for _, size, _ in ANIME_IMAGES]
    assert sorted(modelscope_env.downloads(ANIME_ID)) == [
        "README.md",
        "data/train-00000-of-00002.parquet",
        "data/train-00001-of-00002.parquet",
    ]


def test_modelscope_unknown_repo_is_not_found(modelscope_env, tmp_path) -> None:
    from modelscope import snapshot_download
    from modelscope.hub.api import HubApi

    with pytest.raises(requests.HTTPError, match="404"):
        snapshot_download("nobody/no-such-model", cache_dir=str(tmp_path / "ms"))
    with pytest.raises(Exception, match="404") as err:
        HubApi().get_model_files("nobody/no-such-model", revision="master")
    assert type(err.value).__name__ == "NotExistError"


def test_modelscope_file_route_honours_range_and_records_only_sent_bytes(modelscope_env) -> None:
    path = "unet/diffusion_pytorch_model.fp16.safetensors"
    data = (modelscope_env.artifacts["kolors"] / path).read_bytes()
    r = requests.get(
        f"{modelscope_env.url}/api/v1/models/{KOLORS_ID}/repo",
        params={"Revision": "master", "FilePath": path},
        headers={"Range": "bytes=100-1123"},
        timeout=10,
    )
    assert r.status_code == 206
    assert r.headers["Content-Range"] == f"bytes 100-1123/{len(data)}"
    assert r.content == data[100:1124]
    assert modelscope_env.downloads(KOLORS_ID) == {path: 1024}


# ---------------------------------------------------------------------------------------- Hugging Face


def test_hf_model_info_and_snapshot_of_fp16_files(hf_env, tmp_path) -> None:
    from huggingface_hub import HfApi, snapshot_download

    info = HfApi(endpoint=hf_env.url).model_info(KOLORS_ID, files_metadata=True)
    commit = hf_env.repo("model", KOLORS_ID).commit
    art = hf_env.artifacts["kolors"]
    assert info.sha == commit
    assert {s.rfilename: s.size for s in info.siblings} == _files(art)
    unet = next(s for s in info.siblings if s.rfilename == "unet/diffusion_pytorch_model.fp16.safetensors")
    assert unet.lfs.sha256 == hashlib.sha256((art / unet.rfilename).read_bytes()).hexdigest()

    path = Path(
        snapshot_download(
            KOLORS_ID, cache_dir=str(tmp_path / "hf"), allow_patterns=KOLORS_FP16_LOADER_FILES, endpoint=hf_env.url
        )
    )
    assert path.name == commit  # the snapshot folder is the resolved commit, as on the real hub
    expected = _expected_fp16(art)
    assert _files(path) == expected
    assert hf_env.downloads(KOLORS_ID) == expected
    _load_fp16_components(path)


def test_hf_predictor_snapshot_loads_from_its_pickle(hf_env, tmp_path) -> None:
    from aesthetics_predictor import AestheticsPredictorV2Linear
    from huggingface_hub import snapshot_download

    path = Path(snapshot_download(HF_PREDICTOR_ID, cache_dir=str(tmp_path / "hf"), endpoint=hf_env.url))
    assert hf_env.downloads(HF_PREDICTOR_ID) == _files(hf_env.artifacts["predictor"])
    assert AestheticsPredictorV2Linear.from_pretrained(path).layers[-1].out_features == 1


def test_hf_unknown_repo_and_revision_raise_the_clients_errors(hf_env, tmp_path) -> None:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    with pytest.raises(RepositoryNotFoundError):
        snapshot_download("nobody/no-such-model", cache_dir=str(tmp_path / "hf"), endpoint=hf_env.url)
    with pytest.raises(RevisionNotFoundError):
        snapshot_download(KOLORS_ID, revision="v9", cache_dir=str(tmp_path / "hf"), endpoint=hf_env.url)
    commit = hf_env.repo("model", KOLORS_ID).commit
    pinned = snapshot_download(
        KOLORS_ID, revision=commit, allow_patterns=["*.json"], cache_dir=str(tmp_path / "hf"), endpoint=hf_env.url
    )
    assert Path(pinned).name == commit


def test_hf_datasets_load_dataset_yields_pil_rows(hf_env, tmp_path) -> None:
    """``datasets`` reads ``HF_ENDPOINT`` at import, so it runs in a child process with the variable set."""
    code = textwrap.dedent(
        f"""
        import datasets
        ds = datasets.load_dataset({HF_ANIME_ID!r}, split="train", cache_dir={str(tmp_path / "ds")!r})
        print([list(row["image"].size) for row in ds])
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=os.environ.copy(), capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == str([list(size) for _, size, _ in ANIME_IMAGES])
    assert sorted(hf_env.downloads(HF_ANIME_ID)) == [
        "README.md",
        "data/train-00000-of-00002.parquet",
        "data/train-00001-of-00002.parquet",
    ]


def test_hf_dataset_snapshot_then_local_load_works_in_process(hf_env, tmp_path) -> None:
    """With ``endpoint=`` passed explicitly no import-time constant matters: fetch the split's files, load locally."""
    import datasets
    from huggingface_hub import snapshot_download

    path = snapshot_download(
        HF_ANIME_ID,
        repo_type="dataset",
        allow_patterns=["README.md", "data/train-*"],
        cache_dir=str(tmp_path / "hf"),
        endpoint=hf_env.url,
    )
    assert Path(path).name == hf_env.repo("dataset", HF_ANIME_ID).commit
    ds = datasets.load_dataset(path, split="train", cache_dir=str(tmp_path / "ds"))
    assert [row["image"].size for row in ds] == [size for _, size, _ in ANIME_IMAGES]
    assert not [p for p in hf_env.downloads(HF_ANIME_ID) if "miku" in p]


# ------------------------------------------------------------------------------------------ script mode


@pytest.mark.parametrize("script", ["modelscope_hub.py", "hf_hub.py"])
def test_script_mode_serves_until_killed(script, hub_artifacts) -> None:
    root = next(iter(hub_artifacts.values())).parent
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "tests" / "hub_servers" / script), "--port", "0", "--root", str(root)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        cwd="/",
    )
    try:
        line = proc.stdout.readline()
        url = re.search(r"http://127\.0\.0\.1:\d+", line).group(0)
        assert requests.get(url + "/", timeout=10).status_code == 200
        listing = (
            f"{url}/api/v1/models/{KOLORS_ID}/repo/files?Revision=master&Recursive=True"
            if script == "modelscope_hub.py"
            else f"{url}/api/models/{KOLORS_ID}/tree/main?recursive=true"
        )
        assert "unet/diffusion_pytorch_model.fp16.safetensors" in requests.get(listing, timeout=10).text
    finally:
        proc.terminate()
        proc.wait(timeout=10)
