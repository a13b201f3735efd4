"""``run --set PATH=VALUE``: one manifest field changed on the command line, validated like the manifest.

A sweep engine (Katib, PAI AutoML) runs one job with different values by substituting them into the
container's command, so a trial's values arrive as ``--set train.learning_rate=0.00012``. A path is
relative to ``spec`` (``train.rank``, ``story.lora_scale``, ``story.frames.2.seed``) and must name a field
the manifest has. The value is read as YAML (``16``, ``1.0e-4``, ``null``, ``[0.5, 2.0]``), or kept as the
text itself where YAML's reading does not validate (a caption ``16`` for a string field); then the whole
manifest is validated again, so a value the manifest refuses is refused here with the manifest's message
(exit 2). Each override is also recorded in the resolved manifest's ``metadata.labels`` as
``kolors-job/set.<path>: <text>``, beside the value it gave.
"""

from __future__ import annotations

import difflib
import hashlib
import re
from collections.abc import Iterable, Iterator
from typing import Any

import yaml
from pydantic import ValidationError

from kolors_job.core.errors import ManifestError
from kolors_job.manifest.fields import JOB_ID_PATTERN
from kolors_job.manifest.load import format_validation_error
from kolors_job.manifest.spec import Manifest

SET_LABEL = "kolors-job/set."
"""``metadata.labels`` key prefix of each ``--set`` path (labels are not part of the manifest digest)."""
NOT_SETTABLE = {
    "recipe": "the recipe fills switches when the manifest is read; set it in the manifest",
    "output.uri": "the engine gives every trial its output (run --output)",
    "output.job_id": "the engine names every trial (run --trial)",
}


def split_assignment(text: str, *, flag: str = "--set") -> tuple[str, str]:
    """``"train.rank=16"`` → ``("train.rank", "16")``."""
    path, sep, raw = text.partition("=")
    if not sep or not path.strip():
        raise ManifestError(f"{flag} {text!r}: expected PATH=VALUE, e.g. train.rank=16 (a path under spec)")
    return path.strip(), raw


def leaf_paths(node: Any, prefix: str = "") -> Iterator[str]:
    """Every settable path of a resolved spec dict: its fields, list items and their fields."""
    if isinstance(node, dict):
        for key, value in node.items():
            path = f"{prefix}.{key}" if prefix else str(key)
            yield path
            yield from leaf_paths(value, path)
    elif isinstance(node, list):
        for i, value in enumerate(node):
            path = f"{prefix}.{i}"
            yield path
            yield from leaf_paths(value, path)


def lookup(spec: dict[str, Any], path: str) -> tuple[bool, Any]:
    """``(found, value)`` of a dotted path in a resolved spec dict (integers index lists)."""
    node: Any = spec
    for part in path.split("."):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return False, None
    return True, node


def check_path(spec: dict[str, Any], path: str) -> str | None:
    """Why ``path`` cannot be set (a line without the field prefix), or None."""
    for blocked, why in NOT_SETTABLE.items():
        if path == blocked or path.startswith(blocked + "."):
            return f"cannot be swept or set: {why}"
    found, _ = lookup(spec, path)
    if found:
        return None
    close = difflib.get_close_matches(path, list(leaf_paths(spec)), n=1, cutoff=0.75)
    hint = f"; did you mean {close[0]}?" if close else ""
    return f"no such field in the manifest's spec (paths are under spec, see `kolors-job schema`){hint}"


def _assign(spec: dict[str, Any], path: str, value: Any) -> None:
    *parents, last = path.split(".")
    node: Any = spec
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value


def candidates(raw: str) -> list[Any]:
    """What ``raw`` may mean, in order: its YAML reading, then the text itself."""
    try:
        parsed = yaml.safe_load(raw) if raw.strip() else raw
    except yaml.YAMLError:
        return [raw]
    return [parsed] if parsed == raw else [parsed, raw]


def apply(manifest: Manifest, assignments: Iterable[tuple[str, Any]], *, flag: str = "--set",
          record: bool = True) -> Manifest:  # fmt: skip
    """``manifest`` with each ``(path, raw text or value)`` applied and the result validated.

    A raw ``str`` is tried as :func:`candidates` says; any other value is used as it is. Every problem is
    one line ``<flag> <path>: <message>``; all of them are raised together (exit 2).
    """
    doc = manifest.model_dump(mode="json")
    problems: list[str] = []
    for path, raw in assignments:
        if why := check_path(doc["spec"], path):
            problems.append(f"{flag} {path}: {why}")
            continue
        options = candidates(raw) if isinstance(raw, str) else [raw]
        first_error: list[str] | None = None
        for value in options:
            trial = _copy(doc)
            _assign(trial["spec"], path, value)
            errors = _errors(trial)
            if not errors:
                doc = trial
                break
            first_error = first_error or errors
        else:
            problems += [f"{flag} {path}: {_strip_field(line, path)}" for line in first_error or []]
            continue
        if record:
            text = raw if isinstance(raw, str) else yaml.safe_dump(raw, default_flow_style=True).strip()
            doc["metadata"]["labels"][f"{SET_LABEL}{path}"] = text[:256]
    if problems:
        raise ManifestError(problems)
    return Manifest.model_validate(doc)


def apply_text(manifest: Manifest, items: Iterable[str], *, flag: str = "--set") -> Manifest:
    """``apply`` for ``PATH=VALUE`` strings (the command line's form)."""
    return apply(manifest, [split_assignment(item, flag=flag) for item in items], flag=flag)


def recorded(labels: dict[str, str]) -> dict[str, str]:
    """The ``--set`` overrides a resolved manifest's labels record: ``{path: text}``."""
    return {k[len(SET_LABEL):]: v for k, v in labels.items() if k.startswith(SET_LABEL)}


def _copy(doc: dict[str, Any]) -> dict[str, Any]:
    import copy

    return copy.deepcopy(doc)


def _errors(doc: dict[str, Any]) -> list[str]:
    try:
        Manifest.model_validate(doc)
    except ValidationError as e:
        return format_validation_error(e)
    return []


def _strip_field(line: str, path: str) -> str:
    """``spec.train.rank: msg`` → ``msg`` when the line is about ``path`` itself; other lines stay whole."""
    head, sep, msg = line.partition(": ")
    return msg if sep and head in (f"spec.{path}", f"spec.{path.split('.')[0]}") else line


_BAD_ID = re.compile(r"[^a-z0-9._-]+")


def trial_job_id(name: str) -> str:
    """The job id of an engine's trial name: the name itself when it is a valid job id (Katib's are);
    otherwise lower-cased, with a digest of the name so ``mf99W4`` and ``mf99w4`` (PAI AutoML's mixed-case
    trial ids) stay two jobs."""
    if re.fullmatch(JOB_ID_PATTERN, name):
        return name
    if not name or "\x00" in name or len(name) > 200:
        raise ManifestError(f"--trial {name[:80]!r}: not a trial name (1-200 characters)")
    base = _BAD_ID.sub("-", name.lower()).strip("-._")[:54] or "trial"
    return f"{base}-{hashlib.sha256(name.encode()).hexdigest()[:8]}"
