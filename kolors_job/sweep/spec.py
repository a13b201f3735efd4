"""The sweep file: which manifest fields to search, how to score a trial, and how many trials to run.

    apiVersion: kolors-job/v1
    kind: LoraSweep
    metadata: {name: purple-sweep}          # the experiment: <output>/<name>/<trial>/
    spec:
      manifest: reference.yaml              # the job every trial runs (relative to this file, or a URI)
      parameters:                           # dotted paths under the manifest's spec
        train.learning_rate: {log_uniform: [3.0e-5, 3.0e-4]}
        train.rank: [8, 16, 32]
        story.lora_scale: {uniform: [0.4, 0.9]}
      objective: {weights: {mean_aesthetic: 1.0, consistency: 2.0}}   # or just: mean_aesthetic
      algorithm: random                     # random | grid | bayesianoptimization | tpe
      parallel_trials: 2
      max_trials: 12
      early_stopping: {min_trials: 3, start_step: 2}   # median stop on the validation points

It is validated like the manifest: unknown fields are errors, every problem is one line naming its field
path, exit 2. Each swept path must be a field of the manifest's spec, and every value it can take (each
listed value; a range's ends and middle) must pass the manifest's own validation for that field.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

from kolors_job.core.errors import ManifestError
from kolors_job.manifest.load import format_validation_error, parse_manifest, read_manifest_source
from kolors_job.manifest.spec import API_VERSION, Manifest
from kolors_job.sweep import overrides

KIND = "LoraSweep"
METRICS = ("mean_aesthetic", "consistency")
"""What a trial is scored on: the story's mean aesthetic score and its style consistency (report.json)."""
Algorithm = Literal["random", "grid", "bayesianoptimization", "tpe"]
NAME_PATTERN = r"^[a-z]([-a-z0-9]{0,38}[a-z0-9])?$"
"""Katib's experiment name rule (``validator.go``: ``^[a-z]([-a-z0-9]*[a-z0-9])?``, at most 40 characters)."""
SAFE_CHOICE = re.compile(r"^[\w.+:/@,=%-]+$")
"""A listed value an engine can put into a command line: both engines join the command's words with
spaces before a shell reads it (Katib's pod webhook; PAI's ``cmd``), so no spaces, quotes or ``$;&|<>``."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, populate_by_name=True)


_KINDS = {"uniform": "uniform", "log_uniform": "log_uniform", "int": "integer"}
"""A range's kind (its YAML key) → its field."""


class Range(_Strict):
    """A continuous or integer range; exactly one of ``uniform``, ``log_uniform`` or ``int``."""

    uniform: tuple[float, float] | None = None
    """Any real in [low, high], drawn uniformly."""
    log_uniform: tuple[float, float] | None = None
    """Any real in [low, high] (both > 0), uniform in its logarithm: learning rates."""
    integer: tuple[int, int] | None = Field(None, alias="int")
    """Any integer in [low, high] (the YAML key is ``int``)."""
    step: float | None = Field(None, gt=0)
    """Grid spacing (needed for ``uniform``/``log_uniform`` with ``algorithm: grid``; default 1 for ``int``)."""

    @model_validator(mode="after")
    def _one(self) -> Range:
        given = [k for k, f in _KINDS.items() if getattr(self, f) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of uniform: [low, high], log_uniform: [low, high], int: [low, high]")
        low, high = self.bounds
        if not low < high:
            raise ValueError(f"{self.kind}: low must be less than high")
        if self.kind == "log_uniform" and low <= 0:
            raise ValueError("log_uniform: both ends must be > 0")
        if self.kind == "int" and self.step is not None and self.step != round(self.step):
            raise ValueError("step of an int range must be a whole number")
        return self

    @property
    def kind(self) -> str:
        return next(k for k, f in _KINDS.items() if getattr(self, f) is not None)

    @property
    def bounds(self) -> tuple[float, float]:
        return getattr(self, _KINDS[self.kind])

    def probes(self) -> list[Any]:
        """Values that must all be valid for the field: both ends and the middle (geometric for log)."""
        low, high = self.bounds
        if self.kind == "int":
            return [int(low), int(high), int((low + high) // 2)]
        if self.kind == "log_uniform":
            return [low, high, math.sqrt(low * high), low * (high / low) ** 0.382]
        return [low, high, (low + high) / 2, low + (high - low) * 0.382]  # the last: rarely a whole number


def _space_kind(value: Any) -> str:
    return _LIST_TAG if isinstance(value, list) else _RANGE_TAG


_LIST_TAG, _RANGE_TAG = "__values__", "__range__"
Space = Annotated[
    Annotated[list[Any], Field(min_length=1, max_length=256), Tag(_LIST_TAG)] | Annotated[Range, Tag(_RANGE_TAG)],
    Discriminator(_space_kind),
]
"""A list of values, or a range (a mapping): each is validated as what it looks like, with its own errors."""


class Objective(_Strict):
    """How a finished trial is scored: a weighted sum of its report's metrics (higher is better)."""

    weights: dict[Literal["mean_aesthetic", "consistency"], float] = Field(min_length=1)
    """``mean_aesthetic`` (the gate's metric) and/or ``consistency`` (style coherence), each with a weight."""
    goal: float | None = None
    """Stop the sweep once a trial reaches this objective (Katib's ``objective.goal``)."""

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        return {"weights": {data: 1.0}} if isinstance(data, str) else data

    @field_validator("weights")
    @classmethod
    def _nonzero(cls, v: dict[str, float]) -> dict[str, float]:
        if not any(w for w in v.values()) or any(not math.isfinite(w) for w in v.values()):
            raise ValueError("at least one finite, non-zero weight")
        return v

    def text(self) -> str:
        """``mean_aesthetic=1,consistency=2``: how ``run --objective`` takes it."""
        return ",".join(f"{k}={v:g}" for k, v in self.weights.items())


class EarlyStopping(_Strict):
    """Median stopping on the validation points: a trial whose objective so far is below the median of
    the finished trials' at the same point is stopped (Katib's ``medianstop``; PAI's assessor)."""

    min_trials: int = Field(3, ge=1, le=1000)
    """Finished trials needed before any trial is stopped."""
    start_step: int = Field(1, ge=1, le=10_000)
    """Validation points a trial reports before it can be stopped."""


class SweepBody(_Strict):
    manifest: str = Field(min_length=1, max_length=2048)
    """The job every trial runs: a path relative to the sweep file, or a manifest URI."""
    parameters: dict[str, Space] = Field(min_length=1, max_length=32)
    """Dotted path under the manifest's ``spec`` → a list of values, or a range."""
    objective: Objective = Objective(weights={"mean_aesthetic": 1.0})
    """What ranks trials; a trial under the quality gate is *failed-gate*, never ranked above a passing one."""
    algorithm: Algorithm = "random"
    """How the engine picks the next values: random, grid, bayesianoptimization or tpe."""
    parallel_trials: int = Field(2, ge=1, le=100)
    """Trials running at once (each holds the job's GPUs)."""
    max_trials: int = Field(12, ge=1, le=1000)
    """Trials in all; a sweep costs about this many times one job's GPU time."""
    max_failed_trials: int | None = Field(None, ge=0)
    """Failed trials (quality gate included) after which the engine stops; default ``max_trials``."""
    early_stopping: EarlyStopping | None = None
    """Stop unpromising trials at their validation points (needs ``train.validation`` on)."""

    @model_validator(mode="after")
    def _counts(self) -> SweepBody:
        if self.parallel_trials > self.max_trials:
            raise ValueError("parallel_trials must be <= max_trials")
        if self.max_failed_trials is not None and self.max_failed_trials > self.max_trials:
            raise ValueError("max_failed_trials must be <= max_trials")
        return self

    @property
    def failed_trials_allowed(self) -> int:
        return self.max_trials if self.max_failed_trials is None else self.max_failed_trials


class SweepMetadata(_Strict):
    name: str = Field(pattern=NAME_PATTERN)
    """The experiment's name (Katib: at most 40 characters, a letter first): trials go to ``<output>/<name>/``."""
    labels: dict[str, str] = Field(default_factory=dict, max_length=64)


class Sweep(_Strict):
    apiVersion: Literal["kolors-job/v1"] = API_VERSION  # noqa: N815
    kind: Literal["LoraSweep"] = KIND
    metadata: SweepMetadata
    spec: SweepBody


@dataclass(frozen=True)
class LoadedSweep:
    """A validated sweep and the manifest its trials run."""

    sweep: Sweep
    base: Manifest
    manifest_raw: bytes
    manifest_source: str

    @property
    def name(self) -> str:
        return self.sweep.metadata.name

    @property
    def body(self) -> SweepBody:
        return self.sweep.spec


def parse_sweep(raw: bytes | str, *, source: str = "sweep") -> Sweep:
    """The sweep file's own fields, validated (one line per problem, exit 2)."""
    import yaml

    from kolors_job.manifest.load import NoAliasLoader  # the manifest's YAML rules: no aliases, no duplicate keys

    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
    try:
        data = yaml.load(text, Loader=NoAliasLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        raise ManifestError(f"{source}: invalid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ManifestError(f"{source}: must be a mapping with apiVersion/kind/metadata/spec")
    if data.get("kind") not in (None, KIND):
        raise ManifestError(f"{source}: kind: must be {KIND} (a job manifest is kind LoraStoryJob)")
    try:
        return Sweep.model_validate(data)
    except ValidationError as e:
        lines = format_validation_error(e)
        raise ManifestError([ln.replace(f".{_LIST_TAG}", "").replace(f".{_RANGE_TAG}", "") for ln in lines]) from None


def load_sweep(path_or_uri: str) -> LoadedSweep:
    """Read the sweep file and its manifest, and check every swept path and value against that manifest."""
    raw, source = read_manifest_source(path_or_uri)
    sweep = parse_sweep(raw, source=source)
    ref = sweep.spec.manifest
    if "://" not in ref and not Path(ref).is_absolute():  # relative to the sweep file, wherever that is
        scheme, sep, rest = path_or_uri.partition("://")
        if sep and scheme != "file":
            ref = f"{scheme}://{rest.rsplit('/', 1)[0]}/{ref}"
        else:
            ref = str(Path(rest if sep else path_or_uri).parent / ref)
    try:
        manifest_raw, manifest_source = read_manifest_source(ref)
    except ManifestError as e:
        raise ManifestError([f"spec.manifest: {p}" for p in e.problems]) from None
    try:
        base = parse_manifest(manifest_raw, source=manifest_source)
    except ManifestError as e:
        raise ManifestError([f"spec.manifest ({manifest_source}): {p}" for p in e.problems]) from None
    check_against(sweep, base)
    return LoadedSweep(sweep, base, manifest_raw, manifest_source)


def check_against(sweep: Sweep, base: Manifest) -> None:
    """Every swept path exists in ``base``'s spec and every value it may take validates there."""
    body = sweep.spec
    problems: list[str] = []
    spec_doc = base.model_dump(mode="json")["spec"]
    names: dict[str, str] = {}
    for path, space in body.parameters.items():
        where = f"spec.parameters.{path}"
        if why := overrides.check_path(spec_doc, path):
            problems.append(f"{where}: {why}")
            continue
        key = param_key(path)
        if key in names:
            problems.append(f"{where}: collides with {names[key]} as an engine parameter name ({key})")
        names[key] = path
        if isinstance(space, Range):
            values: list[Any] = space.probes()
            current = overrides.lookup(spec_doc, path)[1]
            if space.kind != "int" and isinstance(current, int) and not isinstance(current, bool):
                problems.append(f"{where}: an integer field: use int: [low, high] (or a list)")
                continue
            if body.algorithm == "grid" and space.kind != "int" and space.step is None:
                problems.append(f"{where}: algorithm grid needs a step for a {space.kind} range (or a list)")
        else:
            values = list(space)
            if len({repr(v) for v in values}) != len(values):
                problems.append(f"{where}: values must be distinct")
            for v in values:
                if not isinstance(v, (int, float, str)) or (isinstance(v, str) and not SAFE_CHOICE.match(v)):
                    problems.append(f"{where}: {v!r}: a listed value must be a number or a word without spaces, "
                                    "quotes or shell characters (the engines put it into a command line)")  # fmt: skip
                    break
        for value in values:
            try:
                overrides.apply(base, [(path, value)], flag=where, record=False)
            except ManifestError as e:
                problems += [p.replace(f"{where} {path}: ", f"{where}: {value!r}: ", 1) for p in e.problems]
                break
    if body.early_stopping is not None and not base.spec.train.validation_every:
        problems.append("spec.early_stopping: needs validation points, but the manifest's train.validation.every is 0")
    if problems:
        raise ManifestError(problems)


def param_key(path: str) -> str:
    """A path as an engine parameter name: ``train.learning_rate`` → ``train-learning-rate`` (Katib's names
    and PAI's ``${...}`` placeholders both take it)."""
    return re.sub(r"[^A-Za-z0-9]+", "-", path).strip("-").lower()
