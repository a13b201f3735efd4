"""What ``kolors-job sample`` draws: its prompts file (YAML or JSON), the prompts given on the command line,
and the defaults each prompt falls back to.

A prompt's own field wins, then the command line's option (``--seed``, ``--negative``, ``--width``,
``--height``), then the file's top level, then the job's story (negative prompt, size; seed 0). A
kolors-job ``prompts.json`` — a story's or a sample's — is a prompts file too (its sampler and image
records are ignored), so a story can be redrawn frame for frame with another LoRA or scale.

Like the manifest, the file is strict (a typo such as ``sede: 3`` fails) and every problem is one line
naming the file and the field, exit 2.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError, field_validator

from kolors_job import storage
from kolors_job.core.errors import ManifestError, StorageNotFoundError
from kolors_job.core.redact import one_line, redact_uri
from kolors_job.manifest.fields import MAX_PROMPT_CHARS, Strict
from kolors_job.manifest.load import MAX_MANIFEST_BYTES, NoAliasLoader, format_validation_error
from kolors_job.manifest.story import Frame, StorySpec

__all__ = [
    "MAX_PROMPTS",
    "PromptDefaults",
    "PromptsFile",
    "SamplePrompt",
    "SamplePromptSpec",
    "command_line",
    "load_prompts_file",
    "parse_prompts_file",
    "resolve_prompts",
]

MAX_PROMPTS = 256
"""Rows of one sample grid: enough for any comparison, small enough that a typo cannot queue 10⁶ images."""

Side = Field(None, ge=64, le=4096, multiple_of=8)  # the story's bounds on width and height
Seed = Field(None, ge=0, le=2**32 - 1)


class SamplePromptSpec(Frame):
    """One prompt: a story frame's fields (prompt, seed, negative_prompt, negative_prompt_extra) plus a size."""

    width: int | None = Side
    height: int | None = Side


class PromptDefaults(Strict):
    """The defaults of the prompts that do not set a field: a prompts file's top level, or the command line's
    ``--negative``, ``--seed``, ``--width``, ``--height``."""

    negative_prompt: str | None = Field(None, max_length=MAX_PROMPT_CHARS)
    seed: int | None = Seed
    width: int | None = Side
    height: int | None = Side


class PromptsFile(PromptDefaults):
    """A prompts file: defaults, then the prompts."""

    prompts: list[SamplePromptSpec] = Field(min_length=1, max_length=MAX_PROMPTS)
    """Each a string (the prompt alone) or a mapping with ``prompt`` and any of ``negative_prompt``,
    ``negative_prompt_extra``, ``seed``, ``width``, ``height``."""

    @field_validator("prompts", mode="before")
    @classmethod
    def _strings(cls, v: Any) -> Any:
        return [{"prompt": p} if isinstance(p, str) else p for p in v] if isinstance(v, list) else v


@dataclass(frozen=True)
class SamplePrompt:
    """A prompt with every setting resolved: what one grid row draws."""

    prompt: str
    negative_prompt: str
    seed: int
    width: int
    height: int


def _kolors_job_prompts(doc: Mapping[str, Any]) -> dict[str, Any]:
    """A story's or a sample's ``prompts.json`` as a prompts file: its frames' (or prompts') prompt, resolved
    negative prompt, seed and size; the records of what was drawn (sampler, images, scores) left out."""
    sampler = doc.get("sampler") if isinstance(doc.get("sampler"), Mapping) else {}
    rows = doc.get("frames", doc.get("prompts"))
    keep = ("prompt", "negative_prompt", "seed", "width", "height")
    out: dict[str, Any] = {k: sampler[k] for k in ("width", "height") if k in sampler}
    out["prompts"] = (
        [{k: r[k] for k in keep if k in r} if isinstance(r, Mapping) else r for r in rows]
        if isinstance(rows, list)
        else rows
    )
    return out


def parse_prompts_file(raw: bytes, source: str) -> PromptsFile:
    """YAML or JSON bytes (JSON is YAML) → a validated file; ``ManifestError`` (exit 2), one line a problem."""
    if len(raw) > MAX_MANIFEST_BYTES:
        raise ManifestError(f"{source}: {len(raw)} bytes is larger than the {MAX_MANIFEST_BYTES}-byte limit")
    try:
        data = yaml.load(raw.decode("utf-8"), Loader=NoAliasLoader)  # noqa: S506 - a SafeLoader subclass
    except UnicodeDecodeError as e:
        raise ManifestError(f"{source}: not valid UTF-8 (byte {e.start})") from None
    except ManifestError as e:  # the loader's own: aliases, duplicate keys
        raise ManifestError(f"{source}: {e.problems[0].removeprefix('manifest: ')}") from None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise ManifestError(f"{source}: invalid YAML/JSON: {where}{e.problem}") from None
    except yaml.YAMLError as e:
        raise ManifestError(f"{source}: invalid YAML/JSON: {one_line(e)}") from None
    if isinstance(data, list):  # a bare list of prompts
        data = {"prompts": data}
    if not isinstance(data, dict):
        raise ManifestError(f"{source}: must be a mapping with a 'prompts' list (or a list of prompts)")
    if "sampler" in data:  # a kolors-job prompts.json
        data = _kolors_job_prompts(data)
    try:
        return PromptsFile.model_validate(data)
    except ValidationError as e:
        raise ManifestError([f"{source}: {line}" for line in format_validation_error(e)]) from None


def load_prompts_file(uri: str) -> PromptsFile:
    """Read a prompts file from a path, ``file://`` or any bucket URI (``s3://``, ``oss://``)."""
    shown = redact_uri(uri)
    try:
        if storage.is_bucket_uri(uri):
            scheme, bucket, key = storage.split_uri(uri)
            parent, _, name = key.rstrip("/").rpartition("/")
            if not name or uri.endswith("/"):
                raise ManifestError(f"{shown}: a prompts file is an object, not a prefix")
            store = storage.open_store(f"{scheme}://{bucket}/{parent}")
            if store.size(name) > MAX_MANIFEST_BYTES:  # a HEAD first: never read 50 MB to refuse it
                raise ManifestError(f"{shown}: larger than the {MAX_MANIFEST_BYTES}-byte limit")
            raw = store.read_bytes(name)
        else:
            path = Path(uri.removeprefix("file://")).expanduser()
            if not path.is_file():
                raise ManifestError(f"{shown}: cannot read the prompts file: no such file")
            if path.stat().st_size > MAX_MANIFEST_BYTES:
                raise ManifestError(f"{shown}: larger than the {MAX_MANIFEST_BYTES}-byte limit")
            raw = path.read_bytes()
    except ValueError as e:  # a malformed URI
        raise ManifestError(f"{shown}: {one_line(e)}") from None
    except StorageNotFoundError:  # like a missing manifest: exit 2, wherever it was looked for
        raise ManifestError(f"{shown}: cannot read the prompts file: no such object") from None
    return parse_prompts_file(raw, shown)


CLI_OPTIONS = {"negative_prompt": "--negative", "seed": "--seed", "width": "--width", "height": "--height",
               "prompts": "PROMPT"}  # fmt: skip
"""The command line's name of each field, for its one-line errors."""


def _cli_errors(err: ValidationError) -> ManifestError:
    lines = []
    for line in format_validation_error(err):
        where, _, msg = line.partition(":")
        head = where.split("[")[0].split(".")[0]
        lines.append(f"{CLI_OPTIONS.get(head, head)}{where[len(head) :]}:{msg}")
    return ManifestError(lines)


def command_line(prompts: list[str], options: Mapping[str, Any]) -> tuple[PromptsFile | None, PromptDefaults]:
    """The command line's prompts (None if it gives none) and its defaults, checked like a prompts file;
    the errors name the option (``--seed: Input should be greater than or equal to 0``)."""
    given = {k: v for k, v in options.items() if v is not None}
    try:
        defaults = PromptDefaults.model_validate(given)
        return (PromptsFile.model_validate({"prompts": prompts}) if prompts else None), defaults
    except ValidationError as e:
        raise _cli_errors(e) from None


def _pick(name: str, default: Any, *layers: PromptDefaults | SamplePromptSpec) -> Any:
    """The first layer that sets ``name`` decides; else ``default``."""
    for layer in layers:
        if name in layer.model_fields_set and getattr(layer, name) is not None:
            return getattr(layer, name)
    return default


def resolve_prompts(sources: list[PromptsFile], overrides: PromptDefaults, story: StorySpec) -> list[SamplePrompt]:
    """Every prompt of ``sources`` in order, each field from the prompt, else ``overrides`` (the command line's
    options), else its file's top level, else ``story`` (seed 0)."""
    out = []
    for source in sources:
        for p in source.prompts:
            negative = _pick("negative_prompt", story.negative_prompt, p, overrides, source)
            if p.negative_prompt_extra:
                negative = f"{negative}，{p.negative_prompt_extra}"  # as StorySpec.negative_for appends it
            out.append(
                SamplePrompt(
                    prompt=p.prompt,
                    negative_prompt=negative,
                    seed=_pick("seed", 0, p, overrides, source),
                    width=_pick("width", story.width, p, overrides, source),
                    height=_pick("height", story.height, p, overrides, source),
                )
            )
    if not out:
        raise ManifestError("no prompts: give them as arguments or in --prompts FILE")
    if len(out) > MAX_PROMPTS:
        raise ManifestError(f"prompts: {len(out)} prompts; at most {MAX_PROMPTS} in one sample")
    return out
