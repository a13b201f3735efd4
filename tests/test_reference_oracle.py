"""Oracle tests: our defaults against DiffSynth-Studio 1.1.9's own code, the engine of the reference workflow.

DiffSynth's Kolors classes hard-code the full model sizes, so its *models* cannot run tiny; everything around
them does. The full sampling loop below is ``SDXLImagePipeline.__call__`` itself (its noise, prompt encoding
through ``KolorsPrompter`` and DiffSynth's own ChatGLM class, time ids, CFG combine, ``EnhancedDDIMScheduler``
configured by its own ``fetch_models``), with only its UNet body (``lets_dance_xl``) and VAE decoder replaced
by the tiny diffusers modules our pipeline uses. Where a reference function is reproduced instead of called,
the file and line are cited. Each test reads our *defaults* (``StorySpec()``, ``TrainSpec()``), so a default
that drifts from the reference fails here.
"""

from __future__ import annotations

import ast
import inspect
import math
from pathlib import Path
from typing import Any

import diffsynth  # in the lock: a missing oracle must fail, not skip
import numpy as np
import pytest
import torch

from kolors_job.generate import (
    ADAPTER_NAME,
    apply_lora,
    encode_texts,
    fuses_lora,
    load_story_pipeline,
    plan_jobs,
    render,
    sampler_record,
    sampling_dtype,
)
from kolors_job.manifest import StorySpec, TrainSpec
from kolors_job.models import make_scheduler, sampler_timesteps
from kolors_job.tiny import TINY_TEXT_ENCODER_CONFIG, build_tiny_kolors
from kolors_job.train import LORA_WEIGHT_NAME, resolve_precision

DIFFSYNTH = Path(diffsynth.__file__).parent
SIZE = 64  # DiffSynth rounds sizes up to multiples of 64 (pipelines/base.py line 20)
REFERENCE_LOAD_ALPHA = 2.0
"""The reference notebook loads its r16 / α4 LoRA with ``LoraConfig(r=16, lora_alpha=2.0, ...)``."""


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
    pipe.decoded = decoded
    return pipe


# --------------------------------------------------------------------------------------------- sampling


def _our_scheduler(spec: StorySpec, config: dict[str, Any]) -> Any:
    scheduler = make_scheduler(spec.scheduler, config)
    scheduler.set_timesteps(timesteps=sampler_timesteps(spec.scheduler, spec.steps, config))
    return scheduler


def _model_scheduler_config(tiny_model: Path) -> dict[str, Any]:
    from diffusers import DDPMScheduler

    return dict(DDPMScheduler.load_config(tiny_model, subfolder="scheduler"))


def test_default_sampler_visits_diffsynths_kolors_ddim_grid_and_ends_clean(reference: Any, tiny_model: Path) -> None:
    spec = StorySpec()
    ddim = reference.scheduler  # EnhancedDDIMScheduler(beta_end=0.014, num_train_timesteps=1100): sdxl_image.py:68
    ddim.set_timesteps(spec.steps)
    ours = _our_scheduler(spec, _model_scheduler_config(tiny_model))
    assert ours.timesteps.tolist() == ddim.timesteps.tolist()
    assert ddim.timesteps[0] == 1099 and ddim.timesteps[-1] == 0 and len(ddim.timesteps) == 50  # for the reader

    def sigma(alpha: float) -> float:
        return math.sqrt((1 - alpha) / alpha)

    # DDIM (eta 0) steps t -> next grid point, and from the last one to alpha 1 (ddim.py lines 72-76): sigma 0.
    expected = [sigma(ddim.alphas_cumprod[int(t)]) for t in ddim.timesteps] + [0.0]
    np.testing.assert_allclose(ours.sigmas.numpy(), expected, rtol=2e-6)
    # DiffSynth starts from x_T = noise (sdxl_image.py line 154): Euler's x/sqrt(sigma^2+1) must be that.
    assert float(ours.init_noise_sigma) == pytest.approx(1 / math.sqrt(ddim.alphas_cumprod[1099]), rel=1e-6)

    record = sampler_record(tiny_model, spec, "cpu")
    assert record["timesteps"] == [int(t) for t in ddim.timesteps] and record["final_sigma"] == 0


def test_euler_on_the_reference_grid_is_diffsynths_ddim_step_for_step(reference: Any, tiny_model: Path) -> None:
    """A synthetic denoiser through DiffSynth's ``EnhancedDDIMScheduler.step`` and our default sampler."""
    spec = StorySpec()
    ddim = reference.scheduler
    ddim.set_timesteps(spec.steps)
    ours = _our_scheduler(spec, _model_scheduler_config(tiny_model))
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


def _frame_one(spec: StorySpec) -> tuple[str, str, int]:
    frame = spec.frames[0]
    return frame.prompt, spec.negative_for(frame), frame.seed


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


def test_the_story_pipeline_draws_what_diffsynths_pipeline_draws(
    reference: Any, tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Frame 1 with every sampling default (sampler, 50 steps, cfg 4, negative prompt, seed) at 64²: our
    ``render`` against ``SDXLImagePipeline.__call__`` (noise, KolorsPrompter, time ids, CFG, DDIM), fp32 CPU."""
    import diffsynth.pipelines.sdxl_image as sdxl_image

    spec = StorySpec(width=SIZE, height=SIZE)
    pipe = load_story_pipeline(tiny_model, spec, lora_dir=None, device="cpu")
    job = plan_jobs(spec)[0]
    ours = render(pipe, [job], spec, output_type="latent")[0]
    ours_image = np.asarray(render(pipe, [job], spec)[0], dtype=np.int16)

    monkeypatch.setattr(sdxl_image, "lets_dance_xl", _tiny_unet_as_lets_dance_xl(pipe.unet))
    prompt, negative, seed = _frame_one(spec)
    image = reference(
        prompt, negative_prompt=negative, cfg_scale=spec.cfg_scale, num_inference_steps=spec.steps,
        height=spec.height, width=spec.width, seed=seed, progress_bar_cmd=lambda x: x,
    )
    ref = reference.decoded["latents"][0]
    # fp32 through 100 UNet calls of a random (not denoising, so |latents| ~ 60) model: 1e-5 relative.
    assert (ours - ref).abs().max().item() <= 1e-5 * ref.abs().max().item()
    # DiffSynth truncates to uint8 (pipelines/base.py line 41), diffusers rounds: at most one level apart.
    assert np.abs(ours_image - np.asarray(image, dtype=np.int16)).max() <= 1


def test_cfg_combine_is_diffsynths() -> None:
    """DiffSynth: ``nega + cfg * (posi - nega)`` (sdxl_image.py line 209); diffusers' KolorsPipeline does the
    same on the chunked batch. Checked on the pipeline's own source, then on numbers through its guidance."""
    from diffusers.pipelines.kolors import pipeline_kolors

    source = inspect.getsource(pipeline_kolors.KolorsPipeline.__call__)
    assert "noise_pred_uncond + self.guidance_scale * (noise_pred_text - noise_pred_uncond)" in source
    assert "noise_pred_nega + cfg_scale * (noise_pred_posi - noise_pred_nega)" in (
        DIFFSYNTH / "pipelines" / "sdxl_image.py"
    ).read_text()


# -------------------------------------------------------------------------------------------- prompts


def test_prompt_token_ids_and_embeddings_match_kolors_prompter(reference: Any, tiny_model: Path) -> None:
    """``KolorsPrompter.encode_prompt`` (prompters/kolors_prompter.py lines 324-352: 256 tokens, left padded,
    ``hidden_states[-2]``, pooled = last token of the last layer) with DiffSynth's ChatGLM class vs ours."""
    spec = StorySpec()
    pipe = load_story_pipeline(tiny_model, spec, lora_dir=None, device="cpu")
    jobs = plan_jobs(spec)[:3]
    texts = encode_texts(pipe, jobs, "cpu")
    prompter = reference.prompter
    for text in {t for j in jobs for t in (j.prompt, j.negative_prompt)}:
        ref_ids = prompter.tokenizer(text, padding="max_length", max_length=256, truncation=True).input_ids
        ours_ids = pipe.tokenizer(text, padding="max_length", max_length=256, truncation=True).input_ids
        assert ours_ids == ref_ids
        pooled, embeds = prompter.encode_prompt(text, device="cpu")
        assert torch.allclose(texts[text].embeds, embeds[0], atol=1e-6, rtol=1e-5)
        assert torch.allclose(texts[text].pooled, pooled[0], atol=1e-6, rtol=1e-5)


# ------------------------------------------------------------------------------------------- training


def test_training_noise_schedule_add_noise_and_target_match_diffsynth(reference: Any, tiny_model: Path) -> None:
    """Training uses DDPM from the model's config; DiffSynth's trainer uses its Kolors DDIM scheduler after
    ``set_timesteps(1100)`` (examples/train/kolors/train_kolors_lora.py), ``add_noise`` and ``training_target``
    (ddim.py lines 87-101), t uniform over every timestep (trainers/text_to_image.py lines 79-80)."""
    from diffusers import DDPMScheduler

    ddpm = DDPMScheduler.from_config(_model_scheduler_config(tiny_model))
    ddim = reference.scheduler
    np.testing.assert_allclose(ddpm.alphas_cumprod.numpy(), np.array(ddim.alphas_cumprod), rtol=1e-6)
    ddim.set_timesteps(1100)
    assert sorted(int(t) for t in ddim.timesteps) == list(range(ddpm.config.num_train_timesteps))
    gen = torch.Generator().manual_seed(0)
    latents, noise = torch.randn(2, 1, 4, 8, 8, generator=gen)
    for t in (0, 1, 549, 1098, 1099):
        step = torch.tensor([t])
        ours = ddpm.add_noise(latents, noise, step)
        assert torch.allclose(ours, ddim.add_noise(latents, noise, step.float()), atol=1e-6)
        assert ddpm.config.prediction_type == "epsilon"
        assert torch.equal(ddim.training_target(latents, noise, step), noise)  # our target: noise (epsilon)


def _diffsynth_default(path: Path, function: str, argument: str) -> Any:
    """A keyword default read from DiffSynth's source (its trainer imports lightning, which is not installed)."""
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and node.name == function:
            names = [a.arg for a in node.args.args][-len(node.args.defaults):]
            return ast.literal_eval(node.args.defaults[names.index(argument)])
    raise AssertionError(f"{function} not in {path}")


def test_training_defaults_are_the_reference_trainers() -> None:
    """DiffSynth's trainer (trainers/text_to_image.py): LoRA A init ``gaussian`` (line 37; the Kolors example
    never passes another), plain ``torch.optim.AdamW(params, lr)`` (line 100), Lightning ``16-mixed`` (line 181)
    with no gradient clipping (``pl.Trainer`` gets no ``gradient_clip_val``, lines 298-307)."""
    trainer = DIFFSYNTH / "trainers" / "text_to_image.py"
    spec = TrainSpec()
    assert spec.init_lora_weights == _diffsynth_default(trainer, "add_lora_to_model", "init_lora_weights")
    assert spec.learning_rate == _diffsynth_default(trainer, "__init__", "learning_rate")
    adamw = inspect.signature(torch.optim.AdamW).parameters
    assert spec.weight_decay == adamw["weight_decay"].default
    assert "gradient_clip_val" not in trainer.read_text() and spec.max_grad_norm is None
    assert "16-mixed" in trainer.read_text() and spec.precision == "auto"
    assert resolve_precision(spec.precision, torch.device("cuda")) == "fp16"


# ---------------------------------------------------------------------------------------------- LoRA


def _make_lora(tiny_model: Path, out: Path, ratio: float) -> Path:
    """A default-shaped LoRA whose update at the default sampling scale is ``ratio`` of each weight's norm
    (a real trained LoRA's updates are small: ~1e-3) — the GPU check's own writer, on the tiny UNet."""
    from diffusers import UNet2DConditionModel

    from bench.reference_check import write_lora

    unet = UNet2DConditionModel.from_pretrained(tiny_model / "unet", torch_dtype=torch.float32)
    return write_lora(unet, out, ratio)


@pytest.fixture(scope="module")
def small_lora(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _make_lora(tiny_model, tmp_path_factory.mktemp("small-lora"), 1e-3)


def test_lora_effective_scale_at_sampling_is_the_references(tiny_model: Path, small_lora: Path) -> None:
    """The reference injects the α-4 LoRA with ``lora_alpha=2.0`` at r 16: its branch is scaled by 2/16."""
    spec, train = StorySpec(), TrainSpec()
    pipe = load_story_pipeline(tiny_model, spec, lora_dir=None, device="cpu")
    apply_lora(pipe, small_lora, spec.lora_scale)
    q = pipe.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1.to_q
    assert q.scaling[ADAPTER_NAME] == pytest.approx(REFERENCE_LOAD_ALPHA / train.rank)


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
    scale = StorySpec().lora_scale
    fp16 = _retention(tiny_model, small_lora, torch.float16, scale)
    bf16 = _retention(tiny_model, small_lora, torch.bfloat16, scale)
    assert fp16 > 0.95 and bf16 < 0.8, (fp16, bf16)
    cuda = torch.device("cuda")
    assert fuses_lora(cuda, sampling_dtype(cuda, StorySpec().precision))  # the default: fp16, fused
    assert not fuses_lora(cuda, sampling_dtype(cuda, "bf16"))


def _unet_output(tiny_model: Path, lora: Path | None, precision: str, fused: bool) -> torch.Tensor:
    """One UNet call of the story pipeline as built for ``precision``/``fused`` (fused: LoRA merged, q/k/v
    fused, channels-last — the CUDA default path), on fixed random inputs."""
    from kolors_job.generate import to_device

    spec = StorySpec(width=SIZE, height=SIZE, precision=precision)
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
    lora = _make_lora(tiny_model, tmp_path / "lora", 5e-2)
    exact = _unet_output(tiny_model, lora, "fp32", fused=False)
    effect = (exact - _unet_output(tiny_model, None, "fp32", fused=False)).abs().mean().item()
    unfused = (_unet_output(tiny_model, lora, "fp16", fused=False) - exact).abs().mean().item()
    fused = (_unet_output(tiny_model, lora, "fp16", fused=True) - exact).abs().mean().item()
    assert effect > 5 * unfused, (effect, unfused)  # the LoRA is visible above fp16's rounding
    assert fused <= 1.5 * unfused, (fused, unfused)


def test_training_image_with_reference_switches_is_diffsynths(reference: Any, tmp_path: Path) -> None:
    """``resize_filter: bilinear`` + centre crop: the tensor DiffSynth's ``TextImageDataset`` makes
    (data/simple_text_image.py lines 16-36); ``time_ids: target``: its ``prepare_extra_input`` (sdxl_image.py
    line 107) for the crop's latent."""
    from diffsynth.data.simple_text_image import TextImageDataset
    from PIL import Image

    from kolors_job.dataset import ImageItem, load_image
    from kolors_job.embeddings import LatentEntry, PromptEmbeds
    from kolors_job.train import SampleStream, make_batch

    rng = np.random.default_rng(0)
    (tmp_path / "train").mkdir()
    Image.fromarray(rng.integers(0, 256, (150, 100, 3), dtype=np.uint8)).save(tmp_path / "train" / "a.png")
    (tmp_path / "train" / "metadata.csv").write_text("file_name,text\na.png,二次元\n", encoding="utf-8")
    ref = TextImageDataset(str(tmp_path), steps_per_epoch=1, height=SIZE, width=SIZE, center_crop=True)[0]["image"]
    item = ImageItem(tmp_path / "train" / "a.png", "二次元", 100, 150)
    ours, time_ids = load_image(item, SIZE, center_crop=True, flip=False, resize_filter="bilinear")
    assert ours.shape == ref.shape and (ours - ref).abs().max().item() < 1e-6
    lanczos, _ = load_image(item, SIZE, center_crop=True, flip=False)
    assert (lanczos - ref).abs().max().item() > 0.01  # the default filter is a real difference

    entry = LatentEntry(mean=torch.zeros(4, SIZE // 8, SIZE // 8), std=torch.ones(4, SIZE // 8, SIZE // 8),
                        time_ids=time_ids)
    batch = make_batch(
        [0], SampleStream(1, 0), [item], {(0, False): entry}, {"二次元": PromptEmbeds(torch.zeros(1), torch.zeros(1))},
        num_train_timesteps=1100, scaling_factor=1.0, caption_dropout=0.0, random_flip=False, time_ids="target",
    )
    expected = reference.prepare_extra_input(torch.zeros(1, 4, SIZE // 8, SIZE // 8))["add_time_id"]
    assert batch.time_ids.flatten().tolist() == expected.tolist()
