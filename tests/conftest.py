"""Shared fixtures. Storage servers live in tests/storage_servers/ and are registered at the bottom."""

from __future__ import annotations

import gc
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

# One OpenMP/MKL thread in every process the tests start (jobs, torchrun ranks, hub runs, sweep trials), as in
# this one (``_one_torch_thread``): tiny models' ops take microseconds, and a second thread only spin-waits —
# a subprocess job took twice the CPU time without this. Set before torch is imported; an explicit setting wins.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
# Never let an SDK's credential chain probe a cloud metadata service (ECS 100.100.100.200, EC2
# 169.254.169.254) from a test: only loopback is ours. Set before any SDK is imported (the Alibaba
# credentials package reads these at import time); subprocesses inherit them.
os.environ["ALIBABA_CLOUD_ECS_METADATA_DISABLED"] = "true"
os.environ["ALIBABA_CLOUD_CLI_PROFILE_DISABLED"] = "true"
os.environ["AWS_EC2_METADATA_DISABLED"] = "true"
os.environ.setdefault("MODELSCOPE_ENDPOINT", "http://127.0.0.1:9")  # discard port: hub calls fail fast
# The tests' hub and bucket models are tiny ones served from loopback, run on this CPU: a job refuses a
# non-tiny:// model without a GPU before any network call unless allowed (the refusal's own tests unset it).
os.environ.setdefault("KOLORS_JOB_ALLOW_CPU", "1")
# The hub clients' transport, as in a job (plain HTTP, the job's timeouts): set before any test imports a client,
# since both read it at import (kolors_job/sources/transport.py); subprocesses inherit it.
import kolors_job.sources  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread() -> Iterator[None]:
    """Tiny models' ops take microseconds: extra OpenMP threads only spin-wait (10x slower on a busy 2-core
    box). Session-wide, so module fixtures and tests compute with the same thread count (float reduction
    order); full-size ``slow`` tests raise it themselves (``all_torch_threads``)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session", autouse=True)
def _one_chatglm_tokenizer_per_process() -> Iterator[None]:
    """The ChatGLM tokenizer read once per process and set of files: its constructor builds the 65k-entry
    vocabulary in Python (~0.2 CPU-s; every component load, pipeline and trainer in this process made one).
    Each caller gets its own deep copy (~0.01 s), so none sees another's changes. The product keeps one per
    process too (``kolors_job.models.loading.load_tokenizer``: a job's training and story share it); this covers
    what the tests load through diffusers themselves (``KolorsPipeline.from_pretrained``, the tiny model's build)."""
    import copy

    from diffusers.pipelines.kolors.tokenizer import ChatGLMTokenizer

    from kolors_job.models.loading import files_digest

    read = ChatGLMTokenizer.from_pretrained.__func__
    loaded: dict[tuple[str, str], ChatGLMTokenizer] = {}

    def from_pretrained(cls, path, *args, **kwargs):
        folder = Path(path) / kwargs.get("subfolder", "")
        if cls is not ChatGLMTokenizer or args or not (folder / "tokenizer.model").is_file():
            return read(cls, path, *args, **kwargs)
        key = (files_digest(folder), repr(sorted((k, v) for k, v in kwargs.items() if k != "subfolder")))
        if key not in loaded:
            loaded[key] = read(cls, path, *args, **kwargs)
        return copy.deepcopy(loaded[key])

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ChatGLMTokenizer, "from_pretrained", classmethod(from_pretrained))
        yield


@pytest.fixture
def all_torch_threads() -> Iterator[None]:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)
    yield
    torch.set_num_threads(before)


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

# Whole-job scenarios run once per session and shared across files (the tiny S3 job, the finished tiny job):
# tests/scenarios.py
try:
    from tests.scenarios import *  # noqa: F403
except ModuleNotFoundError:
    from scenarios import *  # noqa: F403

# Hub emulators (ModelScope, Hugging Face) with the tiny models in the real layouts: tests/hub_servers/fixtures.py
try:
    from tests.hub_servers.fixtures import *  # noqa: F403
except ModuleNotFoundError:
    from hub_servers.fixtures import *  # noqa: F403


try:
    from tests.warm_start import WarmStarter
except ModuleNotFoundError:
    from warm_start import WarmStarter

_WARM = WarmStarter(modules=("kolors_job", "bench.gpu", "tests.warm_probe", "tests.procs"))
"""Started warm: the job, the CPU benchmark (tests/test_bench.py), the probe (tests/test_warm_start.py)."""


def pytest_configure(config) -> None:
    """Job subprocesses (``python -m kolors_job``) start as forks of a server that imported torch once
    (tests/warm_start.py); ``KOLORS_TEST_COLD=1`` starts each one cold."""
    gc.disable()  # what collection imports lives for the session: frozen once it is done, never walked before
    if os.environ.get("KOLORS_TEST_COLD", "") in ("", "0"):
        _WARM.layering = os.environ.get("KOLORS_TEST_LAYERS", "") != "0"
        _WARM.install()


_MODULES_FROZEN = [0]
"""How many modules were imported when the collector last froze what lives (below)."""
_NEW_MODULES_TO_FREEZE = 10
"""A test that imported this many modules more is followed by a freeze (``pytest_runtest_logfinish``)."""


def _freeze() -> None:
    gc.collect()
    gc.freeze()
    gc.enable()  # off while collection imported (pytest_configure)
    _MODULES_FROZEN[0] = len(sys.modules)


def pytest_collection_finish(session) -> None:
    """What collection imported (torch, diffusers, transformers, the SDKs, every test module: ~600k objects) lives
    for the whole session: out of the collector's sight (``gc.freeze``, after one collection) a full collection
    walks only what tests made since — the in-process jobs' ``free_memory()`` calls and Python's own gen-2 passes
    took a quarter of the CPU time of the files that train in-process (tests/README.md)."""
    _freeze()


@pytest.hookimpl(trylast=True)
def pytest_runtest_logfinish(nodeid, location) -> None:
    """What a test imported lazily lives for the session too — diffusers' and transformers' lazy submodules, the
    storage servers' backends, ChatGLM's code: hundreds of thousands of objects where a file's first test builds
    a pipeline — so it is frozen after that test (a collection first: no garbage is kept)."""
    if len(sys.modules) - _MODULES_FROZEN[0] >= _NEW_MODULES_TO_FREEZE:
        _freeze()


def pytest_unconfigure(config) -> None:
    _WARM.uninstall()


@pytest.fixture
def warm_starter() -> WarmStarter:
    """The session's warm starter (tests/test_warm_start.py checks what it starts)."""
    if not _WARM.installed:
        pytest.skip("KOLORS_TEST_COLD: every job process starts cold")
    return _WARM


def pytest_terminal_summary(terminalreporter) -> None:
    """Fault-injection totals (tests/test_faults.py): real counts from the fault proxies; how many job
    processes started warm."""
    if _WARM.warm or _WARM.cold or _WARM.failure:
        differed = ", ".join(sorted(_WARM.differed)) or "-"
        layers = (f" ({_WARM.preloaded} of them from {_WARM.layers_made} layers, their libraries preloaded"
                  f"{'; ' + _WARM.layer_failure if _WARM.layer_failure else ''})")  # fmt: skip
        terminalreporter.write_line(f"job processes: {_WARM.warm} started warm{layers}, {_WARM.restarted} of them again"
                                    f" cold where their CLI set what their layer's imports read otherwise,"
                                    f" {_WARM.cold} cold where the environment differed ({differed})"
                                    f"{'; ' + _WARM.failure if _WARM.failure else ''} (tests/warm_start.py)")
    try:
        from tests.storage_servers.fault_proxy import LEDGER
    except ModuleNotFoundError:
        from storage_servers.fault_proxy import LEDGER
    if LEDGER.injected:
        terminalreporter.write_sep("-", "fault injection")
        terminalreporter.write_line(LEDGER.summary())
