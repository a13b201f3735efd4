"""A stage, declared once: its name, its function, its typed input and output, and whether a rerun skips it.

``run(job, given) -> output`` (``run(job)`` for a stage without input): ``given`` is an instance of ``input``,
a dataclass whose fields name earlier stages' outputs (or a shared resource the runner loads on first need, such
as the aesthetic scorer; a field named ``outputs`` receives every output so far). A ``resumable`` stage's output
is a pydantic model recorded as ``_state/<name>.json`` when the stage finishes (rank 0, after the stage's own
uploads); a rerun of the same job reads it back instead of running the stage, then calls ``restore(job, output)``
for what the later stages still need on this machine (a download, say). ``kolors_job.runner`` executes the table.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, Literal, TypeVar

from pydantic import BaseModel

if TYPE_CHECKING:
    from kolors_job.job.context import Job
    from kolors_job.manifest.spec import Spec

__all__ = ["STATE", "Stage", "read_record", "write_record"]

STATE = "_state"
"""Where the records of finished stages live in the output: ``_state/<stage>.json``."""

I = TypeVar("I")  # noqa: E741 - the stage's input, as in the declaration's field
O = TypeVar("O")  # noqa: E741 - the stage's output


@dataclass(frozen=True)
class Stage(Generic[I, O]):
    name: str
    """What status.json, report.json's ``timings`` and the log call it."""
    run: Callable[..., O]
    input: type[I] | None
    """A dataclass: each field is filled with the earlier output (or resource) of that name; None: no input."""
    output: type[O]
    resumable: bool = False
    """A rerun skips the stage when ``_state/<name>.json`` holds its output (``output`` is then a pydantic model)."""
    restore: Callable[[Job, O], None] | None = None
    """What a skipped stage still does on this process for the stages after it (fetch ``lora/``, say)."""
    ranks: Literal["all", "main"] = "all"
    """``main``: rank 0 alone (DDP workers are done once the stages of all ranks are)."""
    node_first: bool = False
    """One process per node runs it first, the node's other ranks after it (they then find its caches full)."""
    total: Callable[[Spec], int | None] | None = None
    """The count status.json's progress is out of (training steps, frames)."""

    def __post_init__(self) -> None:
        if self.input is not None and not dataclasses.is_dataclass(self.input):
            raise TypeError(f"stage {self.name}: its input must be a dataclass, not {self.input!r}")
        if self.resumable and not issubclass(self.output, BaseModel):
            raise TypeError(f"stage {self.name}: a resumable stage's output is recorded: make it a pydantic model")

    def needs(self) -> tuple[str, ...]:
        """The outputs (and resources) this stage reads, by name."""
        return () if self.input is None else tuple(f.name for f in dataclasses.fields(self.input))  # type: ignore[arg-type]

    def call(self, job: Job, outputs: Mapping[str, Any]) -> O:
        """Run the stage on its input, filled from ``outputs`` (the field ``outputs``: all of them)."""
        if self.input is None:
            return self.run(job)
        return self.run(job, self.input(**{n: dict(outputs) if n == "outputs" else outputs[n] for n in self.needs()}))


def read_record(job: Job, stage: Stage[Any, O]) -> O | None:
    """The output a finished run of this job recorded for ``stage``, or None."""
    data = job.get_json(f"{STATE}/{stage.name}.json")
    return None if data is None else stage.output.model_validate(data)  # type: ignore[attr-defined]


def write_record(job: Job, stage: Stage[Any, O], output: O) -> None:
    """Record ``output`` so a rerun skips ``stage`` (rank 0 writes; the others' call is a no-op)."""
    job.put_json(f"{STATE}/{stage.name}.json", output.model_dump(mode="json"))  # type: ignore[attr-defined]
