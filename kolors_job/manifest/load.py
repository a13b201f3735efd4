"""Reading a manifest: YAML (no aliases, no duplicate keys) from a file, a storage URI or the environment, size
capped, validated, every problem one line naming its field (exit 2); and the JSON Schema."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from kolors_job import storage
from kolors_job.core.errors import ManifestError, StorageNotFoundError
from kolors_job.core.redact import without_query
from kolors_job.core.uris import scheme_of
from kolors_job.manifest.dataset import DATASET_LIST_TAG, DATASET_TAG
from kolors_job.manifest.spec import Manifest

__all__ = ["NoAliasLoader", "format_validation_error", "json_schema", "load_manifest", "parse_manifest",
           "read_manifest_source"]  # fmt: skip

MAX_MANIFEST_BYTES = 1 << 20  # 1 MiB: a manifest is a page of YAML, not a data file


class NoAliasLoader(yaml.SafeLoader):
    """Safe YAML without anchors/aliases: an alias bomb expands exponentially during validation."""

    def compose_node(self, parent: Any, index: Any) -> Any:  # type: ignore[override]
        if self.check_event(yaml.AliasEvent):
            mark = self.peek_event().start_mark
            raise ManifestError(f"manifest: line {mark.line + 1}: YAML aliases (*name) are not allowed")
        return super().compose_node(parent, index)

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:  # type: ignore[override]
        """A repeated key is an error: YAML would silently keep the last one."""
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, (str, int, float, bool)) and key in seen:
                raise ManifestError(f"manifest: line {key_node.start_mark.line + 1}: duplicate key {key!r}")
            if isinstance(key, (str, int, float, bool)):
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _loc(loc: tuple[Any, ...]) -> str:
    parts: list[str] = []
    for p in loc:
        if isinstance(p, int):
            parts.append(f"[{p}]")
        else:
            parts.append(("." if parts else "") + str(p))
    return "".join(parts) or "manifest"


def format_validation_error(err: ValidationError) -> list[str]:
    lines = []
    for e in err.errors(include_url=False):
        loc = tuple(
            x for x in e["loc"]
            if not (isinstance(x, str) and (x.startswith("function-") or x in (DATASET_TAG, DATASET_LIST_TAG)))
        )
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown field (check the spelling; see `kolors-job schema`)"
        elif e["type"] == "missing":
            msg = "required field is missing"
        msg = msg.removeprefix("Value error, ")
        lines.append(f"{_loc(loc)}: {msg}")
    return lines


def parse_manifest(raw: bytes | str, *, source: str = "manifest") -> Manifest:
    """Parse YAML/JSON text into a validated Manifest, raising ManifestError with one line per problem."""
    if isinstance(raw, str):
        raw = raw.encode("utf-8", "surrogatepass")
    if len(raw) > MAX_MANIFEST_BYTES:
        raise ManifestError(f"{source}: {len(raw)} bytes is larger than the {MAX_MANIFEST_BYTES}-byte limit")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ManifestError(f"{source}: not valid UTF-8 (byte {e.start})") from None
    if not text.strip():
        raise ManifestError(f"{source}: empty manifest; at least spec.output.uri is required")
    try:
        data = yaml.load(text, Loader=NoAliasLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise ManifestError(f"{source}: invalid YAML: {where}{e.problem}") from None
    except yaml.YAMLError as e:
        raise ManifestError(f"{source}: invalid YAML: {str(e).splitlines()[0]}") from None
    except RecursionError:
        raise ManifestError(f"{source}: invalid YAML: nested too deeply") from None
    if data is None:
        raise ManifestError(f"{source}: empty manifest; at least spec.output.uri is required")
    if not isinstance(data, dict):
        raise ManifestError(f"{source}: must be a mapping with apiVersion/kind/metadata/spec")
    try:
        return Manifest.model_validate(data)
    except ValidationError as e:
        raise ManifestError(format_validation_error(e)) from None
    except RecursionError:
        raise ManifestError(f"{source}: nested too deeply") from None


def read_manifest_source(uri: str) -> tuple[bytes, str]:
    """Read manifest bytes from a path, ``file://``, ``s3://`` or ``oss://`` URI. A URI with a query (a signed
    URL) is refused without echoing it: storage URIs have no use for one."""
    scheme = scheme_of(uri)
    shown = without_query(uri) if scheme else uri
    if scheme and ("?" in uri or "#" in uri):
        raise ManifestError(f"{shown}: a manifest URI must not carry a query or fragment (a signed URL is not one)")
    if not scheme or ((b := storage.backend(scheme)) is not None and b.local):
        path = Path(uri[len(f"{scheme}://") :] if scheme else uri)
        return _read_regular_file(path, uri), str(path)
    try:
        scheme, bucket, key = storage.split_uri(uri)
    except ValueError as e:
        raise ManifestError(f"{shown}: {e}") from None
    key = key.rstrip("/")  # split_uri reads the path as a prefix and adds a slash
    if not key or uri.endswith("/"):
        raise ManifestError(f"{shown}: manifest URI must be a path or a {storage.listed_schemes()} object")
    parent, _, name = key.rpartition("/")
    store = storage.open_store(f"{scheme}://{bucket}/{parent}")
    try:
        if (size := store.size(name)) > MAX_MANIFEST_BYTES:  # a HEAD first: never read 50 MB to refuse it
            raise ManifestError(f"{shown}: {size} bytes is larger than the {MAX_MANIFEST_BYTES}-byte limit")
        return store.read_bytes(name), shown
    except StorageNotFoundError:  # a missing manifest is exit 2, wherever it was looked for
        raise ManifestError(f"{shown}: cannot read manifest: no such object") from None


def _read_regular_file(path: Path, uri: str) -> bytes:
    """Read at most the size limit from a regular file: a directory, FIFO or device is refused, not read."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as e:
        raise ManifestError(f"{uri}: cannot read manifest: {e.strerror}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ManifestError(f"{uri}: cannot read manifest: not a regular file")
    with os.fdopen(fd, "rb") as f:
        try:
            raw = f.read(MAX_MANIFEST_BYTES + 1)
        except OSError as e:
            raise ManifestError(f"{uri}: cannot read manifest: {e.strerror}") from None
    if len(raw) > MAX_MANIFEST_BYTES:
        raise ManifestError(f"{uri}: larger than the {MAX_MANIFEST_BYTES}-byte limit")
    return raw


def load_manifest(path_or_uri: str | None = None, *, environ: dict[str, str] | None = None) -> Manifest:
    """Load from ``--manifest``, else ``KOLORS_JOB_MANIFEST`` (inline), else ``KOLORS_JOB_MANIFEST_URI``."""
    env = os.environ if environ is None else environ
    if path_or_uri:
        raw, source = read_manifest_source(path_or_uri)
    elif env.get("KOLORS_JOB_MANIFEST"):
        raw, source = env["KOLORS_JOB_MANIFEST"].encode("utf-8", "surrogateescape"), "KOLORS_JOB_MANIFEST"
    elif env.get("KOLORS_JOB_MANIFEST_URI"):
        raw, source = read_manifest_source(env["KOLORS_JOB_MANIFEST_URI"])
    else:
        raise ManifestError("no manifest: pass --manifest, or set KOLORS_JOB_MANIFEST or KOLORS_JOB_MANIFEST_URI")
    return parse_manifest(raw, source=source)


def json_schema() -> dict[str, Any]:
    schema = Manifest.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "kolors-job manifest (kolors-job/v1 LoraStoryJob)"
    return schema
