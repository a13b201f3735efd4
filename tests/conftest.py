"""Shared fixtures. Storage servers live in tests/storage_servers/ and are registered at the bottom."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache dir per test session, so tiny models are built once and reused by every test."""
    env = os.environ.get("KOLORS_TEST_CACHE")
    path = Path(env) if env else tmp_path_factory.mktemp("kolors-cache")
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture
def job_env(shared_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Isolated runtime settings: shared model cache, private work dir, JSON logs."""
    monkeypatch.setenv("KOLORS_JOB_CACHE_DIR", str(shared_cache))
    monkeypatch.setenv("KOLORS_JOB_WORK_DIR", str(tmp_path / "work"))
    monkeypatch.setenv("KOLORS_JOB_LOG_FORMAT", "json")
    return tmp_path

# Storage test servers (moto S3, OSS proxy, radosgw): tests/storage_servers/fixtures.py
try:
    from tests.storage_servers.fixtures import *  # noqa: F403
except ModuleNotFoundError:  # tests/ is not a package and the repo root is not on sys.path
    from storage_servers.fixtures import *  # noqa: F403
