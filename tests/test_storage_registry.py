"""A storage backend is one class plus one ``register`` line: a test-only ``mem://`` store carries a real job.

The store below lives in this file only. Registered once (the ``mem_backend`` fixture), it is the
job's dataset source and its output: the manifest accepts ``mem://``, the dataset is copied into the
cache through it, and every output file (status, claim, LoRA, frames, report, ``_SUCCESS``) is written
to it. Unregistered again, ``mem://`` is refused as an unknown scheme.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest

from kolors_job import storage
from kolors_job.core.errors import ExitCode, ManifestError, StorageNotFoundError
from kolors_job.core.settings import Settings
from kolors_job.demo import build_demo_dataset, tiny_job
from kolors_job.manifest.spec import Manifest, parse_manifest
from kolors_job.runner import Job, run_job
from kolors_job.sources import fetch_dataset
from kolors_job.storage.atomic import atomic_target
from kolors_job.storage.base import Store, check_key, child_prefix


class MemStore(Store):
    """Buckets as dicts of key → bytes, shared by every store of the process (like a real service)."""

    buckets: ClassVar[dict[str, dict[str, bytes]]] = {}
    _lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, bucket: str, prefix: str, settings: Settings | None = None) -> None:
        self.bucket, self.prefix = bucket, prefix
        self.uri = f"mem://{bucket}/{prefix}"
        self._objects = MemStore.buckets.setdefault(bucket, {})

    def child(self, *parts: str) -> MemStore:
        sub = child_prefix(*parts)
        return MemStore(self.bucket, self.prefix + sub + "/" if sub else self.prefix)

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
def mem_backend() -> Iterator[dict[str, dict[str, bytes]]]:
    storage.register("mem", MemStore)  # the one line a new backend needs
    MemStore.buckets.clear()
    try:
        yield MemStore.buckets
    finally:
        storage.unregister("mem")
        MemStore.buckets.clear()


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
