"""PAI AutoML: a sweep as an HPO experiment whose trials are DLC jobs of the kolors-job image.

``pai/automl.yaml`` is a ``CreateHpoExperimentRequest`` in the API's own field names; the sweep fills it:

- ``search_space``: each swept path as a ``${name}`` placeholder (``train.learning_rate`` →
  ``${train_learning_rate}``) with NNI's ``_type``/``_value`` (``choice``, ``uniform``/``quniform``,
  ``loguniform``/``qloguniform``, ``randint`` — whose upper end NNI excludes, so ``int: [8, 32]`` is
  ``[8, 33]``);
- ``platform_config.cmd``: the spec's ``dlc submit pytorchjob`` line with the image, the trial's environment
  (manifest URI, cache and scratch dirs, JSON logs, the region's internal OSS endpoint) and the command:
  ``python /app/entrypoint.py run --trial ${exp_id}-${trial_id} --output <output>/<sweep>/ --set path=${name} …``
  (AutoML substitutes ``${exp_id}``, ``${trial_id}`` and each parameter in the command, as its docs'
  ``metric_source`` examples use them);
- ``metric_config``: ``metric_type: json`` read from ``<output>/<sweep>/_automl/${exp_id}-${trial_id}.json``,
  which the trial rewrites at every validation point and at the end (:mod:`kolors_job.sweep.metrics`),
  ``metric_dict: {objective: 1}`` (the job computes the sweep's weighted sum), ``final_mode: final``;
- ``yml_config``: ``trial_concurrency``, ``max_trial_number``, the tuner (random → ``Random``, grid →
  ``GridSearch``, tpe → ``TPE``, bayesianoptimization → ``GPTuner``) and, with early stopping, the
  ``PAIAssessor`` with the class arguments the API lists (``start_step``, ``optimize_mode``, ``earlystop``).

The SDK silently drops fields it does not know; as for DLC (:mod:`kolors_job.launch.dlc`), a request that
does not survive ``from_map``/``to_map`` unchanged is refused. Trial ids are mixed case (``mf99W4``); the job
id is derived from them (:func:`kolors_job.sweep.overrides.trial_job_id`), while the metric file keeps the
raw ids, which is all ``metric_source`` can name.
"""

from __future__ import annotations

import argparse
import copy
import json
import shlex
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from kolors_job.core.errors import ExitCode, JobError, ManifestError
from kolors_job.launch import dlc
from kolors_job.launch.regions import REGION_RE, internal_endpoint
from kolors_job.sweep.metrics import OBJECTIVE
from kolors_job.sweep.spec import LoadedSweep, Range, param_key

TUNERS = {"random": "Random", "grid": "GridSearch", "tpe": "TPE", "bayesianoptimization": "GPTuner"}
"""The sweep's algorithm → NNI's built-in tuner name (AutoML's tuners are NNI's)."""
OPTIMIZING_TUNERS = ("TPE", "GPTuner")
"""Tuners that take ``optimize_mode`` (Random and GridSearch do not optimise anything)."""
ASSESSOR = "PAIAssessor"
TRIAL = "${exp_id}-${trial_id}"
METRICS_DIR = "_automl"
ENTRYPOINT = "/app/entrypoint.py"
TERMINAL_TRIAL = ("FINISHED", "SUCCEEDED", "FAILED", "USER_CANCELED", "SYS_CANCELED", "EARLY_STOPPED", "STOPPED")
RUNNING_EXPERIMENT = ("", "CREATED", "INITIALIZED", "WAITING", "RUNNING", "STOPPING", "RESUMING")
"""Experiment states that are not an end; any other state (DONE, STOPPED, FAILED, ERROR…) is one."""


def placeholder(path: str) -> str:
    """A swept path's name in AutoML's search space and command: ``${train_learning_rate}``."""
    return "${" + param_key(path).replace("-", "_") + "}"


def search_space(loaded: LoadedSweep) -> dict[str, Any]:
    space: dict[str, Any] = {}
    for path, s in loaded.body.parameters.items():
        if isinstance(s, Range):
            low, high = s.bounds
            if s.kind == "int":
                step = int(s.step or 1)
                entry = ({"_type": "randint", "_value": [int(low), int(high) + 1]} if step == 1
                         else {"_type": "quniform", "_value": [int(low), int(high), step]})  # fmt: skip
            else:
                kind = "loguniform" if s.kind == "log_uniform" else "uniform"
                entry = ({"_type": kind, "_value": [float(low), float(high)]} if s.step is None
                         else {"_type": "q" + kind, "_value": [float(low), float(high), float(s.step)]})  # fmt: skip
        else:
            entry = {"_type": "choice", "_value": list(s)}
        space[placeholder(path)] = entry
    return space


def experiment_prefix(loaded: LoadedSweep, output: str | None) -> str:
    root = output or loaded.base.spec.output.uri
    prefix = f"{root.rstrip('/')}/{loaded.name}/"
    if not prefix.startswith("oss://"):
        raise dlc.DlcSpecError(f"--output: {prefix} must be an oss:// prefix: PAI AutoML reads trial metrics from OSS")
    return prefix


def metric_uri(prefix: str) -> str:
    return f"{prefix}{METRICS_DIR}/{TRIAL}.json"


def trial_command(loaded: LoadedSweep, prefix: str) -> str:
    words = ["python", ENTRYPOINT, "run", "--trial", TRIAL, "--output", prefix,
             "--objective", loaded.body.objective.text(), "--metrics-json", metric_uri(prefix)]  # fmt: skip
    for path in loaded.body.parameters:
        words += ["--set", f"{path}={placeholder(path)}"]
    # no shlex quoting inside: ${...} must stay visible to AutoML's substitution, and every word is
    # shell-safe (paths, URIs, and values the sweep spec restricted to safe characters)
    return " ".join(words)


def envs(*, manifest_uri: str, region: str | None, extra: dict[str, str]) -> dict[str, str]:
    out = {
        "KOLORS_JOB_MANIFEST_URI": manifest_uri,
        "KOLORS_JOB_CACHE_DIR": "/cache",
        "KOLORS_JOB_WORK_DIR": "/tmp/kolors-job-work",  # noqa: S108 - the DLC container's own disk
        "KOLORS_JOB_LOG_FORMAT": "json",
    }
    if region:
        out["KOLORS_JOB_OSS_ENDPOINT"] = internal_endpoint(region)
    out.update(extra)
    for k, v in out.items():
        if "," in v or "=" in k or not k:
            raise dlc.DlcSpecError(f"--env {k}={v}: the DLC client's --envs cannot carry ',' in a value")
    return out


def build_request(spec: dict[str, Any], loaded: LoadedSweep, *, manifest_uri: str, image: str | None,
                  region: str | None, output: str | None = None, overrides: list[str] | None = None,
                  extra_env: dict[str, str] | None = None, cache_dataset: str | None = None) -> Any:  # fmt: skip
    """The CreateHpoExperimentRequest ``submit pai-automl`` sends (DlcSpecError: exit 2)."""
    if region and not REGION_RE.match(region):
        raise dlc.DlcSpecError(f"--region: {region!r} is not an Alibaba Cloud region id like cn-beijing")
    if not manifest_uri.startswith("oss://"):
        raise dlc.DlcSpecError(f"--manifest-uri: {manifest_uri} must be an oss:// object (DLC trials read it there)")
    data = copy.deepcopy(spec)
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise dlc.DlcSpecError(f"--set {item!r}: expected PATH=VALUE, e.g. WorkspaceId=12345")
        try:
            dlc.set_path(data, key, raw)
        except (KeyError, IndexError, ValueError, TypeError) as e:
            raise dlc.DlcSpecError(f"--set {item!r}: no such place in the spec ({e})") from None
    body = loaded.body
    prefix = experiment_prefix(loaded, output)
    config = data.setdefault("HpoExperimentConfiguration", {})
    platform = config.get("platform_config") or {}
    if not platform.get("cmd"):
        raise dlc.DlcSpecError("HpoExperimentConfiguration.platform_config.cmd: the DLC command is required")
    env = envs(manifest_uri=manifest_uri, region=region, extra=extra_env or {})
    fills = {
        "<IMAGE>": image or "<IMAGE>",
        "<ENVS>": ",".join(f"{k}={v}" for k, v in env.items()),
        "<COMMAND>": shlex.quote(trial_command(loaded, prefix)),
    }
    if region:
        fills["<REGION>"] = region
    if cache_dataset:
        fills["<CACHE_DATASET_ID>"] = cache_dataset
    workspace = str(data.get("WorkspaceId") or "")
    if workspace and not dlc._PLACEHOLDER.fullmatch(workspace):
        fills["<WORKSPACE_ID>"] = workspace  # the command's --workspace_id is the request's
    platform["cmd"] = [_fill(line, fills) for line in platform["cmd"]]
    config["platform_config"] = platform
    data["Name"] = loaded.name
    config["search_space"] = search_space(loaded)
    metric = dict(config.get("metric_config") or {})
    metric.update(metric_type="json", metric_source=[metric_uri(prefix)], metric_dict={OBJECTIVE: 1.0})
    metric.setdefault("final_mode", "final")
    config["metric_config"] = metric
    yml = dict(config.get("yml_config") or {})
    tuner: dict[str, Any] = {"name": TUNERS[body.algorithm]}
    if tuner["name"] in OPTIMIZING_TUNERS:
        tuner["class_args"] = {"optimize_mode": "maximize"}
    yml.update(experiment_name=loaded.name, trial_concurrency=body.parallel_trials,
               max_trial_number=body.max_trials, tuner=tuner)  # fmt: skip
    if body.early_stopping is not None:
        yml["assessor"] = {"name": ASSESSOR, "class_args": {
            "start_step": body.early_stopping.start_step, "optimize_mode": "maximize", "earlystop": True}}  # fmt: skip
    config["yml_config"] = yml
    leftovers = sorted(set(dlc._PLACEHOLDER.findall(yaml.safe_dump(data, allow_unicode=True))))
    if leftovers:
        raise dlc.DlcSpecError(
            "spec still has placeholders " + ", ".join(leftovers) + ": fill them in pai/automl.yaml or pass "
            "--set PATH=VALUE" + (" (--image fills <IMAGE>)" if "<IMAGE>" in leftovers else "")
        )
    return to_request(data)


def _fill(text: str, fills: dict[str, str]) -> str:
    for k, v in fills.items():
        text = text.replace(k, v)
    return text


def to_request(data: dict[str, Any]) -> Any:
    """``CreateHpoExperimentRequest.from_map`` that fails instead of dropping what the SDK does not know."""
    from alibabacloud_paiautoml20220828.models import CreateHpoExperimentRequest

    request = CreateHpoExperimentRequest().from_map(copy.deepcopy(data))
    problems = dlc.model_diff(data, request.to_map(), what="the SDK's CreateHpoExperimentRequest")
    if problems:
        raise dlc.DlcSpecError("AutoML spec does not map onto CreateHpoExperimentRequest: " + "; ".join(problems))
    return request


def make_client(*, region: str | None, endpoint: str | None = None) -> Any:
    """The AutoML SDK client with the credential chain ``submit dlc`` uses (``endpoint`` may carry a scheme)."""
    from alibabacloud_credentials.client import Client as CredentialClient
    from alibabacloud_paiautoml20220828.client import Client
    from alibabacloud_tea_openapi.models import Config

    if not region and not endpoint:
        raise dlc.DlcSpecError("PAI AutoML needs --region (or ALIBABA_CLOUD_REGION_ID) or --endpoint")
    protocol, host = "https", endpoint or f"paiautoml.{region}.aliyuncs.com"
    if "://" in host:
        parts = urlsplit(host)
        protocol, host = parts.scheme, parts.netloc
    config = Config(credential=dlc._credentials(CredentialClient), region_id=region, endpoint=host, protocol=protocol)
    return Client(config)


def load_spec(path: str | Path) -> dict[str, Any]:
    data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise dlc.DlcSpecError(f"{path}: an AutoML spec must be a mapping of CreateHpoExperiment fields")
    return data


# ------------------------------------------------------------------------------------------ CLI


def _request_from(ns: argparse.Namespace, loaded: LoadedSweep, manifest_uri: str) -> Any:
    return build_request(load_spec(ns.automl_spec), loaded, manifest_uri=manifest_uri, image=ns.image,
                         region=ns.region, output=ns.output, overrides=ns.set, cache_dataset=ns.cache_dataset,
                         extra_env=dict(getattr(ns, "env", None) or []))  # fmt: skip


def _cmd_render(ns: argparse.Namespace) -> int:
    from kolors_job.sweep.spec import load_sweep

    loaded = load_sweep(ns.sweep)
    try:
        request = _request_from(ns, loaded, ns.manifest_uri)
    except (dlc.DlcSpecError, OSError) as e:
        raise ManifestError(f"render pai-automl: {e}") from None
    print(json.dumps(dlc.prune(request.to_map()), indent=2, ensure_ascii=False))
    return int(ExitCode.OK)


def add_arguments(p: argparse.ArgumentParser) -> None:
    from kolors_job.launch.options import add_dlc_arguments

    p.add_argument("--sweep", required=True, help="the sweep file (examples/sweep.yaml)")
    p.add_argument("--manifest-uri", required=True, help="the sweep's manifest, uploaded to OSS")
    p.add_argument("--output", help="overrides the manifest's spec.output.uri (an oss:// prefix)")
    p.add_argument("--image", help="the kolors-job image (ACR, in the job's region)")
    add_dlc_arguments(p)
    p.add_argument("--automl-spec", default="pai/automl.yaml", help="CreateHpoExperiment spec (default %(default)s)")
    p.add_argument("--cache-dataset", metavar="ID", help="the PAI dataset mounted at /cache in every trial "
                   "(fills <CACHE_DATASET_ID>)")


def add_render_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:  # type: ignore[type-arg]
    p = sub.add_parser("pai-automl", help="print the PAI AutoML CreateHpoExperiment request of a sweep as JSON")
    add_arguments(p)
    p.set_defaults(func=_cmd_render)
    return p


# ------------------------------------------------------------------------------------------ submit


def trial_lines(client: Any, experiment_id: str, seen: set[str]) -> list[str]:
    """One line per trial that ended since the last call (ListHpoTrials)."""
    from alibabacloud_paiautoml20220828.models import ListHpoTrialsRequest

    lines = []
    body = client.list_hpo_trials(experiment_id, ListHpoTrialsRequest(page_number=1, page_size=100)).body
    for t in body.trials or []:
        status = str(t.status or "")
        if status in TERMINAL_TRIAL and t.trial_id not in seen:
            seen.add(t.trial_id)
            metric = t.final_metric or "n/a"
            lines.append(f"trial {t.trial_id} {status}: metric {metric}  {t.hyperparam or ''}".rstrip())
    return lines


def follow(client: Any, experiment_id: str, *, timeout: float, poll: float, say: Callable[[str], None]) -> str | None:
    """Print trials as they end; the experiment's final status, or None at the timeout."""
    seen: set[str] = set()
    deadline = time.monotonic() + timeout
    last = None
    while True:
        try:
            for line in trial_lines(client, experiment_id, seen):
                say(line)
            status = str(client.get_hpo_experiment(experiment_id).body.status or "")
        except Exception as e:  # the SDK raises TeaException and requests errors: keep following
            code, message = dlc.api_error(e)
            say(f"AutoML experiment {experiment_id}: will retry: {code}: {message}")
            status = None
        if status is not None and status != last:
            say(f"experiment {experiment_id} {status}")
            last = status
        if status is not None and status.upper() not in RUNNING_EXPERIMENT:
            return status
        if time.monotonic() >= deadline:
            say(f"timed out after {timeout:.0f} s following experiment {experiment_id} (it may still be running)")
            return None
        time.sleep(max(0.0, min(poll, deadline - time.monotonic())))


def cmd_submit(ns: argparse.Namespace) -> int:
    """``submit pai-automl``: upload the manifest, create the experiment, follow it, report the best trial."""
    from kolors_job.launch.outputs import say, upload_manifest
    from kolors_job.sweep.report import followed_outcome
    from kolors_job.sweep.spec import load_sweep

    try:
        if not ns.sweep:
            raise ManifestError("submit pai-automl: --sweep FILE is required")
        loaded = load_sweep(ns.sweep)
        manifest_uri = ns.manifest_uri
        if not manifest_uri:
            if not ns.bucket:
                raise ManifestError("submit pai-automl: --bucket URI (where the manifest goes) or --manifest-uri")
            manifest_uri = upload_manifest(ns.bucket, loaded.name, loaded.manifest_raw)
        request = _request_from(ns, loaded, manifest_uri)
    except ManifestError as e:
        for p in e.problems:
            say(f"invalid sweep: {p}")
        return int(e.exit_code)
    except dlc.DlcSpecError as e:
        say(f"kolors-job submit pai-automl: {e}")
        return int(ExitCode.INVALID_MANIFEST)
    except JobError as e:
        say(f"kolors-job submit pai-automl: {e}")
        return int(e.exit_code)
    prefix = experiment_prefix(loaded, ns.output)
    try:
        client = make_client(region=ns.region, endpoint=ns.endpoint)
        body = client.create_hpo_experiment(request).body
    except dlc.DlcSpecError as e:
        say(f"kolors-job submit pai-automl: {e}")
        return int(ExitCode.INVALID_MANIFEST)
    except Exception as e:  # the SDK raises TeaException/ClientException/requests errors
        err = dlc.dlc_error(e)
        say(str(err).replace("PAI-DLC CreateJob", "PAI AutoML CreateHpoExperiment"))
        return int(err.exit_code)
    experiment_id = str(body.experiment_id or "")
    if not experiment_id:
        say(f"PAI AutoML CreateHpoExperiment returned no ExperimentId (request id {body.request_id})")
        return int(ExitCode.INTERNAL)
    say(f"started: PAI AutoML experiment {experiment_id} ({loaded.name}); trials in {prefix}")
    if not ns.wait:
        return int(ExitCode.OK)
    done = follow(client, experiment_id, timeout=ns.timeout, poll=ns.poll, say=say)
    return followed_outcome(prefix, done, weights=loaded.body.objective.weights, say=say)
