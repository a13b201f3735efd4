"""``kolors-job sample``: draw any prompts with a LoRA at one or more scales, the base model beside them.

The LoRA is a directory or bucket prefix holding ``pytorch_lora_weights.safetensors``, or a job's output
prefix, whose ``manifest.resolved.yaml`` also gives the base model, VAE, recipe and story settings (sampler,
steps, cfg, size, negative prompt, LoRA scale, precision, batch size) that every unset option takes.

Drawing is the story's own path (:mod:`kolors_job.generate`: ``load_story_pipeline``, ``encode_texts``,
``to_device``, ``render``, one seeded generator per image, each prompt encoded alone), so a prompt drawn at
the story's settings is the story's frame byte for byte. "Settings" include the batch: CPU and GPU kernels
are not batch-invariant (a frame drawn alone and in a batch of 8 differ by one level in a pixel or two), so
images are drawn in batches of the story's ``batch_size`` in prompt order, as the story draws its frames —
give the job's ``prompts.json`` as the prompts file and the story comes back exactly. Each column is one
LoRA scale (the LoRA stays a peft branch whose scale is changed in place; where the story fuses it — CUDA,
fp16/fp32 — the pipeline is loaded again at each scale and fused, as the story does) or the base model
(``--compare-base``: a pipeline without the LoRA, not scale 0). ``story.compile`` is not used: a sample is
too short to pay back a compile.

Output (a local dir or any bucket prefix, which must be empty: nothing is ever overwritten; every file is
created with ``if_absent``, atomically): ``images/<row>-<column>.png`` as they are drawn, ``grid.png``
(rows = prompts, columns = the scales, then the base), ``prompts.json`` last (its presence means the rest is
complete), with aesthetic scores when ``--score``.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import logging
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kolors_job.errors import ExitCode, InputError, ManifestError, OutputConflictError

if TYPE_CHECKING:
    import torch
    from PIL import Image

    from kolors_job.manifest import Manifest, StorySpec
    from kolors_job.sample_prompts import PromptsFile, SamplePrompt
    from kolors_job.settings import Settings

log = logging.getLogger("kolors_job.sample")

GRID = "grid.png"
PROMPTS = "prompts.json"
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


# --------------------------------------------------------------------------------------------- inputs


def open_lora(uri: str, settings: Settings, scratch: Path) -> LoraSource:
    """The LoRA at ``uri`` (a dir or prefix with the diffusers file, or a job's output prefix) as a local dir;
    a bucket's file is copied into ``scratch``. A missing or unreadable LoRA is exit 4, naming ``uri``."""
    from kolors_job.export.lora_io import LORA_WEIGHT_NAME, load_lora_file, lora_modules
    from kolors_job.manifest import parse_manifest
    from kolors_job.redact import one_line, redact_uri
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

    from kolors_job.manifest import format_validation_error

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

    from kolors_job.manifest import format_validation_error

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


# --------------------------------------------------------------------------------------------- drawing


def _pick_device(requested: str, allow_cpu: bool, full_size: bool, base: str) -> torch.device:
    """The device, refused the way a job refuses it: ``cuda`` without a usable GPU, or a full-size Kolors that
    would land on the CPU (hours) unless ``--allow-cpu`` or ``--device cpu``."""
    import torch

    from kolors_job.device import cuda_problem, pick_device
    from kolors_job.redact import redact_uri

    if requested == "cuda" and (problem := cuda_problem()):
        raise InputError(f"device cuda (--device, or the job's spec.device) but {problem}")
    dev = torch.device(pick_device(requested))
    if dev.type == "cpu" and full_size and requested == "auto" and not allow_cpu:
        raise InputError(
            f"model {redact_uri(base)!r} is a full-size Kolors and {cuda_problem() or 'no GPU is in use'}; a CPU "
            "would take minutes per image (--device cpu or --allow-cpu runs it there anyway)"
        )
    return dev


def resolve_models(req: SampleRequest, settings: Settings) -> tuple[Path, Path | None, torch.device]:
    """The base model (and VAE) as local dirs, and the device; a full-size hub model is checked against the
    device before any byte is downloaded."""
    import torch

    from kolors_job.sources import fetch_model, is_full_size, plan_model

    cpu_first = req.device == "cpu" or (req.device == "auto" and not torch.cuda.is_available())
    prefer_fp16 = not cpu_first or req.story.precision in ("fp16", "bf16")
    skip = ("vae",) if req.vae else ()
    plan = plan_model(req.base, kind="pipeline", settings=settings, prefer_fp16=prefer_fp16, skip=skip)
    if plan is not None:
        dev = _pick_device(req.device, req.allow_cpu, plan.full_size, req.base)
    base, _ = fetch_model(req.base, kind="pipeline", settings=settings, prefer_fp16=prefer_fp16, skip=skip, plan=plan)
    if plan is None:
        dev = _pick_device(req.device, req.allow_cpu, is_full_size(base), req.base)
    vae = None
    if req.vae:
        vae, _ = fetch_model(req.vae, kind="vae", settings=settings, prefer_fp16=prefer_fp16)
    return base, vae, dev


def draw(
    model_dir: Path,
    spec: StorySpec,
    prompts: Sequence[SamplePrompt],
    columns: Sequence[Column],
    *,
    lora_dir: Path,
    vae_dir: Path | None,
    device: torch.device,
    on_image: Callable[[int, int, Image.Image], None],
    progress: bool = False,
    fused: bool | None = None,
) -> None:
    """Draw every prompt (row) in every column; ``on_image(row, column, image)`` as each image exists.

    Column by column, each prompt size's rows in batches of ``spec.batch_size`` in prompt order (the story's
    batching, halved on a GPU out-of-memory error as the story does). Every text is encoded once, alone.
    ``fused`` (default: on CUDA) is the story's speed path: the LoRA merged at each column's scale.
    """
    import gc

    import torch

    from kolors_job.generate import (
        ADAPTER_NAME,
        ImageJob,
        encode_texts,
        fuses_lora,
        load_story_pipeline,
        render,
        sampling_dtype,
        to_device,
    )

    jobs = [ImageJob(row + 1, 0, p.prompt, p.negative_prompt, p.seed) for row, p in enumerate(prompts)]
    sizes: dict[tuple[int, int], list[int]] = {}
    for row, p in enumerate(prompts):
        sizes.setdefault((p.width, p.height), []).append(row)
    merged = fuses_lora(device, sampling_dtype(device, spec.precision), fused)
    texts = None
    pipe: Any = None
    pipe_has_lora = False
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(prompts) * len(columns), desc="sample", unit="img", dynamic_ncols=True)
    try:
        for c, column in enumerate(columns):
            with_lora = column.scale is not None
            at = spec.model_copy(update={"lora_scale": column.scale}) if with_lora else spec
            if pipe is not None and pipe_has_lora and with_lora and not merged:
                pipe.set_adapters([ADAPTER_NAME], adapter_weights=[column.scale])  # as apply_lora sets it
            else:
                pipe = None
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                pipe = load_story_pipeline(
                    model_dir, at, lora_dir=lora_dir if with_lora else None, vae_dir=vae_dir, device=device, fused=fused
                )
                pipe_has_lora = with_lora
                if texts is None:
                    texts = encode_texts(pipe, jobs, device)
                if device.type == "cuda":  # ChatGLM leaves before the UNet and VAE arrive, as in the story
                    pipe.text_encoder = None
                    gc.collect()
                    torch.cuda.empty_cache()
                to_device(pipe, at, device, fused=fused)
                if progress:
                    pipe.set_progress_bar_config(disable=False, leave=False, desc="denoise", dynamic_ncols=True)
            for (width, height), rows in sizes.items():
                sized = at.model_copy(update={"width": width, "height": height})
                todo, size = [jobs[r] for r in rows], spec.batch_size
                while todo:
                    batch, t0 = todo[:size], time.monotonic()
                    try:
                        images = render(pipe, batch, sized, texts=texts)
                    except torch.OutOfMemoryError:
                        if size == 1:
                            raise
                        size = max(1, size // 2)
                        log.warning("sample: out of GPU memory; retrying with batches of %d", size)
                        gc.collect()
                        torch.cuda.empty_cache()
                        continue
                    todo = todo[len(batch) :]
                    log.info("batch", extra={"column": column.label, "images": len(batch),
                                             "seconds": round(time.monotonic() - t0, 3)})  # fmt: skip
                    for job, image in zip(batch, images, strict=True):
                        on_image(job.index - 1, c, image)
                    if bar is not None:
                        bar.update(len(batch))
    finally:
        if bar is not None:
            bar.close()
        del pipe
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def make_grid(rows: Sequence[Sequence[Image.Image]]) -> Image.Image:
    """Rows × columns of cells (diffusers' ``make_image_grid``), each cell the largest width × height drawn:
    an image of another size is fitted into it, centred on white, its aspect kept."""
    from diffusers.utils import make_image_grid
    from PIL import ImageOps

    cell = (max(im.width for row in rows for im in row), max(im.height for row in rows for im in row))
    cells = [im if im.size == cell else ImageOps.pad(im, cell, color="white") for row in rows for im in row]
    return make_image_grid(cells, rows=len(rows), cols=len(rows[0]))


def png_bytes(image: Image.Image) -> bytes:
    """The PNG the story writes (``generate._save_png``: PIL's defaults), in memory."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def image_key(row: int, column: Column, n_rows: int) -> str:
    return f"images/{row + 1:0{max(2, len(str(n_rows)))}d}-{column.label}.png"


# --------------------------------------------------------------------------------------------- the command


def run_sample(req: SampleRequest, settings: Settings, *, progress: bool = False) -> dict[str, Any]:
    """Draw, write every file into the (empty) output, and return the prompts.json record."""
    import json

    from kolors_job.generate import sampler_record
    from kolors_job.recipe import describe
    from kolors_job.redact import redact_uri
    from kolors_job.storage import open_store

    start = time.monotonic()
    try:
        out = open_store(req.output, settings)
    except ValueError as e:
        raise ManifestError(f"--output: {e}") from None
    if existing := out.list():
        raise OutputConflictError(
            f"output {out.uri} already holds {len(existing)} file(s) ({existing[0]}, ...): sample never "
            "overwrites; give a new or empty --output"
        )

    def put(key: str, data: bytes) -> None:
        if not out.write_bytes(key, data, if_absent=True):
            raise OutputConflictError(f"{out.uri}{key} appeared while sampling; not overwritten")

    model_dir, vae_dir, dev = resolve_models(req, settings)
    scorer = None
    if req.aesthetic_model:
        from kolors_job.score import AestheticScorer
        from kolors_job.sources import fetch_model

        path, _ = fetch_model(req.aesthetic_model, kind="aesthetic", settings=settings)
        scorer = AestheticScorer.load(path, device=str(dev))
    n = len(req.prompts)
    labels = [c.label for c in req.columns]
    log.info("sample", extra={"lora": req.source.uri, "base": redact_uri(req.base), "prompts": n, "columns": labels,
                              "device": str(dev), "output": out.uri})  # fmt: skip

    drawn: dict[tuple[int, int], Image.Image] = {}

    def on_image(row: int, col: int, image: Image.Image) -> None:
        drawn[row, col] = image
        key = image_key(row, req.columns[col], n)
        put(key, png_bytes(image))
        log.info("image", extra={"row": row + 1, "column": req.columns[col].label, "seed": req.prompts[row].seed,
                                 "key": key})  # fmt: skip

    draw(model_dir, req.story, req.prompts, req.columns, lora_dir=req.source.lora_dir, vae_dir=vae_dir,
         device=dev, on_image=on_image, progress=progress)  # fmt: skip
    grid_rows = [[drawn[r, c] for c in range(len(req.columns))] for r in range(n)]
    scores: list[list[float]] | None = None
    if scorer is not None:
        flat = scorer.score([im for row in grid_rows for im in row])
        scores = [flat[r * len(req.columns) : (r + 1) * len(req.columns)] for r in range(n)]
    grid = make_grid(grid_rows)
    put(GRID, png_bytes(grid))
    spec = req.story
    record: dict[str, Any] = {
        "lora": {"uri": req.source.uri, "sha256": req.source.sha256,
                 "job": req.source.uri if req.source.manifest else None, "job_finished": req.source.finished},
        "model": {"base": redact_uri(req.base), "vae": redact_uri(req.vae) if req.vae else None},
        "recipe": describe(req.source.manifest.spec) if req.source.manifest else None,
        "negative_prompt": spec.negative_prompt,
        "sampler": {**sampler_record(model_dir, spec, dev), "scheduler": spec.scheduler, "cfg_scale": spec.cfg_scale,
                    "steps": spec.steps, "batch_size": spec.batch_size},
        "columns": [{"label": c.label, "lora_scale": c.scale} for c in req.columns],
        "grid": {"image": GRID, "rows": n, "cols": len(req.columns), "size": list(grid.size),
                 "cell": [grid.width // len(req.columns), grid.height // n]},
        "prompts": [
            {**p.__dict__, "index": r + 1, "images": [
                {"column": c.label, "lora_scale": c.scale, "image": image_key(r, c, n),
                 **({"score": scores[r][j]} if scores else {})}
                for j, c in enumerate(req.columns)]}
            for r, p in enumerate(req.prompts)
        ],
        "aesthetic": None if scores is None else {
            "model": redact_uri(req.aesthetic_model or ""),
            "mean": {c.label: sum(s[j] for s in scores) / n for j, c in enumerate(req.columns)},
        },
    }  # fmt: skip
    put(PROMPTS, (json.dumps(record, ensure_ascii=False, indent=2) + "\n").encode())
    log.info("sample done", extra={"images": n * len(req.columns), "output": out.uri,
                                   "seconds": round(time.monotonic() - start, 3)})  # fmt: skip
    return record


def build_request(args: argparse.Namespace, settings: Settings, scratch: Path) -> SampleRequest:
    """The command line checked in order of cost: options and prompts files first (nothing fetched yet),
    then the LoRA (and the job it names), then everything that depends on that job."""
    from kolors_job.manifest import ModelSpec, ScoreSpec, StorySpec
    from kolors_job.sample_prompts import command_line, load_prompts_file, resolve_prompts

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


def cmd_sample(args: argparse.Namespace) -> int:
    from kolors_job.log import progress_enabled, say, setup_logging
    from kolors_job.settings import Settings

    settings = Settings()
    setup_logging(args.log_format or settings.log_format, settings.log_level)
    work = settings.resolved_work_dir
    work.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="sample-", dir=work) as scratch:
        req = build_request(args, settings, Path(scratch))
        run_sample(req, settings, progress=progress_enabled())
    out = req.output if "://" in req.output else os.path.abspath(req.output)
    say(f"sampled {len(req.prompts)} prompt(s) x {len(req.columns)} column(s): {out.rstrip('/')}/{GRID}",
        output=out)  # the CLI's last line: a JSON record in JSON mode, as every command's
    return ExitCode.OK


def register_cli(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``sample`` to the ``kolors-job`` parser (nothing heavy is imported until it runs)."""
    s = subparsers.add_parser(
        "sample",
        help="draw prompts with a LoRA at one or more scales (and the base model): images, grid.png, prompts.json",
        description="Draw prompts with a LoRA (a dir or bucket prefix with pytorch_lora_weights.safetensors, or a "
        "job's output prefix, which also gives the base model, recipe and story settings) at one or more scales, "
        "the base model beside them with --compare-base. Writes images/, grid.png (rows = prompts, columns = "
        "scales then base) and prompts.json into an empty --output (a dir, s3:// or oss://).",
    )
    s.add_argument(
        "lora", metavar="LORA", help="LoRA dir or prefix, or a job's output prefix (path, file://, s3://, oss://)"
    )
    s.add_argument("prompt", nargs="*", metavar="PROMPT", help="prompts to draw (and/or --prompts FILE)")
    s.add_argument("--prompts", action="append", metavar="FILE",
                   help="YAML/JSON prompts file (a 'prompts' list of strings or {prompt, negative_prompt, seed, "
                   "width, height}); a job's prompts.json redraws its story. Repeatable")  # fmt: skip
    s.add_argument(
        "--scale",
        action="append",
        metavar="S[,S...]",
        help="LoRA scale(s), one column each (default: the story's lora_scale, 0.5 for the reference)",
    )
    s.add_argument("--compare-base", action="store_true", help="add a column drawn by the base model, no LoRA")
    s.add_argument("--output", help="an empty dir, file://, s3:// or oss:// prefix (default: ./samples/<UTC time>)")
    s.add_argument("--base", help="base Kolors (default: the job's model.base, else Kwai-Kolors/Kolors-diffusers)")
    s.add_argument("--vae", help="VAE override (default: the job's model.vae unless --base is given)")
    s.add_argument("--negative", help="negative prompt of the prompts that set none (default: the story's)")
    s.add_argument("--seed", help="seed of the prompts that set none (default: 0)")
    s.add_argument("--width", help="width of the prompts that set none (default: the story's)")
    s.add_argument("--height", help="height of the prompts that set none (default: the story's)")
    s.add_argument("--steps", help="denoising steps (default: the story's)")
    s.add_argument("--cfg", dest="cfg_scale", help="guidance scale (default: the story's)")
    s.add_argument("--scheduler", help="sampler: a story.scheduler name (default: the story's)")
    s.add_argument("--precision", help="auto, fp16, bf16 or fp32 (default: the story's)")
    s.add_argument("--batch-size", dest="batch_size",
                   help="images per pipeline call (default: the story's; the story's frames come back byte for byte "
                   "only at its batch size)")  # fmt: skip
    s.add_argument("--score", action="store_true", help="score every image with the aesthetic predictor")
    s.add_argument("--aesthetic-model", help="the predictor for --score (default: the job's score.aesthetic_model)")
    s.add_argument("--device", choices=["auto", "cpu", "cuda"], help="default: the job's spec.device, else auto")
    s.add_argument("--allow-cpu", action="store_true", help="draw with a full-size model on the CPU (slow)")
    s.add_argument("--log-format", choices=["auto", "json", "text"])
    s.set_defaults(func=cmd_sample)
