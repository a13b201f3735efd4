"""A storage backend is its own module (a store and its settings), one ``register`` line and one extra: the
recipe of docs/adding-a-storage-backend.md, followed here by a test-only ``mem://`` store that carries a real job.

The store and its settings class live in this file only. Registered once (the ``mem_backend`` fixture), it is
the job's dataset source and its output: the manifest accepts ``mem://``, the dataset is copied into the cache
through it, every output file (status, claim, LoRA, frames, report, ``_SUCCESS``) is written to it, and it reads
its own settings (``KOLORS_JOB_MEM_*``) from the environment; ``kolors-job validate`` asks them what is missing.
Unregistered again, ``mem://`` is refused as an unknown scheme. The real backends' extras (``pyproject.toml``) are
checked against the lock: each SDK a backend imports is installed by its extra and pinned.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest
from pydantic_settings import BaseSettings, SettingsConfigDict

from kolors_job import storage
from kolors_job.core.errors import ExitCode, ManifestError, StorageNotFoundError
from kolors_job.core.settings import Settings
from kolors_job.demo import build_demo_dataset, tiny_job
from kolors_job.job.context import Job
from kolors_job.manifest.load import parse_manifest
from kolors_job.manifest.spec import Manifest
from kolors_job.runner import run_job
from kolors_job.sources import fetch_dataset
from kolors_job.storage.atomic import atomic_target
from kolors_job.storage.base import Store, check_key, child_prefix


class MemSettings(BaseSettings):
    """The backend's own settings, from its own environment (``KOLORS_JOB_MEM_*``)."""

    model_config = SettingsConfigDict(env_prefix="KOLORS_JOB_MEM_", extra="ignore")

    region: str | None = None
    """Which of the process's "regions" holds the buckets (a real service: the endpoint)."""

    def missing(self) -> str | None:
        return None if self.region else "needs a region where the job runs (KOLORS_JOB_MEM_REGION)"


class MemStore(Store):
    """Buckets as dicts of key → bytes, shared by every store of the process (like a real service)."""

    regions: ClassVar[dict[str, dict[str, dict[str, bytes]]]] = {}
    _lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, bucket: str, prefix: str, region: str) -> None:
        self.bucket, self.prefix, self.region = bucket, prefix, region
        self.uri = f"mem://{bucket}/{prefix}"
        self._objects = MemStore.regions.setdefault(region, {}).setdefault(bucket, {})

    @classmethod
    def open(cls, bucket: str, prefix: str, settings: Settings) -> MemStore:
        own = settings.backend("mem", MemSettings)
        if own.region is None:
            raise ValueError(f"mem://{bucket}/: {own.missing()}")
        return cls(bucket, prefix, own.region)

    def child(self, *parts: str) -> MemStore:
        sub = child_prefix(*parts)
        return MemStore(self.bucket, self.prefix + sub + "/" if sub else self.prefix, self.region)

    def read_bytes(self, key: str) -> bytes:
        try:
            return self._objects[self.prefix + check_key(key)]
        except KeyError:
            raise StorageNotFoundError(f"not found: {self.uri}{key}") from None

    def write_bytes(self, key: str, data: bytes, *, if_absent: bool = False) -> bool:
        with self._lock:
            full = self.prefix + check_key(key)
            if if_absent and full in self._objects:
                return False
            self._objects[full] = bytes(data)
            return True

    def upload_file(self, key: str, path: Path) -> None:
        self.write_bytes(key, Path(path).read_bytes())

    def download_file(self, key: str, path: Path) -> None:
        data = self.read_bytes(key)
        with atomic_target(Path(path)) as tmp:
            tmp.write_bytes(data)

    def exists(self, key: str) -> bool:
        return self.prefix + check_key(key) in self._objects

    def size(self, key: str) -> int:
        return len(self.read_bytes(key))

    def list(self, prefix: str = "") -> list[str]:
        start = self.prefix + prefix
        return sorted(k[len(self.prefix) :] for k in list(self._objects) if k.startswith(start))

    def delete(self, key: str) -> None:
        with self._lock:
            self._objects.pop(self.prefix + check_key(key), None)


@pytest.fixture
def mem_backend(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, dict[str, bytes]]]:
    storage.register("mem", MemStore, settings=MemSettings)  # the one line a new backend needs (+ its extra)
    monkeypatch.setenv("KOLORS_JOB_MEM_REGION", "here")
    MemStore.regions.clear()
    try:
        yield MemStore.regions.setdefault("here", {})
    finally:
        storage.unregister("mem")
        MemStore.regions.clear()


def _manifest(data: str, output: str, **overrides: Any) -> Manifest:
    tiny = {"dataset.caption": {"fixed": None}, "train.steps": 2, "train.batch_size": 2,
            "train.checkpoint_every": 2, "story.steps": 2, **overrides}  # fmt: skip
    doc = tiny_job(Path("unused"), output, tiny)
    doc["spec"]["dataset"]["source"] = data
    return Manifest.model_validate(doc)


def test_a_registered_backend_carries_a_whole_job(
    mem_backend: dict[str, dict[str, bytes]], job_env: Path, shared_cache: Path
) -> None:
    local = build_demo_dataset(job_env / "ds", n=4)
    data = storage.open_store("mem://data/sets/anime/")
    data.upload_dir(local)
    assert set(MemStore.regions) == {"here"}, "the store read its region from its own environment"
    settings = Settings(cache_dir=shared_cache, work_dir=job_env / "work")

    outcome = run_job(Job(_manifest("mem://data/sets/anime", "mem://out/runs/"), settings=settings))

    assert outcome.exit_code == ExitCode.OK, outcome.message
    out = storage.open_store("mem://out/runs/tiny-job/")
    keys = set(out.list())
    for key in ("manifest.resolved.yaml", "status.json", "lora/pytorch_lora_weights.safetensors",
                "story.jpg", "report.json", "_SUCCESS", *(f"images/{i:02d}.png" for i in range(1, 9))):
        assert key in keys, sorted(keys)
    assert json.loads(out.read_text("status.json"))["state"] == "succeeded"
    report = json.loads(out.read_text("report.json"))
    assert report["dataset"]["kept"] == 4 and report["dataset"]["source"] == "mem://data/sets/anime"
    from safetensors.torch import load

    assert load(out.read_bytes("lora/pytorch_lora_weights.safetensors"))  # the LoRA loads from its bytes
    # the dataset went through the source layer's cache, byte for byte
    copy = fetch_dataset(_manifest("mem://data/sets/anime", "mem://out/x/").spec.dataset, settings)
    assert copy.is_relative_to(shared_cache / "datasets")
    files = {p.name: p.read_bytes() for p in local.iterdir() if not p.name.startswith(".")}
    assert {p.name: p.read_bytes() for p in copy.iterdir() if not p.name.startswith(".")} == files


def test_an_unregistered_backend_is_an_unknown_scheme(mem_backend: dict[str, dict[str, bytes]]) -> None:
    assert "mem" in storage.schemes() and storage.is_bucket_uri("mem://b/p")
    storage.unregister("mem")
    assert "mem" not in storage.schemes() and not storage.is_bucket_uri("mem://b/p")
    with pytest.raises(ManifestError, match=r"spec.output.uri: unsupported scheme 'mem'; use one of oss://, s3://"):
        parse_manifest("spec: {output: {uri: 'mem://out/runs/'}}")
    with pytest.raises(ValueError, match=r"unsupported storage URI scheme 'mem'"):
        storage.open_store("mem://out/runs/")


def test_a_registered_backend_gets_the_bucket_uri_checks(mem_backend: dict[str, dict[str, bytes]]) -> None:
    for uri, problem in (("mem://user:pw@b/p", "must not carry credentials"), ("mem:///p", "needs a bucket name"),
                         ("mem://b/a/../c", "'.' or '..' path segments")):  # fmt: skip
        with pytest.raises(ManifestError, match=problem):
            parse_manifest(f"spec: {{output: {{uri: '{uri}'}}}}")


def test_validate_asks_a_backends_settings_what_is_missing(
    mem_backend: dict[str, dict[str, bytes]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``kolors-job validate`` notes a URI whose backend lacks a setting here, in the backend's own words: the CLI
    names no scheme (OSS's endpoint note comes the same way, tests/test_launch_k8s.py)."""
    from kolors_job.cli import main

    m = tmp_path / "m.yaml"
    m.write_text("spec: {output: {uri: 'mem://out/runs/'}, dataset: {source: 'mem://data/sets/'}}")
    monkeypatch.delenv("KOLORS_JOB_MEM_REGION")
    assert main(["validate", str(m)]) == 0
    notes = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("# note:")]
    assert notes == [
        "# note: spec.dataset.source: mem://data/sets/ needs a region where the job runs (KOLORS_JOB_MEM_REGION)",
        "# note: spec.output.uri: mem://out/runs/ needs a region where the job runs (KOLORS_JOB_MEM_REGION)",
    ]
    monkeypatch.setenv("KOLORS_JOB_MEM_REGION", "here")
    assert main(["validate", str(m)]) == 0
    assert "# note:" not in capsys.readouterr().err


def test_a_backend_whose_sdk_is_missing_names_its_extra() -> None:
    """The store module is imported when a first URI of its scheme is opened: an SDK that is not installed is one
    line naming the extra that installs it (exit 4), not an ImportError deep in a stage."""
    from kolors_job.core.errors import JobError

    storage.register("nosdk", "kolors_job_test_absent_sdk.store:Store", extra="nosdk")
    try:
        with pytest.raises(JobError, match=r"^nosdk:// needs kolors_job_test_absent_sdk, which is not installed here: "
                                           r"pip install 'kolors-job\[nosdk\]'$") as err:
            storage.open_store("nosdk://bucket/p/")
        assert err.value.exit_code == ExitCode.INVALID_INPUT
    finally:
        storage.unregister("nosdk")


def test_each_backend_owns_its_settings_and_an_extra_the_lock_pins() -> None:
    """s3:// and oss:// each name their own settings class (``KOLORS_JOB_<SCHEME>_*``, none of it in the job's
    common ``Settings``) and an extra of pyproject.toml whose packages requirements.lock pins; their SDKs come only
    through that extra; ``all`` names every extra and ``make lock`` resolves ``.[all]``."""
    import re

    import tomllib

    root = Path(__file__).resolve().parents[1]
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]

    def names(reqs: list[str]) -> set[str]:
        return {re.split(r"[<>=!~\[; ]", r)[0].lower() for r in reqs}

    lock = names([ln for ln in (root / "requirements.lock").read_text().splitlines() if ln and ln[0] != "#"])
    backends = [storage.backend(s) for s in storage.schemes() if not storage.backend(s).local]
    assert {b.scheme for b in backends} == {"s3", "oss"}
    assert extras["all"] == [f"kolors-job[{','.join(b.extra for b in backends[::-1])}]"]
    for b in backends:
        assert b.extra in extras, b.scheme
        assert names(extras[b.extra]) <= lock, f"{b.scheme}: its extra {b.extra!r} is not all pinned in the lock"
        sdk = re.split(r"[<>=!~\[; ]", extras[b.extra][0])[0]
        assert sdk in ("boto3", "oss2") and sdk not in names(project["dependencies"]), "the SDK comes with the extra"
        assert b.settings is not None and b.settings.model_config["env_prefix"] == f"KOLORS_JOB_{b.scheme.upper()}_"
        assert not any(f.startswith(f"{b.scheme}_") for f in Settings.model_fields), "no backend field in Settings"
        assert b.store_class().__module__ == f"kolors_job.storage.{b.scheme}.store"
    assert "'.[all]'" in (root / "Makefile").read_text(), "make lock resolves every extra"
