"""The memory plan of a job on a card: every stage's GPU peak, host RAM and disk, a verdict each, and — with
``train.memory: auto`` — the settings that make the job fit.

GPU peaks come from simulations (:mod:`kolors_job.plan.simulate`, results kept by :mod:`kolors_job.plan.table`)
of the full-size Kolors as our code runs it, plus what stays resident beside each stage (the aesthetic predictor
from training on, the VAE while validating...). Host RAM and disk are arithmetic on the same parameter counts.
A stage fits when its peak is at most :attr:`Card.budget` (90 % of the card).

``auto`` chooses, in this order, the fastest settings that fit: the training precision (fp16 on a card without
bf16), ChatGLM on the GPU or (when even alone it cannot fit) the CPU, the VAE's latent-caching batch, then the
training step — no gradient checkpointing before checkpointing (2× slower steps), the largest micro-batch that
divides ``batch_size`` (accumulation makes up the effective batch), 8-bit AdamW only if
``train.allow_adamw8bit`` and only in place of ``adamw`` — then the story's batch (validation draws in it too) and
VAE tiling last (it changes pixels at tile seams). Settings the manifest pins (``gradient_checkpointing: on|off``,
``optimizer: adamw8bit|prodigy``) are kept; ``memory: manual`` keeps them all and only judges.

The training options are the user's and are never dropped; each only changes what is simulated (see
:class:`~kolors_job.plan.simulate.TrainStep`): ``dora``, ``ema`` and ``optimizer: prodigy`` the step (and the
state validation keeps beside its draws), ``dataset.buckets`` the size of the step and of latent caching — the
largest bucket (:func:`training_size`).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any

from kolors_job.aspect_buckets import bucket_sizes
from kolors_job.plan.cards import GIB, Card
from kolors_job.plan.simulate import (
    Count,
    Denoise,
    ScoreImages,
    TextEncode,
    TrainStep,
    VaeDecode,
    VaeEncode,
)
from kolors_job.plan.table import Results

if TYPE_CHECKING:
    from kolors_job.manifest import Manifest, Spec

__all__ = ["Choices", "Plan", "Stage", "plan_job", "training_size"]

PROCESS_HOST = 3 * GIB
"""Resident memory of the job's Python process with torch, CUDA and diffusers loaded, before any model."""
DATASET_DISK = {"modelscope://AI-ModelScope/lowres_anime": 1_500_000_000}
"""On-disk size of a known dataset (parquet shards + the exported images); others are not sized."""
PNG_BYTES_PER_PIXEL = 2.0
"""A story PNG at 1024² is ~2 MB."""
STORED_BYTES = {"fp16": 2, "bf16": 2, "fp32": 4}
MIXED_WEIGHTS = {"fp16": "fp16", "bf16": "bf16", "no": "fp32"}
"""accelerate's mixed precision → the frozen weights' dtype (``train_setup.weight_dtype_for``)."""
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


@dataclass
class Plan:
    card: Card
    choices: Choices
    stages: list[Stage]
    mode: str
    notes: list[str] = field(default_factory=list)

    @property
    def fits(self) -> bool:
        return all(s.fits for s in self.stages)

    @property
    def short(self) -> Stage | None:
        """The stage that misses by the most, if any."""
        misses = [s for s in self.stages if not s.fits]
        return max(misses, key=lambda s: s.shortfall) if misses else None

    @property
    def peak(self) -> int:
        return max(s.gpu for s in self.stages)

    def problem(self) -> str | None:
        """One line naming the stage and the shortfall; None when everything fits."""
        s = self.short
        if s is None:
            return None
        return (
            f"stage {s.name} ({s.what}) needs {s.gpu / GIB:.2f} GiB of GPU memory; the {self.card.describe()} "
            f"allows {self.card.budget / GIB:.2f} GiB: short by {s.shortfall / GIB:.2f} GiB"
        )

    def to_dict(self) -> dict[str, Any]:
        """report.json's ``memory`` section."""
        return {
            "card": self.card.name,
            "card_total_bytes": self.card.total,
            "card_free_bytes": self.card.free,
            "budget_bytes": self.card.budget,
            "mode": self.mode,
            "fits": self.fits,
            "peak_bytes": self.peak,
            "choices": self.choices.to_dict(),
            "stages": [s.to_dict() for s in self.stages],
            "notes": list(self.notes),
        }

    def table(self) -> str:
        head = "| stage | what | GPU GiB | host GiB | disk GB | verdict |\n|---|---|---:|---:|---:|---|"
        rows = [
            f"| {s.name} | {s.what} | {s.gpu / GIB:.2f} | {s.host / GIB:.1f} | {s.disk / 1e9:.2f} | {s.verdict()} |"
            for s in self.stages
        ]
        return "\n".join([head, *rows])


# ------------------------------------------------------------------------------------------------ the plan


def plan_job(manifest: Manifest, card: Card, results: Results) -> Plan:
    """The plan of ``manifest`` on ``card``: chosen settings (``train.memory: auto``) or the manifest's, judged."""
    spec = manifest.spec
    notes: list[str] = []
    base = _manifest_choices(spec, card, notes)
    if spec.train.memory == "auto":
        choices = _choose(spec, card, base, results)
    elif spec.train.gradient_checkpointing == "auto":  # manual, but checkpointing left to the plan
        off_fits = _stages(spec, card, base, results, only=("train",))[0].fits
        choices = replace(base, gradient_checkpointing=not off_fits)
    else:
        choices = base
    stages = _stages(spec, card, choices, results)
    if spec.train.compile or spec.story.compile:
        notes.append("compile is planned as eager: an upper bound (torch.compile saves less for backward)")
    return Plan(card, choices, stages, spec.train.memory, notes + _changes(spec, choices))


def _manifest_choices(spec: Spec, card: Card, notes: list[str]) -> Choices:
    """The manifest's own settings on this card (precision ``auto`` resolved as the trainer resolves it on CUDA)."""
    train, story = spec.train, spec.story
    precision = {"auto": "fp16", "fp32": "no"}.get(train.precision, train.precision)
    story_precision = "fp16" if story.precision == "auto" else story.precision
    if not card.bf16 and "bf16" in (precision, story_precision):
        if train.memory == "auto":
            notes.append(f"bf16 → fp16: the {card.name} has no bf16")
            precision = "fp16" if precision == "bf16" else precision
            story_precision = "fp16" if story_precision == "bf16" else story_precision
        else:
            notes.append(f"the {card.name} has no bf16: bf16 runs emulated (slow)")
    return Choices(
        precision=precision,
        gradient_checkpointing=train.gradient_checkpointing == "on",
        batch_size=train.batch_size,
        gradient_accumulation=train.gradient_accumulation,
        optimizer=train.optimizer,
        text_encoder="cuda",
        latent_batch=8,
        story_precision=story_precision,
        story_batch_size=story.batch_size,
        vae_tiling=False,
    )


def _choose(spec: Spec, card: Card, c: Choices, results: Results) -> Choices:
    def fit(choices: Choices, *names: str) -> bool:
        return all(s.fits for s in _stages(spec, card, choices, results, only=names))

    if not fit(c, "encode", "story.encode"):
        c = replace(c, text_encoder="cpu")
    c = _first(c, [replace(c, latent_batch=b) for b in (8, 4, 2, 1)], lambda x: fit(x, "latents"))
    train = spec.train
    ckpts = [False, True] if train.gradient_checkpointing == "auto" else [train.gradient_checkpointing == "on"]
    # 8-bit AdamW replaces AdamW only, never Prodigy (a different optimizer the manifest chose)
    optimizers = [train.optimizer] + (["adamw8bit"] if train.allow_adamw8bit and train.optimizer == "adamw" else [])
    total = train.batch_size * train.gradient_accumulation

    def step(ck: bool, b: int, o: str) -> Choices:
        return replace(c, gradient_checkpointing=ck, batch_size=b, gradient_accumulation=total // b, optimizer=o)

    leanest = replace(c, optimizer=optimizers[-1])  # what the batch-1 test of each checkpointing setting uses
    chosen = None
    for ck in ckpts:  # lazily: a fit without checkpointing never simulates the checkpointed step
        candidates = [step(ck, b, o) for b in _micro_batches(spec, card, leanest, ck, results) for o in optimizers]
        chosen = next((x for x in candidates if fit(x, "train")), None)
        if chosen is not None:
            break
    c = chosen or step(ckpts[-1], 1, optimizers[-1])  # the smallest: the plan then shows by how much it misses
    batches = list(_halvings(spec.story.batch_size))
    c = _first(
        c,
        [replace(c, story_batch_size=b, vae_tiling=t) for t in (False, True) for b in batches],
        lambda x: fit(x, "validation", "story.denoise", "story.decode"),
    )
    return c


def _micro_batches(spec: Spec, card: Card, c: Choices, ckpt: bool, results: Results) -> list[int]:
    """The micro-batches (divisors of ``batch_size``) worth simulating with checkpointing ``ckpt``, largest first:
    none when even 1 does not fit; else those whose peak, extrapolated from batch 1's per-sample activations, fits
    (each is still simulated before it is chosen). Saves minutes of simulation for a large ``batch_size``."""
    batch = spec.train.batch_size
    one = replace(c, gradient_checkpointing=ckpt, batch_size=1)
    stage = _stages(spec, card, one, results, only=("train",))[0]
    if not stage.fits:
        return []
    per_sample = results.get(_train_step(spec, one)).transient
    return [b for b in range(batch, 0, -1) if batch % b == 0 and (b == 1 or stage.gpu + (b - 1) * per_sample
            <= card.budget * 1.05)]  # fmt: skip


def _first(default: Choices, candidates: list[Choices], ok: Any) -> Choices:
    """The first candidate that fits, else the last (the smallest: the plan then shows by how much it misses)."""
    for cand in candidates:
        if ok(cand):
            return cand
    return candidates[-1] if candidates else default


def _halvings(n: int) -> Iterator[int]:
    while n >= 1:
        yield n
        if n == 1:
            return
        n = max(1, n // 2)


def _changes(spec: Spec, c: Choices) -> list[str]:
    """What the plan changed from the manifest, one note each."""
    t, out = spec.train, []
    if t.gradient_checkpointing == "auto":
        out.append(f"gradient checkpointing {'on' if c.gradient_checkpointing else 'off'}")
    if c.batch_size != t.batch_size:
        out.append(f"train batch {t.batch_size} × {t.gradient_accumulation} → {c.batch_size} × "
                   f"{c.gradient_accumulation} (same effective batch)")  # fmt: skip
    if c.optimizer != t.optimizer:
        out.append(f"optimizer {t.optimizer} → {c.optimizer}")
    if c.text_encoder != "cuda":
        out.append("ChatGLM encodes on the CPU (bf16): it does not fit the card beside the aesthetic predictor")
    if c.story_batch_size != spec.story.batch_size:
        out.append(f"story batch {spec.story.batch_size} → {c.story_batch_size}")
    if c.latent_batch != 8:
        out.append(f"latent caching encodes {c.latent_batch} images at a time (not 8)")
    if c.vae_tiling:
        out.append("VAE decodes in tiles (pixels change slightly at the tile seams)")
    return out


# ------------------------------------------------------------------------------------------------ stages


def training_size(spec: Spec) -> tuple[int, int]:
    """The largest image (width, height) a training batch can hold: ``resolution``² from a dataset without buckets;
    from one with ``buckets``, its bucket of the most pixels (``aspect_buckets.bucket_sizes`` within its aspect
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


def _train_step(spec: Spec, c: Choices) -> TrainStep:
    """The trainer's step with these choices and the manifest's training options."""
    t = spec.train
    return TrainStep(c.batch_size, t.resolution, MIXED_WEIGHTS[c.precision], c.precision, c.gradient_checkpointing,
                     t.rank, tuple(t.target_modules), SIM_OPTIMIZER[c.optimizer], dora=t.dora, ema=t.ema,
                     bucket=_bucket(spec))  # fmt: skip


def _stages(spec: Spec, card: Card, c: Choices, results: Results, only: tuple[str, ...] = ()) -> list[Stage]:
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
    # in fp16 and encodes in fp32 (``train_data.vae_encode_dtype`` reads its ``force_upcast``).
    named_vae = spec.model.train_vae or spec.model.vae
    vae_dtype = "fp32" if c.precision == "fp16" and named_vae is None else weights
    if need("latents"):
        enc = results.get(VaeEncode(c.latent_batch, res, vae_dtype, bucket)).peak
        pixels = 2 * c.latent_batch * 3 * width * height * 4
        add("latents", f"VAE {vae_dtype} encodes {c.latent_batch} × {size} at a time (+0.5 MiB host per image)",
            enc + scorer, vae_files + pixels)  # fmt: skip

    step = _train_step(spec, c)
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


def cards_table(manifest: Manifest, cards: list[Card], results: Results) -> str:
    """README's "Which card?" table: each stage's predicted GPU peak (GiB) of ``manifest`` on each card, and the
    settings ``auto`` chose there."""
    plans = [plan_job(manifest, card, results) for card in cards]
    head = "| stage | " + " | ".join(f"{c.name} ({c.total / GIB:.1f} GiB)" for c in cards) + " |"
    lines = [head, "|---|" + "---:|" * len(cards)]
    for i, stage in enumerate(plans[0].stages):
        if stage.name == "download":
            continue
        cells = [f"{p.stages[i].gpu / GIB:.1f}" + ("" if p.stages[i].fits else " ✗") for p in plans]
        lines.append(f"| {stage.name} | " + " | ".join(cells) + " |")
    lines.append("| **allowed (90 %)** | " + " | ".join(f"{c.budget / GIB:.1f}" for c in cards) + " |")
    rows = {
        "gradient checkpointing": lambda c: "on" if c.gradient_checkpointing else "off",
        "train batch × accumulation": lambda c: f"{c.batch_size} × {c.gradient_accumulation}",
        "precision (train / story)": lambda c: f"{c.precision} / {c.story_precision}",
        "ChatGLM on": lambda c: c.text_encoder,
        "latent caching batch": lambda c: str(c.latent_batch),
        "story batch": lambda c: str(c.story_batch_size),
        "VAE tiling": lambda c: "on" if c.vae_tiling else "off",
    }
    for name, cell in rows.items():
        lines.append(f"| *{name}* | " + " | ".join(cell(p.choices) for p in plans) + " |")
    return "\n".join(lines)
