"""The sweep's command-line surface, kept free of heavy imports (the parser is built on every start):
``run``'s trial flags and ``kolors-job sweep report``."""

from __future__ import annotations

import argparse
from typing import Any


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sweep trials (Katib, PAI AutoML)")
    g.add_argument("--set", dest="set_fields", action="append", default=[], metavar="PATH=VALUE",
                   help="change a manifest field, e.g. train.rank=16 (a path under spec; validated like the "
                   "manifest; recorded in the resolved manifest's labels); repeatable")  # fmt: skip
    g.add_argument("--trial", metavar="NAME",
                   help="the engine's trial name: the job id (lower-cased with a digest if it is not a valid one)")
    g.add_argument("--objective", metavar="WEIGHTS",
                   help="the sweep's objective, e.g. mean_aesthetic=1,consistency=2 (default mean_aesthetic)")
    g.add_argument("--metrics-file", metavar="PATH",
                   help="append Katib File-collector JSON lines here (e.g. /var/log/katib/kolors-metrics.json)")
    g.add_argument("--metrics-stdout", action="store_true",
                   help="print Katib StdOut-collector lines (name=value) on stdout")
    g.add_argument("--metrics-json", metavar="URI",
                   help="keep a PAI AutoML json metric file here (a path or bucket URI), rewritten at each point")


def add_sweep_parser(subparsers: Any) -> None:
    """``kolors-job sweep report <prefix>``."""
    p = subparsers.add_parser("sweep", help="sweeps: rank a sweep's trials and publish the winner (sweep report)")
    sub = p.add_subparsers(dest="sweep_command", required=True)
    r = sub.add_parser("report", help="rank the trials under <prefix> (storage only), write sweep.html + "
                       "sweep.json, publish the best trial to <prefix>/best/")  # fmt: skip
    r.add_argument("prefix", help="the experiment's prefix: <output>/<sweep name>/ (a path or bucket URI)")
    r.add_argument("--sweep", help="the sweep file, for its objective (default: what the trials recorded)")
    r.add_argument("--objective", metavar="WEIGHTS", help="e.g. mean_aesthetic=1,consistency=2")
    r.add_argument("--no-publish", action="store_true", help="rank and write the report only; leave best/ alone")
    r.set_defaults(func=_cmd_report)


def _cmd_report(args: argparse.Namespace) -> int:
    from kolors_job.sweep.report import cmd_report

    return cmd_report(args)
