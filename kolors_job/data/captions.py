"""Captions of a local dataset: ``metadata.csv``/``metadata.jsonl`` rows and ``.txt`` sidecars, read
without trusting them (size caps, names that stay inside the root, undecodable bytes kept apart)."""

from __future__ import annotations

import codecs
import csv
import io
import json
import os
import posixpath
import stat
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kolors_job.manifest.dataset import CaptionSpec

__all__ = ["BAD_UTF8", "METADATA_NAMES", "Metadata", "caption_for", "finish_caption", "read_metadata"]

METADATA_NAMES = ("metadata.csv", "metadata.jsonl")
MAX_METADATA_BYTES = 256 << 20
MAX_SIDECAR_BYTES = 1 << 20

BAD_UTF8 = object()
"""Caption placeholder: a metadata row / sidecar for this image exists but is not UTF-8."""


def is_inside(root_real: str, path: str) -> bool:
    """Whether ``path``, symlinks resolved, stays under the (resolved) dataset root."""
    real = os.path.realpath(path)
    return real == root_real or real.startswith(root_real.rstrip(os.sep) + os.sep)


def has_surrogates(text: str) -> bool:
    """Whether ``text`` holds bytes that were not UTF-8 (kept as surrogates by ``surrogateescape``)."""
    return any("\udc80" <= ch <= "\udcff" for ch in text)


def _decode_lenient(data: bytes) -> str:
    """UTF-8 with undecodable bytes kept as surrogates, so one bad row does not lose the file."""
    return data.removeprefix(b"\xef\xbb\xbf").decode("utf-8", "surrogateescape")


@dataclass
class Metadata:
    captions: dict[str, Any] = field(default_factory=dict)  # rel path -> str | BAD_UTF8
    notes: Counter[str] = field(default_factory=Counter)

    def add(self, base_rel: str, file_name: Any, text: Any) -> None:
        # a name that is not UTF-8 (kept as surrogate escapes) is matched by its bytes, like the file it names
        if not isinstance(file_name, str) or not file_name:
            self.notes["metadata_rows_invalid"] += 1
            return
        if not isinstance(text, str):
            self.notes["metadata_rows_invalid"] += 1
            return
        rel = posixpath.normpath(posixpath.join(base_rel, file_name.replace("\\", "/")))
        if rel.startswith("../") or rel == ".." or posixpath.isabs(rel):
            self.notes["metadata_rows_invalid"] += 1
            return
        self.captions[rel] = BAD_UTF8 if has_surrogates(text) else text

    def read_csv(self, base_rel: str, data: bytes) -> None:
        try:
            reader = csv.DictReader(io.StringIO(_decode_lenient(data), newline=""))
            if not reader.fieldnames or "file_name" not in reader.fieldnames:
                self.notes["metadata_files_invalid"] += 1
                return
            for row in reader:
                self.add(base_rel, row.get("file_name"), row.get("text"))
        except (csv.Error, ValueError):
            self.notes["metadata_files_invalid"] += 1

    def read_jsonl(self, base_rel: str, data: bytes) -> None:
        for line in data.split(b"\n"):
            if not line.strip():
                continue
            try:
                row = json.loads(_decode_lenient(line))
            except (ValueError, RecursionError):
                self.notes["metadata_rows_invalid"] += 1
                continue
            if not isinstance(row, dict):
                self.notes["metadata_rows_invalid"] += 1
                continue
            self.add(base_rel, row.get("file_name"), row.get("text"))


def read_metadata(root: Path, root_real: str, files: list[str]) -> Metadata:
    meta = Metadata()
    for rel in files:
        base_rel, name = posixpath.split(rel)
        path = root / rel
        if not is_inside(root_real, str(path)):
            meta.notes["metadata_outside_root"] += 1
            continue
        try:
            st = os.stat(path)
            if not stat.S_ISREG(st.st_mode):
                raise OSError("not a regular file")
            if st.st_size > MAX_METADATA_BYTES:
                meta.notes["metadata_files_too_large"] += 1
                continue
            data = path.read_bytes()
        except OSError:
            meta.notes["metadata_files_unreadable"] += 1
            continue
        if name == "metadata.csv":
            meta.read_csv(base_rel or ".", data)
        else:
            meta.read_jsonl(base_rel or ".", data)
    return meta


def finish_caption(text: str, caption: CaptionSpec) -> tuple[str, bool]:
    full = caption.prefix + text
    if len(full) > caption.max_chars:
        return full[: caption.max_chars], True
    return full, False


def caption_for(root: Path, root_real: str, rel: str, caption: CaptionSpec, meta: Metadata) -> Any:
    """The raw caption text, ``BAD_UTF8``, or None. Metadata wins over a ``.txt`` sidecar."""
    if caption.fixed is not None:
        return caption.fixed
    if rel in meta.captions:
        return meta.captions[rel]
    sidecar = root / (posixpath.splitext(rel)[0] + ".txt")
    try:
        if not sidecar.is_file() or not is_inside(root_real, str(sidecar)):
            return None
        with open(sidecar, "rb") as f:
            data = f.read(MAX_SIDECAR_BYTES)
    except OSError:
        return None
    try:
        # not final when the read was cut at the cap: a multi-byte character split there is dropped,
        # not taken for invalid UTF-8 (the caption is truncated to max_chars later anyway)
        final = len(data) < MAX_SIDECAR_BYTES
        return codecs.getincrementaldecoder("utf-8-sig")().decode(data, final=final)
    except UnicodeDecodeError:
        return BAD_UTF8
