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
:class:`~kolors_job.plan.train_step.TrainStep`): ``dora``, ``ema`` and ``optimizer: prodigy`` the step (and the
state validation keeps beside its draws), ``dataset.buckets`` the size of the step and of latent caching — the
largest bucket (:func:`~kolors_job.plan.stages.training_size`). What each stage holds for given settings is
:mod:`kolors_job.plan.stages`'.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from kolors_job.plan.cards import GIB, Card
from kolors_job.plan.stages import Choices, Stage, stages_of, train_step_of
from kolors_job.plan.table import Results

if TYPE_CHECKING:
    from kolors_job.manifest.spec import Manifest, Spec

__all__ = ["Plan", "cards_table", "plan_job"]


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
        off_fits = stages_of(spec, card, base, results, only=("train",))[0].fits
        choices = replace(base, gradient_checkpointing=not off_fits)
    else:
        choices = base
    stages = stages_of(spec, card, choices, results)
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
        return all(s.fits for s in stages_of(spec, card, choices, results, only=names))

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
    stage = stages_of(spec, card, one, results, only=("train",))[0]
    if not stage.fits:
        return []
    per_sample = results.get(train_step_of(spec, one)).transient
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
