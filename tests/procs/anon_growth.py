"""Private memory grown by loading a Kolors uncast, then cast, in one process (tests/test_loading.py): ``python -m
tests.procs.anon_growth TINY WIDE`` prints one JSON line. Growth, not totals: what a warm start inherits
(tests/warm_start.py) is resident before the first reading and after it alike."""

import gc
import json
import sys
from pathlib import Path

import torch

from kolors_job.models.loading import load_kolors_components


def anon() -> int:
    """Private (anonymous) resident bytes: what a rank holds that no other rank shares."""
    for line in open("/proc/self/status"):  # noqa: SIM115 - read to the line, closed at exit
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no RssAnon in /proc/self/status")


tiny, wide = Path(sys.argv[1]), Path(sys.argv[2])
for cast in (False, True):  # the loaders' own lazy imports, first
    load_kolors_components(tiny, dtype=torch.bfloat16, cast=cast)
grown = {}
for how in ("uncast", "cast"):  # uncast first: nothing a cast load freed can be reused by it
    gc.collect()
    before = anon()
    comps = load_kolors_components(wide, dtype=torch.bfloat16, cast=how == "cast")
    grown[how] = {"anon": anon() - before, "dtype": str(comps.text_encoder.dtype)}
    del comps
print(json.dumps(grown))
