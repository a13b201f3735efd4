"""The one owner of turning a source URI into a cached local directory, for models and datasets.

Hubs (``modelscope://``, ``hf://``: ``listing`` and ``hubs``), storage prefixes (every registered storage
backend: ``buckets``), ``tiny://`` builds and plain paths. ``models`` checks what a model directory must
hold; ``datasets`` exports hub datasets (parquet shards, or an archive/folder with a metadata file) to
images + ``metadata.jsonl``; ``transport`` sets the hub clients' transport (plain HTTP, the job's
timeouts) before they are imported; ``hub_errors`` turns a client's failure into one line and an exit
code; ``records`` keeps cache copies complete and built by one job at a time; ``stage`` is the job's
``models`` stage. Loading the files is not done here: ``kolors_job.models.loading`` loads models,
``kolors_job.data`` scans and loads images.
"""

from __future__ import annotations

from . import transport  # noqa: F401 - first: sets the hub clients' environment before any imports them
from .datasets import fetch_dataset, plan_dataset, source_record
from .hubs import check_free_space
from .models import fetch_model, plan_model, resolve_model

__all__ = ["check_free_space", "fetch_dataset", "fetch_model", "plan_dataset", "plan_model", "resolve_model",
           "source_record"]  # fmt: skip
