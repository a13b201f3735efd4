"""What every section of the manifest is made of: strict models, URIs checked against the schemes that exist at
validation time, free text that may hold no credential, names from a registry."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, GetPydanticSchema, PlainValidator
from pydantic_core import PydanticCustomError

from kolors_job import storage
from kolors_job.core.redact import holds_secret
from kolors_job.core.uris import HUB_SCHEMES, TINY_SCHEME, check_hub_uri, scheme_of

__all__ = ["JOB_ID_PATTERN", "MAX_PROMPT_CHARS", "FreeText", "ModelUri", "Strict", "check_uri", "registered_name",
           "source_schemes"]  # fmt: skip

MAX_PROMPT_CHARS = 2000
JOB_ID_PATTERN = r"^[a-z0-9]([a-z0-9._-]{0,61}[a-z0-9])?$"


class Strict(BaseModel):
    model_config = ConfigDict(
        extra="forbid", str_max_length=100_000, validate_default=True, use_attribute_docstrings=True
    )


def source_schemes() -> tuple[str, ...]:
    """Every scheme a model or dataset source may use: the hubs, each storage backend, ``tiny``."""
    return (*HUB_SCHEMES, *storage.schemes(), TINY_SCHEME)


def check_uri(value: str, schemes: tuple[str, ...], *, allow_path: bool = True) -> str:
    """``value`` if it is a local path or a well-formed URI of one of ``schemes`` (the storage registry is
    asked at validation time, so a registered backend's scheme is accepted)."""
    if "\x00" in value:
        raise ValueError("must not contain NUL bytes")
    if not value.strip():
        raise ValueError("must not be empty")
    scheme = scheme_of(value)
    if not scheme:
        if not allow_path:
            raise ValueError(f"must be a URI with one of the schemes {', '.join(s + '://' for s in schemes)}")
        return value
    if scheme not in schemes:
        raise ValueError(
            f"unsupported scheme {scheme!r}; use one of {', '.join(s + '://' for s in schemes)}"
            + (" or a local path" if allow_path else "")
        )
    rest = value.split("://", 1)[1]
    if scheme in HUB_SCHEMES:
        check_hub_uri(scheme, rest)
    elif storage.backend(scheme) is not None:
        storage.check_uri(scheme, rest)
    return value


ModelUri = Annotated[str, Field(max_length=2048)]


def _no_credentials(value: str) -> str:
    """Free text is written into the outputs as given (resolved manifest, prompts.json, the submission):
    one holding a credential is refused here, never masked there (masking would change the job)."""
    if holds_secret(value):
        raise ValueError(
            "holds a credential (a URL with user:password@, a signed-URL or token parameter, or the value of "
            "a secret environment variable); remove it: this text is written into the outputs as given"
        )
    return value


FreeText = Annotated[str, AfterValidator(_no_credentials)]
"""Prompts, captions, labels: any text, but no credential (see ``_no_credentials``)."""


def registered_name(names: Callable[[], Iterable[str]]) -> Any:
    """A ``str`` that must be one of ``names()`` *at validation time* — a registry's keys, so an entry added
    after import (a plugin, a test) counts — refused with the error, and listed in the JSON Schema with the
    enum, a ``Literal`` of the names would give."""

    def check(value: Any) -> str:
        current = list(names())
        if isinstance(value, str) and value in current:
            return value
        quoted = [repr(n) for n in current]
        expected = quoted[0] if len(quoted) == 1 else f"{', '.join(quoted[:-1])} or {quoted[-1]}"
        raise PydanticCustomError("literal_error", "Input should be {expected}", {"expected": expected})

    return Annotated[
        str,
        PlainValidator(check),
        GetPydanticSchema(get_pydantic_json_schema=lambda _s, _h: {"enum": [*names()], "type": "string"}),
    ]
