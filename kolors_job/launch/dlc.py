"""PAI-DLC: turn ``pai/job.yaml`` into a ``CreateJobRequest``, create the job, poll it.

The spec file is written in the API's own field names (``DisplayName``, ``JobSpecs``…), so it is
exactly what ``CreateJobRequest.from_map`` reads. The SDK silently drops fields it does not know; we
refuse a spec that does not survive ``from_map``/``to_map`` unchanged, so a typo cannot quietly turn
into a job without, say, its cache mount or its running-time limit.
"""

from __future__ import annotations

import copy
import re
import shlex
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from kolors_job.core.errors import ExitCode, JobError
from kolors_job.core.redact import scrub
from kolors_job.core.settings import alibaba_cloud_keys
from kolors_job.launch.k8s import RETRYABLE_EXIT_CODE
from kolors_job.launch.pod import memory_for
from kolors_job.launch.regions import ENDPOINT_ENVS, REGION_RE, endpoint_region, internal_endpoint
from kolors_job.launch.torchrun import DEFAULT_GRACE_SECONDS, GRACE_ENV, shutdown_timeout

SUCCEEDED_STATES = ("Succeeded", "SucceededReserving")
FAILED_STATES = ("Failed", "FailedReserving")
STOPPED_STATES = ("Stopped",)
TERMINAL_STATES = SUCCEEDED_STATES + FAILED_STATES + STOPPED_STATES
"""GetJob ``Status`` values after which the job's process is gone (SDK 1.11 lists Creating, Queuing, Bidding,
EnvPreparing, SanityChecking, Running, Restarting, Stopping, SucceededReserving, FailedReserving, Succeeded,
Failed, Stopped; the ``…Reserving`` ones keep the finished job's nodes for a while, the process has exited)."""
REGION_PLACEHOLDER = "<REGION>"
_PLACEHOLDER = re.compile(r"<[A-Z][A-Z0-9_]*>")
_DISPLAY_NAME_OK = re.compile(r"[^A-Za-z0-9_.-]+")
ENTRYPOINT = "/app/entrypoint.py"


class DlcSpecError(ValueError):
    """The spec or the request built from it cannot be sent as it is."""


def load_spec(path: str | Path) -> dict[str, Any]:
    data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise DlcSpecError(f"{path}: a DLC job spec must be a mapping of CreateJob fields")
    return data


def prune(node: Any) -> Any:
    """Drop empty lists/dicts and None: the SDK's ``to_map`` always emits some (``DataSources: []``)."""
    if isinstance(node, dict):
        out = {k: prune(v) for k, v in node.items()}
        return {k: v for k, v in out.items() if v not in (None, [], {})}
    if isinstance(node, list):
        return [prune(v) for v in node]
    return node


def _diff(want: Any, got: Any, path: str = "", what: str = "the SDK's CreateJobRequest") -> list[str]:
    if isinstance(want, dict) and isinstance(got, dict):
        problems = []
        for k, v in want.items():
            p = f"{path}.{k}" if path else str(k)
            if k not in got:
                problems.append(f"{p}: unknown to {what} (dropped)")
            else:
                problems += _diff(v, got[k], p, what)
        return problems
    if isinstance(want, list) and isinstance(got, list) and len(want) == len(got):
        return [p for i, (a, b) in enumerate(zip(want, got, strict=True)) for p in _diff(a, b, f"{path}[{i}]", what)]
    return [] if want == got else [f"{path}: {want!r} became {got!r}"]


def model_diff(want: Any, got: Any, *, what: str) -> list[str]:
    """What an SDK model's ``to_map``/``to_dict`` (``got``) lost or changed of the data it read (``want``)."""
    return _diff(prune(want), prune(got), what=what)


def to_request(spec: dict[str, Any]) -> Any:
    """``CreateJobRequest.from_map`` that fails instead of dropping what the SDK does not know."""
    from alibabacloud_pai_dlc20201203.models import CreateJobRequest

    request = CreateJobRequest().from_map(copy.deepcopy(spec))
    problems = _diff(prune(spec), prune(request.to_map()))
    if problems:
        raise DlcSpecError("DLC spec does not map onto CreateJobRequest: " + "; ".join(problems))
    return request


def set_path(data: dict[str, Any], dotted: str, raw: str) -> None:
    """``--set JobSpecs.0.PodCount=2``: integers index lists, missing mappings are created.

    The value is YAML (``2``, ``true``), except where the field already holds a string: a numeric
    ``WorkspaceId`` must stay ``"12345"``, not become an int the API rejects.
    """
    keys = dotted.split(".")
    node: Any = data
    for key in keys[:-1]:
        node = node[int(key)] if isinstance(node, list) else node.setdefault(key, {})
    last: Any = int(keys[-1]) if isinstance(node, list) else keys[-1]
    current = node[last] if isinstance(node, list) else node.get(last)
    node[last] = raw if isinstance(current, str) else (yaml.safe_load(raw) if raw else "")


def user_command(
    *, job_id: str, output: str | None, nproc_per_node: int, pod_count: int, grace_seconds: int = DEFAULT_GRACE_SECONDS
) -> str:
    """The command each DLC node runs (DLC ignores the image ENTRYPOINT and sets MASTER_ADDR/RANK/WORLD_SIZE).

    torchrun gets ``--shutdown-timeout`` from the job's grace period: its 30 s default would SIGKILL
    the ranks long before the checkpoint the grace period was sized for.
    """
    run = ["run", "--job-id", job_id] + (["--output", output] if output else [])
    if nproc_per_node <= 1 and pod_count <= 1:
        return shlex.join(["python", ENTRYPOINT, *run])
    launcher = f"python -m kolors_job.launch.torchrun --shutdown-timeout={shutdown_timeout(grace_seconds)}"
    if pod_count <= 1:
        return f"{launcher} --standalone --nproc-per-node={nproc_per_node} {shlex.join([ENTRYPOINT, *run])}"
    # DLC's PyTorchJob sets WORLD_SIZE (nodes) and RANK (node rank) per pod.
    return (
        f"{launcher} --nnodes=$WORLD_SIZE --node-rank=$RANK --master-addr=$MASTER_ADDR "
        f"--master-port=$MASTER_PORT --nproc-per-node={nproc_per_node} {shlex.join([ENTRYPOINT, *run])}"
    )


def _fill(node: Any, placeholder: str, value: str) -> Any:
    if isinstance(node, dict):
        return {k: _fill(v, placeholder, value) for k, v in node.items()}
    if isinstance(node, list):
        return [_fill(v, placeholder, value) for v in node]
    return node.replace(placeholder, value) if isinstance(node, str) else node


def oss_endpoint_env(
    data: dict[str, Any], envs: dict[str, str], *, region: str | None, uris: list[str | None]
) -> dict[str, str]:
    """``{"KOLORS_JOB_OSS_ENDPOINT": …}`` for the region the job runs in; ``{}`` when Envs name one already.

    The region is ``region`` (``--region``), else the one an internal ``DataSources[].Uri`` mount names
    (``oss://bkt.oss-cn-beijing-internal.aliyuncs.com/…``: DLC mounts only same-region internal endpoints).
    A mount in another region than ``region`` is refused: DLC could not mount it.
    """
    sources = data.get("DataSources") or []
    mounts = [(i, str(ds.get("Uri") or "")) for i, ds in enumerate(sources) if isinstance(ds, dict)]
    mount_regions = [(i, uri, found[0]) for i, uri in mounts if (found := endpoint_region(uri)) and found[1]]
    if region:
        for i, uri, where in mount_regions:
            if where != region:
                raise DlcSpecError(
                    f"DataSources[{i}].Uri: {uri} is an internal endpoint of {where} but the job runs in {region} "
                    f"(--region): use oss://<bucket>.oss-{region}-internal.aliyuncs.com/… or --region {where}"
                )
    if set(ENDPOINT_ENVS) & set(envs):
        return {}  # explicit: the spec or --set Envs.… wins
    where = region or (mount_regions[0][2] if mount_regions else None)
    if where:
        return {"KOLORS_JOB_OSS_ENDPOINT": internal_endpoint(where)}
    oss = [u for u in uris if u and u.startswith("oss://")]
    if oss:
        raise DlcSpecError(
            f"Envs.KOLORS_JOB_OSS_ENDPOINT: {oss[0]} needs an OSS endpoint in the job: pass --region "
            "(or set ALIBABA_CLOUD_REGION_ID) for the region's internal endpoint, or "
            "--set Envs.KOLORS_JOB_OSS_ENDPOINT=https://oss-<region>-internal.aliyuncs.com"
        )
    return {}


def build_request(
    spec: dict[str, Any],
    *,
    manifest_uri: str,
    job_id: str,
    output: str | None = None,
    image: str | None = None,
    nproc_per_node: int = 1,
    overrides: list[str] | None = None,
    region: str | None = None,
) -> Any:
    """The CreateJobRequest ``submit dlc`` sends: spec + this run's manifest, job id, image, command.

    ``region`` (the job's, ``--region``) fills the spec's ``<REGION>`` placeholders and, unless the
    spec's Envs name an OSS endpoint already, gives the job its region's internal OSS endpoint.
    """
    if region and not REGION_RE.match(region):
        raise DlcSpecError(f"--region: {region!r} is not an Alibaba Cloud region id like cn-beijing or ap-southeast-1")
    data = copy.deepcopy(spec)
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise DlcSpecError(f"--set {item!r}: expected PATH=VALUE, e.g. WorkspaceId=12345")
        try:
            set_path(data, key, raw)
        except (KeyError, IndexError, ValueError, TypeError) as e:
            raise DlcSpecError(f"--set {item!r}: no such place in the spec ({e})") from None
    if region:
        data = _fill(data, REGION_PLACEHOLDER, region)
    specs = data.get("JobSpecs") or []
    if not specs:
        raise DlcSpecError("spec: JobSpecs is required (one Worker spec with Image and PodCount)")
    if image:
        for js in specs:
            js["Image"] = image
    name = data.get("DisplayName") or "kolors-job"
    data["DisplayName"] = _DISPLAY_NAME_OK.sub("-", f"{name}-{job_id}")[:256]
    envs = dict(data.get("Envs") or {})
    envs["KOLORS_JOB_MANIFEST_URI"] = manifest_uri
    if any(js.get("RestartPolicy") == "ExitCode" for js in specs):
        envs["KOLORS_JOB_RETRYABLE_EXIT_CODE"] = str(RETRYABLE_EXIT_CODE)
    grace = int((data.get("Settings") or {}).get("TerminationGracePeriodSeconds") or DEFAULT_GRACE_SECONDS)
    envs[GRACE_ENV] = str(grace)
    data["Envs"] = envs
    for js in specs:  # a ResourceConfig without Memory: as much as the ranks of one pod need
        rc = js.get("ResourceConfig")
        if isinstance(rc, dict) and not rc.get("Memory"):
            rc["Memory"] = memory_for(max(1, nproc_per_node), str(rc.get("SharedMemory") or "16Gi"))
    pods = sum(int(js.get("PodCount") or 1) for js in specs)
    data["UserCommand"] = user_command(
        job_id=job_id, output=output, nproc_per_node=nproc_per_node, pod_count=pods, grace_seconds=grace
    )
    leftovers = sorted({m for m in _PLACEHOLDER.findall(yaml.safe_dump(data, allow_unicode=True))})
    if leftovers:
        raise DlcSpecError(
            "spec still has placeholders "
            + ", ".join(leftovers)
            + ": fill them in pai/job.yaml or pass --set PATH=VALUE"
            + (" (--region fills <REGION>)" if REGION_PLACEHOLDER in leftovers else "")
        )
    envs.update(oss_endpoint_env(data, envs, region=region, uris=[manifest_uri, output]))
    return to_request(data)


def make_client(*, region: str | None, endpoint: str | None = None) -> Any:
    """SDK client with the default credential chain (env AK, RRSA/OIDC, ECS RAM role, credentials file).

    ``endpoint`` may carry a scheme (``http://127.0.0.1:8080`` for a local test server).
    """
    from alibabacloud_credentials.client import Client as CredentialClient
    from alibabacloud_pai_dlc20201203.client import Client
    from alibabacloud_tea_openapi.models import Config

    if not region and not endpoint:
        raise DlcSpecError("DLC needs --region (or ALIBABA_CLOUD_REGION_ID) or --endpoint")
    protocol = "https"
    host = endpoint or f"pai-dlc.{region}.aliyuncs.com"
    if "://" in host:
        parts = urlsplit(host)
        protocol, host = parts.scheme, parts.netloc
    config = Config(credential=_credentials(CredentialClient), region_id=region, endpoint=host, protocol=protocol)
    return Client(config)


def _credentials(client_cls: Any) -> Any:
    """An explicit AK/STS from the environment *now*, else the SDK's default chain.

    alibabacloud_credentials reads ``ALIBABA_CLOUD_ACCESS_KEY_*`` once, when it is first imported; a
    process whose environment is set later (a CI step, a test) would otherwise fall through the chain.
    ``ALIBABACLOUD_*`` (the aliyun CLI's names, all that older releases of the GitHub action export)
    count too: the SDK alone would not see them and fail with "accessKeyId cannot be empty".
    """
    from alibabacloud_credentials.models import Config as CredentialConfig

    if keys := alibaba_cloud_keys():
        ak, sk, token = keys
        kind = "sts" if token else "access_key"
        return client_cls(CredentialConfig(type=kind, access_key_id=ak, access_key_secret=sk, security_token=token))
    return client_cls()


def create_job(client: Any, request: Any) -> str:
    resp = client.create_job(request)
    job_id = getattr(resp.body, "job_id", None)
    if not job_id:
        raise RuntimeError(f"CreateJob returned no JobId (request id {getattr(resp.body, 'request_id', '?')})")
    return str(job_id)


_NOT_FOUND = re.compile(r"NotExist|NotFound|not exist|not found|EntityNotExist", re.I)
_DENIED = re.compile(r"Forbidden|NoPermission|Unauthorized|InvalidAccessKey|SignatureDoesNotMatch|Security", re.I)


def api_error(e: Exception) -> tuple[str, str]:
    """``(code, message)`` of an SDK exception (TeaException/ClientException carry both), scrubbed."""
    from kolors_job.core.redact import scrub

    code = str(getattr(e, "code", "") or type(e).__name__)
    data = getattr(e, "data", None)
    message = (data.get("Message") if isinstance(data, dict) else None) or getattr(e, "message", "") or str(e)
    return code, scrub(str(message))[:300]


def error_kind(e: Exception) -> str:
    """``gone`` (the job does not exist: HTTP 404 or a not-exist code), ``denied`` (403/RAM), else ``other``."""
    status = getattr(e, "status_code", None) or getattr(e, "statusCode", None)
    code, message = api_error(e)
    if status == 404 or _NOT_FOUND.search(code) or _NOT_FOUND.search(message):
        return "gone"
    if status in (401, 403) or _DENIED.search(code):
        return "denied"
    return "other"


def job_state(client: Any, dlc_job_id: str) -> tuple[str, str]:
    """``(status, reason)`` of a DLC job."""
    from alibabacloud_pai_dlc20201203.models import GetJobRequest

    body = client.get_job(dlc_job_id, GetJobRequest()).body
    reason = " ".join(x for x in (getattr(body, "reason_code", None), getattr(body, "reason_message", None)) if x)
    return str(body.status), reason


def wait_job(
    client: Any,
    dlc_job_id: str,
    *,
    timeout: float,
    poll: float = 15.0,
    on_change: Callable[[str, str], None] | None = None,
) -> str | None:
    """Poll until Succeeded/Failed/Stopped; ``None`` on timeout."""
    deadline = time.monotonic() + timeout
    last = None
    while True:
        status, reason = job_state(client, dlc_job_id)
        if status != last and on_change:
            on_change(status, reason)
        last = status
        if status in TERMINAL_STATES:
            return status
        if time.monotonic() >= deadline:
            return None
        time.sleep(min(poll, max(0.0, deadline - time.monotonic())))


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
