"""Launch side: render Kubernetes objects / PAI-DLC requests and submit jobs from CI.

``register_cli`` adds ``render`` and ``submit`` to the main ``kolors-job`` parser; every subcommand
sets ``func`` (``args.func(args) -> int`` is the exit code). Cloud SDKs are imported lazily, so
``kolors-job run`` inside the container never pays for them.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

from kolors_job.core.errors import ExitCode
from kolors_job.launch import pod
from kolors_job.manifest.fields import JOB_ID_PATTERN


def _renderer(target: str) -> Any:
    """The module that renders ``target``'s objects: ``render(opts)`` and ``write_examples(dir, from_argv)``."""
    from kolors_job.launch import k8s, trainer

    return {"k8s": k8s, "trainjob": trainer}[target]


def _cmd_render_objects(args: argparse.Namespace) -> int:
    """``render k8s`` / ``render trainjob``: the objects as YAML on stdout, alone (``| kubectl apply -f -``)."""
    from kolors_job.launch import k8s, options, outputs

    target = args.render_target
    renderer = _renderer(target)
    if args.write_examples:
        parser = _standalone_render_parser(target)

        def from_argv(argv: list[str]) -> pod.RenderOptions:
            ns = parser.parse_args(argv)
            return options.options_from_namespace(ns, job_id=ns.job_id, manifest_uri=ns.manifest_uri)

        for path in renderer.write_examples(Path(args.write_examples), from_argv):
            print(path)
        return int(ExitCode.OK)
    missing = [flag for flag, v in (("--manifest-uri", args.manifest_uri), ("--image", args.image)) if not v]
    if missing:
        print(f"kolors-job render {target}: {' and '.join(missing)} required", file=sys.stderr)
        return int(ExitCode.INVALID_MANIFEST)
    job_id = args.job_id or outputs.fresh_job_id("kolors")
    if not re.fullmatch(JOB_ID_PATTERN, job_id):
        print(f"kolors-job render {target}: invalid --job-id {job_id!r}", file=sys.stderr)
        return int(ExitCode.INVALID_MANIFEST)
    try:
        docs = renderer.render(options.options_from_namespace(args, job_id=job_id, manifest_uri=args.manifest_uri))
    except ValueError as e:
        print(f"kolors-job render {target}: {e}", file=sys.stderr)
        return int(ExitCode.INVALID_MANIFEST)
    sys.stdout.write(k8s.to_yaml(docs))
    return int(ExitCode.OK)


def _cmd_render_dlc(args: argparse.Namespace) -> int:
    from kolors_job.launch import dlc, outputs

    job_id = args.job_id or outputs.fresh_job_id("kolors")
    try:
        request = dlc.build_request(
            dlc.load_spec(args.spec),
            manifest_uri=args.manifest_uri,
            job_id=job_id,
            output=args.output,
            image=args.image,
            nproc_per_node=args.nproc_per_node,
            overrides=args.set,
            region=args.region,
        )
    except (dlc.DlcSpecError, OSError) as e:
        print(f"kolors-job render dlc: {e}", file=sys.stderr)
        return int(ExitCode.INVALID_MANIFEST)
    print(json.dumps(dlc.prune(request.to_map()), indent=2, ensure_ascii=False))
    return int(ExitCode.OK)


RENDER_HELP = {
    "k8s": "print the Job / PyTorchJob (+ Namespace, ServiceAccount, cache PVC) for one run as YAML",
    "trainjob": "print a Kubeflow Trainer v2 TrainJob and its torch-distributed TrainingRuntime (+ Namespace, "
    "ServiceAccount, cache PVC) for one run as YAML",
}


def _add_render_objects(sub: argparse._SubParsersAction, target: str) -> argparse.ArgumentParser:  # type: ignore[type-arg]
    from kolors_job.launch import options

    p = sub.add_parser(target, help=RENDER_HELP[target])
    p.add_argument("--manifest-uri", help="where the container reads the manifest (KOLORS_JOB_MANIFEST_URI)")
    p.add_argument("--job-id", help="default: a fresh kolors-<time>-<random>")
    p.add_argument("--output", help="overrides the manifest's spec.output.uri")
    p.add_argument("--write-examples", metavar="DIR", help="regenerate the example files (k8s/) and exit")
    options.add_k8s_arguments(p, require_image=False)
    p.set_defaults(func=_cmd_render_objects, render_target=target)
    return p


def _standalone_render_parser(target: str) -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="kolors-job render")
    return _add_render_objects(root.add_subparsers(), target)


def register_cli(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``render {k8s,trainjob,dlc,katib,pai-automl}`` and ``submit {k8s,dlc,local,katib,pai-automl}``."""
    from kolors_job.launch import katib, options, pai_automl, submit

    render = subparsers.add_parser("render", help="print what a launch would submit, without submitting it")
    rsub = render.add_subparsers(dest="render_target", required=True)
    _add_render_objects(rsub, "k8s")
    _add_render_objects(rsub, "trainjob")
    katib.add_render_parser(rsub)  # a sweep as a Katib Experiment
    pai_automl.add_render_parser(rsub)  # a sweep as a PAI AutoML HPO experiment
    d = rsub.add_parser("dlc", help="print the PAI-DLC CreateJob request for one run as JSON")
    d.add_argument("--manifest-uri", required=True)
    d.add_argument("--job-id")
    d.add_argument("--output")
    d.add_argument("--image")
    options.add_dlc_arguments(d)
    d.set_defaults(func=_cmd_render_dlc)
    submit.add_submit_parser(subparsers)
