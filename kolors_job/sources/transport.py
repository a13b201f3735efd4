"""How the hub clients talk to the hubs: one tested transport each, with the job's own timeouts.

Both clients read their knobs from the environment once, when they are imported (``huggingface_hub.constants``,
``modelscope_hub.constants``), so :func:`apply` sets them in ``os.environ`` when this module is imported — the CLI
imports it before anything else, and ``kolors_job.sources`` before any of its modules — and child processes
(torchrun ranks) inherit them. :func:`check_in_force` says whether the clients loaded in this process run with them.

- **Hugging Face, plain HTTP, never Xet.** ``hf_xet`` is installed (diffusers pulls it in) and the real hub
  marks Xet-stored files with ``X-Xet-Hash`` headers, which would move those downloads to the Xet protocol:
  another transport, with its own timeouts, retries and error types, that no test here drives. The hub
  still serves every file over HTTP (the resolve URL's redirect), which is what ``HF_HUB_DISABLE_XET=1``
  makes ``huggingface_hub`` use.
- **One stall bound for every source.** ``KOLORS_JOB_STORAGE_READ_TIMEOUT_S`` (20 s), the bucket reads'
  idle timeout, is also both hubs' read timeout; ModelScope's download retries are cut so that a file
  that stops sending fails within ``KOLORS_JOB_STORAGE_DEADLINE_S`` (240 s): 6 tries of 20 s + 30 s of
  backoff = 150 s; ``huggingface_hub`` makes 6 tries (+5 s) = 125 s. Then the job exits 75 and the
  partial file stays for the rerun to resume.
- **No per-file total below a day.** ModelScope's client gives each file 3600 s, so a 4.9 GB shard below
  1.4 MB/s failed every hour; a stalled file is already bounded above, and a slow one that keeps moving
  (over the client's 1 kB/s floor per minute) is left to finish — a time limit on bytes still arriving
  would only restart it.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import MutableMapping

from pydantic import ValidationError

from kolors_job.core.settings import Settings

__all__ = ["MODELSCOPE_RETRY_BACKOFF", "PER_FILE_TOTAL_S", "apply", "check_in_force", "client_env"]

PER_FILE_TOTAL_S = 86_400
"""ModelScope's per-file budget (retries, lock waits and probes included): a day."""

MODELSCOPE_RETRY_BACKOFF = (0, 2, 4, 8, 16)
"""The waits before ModelScope's download retries 1-5 (urllib3 ``Retry(backoff_factor=1)``)."""

MAX_RETRY_AFTER_S = 10
"""ModelScope honours a 429's ``Retry-After`` up to this long (its default: 60 s) so retries fit the deadline."""


def modelscope_retries(read_timeout_s: int, deadline_s: float) -> int:
    """The most download retries (≤ the client's 5) whose stalled tries and waits fit in ``deadline_s``."""
    best = 0
    for retries in range(len(MODELSCOPE_RETRY_BACKOFF) + 1):
        if (retries + 1) * read_timeout_s + sum(MODELSCOPE_RETRY_BACKOFF[:retries]) <= deadline_s:
            best = retries
    return best


def client_env(settings: Settings) -> dict[str, str]:
    """The environment both hub clients need to run with the job's transport (integers: their parsers')."""
    read = max(1, math.ceil(settings.storage_read_timeout_s))
    return {
        "HF_HUB_DISABLE_XET": "1",
        "HF_HUB_DOWNLOAD_TIMEOUT": str(read),
        "HF_HUB_ETAG_TIMEOUT": str(read),
        "MODELSCOPE_DOWNLOAD_TIMEOUT": str(read),
        "MODELSCOPE_API_TIMEOUT": str(read),
        "MODELSCOPE_DOWNLOAD_MAX_RETRIES": str(modelscope_retries(read, settings.storage_deadline_s)),
        "MODELSCOPE_DOWNLOAD_RETRY_MAX_DELAY_SECONDS": str(MAX_RETRY_AFTER_S),
        "MODELSCOPE_DOWNLOAD_TOTAL_TIMEOUT": str(PER_FILE_TOTAL_S),
    }


def apply(environ: MutableMapping[str, str] | None = None, settings: Settings | None = None) -> dict[str, str]:
    """Set :func:`client_env` in ``environ`` (default ``os.environ``), overriding what was there: the job
    downloads only through the transport it tests. Returns what was set."""
    env = os.environ if environ is None else environ
    if settings is None:
        try:
            settings = Settings()
        except ValidationError:  # a bad KOLORS_JOB_* value is the CLI's to report; here the defaults hold
            settings = Settings.model_construct()
    values = client_env(settings)
    env.update(values)
    return values


def check_in_force(settings: Settings | None = None) -> list[str]:
    """What the hub clients already imported in this process run with that differs from :func:`client_env`
    (empty: in force). A client imported before :func:`apply` keeps its import-time values."""
    want = client_env(settings or Settings())
    wrong: list[str] = []
    hf = sys.modules.get("huggingface_hub.constants")
    if hf is not None:
        got = {
            "HF_HUB_DISABLE_XET": "1" if hf.HF_HUB_DISABLE_XET else "0",
            "HF_HUB_DOWNLOAD_TIMEOUT": str(hf.HF_HUB_DOWNLOAD_TIMEOUT),
            "HF_HUB_ETAG_TIMEOUT": str(hf.HF_HUB_ETAG_TIMEOUT),
        }
        wrong += [f"{k}={v} (want {want[k]})" for k, v in got.items() if v != want[k]]
    ms = sys.modules.get("modelscope_hub.constants")
    if ms is not None:
        got = {
            "MODELSCOPE_DOWNLOAD_TIMEOUT": str(ms.DOWNLOAD_TIMEOUT),
            "MODELSCOPE_DOWNLOAD_MAX_RETRIES": str(ms.DOWNLOAD_RETRY_TIMES),
            "MODELSCOPE_DOWNLOAD_TOTAL_TIMEOUT": str(ms.DOWNLOAD_TOTAL_TIMEOUT),
        }
        wrong += [f"{k}={v} (want {want[k]})" for k, v in got.items() if v != want[k]]
    return wrong


apply()  # at import: the CLI and ``kolors_job.sources`` import this module before any code path imports a hub client
