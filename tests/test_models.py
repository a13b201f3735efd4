"""Model resolution and loading, exercised on real files (tiny builds) and a real, unreachable hub."""

from __future__ import annotations

import hashlib
import shutil
import socket
from pathlib import Path

import pytest
import torch

from kolors_job.core.errors import ExitCode, InputError, JobError
from kolors_job.core.settings import Settings
from kolors_job.manifest.story import StorySpec
from kolors_job.models.loading import KolorsComponents, load_kolors_components, make_pipeline
from kolors_job.models.schedulers import SCHEDULERS
from kolors_job.models.tiny import build_tiny_kolors
from kolors_job.sources import resolve_model
from kolors_job.storage.atomic import COMPLETE_MARKER


@pytest.fixture(scope="module")
def tiny_src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_kolors(tmp_path_factory.mktemp("src") / "kolors")


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(cache_dir=tmp_path / "cache")


@pytest.fixture(scope="module")
def components(tiny_src: Path) -> KolorsComponents:
    return load_kolors_components(tiny_src, dtype=torch.float32)


def _one_line_naming(exc: BaseException, *parts: str) -> None:
    text = str(exc)
    assert "\n" not in text
    for part in parts:
        assert part in text, (part, text)


# ---------------------------------------------------------------------------------------------
# resolve_model
# ---------------------------------------------------------------------------------------------


def test_tiny_uris_build_once_into_the_cache(settings: Settings) -> None:
    kolors = resolve_model("tiny://kolors", kind="pipeline", settings=settings)
    assert kolors.is_relative_to(settings.cache_dir) and (kolors / COMPLETE_MARKER).is_file()
    assert resolve_model("tiny://kolors", kind="pipeline", settings=settings) == kolors
    assert resolve_model("tiny://kolors", kind="vae", settings=settings) == kolors / "vae"
    aesthetic = resolve_model("tiny://aesthetic", kind="aesthetic", settings=settings)
    assert (aesthetic / "preprocessor_config.json").is_file()
    with pytest.raises(InputError) as err:
        resolve_model("tiny://sdxl", kind="pipeline", settings=settings)
    _one_line_naming(err.value, "tiny://sdxl")


def test_plain_path_is_used_in_place(tiny_src: Path, settings: Settings) -> None:
    assert resolve_model(str(tiny_src), kind="pipeline", settings=settings) == tiny_src
    assert resolve_model(str(tiny_src / "vae"), kind="vae", settings=settings) == tiny_src / "vae"
    assert not (settings.cache_dir / "models").exists()  # nothing copied


def test_file_uri_is_copied_once_and_reused(tmp_path: Path, tiny_src: Path, settings: Settings) -> None:
    src = tmp_path / "bucket" / "kolors"
    shutil.copytree(tiny_src, src)
    uri = src.as_uri() + "/"
    got = resolve_model(uri, kind="pipeline", settings=settings)
    key = hashlib.sha256(uri.rstrip("/").encode()).hexdigest()[:16]
    assert got == settings.cache_dir / "models" / key
    assert (got / COMPLETE_MARKER).is_file()
    assert (got / "unet" / "diffusion_pytorch_model.safetensors").read_bytes() == (
        tiny_src / "unet" / "diffusion_pytorch_model.safetensors"
    ).read_bytes()
    shutil.rmtree(src)  # a second job reuses the cached copy without touching the source
    assert resolve_model(uri.rstrip("/"), kind="pipeline", settings=settings) == got
    assert [p.name for p in got.parent.iterdir()] == [key]  # no temp dirs left behind


def test_torn_cached_copy_is_redone(tmp_path: Path, tiny_src: Path, settings: Settings) -> None:
    uri = tiny_src.as_uri()
    target = settings.cache_dir / "models" / hashlib.sha256(uri.encode()).hexdigest()[:16]
    (target / "unet").mkdir(parents=True)
    (target / "model_index.json").write_text("{")  # a crash mid-copy, no marker
    got = resolve_model(uri, kind="pipeline", settings=settings)
    assert got == target and (got / COMPLETE_MARKER).is_file()
    assert (got / "model_index.json").read_bytes() == (tiny_src / "model_index.json").read_bytes()


def test_missing_files_are_one_line_input_errors(tmp_path: Path, tiny_src: Path, settings: Settings) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(tiny_src, broken)
    shutil.rmtree(broken / "scheduler")
    with pytest.raises(InputError) as err:
        resolve_model(str(broken), kind="pipeline", settings=settings)
    _one_line_naming(err.value, str(broken), "scheduler/")
    assert err.value.exit_code == ExitCode.INVALID_INPUT

    with pytest.raises(InputError) as err:
        resolve_model(broken.as_uri(), kind="pipeline", settings=settings)  # via the storage layer too
    _one_line_naming(err.value, broken.as_uri(), "scheduler/")

    with pytest.raises(InputError) as err:
        resolve_model(str(tiny_src), kind="aesthetic", settings=settings)
    _one_line_naming(err.value, str(tiny_src), "config.json")

    (broken / "vae" / "config.json").unlink()
    with pytest.raises(InputError) as err:
        resolve_model(str(broken / "vae"), kind="vae", settings=settings)
    _one_line_naming(err.value, "config.json")


@pytest.mark.parametrize(
    "uri",
    [
        "/no/such/dir",
        "file:///no/such/dir",
        "http://example.com/model",
        "modelscope://just-a-name",
        "modelscope://Owner/Name@",
        "modelscope://Owner/Name/extra",
        "",
    ],
)
def test_bad_uris_are_one_line_input_errors(uri: str, settings: Settings) -> None:
    with pytest.raises(InputError) as err:
        resolve_model(uri, kind="pipeline", settings=settings)
    _one_line_naming(err.value, uri)


def test_unreachable_modelscope_is_temporary(monkeypatch: pytest.MonkeyPatch, settings: Settings) -> None:
    with socket.socket() as s:  # a port nobody listens on: the real client fails with "refused"
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("MODELSCOPE_ENDPOINT", f"http://127.0.0.1:{port}")
    settings = Settings(cache_dir=settings.cache_dir)  # reads the endpoint now set
    monkeypatch.setattr("modelscope_hub.config._default_config", None)  # nor an earlier test's endpoint
    uri = "modelscope://Kwai-Kolors/Kolors-diffusers@v1.0"
    with pytest.raises(JobError) as err:
        resolve_model(uri, kind="pipeline", settings=settings)
    assert err.value.exit_code == ExitCode.TEMPORARY
    _one_line_naming(err.value, uri)
    assert "Revision=v1.0" in str(err.value)  # the revision reached the hub request
    assert not list(settings.cache_dir.rglob(".kolors_job_source.json"))  # nothing marked complete


# ---------------------------------------------------------------------------------------------
# load_kolors_components / make_pipeline
# ---------------------------------------------------------------------------------------------


def test_components_load_with_the_models_own_schedule(components: KolorsComponents) -> None:
    from diffusers import AutoencoderKL, DDPMScheduler, EulerDiscreteScheduler, UNet2DConditionModel

    assert isinstance(components.unet, UNet2DConditionModel)
    assert isinstance(components.vae, AutoencoderKL)
    assert type(components.text_encoder).__name__ == "ChatGLMModel"
    assert type(components.tokenizer).__name__ == "ChatGLMTokenizer"
    assert isinstance(components.noise_scheduler, DDPMScheduler)
    assert isinstance(components.pipeline_scheduler, EulerDiscreteScheduler)
    ddpm = components.noise_scheduler.config
    assert (ddpm.num_train_timesteps, ddpm.beta_end, ddpm.beta_schedule) == (1100, 0.014, "scaled_linear")
    assert components.force_zeros_for_empty_prompt is False


def test_make_pipeline_shares_modules_and_swaps_samplers(components: KolorsComponents) -> None:
    from diffusers import KolorsPipeline

    own = make_pipeline(components, None)
    assert isinstance(own, KolorsPipeline)
    assert own.unet is components.unet and own.text_encoder is components.text_encoder
    assert own.scheduler is not components.pipeline_scheduler  # schedulers are stateful: a fresh one
    for name, sampler in SCHEDULERS.items():
        pipe = make_pipeline(components, name)
        assert type(pipe.scheduler).__name__ == sampler.cls
        assert pipe.scheduler.config.num_train_timesteps == 1100
        assert all(pipe.scheduler.config[k] == v for k, v in sampler.overrides.items())
    # one list: every name the manifest accepts is a sampler, and every sampler is accepted
    schema = StorySpec.model_json_schema()["properties"]["scheduler"]
    assert set(schema["enum"]) == set(SCHEDULERS)
    for name in SCHEDULERS:
        assert StorySpec(scheduler=name).scheduler == name
    with pytest.raises(InputError) as err:
        make_pipeline(components, "k_lms_turbo")
    _one_line_naming(err.value, "k_lms_turbo", "euler")

    pipe = make_pipeline(components, "dpmpp_2m")
    pipe.set_progress_bar_config(disable=True)
    image = pipe(
        "二次元",
        num_inference_steps=3,
        guidance_scale=4.0,
        height=64,
        width=64,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
    ).images
    assert image.shape == (1, 3, 64, 64) and torch.isfinite(image).all()


def test_separate_vae_and_corrupt_weights(tmp_path: Path, tiny_src: Path, settings: Settings) -> None:
    vae_dir = resolve_model(str(tiny_src), kind="vae", settings=settings)
    loaded = load_kolors_components(tiny_src, vae_path=vae_dir, dtype=torch.float32)
    assert loaded.vae.config.scaling_factor == 0.13025

    broken = tmp_path / "broken"
    shutil.copytree(tiny_src, broken)
    weights = broken / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    for cast in (True, False):  # uncast reads the headers first: a torn file is still the loader's one line
        with pytest.raises(InputError) as err:
            load_kolors_components(broken, dtype=torch.float32, cast=cast)
        _one_line_naming(err.value, "UNet", str(broken))
