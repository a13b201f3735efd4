"""Oracle tests: our resolved default manifest and our code against the reference's own sources.

The expected values are literals in ``tests/reference/reference.yaml``, each citing the notebook copy or the
DiffSynth-Studio file, line and commit it was read from; nothing here takes an expected value from our
defaults. ``DEFAULT`` is what ``kolors-job validate`` resolves from ``output.uri`` alone. The cheap checks
(``tests/reference/oracle.py``) run one test each; the ones below run DiffSynth's own code on the CPU with the
fixture's values: its Kolors ``SDXLImagePipeline.__call__`` (noise, ``KolorsPrompter`` with DiffSynth's ChatGLM
class, time ids, CFG, ``EnhancedDDIMScheduler`` configured by its own ``fetch_models``; only its full-size UNet
body and VAE decoder are replaced by the tiny modules ours uses), its prompter, its schedulers, its VAE
encoder (full-size, random weights), its 1.1.9 dataset. tests/test_oracle_mutations.py shows the checks
catch each drift.
"""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import diffsynth  # in the lock: a missing oracle must fail, not skip
import numpy as np
import pytest
import torch
import yaml

from kolors_job.export.lora_io import LORA_WEIGHT_NAME
from kolors_job.manifest.spec import Manifest
from kolors_job.manifest.story import StorySpec
from kolors_job.models.schedulers import make_scheduler, sampler_timesteps
from kolors_job.models.tiny import TINY_TEXT_ENCODER_CONFIG, build_tiny_kolors
from kolors_job.render.pipeline import (
    ADAPTER_NAME,
    apply_lora,
    encode_texts,
    fuses_lora,
    load_story_pipeline,
    render,
    sampler_record,
    sampling_dtype,
)
from kolors_job.story.draw import plan_jobs
from tests.reference import oracle
from tests.reference.oracle import ref

ROOT = Path(__file__).resolve().parents[1]
DIFFSYNTH = Path(diffsynth.__file__).parent
SIZE = 64  # the tiny model's size for the sampling runs (DiffSynth rounds sizes up to multiples of 64)
DEFAULT: Manifest = oracle.resolved_default()


def _small(story: StorySpec) -> StorySpec:
    """The manifest's story at the tiny model's size (the size itself is checked in ``story_sampling_call``)."""
    return story.model_copy(update={"width": SIZE, "height": SIZE})


# ------------------------------------------------------------------------------------------- the fixture


def test_every_reference_value_cites_its_source() -> None:
    """Every value names where it was read: a known source and the line(s) there (or the frame in the copy
    that has no repository name); every source names a repository, path and commit, or the wheel."""
    data = oracle.reference()
    sources = data["sources"]
    for key, src in sources.items():
        assert ("repo" in src and "path" in src and re.fullmatch(r"[0-9a-f]{40}", src["commit"])) or (
            "package" in src and "path" in src
        ) or "index" in src, key
    cites = [c for v in data["values"].values() for c in v["cite"]]
    cites += [c for f in data["values"]["story.frames"]["value"] for c in f["cite"]]
    for name, value in data["values"].items():
        assert value.get("cite"), f"{name} cites no source"
    for frame in data["values"]["story.frames"]["value"]:
        assert frame.get("cite"), frame
    for cite in cites:
        key, _, where = cite.partition(":")
        assert key in sources, cite
        assert re.fullmatch(r"\d+(-\d+)?", where) or (key == "boy-copy" and where.startswith("frame ")), cite


def test_validate_of_output_uri_alone_resolves_to_the_notebooks_eight_frames(tmp_path: Path) -> None:
    """``kolors-job validate`` on a manifest holding only ``spec.output.uri``: the printed manifest's eight
    prompts, seeds and negative prompts are the notebook's, byte for byte, with the reference recipe."""
    job = tmp_path / "job.yaml"
    job.write_text("spec:\n  output: {uri: file:///tmp/out/}\n")
    out = subprocess.run(
        [sys.executable, "-m", "kolors_job", "validate", str(job)], capture_output=True, check=True, cwd=ROOT,
    ).stdout
    printed = Manifest.model_validate(yaml.safe_load(out.decode("utf-8")))
    assert printed.spec.recipe == "reference"
    story = printed.spec.story
    got = [(f.prompt.encode(), f.seed, story.negative_for(f).encode()) for f in story.frames]
    assert got == [(f["prompt"].encode(), f["seed"], f["negative_prompt"].encode()) for f in ref("story.frames")]


@pytest.mark.parametrize("check", list(oracle.CHECKS))
def test_resolved_default_matches_the_reference(check: str, tmp_path: Path) -> None:
    oracle.CHECKS[check](DEFAULT, tmp_path)


# ------------------------------------------------------------------------------------------ DiffSynth runs


@pytest.fixture(scope="module")
def tiny_model(shared_cache: Path) -> Path:
    return build_tiny_kolors(shared_cache / "tiny-kolors", seed=0)


class _Models:
    """Stands in for DiffSynth's ``ModelManager``: ``fetch_models`` asks it for each model by name."""

    def __init__(self, **models: Any) -> None:
        self.models = models

    def fetch_model(self, name: str, *args: Any, **kwargs: Any) -> Any:
        return self.models.get(name)


def diffsynth_chatglm(tiny_model: Path) -> torch.nn.Module:
    """DiffSynth's own ChatGLM class (diffsynth/models/kolors_text_encoder.py line 991), tiny, holding the
    tiny model's text-encoder weights (the same names: both are THUDM's code)."""
    from diffsynth.models.kolors_text_encoder import ChatGLMConfig, ChatGLMModel
    from diffusers.pipelines.kolors.text_encoder import ChatGLMModel as OurChatGLM

    ours = OurChatGLM.from_pretrained(tiny_model / "text_encoder", torch_dtype=torch.float32)
    config = {k: v for k, v in TINY_TEXT_ENCODER_CONFIG.items() if not k.startswith(("_", "auto_map"))}
    model = ChatGLMModel(ChatGLMConfig(**{**config, "use_cache": True}), empty_init=False)
    model.load_state_dict(ours.state_dict(), strict=True)
    return model.eval()


@pytest.fixture(scope="module")
def reference(tiny_model: Path) -> Any:
    """DiffSynth's Kolors ``SDXLImagePipeline`` on the CPU in fp32, configured by its own ``fetch_models``."""
    from diffsynth.pipelines.sdxl_image import SDXLImagePipeline
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(tiny_model / "vae", torch_dtype=torch.float32)
    decoded: dict[str, torch.Tensor] = {}

    def vae_decoder(latents: torch.Tensor, **_: Any) -> torch.Tensor:
        # DiffSynth's SDXLVAEDecoder divides by the scaling factor itself (models/sd_vae_decoder.py line 100)
        decoded["latents"] = latents.clone()
        return vae.decode(latents / vae.config.scaling_factor).sample

    pipe = SDXLImagePipeline(device="cpu", torch_dtype=torch.float32)
    pipe.fetch_models(
        _Models(kolors_text_encoder=diffsynth_chatglm(tiny_model), sdxl_unet=object(), sdxl_vae_decoder=vae_decoder)
    )
    sampler = ref("story.sampler")  # what fetch_models built must be what the fixture cites
    assert type(pipe.scheduler).__name__ == sampler["class"]
    assert pipe.scheduler.num_train_timesteps == sampler["num_train_timesteps"]
    pipe.decoded = decoded
    return pipe


def _our_scheduler(spec: StorySpec, config: dict[str, Any]) -> Any:
    scheduler = make_scheduler(spec.scheduler, config)
    scheduler.set_timesteps(timesteps=sampler_timesteps(spec.scheduler, spec.steps, config))
    return scheduler


def _model_scheduler_config(tiny_model: Path) -> dict[str, Any]:
    from diffusers import DDPMScheduler

    return dict(DDPMScheduler.load_config(tiny_model, subfolder="scheduler"))


def test_the_default_sampler_is_diffsynths_kolors_ddim_and_ends_clean(reference: Any, tiny_model: Path) -> None:
    """σ at every point of DiffSynth's grid for the reference's step count, then σ 0 (DDIM steps to alpha 1
    after its last point, ddim.py lines 72-76), and the start: x_T = the noise itself."""
    spec = DEFAULT.spec.story
    ddim = reference.scheduler
    ddim.set_timesteps(ref("story.num_inference_steps"))
    ours = _our_scheduler(spec, _model_scheduler_config(tiny_model))
    assert ours.timesteps.tolist() == ddim.timesteps.tolist()

    def sigma(alpha: float) -> float:
        return math.sqrt((1 - alpha) / alpha)

    expected = [sigma(ddim.alphas_cumprod[int(t)]) for t in ddim.timesteps] + [0.0]
    np.testing.assert_allclose(ours.sigmas.numpy(), expected, rtol=2e-6)
    last = ddim.num_train_timesteps - 1
    assert float(ours.init_noise_sigma) == pytest.approx(1 / math.sqrt(ddim.alphas_cumprod[last]), rel=1e-6)
    record = sampler_record(tiny_model, spec, "cpu")
    assert record["timesteps"] == [int(t) for t in ddim.timesteps] and record["final_sigma"] == 0


def test_euler_on_the_reference_grid_is_diffsynths_ddim_step_for_step(reference: Any, tiny_model: Path) -> None:
    """A synthetic denoiser through DiffSynth's ``EnhancedDDIMScheduler.step`` (the reference's step count) and
    our default sampler."""
    ddim = reference.scheduler
    ddim.set_timesteps(ref("story.num_inference_steps"))
    ours = _our_scheduler(DEFAULT.spec.story, _model_scheduler_config(tiny_model))
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(4, 4, generator=gen, dtype=torch.float64) / 2
    clean = torch.rand(1, 4, 8, 8, generator=gen, dtype=torch.float64) * 2 - 1
    noise = torch.randn(1, 4, 8, 8, generator=gen, dtype=torch.float64)

    def denoiser(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """An epsilon-predictor that knows the clean sample, plus a smooth nonlinear error."""
        alpha = ddim.alphas_cumprod[int(t)]
        eps = (x - math.sqrt(alpha) * clean) / math.sqrt(1 - alpha)
        return eps + 0.1 * torch.tanh(torch.einsum("ij,bjhw->bihw", weight, x))

    x_ref = noise.clone()
    for t in ddim.timesteps:
        x_ref = ddim.step(denoiser(x_ref, t), t.unsqueeze(0), x_ref)
    x = noise * ours.init_noise_sigma
    for t in ours.timesteps:
        x = ours.step(denoiser(ours.scale_model_input(x, t), t), t, x).prev_sample
    assert x_ref.abs().max().item() < 3  # a clean-sample-sized result, not noise
    assert (x - x_ref).abs().max().item() < 1e-5


def _tiny_unet_as_lets_dance_xl(unet: torch.nn.Module) -> Any:
    """``lets_dance_xl`` (diffsynth/pipelines/dancer.py line 119) is DiffSynth's full-size UNet body: the tiny
    diffusers UNet takes its place, fed exactly the tensors DiffSynth's loop hands it."""

    def call(_unet: Any, *, sample: torch.Tensor, timestep: torch.Tensor, add_time_id: torch.Tensor,
             add_text_embeds: torch.Tensor, encoder_hidden_states: torch.Tensor, **_: Any) -> torch.Tensor:
        return unet(
            sample,
            timestep,
            encoder_hidden_states=encoder_hidden_states,
            added_cond_kwargs={"text_embeds": add_text_embeds, "time_ids": add_time_id.reshape(sample.shape[0], -1)},
        ).sample

    return call


@pytest.mark.parametrize("frame", [1, 3])
def test_the_story_pipeline_draws_what_diffsynths_pipeline_draws(
    reference: Any, tiny_model: Path, monkeypatch: pytest.MonkeyPatch, frame: int
) -> None:
    """Frame N as the resolved manifest asks for it (prompt, negative prompt, seed, cfg, steps, sampler) through
    our ``render``, against ``SDXLImagePipeline.__call__`` with the notebook's call for that frame, at 64² fp32
    on the CPU. Frame 3 carries a negative-prompt addition."""
    import diffsynth.pipelines.sdxl_image as sdxl_image

    spec = _small(DEFAULT.spec.story)
    pipe = load_story_pipeline(tiny_model, spec, lora_dir=None, device="cpu")
    job = plan_jobs(spec)[frame - 1]
    ours = render(pipe, [job], spec, output_type="latent")[0]
    ours_image = np.asarray(render(pipe, [job], spec)[0], dtype=np.int16)

    monkeypatch.setattr(sdxl_image, "lets_dance_xl", _tiny_unet_as_lets_dance_xl(pipe.unet))
    call = ref("story.frames")[frame - 1]
    torch.manual_seed(call["seed"])  # the notebook: torch.manual_seed(seed); pipe(...)
    image = reference(
        call["prompt"], negative_prompt=call["negative_prompt"], cfg_scale=ref("story.cfg_scale"),
        num_inference_steps=ref("story.num_inference_steps"), height=SIZE, width=SIZE,
        progress_bar_cmd=lambda x: x,
    )
    theirs = reference.decoded["latents"][0]
    # fp32 through 100 UNet calls of a random (not denoising, so |latents| ~ 60) model: 1e-5 relative.
    assert (ours - theirs).abs().max().item() <= 1e-5 * theirs.abs().max().item()
    # DiffSynth truncates to uint8 (ref story.to_uint8), diffusers rounds: at most one level apart.
    assert ref("story.to_uint8") == "truncate"
    assert np.abs(ours_image - np.asarray(image, dtype=np.int16)).max() <= 1


def test_prompt_token_ids_and_embeddings_match_kolors_prompter(reference: Any, tiny_model: Path) -> None:
    """Every frame's prompt and negative prompt as the manifest has them, through our encoder, against
    ``KolorsPrompter.encode_prompt`` (prompters/kolors_prompter.py lines 324-352: 256 tokens, left padded,
    ``hidden_states[-2]``, pooled = last token of the last layer) on the notebook's texts."""
    spec = DEFAULT.spec.story
    pipe = load_story_pipeline(tiny_model, spec, lora_dir=None, device="cpu")
    jobs = plan_jobs(spec)
    texts = encode_texts(pipe, jobs, "cpu")
    prompter = reference.prompter
    calls = ref("story.frames")
    assert len(jobs) == len(calls)
    for job, call in zip(jobs, calls, strict=True):
        for ours_text, their_text in ((job.prompt, call["prompt"]), (job.negative_prompt, call["negative_prompt"])):
            ours_ids = pipe.tokenizer(ours_text, padding="max_length", max_length=256, truncation=True).input_ids
            their_ids = prompter.tokenizer(their_text, padding="max_length", max_length=256, truncation=True).input_ids
            assert ours_ids == their_ids
            pooled, embeds = prompter.encode_prompt(their_text, device="cpu")
            assert torch.allclose(texts[ours_text].embeds, embeds[0], atol=1e-6, rtol=1e-5)
            assert torch.allclose(texts[ours_text].pooled, pooled[0], atol=1e-6, rtol=1e-5)


# ------------------------------------------------------------------------------------------- training


def test_training_noise_schedule_add_noise_and_target_match_diffsynth(reference: Any, tiny_model: Path) -> None:
    """Training uses DDPM from the model's config; DiffSynth's trainer uses its Kolors DDIM scheduler after
    ``set_timesteps(1100)`` (ref train.timesteps), ``add_noise`` and ``training_target`` (ddim.py lines
    87-101), t uniform over every timestep."""
    from diffusers import DDPMScheduler

    ddpm = DDPMScheduler.from_config(_model_scheduler_config(tiny_model))
    ddim = reference.scheduler
    np.testing.assert_allclose(ddpm.alphas_cumprod.numpy(), np.array(ddim.alphas_cumprod), rtol=1e-6)
    ddim.set_timesteps(ref("train.timesteps")["set_timesteps"])
    assert sorted(int(t) for t in ddim.timesteps) == list(range(ddpm.config.num_train_timesteps))
    gen = torch.Generator().manual_seed(0)
    latents, noise = torch.randn(2, 1, 4, 8, 8, generator=gen)
    for t in (0, 1, 549, 1098, 1099):
        step = torch.tensor([t])
        ours = ddpm.add_noise(latents, noise, step)
        assert torch.allclose(ours, ddim.add_noise(latents, noise, step.float()), atol=1e-6)
        assert ddpm.config.prediction_type == "epsilon"
        assert torch.equal(ddim.training_target(latents, noise, step), noise)  # our target: noise (epsilon)


def test_the_training_latent_is_diffsynths_vae_encoder_output(tmp_path: Path) -> None:
    """DiffSynth's ``SDXLVAEEncoder`` (models/sd_vae_encoder.py line 74: the posterior mean, times its scaling
    factor) and our ``cache_latents`` + ``make_batch`` with the manifest's switches, on one full-size SDXL VAE
    with random weights loaded into both through DiffSynth's own state-dict converter."""
    from diffsynth.models.sdxl_vae_encoder import SDXLVAEEncoder
    from diffusers import AutoencoderKL

    from kolors_job.data.images import ImageItem, load_image
    from kolors_job.models.configs import KOLORS_VAE_CONFIG
    from kolors_job.models.prompts import PromptEmbeds
    from kolors_job.train.data import SampleStream, make_batch
    from kolors_job.train.latents import cache_latents

    torch.manual_seed(0)
    vae = AutoencoderKL(**KOLORS_VAE_CONFIG).eval()
    encoder = SDXLVAEEncoder().eval()
    state, _ = SDXLVAEEncoder.state_dict_converter().from_diffusers(vae.state_dict())
    encoder.load_state_dict(state, strict=True)
    item = ImageItem(oracle.reference_image(tmp_path / "a.png"), "二次元", 1537, 1100)
    t = DEFAULT.spec.train
    switches = {"exif_orientation": t.exif_orientation, "jpeg_reencode": t.jpeg_reencode}
    latents = cache_latents(vae, [item], resolution=SIZE, center_crop=t.center_crop, flips=(False,), seed=t.seed,
                            device="cpu", dtype=torch.float32, resize_filter=t.resize_filter, **switches)
    batch = make_batch(
        [0], SampleStream(1, t.seed, t.data_order), [item], latents, {"二次元": PromptEmbeds(torch.zeros(1), torch.zeros(1))},
        num_train_timesteps=1100, scaling_factor=vae.config.scaling_factor, caption_dropout=0.0, random_flip=False,
        latent=t.latent, time_ids=t.time_ids,
    )
    pixels, _ = load_image(item, SIZE, t.center_crop, False, None, t.resize_filter, **switches)
    with torch.no_grad():
        theirs = encoder(pixels[None])[0]
    assert batch.latents[0].shape == theirs.shape
    assert (batch.latents[0] - theirs).abs().max().item() <= 1e-5 * theirs.abs().max().item()


def test_the_training_tensor_is_diffsynth_1_1_9_datasets_on_the_re_encoded_file(tmp_path: Path) -> None:
    """DiffSynth 1.1.9's ``TextImageDataset`` run on the file the reference's data step writes (the fixture's
    JPEG passes) equals our tensor from the original file, for a size where 1.1.9's rounding of the long side
    and the 2024-08 floor agree (1537x1100 is where they do not: see ``training_image``)."""
    from diffsynth.data.simple_text_image import TextImageDataset
    from PIL import Image

    from kolors_job.data.images import ImageItem, load_image

    rng = np.random.default_rng(0)
    src = tmp_path / "a.png"
    Image.fromarray(rng.integers(0, 256, (150, 100, 3), dtype=np.uint8)).save(src)  # 64 * 150 / 100 = 96 exactly
    data = tmp_path / "train"
    data.mkdir()
    image = Image.open(src).convert("RGB")
    for _ in range(ref("train.jpeg_reencode")["times"]):
        image.save(data / "0.jpg")
        image = Image.open(data / "0.jpg")
    (data / "metadata.csv").write_text("file_name,text\n0.jpg,二次元\n", encoding="utf-8")
    theirs = TextImageDataset(str(tmp_path), steps_per_epoch=1, height=SIZE, width=SIZE, center_crop=True)[0]["image"]
    t = DEFAULT.spec.train
    ours, _ = load_image(ImageItem(src, "二次元", 100, 150), SIZE, t.center_crop, False, None, t.resize_filter,
                         exif_orientation=t.exif_orientation, jpeg_reencode=t.jpeg_reencode)
    assert ours.shape == theirs.shape and (ours - theirs).abs().max().item() < 1e-6


# ---------------------------------------------------------------------------------------------- LoRA


def _write_lora(tiny_model: Path, out: Path, ratio: float) -> Path:
    """A LoRA shaped as the manifest trains it (rank, alpha, targets), whose update at the manifest's sampling
    scale is ``ratio`` of each weight's norm (a real trained LoRA's updates are small: ~1e-3): the bench's
    reference check writes its LoRAs so."""
    from diffusers import UNet2DConditionModel

    from bench.reference_check import write_lora

    unet = UNet2DConditionModel.from_pretrained(tiny_model / "unet", torch_dtype=torch.float32)
    return write_lora(unet, out, ratio, spec=DEFAULT.spec.train, scale=DEFAULT.spec.story.lora_scale)


@pytest.fixture(scope="module")
def small_lora(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write_lora(tiny_model, tmp_path_factory.mktemp("small-lora"), 1e-3)


def test_lora_effective_scale_at_sampling_is_the_references(tiny_model: Path, small_lora: Path) -> None:
    """The story loads the trained file at the manifest's ``lora_scale``: its branch is scaled as the
    reference's ``LoraConfig(r=16, lora_alpha=2.0)`` injection scales it."""
    spec = DEFAULT.spec.story
    pipe = load_story_pipeline(tiny_model, spec, lora_dir=None, device="cpu")
    apply_lora(pipe, small_lora, spec.lora_scale)
    q = pipe.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1.to_q
    load = ref("story.lora_at_sampling")
    assert q.scaling[ADAPTER_NAME] == pytest.approx(load["alpha"] / load["rank"])


def _retention(unet_path: Path, lora: Path, dtype: torch.dtype, scale: float) -> float:
    """The fraction of the LoRA update that survives being fused into ``dtype`` weights (1 = all of it)."""
    from diffusers import KolorsPipeline

    ref = KolorsPipeline.from_pretrained(unet_path, torch_dtype=torch.float32)
    ref.load_lora_weights(str(lora), weight_name=LORA_WEIGHT_NAME, adapter_name="x")
    ref.fuse_lora(components=["unet"], lora_scale=scale, adapter_names=["x"])
    ref.unload_lora_weights()
    exact = dict(ref.unet.named_parameters())
    base = KolorsPipeline.from_pretrained(unet_path, torch_dtype=torch.float32).unet
    low = KolorsPipeline.from_pretrained(unet_path, torch_dtype=dtype)
    low.load_lora_weights(str(lora), weight_name=LORA_WEIGHT_NAME, adapter_name="x")
    low.fuse_lora(components=["unet"], lora_scale=scale, adapter_names=["x"])
    low.unload_lora_weights()
    kept, total = 0.0, 0.0
    for name, w0 in base.named_parameters():
        delta = exact[name] - w0
        if delta.abs().max() == 0:
            continue
        got = dict(low.unet.named_parameters())[name].float() - w0.to(dtype).float()
        kept += float((got * delta).sum().detach())
        total += float((delta * delta).sum().detach())
    return kept / total


def test_fused_lora_keeps_its_effect_in_fp16_not_in_bf16(tiny_model: Path, small_lora: Path) -> None:
    """Why the LoRA is fused only in fp16/fp32: at ‖ΔW‖/‖W‖ ≈ 1e-3 fp16 keeps it, bf16 rounds much of it away."""
    scale = DEFAULT.spec.story.lora_scale
    fp16 = _retention(tiny_model, small_lora, torch.float16, scale)
    bf16 = _retention(tiny_model, small_lora, torch.bfloat16, scale)
    assert fp16 > 0.95 and bf16 < 0.8, (fp16, bf16)
    cuda = torch.device("cuda")
    assert fuses_lora(cuda, sampling_dtype(cuda, DEFAULT.spec.story.precision))  # the default: fp16, fused
    assert not fuses_lora(cuda, sampling_dtype(cuda, "bf16"))


def _unet_output(tiny_model: Path, lora: Path | None, precision: str, fused: bool) -> torch.Tensor:
    """One UNet call of the story pipeline as built for ``precision``/``fused`` (fused: LoRA merged, q/k/v
    fused, channels-last — the CUDA default path), on fixed random inputs."""
    from kolors_job.render.pipeline import to_device

    spec = _small(DEFAULT.spec.story).model_copy(update={"precision": precision})
    pipe = load_story_pipeline(tiny_model, spec, lora_dir=lora, device="cpu", fused=fused)
    to_device(pipe, spec, "cpu", fused=fused)
    gen = torch.Generator().manual_seed(0)
    dtype = pipe.unet.dtype
    sample = torch.randn(2, 4, SIZE // 8, SIZE // 8, generator=gen).to(dtype)
    embeds = torch.randn(2, 256, TINY_TEXT_ENCODER_CONFIG["hidden_size"], generator=gen).to(dtype)
    pooled = torch.randn(2, TINY_TEXT_ENCODER_CONFIG["hidden_size"], generator=gen).to(dtype)
    time_ids = torch.tensor([[SIZE, SIZE, 0, 0, SIZE, SIZE]] * 2, dtype=torch.float32)
    with torch.no_grad():
        return pipe.unet(
            sample, torch.tensor([500.0, 500.0]), encoder_hidden_states=embeds,
            added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids},
        ).sample.float()


def test_fused_fp16_lora_draws_the_unfused_lora(tiny_model: Path, tmp_path: Path) -> None:
    """The CUDA default path (fp16, LoRA fused, q/k/v fused, channels-last) against the unfused peft LoRA in
    fp16 and the exact fp32 LoRA, on the CPU: fusing adds no error beyond fp16's own rounding."""
    lora = _write_lora(tiny_model, tmp_path / "lora", 5e-2)
    exact = _unet_output(tiny_model, lora, "fp32", fused=False)
    effect = (exact - _unet_output(tiny_model, None, "fp32", fused=False)).abs().mean().item()
    unfused = (_unet_output(tiny_model, lora, "fp16", fused=False) - exact).abs().mean().item()
    fused = (_unet_output(tiny_model, lora, "fp16", fused=True) - exact).abs().mean().item()
    assert effect > 5 * unfused, (effect, unfused)  # the LoRA is visible above fp16's rounding
    assert fused <= 1.5 * unfused, (fused, unfused)
