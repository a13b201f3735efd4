"""``kolors-job plan``: will this manifest fit that card? Per stage GPU peak, host RAM, disk, a verdict each and the
settings ``train.memory: auto`` chooses; exit 0 when everything fits, 2 naming the stage and the shortfall.
``validate --gpu …`` asks the same question."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from kolors_job import storage
from kolors_job.core.errors import ExitCode, ManifestError
from kolors_job.plan.cards import CARDS, Card, card_from_memory

__all__ = ["add_card_args", "card_of", "check_fits", "register_cli"]


def add_card_args(p: argparse.ArgumentParser, *, required: bool) -> None:
    group = p.add_mutually_exclusive_group(required=required)
    group.add_argument("--gpu", choices=sorted(CARDS), help="a card from the list (its memory and bf16 support)")
    group.add_argument("--gpu-memory", type=float, metavar="GiB", help="any card: its total memory in GiB")
    p.add_argument("--no-bf16", action="store_true", help="with --gpu-memory: the card has no bf16 (Volta, Turing)")


def card_of(args: argparse.Namespace) -> Card | None:
    if getattr(args, "gpu", None):
        return CARDS[args.gpu]
    if getattr(args, "gpu_memory", None) is not None:
        if not 1 <= args.gpu_memory <= 1024:
            raise ManifestError(f"--gpu-memory: {args.gpu_memory:g} GiB is not a card's memory (1 to 1024)")
        return card_from_memory(args.gpu_memory, bf16=not args.no_bf16)
    return None


def _plan(manifest: Any, card: Card) -> Any:
    from kolors_job.core.log import setup_logging
    from kolors_job.core.settings import Settings
    from kolors_job.plan.planner import plan_job
    from kolors_job.plan.table import Results, cache_file

    settings = Settings()
    setup_logging(settings.log_format, settings.log_level)  # "simulating …" lines while a new configuration runs
    return plan_job(manifest, card, Results(cache_file(settings.cache_dir)))


def check_fits(manifest: Any, args: argparse.Namespace) -> None:
    """``validate --gpu``: a ManifestError (exit 2) naming the stage and the shortfall when the job cannot fit."""
    card = card_of(args)
    if card is None or _tiny(manifest):
        return
    plan = _plan(manifest, card)
    print(f"# memory plan on the {card.describe()}: {plan.choices.describe()}; peak {plan.peak / 2**30:.2f} GiB",
          file=sys.stderr)  # fmt: skip
    if not plan.fits:
        raise ManifestError(f"spec: {plan.problem()}")


def _tiny(manifest: Any) -> bool:
    return str(manifest.spec.model.base).startswith("tiny://")


def cmd_plan(args: argparse.Namespace) -> int:
    from kolors_job.manifest.load import load_manifest

    manifest = load_manifest(args.manifest)
    card = card_of(args)
    assert card is not None  # the group is required
    if _tiny(manifest):
        print(f"{manifest.spec.model.base}: a tiny model, a few MiB on any card: nothing to plan")
        return ExitCode.OK
    plan = _plan(manifest, card)
    if args.json:
        print(json.dumps(plan.to_dict(), indent=2))
    else:
        print(f"memory plan: {manifest.job_id} on the {card.describe()}; a stage fits in "
              f"{card.budget / 2**30:.2f} GiB (90 % of the card)\n")  # fmt: skip
        print(plan.table())
        print(f"\nsettings ({'chosen by train.memory: auto' if plan.mode == 'auto' else 'as written, memory: manual'}):"
              f" {plan.choices.describe()}")  # fmt: skip
        for note in plan.notes:
            print(f"  - {note}")
    if not plan.fits:
        raise ManifestError(f"spec: {plan.problem()}")
    return ExitCode.OK


def register_cli(sub: Any) -> None:
    p = sub.add_parser(
        "plan",
        help="GPU memory, host RAM and disk of every stage on a card, and the settings that fit (CPU only)",
        description=__doc__.splitlines()[0] if __doc__ else None,
    )
    p.add_argument("manifest", nargs="?",
                   help=f"a path or a {storage.listed_schemes()} URI (default: $KOLORS_JOB_MANIFEST[_URI])")
    add_card_args(p, required=True)
    p.add_argument("--json", action="store_true", help="the plan as report.json's memory section")
    p.set_defaults(func=cmd_plan)
