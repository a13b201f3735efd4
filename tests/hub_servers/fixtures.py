"""Hub emulator fixtures, registered in ``tests/conftest.py``; everything on 127.0.0.1.

- ``hub_artifacts`` (session): the tiny artifacts in the real layouts, built once (~8 s):
  ``{"kolors", "kolors_both", "predictor", "predictor_custom", "anime", "anime_native", "anime_folder"}``
  -> directory.
- ``modelscope_hub`` / ``hf_hub`` (session): running emulators (:class:`ModelScopeHub`, :class:`HFHub`)
  with ``.url``, ``.downloads(repo_id) -> {path: bytes}``, ``.reset_downloads()``, ``.artifacts``
  (the dirs above), ``.repo(repo_type, repo_id)`` (``.commit``, ``.files`` with size/sha256,
  ``.file_commit(path)``), ``.env`` (the variables a child process needs to use the emulator),
  ``.cdn`` (the second host LFS downloads are redirected to), ``.failing(status, where, ...)`` (injected
  errors), ``.stalled(path, at)`` (a body that stops sending) and ``.region`` (what the region probe finds).
- ``modelscope_env`` / ``hf_env`` (per test): the same hub, with downloads reset, the endpoint variables
  set in this process and the client caches (``MODELSCOPE_CACHE``, ``HF_HOME``) in the test's tmp dir.
  Both also route every non-loopback HTTP(S) request to a dead proxy (``HTTP(S)_PROXY`` =
  127.0.0.1:9, ``NO_PROXY`` = 127.0.0.1): a client call that would leave the emulator fails at once
  instead of resolving a real hub's name.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from .artifacts import build_default_artifacts
from .hf_hub import HFHub
from .hf_hub import default_hub as default_hf_hub
from .modelscope_hub import ModelScopeHub
from .modelscope_hub import default_hub as default_modelscope_hub

__all__ = ["hf_env", "hf_hub", "hub_artifacts", "modelscope_env", "modelscope_hub"]


@pytest.fixture(scope="session")
def hub_artifacts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return build_default_artifacts(tmp_path_factory.mktemp("hub-artifacts"))


@pytest.fixture(scope="session")
def modelscope_hub(hub_artifacts: dict[str, Path]) -> Iterator[ModelScopeHub]:
    root = next(iter(hub_artifacts.values())).parent
    with default_modelscope_hub(root) as hub:
        yield hub


@pytest.fixture(scope="session")
def hf_hub(hub_artifacts: dict[str, Path]) -> Iterator[HFHub]:
    root = next(iter(hub_artifacts.values())).parent
    with default_hf_hub(root) as hub:
        yield hub


def _loopback_only(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
        monkeypatch.setenv(key, "http://127.0.0.1:9")
    for key in ("NO_PROXY", "no_proxy"):
        monkeypatch.setenv(key, "127.0.0.1,localhost")


@pytest.fixture
def modelscope_env(modelscope_hub: ModelScopeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> ModelScopeHub:
    modelscope_hub.reset_downloads()
    for key, value in modelscope_hub.env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("MODELSCOPE_CACHE", str(tmp_path / "modelscope-cache"))
    # the client reads MODELSCOPE_ENDPOINT into a process-wide config once: start from a fresh one
    monkeypatch.setattr("modelscope_hub.config._default_config", None)
    _loopback_only(monkeypatch)
    return modelscope_hub


@pytest.fixture
def hf_env(hf_hub: HFHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> HFHub:
    """Sets ``HF_ENDPOINT`` for child processes only: this process's ``huggingface_hub`` read it at import
    (pass ``endpoint=hf_env.url`` to in-process calls)."""
    hf_hub.reset_downloads()
    for key, value in hf_hub.env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    _loopback_only(monkeypatch)
    return hf_hub
