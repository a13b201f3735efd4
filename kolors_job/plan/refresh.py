"""Rewrite ``table.json``: ``python -m kolors_job.plan.refresh examples/minimal.yaml examples/16gb.yaml
tests/fixtures/plan/*.yaml`` plans each manifest on every listed card and keeps exactly the simulations those plans
ask for, simulating only what the table lacks (minutes per training step on 2 cores)."""

from __future__ import annotations

import sys

from kolors_job.plan.table import SHIPPED, Results, read_results, write_results

__all__ = ["refresh"]


def refresh(argv: list[str] | None = None) -> int:
    """Re-simulate what the reference job and ``examples/*.yaml`` need on every listed card; rewrite table.json."""
    import argparse
    import time

    import torch

    from kolors_job.manifest.load import load_manifest
    from kolors_job.plan.cards import CARDS
    from kolors_job.plan.planner import plan_job

    p = argparse.ArgumentParser(prog="python -m kolors_job.plan.refresh", description=__doc__)
    p.add_argument("manifests", nargs="+", help="manifests whose plans the table must answer (e.g. examples/*.yaml)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    needed = Results(shipped=None, compute=False)
    keep = read_results(SHIPPED)
    for path in args.manifests:
        manifest = load_manifest(path)
        for card in CARDS.values():
            while True:  # a plan asks for what it needs; simulate each missing key and plan again
                try:
                    plan_job(manifest, card, needed)
                    break
                except LookupError as missing:
                    key = str(missing.args[0])
                    sim = needed.used[key]
                    if key in keep:
                        needed.computed[key] = keep[key]
                        continue
                    t0 = time.monotonic()
                    r = sim.run()
                    needed.computed[key] = keep[key] = [r.start, r.peak]
                    print(f"{key}: {r.peak / 2**30:.2f} GiB ({time.monotonic() - t0:.0f} s)", file=sys.stderr)
    import diffusers

    results = {k: keep[k] for k in needed.used if k in keep}
    write_results(SHIPPED, results, torch=torch.__version__, diffusers=diffusers.__version__)
    print(f"{SHIPPED}: {len(results)} results", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(refresh())
