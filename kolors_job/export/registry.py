"""The LoRA export formats by name: each format module registers itself once, and everything that
lists formats (the manifest's ``output.lora_formats``, ``export_all``, the runner, the model card)
asks here, so adding a format is one module and one ``register`` call (docs/adding-a-lora-format.md).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from kolors_job.export.lora_io import LoraInfo, load_lora_file, lora_magnitudes, lora_modules

if TYPE_CHECKING:
    import torch

    Modules = Mapping[str, tuple[torch.Tensor, torch.Tensor]]

__all__ = [
    "ExportFormat",
    "ExportSource",
    "applicable_formats",
    "default_format_names",
    "dora_refusal",
    "format_names",
    "get_format",
    "register",
    "unregister",
]


@dataclass(frozen=True)
class ExportSource:
    """What a writer gets: the LoRA as read, its resolved ``info`` (rank and α known) and the file's header."""

    state_dict: Mapping[str, torch.Tensor]
    info: LoraInfo
    metadata: Mapping[str, str]
    load_alpha: float
    """The α DiffSynth's reference loader injects with (only the DiffSynth format uses it)."""


@dataclass(frozen=True)
class ExportFormat:
    """One output format of ``lora/``."""

    name: str
    """The manifest's ``output.lora_formats`` value and the key of its file in ``export_all``'s result."""
    title: str
    """How logs and the model card name the consumer (``DiffSynth``)."""
    file_names: Callable[[LoraInfo], dict[str, str]]
    """``{key: file name inside lora/}`` of every file it writes, ``name`` first (then companions)."""
    write: Callable[[ExportSource, Path], dict[str, Path]]
    """Writes into the directory given; returns ``{key: path}``, ``name`` first, then any companion file."""
    card_rows: Callable[[LoraInfo, float], dict[str, tuple[str, str]]] | None = None
    """``{file key: (what reads it, how α is handled)}`` for the card's Files table, given info and load α."""
    skip_reason: Callable[[Modules], str | None] | None = None
    """Why this LoRA cannot be written in this format (``None``: it can), e.g. DiffSynth's fixed UNet size."""
    dora: str | None = "its writer does not say it can carry DoRA magnitudes"
    """Why this format cannot hold a DoRA (``train.dora``), or ``None`` when it can: the manifest refuses a
    DoRA job that names a format with a reason, and ``applicable_formats`` skips it for a DoRA LoRA."""
    default: bool = True
    """In the manifest's default ``output.lora_formats``."""
    order: int = 100
    """Where it is listed (manifest default and schema, ``format_names``): lower first, then by registration,
    so the listing does not depend on which module happened to be imported first."""


_FORMATS: dict[str, ExportFormat] = {}


def register(fmt: ExportFormat) -> ExportFormat:
    """Add a format; a second registration under the same name is a bug, not an override."""
    if fmt.name in _FORMATS:
        raise ValueError(f"LoRA export format {fmt.name!r} is already registered")
    _FORMATS[fmt.name] = fmt
    return fmt


def unregister(name: str) -> None:
    """Remove a format (tests that register one of their own)."""
    del _FORMATS[name]


def get_format(name: str) -> ExportFormat:
    try:
        return _FORMATS[name]
    except KeyError:
        raise ValueError(f"unknown LoRA export format {name!r}; choose from {list(format_names())}") from None


def format_names() -> tuple[str, ...]:
    """Every registered format, by ``order``."""
    return tuple(sorted(_FORMATS, key=lambda name: _FORMATS[name].order))


def default_format_names() -> tuple[str, ...]:
    return tuple(name for name in format_names() if _FORMATS[name].default)


def dora_refusal(name: str) -> str | None:
    """Why format ``name`` cannot carry a DoRA (``None``: it can; an unknown name is left to its own check)."""
    fmt = _FORMATS.get(name)
    return None if fmt is None else fmt.dora


def applicable_formats(
    requested: Iterable[str],
    lora: str | os.PathLike[str] | Mapping[str, torch.Tensor] | Modules,
) -> tuple[list[str], dict[str, str]]:
    """``(formats that can hold this LoRA, {skipped format: why})``, in the requested order.

    ``lora`` is a LoRA file or the trainer's save dir, a state dict, or ``lora_modules``' module map.
    Unknown names raise (the manifest has already refused them).
    """
    formats = [get_format(name) for name in requested]
    modules: Modules | None = None
    keep: list[str] = []
    skipped: dict[str, str] = {}
    dora = any(fmt.dora for fmt in formats) and _is_dora(lora)
    for fmt in formats:
        if dora and fmt.dora:
            skipped[fmt.name] = f"a DoRA: {fmt.dora}"
            continue
        if fmt.skip_reason is not None:
            if modules is None:
                modules = _modules(lora)
            reason = fmt.skip_reason(modules)
            if reason is not None:
                skipped[fmt.name] = reason
                continue
        keep.append(fmt.name)
    return keep, skipped


def _is_dora(lora: str | os.PathLike[str] | Mapping[str, object]) -> bool:
    """Does the LoRA carry DoRA magnitudes (a module map of ``(A, B)`` pairs never does)?"""
    if not isinstance(lora, Mapping):
        return bool(lora_magnitudes(load_lora_file(lora)[0]))
    if all(isinstance(v, tuple) for v in lora.values()):
        return False
    return bool(lora_magnitudes(lora))  # type: ignore[arg-type]


def _modules(lora: str | os.PathLike[str] | Mapping[str, object]) -> Modules:
    if not isinstance(lora, Mapping):
        return lora_modules(load_lora_file(lora)[0])[0]
    if all(isinstance(v, tuple) for v in lora.values()):
        return lora  # type: ignore[return-value]
    return lora_modules(lora)[0]  # type: ignore[arg-type]
