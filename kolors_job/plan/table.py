"""Simulation results by key: the shipped table, then this machine's cache, else simulated now (and cached).

A simulation of a full-size training step takes ~30 s on 2 CPU cores (a whole-model compile ~3 min), so results
are kept: ``table.json`` beside this module holds every configuration the plans of the reference job,
``examples/`` and the manifests of ``tests/test_plan.py`` (``tests/fixtures/plan/``) ask for on the listed cards
(``python -m kolors_job.plan.refresh examples/minimal.yaml examples/16gb.yaml tests/fixtures/plan/*.yaml``
rewrites it from them, simulating only what it lacks; ``tests/test_plan.py`` recomputes rows of it), and anything
else is simulated once and kept under ``<cache dir>/plan/``.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

from kolors_job.plan.meta import Result, Sim

__all__ = ["SHIPPED", "SIM_VERSION", "Results", "cache_file", "read_results", "write_results"]

SIM_VERSION = 1
"""Bump when a simulation changes what it measures: results of another version are not reused."""
SHIPPED = Path(__file__).with_name("table.json")

log = logging.getLogger(__name__)


def read_results(path: Path) -> dict[str, list[int]]:
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(doc, dict) or doc.get("version") != SIM_VERSION:
        return {}
    return {k: v for k, v in doc.get("results", {}).items() if isinstance(v, list) and len(v) == 2}


def write_results(path: Path, results: dict[str, list[int]], **meta: Any) -> None:
    """Atomically (a concurrent plan never reads half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"version": SIM_VERSION, **meta, "results": dict(sorted(results.items()))}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)


class Results:
    """``get(sim)``: the shipped result, the cached one, or a new simulation (kept in ``cache_file``).

    ``compute=False`` answers None instead of simulating (the GPU benchmark: device time is too dear).
    ``used`` lists every key asked for, in order (what ``--refresh`` ships)."""

    def __init__(self, cache_file: Path | None = None, *, compute: bool = True, shipped: Path | None = SHIPPED) -> None:
        self.shipped = read_results(shipped) if shipped else {}
        self.cache_file = cache_file
        self.cached = read_results(cache_file) if cache_file else {}
        self.compute = compute
        self.computed: dict[str, list[int]] = {}
        self.used: dict[str, Sim] = {}

    def get(self, sim: Sim) -> Result:
        key = sim.key()
        self.used.setdefault(key, sim)
        hit = self.shipped.get(key) or self.cached.get(key) or self.computed.get(key)
        if hit is None:
            if not self.compute:
                raise LookupError(key)
            log.info("simulating %s on the CPU (kept for next time)", key)
            result = sim.run()
            hit = self.computed[key] = [result.start, result.peak]
            if self.cache_file is not None:
                try:
                    write_results(self.cache_file, {**read_results(self.cache_file), key: hit})
                except OSError as e:  # a read-only cache: the result still serves this plan
                    log.warning("could not keep the simulation in %s: %s", self.cache_file, e)
        return Result(start=hit[0], peak=hit[1])


def cache_file(cache_dir: Path) -> Path:
    return cache_dir / "plan" / f"simulations-v{SIM_VERSION}.json"
