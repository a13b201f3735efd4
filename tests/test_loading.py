"""Loading Kolors as the real repository ships it: fp16-variant files only, mapped rather than copied.

``Kwai-Kolors/Kolors-diffusers`` has nothing but ``*.fp16.safetensors`` (the fixtures in
``tests/hub_servers/artifacts.py`` copy that layout: file names, 3 text-encoder shards + index, tensors
stored as float16). Two things are checked here:

- the default GPU training path (fp16 mixed precision: fp16 UNet and ChatGLM, fp32 VAE) loads from that
  layout. It used to reload the VAE in fp32 without a variant, which only plain files can satisfy: the
  default job on a GPU died while caching latents;
- ``load_kolors_components(cast=False)`` keeps every module the memory-mapped file (page cache, shared by
  every DDP rank on a node), and ``place`` gives bit for bit the values an eager cast gives. The host then
  holds no private copy of the weights whatever the run's dtype: what the pod's memory limit is sized on.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from kolors_job.core.errors import ExitCode, InputError
from kolors_job.data.images import ImageItem
from kolors_job.manifest.train import TrainSpec
from kolors_job.models.loading import load_kolors_components, load_tokenizer, place, stored_dtype
from kolors_job.models.tiny import TINY_TEXT_ENCODER_CONFIG, build_tiny_kolors
from kolors_job.models.weights import DIFFUSERS_WEIGHTS, TRANSFORMERS_WEIGHTS, local_weights
from kolors_job.train.data import build_caches
from tests.hub_servers.artifacts import write_kolors_diffusers

REPO = Path(__file__).resolve().parents[1]


def _stored(folder: Path, names: tuple[tuple[str, str], ...], *, prefer_fp16: bool) -> torch.dtype | None:
    """The stored dtype of what the loader opens in ``folder`` for a run that prefers (or not) fp16."""
    return stored_dtype(folder, local_weights(folder, names, prefer_fp16=prefer_fp16)[0])


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach() for k, v in module.state_dict().items()}


def _assert_same_bits(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def test_the_tokenizer_is_built_once_per_process_for_the_same_files(hub_artifacts: dict[str, Path],
                                                                     tmp_path: Path) -> None:
    """Training and the story load Kolors twice: they share one tokenizer; other files make another one."""
    kolors = hub_artifacts["kolors"]
    first = load_kolors_components(kolors, dtype=torch.float32, cast=False)
    copy = shutil.copytree(kolors / "tokenizer", tmp_path / "copy")
    assert load_kolors_components(kolors, dtype=torch.float32, cast=False).tokenizer is first.tokenizer
    assert load_tokenizer(copy) is first.tokenizer  # the same bytes elsewhere
    config = json.loads((copy / "tokenizer_config.json").read_text())
    (copy / "tokenizer_config.json").write_text(json.dumps({**config, "model_max_length": 77}))
    other = load_tokenizer(copy)
    assert other is not first.tokenizer and other.model_max_length == 77 != first.tokenizer.model_max_length
    ids = first.tokenizer("一只猫", padding="max_length", max_length=256, truncation=True).input_ids
    assert len(ids) == 256 and ids[-1] != first.tokenizer.pad_token_id  # ChatGLM pads on the left


@pytest.mark.parametrize("broken", ["missing", "empty"])
def test_a_model_without_its_tokenizer_files_is_one_input_error_naming_the_folder(
    hub_artifacts: dict[str, Path], tmp_path: Path, broken: str
) -> None:
    kolors = tmp_path / "kolors"
    kolors.mkdir()
    for entry in hub_artifacts["kolors"].iterdir():
        if entry.name != "tokenizer":
            (kolors / entry.name).symlink_to(entry)
    if broken == "empty":
        (kolors / "tokenizer").mkdir()
    with pytest.raises(InputError) as e:
        load_kolors_components(kolors, dtype=torch.float32, cast=False)
    assert str(e.value).startswith(f"cannot load the tokenizer from {kolors / 'tokenizer'}: ")
    assert "\n" not in str(e.value) and e.value.exit_code == ExitCode.INVALID_INPUT


def test_the_fp16_only_layout_is_read_in_its_stored_dtype(hub_artifacts: dict[str, Path]) -> None:
    kolors = hub_artifacts["kolors"]
    for part, names in (("unet", DIFFUSERS_WEIGHTS), ("vae", DIFFUSERS_WEIGHTS), ("text_encoder", TRANSFORMERS_WEIGHTS)):
        for prefer_fp16 in (True, False):  # an fp32 run falls back to the fp16 files, the only ones there
            assert _stored(kolors / part, names, prefer_fp16=prefer_fp16) == torch.float16, part
    both = hub_artifacts["kolors_both"]
    assert _stored(both / "unet", DIFFUSERS_WEIGHTS, prefer_fp16=False) == torch.float32
    assert _stored(both / "unet", DIFFUSERS_WEIGHTS, prefer_fp16=True) == torch.float16


def test_mixed_dtypes_in_any_shard_are_loaded_cast(tmp_path: Path) -> None:
    """A checkpoint whose shards disagree (fp16 first, an fp32 tensor in the second) has no one stored dtype:
    loading it in the first shard's would round the fp32 tensors, so it is loaded cast as before. Files named
    and indexed the way transformers writes an fp16-variant sharded checkpoint (``model.fp16-0000N-of-0000M``)."""
    from safetensors.torch import save_file

    index = {"metadata": {}, "weight_map": {"a": "model.fp16-00001-of-00002.safetensors",
                                            "b": "model.fp16-00002-of-00002.safetensors"}}  # fmt: skip
    (tmp_path / "model.safetensors.index.fp16.json").write_text(json.dumps(index))
    save_file({"a": torch.zeros(2, dtype=torch.float16)}, tmp_path / "model.fp16-00001-of-00002.safetensors")
    save_file({"b": torch.zeros(2, dtype=torch.float32), "n": torch.zeros(2, dtype=torch.int64)},
              tmp_path / "model.fp16-00002-of-00002.safetensors")  # fmt: skip
    assert _stored(tmp_path, TRANSFORMERS_WEIGHTS, prefer_fp16=True) is None
    save_file({"b": torch.zeros(2, dtype=torch.float16), "n": torch.zeros(2, dtype=torch.int64)},
              tmp_path / "model.fp16-00002-of-00002.safetensors")  # fmt: skip
    assert _stored(tmp_path, TRANSFORMERS_WEIGHTS, prefer_fp16=True) == torch.float16  # ints do not count


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_uncast_load_then_place_equals_the_eager_cast(hub_artifacts: dict[str, Path], dtype: torch.dtype) -> None:
    """fp16 files, another run dtype: the uncast modules stay fp16 until placed, then match bit for bit."""
    kolors = hub_artifacts["kolors"]
    eager = load_kolors_components(kolors, dtype=dtype)
    lazy = load_kolors_components(kolors, dtype=dtype, cast=False)
    for name in ("unet", "vae", "text_encoder"):
        module = getattr(lazy, name)
        assert {p.dtype for p in module.parameters()} == {torch.float16}, name
        placed = place(module, "cpu", dtype)
        assert placed is module
        _assert_same_bits(_state(module), _state(getattr(eager, name)))


def _png(path: Path, colour: tuple[int, int, int]) -> Path:
    Image.new("RGB", (96, 80), colour).save(path)
    return path


def test_default_gpu_precision_caches_from_the_fp16_only_layout(hub_artifacts: dict[str, Path], tmp_path: Path) -> None:
    """precision fp16 (the GPU default): fp16 UNet/ChatGLM, fp32 VAE, from a repo that has only fp16 files.

    The VAE is fp32 from the plain files where the repo has them (``kolors_both``), not fp16 rounded and
    upcast; where it has only fp16 files, those upcast. fp16 on a CPU is slow but runs every op used here.
    """
    items = [
        ImageItem(_png(tmp_path / f"{i}.png", (40 * i, 90, 200 - 30 * i)), f"caption {i}", 96, 80) for i in range(2)
    ]
    spec = TrainSpec(resolution=64)
    for name in ("kolors", "kolors_both"):
        caches = build_caches(
            hub_artifacts[name], items, spec, vae_dir=None, precision="fp16", weight_dtype=torch.float16,
            dev=torch.device("cpu"), caption_dropout=0.0, keep_for_sampling=True,
        )
        assert caches.unet.dtype == torch.float16  # still the mapped fp16 file: add_lora places it
        assert len(caches.latents) == 2 and len(caches.prompts) == 2
        assert all(torch.isfinite(e.mean).all() for e in caches.latents.values())
        vae = caches.sampling.vae
        assert vae.dtype == torch.float32
        folder = hub_artifacts[name] / "vae"
        plain = folder / "diffusion_pytorch_model.safetensors"
        source = load_file(plain if plain.is_file() else folder / "diffusion_pytorch_model.fp16.safetensors")
        _assert_same_bits(_state(vae), {k: v.float() for k, v in source.items()})
        if plain.is_file():  # a real fp32 VAE: not the fp16 variant upcast
            fp16 = load_file(folder / "diffusion_pytorch_model.fp16.safetensors")
            assert any(not torch.equal(source[k], fp16[k].float()) for k in source)


# ------------------------------------------------------------------------------------------- host memory


@pytest.fixture(scope="module")
def wide_kolors(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int]:
    """A Kolors in the fp16-only layout whose ChatGLM is wide enough (~270 MB) to measure: the tiny model
    with a 1024-wide text encoder (the real vocab: embedding and output layer are most of the bytes), written
    by ``write_kolors_diffusers`` (the Kwai-Kolors/Kolors-diffusers file listing, docs/design.md §5)."""
    from diffusers import UNet2DConditionModel

    from kolors_job.models.tiny import _chatglm, _seeded

    root = tmp_path_factory.mktemp("wide")
    src = build_tiny_kolors(root / "tiny")
    wide = root / "src"
    shutil.copytree(src, wide)
    shutil.rmtree(wide / "text_encoder")
    config = {**TINY_TEXT_ENCODER_CONFIG, "hidden_size": 1024, "ffn_hidden_size": 64, "kv_channels": 256}
    with _seeded(1):  # in fp16 already, as it is re-saved: half the bytes to write and read again
        _chatglm(config).to(torch.float16).save_pretrained(wide / "text_encoder", safe_serialization=True)
    unet_config = json.loads((wide / "unet" / "config.json").read_text())
    unet_config["projection_class_embeddings_input_dim"] = 1024 + 6 * unet_config["addition_time_embed_dim"]
    unet_config["encoder_hid_dim"] = 1024
    with _seeded(2):
        unet = UNet2DConditionModel.from_config(unet_config)
    shutil.rmtree(wide / "unet")
    unet.save_pretrained(wide / "unet", safe_serialization=True)
    out = write_kolors_diffusers(root / "kolors", src=wide)
    weights = sum(f.stat().st_size for f in out.rglob("*.safetensors"))
    assert weights > 200 * 2**20, weights
    return out, weights


def _anon_growth(tiny: Path, wide: Path) -> dict:
    """Private memory grown by loading ``wide`` uncast, then cast, in one fresh interpreter (one start-up, warm:
    tests/procs/anon_growth.py)."""
    proc = subprocess.run(
        [sys.executable, "-m", "tests.procs.anon_growth", str(tiny), str(wide)],
        capture_output=True, text=True, cwd=REPO, timeout=300, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_uncast_load_holds_no_private_copy_of_the_weights(
    wide_kolors: tuple[Path, int], hub_artifacts: dict[str, Path]
) -> None:
    """bf16 run, fp16 files: cast at load, every rank holds a private bf16 copy (~the weights' size); uncast,
    its private memory barely grows (the tensors are the shared page cache until ``place`` copies them
    to the device). The cast figure is measured too, so the measurement itself is seen to work."""
    wide, weights = wide_kolors
    grown = _anon_growth(hub_artifacts["kolors"], wide)
    cast, uncast = grown["cast"], grown["uncast"]
    print(f"\nprivate memory for {weights / 2**20:.0f} MiB of fp16 weights loaded for a bf16 run: "
          f"cast at load {cast['anon'] / 2**20:.0f} MiB, uncast {uncast['anon'] / 2**20:.0f} MiB")
    assert cast["dtype"] == "torch.bfloat16" and uncast["dtype"] == "torch.float16"
    assert cast["anon"] > 0.8 * weights
    assert uncast["anon"] < 0.15 * weights
