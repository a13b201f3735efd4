"""Choosing the files a hub model loads: variants, shards, pickles — on the real repos' listings.

The Kolors listing is the real ``Kwai-Kolors/Kolors-diffusers`` file list (names and the weight
sizes as its Hugging Face page listed them on 2026-11-30; the tokenizer files are the ChatGLM
tokenizer DiffSynth ships, config sizes approximate); the predictor's is
``shunk031/aesthetics-predictor-v2-sac-logos-ava1-l14-linearMSE`` (a 1.22 GB ``pytorch_model.bin``
pickle + CLIP processor files; later revisions add custom-code ``.py`` files). README.md and
.gitattributes stand for the files every hub repo carries that no loader reads.
"""

from __future__ import annotations

import pytest

from kolors_job.core.errors import InputError
from kolors_job.core.uris import HubRef, parse_hub_uri
from kolors_job.models.weights import choose_weights
from kolors_job.sources.hubs import select_files

KOLORS_DIFFUSERS = {
    ".gitattributes": 1519,
    "README.md": 7000,
    "model_index.json": 427,
    "scheduler/scheduler_config.json": 500,
    "text_encoder/config.json": 1300,
    "text_encoder/model.fp16-00001-of-00003.safetensors": 4_907_028_448,
    "text_encoder/model.fp16-00002-of-00003.safetensors": 4_895_933_904,
    "text_encoder/model.fp16-00003-of-00003.safetensors": 2_684_241_000,
    "text_encoder/model.safetensors.index.fp16.json": 20_000,
    "tokenizer/tokenizer.model": 1_018_370,
    "tokenizer/tokenizer_config.json": 250,
    "tokenizer/vocab.txt": 1_018_370,
    "unet/config.json": 1900,
    "unet/diffusion_pytorch_model.fp16.safetensors": 5_159_140_240,
    "vae/config.json": 600,
    "vae/diffusion_pytorch_model.fp16.safetensors": 167_335_342,
}

PREDICTOR = {
    ".gitattributes": 1500,
    "README.md": 2000,
    "config.json": 4500,
    "preprocessor_config.json": 316,
    "pytorch_model.bin": 1_222_000_000,
    "merges.txt": 524_619,
    "special_tokens_map.json": 389,
    "tokenizer.json": 2_224_003,
    "tokenizer_config.json": 905,
    "vocab.json": 961_143,
}
PREDICTOR_CUSTOM_CODE = {**PREDICTOR, "configuration_predictor.py": 1200, "modeling_v2.py": 3400}


def test_fp16_only_kolors_loads_the_fp16_variant_whatever_the_precision() -> None:
    for prefer_fp16 in (True, False):
        files, variants = select_files("pipeline", KOLORS_DIFFUSERS, prefer_fp16=prefer_fp16)
        assert variants == {"unet": "fp16", "vae": "fp16", "text_encoder": "fp16"}
        assert files == [
            "model_index.json",
            "scheduler/scheduler_config.json",
            "text_encoder/config.json",
            "text_encoder/model.fp16-00001-of-00003.safetensors",
            "text_encoder/model.fp16-00002-of-00003.safetensors",
            "text_encoder/model.fp16-00003-of-00003.safetensors",
            "text_encoder/model.safetensors.index.fp16.json",
            "tokenizer/tokenizer.model",
            "tokenizer/tokenizer_config.json",
            "tokenizer/vocab.txt",
            "unet/config.json",
            "unet/diffusion_pytorch_model.fp16.safetensors",
            "vae/config.json",
            "vae/diffusion_pytorch_model.fp16.safetensors",
        ]
        assert "README.md" not in files and ".gitattributes" not in files
    total = sum(KOLORS_DIFFUSERS[f] for f in files)
    assert 17.5e9 < total < 17.9e9  # the ~17.5 GB the README quotes


def test_a_repo_with_both_variants_is_read_by_the_runs_precision() -> None:
    listing = {**KOLORS_DIFFUSERS, "unet/diffusion_pytorch_model.safetensors": 10_318_000_000,
               "vae/diffusion_pytorch_model.safetensors": 334_643_268}
    _, half = select_files("pipeline", listing, prefer_fp16=True)
    _, full = select_files("pipeline", listing, prefer_fp16=False)
    assert half["unet"] == "fp16" and half["vae"] == "fp16"
    assert full["unet"] is None and full["vae"] is None
    assert full["text_encoder"] == "fp16"  # only fp16 shards exist: the fallback, not an error


def test_replaced_vae_weights_are_not_downloaded() -> None:
    files, variants = select_files("pipeline", KOLORS_DIFFUSERS, prefer_fp16=True, skip=("vae",))
    assert "vae/config.json" in files
    assert not [f for f in files if f.startswith("vae/diffusion_pytorch_model")]
    assert "vae" not in variants


@pytest.mark.parametrize("listing", [PREDICTOR, PREDICTOR_CUSTOM_CODE], ids=["plain", "custom-code"])
def test_predictor_loads_its_pickle_and_processor_files_only(listing: dict[str, int]) -> None:
    files, variants = select_files("aesthetic", listing, prefer_fp16=True)
    assert files == sorted(
        ["config.json", "preprocessor_config.json", "pytorch_model.bin", "merges.txt", "special_tokens_map.json",
         "tokenizer.json", "tokenizer_config.json", "vocab.json"]
    )
    assert variants == {".": None}


def test_safetensors_win_over_pickles_and_shards_need_their_index() -> None:
    assert choose_weights(["model.safetensors", "pytorch_model.bin"], "", (("model", "safetensors"),
                          ("pytorch_model", "bin")), prefer_fp16=False) == (["model.safetensors"], None)
    shards = ["te/model-00001-of-00002.safetensors", "te/model-00002-of-00002.safetensors"]
    names = (("model", "safetensors"),)
    assert choose_weights(shards, "te", names, prefer_fp16=False) == ([], None)  # no index: not loadable
    got = choose_weights([*shards, "te/model.safetensors.index.json"], "te", names, prefer_fp16=True)
    assert got == (["te/model.safetensors.index.json", *shards], None)


def test_a_repo_without_weights_fails_naming_the_part() -> None:
    listing = {k: v for k, v in KOLORS_DIFFUSERS.items() if not k.startswith("unet/diffusion")}
    with pytest.raises(InputError, match=r"unet: no weight file in unet/"):
        select_files("pipeline", listing, prefer_fp16=True)
    with pytest.raises(InputError, match="no tokenizer/"):
        select_files("pipeline", {k: v for k, v in KOLORS_DIFFUSERS.items() if "tokenizer/" not in k}, prefer_fp16=True)


def test_a_standalone_vae_repo_or_a_pipelines_vae_folder() -> None:
    fix = {"config.json": 600, "diffusion_pytorch_model.safetensors": 334_643_268, "sdxl.vae.safetensors": 334_641_164,
           "diffusion_pytorch_model.bin": 334_707_217}
    assert select_files("vae", fix, prefer_fp16=True)[0] == ["config.json", "diffusion_pytorch_model.safetensors"]
    files, _ = select_files("vae", KOLORS_DIFFUSERS, prefer_fp16=True)
    assert files == ["vae/config.json", "vae/diffusion_pytorch_model.fp16.safetensors"]


def test_hub_uris() -> None:
    assert parse_hub_uri("modelscope://Kwai-Kolors/Kolors-diffusers") == HubRef(
        "modelscope", "Kwai-Kolors/Kolors-diffusers", None
    )
    assert parse_hub_uri("hf://shunk031/x@refs/pr/3") == HubRef("hf", "shunk031/x", "refs/pr/3")
    assert parse_hub_uri("s3://bucket/x") is None and parse_hub_uri("/local/dir") is None
    for bad in ("hf://only-name", "hf://a/b@", "modelscope://a/b/c", "hf://a/b@x y"):
        with pytest.raises(InputError, match="bad hub uri"):
            parse_hub_uri(bad)
