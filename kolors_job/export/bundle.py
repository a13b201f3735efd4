"""``export_all``: the requested formats, each from the registry, plus the model card, into one ``lora/``."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kolors_job.export.card import write_model_card
from kolors_job.export.diffsynth import DEFAULT_DIFFSYNTH_LOAD_ALPHA
from kolors_job.export.lora_io import LoraInfo, load_lora_file, resolve_info
from kolors_job.export.registry import ExportSource, applicable_formats, default_format_names, get_format

if TYPE_CHECKING:
    import torch

__all__ = ["export_all"]

log = logging.getLogger(__name__)


def export_all(
    lora_dir_or_state_dict: str | os.PathLike[str] | Mapping[str, torch.Tensor],
    info: LoraInfo | None,
    out_dir: str | os.PathLike[str],
    formats: Sequence[str] | None = None,
    *,
    scores: Mapping[str, Any] | None = None,
    dataset_summary: Mapping[str, Any] | None = None,
    load_alpha: float = DEFAULT_DIFFSYNTH_LOAD_ALPHA,
    write_card: bool = True,
) -> dict[str, Path]:
    """Export in every requested format (default: the registry's defaults) into ``out_dir`` (the job's
    ``lora/``) plus ``README.md``.

    ``lora_dir_or_state_dict`` is the trainer's save dir (``pytorch_lora_weights.safetensors``), a
    LoRA file, or an in-memory state dict. Returns ``{file key: path}`` (a format's name for its main
    file, e.g. ``diffsynth_ckpt`` for a companion) with ``"card"`` for the README. A format that cannot
    hold this LoRA (its ``skip_reason``; DiffSynth for a UNet other than the full-size Kolors, such as
    the tiny model of tests and ``make demo``) is skipped with a warning and absent from the result.
    """
    requested = list(default_format_names() if formats is None else formats)
    for name in requested:
        get_format(name)  # unknown names fail before anything is written
    if isinstance(lora_dir_or_state_dict, Mapping):
        state_dict, metadata = dict(lora_dir_or_state_dict), {}
    else:
        state_dict, metadata = load_lora_file(lora_dir_or_state_dict)
    info, modules, _ = resolve_info(info, state_dict, metadata)  # fail once, early, on a bad alpha/rank
    keep, skipped = applicable_formats(requested, modules)
    for name, why in skipped.items():
        log.warning("%s export skipped: %s", get_format(name).title, why)
    out = Path(out_dir)
    source = ExportSource(state_dict=state_dict, info=info, metadata=metadata, load_alpha=load_alpha)
    paths: dict[str, Path] = {}
    for name in keep:
        paths.update(get_format(name).write(source, out))
    if write_card:
        paths["card"] = write_model_card(
            out, info, scores, dataset_summary, files=dict(paths), load_alpha=load_alpha
        )
    return paths
