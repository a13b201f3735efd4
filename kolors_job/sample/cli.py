"""``kolors-job sample`` on the command line: its options, and the command (one line and an exit code per
failure, as every command)."""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

from kolors_job.core.errors import ExitCode
from kolors_job.sample.request import build_request
from kolors_job.sample.run import GRID, run_sample

__all__ = ["cmd_sample", "register_cli"]


def cmd_sample(args: argparse.Namespace) -> int:
    from kolors_job.core.log import progress_enabled, say, setup_logging
    from kolors_job.core.settings import Settings

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
    from kolors_job import storage

    s = subparsers.add_parser(
        "sample",
        help="draw prompts with a LoRA at one or more scales (and the base model): images, grid.png, prompts.json",
        description="Draw prompts with a LoRA (a dir or bucket prefix with pytorch_lora_weights.safetensors, or a "
        "job's output prefix, which also gives the base model, recipe and story settings) at one or more scales, "
        "the base model beside them with --compare-base. Writes images/, grid.png (rows = prompts, columns = "
        f"scales then base) and prompts.json into an empty --output (a dir or a {storage.listed_schemes()} prefix).",
    )
    s.add_argument(
        "lora", metavar="LORA",
        help=f"LoRA dir or prefix, or a job's output prefix (a path or a {storage.listed_schemes()} URI)",
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
    s.add_argument("--output",
                   help=f"an empty dir or {storage.listed_schemes()} prefix (default: ./samples/<UTC time>)")
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
