"""What each stage of a job holds, for given memory settings: its GPU peak (a simulation's result plus what stays
resident beside it), host RAM and disk (arithmetic on the same parameter counts), and whether it fits the card.
:mod:`kolors_job.plan.planner` chooses the settings by asking this."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from kolors_job.manifest.buckets import bucket_sizes
from kolors_job.plan.cards import GIB, Card
from kolors_job.plan.simulate import Count, Denoise, ScoreImages, TextEncode, VaeDecode, VaeEncode
from kolors_job.plan.table import Results
from kolors_job.plan.train_step import TrainStep

if TYPE_CHECKING:
    from kolors_job.manifest.spec import Spec

__all__ = ["Choices", "Stage", "stages_of", "train_step_of", "training_size"]

PROCESS_HOST = 3 * GIB
"""Resident memory of the job's Python process with torch, CUDA and diffusers loaded, before any model."""


DATASET_DISK = {"modelscope://AI-ModelScope/lowres_anime": 1_500_000_000}
"""On-disk size of a known dataset (parquet shards + the exported images); others are not sized."""


PNG_BYTES_PER_PIXEL = 2.0
"""A story PNG at 1024² is ~2 MB."""


STORED_BYTES = {"fp16": 2, "bf16": 2, "fp32": 4}


MIXED_WEIGHTS = {"fp16": "fp16", "bf16": "bf16", "no": "fp32"}
"""accelerate's mixed precision → the frozen weights' dtype (``train.setup.weight_dtype_for``)."""


OPTIMIZER_BYTES = {"adamw": 8, "adamw8bit": 2, "prodigy": 16}
"""A checkpoint's optimizer state per LoRA value: AdamW's two fp32 moments, 8-bit AdamW's two bytes, Prodigy's
``s``, ``p0`` and two moments (``p0`` is a scalar for LoRA B, zero when the state is made: at most 16)."""


SIM_OPTIMIZER = {"adamw": "adamw_fused", "adamw8bit": "adamw8bit", "prodigy": "prodigy"}
"""``train.optimizer`` → the simulated one (``make_optimizer``: AdamW fused on CUDA)."""


@dataclass(frozen=True)
class Choices:
    """The memory settings a run uses (the manifest's, or what ``train.memory: auto`` chose)."""

    precision: str
    """accelerate's mixed precision for training: ``fp16``, ``bf16`` or ``no`` (fp32)."""
    gradient_checkpointing: bool
    batch_size: int
    """Micro-batch per forward/backward."""
    gradient_accumulation: int
    optimizer: str
    text_encoder: str
    """Where ChatGLM encodes: ``cuda`` or ``cpu`` (bf16 on the CPU: minutes, but no GPU memory)."""
    latent_batch: int
    """Images per VAE encode while caching latents."""
    story_precision: str
    story_batch_size: int
    vae_tiling: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        return (
            f"precision {self.precision}, gradient checkpointing {'on' if self.gradient_checkpointing else 'off'}, "
            f"batch {self.batch_size} × accumulation {self.gradient_accumulation}, {self.optimizer}, "
            f"ChatGLM on {self.text_encoder}, latent batch {self.latent_batch}, story {self.story_precision} in "
            f"batches of {self.story_batch_size}, VAE tiling {'on' if self.vae_tiling else 'off'}"
        )


@dataclass(frozen=True)
class Stage:
    name: str
    what: str
    gpu: int
    host: int
    disk: int
    budget: int

    @property
    def fits(self) -> bool:
        return self.gpu <= self.budget

    @property
    def shortfall(self) -> int:
        return max(0, self.gpu - self.budget)

    def verdict(self) -> str:
        return "fits" if self.fits else f"short by {self.shortfall / GIB:.2f} GiB"

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "what": self.what, "gpu_bytes": self.gpu, "host_bytes": self.host,
                "disk_bytes": self.disk, "fits": self.fits, "shortfall_bytes": self.shortfall}  # fmt: skip


def training_size(spec: Spec) -> tuple[int, int]:
    """The largest image (width, height) a training batch can hold: ``resolution``² from a dataset without buckets;
    from one with ``buckets``, its bucket of the most pixels (``manifest.buckets.bucket_sizes`` within its aspect
    filter; of equal areas the widest). Every activation of a UNet or VAE pass grows with the latent's area (the
    sides are multiples of 64, so no level rounds), so that bucket's step and encode peak the highest; buckets of
    one area peak alike (``test_plan``). A bucket never has more pixels than ``resolution``²."""
    res = spec.train.resolution
    sizes = [
        max(bucket_sizes(res, d.filters.aspect_ratio), key=lambda s: (s[0] * s[1], s[0])) if d.buckets else (res, res)
        for d in spec.datasets
    ]
    return max(sizes, key=lambda s: (s[0] * s[1], s == (res, res), s[0]))


def _bucket(spec: Spec) -> tuple[int, ...]:
    """The simulations' ``bucket``: empty for the square (the same simulation as without buckets)."""
    size = training_size(spec)
    return () if size == (spec.train.resolution,) * 2 else size


def train_step_of(spec: Spec, c: Choices) -> TrainStep:
    """The trainer's step with these choices and the manifest's training options."""
    t = spec.train
    return TrainStep(c.batch_size, t.resolution, MIXED_WEIGHTS[c.precision], c.precision, c.gradient_checkpointing,
                     t.rank, tuple(t.target_modules), SIM_OPTIMIZER[c.optimizer], dora=t.dora, ema=t.ema,
                     bucket=_bucket(spec))  # fmt: skip


def stages_of(spec: Spec, card: Card, c: Choices, results: Results, only: tuple[str, ...] = ()) -> list[Stage]:
    """Every stage of the job on the GPU, in order (``only``: just those, for the search)."""
    train, story = spec.train, spec.story
    want = set(only)

    def need(name: str) -> bool:
        return not want or name in want

    def count(part: str) -> int:
        return results.get(Count(part)).peak

    weights = MIXED_WEIGHTS[c.precision]
    lora = results.get(Count("lora", train.rank, tuple(train.target_modules), train.dora)).peak
    scorer = count("aesthetic") * 4  # fp32, on the device from training to the end
    te_files, unet_files, vae_files = count("text_encoder") * 2, count("unet") * 2, count("vae") * 2
    res = train.resolution
    bucket = _bucket(spec)
    width, height = bucket or (res, res)
    size = f"{width}×{height} (the largest bucket)" if bucket else f"{res}²"
    stages: list[Stage] = []

    def add(name: str, what: str, gpu: int, host: int, disk: int = 0) -> None:
        stages.append(Stage(name, what, gpu, PROCESS_HOST + host, disk, card.budget))

    if need("download"):
        sizes = [DATASET_DISK.get(d.source, 0) for d in spec.datasets]
        dataset = sum(sizes) if all(sizes) else 0
        files = te_files + unet_files + vae_files + count("aesthetic") * 4
        what = "model files + aesthetic predictor + dataset into the cache"
        add("download", what + ("" if dataset else " (dataset size not known)"), 0, 0, files + dataset)

    te_dtype = weights if c.text_encoder == "cuda" else "bf16"
    if need("encode"):
        enc = results.get(TextEncode(1, te_dtype)).peak if c.text_encoder == "cuda" else 0
        cpu_copy = count("text_encoder") * 2 if c.text_encoder == "cpu" else 0
        add("encode", f"ChatGLM3 {te_dtype} on {c.text_encoder}, 1 × 256 tokens per caption; aesthetic predictor "
            "loaded", enc + scorer, te_files + cpu_copy + count("aesthetic") * 4)  # fmt: skip

    # The VAE that encodes the training images: ``model.train_vae`` (the reference's sdxl-vae-fp16-fix), else the
    # story's. A VAE the manifest names is taken as fp16-safe (that is why one names it); the model's own overflows
    # in fp16 and encodes in fp32 (``train.data.vae_encode_dtype`` reads its ``force_upcast``).
    named_vae = spec.model.train_vae or spec.model.vae
    vae_dtype = "fp32" if c.precision == "fp16" and named_vae is None else weights
    if need("latents"):
        enc = results.get(VaeEncode(c.latent_batch, res, vae_dtype, bucket)).peak
        pixels = 2 * c.latent_batch * 3 * width * height * 4
        add("latents", f"VAE {vae_dtype} encodes {c.latent_batch} × {size} at a time (+0.5 MiB host per image)",
            enc + scorer, vae_files + pixels)  # fmt: skip

    step = train_step_of(spec, c)
    validating = bool(train.validation_every)
    vae_cpu = count("vae") * 4 if validating else 0
    if need("train"):
        r = results.get(step)
        n_ckpt = max(1, min(spec.output.keep_checkpoints, -(-(train.steps or 1) // train.checkpoint_every)))
        # a checkpoint: the LoRA, the optimizer's state; with EMA its averaged LoRA (ema/) and EMAModel's state
        state = lora * (4 + OPTIMIZER_BYTES[c.optimizer] + (8 if train.ema else 0))
        exports = lora * 4 * (len(spec.output.lora_formats) + 1)
        adapter = f"{'DoRA' if train.dora else 'LoRA'} r{train.rank} fp32" + (" + its EMA" if train.ema else "")
        add("train", f"UNet {weights}, {adapter}, {c.optimizer}, micro-batch {c.batch_size} at {size}, "
            f"checkpointing {'on' if c.gradient_checkpointing else 'off'}", r.peak + scorer, unet_files + vae_cpu,
            n_ckpt * state + exports)  # fmt: skip

    if validating and need("validation"):
        n_val = min(c.story_batch_size, len(train.validation.frames))
        state = results.get(step).start  # UNet + LoRA + optimizer state (+ EMA) stay on the device
        draw = results.get(Denoise(n_val, story.height, story.width, weights, "training", train.rank,
                                   tuple(train.target_modules), autocast=c.precision, dora=train.dora))  # fmt: skip
        dec = results.get(VaeDecode(n_val, story.height, story.width, "fp32", True))  # sliced, never tiled
        n_points = max(1, -(-(train.steps or 1) // train.validation_every))
        pngs = int(n_points * len(train.validation.frames) * story.width * story.height * PNG_BYTES_PER_PIXEL)
        add("validation", f"{n_val} frame(s) per call with the UNet being trained, VAE fp32 decodes one at a time",
            state + scorer + max(count("vae") * 4 + draw.transient, dec.peak), unet_files + vae_cpu, pngs)  # fmt: skip

    sp = c.story_precision
    te_story = sp if c.text_encoder == "cuda" else "bf16"
    if need("story.encode"):
        enc = results.get(TextEncode(1, te_story)).peak if c.text_encoder == "cuda" else 0
        host_copies = count("unet") * STORED_BYTES[sp] + (count("text_encoder") * 2 if c.text_encoder == "cpu" else 0)
        add("story.encode", f"ChatGLM3 {te_story} on {c.text_encoder}; the UNet waits on the host with the LoRA "
            "merged", enc + scorer, te_files + host_copies + count("vae") * STORED_BYTES[sp])  # fmt: skip

    lora_mode = "fused" if sp in ("fp16", "fp32") else "branch"
    denoise = Denoise(c.story_batch_size, story.height, story.width, sp, lora_mode, train.rank,
                      tuple(train.target_modules), fuse_qkv=lora_mode == "fused",
                      dora=train.dora and lora_mode == "branch")  # fmt: skip
    images = len(story.frames) * story.best_of
    png = int(images * story.width * story.height * PNG_BYTES_PER_PIXEL)
    if need("story.denoise"):
        r = results.get(denoise)
        add("story.denoise", f"UNet {sp} (LoRA {lora_mode}), {c.story_batch_size} image(s) × CFG at "
            f"{story.width}×{story.height}", r.peak + count("vae") * STORED_BYTES[sp] + scorer, 0, png)  # fmt: skip

    decode_dtype = "fp32" if sp == "fp16" and spec.model.vae is None else sp
    if need("story.decode"):
        unet = results.get(denoise).start
        dec = results.get(VaeDecode(c.story_batch_size, story.height, story.width, decode_dtype, True, c.vae_tiling))
        add("story.decode", f"VAE {decode_dtype} decodes {c.story_batch_size} image(s) one at a time"
            + (", in tiles" if c.vae_tiling else ""), unet + dec.peak + scorer, 0)  # fmt: skip

    if need("score"):
        add("score", "aesthetic predictor (CLIP ViT-L/14, fp32) alone", results.get(ScoreImages(1)).peak, 0)
    return stages
