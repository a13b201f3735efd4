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
import os
import re
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, Any

from kolors_job.cli import prose
from kolors_job.core.errors import ExitCode, JobError, ManifestError, StorageNotFoundError, StorageTemporaryError
from kolors_job.core.redact import redact_uri, scrub
from kolors_job.core.settings import alibaba_cloud_region
from kolors_job.launch import dlc as dlc_mod
from kolors_job.launch import k8s as k8s_mod
from kolors_job.launch.watch import Kubectl, PlatformState, Probe, active_attempt, dlc_probe, k8s_probe

JOB_ID_RE = re.compile(r"^[a-z0-9]([a-z0-9._-]{0,61}[a-z0-9])?$")
RETRYABLE = (int(ExitCode.TEMPORARY), k8s_mod.RETRYABLE_EXIT_CODE)
DEFAULT_TIMEOUT = 6 * 3600
LOCAL_EXIT_GRACE = 120  # seconds a finished local job gets to exit before it is stopped
DEFAULT_START_TIMEOUT = 900  # seconds a pod may stay unschedulable (a cluster autoscaler may add a node)
SWEEP_TARGETS = ("katib", "pai-automl")
@dataclass
class Outcome:
    exit_code: int
    result: str  # succeeded | failed | quality-gate | timeout
    status: dict[str, Any] | None
    report: dict[str, Any] | None


# ------------------------------------------------------------------------------------------ helpers


def fresh_job_id(name: str) -> str:
    """``<name>-<UTC time>-<random>``: unique per CI run, sortable, valid as a job id and k8s label."""
    base = re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")[:30].rstrip("-") or "job"
    return f"{base}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{secrets.token_hex(3)}"


def join_uri(root: str, *parts: str) -> str:
    return "/".join([root.rstrip("/"), *(p.strip("/") for p in parts)])


def _store(uri: str) -> Any:
    from kolors_job.storage import open_store

    return open_store(uri)


def _read_json(store: Any, key: str) -> dict[str, Any] | None:
    try:
        if not store.exists(key):
            return None
        data = json.loads(store.read_bytes(key))
    except StorageNotFoundError:
        return None
    except (ValueError, UnicodeDecodeError):
        return None  # caught mid-write (local files): read again next poll
    return data if isinstance(data, dict) else None


def _exists(store: Any, key: str) -> bool:
    try:
        return bool(store.exists(key))
    except StorageNotFoundError:
        return False


def _say(msg: str, out: IO[str] | None = None) -> None:
    """A note for the person reading the CI log: stderr, so stdout holds only objects (a dry-run's YAML)."""
    print(msg, file=out or sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------ report


def _frames(per_image: list[Any]) -> list[tuple[str, float | None]]:
    rows = []
    for i, item in enumerate(per_image, 1):
        if isinstance(item, dict):
            label = str(item.get("frame") or item.get("file") or item.get("name") or i)
            raw = item.get("score", item.get("aesthetic"))
        else:
            label, raw = str(i), item
        rows.append((label, float(raw) if isinstance(raw, int | float) else None))
    return rows


def format_scores(report: dict[str, Any]) -> list[str]:
    """Per-frame scores, then the mean against the threshold (what a reviewer looks at first)."""
    score = report.get("score") or {}
    lines = ["frame  score"]
    for label, value in _frames(list(score.get("per_image") or [])):
        lines.append(f"{label:>5}  {'n/a' if value is None else f'{value:.3f}'}")
    mean, threshold, passed = score.get("mean"), score.get("threshold"), score.get("passed")
    verdict = "PASSED" if passed else "FAILED" if passed is False else "unknown"
    mean_s = f"{mean:.3f}" if isinstance(mean, int | float) else "n/a"
    thr_s = f"{threshold:.3f}" if isinstance(threshold, int | float) else "n/a"
    lines.append(f"mean {mean_s} vs threshold {thr_s}: {verdict}")
    return lines


def _step_summary(job_id: str, outcome: Outcome) -> None:
    """GitHub Actions: put the scores on the run's summary page."""
    path = os.environ.get("GITHUB_STEP_SUMMARY")
    if not path:
        return
    lines = [f"### kolors-job `{job_id}`: {outcome.result} (exit {outcome.exit_code})", ""]
    if outcome.report:
        score = outcome.report.get("score") or {}
        lines += ["| frame | score |", "|---|---|"]
        lines += [
            f"| {lbl} | {'n/a' if v is None else f'{v:.3f}'} |" for lbl, v in _frames(score.get("per_image") or [])
        ]
        lines += ["", format_scores(outcome.report)[-1]]
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
    except OSError:
        pass


# ------------------------------------------------------------------------------------------ waiting


def _status_line(status: dict[str, Any]) -> str:
    parts = [f"state {status.get('state', '?')}"]
    if status.get("stage"):
        parts.append(f"stage {status['stage']}")
    if status.get("step") is not None and status.get("total") is not None:
        parts.append(f"step {status['step']}/{status['total']}")
    return ", ".join(parts)


def _error_text(status: dict[str, Any] | None) -> str:
    err = (status or {}).get("error")
    if isinstance(err, dict):
        return ": ".join(str(err[k]) for k in ("type", "message") if err.get(k)) or json.dumps(err)
    return str(err) if err else ""


def _job_code(status: dict[str, Any] | None) -> int:
    code = (status or {}).get("exit_code")
    return code if isinstance(code, int) and 0 < code < 256 else int(ExitCode.INTERNAL)


def wait_for_outputs(
    store: Any,
    *,
    timeout: float,
    poll: float,
    probe: Probe | None = None,
    stale_status: bytes | None = None,
    out: IO[str] | None = None,
) -> Outcome:
    """Poll ``_SUCCESS``/``status.json`` until the job is over, the platform says it is, or ``timeout``.

    ``stale_status``: the status.json bytes seen before this run started; a terminal state in it
    belongs to an earlier attempt and is not this run's answer.
    """
    deadline = time.monotonic() + timeout
    last_line = None
    platform_done: PlatformState | None = None
    fresh = False  # whether this attempt has written a status.json yet
    while True:
        try:
            if _exists(store, "_SUCCESS"):
                return _finish(store, success=True, status=_read_json(store, "status.json"), out=out)
            status = _read_json(store, "status.json")
            fresh = fresh or (status is not None and (
                stale_status is None or json.dumps(status, sort_keys=True).encode() != stale_status
            ))
            if status and fresh:
                line = _status_line(status)
                if line != last_line:
                    _say(line, out)
                    last_line = line
                # A retryable 75 while the scheduler still runs is not final: k8s counts it against
                # backoffLimit and starts a new pod, AIMaster restarts the DLC job; the platform decides.
                scheduler_retries = _job_code(status) in RETRYABLE and probe is not None and platform_done is None
                if status.get("state") == "failed" and not scheduler_retries:
                    return _finish(store, success=False, status=status, out=out)
        except StorageTemporaryError as e:
            _say(f"storage unavailable, will retry: {e}", out)
            status = None
        if platform_done is not None:
            # The platform finished and one more look at the outputs found nothing terminal.
            detail = f" ({platform_done.detail})" if platform_done.detail else ""
            code = platform_done.exit_code if platform_done.exit_code not in (None, 0) else _job_code(status)
            if platform_done.silent_exit_code is not None and not fresh:
                code = platform_done.silent_exit_code
            if code == ExitCode.NOT_STARTED:
                silent = " — it wrote no status.json" if platform_done.silent_exit_code is not None else ""
                _say(f"the job could not start: {platform_done.detail}{silent}", out)
            else:
                _say(f"the job ended without a final status.json/_SUCCESS{detail}", out)
            return Outcome(code, "failed", status, _read_json(store, "report.json"))
        if probe is not None:
            state = probe()
            if state is not None and state.done:
                platform_done = state
                continue  # re-read the outputs once: the job writes them before it exits
        if time.monotonic() >= deadline:
            _say(f"timed out after {timeout:.0f} s waiting for the job (it may still be running)", out)
            return Outcome(int(ExitCode.TEMPORARY), "timeout", status, None)
        time.sleep(max(0.0, min(poll, deadline - time.monotonic())))


def _finish(store: Any, *, success: bool, status: dict[str, Any] | None, out: IO[str] | None) -> Outcome:
    report = _read_json(store, "report.json")
    if report:
        for line in format_scores(report):
            _say(line, out)
    else:
        _say("no report.json", out)
    passed = ((report or {}).get("score") or {}).get("passed")
    if success:
        if passed is False:
            return Outcome(int(ExitCode.QUALITY_GATE), "quality-gate", status, report)
        return Outcome(int(ExitCode.OK), "succeeded", status, report)
    code = _job_code(status)
    err = _error_text(status)
    _say(f"job failed (exit {code}){': ' + err if err else ''}", out)
    if code == ExitCode.QUALITY_GATE or (passed is False and code == ExitCode.INTERNAL):
        return Outcome(int(ExitCode.QUALITY_GATE), "quality-gate", status, report)
    return Outcome(code, "failed", status, report)


# ------------------------------------------------------------------------------------------ starting


def local_command(manifest_uri: str, job_id: str, output: str | None) -> list[str]:
    """``kolors-job run`` in a fresh interpreter (the same one, so the same environment)."""
    cmd = [sys.executable, "-m", "kolors_job", "run", "--manifest", manifest_uri, "--job-id", job_id]
    return cmd + (["--output", output] if output else [])


def _start_local(args: argparse.Namespace, manifest_uri: str, job_id: str) -> tuple[Probe, Callable[[float], None]]:
    proc = subprocess.Popen(local_command(manifest_uri, job_id, args.output))
    _say(f"started: local process {proc.pid}")

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
        _say(f"kubectl ({args.kubectl or 'disabled'}) not found: the YAML is on stdout, apply it yourself{then}")
        return None
    kube = Kubectl(kubectl, opts.namespace)
    w = k8s_mod.workload(docs)
    kind = w["kind"].lower()
    label = k8s_mod.job_id_label(job_id)
    if running := active_attempt(kube, kind, label):
        _say(f"attaching to {w['kind']} {running}, still running for this job id")
        return k8s_probe(kube, kind, running, f"{k8s_mod.JOB_ID_LABEL}={label}", args.start_timeout)
    # An existing PVC may be bigger than ours (shrinking is refused); an existing namespace needs nothing.
    docs = [d for d in docs if d["kind"] not in ("Namespace", "PersistentVolumeClaim")
            or not kube.exists(d["kind"].lower(), d["metadata"]["name"])]  # fmt: skip
    kube.apply(k8s_mod.to_yaml(docs))
    name = w["metadata"]["name"]
    _say(f"started: {w['kind']} {name}")
    attempt = w["metadata"]["labels"][k8s_mod.ATTEMPT_LABEL]
    selector = f"{k8s_mod.JOB_ID_LABEL}={label},{k8s_mod.ATTEMPT_LABEL}={attempt}"
    return k8s_probe(kube, kind, name, selector, args.start_timeout)


_DENIED = re.compile(r"Forbidden|NoPermission|Unauthorized|InvalidAccessKey|SignatureDoesNotMatch|Security", re.I)
_RETRYABLE = re.compile(r"Throttling|ServiceUnavailable|InternalError|Timeout|Quota|Stock", re.I)


def dlc_error(e: Exception) -> JobError:
    """A CreateJob failure as one line with a contract exit code: 5 denied, 75 worth retrying, else 1."""
    code = str(getattr(e, "code", "") or "")
    message = scrub(str(getattr(e, "message", "") or e))[:500]
    if _DENIED.search(code):
        exit_code = ExitCode.STORAGE_DENIED
    elif _RETRYABLE.search(code) or isinstance(e, OSError | ConnectionError | TimeoutError):
        exit_code = ExitCode.TEMPORARY
    else:
        exit_code = ExitCode.INTERNAL
    return JobError(f"PAI-DLC CreateJob failed: {code or type(e).__name__}: {message}", exit_code=exit_code)


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
        raise dlc_error(e) from None
    _say(f"started: PAI-DLC job {dlc_job}")
    return dlc_probe(client, dlc_job, say=_say)


# ------------------------------------------------------------------------------------------ command


def _load_manifest(uri: str) -> tuple[bytes, Any]:
    from kolors_job.manifest.spec import parse_manifest, read_manifest_source

    raw, source = read_manifest_source(uri)
    return raw, parse_manifest(raw, source=source)


def _upload_manifest(bucket: str, job_id: str, raw: bytes) -> str:
    """Create ``<bucket>/<job-id>/manifest.yaml``; reusing a job id is fine only with the same manifest."""
    store = _store(join_uri(bucket, job_id))
    if not store.write_bytes("manifest.yaml", raw, if_absent=True) and store.read_bytes("manifest.yaml") != raw:
        raise JobError(
            f"{redact_uri(join_uri(bucket, job_id, 'manifest.yaml'))} holds a different manifest: "
            "pick another --job-id",
            exit_code=ExitCode.OUTPUT_CONFLICT,
        )
    return join_uri(bucket, job_id, "manifest.yaml")


def cmd_submit(args: argparse.Namespace) -> int:
    """Handler of ``kolors-job submit``; returns the process exit code."""
    if args.target in SWEEP_TARGETS:  # a sweep: the engine runs the trials (launch/katib.py, pai_automl.py)
        from kolors_job.launch import katib, pai_automl

        return {"katib": katib.cmd_submit, "pai-automl": pai_automl.cmd_submit}[args.target](args)
    try:
        return _submit(args)
    except ManifestError as e:
        for p in e.problems:
            _say(f"invalid manifest: {p}", sys.stderr)
        return int(e.exit_code)
    except JobError as e:
        _say(f"kolors-job submit: {e}", sys.stderr)
        return int(e.exit_code)
    except dlc_mod.DlcSpecError as e:
        _say(f"kolors-job submit: {e}", sys.stderr)
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
    if not JOB_ID_RE.match(job_id):
        raise JobError(f"--job-id {job_id!r}: use lower-case letters, digits, '.', '_', '-' (max 63)",
                       exit_code=ExitCode.INVALID_MANIFEST)  # fmt: skip
    manifest_uri = _upload_manifest(args.bucket, job_id, raw) if args.manifest else args.manifest_uri
    output_root = args.output or (manifest.spec.output.uri if manifest else None)
    _say(f"job id    {job_id}")
    _say(f"manifest  {redact_uri(manifest_uri)}")
    if output_root:
        _say(f"outputs   {redact_uri(join_uri(output_root, job_id))}/")
    if not args.wait:  # start (or only upload) and return: the job's outputs are neither read nor awaited
        if not args.no_start:
            _start(args, manifest_uri, job_id)
        return int(ExitCode.OK)

    assert output_root is not None
    out_store = _store(join_uri(output_root, job_id))
    probe: Probe | None = None
    stop: Callable[[float], None] | None = None
    stale: bytes | None = None
    if not args.no_start:
        if _exists(out_store, "_SUCCESS"):
            _say("this job id already finished; reporting its outputs")
        else:
            prior = _read_json(out_store, "status.json")
            stale = json.dumps(prior, sort_keys=True).encode() if prior else None
            probe, stop = _start(args, manifest_uri, job_id)
    else:
        _say("not starting the job (--no-start); waiting for its outputs")
    _say(f"waiting up to {args.timeout:.0f} s")
    outcome = wait_for_outputs(out_store, timeout=args.timeout, poll=args.poll, probe=probe, stale_status=stale)
    if stop is not None:
        stop(0.0 if outcome.result == "timeout" else LOCAL_EXIT_GRACE)
    _say(f"result: {outcome.result} (exit {outcome.exit_code})")
    _step_summary(job_id, outcome)
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


def _kv(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def _toleration(text: str) -> dict[str, str]:
    """``key[=value]:Effect`` → a toleration (``Exists`` when no value)."""
    spec, _, effect = text.rpartition(":")
    if not spec:
        spec, effect = effect, ""
    key, sep, value = spec.partition("=")
    tol = {"key": key, "operator": "Equal" if sep else "Exists"}
    if sep:
        tol["value"] = value
    if effect:
        tol["effect"] = effect
    return tol


def add_k8s_arguments(p: argparse.ArgumentParser, *, require_image: bool) -> None:
    d = k8s_mod.RenderOptions
    g = p.add_argument_group("kubernetes")
    g.add_argument("--image", required=require_image, help="container image (pin a digest in production)")
    g.add_argument("--gpus", type=int, default=d.gpus, help="GPUs per node (default %(default)s)")
    g.add_argument("--nodes", type=int, default=d.nodes, help=">1 renders a Kubeflow PyTorchJob")
    g.add_argument("--kind", choices=("auto", "job", "pytorchjob"), default=d.kind)
    g.add_argument("--namespace", help="also rendered as a Namespace unless --no-create-namespace")
    g.add_argument("--create-namespace", action=argparse.BooleanOptionalAction, default=d.create_namespace)
    g.add_argument("--service-account", default=d.service_account, help="'' for none")
    g.add_argument("--irsa-role-arn", help="EKS IRSA: render the ServiceAccount bound to this IAM role")
    g.add_argument("--rrsa-role-name", help="ACK RRSA: render the ServiceAccount bound to this RAM role")
    g.add_argument("--secret", help="Secret with credentials as env vars (envFrom); prefer IRSA/RRSA")
    g.add_argument("--cache-pvc", default=d.cache_pvc, help="PVC for /cache; '' for an emptyDir")
    g.add_argument("--create-cache-pvc", metavar="SIZE", default=d.create_cache_pvc,
                   help="size of the cache PVC rendered with the job (default %(default)s)")  # fmt: skip
    g.add_argument("--storage-class")
    g.add_argument("--shm-size", default=d.shm_size)
    g.add_argument("--cpu", default=d.cpu)
    g.add_argument("--memory", default=d.memory, help=(
        f"pod memory (default {k8s_mod.HOST_MEMORY_BASE_GIB}Gi + {k8s_mod.HOST_MEMORY_PER_RANK_GIB}Gi per GPU"
        " + --shm-size)"))
    g.add_argument("--oss-region", help="the cluster's region (ACK, e.g. cn-beijing): its internal OSS endpoint "
                   "in the pod, for oss:// URIs")  # fmt: skip
    g.add_argument("--oss-endpoint", help="KOLORS_JOB_OSS_ENDPOINT in the pod (wins over --oss-region)")
    g.add_argument("--scratch-size", default=d.scratch_size,
                   help="pod scratch disk: emptyDir sizeLimit, ephemeral-storage request (%(default)s)")  # fmt: skip
    g.add_argument("--node-selector", type=_kv, action="append", default=[], metavar="KEY=VALUE")
    g.add_argument("--toleration", type=_toleration, action="append", default=None, metavar="KEY[=VALUE]:EFFECT",
                   help="replaces the default nvidia.com/gpu:NoSchedule toleration")  # fmt: skip
    g.add_argument("--priority-class")
    g.add_argument("--queue", help="Kueue LocalQueue")
    g.add_argument("--image-pull-secret")
    g.add_argument("--deadline", type=int, default=d.active_deadline_seconds, help="activeDeadlineSeconds")
    g.add_argument("--ttl", type=int, default=d.ttl_seconds_after_finished, help="ttlSecondsAfterFinished")
    g.add_argument("--backoff-limit", type=int, default=d.backoff_limit)
    g.add_argument("--grace", type=int, default=d.termination_grace_seconds, help="terminationGracePeriodSeconds")
    g.add_argument("--env", type=_kv, action="append", default=[], metavar="KEY=VALUE", help="extra env var")


def options_from_namespace(
    ns: argparse.Namespace, *, job_id: str, manifest_uri: str, attempt: str | None = None
) -> k8s_mod.RenderOptions:
    return k8s_mod.RenderOptions(
        job_id=job_id,
        image=ns.image,
        manifest_uri=manifest_uri,
        output=ns.output,
        gpus=ns.gpus,
        nodes=ns.nodes,
        kind=ns.kind,
        namespace=ns.namespace,
        service_account=ns.service_account or None,
        irsa_role_arn=ns.irsa_role_arn,
        rrsa_role_name=ns.rrsa_role_name,
        secret=ns.secret,
        cache_pvc=ns.cache_pvc or None,
        create_cache_pvc=ns.create_cache_pvc or None,
        create_namespace=ns.create_namespace,
        oss_endpoint=ns.oss_endpoint,
        oss_region=ns.oss_region,
        scratch_size=ns.scratch_size,
        attempt=attempt,
        storage_class=ns.storage_class,
        shm_size=ns.shm_size,
        cpu=ns.cpu,
        memory=ns.memory or None,
        node_selector=dict(ns.node_selector),
        tolerations=tuple(ns.toleration) if ns.toleration is not None else k8s_mod.DEFAULT_TOLERATIONS,
        priority_class=ns.priority_class,
        queue=ns.queue,
        image_pull_secret=ns.image_pull_secret,
        active_deadline_seconds=ns.deadline,
        ttl_seconds_after_finished=ns.ttl,
        backoff_limit=ns.backoff_limit,
        termination_grace_seconds=ns.grace,
        extra_env=dict(ns.env),
    )


def add_dlc_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("PAI-DLC")
    g.add_argument("--spec", default="pai/job.yaml", help="CreateJob spec (default %(default)s)")
    g.add_argument("--set", action="append", default=[], metavar="PATH=VALUE",
                   help="override a spec field, e.g. WorkspaceId=123 or JobSpecs.0.PodCount=2")  # fmt: skip
    g.add_argument("--nproc-per-node", type=int, default=1, help="processes (GPUs) per DLC node")
    g.add_argument("--region", default=alibaba_cloud_region(),
                   help="the job's region: DLC's API endpoint, <REGION> in the spec and the job's internal OSS "
                   "endpoint (default $ALIBABA_CLOUD_REGION_ID)")  # fmt: skip
    g.add_argument("--endpoint", default=os.environ.get("KOLORS_JOB_DLC_ENDPOINT"),
                   help="default pai-dlc.<region>.aliyuncs.com")  # fmt: skip


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
