"""``kolors-job submit``: the CI trigger. Upload a manifest, start the job somewhere, wait, report.

The job's own outputs are the source of truth for how it went (``status.json``, ``report.json``,
``_SUCCESS`` under ``<output>/<job id>/``), whatever ran it: the same wait loop serves Kubernetes,
PAI-DLC and a local subprocess, and the platform is only asked whether the job is *over* (so a pod
that never started, or a DLC job stopped by hand or deleted, does not leave CI waiting until the timeout).

Exit codes: 0 passed · 3 quality gate failed · the job's own code (or 1) when it failed · 2 invalid
manifest · 5 storage (or DLC) access denied · 6 the job id's manifest differs · 7 the platform cannot
start the job (Kubernetes: image pull, missing Secret or volume, unschedulable past --start-timeout;
PAI-DLC: Failed before the job wrote anything) · 75 timed out (the job may still finish), or the job
was stopped, deleted or killed without a final status (a rerun with the same --job-id resumes).

stdout carries only objects (``--kubectl ''`` prints the YAML there, for ``| kubectl apply -f -``);
every note, status line and score goes to stderr. ``--no-wait`` starts the job and returns: it never
reads the job's outputs, and with ``--manifest-uri`` reads nothing at all.
"""

from __future__ import annotations

import argparse
import json
import re
import secrets
import shutil
import subprocess
import sys
from collections.abc import Callable
from typing import Any

from kolors_job.core.errors import ExitCode, JobError, ManifestError
from kolors_job.core.redact import redact_uri
from kolors_job.launch import dlc as dlc_mod
from kolors_job.launch import k8s as k8s_mod
from kolors_job.launch.options import add_dlc_arguments, add_k8s_arguments, options_from_namespace, prose
from kolors_job.launch.outputs import (
    exists,
    fresh_job_id,
    join_uri,
    open_output,
    read_json,
    say,
    step_summary,
    upload_manifest,
    wait_for_outputs,
)
from kolors_job.launch.watch import Kubectl, PlatformState, Probe, active_attempt, dlc_probe, k8s_probe
from kolors_job.manifest.fields import JOB_ID_PATTERN

DEFAULT_TIMEOUT = 6 * 3600
LOCAL_EXIT_GRACE = 120  # seconds a finished local job gets to exit before it is stopped
DEFAULT_START_TIMEOUT = 900  # seconds a pod may stay unschedulable (a cluster autoscaler may add a node)
SWEEP_TARGETS = ("katib", "pai-automl")


# ------------------------------------------------------------------------------------------ helpers














# ------------------------------------------------------------------------------------------ report








# ------------------------------------------------------------------------------------------ waiting












# ------------------------------------------------------------------------------------------ starting


def local_command(manifest_uri: str, job_id: str, output: str | None) -> list[str]:
    """``kolors-job run`` in a fresh interpreter (the same one, so the same environment)."""
    cmd = [sys.executable, "-m", "kolors_job", "run", "--manifest", manifest_uri, "--job-id", job_id]
    return cmd + (["--output", output] if output else [])


def _start_local(args: argparse.Namespace, manifest_uri: str, job_id: str) -> tuple[Probe, Callable[[float], None]]:
    proc = subprocess.Popen(local_command(manifest_uri, job_id, args.output))
    say(f"started: local process {proc.pid}")

    def probe() -> PlatformState | None:
        rc = proc.poll()
        return None if rc is None else PlatformState(True, rc if rc >= 0 else 128 - rc, "local process exited")

    def stop(wait_first: float) -> None:
        """Let the process exit by itself for ``wait_first`` s, then SIGTERM (it checkpoints), then SIGKILL."""
        for action in (None, proc.terminate, proc.kill):
            if action is not None:
                action()
            try:
                proc.wait(timeout=wait_first if action is None else LOCAL_EXIT_GRACE)
                return
            except subprocess.TimeoutExpired:
                continue

    return probe, stop


def _start_k8s(args: argparse.Namespace, manifest_uri: str, job_id: str) -> Probe | None:
    """Apply a new attempt of the job (a fresh workload name, the same job id, so it resumes), or attach
    to one still running; the Namespace and cache PVC are applied only when they do not exist yet."""
    try:
        opts = options_from_namespace(args, job_id=job_id, manifest_uri=manifest_uri, attempt=secrets.token_hex(3))
        docs = k8s_mod.render(opts)
    except ValueError as e:
        raise JobError(str(e), exit_code=ExitCode.INVALID_MANIFEST) from None
    kubectl = shutil.which(args.kubectl) if args.kubectl else None
    if not kubectl:
        sys.stdout.write(k8s_mod.to_yaml(docs))  # the objects alone: `… | kubectl apply -f -`
        sys.stdout.flush()
        then = "; waiting for its outputs" if args.wait else ""
        say(f"kubectl ({args.kubectl or 'disabled'}) not found: the YAML is on stdout, apply it yourself{then}")
        return None
    kube = Kubectl(kubectl, opts.namespace)
    w = k8s_mod.workload(docs)
    kind = w["kind"].lower()
    label = k8s_mod.job_id_label(job_id)
    if running := active_attempt(kube, kind, label):
        say(f"attaching to {w['kind']} {running}, still running for this job id")
        return k8s_probe(kube, kind, running, f"{k8s_mod.JOB_ID_LABEL}={label}", args.start_timeout)
    # An existing PVC may be bigger than ours (shrinking is refused); an existing namespace needs nothing.
    docs = [d for d in docs if d["kind"] not in ("Namespace", "PersistentVolumeClaim")
            or not kube.exists(d["kind"].lower(), d["metadata"]["name"])]  # fmt: skip
    kube.apply(k8s_mod.to_yaml(docs))
    name = w["metadata"]["name"]
    say(f"started: {w['kind']} {name}")
    attempt = w["metadata"]["labels"][k8s_mod.ATTEMPT_LABEL]
    selector = f"{k8s_mod.JOB_ID_LABEL}={label},{k8s_mod.ATTEMPT_LABEL}={attempt}"
    return k8s_probe(kube, kind, name, selector, args.start_timeout)






def _start_dlc(args: argparse.Namespace, manifest_uri: str, job_id: str) -> Probe:
    spec = dlc_mod.load_spec(args.spec)
    request = dlc_mod.build_request(
        spec,
        manifest_uri=manifest_uri,
        job_id=job_id,
        output=args.output,
        image=args.image,
        nproc_per_node=args.nproc_per_node,
        overrides=args.set,
        region=args.region,
    )
    client = dlc_mod.make_client(region=args.region, endpoint=args.endpoint)
    try:
        dlc_job = dlc_mod.create_job(client, request)
    except Exception as e:  # the SDK raises TeaException/ClientException/requests errors
        raise dlc_mod.dlc_error(e) from None
    say(f"started: PAI-DLC job {dlc_job}")
    return dlc_probe(client, dlc_job, say=say)


# ------------------------------------------------------------------------------------------ command


def _load_manifest(uri: str) -> tuple[bytes, Any]:
    from kolors_job.manifest.load import parse_manifest, read_manifest_source

    raw, source = read_manifest_source(uri)
    return raw, parse_manifest(raw, source=source)




def cmd_submit(args: argparse.Namespace) -> int:
    """Handler of ``kolors-job submit``; returns the process exit code."""
    if args.target in SWEEP_TARGETS:  # a sweep: the engine runs the trials (launch/katib.py, pai_automl.py)
        from kolors_job.launch import katib_submit, pai_automl

        return {"katib": katib_submit.cmd_submit, "pai-automl": pai_automl.cmd_submit}[args.target](args)
    try:
        return _submit(args)
    except ManifestError as e:
        for p in e.problems:
            say(f"invalid manifest: {p}", sys.stderr)
        return int(e.exit_code)
    except JobError as e:
        say(f"kolors-job submit: {e}", sys.stderr)
        return int(e.exit_code)
    except dlc_mod.DlcSpecError as e:
        say(f"kolors-job submit: {e}", sys.stderr)
        return int(ExitCode.INVALID_MANIFEST)


def _submit(args: argparse.Namespace) -> int:
    if bool(args.manifest) == bool(args.manifest_uri):
        raise JobError("pass exactly one of --manifest FILE (with --bucket) or --manifest-uri URI",
                       exit_code=ExitCode.INVALID_MANIFEST)  # fmt: skip
    if args.manifest and not args.bucket:
        raise JobError("--manifest needs --bucket URI (where the manifest is uploaded)",
                       exit_code=ExitCode.INVALID_MANIFEST)  # fmt: skip
    if args.target == "k8s" and not args.no_start and not args.image:
        raise JobError("submit k8s: --image is required to start the job", exit_code=ExitCode.INVALID_MANIFEST)
    # --no-wait with --manifest-uri reads nothing (like `render`): the job checks its manifest when it runs.
    reads_manifest = bool(args.manifest) or args.wait
    raw, manifest = _load_manifest(args.manifest or args.manifest_uri) if reads_manifest else (b"", None)
    job_id = args.job_id or fresh_job_id(manifest.metadata.name if manifest else "kolors")
    if not re.fullmatch(JOB_ID_PATTERN, job_id):
        raise JobError(f"--job-id {job_id!r}: use lower-case letters, digits, '.', '_', '-' (max 63)",
                       exit_code=ExitCode.INVALID_MANIFEST)  # fmt: skip
    manifest_uri = upload_manifest(args.bucket, job_id, raw) if args.manifest else args.manifest_uri
    output_root = args.output or (manifest.spec.output.uri if manifest else None)
    say(f"job id    {job_id}")
    say(f"manifest  {redact_uri(manifest_uri)}")
    if output_root:
        say(f"outputs   {redact_uri(join_uri(output_root, job_id))}/")
    if not args.wait:  # start (or only upload) and return: the job's outputs are neither read nor awaited
        if not args.no_start:
            _start(args, manifest_uri, job_id)
        return int(ExitCode.OK)

    assert output_root is not None
    out_store = open_output(join_uri(output_root, job_id))
    probe: Probe | None = None
    stop: Callable[[float], None] | None = None
    stale: bytes | None = None
    if not args.no_start:
        if exists(out_store, "_SUCCESS"):
            say("this job id already finished; reporting its outputs")
        else:
            prior = read_json(out_store, "status.json")
            stale = json.dumps(prior, sort_keys=True).encode() if prior else None
            probe, stop = _start(args, manifest_uri, job_id)
    else:
        say("not starting the job (--no-start); waiting for its outputs")
    say(f"waiting up to {args.timeout:.0f} s")
    outcome = wait_for_outputs(out_store, timeout=args.timeout, poll=args.poll, probe=probe, stale_status=stale)
    if stop is not None:
        stop(0.0 if outcome.result == "timeout" else LOCAL_EXIT_GRACE)
    say(f"result: {outcome.result} (exit {outcome.exit_code})")
    step_summary(job_id, outcome)
    return outcome.exit_code


def _start(
    args: argparse.Namespace, manifest_uri: str, job_id: str
) -> tuple[Probe | None, Callable[[float], None] | None]:
    """Start the job on ``args.target``: its probe, and (local only) how to stop it."""
    if args.target == "local":
        return _start_local(args, manifest_uri, job_id)
    if args.target == "k8s":
        return _start_k8s(args, manifest_uri, job_id), None
    return _start_dlc(args, manifest_uri, job_id), None


# ------------------------------------------------------------------------------------------ argparse












def add_submit_parser(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = subparsers.add_parser(
        "submit",
        help="upload a manifest, start the job (k8s, PAI-DLC or a local process), wait and report its scores",
        description=prose(__doc__ or ""),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("target", choices=("k8s", "dlc", "local", *SWEEP_TARGETS),
                   help="k8s, dlc, local: one job; katib, pai-automl: a sweep (--sweep FILE)")  # fmt: skip
    src = p.add_argument_group("manifest")
    src.add_argument("--manifest", help="manifest file (or URI) to upload under --bucket")
    src.add_argument("--bucket", help="where the manifest goes: <bucket>/<job-id>/manifest.yaml")
    src.add_argument("--manifest-uri", help="an already uploaded manifest (no upload)")
    p.add_argument("--job-id", help="default: <metadata.name>-<UTC time>-<random>")
    p.add_argument("--output", help="overrides the manifest's spec.output.uri")
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, help="seconds to wait (default 6 h)")
    p.add_argument("--poll", type=float, default=15.0, help="seconds between status checks")
    p.add_argument("--no-start", action="store_true", help="only upload and wait (the job is started elsewhere)")
    p.add_argument("--wait", action=argparse.BooleanOptionalAction, default=True,
                   help="wait for the job to end (--no-wait: start it, return; its outputs are not read)")  # fmt: skip
    p.add_argument("--kubectl", default="kubectl", help="kubectl binary for k8s ('' prints the YAML instead)")
    p.add_argument("--start-timeout", type=float, default=DEFAULT_START_TIMEOUT,
                   help="k8s: seconds a pod may stay unschedulable before submit gives up (exit 7)")  # fmt: skip
    add_k8s_arguments(p, require_image=False)
    add_dlc_arguments(p)
    g = p.add_argument_group("sweeps (katib, pai-automl)")
    g.add_argument("--sweep", help="the sweep file (examples/sweep.yaml); trials go to <output>/<sweep name>/")
    g.add_argument("--collector", choices=("file", "stdout"), default="file",
                   help="katib: Katib's metrics collector (File: JSON lines, default; StdOut: name=value lines)")
    g.add_argument("--automl-spec", default="pai/automl.yaml", help="pai-automl: the CreateHpoExperiment spec")
    g.add_argument("--cache-dataset", metavar="ID", help="pai-automl: the PAI dataset mounted at /cache")
    p.set_defaults(func=cmd_submit)
