"""The one owner of turning a source URI into a cached local directory, for models and datasets.

Hubs (``modelscope://``, ``hf://``: ``hubs``), storage prefixes (every registered storage backend:
``buckets``), ``tiny://`` builds and plain paths. ``models`` checks what a model directory must hold;
``datasets`` exports hub datasets (parquet shards, or an archive/folder with a metadata file) to images +
``metadata.jsonl``; ``transport`` sets the hub clients' transport (plain HTTP, the job's timeouts) before
they are imported; ``hub_errors`` turns a client's failure into one line and an exit code; ``records``
keeps cache copies complete and built by one job at a time. Loading the files is not done here:
``kolors_job.models.loading`` loads models, ``kolors_job.data.scan`` scans and loads images.
"""

from __future__ import annotations

from . import transport  # noqa: F401 - first: sets the hub clients' environment before any imports them
from .buckets import SKIPPED_KEYS_FILE, copy_dataset_prefix, copy_model_prefix
from .datasets import DATASET_RECORD, export_rows, fetch_dataset, plan_dataset, source_record
from .hubs import (
    CLIP_PROCESSOR_FILES,
    DIFFUSERS_WEIGHTS,
    FULL_SIZE_UNET_BYTES,
    HUB_SCHEMES,
    TRANSFORMERS_WEIGHTS,
    HubRef,
    Listing,
    ModelKind,
    Plan,
    RemoteFile,
    SourceRecord,
    check_free_space,
    check_hub_uri,
    choose_weights,
    download,
    download_dataset_files,
    hub_error,
    list_dataset_repo,
    list_repo,
    local_variant,
    parse_hub_uri,
    plan_hub_model,
    select_files,
)
from .models import REQUIRED_FILES, TINY_SCHEME, fetch_model, is_full_size, plan_model, resolve_model, source_schemes

__all__ = [
    "CLIP_PROCESSOR_FILES",
    "DATASET_RECORD",
    "DIFFUSERS_WEIGHTS",
    "FULL_SIZE_UNET_BYTES",
    "HUB_SCHEMES",
    "REQUIRED_FILES",
    "SKIPPED_KEYS_FILE",
    "TINY_SCHEME",
    "TRANSFORMERS_WEIGHTS",
    "HubRef",
    "Listing",
    "ModelKind",
    "Plan",
    "RemoteFile",
    "SourceRecord",
    "check_free_space",
    "check_hub_uri",
    "choose_weights",
    "copy_dataset_prefix",
    "copy_model_prefix",
    "download",
    "download_dataset_files",
    "export_rows",
    "fetch_dataset",
    "fetch_model",
    "hub_error",
    "is_full_size",
    "list_dataset_repo",
    "list_repo",
    "local_variant",
    "parse_hub_uri",
    "plan_dataset",
    "plan_hub_model",
    "plan_model",
    "resolve_model",
    "select_files",
    "source_record",
    "source_schemes",
]
