"""What ``kolors-job sample`` draws, resolved and checked before anything is loaded: the LoRA (a dir, a bucket
prefix, or a job's output, whose ``manifest.resolved.yaml`` gives the base model, recipe and story settings), the
story settings every unset option takes, the scales, the prompts and the output."""

from __future__ import annotations

import argparse
import hashlib
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from kolors_job.core.errors import InputError, ManifestError

if TYPE_CHECKING:
    from kolors_job.core.settings import Settings
    from kolors_job.manifest.spec import Manifest
    from kolors_job.manifest.story import StorySpec
    from kolors_job.sample.prompts import PromptsFile, SamplePrompt

__all__ = ["Column", "LoraSource", "SampleRequest", "build_request", "open_lora"]


JOB_MANIFEST = "manifest.resolved.yaml"


@dataclass(frozen=True)
class Column:
    """One grid column: the LoRA at ``scale``, or the base model without it (``scale=None``)."""

    scale: float | None

    @property
    def label(self) -> str:
        return "base" if self.scale is None else f"lora{self.scale:g}"


@dataclass
class LoraSource:
    """Where the LoRA came from, and the job that trained it when the source is a job's output."""

    uri: str
    """As given, redacted (what logs and prompts.json show)."""
    lora_dir: Path
    """A local directory holding ``pytorch_lora_weights.safetensors``."""
    sha256: str
    manifest: Manifest | None = None
    finished: bool | None = None
    """For a job: whether its ``_SUCCESS`` is there (a quality-gate failure still leaves a usable LoRA)."""


@dataclass
class SampleRequest:
    """Everything a sample draws, resolved and checked."""

    source: LoraSource
    base: str
    vae: str | None
    story: StorySpec
    """The sampler, steps, cfg, precision and batch size (sizes and negatives are per prompt)."""
    prompts: list[SamplePrompt]
    columns: list[Column]
    output: str
    device: str = "auto"
    allow_cpu: bool = False
    aesthetic_model: str | None = None
    """Score every image with this predictor; None: no scores."""


def open_lora(uri: str, settings: Settings, scratch: Path) -> LoraSource:
    """The LoRA at ``uri`` (a dir or prefix with the diffusers file, or a job's output prefix) as a local dir;
    a bucket's file is copied into ``scratch``. A missing or unreadable LoRA is exit 4, naming ``uri``."""
    from kolors_job.core.redact import one_line, redact_uri
    from kolors_job.export.lora_io import LORA_WEIGHT_NAME, load_lora_file, lora_modules
    from kolors_job.manifest.load import parse_manifest
    from kolors_job.storage import open_store

    shown = redact_uri(uri)
    try:
        store = open_store(uri, settings)
    except ValueError as e:
        raise InputError(f"lora {shown}: {one_line(e)}") from None
    manifest = finished = None
    if store.exists(JOB_MANIFEST):
        if not store.exists(f"lora/{LORA_WEIGHT_NAME}"):
            raise InputError(f"lora {shown}: a job's output with no lora/{LORA_WEIGHT_NAME} (not exported yet?)")
        manifest = parse_manifest(store.read_bytes(JOB_MANIFEST), source=f"{shown.rstrip('/')}/{JOB_MANIFEST}")
        finished = store.exists("_SUCCESS")
        store = store.child("lora")
    elif not store.exists(LORA_WEIGHT_NAME):
        raise InputError(f"lora {shown}: no {LORA_WEIGHT_NAME} there, and not a job's output ({JOB_MANIFEST} + lora/)")
    local = store.local_path()
    if local is None:
        local = scratch / "lora"
        store.download_file(LORA_WEIGHT_NAME, local / LORA_WEIGHT_NAME)
    path = local / LORA_WEIGHT_NAME
    try:  # a Kolors UNet LoRA at all? (load_lora_weights would fail later, less clearly)
        lora_modules(load_lora_file(path)[0])
    except Exception as e:  # safetensors, torch and our own checks each raise their own kind
        raise InputError(f"lora {shown}: {LORA_WEIGHT_NAME} is not a usable Kolors LoRA: {one_line(e)}") from None
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return LoraSource(shown, local, digest, manifest, finished)


def parse_scales(values: Sequence[str] | None, story: StorySpec) -> list[float]:
    """``--scale 0.5,1 --scale 2`` → [0.5, 1.0, 2.0] in order, duplicates dropped; each within the story's
    ``lora_scale`` bounds (one line naming the bad value, exit 2). None: the story's own scale."""
    from pydantic import ValidationError

    from kolors_job.manifest.load import format_validation_error

    if not values:
        return [story.lora_scale]
    scales: list[float] = []
    for text in (t.strip() for v in values for t in v.split(",")):
        try:
            scale = type(story).model_validate({**story.model_dump(), "lora_scale": text}).lora_scale
        except ValidationError as e:
            problem = format_validation_error(e)[0].partition(": ")[2]
            raise ManifestError(f"--scale {text!r}: {problem}") from None
        if scale not in scales:
            scales.append(scale)
    return scales


STORY_OPTIONS = {"steps": "--steps", "cfg_scale": "--cfg", "scheduler": "--scheduler", "precision": "--precision",
                 "batch_size": "--batch-size"}  # fmt: skip
"""Story settings the command line may change, by their option."""


def story_settings(story: StorySpec, args: argparse.Namespace) -> StorySpec:
    """The job's (or the reference's) story with the command line's ``--steps``, ``--cfg``, ... applied and
    checked by the manifest's own bounds (one line per bad option, exit 2)."""
    from pydantic import ValidationError

    from kolors_job.manifest.load import format_validation_error

    given = {f: getattr(args, f) for f in STORY_OPTIONS if getattr(args, f) is not None}
    try:
        return type(story).model_validate({**story.model_dump(), **given, "compile": False})
    except ValidationError as e:
        raise ManifestError(
            [
                f"{STORY_OPTIONS.get(line.split(':')[0], line.split(':')[0])}:{line.partition(':')[2]}"
                for line in format_validation_error(e)
            ]
        ) from None


def default_output() -> str:
    return f"samples/{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"


def build_request(args: argparse.Namespace, settings: Settings, scratch: Path) -> SampleRequest:
    """The command line checked in order of cost: options and prompts files first (nothing fetched yet),
    then the LoRA (and the job it names), then everything that depends on that job."""
    from kolors_job.manifest.spec import ModelSpec, ScoreSpec
    from kolors_job.manifest.story import StorySpec
    from kolors_job.sample.prompts import command_line, load_prompts_file, resolve_prompts

    cli_prompts, defaults = command_line(
        args.prompt, {"negative_prompt": args.negative, "seed": args.seed, "width": args.width, "height": args.height}
    )
    files: list[PromptsFile] = [load_prompts_file(p) for p in args.prompts or []]
    if not files and cli_prompts is None:
        raise ManifestError("no prompts: give them as arguments or in --prompts FILE")
    source = open_lora(args.lora, settings, scratch)
    job = source.manifest.spec if source.manifest else None
    story = story_settings(job.story if job else StorySpec(), args)
    columns = [Column(s) for s in parse_scales(args.scale, story)] + ([Column(None)] if args.compare_base else [])
    base = args.base or (job.model.base if job else ModelSpec().base)
    aesthetic = None
    if args.score or args.aesthetic_model:
        aesthetic = args.aesthetic_model or (job.score.aesthetic_model if job else ScoreSpec().aesthetic_model)
    return SampleRequest(
        source=source,
        base=base,
        vae=args.vae or (job.model.vae if job and not args.base else None),
        story=story,
        prompts=resolve_prompts([*files, *([cli_prompts] if cli_prompts else [])], defaults, story),
        columns=columns,
        output=args.output or default_output(),
        device=args.device or (job.device if job else "auto"),
        allow_cpu=args.allow_cpu or settings.allow_cpu,
        aesthetic_model=aesthetic,
    )
