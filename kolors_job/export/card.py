"""The model card, ``lora/README.md``: what the LoRA is, how it was trained and scored, and how to load
each exported file. It doubles as the challenge's "LoRA description" and the ModelScope model page, so it
carries ModelScope front matter; the text lives in ``kolors_job/templates/model_card.md.j2``.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kolors_job.export.diffsynth import DEFAULT_DIFFSYNTH_LOAD_ALPHA, model_manager_alpha
from kolors_job.export.registry import format_names, get_format

if TYPE_CHECKING:
    import jinja2

    from kolors_job.export.lora_io import LoraInfo

__all__ = ["fmt", "render_model_card", "write_model_card"]

TEMPLATE = "model_card.md.j2"


def fmt(value: Any) -> str:
    """A value as the card shows it: floats to 4 significant digits, lists comma-joined, dicts as JSON."""
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(fmt(v) for v in value)
    if isinstance(value, dict):
        return json.dumps(value, ensure_ascii=False)
    return str(value)


def _cell(value: Any) -> str:
    """A markdown table cell: a ``|`` or a line break in user text would split the row."""
    return fmt(value).replace("|", "\\|").replace("\r", " ").replace("\n", " ")


def _code(value: Any) -> str:
    """Inline code: a backtick in the text needs a longer fence (CommonMark), else the text as is."""
    text = str(value).replace("\n", " ")
    if "`" not in text:
        return f"`{text}`"
    fence = "``"
    while fence in text:
        fence += "`"
    return f"{fence} {text} {fence}"


def _py_str(value: Any) -> str:
    """A Python string literal (quotes and backslashes escaped, non-ASCII kept readable)."""
    return json.dumps(str(value), ensure_ascii=False)


@functools.lru_cache(maxsize=1)
def _environment() -> jinja2.Environment:
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.PackageLoader("kolors_job", "templates"),
        autoescape=False,  # noqa: S701 - markdown, not HTML: user text is escaped per context by the filters
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
        undefined=jinja2.StrictUndefined,
    )
    env.filters.update(fmt=fmt, cell=_cell, code=_code, py_str=_py_str)
    return env


def default_file_names(info: LoraInfo) -> dict[str, str]:
    """``{file key: name}`` of every file the registered formats would write for ``info``."""
    names: dict[str, str] = {}
    for name in format_names():
        names.update(get_format(name).file_names(info))
    return names


def render_model_card(
    info: LoraInfo,
    scores: Mapping[str, Any] | None,
    dataset_summary: Mapping[str, Any] | None,
    names: Mapping[str, str],
    load_alpha: float,
) -> str:
    """The card's text for the files ``names`` (``{file key: file name}``, in the order listed)."""
    purpose: dict[str, tuple[str, str]] = {}
    for name in format_names():
        rows = get_format(name).card_rows
        if rows is not None:
            purpose.update(rows(info, load_alpha))
    files = [(name, *purpose.get(key, (key, ""))) for key, name in names.items()]
    settings = [
        (label, value)
        for label, value in (
            ("steps", info.steps),
            ("learning rate", info.learning_rate),
            ("resolution", info.resolution),
            ("batch size", info.batch_size),
            ("precision", info.precision),
            ("seed", info.seed),
        )
        if value is not None
    ]
    text = _environment().get_template(TEMPLATE).render(
        info=info,
        scale=info.scale if info.rank and info.alpha is not None else None,
        settings=settings,
        dataset_summary=dict(dataset_summary or {}),
        scores=dict(scores or {}),
        files=files,
        names=dict(names),
        load_alpha=float(load_alpha),
        manager_alpha=model_manager_alpha(load_alpha, info.rank or 1),
    )
    return text.rstrip("\n") + "\n"  # sections end in a blank line; the file ends in exactly one newline


def write_model_card(
    out_dir: str | os.PathLike[str],
    info: LoraInfo,
    scores: Mapping[str, Any] | None,
    dataset_summary: Mapping[str, Any] | None,
    *,
    files: Mapping[str, str | os.PathLike[str]] | None = None,
    load_alpha: float = DEFAULT_DIFFSYNTH_LOAD_ALPHA,
) -> Path:
    """Write ``out_dir/README.md`` for the exported ``files`` (``{key: path}``; default: those present).

    The DiffSynth lines carry the α that file expects, since both DiffSynth loaders take α as an
    argument and a different α silently changes the strength.
    """
    out = Path(out_dir)
    names = {k: Path(v).name for k, v in (files or {}).items()} or {
        k: v for k, v in default_file_names(info).items() if (out / v).exists()
    }
    path = out / "README.md"
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(render_model_card(info, scores, dataset_summary, names, load_alpha), encoding="utf-8")
    return path
