"""``kolors-job sample``: draw any prompts with a LoRA at one or more scales, the base model beside them.

The LoRA is a directory or bucket prefix holding ``pytorch_lora_weights.safetensors``, or a job's output
prefix, whose ``manifest.resolved.yaml`` also gives the base model, VAE, recipe and story settings (sampler,
steps, cfg, size, negative prompt, LoRA scale, precision, batch size) that every unset option takes.

Drawing is the story's own path (:mod:`kolors_job.render.pipeline`: ``load_story_pipeline``, ``encode_texts``,
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

import io
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kolors_job.core.errors import InputError, ManifestError, OutputConflictError
from kolors_job.sample.request import Column, SampleRequest

if TYPE_CHECKING:
    import torch
    from PIL import Image

    from kolors_job.core.settings import Settings
    from kolors_job.manifest.story import StorySpec
    from kolors_job.sample.prompts import SamplePrompt

log = logging.getLogger(__name__)

GRID = "grid.png"
PROMPTS = "prompts.json"








# --------------------------------------------------------------------------------------------- inputs












# --------------------------------------------------------------------------------------------- drawing


def _pick_device(requested: str, allow_cpu: bool, full_size: bool, base: str) -> torch.device:
    """The device, refused the way a job refuses it: ``cuda`` without a usable GPU, or a full-size Kolors that
    would land on the CPU (hours) unless ``--allow-cpu`` or ``--device cpu``."""
    import torch

    from kolors_job.core.device import cuda_problem, pick_device
    from kolors_job.core.redact import redact_uri

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

    from kolors_job.models.weights import is_full_size
    from kolors_job.sources import fetch_model, plan_model

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
    story: StorySpec,
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
    import torch
    from diffusers.training_utils import free_memory

    from kolors_job.render.pipeline import (
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
    merged = fuses_lora(device, sampling_dtype(device, story.precision), fused)
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
            at = story.model_copy(update={"lora_scale": column.scale}) if with_lora else story
            if pipe is not None and pipe_has_lora and with_lora and not merged:
                pipe.set_adapters([ADAPTER_NAME], adapter_weights=[column.scale])  # as apply_lora sets it
            else:
                pipe = None
                free_memory()
                pipe = load_story_pipeline(
                    model_dir, at, lora_dir=lora_dir if with_lora else None, vae_dir=vae_dir, device=device, fused=fused
                )
                pipe_has_lora = with_lora
                if texts is None:
                    texts = encode_texts(pipe, jobs, device)
                if device.type == "cuda":  # ChatGLM leaves before the UNet and VAE arrive, as in the story
                    pipe.text_encoder = None
                    free_memory()
                to_device(pipe, at, device, fused=fused)
                if progress:
                    pipe.set_progress_bar_config(disable=False, leave=False, desc="denoise", dynamic_ncols=True)
            for (width, height), rows in sizes.items():
                sized = at.model_copy(update={"width": width, "height": height})
                todo, size = [jobs[r] for r in rows], story.batch_size
                while todo:
                    batch, t0 = todo[:size], time.monotonic()
                    try:
                        images = render(pipe, batch, sized, texts=texts)
                    except torch.OutOfMemoryError:
                        if size == 1:
                            raise
                        size = max(1, size // 2)
                        log.warning("sample: out of GPU memory; retrying with batches of %d", size)
                        free_memory()
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
        free_memory()


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

    from kolors_job.core.redact import redact_uri
    from kolors_job.manifest.recipe import describe
    from kolors_job.render.pipeline import sampler_record
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
        from kolors_job.models.aesthetic import AestheticScorer
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




