"""``spec.train``: the LoRA training recipe (the reference's values are the defaults) and its validation."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from kolors_job.manifest.fields import Strict

__all__ = ["Precision", "TrainSpec", "ValidationSpec"]


Precision = Literal["auto", "bf16", "fp16", "fp32"]


class ValidationSpec(Strict):
    """Watch the style arrive: at checkpoints, draw some story frames with the LoRA so far and score them."""

    every: int | None = Field(None, ge=0)
    """Validate every N optimizer steps (a multiple of ``checkpoint_every``; the last step always counts).
    ``null``: every checkpoint (``checkpoint_every``); ``0`` turns validation off."""
    frames: list[int] = Field(default_factory=lambda: [1, 8], min_length=1, max_length=64)
    """1-based story frame indices, each drawn with its own prompt, negative prompt and seed."""
    steps: int = Field(20, ge=1, le=1000)
    """Sampling steps of a validation frame (the story's sampler, cfg, size and LoRA scale otherwise)."""


class TrainSpec(Strict):
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
