"""The job manifest: a typed, validated description of one LoRA-story job.

Defaults are the reference "Kolors-LoRA style story" workflow's: the challenge notebook's story and
settings, trained as DiffSynth-Studio's Kolors trainer did when the notebook ran it (2024-08). So a manifest
with only ``spec.output.uri`` is the notebook's job, automated. ``spec.recipe: tuned`` swaps in kolors-job's
own choices (:mod:`kolors_job.manifest.recipe`), each still settable on its own. tests/test_reference_oracle.py checks
the resolved defaults against the reference's own sources (tests/reference/). Unknown fields are errors: a
typo such as ``rnak: 4`` must fail loudly, not silently train with rank 16.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    GetPydanticSchema,
    PlainValidator,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from kolors_job import storage
from kolors_job.core.errors import ManifestError, StorageNotFoundError
from kolors_job.core.redact import holds_secret, without_query
from kolors_job.core.uris import HUB_SCHEMES, TINY_SCHEME, check_hub_uri, scheme_of
from kolors_job.export.registry import default_format_names, dora_refusal, format_names
from kolors_job.manifest.recipe import REFERENCE_TRAIN_VAE, RecipeName, fill_switches
from kolors_job.models.loading import SCHEDULERS

API_VERSION = "kolors-job/v1"
KIND = "LoraStoryJob"
MAX_MANIFEST_BYTES = 1 << 20  # 1 MiB: a manifest is a page of YAML, not a data file
MAX_PROMPT_CHARS = 2000
JOB_ID_PATTERN = r"^[a-z0-9]([a-z0-9._-]{0,61}[a-z0-9])?$"


REFERENCE_NEGATIVE = "丑陋、变形、嘈杂、模糊、低对比度"


class _Strict(BaseModel):
    model_config = ConfigDict(
        extra="forbid", str_max_length=100_000, validate_default=True, use_attribute_docstrings=True
    )


def source_schemes() -> tuple[str, ...]:
    """Every scheme a model or dataset source may use: the hubs, each storage backend, ``tiny``."""
    return (*HUB_SCHEMES, *storage.schemes(), TINY_SCHEME)


def _check_uri(value: str, schemes: tuple[str, ...], *, allow_path: bool = True) -> str:
    """``value`` if it is a local path or a well-formed URI of one of ``schemes`` (the storage registry is
    asked at validation time, so a registered backend's scheme is accepted)."""
    if "\x00" in value:
        raise ValueError("must not contain NUL bytes")
    if not value.strip():
        raise ValueError("must not be empty")
    scheme = scheme_of(value)
    if not scheme:
        if not allow_path:
            raise ValueError(f"must be a URI with one of the schemes {', '.join(s + '://' for s in schemes)}")
        return value
    if scheme not in schemes:
        raise ValueError(
            f"unsupported scheme {scheme!r}; use one of {', '.join(s + '://' for s in schemes)}"
            + (" or a local path" if allow_path else "")
        )
    rest = value.split("://", 1)[1]
    if scheme in HUB_SCHEMES:
        check_hub_uri(scheme, rest)
    elif storage.backend(scheme) is not None:
        storage.check_uri(scheme, rest)
    return value


ModelUri = Annotated[str, Field(max_length=2048)]


def _no_credentials(value: str) -> str:
    """Free text is written into the outputs as given (resolved manifest, prompts.json, the submission):
    one holding a credential is refused here, never masked there (masking would change the job)."""
    if holds_secret(value):
        raise ValueError(
            "holds a credential (a URL with user:password@, a signed-URL or token parameter, or the value of "
            "a secret environment variable); remove it: this text is written into the outputs as given"
        )
    return value


FreeText = Annotated[str, AfterValidator(_no_credentials)]
"""Prompts, captions, labels: any text, but no credential (see ``_no_credentials``)."""


class ModelSpec(_Strict):
    base: ModelUri = "modelscope://Kwai-Kolors/Kolors-diffusers"
    """Kolors in diffusers layout: ``modelscope://`` or ``hf://`` repo, a bucket prefix, a local/mounted dir,
    or ``tiny://kolors``."""
    vae: ModelUri | None = None
    """Optional VAE override, e.g. ``modelscope://AI-ModelScope/sdxl-vae-fp16-fix`` for fp16 decode."""
    train_vae: ModelUri | None = REFERENCE_TRAIN_VAE
    """The VAE that encodes the *training* images only (the story decodes with ``vae`` or the model's own).
    The reference's: ``sdxl-vae-fp16-fix``, which DiffSynth's Kolors trainer encodes with, in fp16. ``null``:
    the story's VAE (recipe ``tuned``), in fp32 when training in fp16 unless its config says fp16 is safe."""

    @field_validator("base", "vae", "train_vae")
    @classmethod
    def _uri(cls, v: str | None) -> str | None:
        return None if v is None else _check_uri(v, source_schemes())


class CaptionSpec(_Strict):
    fixed: FreeText | None = Field("二次元", max_length=MAX_PROMPT_CHARS)
    """Caption for every image (the reference uses "二次元"). ``null`` reads captions from
    ``metadata.csv`` / ``metadata.jsonl`` (``file_name,text``) or per-image ``.txt`` sidecars."""
    prefix: FreeText = Field("", max_length=200)
    """Prepended to every caption (a trigger word)."""
    max_chars: int = Field(512, ge=1, le=MAX_PROMPT_CHARS)
    """Longer captions are cut (and counted in the report); ChatGLM sees at most 256 tokens anyway."""
    dropout: float = Field(0.0, ge=0.0, le=1.0)
    """Probability of training on the empty caption (encoded, not zeroed), for CFG robustness."""


class FilterSpec(_Strict):
    min_width: int = Field(1024, ge=1, le=65536)
    """Skip images narrower than this many pixels (the reference's data-juicer ``image_shape_filter``)."""
    min_height: int = Field(1024, ge=1, le=65536)
    """Skip images shorter than this many pixels (the reference's data-juicer ``image_shape_filter``)."""
    aspect_ratio: tuple[float, float] = (0.5, 2.0)
    """Keep images whose width/height lies in [low, high] (data-juicer's image_aspect_ratio_filter)."""
    max_pixels: int = Field(64_000_000, ge=1, le=2**28)
    """Decompression-bomb cap: larger images are skipped, never decoded."""
    max_images: int | None = Field(None, ge=1)
    """Keep at most this many images, the first that pass in sorted path order; ``null``: all."""

    @field_validator("aspect_ratio")
    @classmethod
    def _ratio(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not (0 < v[0] <= v[1]):
            raise ValueError("must be [low, high] with 0 < low <= high")
        return v


class DatasetSpec(_Strict):
    source: ModelUri = "modelscope://AI-ModelScope/lowres_anime"
    """``modelscope://`` or ``hf://`` dataset id, a bucket prefix, or a local directory of images."""
    subset: str = "default"
    """Hub dataset subset (ModelScope's ``subset_name``; the reference loads ``default``)."""
    split: str = "train"
    """Hub dataset split whose files are fetched (the reference trains on ``train``)."""
    caption: CaptionSpec = CaptionSpec()
    """Where each image's caption comes from."""
    filters: FilterSpec = FilterSpec()
    """Which images are kept for training; every skipped file is counted by reason in the report."""
    repeats: int = Field(1, ge=1, le=10_000)
    """How many times each of this dataset's images counts when samples are drawn (kohya's ``num_repeats``):
    an image of a dataset with ``repeats: 3`` is drawn three times as often as one with ``repeats: 1``, and
    an epoch (``train.steps: null``) holds it three times."""
    buckets: bool = False
    """Aspect-ratio buckets (SDXL's): instead of a ``resolution``² centre crop, each image is resized to
    cover, and cropped to, its nearest bucket — a size of about ``resolution``² pixels in 64-px steps whose
    aspect ratio lies within ``filters.aspect_ratio`` — and conditioned on its original size and crop
    offset; every batch holds one bucket's images. ``false`` (the reference): the square crop."""

    @field_validator("source")
    @classmethod
    def _uri(cls, v: str) -> str:
        return _check_uri(v, source_schemes())


def _dataset_kind(value: Any) -> str | None:
    if isinstance(value, (list, tuple)):
        return DATASET_LIST_TAG
    return DATASET_TAG if isinstance(value, (dict, DatasetSpec)) else None


DATASET_TAG, DATASET_LIST_TAG = "one-dataset", "dataset-list"
"""The union's tags (pydantic puts them in error locations; ``format_validation_error`` leaves them out)."""

Datasets = Annotated[
    Annotated[DatasetSpec, Tag(DATASET_TAG)]
    | Annotated[Annotated[list[DatasetSpec], Field(min_length=1, max_length=64)], Tag(DATASET_LIST_TAG)],
    Discriminator(
        _dataset_kind, custom_error_type="dataset_type",
        custom_error_message="must be a mapping (one dataset) or a list of them",
    ),
]
"""One dataset (a mapping, as always), or a list of them, each with its own source, filters, captions,
``repeats`` and ``buckets``."""

Precision = Literal["auto", "bf16", "fp16", "fp32"]


class ValidationSpec(_Strict):
    """Watch the style arrive: at checkpoints, draw some story frames with the LoRA so far and score them."""

    every: int | None = Field(None, ge=0)
    """Validate every N optimizer steps (a multiple of ``checkpoint_every``; the last step always counts).
    ``null``: every checkpoint (``checkpoint_every``); ``0`` turns validation off."""
    frames: list[int] = Field(default_factory=lambda: [1, 8], min_length=1, max_length=64)
    """1-based story frame indices, each drawn with its own prompt, negative prompt and seed."""
    steps: int = Field(20, ge=1, le=1000)
    """Sampling steps of a validation frame (the story's sampler, cfg, size and LoRA scale otherwise)."""


class TrainSpec(_Strict):
    rank: int = Field(16, ge=1, le=1024)
    """LoRA rank r (the reference: 16; the organisers suggest 16 for a style, 4 for a subject)."""
    alpha: float = Field(4.0, gt=0)
    """LoRA alpha: the update is scaled by alpha / rank (the reference trains with 4)."""
    learning_rate: float = Field(1e-4, gt=0, le=1.0)
    """AdamW learning rate (the reference: 1e-4)."""
    steps: int | None = Field(500, ge=1, le=10_000_000)
    """Optimizer steps. ``null`` trains ``epochs`` passes over the data instead."""
    epochs: int = Field(1, ge=1, le=100_000)
    """Passes over the data when ``steps`` is ``null``."""
    batch_size: int = Field(1, ge=1, le=1024)
    """Images per optimizer step on each process (the effective batch also multiplies by
    ``gradient_accumulation`` and the number of DDP ranks)."""
    gradient_accumulation: int = Field(1, ge=1, le=1024)
    """Micro-batches accumulated into one optimizer step."""
    resolution: int = Field(1024, ge=64, le=4096, multiple_of=8)
    """Training images are resized (short side) and cropped to this square size, in pixels."""
    center_crop: bool = True
    """Crop the centre of each resized image (the reference); ``false`` crops at a random place."""
    random_flip: bool = False
    """Flip training images left-right at random (off in the reference)."""
    resize_filter: Literal["lanczos", "bilinear"] = "bilinear"
    """The filter that resizes a training image's short side to ``resolution``: ``bilinear`` is the
    reference's (torchvision's ``Resize(res, BILINEAR)`` on the PIL image, its long side rounded down, as
    DiffSynth's dataset does); ``lanczos`` (recipe ``tuned``) keeps more of the detail when downscaling."""
    latent: Literal["sample", "mean"] = "mean"
    """What a training image becomes each step: the posterior's mean (the reference: DiffSynth's VAE encoder
    returns it), or a fresh draw from its VAE posterior (``tuned``)."""
    time_ids: Literal["crop", "target"] = "target"
    """SDXL's size conditioning in training: ``target``, always ``(res, res, 0, 0, res, res)`` like the
    reference (DiffSynth's ``prepare_extra_input`` reads the cropped latent's size); ``crop`` (``tuned``),
    each image's real size and crop offset (SDXL's design: sampling then asks for an uncropped image)."""
    data_order: Literal["random", "shuffle"] = "random"
    """Which image each sample is: ``random``, an independent uniform draw (with replacement) per sample, as
    DiffSynth's dataset picks one per item; ``shuffle`` (``tuned``), a fresh permutation per epoch, so every
    image is seen once an epoch. Both are pure functions of (seed, sample index): resume and DDP agree."""
    exif_orientation: bool = False
    """Turn images as their EXIF orientation says (as a viewer shows them; ``tuned``), for the filters and
    for training. The reference does not: its data step re-saves every image without EXIF and its dataset
    reads the pixels as stored."""
    jpeg_reencode: int = Field(2, ge=0, le=4)
    """Times each training image is saved as JPEG at PIL's default quality (after ``convert("RGB")``) and
    read back before it is resized: 2 is the reference's data step (``N.jpg``, then its filtered copy);
    0 (``tuned``) trains on the original bytes."""
    precision: Precision = "auto"
    """``auto``: fp16 mixed precision on CUDA (GradScaler, fp32 LoRA weights), like the reference's Lightning
    ``16-mixed``; fp32 on CPU. ``bf16`` trades the GradScaler for bf16's range."""
    gradient_checkpointing: Literal["auto", "on", "off"] = "auto"
    """``auto``: on only when the memory plan says the step does not fit without it (~2× slower steps)."""
    target_modules: list[str] = Field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"], min_length=1)
    """The UNet attention projections that get a LoRA (the reference: q, k, v and out)."""
    init_lora_weights: Literal["default", "gaussian"] = "gaussian"
    """peft's init of LoRA A (B starts at zero either way): ``gaussian`` (std 1/rank) is what DiffSynth's Kolors
    trainer hard-coded when the notebook ran it (``add_lora_to_model``, 2024-07-26 to 2024-10-11); from then on
    to 1.1.9 its ``--init_lora_weights`` defaults to ``kaiming``, which is ``default`` here (peft's
    Kaiming-uniform)."""
    optimizer: Literal["adamw", "adamw8bit", "prodigy"] = "adamw"
    """``adamw`` (the reference; fused on CUDA), ``adamw8bit`` (bitsandbytes: 8-bit moments, a quarter of
    AdamW's optimizer memory) or ``prodigy`` (``prodigyopt``: Adam with a step size it estimates itself;
    ``learning_rate`` then scales that estimate, so set it to about 1.0)."""
    weight_decay: float = Field(1e-2, ge=0)
    """AdamW's decoupled weight decay (torch's default 1e-2, as the reference leaves it)."""
    loss_weighting: Literal["none", "min_snr"] = "none"
    """``none``: the plain mean squared error (the reference). ``min_snr``: Min-SNR-γ weighting (Hang et al.
    2023) as diffusers' trainers compute it: each sample's error times min(SNR(t), γ) / SNR(t) (÷ (SNR(t) + 1)
    for a v-prediction model), the SNR from the model's own noise schedule (``diffusers.training_utils.
    compute_snr``), so the many low-noise timesteps no longer dominate the gradient."""
    snr_gamma: float = Field(5.0, gt=0, le=1000)
    """γ of ``loss_weighting: min_snr`` (5 is the paper's and diffusers' recommendation); unused otherwise."""
    noise_offset: float = Field(0.0, ge=0, le=1.0)
    """Adds this times a per-sample, per-channel N(0, 1) constant to the training noise (diffusers'
    ``--noise_offset``), so the LoRA can learn images darker or brighter on average than the base model
    draws; 0 (the reference) adds nothing and draws nothing."""
    dora: bool = False
    """Train a DoRA (peft's ``use_dora``: a learned per-output-row magnitude on top of the low-rank
    direction) instead of a plain LoRA. Only the ``diffusers`` LoRA file can carry it; asking for another
    format in ``output.lora_formats`` is refused, and the default formats shrink to those that can."""
    ema: bool = False
    """Keep an exponential moving average of the LoRA weights (diffusers' ``EMAModel``); the exported LoRA,
    the story and validation frames use the average, checkpoints carry it, and resume continues it."""
    ema_decay: float = Field(0.9999, gt=0, lt=1)
    """The EMA's decay cap; as ``EMAModel`` does, step ``n`` uses min(decay, (1 + n) / (10 + n)), so a
    short LoRA run averages over its recent steps rather than staying at the initial weights."""
    max_grad_norm: float | None = Field(None, gt=0)
    """Clip the gradient norm to this; ``null`` (the reference, Lightning's default) never clips. The norm is
    logged every step either way."""
    lr_scheduler: Literal["constant", "constant_with_warmup", "cosine", "linear"] = "constant"
    """diffusers' learning-rate schedule by name; ``constant`` with ``warmup_steps`` warms up first."""
    warmup_steps: int = Field(0, ge=0)
    """Steps over which the learning rate ramps up from 0."""
    seed: int = Field(0, ge=0, le=2**32 - 1)
    """Seed of everything random in training (noise, timesteps, crops, flips, LoRA init)."""
    checkpoint_every: int = Field(100, ge=1)
    """Save a checkpoint (the resume source, and a validation point) every this many steps."""
    validation: ValidationSpec = ValidationSpec()
    """Validation frames drawn at checkpoints while training."""
    log_with: list[Literal["tensorboard", "wandb"]] = Field(default_factory=lambda: ["tensorboard"])
    """accelerate's trackers: TensorBoard event files under ``<job>/logs/tensorboard/``; ``wandb`` only when
    listed (it then needs its own credentials and network)."""
    select: Literal["last", "best_aesthetic"] = "last"
    """Which checkpoint the story and the exported LoRA use: the last step (the reference), or the one whose
    validation frames scored the highest mean aesthetic (needs validation on)."""

    @model_validator(mode="after")
    def _warmup(self) -> TrainSpec:
        if self.steps is not None and self.warmup_steps > self.steps:
            raise ValueError("warmup_steps must not exceed steps")
        if self.validation.every and self.validation.every % self.checkpoint_every:
            raise ValueError("validation.every must be a multiple of checkpoint_every (validation runs at checkpoints)")
        if self.select == "best_aesthetic" and not self.validation_every:
            raise ValueError("select: best_aesthetic needs validation (validation.every is 0)")
        return self

    @property
    def validation_every(self) -> int:
        """Steps between validations; 0 when off."""
        every = self.validation.every
        return self.checkpoint_every if every is None else every
    compile: bool = False
    """``torch.compile`` the UNet's repeated blocks (default mode); the compile cache lives on the cache volume."""
    memory: Literal["auto", "manual"] = "auto"
    """``auto``: the memory plan (``kolors-job plan``) of the visible card chooses gradient checkpointing (when
    ``auto``), the micro-batch and accumulation (same effective batch), where ChatGLM encodes, the VAE's batches,
    fp16 on a card without bf16 and the story's batch, so every stage fits 90 % of the card; a job that cannot fit
    stops before any download (exit 4). ``manual``: the settings as written, only judged."""
    allow_adamw8bit: bool = False
    """Let ``memory: auto`` switch AdamW to bitsandbytes' 8-bit AdamW when nothing else makes the step fit."""


class Frame(_Strict):
    prompt: FreeText = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    """What the frame shows (Chinese or English; ChatGLM reads up to 256 tokens)."""
    seed: int = Field(0, ge=0, le=2**32 - 1)
    """Seed of this frame's starting noise (each frame has its own generator)."""
    negative_prompt: FreeText | None = Field(None, max_length=MAX_PROMPT_CHARS)
    """Replaces the story's negative prompt for this frame."""
    negative_prompt_extra: FreeText | None = Field(None, max_length=MAX_PROMPT_CHARS)
    """Appended to the story's negative prompt with "，" (the reference does this on frames 3 and 4)."""


def _reference_frames() -> list[Frame]:
    """The challenge notebook's eight frames, in its order (sources: tests/reference/reference.yaml)."""
    rows = [
        ("二次元，一个紫色短发小女孩，在家中沙发上坐着，双手托着腮，很无聊，全身，粉色连衣裙", 0, None),
        (
            "二次元，日系动漫，演唱会的观众席，人山人海，一个紫色短发小女孩穿着粉色吊带漏肩连衣裙坐在演唱会的观众席，"
            "舞台上衣着华丽的歌星们在唱歌",
            1,
            None,
        ),
        ("二次元，一个紫色短发小女孩穿着粉色吊带漏肩连衣裙坐在演唱会的观众席，露出憧憬的神情", 2, "色情擦边"),
        (
            "二次元，一个紫色短发小女孩穿着粉色吊带漏肩连衣裙，对着流星许愿，闭着眼睛，十指交叉，侧面",
            5,
            "扭曲的手指，多余的手指",
        ),
        ("二次元，一个紫色中等长度头发小女孩穿着粉色吊带漏肩连衣裙，在练习室练习唱歌", 0, None),
        ("二次元，一个紫色长发小女孩穿着粉色吊带漏肩连衣裙，在练习室练习唱歌，手持话筒", 1, None),
        ("二次元，紫色长发少女，穿着黑色连衣裙，试衣间，心情忐忑", 7, None),
        ("二次元，紫色长发少女，穿着黑色礼服，连衣裙，在台上唱歌", 0, None),
    ]
    return [Frame(prompt=p, seed=s, negative_prompt_extra=x) for p, s, x in rows]


def registered_name(names: Callable[[], Iterable[str]]) -> Any:
    """A ``str`` that must be one of ``names()`` *at validation time* — a registry's keys, so an entry added
    after import (a plugin, a test) counts — refused with the error, and listed in the JSON Schema with the
    enum, a ``Literal`` of the names would give."""

    def check(value: Any) -> str:
        current = list(names())
        if isinstance(value, str) and value in current:
            return value
        quoted = [repr(n) for n in current]
        expected = quoted[0] if len(quoted) == 1 else f"{', '.join(quoted[:-1])} or {quoted[-1]}"
        raise PydanticCustomError("literal_error", "Input should be {expected}", {"expected": expected})

    return Annotated[
        str,
        PlainValidator(check),
        GetPydanticSchema(get_pydantic_json_schema=lambda _s, _h: {"enum": [*names()], "type": "string"}),
    ]


Scheduler = registered_name(lambda: SCHEDULERS)  # one list: the sampler table's names
SamplingPrecision = Literal["auto", "fp16", "bf16", "fp32"]


class StorySpec(_Strict):
    negative_prompt: FreeText = Field(REFERENCE_NEGATIVE, max_length=MAX_PROMPT_CHARS)
    """What every frame should not show (each frame may replace or extend it)."""
    cfg_scale: float = Field(4.0, ge=0.0, le=50.0)
    """Classifier-free guidance scale (the reference: 4)."""
    steps: int = Field(50, ge=1, le=1000)
    """Denoising steps per frame (the reference: 50)."""
    width: int = Field(1024, ge=64, le=4096, multiple_of=8)
    """Frame width in pixels (a multiple of 8)."""
    height: int = Field(1024, ge=64, le=4096, multiple_of=8)
    """Frame height in pixels (a multiple of 8)."""
    scheduler: Scheduler = "reference"
    """``reference``: DiffSynth's Kolors DDIM grid (1099, 1077, ..., 22, 0, then fully clean), as the
    reference draws; ``euler`` is Kolors-diffusers' own sampler (leading grid 1079 ... 1). See ``models.SCHEDULERS``."""
    precision: SamplingPrecision = "auto"
    """``auto``: fp16 on CUDA like the reference (the VAE decodes in fp32 unless it is an fp16-fix VAE), fp32 on
    CPU. The LoRA is fused into the weights only in fp16/fp32; in bf16 it stays a separate branch, since bf16's
    8-bit mantissa rounds small weight updates away."""
    lora_scale: float = Field(0.5, ge=0.0, le=4.0)
    """0.5 reproduces the reference, which trains with α 4 but loads with α 2 (halving the LoRA)."""
    frames: list[Frame] = Field(default_factory=_reference_frames, min_length=8, max_length=64)
    """The story: at least 8 frames (the challenge asks for 8), each a prompt + seed."""
    best_of: int = Field(1, ge=1, le=16)
    """Candidates per frame; the highest aesthetic score is kept, the rest go to images/candidates/."""
    batch_size: int = Field(8, ge=1, le=64)
    """Frames per pipeline call. Each frame keeps its own seeded generator, so a frame's noise never depends on
    the batch; its pixels may still differ by a colour level when drawn in another batch size (float sums in
    another order), which is why ``kolors-job sample`` redraws a story in the story's batch."""
    compile: bool = False
    """``torch.compile`` the UNet while drawing (CUDA only); the compile cache lives on the cache volume."""
    tiling: Literal["notebook", "lanczos"] = "notebook"
    """How ``story.jpg`` is made from the frames (4 rows of 2, resized to 1024×2048 either way): ``notebook``
    as the reference does it (each frame saved as ``N.jpg`` at PIL's default quality and read back, tiled
    with numpy, resized with PIL's default filter); ``lanczos`` (``tuned``) tiles the lossless frames and
    resizes with Lanczos."""

    def negative_for(self, frame: Frame) -> str:
        base = frame.negative_prompt if frame.negative_prompt is not None else self.negative_prompt
        return f"{base}，{frame.negative_prompt_extra}" if frame.negative_prompt_extra else base


class ScoreSpec(_Strict):
    aesthetic_model: ModelUri = "modelscope://AI-ModelScope/aesthetics-predictor-v2-sac-logos-ava1-l14-linearMSE"
    """The aesthetics-predictor-v2 (CLIP ViT-L/14 + linear head) that scores the frames: a hub repo,
    a bucket prefix, a local dir or ``tiny://aesthetic``."""
    threshold: float = Field(6.0, ge=0.0, le=10.0)
    """The challenge rejects a story whose mean aesthetic score is below this."""
    gate: bool = True
    """Fail the job (exit 3, no ``_SUCCESS``... but every file kept) when the mean is under the threshold."""

    @field_validator("aesthetic_model")
    @classmethod
    def _uri(cls, v: str) -> str:
        return _check_uri(v, source_schemes())


# one list: the export registry's names (like Scheduler above), checked and listed in the schema when used
LoraFormat = registered_name(format_names)


class OutputSpec(_Strict):
    uri: str = Field(max_length=2048)
    """Where ``<job id>/`` goes: ``oss://bucket/prefix/``, ``s3://bucket/prefix/``, ``file://`` or a path."""
    job_id: str | None = Field(None, pattern=JOB_ID_PATTERN)
    """Defaults to ``metadata.name``; the CLI's ``--job-id`` overrides both."""
    lora_formats: list[LoraFormat] = Field(default_factory=lambda: list(default_format_names()), min_length=1)
    """LoRA file formats written to ``lora/`` (each registered export format; all by default)."""
    keep_checkpoints: int = Field(2, ge=1, le=1000)
    """Checkpoints kept in the output store; older ones are pruned, never the selected one."""
    modelscope_repo: str | None = Field(None, pattern=r"^[\w.-]+/[\w.-]+$")
    """Push the LoRA to this ModelScope model repo when the quality gate passes (token from the env)."""

    @field_validator("uri")
    @classmethod
    def _uri(cls, v: str) -> str:
        return _check_uri(v, storage.schemes())


class Spec(_Strict):
    recipe: RecipeName = "reference"
    """``reference``: every choice as the challenge notebook and DiffSynth's trainer made it (the story,
    bilinear resize, posterior mean, constant time ids, JPEG re-encoding, a random image per step, no EXIF
    turn, the fp16-fix VAE for encoding, notebook tiling); ``tuned``: kolors-job's own choices for those
    switches (README: "Differences from the reference"). A switch the manifest sets keeps its value."""
    model: ModelSpec = ModelSpec()
    """The base Kolors model (and an optional VAE)."""
    dataset: Datasets = DatasetSpec()
    """The training images: one dataset, or a list of datasets whose kept images train together (each
    drawn ``repeats`` times as often)."""
    train: TrainSpec = TrainSpec()
    """The LoRA training recipe."""
    story: StorySpec = StorySpec()
    """The story frames and how they are drawn."""
    score: ScoreSpec = ScoreSpec()
    """The aesthetic scoring and the quality gate."""
    output: OutputSpec
    """Where the job writes its outputs, and in which LoRA formats."""
    device: Literal["auto", "cuda", "cpu"] = "auto"
    """``auto``: the GPU when CUDA is usable — a full-size model (any hub or bucket one but ``tiny://``) without
    one stops before any network call (exit 4) unless ``--allow-cpu``; ``cpu``: run on the CPU on purpose (hours
    for a full-size job); ``cuda``: require a GPU."""

    @model_validator(mode="before")
    @classmethod
    def _recipe(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("recipe") in ("reference", "tuned"):
            return fill_switches(data, data["recipe"])
        return data

    @model_validator(mode="after")
    def _validation_frames(self) -> Spec:
        n = len(self.story.frames)
        if self.train.validation_every and any(not 1 <= i <= n for i in self.train.validation.frames):
            raise ValueError(f"train.validation.frames: indices must be story frames 1..{n}")
        return self

    @model_validator(mode="after")
    def _dora_formats(self) -> Spec:
        """A DoRA needs a LoRA file that carries its magnitudes: a format that cannot is refused when asked for
        by name, and left out of the default list (the resolved manifest then shows which remain)."""
        if not self.train.dora:
            return self
        refused = {name: why for name in self.output.lora_formats if (why := dora_refusal(name))}
        if not refused:
            return self
        if "lora_formats" in self.output.model_fields_set:
            name, why = next(iter(refused.items()))
            raise ValueError(f"output.lora_formats: {name!r} cannot carry a DoRA (train.dora): {why}")
        self.output.lora_formats = [f for f in self.output.lora_formats if f not in refused]
        if not self.output.lora_formats:
            raise ValueError("output.lora_formats: no default format can carry a DoRA (train.dora); name one")
        return self

    @property
    def datasets(self) -> list[DatasetSpec]:
        """``dataset`` as a list (one entry for the single-mapping form)."""
        return list(self.dataset) if isinstance(self.dataset, list) else [self.dataset]


class Metadata(_Strict):
    name: str = Field("kolors-lora-story", pattern=JOB_ID_PATTERN)
    """Lower-case DNS-label-like name; the default job id, so reruns find their own output."""
    labels: dict[str, Annotated[FreeText, Field(max_length=256)]] = Field(default_factory=dict, max_length=64)
    """Free-form ``key: value`` notes (e.g. who asked for the job); kept in ``manifest.resolved.yaml`` and
    report.json, not part of the manifest digest."""


class Manifest(_Strict):
    apiVersion: Literal["kolors-job/v1"] = API_VERSION  # noqa: N815 - Kubernetes-style field names
    """Manifest format version: always ``kolors-job/v1``."""
    kind: Literal["LoraStoryJob"] = KIND
    """Always ``LoraStoryJob``."""
    metadata: Metadata = Metadata()
    """The job's name (its default job id) and free-form labels."""
    spec: Spec
    """What to train, draw, score and where to write it; only ``spec.output.uri`` is required."""

    @property
    def job_id(self) -> str:
        return self.spec.output.job_id or self.metadata.name

    def resolved(self) -> dict[str, Any]:
        """The manifest as run: defaults filled, every value byte for byte as given — so the stored copy has
        this manifest's digest and a stopped job always resumes. Nothing needs masking: URIs with
        credentials or queries and free text holding one are refused at validation."""
        return self.model_dump(mode="json")

    def digest(self) -> str:
        """Identity of the job's *work* (not its output location): same digest ⇒ same results."""
        data = self.model_dump(mode="json")
        data["spec"]["output"].pop("uri", None)
        data["spec"]["output"].pop("job_id", None)
        data.pop("metadata", None)
        blob = json.dumps(data, sort_keys=True, ensure_ascii=False).encode()
        return hashlib.sha256(blob).hexdigest()

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.resolved(), allow_unicode=True, sort_keys=False)


# --------------------------------------------------------------------------------------------- loading


class _NoAliasLoader(yaml.SafeLoader):
    """Safe YAML without anchors/aliases: an alias bomb expands exponentially during validation."""

    def compose_node(self, parent: Any, index: Any) -> Any:  # type: ignore[override]
        if self.check_event(yaml.AliasEvent):
            mark = self.peek_event().start_mark
            raise ManifestError(f"manifest: line {mark.line + 1}: YAML aliases (*name) are not allowed")
        return super().compose_node(parent, index)

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:  # type: ignore[override]
        """A repeated key is an error: YAML would silently keep the last one."""
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, (str, int, float, bool)) and key in seen:
                raise ManifestError(f"manifest: line {key_node.start_mark.line + 1}: duplicate key {key!r}")
            if isinstance(key, (str, int, float, bool)):
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _loc(loc: tuple[Any, ...]) -> str:
    parts: list[str] = []
    for p in loc:
        if isinstance(p, int):
            parts.append(f"[{p}]")
        else:
            parts.append(("." if parts else "") + str(p))
    return "".join(parts) or "manifest"


def format_validation_error(err: ValidationError) -> list[str]:
    lines = []
    for e in err.errors(include_url=False):
        loc = tuple(
            x for x in e["loc"]
            if not (isinstance(x, str) and (x.startswith("function-") or x in (DATASET_TAG, DATASET_LIST_TAG)))
        )
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown field (check the spelling; see `kolors-job schema`)"
        elif e["type"] == "missing":
            msg = "required field is missing"
        msg = msg.removeprefix("Value error, ")
        lines.append(f"{_loc(loc)}: {msg}")
    return lines


def parse_manifest(raw: bytes | str, *, source: str = "manifest") -> Manifest:
    """Parse YAML/JSON text into a validated Manifest, raising ManifestError with one line per problem."""
    if isinstance(raw, str):
        raw = raw.encode("utf-8", "surrogatepass")
    if len(raw) > MAX_MANIFEST_BYTES:
        raise ManifestError(f"{source}: {len(raw)} bytes is larger than the {MAX_MANIFEST_BYTES}-byte limit")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ManifestError(f"{source}: not valid UTF-8 (byte {e.start})") from None
    if not text.strip():
        raise ManifestError(f"{source}: empty manifest; at least spec.output.uri is required")
    try:
        data = yaml.load(text, Loader=_NoAliasLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise ManifestError(f"{source}: invalid YAML: {where}{e.problem}") from None
    except yaml.YAMLError as e:
        raise ManifestError(f"{source}: invalid YAML: {str(e).splitlines()[0]}") from None
    except RecursionError:
        raise ManifestError(f"{source}: invalid YAML: nested too deeply") from None
    if data is None:
        raise ManifestError(f"{source}: empty manifest; at least spec.output.uri is required")
    if not isinstance(data, dict):
        raise ManifestError(f"{source}: must be a mapping with apiVersion/kind/metadata/spec")
    try:
        return Manifest.model_validate(data)
    except ValidationError as e:
        raise ManifestError(format_validation_error(e)) from None
    except RecursionError:
        raise ManifestError(f"{source}: nested too deeply") from None


def read_manifest_source(uri: str) -> tuple[bytes, str]:
    """Read manifest bytes from a path, ``file://``, ``s3://`` or ``oss://`` URI. A URI with a query (a signed
    URL) is refused without echoing it: storage URIs have no use for one."""
    scheme = scheme_of(uri)
    shown = without_query(uri) if scheme else uri
    if scheme and ("?" in uri or "#" in uri):
        raise ManifestError(f"{shown}: a manifest URI must not carry a query or fragment (a signed URL is not one)")
    if not scheme or ((b := storage.backend(scheme)) is not None and b.local):
        path = Path(uri[len(f"{scheme}://") :] if scheme else uri)
        return _read_regular_file(path, uri), str(path)
    try:
        scheme, bucket, key = storage.split_uri(uri)
    except ValueError as e:
        raise ManifestError(f"{shown}: {e}") from None
    key = key.rstrip("/")  # split_uri reads the path as a prefix and adds a slash
    if not key or uri.endswith("/"):
        raise ManifestError(f"{shown}: manifest URI must be a path or a {storage.listed_schemes()} object")
    parent, _, name = key.rpartition("/")
    store = storage.open_store(f"{scheme}://{bucket}/{parent}")
    try:
        if (size := store.size(name)) > MAX_MANIFEST_BYTES:  # a HEAD first: never read 50 MB to refuse it
            raise ManifestError(f"{shown}: {size} bytes is larger than the {MAX_MANIFEST_BYTES}-byte limit")
        return store.read_bytes(name), shown
    except StorageNotFoundError:  # a missing manifest is exit 2, wherever it was looked for
        raise ManifestError(f"{shown}: cannot read manifest: no such object") from None


def _read_regular_file(path: Path, uri: str) -> bytes:
    """Read at most the size limit from a regular file: a directory, FIFO or device is refused, not read."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as e:
        raise ManifestError(f"{uri}: cannot read manifest: {e.strerror}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ManifestError(f"{uri}: cannot read manifest: not a regular file")
    with os.fdopen(fd, "rb") as f:
        try:
            raw = f.read(MAX_MANIFEST_BYTES + 1)
        except OSError as e:
            raise ManifestError(f"{uri}: cannot read manifest: {e.strerror}") from None
    if len(raw) > MAX_MANIFEST_BYTES:
        raise ManifestError(f"{uri}: larger than the {MAX_MANIFEST_BYTES}-byte limit")
    return raw


def load_manifest(path_or_uri: str | None = None, *, environ: dict[str, str] | None = None) -> Manifest:
    """Load from ``--manifest``, else ``KOLORS_JOB_MANIFEST`` (inline), else ``KOLORS_JOB_MANIFEST_URI``."""
    env = os.environ if environ is None else environ
    if path_or_uri:
        raw, source = read_manifest_source(path_or_uri)
    elif env.get("KOLORS_JOB_MANIFEST"):
        raw, source = env["KOLORS_JOB_MANIFEST"].encode("utf-8", "surrogateescape"), "KOLORS_JOB_MANIFEST"
    elif env.get("KOLORS_JOB_MANIFEST_URI"):
        raw, source = read_manifest_source(env["KOLORS_JOB_MANIFEST_URI"])
    else:
        raise ManifestError("no manifest: pass --manifest, or set KOLORS_JOB_MANIFEST or KOLORS_JOB_MANIFEST_URI")
    return parse_manifest(raw, source=source)


def json_schema() -> dict[str, Any]:
    schema = Manifest.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "kolors-job manifest (kolors-job/v1 LoraStoryJob)"
    return schema
