"""The job manifest: a typed, validated description of one LoRA-story job (its sections: ``dataset``,
``train``, ``story`` beside this module; loading it: ``load``).

Defaults are the reference "Kolors-LoRA style story" workflow's: the challenge notebook's story and
settings, trained as DiffSynth-Studio's Kolors trainer did when the notebook ran it (2024-08). So a manifest
with only ``spec.output.uri`` is the notebook's job, automated. ``spec.recipe: tuned`` swaps in kolors-job's
own choices (:mod:`kolors_job.manifest.recipe`), each still settable on its own. tests/test_reference_oracle.py checks
the resolved defaults against the reference's own sources (tests/reference/). Unknown fields are errors: a
typo such as ``rnak: 4`` must fail loudly, not silently train with rank 16.
"""

from __future__ import annotations

import hashlib
import json
from typing import Annotated, Any, Literal

import yaml
from pydantic import Field, field_validator, model_validator

from kolors_job import storage
from kolors_job.export.registry import default_format_names, dora_refusal, format_names
from kolors_job.manifest.dataset import Datasets, DatasetSpec
from kolors_job.manifest.fields import (
    JOB_ID_PATTERN,
    FreeText,
    ModelUri,
    Strict,
    check_uri,
    registered_name,
    source_schemes,
)
from kolors_job.manifest.recipe import REFERENCE_TRAIN_VAE, RecipeName, fill_switches
from kolors_job.manifest.story import StorySpec
from kolors_job.manifest.train import TrainSpec

__all__ = ["API_VERSION", "KIND", "Manifest", "Metadata", "ModelSpec", "OutputSpec", "ScoreSpec",
           "Spec"]  # fmt: skip

API_VERSION = "kolors-job/v1"
KIND = "LoraStoryJob"


class ModelSpec(Strict):
    base: ModelUri = "modelscope://Kwai-Kolors/Kolors-diffusers"
    """Kolors in diffusers layout: ``modelscope://`` or ``hf://`` repo, a bucket prefix, a local/mounted dir,
    or ``tiny://kolors``."""
    vae: ModelUri | None = None
    """Optional VAE override, e.g. ``modelscope://AI-ModelScope/sdxl-vae-fp16-fix`` for fp16 decode."""
    train_vae: ModelUri | None = REFERENCE_TRAIN_VAE
    """The VAE that encodes the *training* images only (the story decodes with ``vae`` or the model's own).
    The reference's: ``sdxl-vae-fp16-fix``, which DiffSynth's Kolors trainer encodes with, in fp16. ``null``:
    the story's VAE (recipe ``tuned``), in fp32 when training in fp16 unless its config says fp16 is safe."""

    @field_validator("base", "vae", "train_vae")
    @classmethod
    def _uri(cls, v: str | None) -> str | None:
        return None if v is None else check_uri(v, source_schemes())


class ScoreSpec(Strict):
    aesthetic_model: ModelUri = "modelscope://AI-ModelScope/aesthetics-predictor-v2-sac-logos-ava1-l14-linearMSE"
    """The aesthetics-predictor-v2 (CLIP ViT-L/14 + linear head) that scores the frames: a hub repo,
    a bucket prefix, a local dir or ``tiny://aesthetic``."""
    threshold: float = Field(6.0, ge=0.0, le=10.0)
    """The challenge rejects a story whose mean aesthetic score is below this."""
    gate: bool = True
    """Fail the job (exit 3, no ``_SUCCESS``... but every file kept) when the mean is under the threshold."""

    @field_validator("aesthetic_model")
    @classmethod
    def _uri(cls, v: str) -> str:
        return check_uri(v, source_schemes())


# one list: the export registry's names (like Scheduler above), checked and listed in the schema when used
LoraFormat = registered_name(format_names)


class OutputSpec(Strict):
    uri: str = Field(max_length=2048)
    """Where ``<job id>/`` goes: ``oss://bucket/prefix/``, ``s3://bucket/prefix/``, ``file://`` or a path."""
    job_id: str | None = Field(None, pattern=JOB_ID_PATTERN)
    """Defaults to ``metadata.name``; the CLI's ``--job-id`` overrides both."""
    lora_formats: list[LoraFormat] = Field(default_factory=lambda: list(default_format_names()), min_length=1)
    """LoRA file formats written to ``lora/`` (each registered export format; all by default)."""
    keep_checkpoints: int = Field(2, ge=1, le=1000)
    """Checkpoints kept in the output store; older ones are pruned, never the selected one."""
    modelscope_repo: str | None = Field(None, pattern=r"^[\w.-]+/[\w.-]+$")
    """Push the LoRA to this ModelScope model repo when the quality gate passes (token from the env)."""

    @field_validator("uri")
    @classmethod
    def _uri(cls, v: str) -> str:
        return check_uri(v, storage.schemes())


class Spec(Strict):
    recipe: RecipeName = "reference"
    """``reference``: every choice as the challenge notebook and DiffSynth's trainer made it (the story,
    bilinear resize, posterior mean, constant time ids, JPEG re-encoding, a random image per step, no EXIF
    turn, the fp16-fix VAE for encoding, notebook tiling); ``tuned``: kolors-job's own choices for those
    switches (README: "Differences from the reference"). A switch the manifest sets keeps its value."""
    model: ModelSpec = ModelSpec()
    """The base Kolors model (and an optional VAE)."""
    dataset: Datasets = DatasetSpec()
    """The training images: one dataset, or a list of datasets whose kept images train together (each
    drawn ``repeats`` times as often)."""
    train: TrainSpec = TrainSpec()
    """The LoRA training recipe."""
    story: StorySpec = StorySpec()
    """The story frames and how they are drawn."""
    score: ScoreSpec = ScoreSpec()
    """The aesthetic scoring and the quality gate."""
    output: OutputSpec
    """Where the job writes its outputs, and in which LoRA formats."""
    device: Literal["auto", "cuda", "cpu"] = "auto"
    """``auto``: the GPU when CUDA is usable — a full-size model (any hub or bucket one but ``tiny://``) without
    one stops before any network call (exit 4) unless ``--allow-cpu``; ``cpu``: run on the CPU on purpose (hours
    for a full-size job); ``cuda``: require a GPU."""

    @model_validator(mode="before")
    @classmethod
    def _recipe(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("recipe") in ("reference", "tuned"):
            return fill_switches(data, data["recipe"])
        return data

    @model_validator(mode="after")
    def _validation_frames(self) -> Spec:
        n = len(self.story.frames)
        if self.train.validation_every and any(not 1 <= i <= n for i in self.train.validation.frames):
            raise ValueError(f"train.validation.frames: indices must be story frames 1..{n}")
        return self

    @model_validator(mode="after")
    def _dora_formats(self) -> Spec:
        """A DoRA needs a LoRA file that carries its magnitudes: a format that cannot is refused when asked for
        by name, and left out of the default list (the resolved manifest then shows which remain)."""
        if not self.train.dora:
            return self
        refused = {name: why for name in self.output.lora_formats if (why := dora_refusal(name))}
        if not refused:
            return self
        if "lora_formats" in self.output.model_fields_set:
            name, why = next(iter(refused.items()))
            raise ValueError(f"output.lora_formats: {name!r} cannot carry a DoRA (train.dora): {why}")
        self.output.lora_formats = [f for f in self.output.lora_formats if f not in refused]
        if not self.output.lora_formats:
            raise ValueError("output.lora_formats: no default format can carry a DoRA (train.dora); name one")
        return self

    @property
    def datasets(self) -> list[DatasetSpec]:
        """``dataset`` as a list (one entry for the single-mapping form)."""
        return list(self.dataset) if isinstance(self.dataset, list) else [self.dataset]


class Metadata(Strict):
    name: str = Field("kolors-lora-story", pattern=JOB_ID_PATTERN)
    """Lower-case DNS-label-like name; the default job id, so reruns find their own output."""
    labels: dict[str, Annotated[FreeText, Field(max_length=256)]] = Field(default_factory=dict, max_length=64)
    """Free-form ``key: value`` notes (e.g. who asked for the job); kept in ``manifest.resolved.yaml`` and
    report.json, not part of the manifest digest."""


class Manifest(Strict):
    apiVersion: Literal["kolors-job/v1"] = API_VERSION  # noqa: N815 - Kubernetes-style field names
    """Manifest format version: always ``kolors-job/v1``."""
    kind: Literal["LoraStoryJob"] = KIND
    """Always ``LoraStoryJob``."""
    metadata: Metadata = Metadata()
    """The job's name (its default job id) and free-form labels."""
    spec: Spec
    """What to train, draw, score and where to write it; only ``spec.output.uri`` is required."""

    @property
    def job_id(self) -> str:
        return self.spec.output.job_id or self.metadata.name

    def resolved(self) -> dict[str, Any]:
        """The manifest as run: defaults filled, every value byte for byte as given — so the stored copy has
        this manifest's digest and a stopped job always resumes. Nothing needs masking: URIs with
        credentials or queries and free text holding one are refused at validation."""
        return self.model_dump(mode="json")

    def digest(self) -> str:
        """Identity of the job's *work* (not its output location): same digest ⇒ same results."""
        data = self.model_dump(mode="json")
        data["spec"]["output"].pop("uri", None)
        data["spec"]["output"].pop("job_id", None)
        data.pop("metadata", None)
        blob = json.dumps(data, sort_keys=True, ensure_ascii=False).encode()
        return hashlib.sha256(blob).hexdigest()

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.resolved(), allow_unicode=True, sort_keys=False)
