"""Katib's own rules, ported to Python so the CPU tests can hold our Experiment and metric lines to them.

Source: ``kubeflow/katib`` at commit ``33c8ff4e5d1814b59abd308e6819e839e9906bc2`` (``fetch github:kubeflow/katib``).
Every rule cites the file and line(s) it comes from; where Go and Python differ (RFC 3339 parsing, regex
flavours) the port keeps Go's behaviour, and ``tests/test_sweep_katib.py`` checks the collector port against
the cases of Katib's own ``file-metricscollector_test.go`` and its historical ``testdata/JSON`` files
(``tests/fixtures/katib/file-metricscollector/``).

- :func:`collect` — ``pkg/metricscollector/v1beta1/file-metricscollector/file-metricscollector.go``
- :func:`set_defaults` — ``pkg/apis/controller/experiments/v1beta1/experiment_defaults.go`` (the mutating
  webhook runs before the validating one)
- :func:`validate_experiment` — ``pkg/webhook/v1beta1/experiment/validator/validator.go``
- :func:`substitute` — ``pkg/controller.v1beta1/experiment/manifest/generator.go`` (``applyParameters``)
- :func:`wrap_primary_container` — ``pkg/webhook/v1beta1/pod/utils.go`` (``wrapWorkerContainer``)
"""

from __future__ import annotations

import copy
import datetime as dt
import json
import os
import re
from decimal import Decimal
from pathlib import Path
from typing import Any

import yaml

KATIB_COMMIT = "33c8ff4e5d1814b59abd308e6819e839e9906bc2"
FIXTURES = Path(__file__).parent / "fixtures" / "katib"

# ------------------------------------------------------------------------------- metrics collector

DEFAULT_FILTER = r"([\w|-]+)\s*=\s*([+-]?\d*(\.\d+)?([Ee][+-]?\d+)?)"
"""``pkg/metricscollector/v1beta1/common/const.go:47`` (``DefaultFilter``)."""
TIMESTAMP_KEY = "timestamp"  # common/const.go:49 (TimeStampJsonKey)
UNAVAILABLE = "unavailable"  # pkg/controller.v1beta1/consts/const.go:155 (UnavailableMetricValue)
ZERO_TIME = "0001-01-01T00:00:00Z"  # Go: time.Time{}.UTC().Format(time.RFC3339)
_RFC3339 = re.compile(r"^(\d{4})-(\d{2})-(\d{2})[Tt](\d{2}):(\d{2}):(\d{2})(\.\d+)?([Zz]|[+-]\d{2}:\d{2})$")


class CollectorError(Exception):
    """``errFileFormat`` / ``errOpenFile`` / ``errParseJson`` (file-metricscollector.go:38-43)."""

    def __init__(self, kind: str, detail: str = "") -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind = kind


def _is_rfc3339(text: str) -> bool:
    """Go's ``time.Parse(time.RFC3339Nano, s)`` succeeds (a real date and time, optional fraction)."""
    m = _RFC3339.match(text)
    if not m:
        return False
    try:
        dt.datetime(*(int(g) for g in m.groups()[:6]))
    except ValueError:
        return False
    return True


def _rfc3339nano(sec: int, nanos: int) -> str:
    """Go's ``time.Unix(sec, nsec).UTC().Format(time.RFC3339Nano)``: trailing zeros of the fraction dropped."""
    sec, nanos = sec + nanos // 1_000_000_000, nanos % 1_000_000_000
    base = (dt.datetime(1970, 1, 1) + dt.timedelta(seconds=sec)).strftime("%Y-%m-%dT%H:%M:%S")
    frac = f"{nanos:09d}".rstrip("0")
    return f"{base}.{frac}Z" if frac else f"{base}Z"


def parse_timestamp(value: Any) -> str:
    """file-metricscollector.go:199-239 (``parseTimestamp``); "" where Go warns and gives up."""
    if isinstance(value, str):
        return value if value and _is_rfc3339(value) else ""  # :200-209
    if not isinstance(value, (int, float)) or isinstance(value, bool):  # :213-217: float64 (Go decodes every
        return ""  # JSON number into an interface{} as float64, integers included)
    text = format(Decimal(repr(float(value))), "f").removesuffix(".0")  # :219 FormatFloat(f, 'f', -1, 64)
    whole, _, frac = text.partition(".")  # :220
    nanos = int(frac) if frac else 0  # :228-235 — the fraction's digits as nanoseconds, as Go does
    return _rfc3339nano(int(whole), nanos)  # :237


def _observation(logs: list[tuple[str, str, str]], metrics: list[str]) -> list[tuple[str, str, str]]:
    """file-metricscollector.go:169-197 (``newObservationLog``): no objective metric → one ``unavailable``."""
    if not any(name == metrics[0] for _, name, _ in logs):
        return [(ZERO_TIME, metrics[0], UNAVAILABLE)]
    return logs


def _text_logs(lines: list[str], metrics: list[str], filters: list[str]) -> list[tuple[str, str, str]]:
    """file-metricscollector.go:72-126 (``parseLogsInTextFormat``), with ``GetFilterRegexpList`` (:242-252)."""
    regexps = [re.compile(f, re.ASCII) for f in (filters or [DEFAULT_FILTER])]  # Go's \\w and \\d are ASCII
    out: list[tuple[str, str, str]] = []
    for line in lines:
        if not any(m in line for m in metrics):  # :78-87
            continue
        timestamp = ZERO_TIME
        head, sep, _ = line.partition(" ")  # :90 SplitN(line, " ", 2)
        if sep and _is_rfc3339(head):  # :91-99
            timestamp = head
        for reg in regexps:  # :101-123
            for match in reg.finditer(line):
                groups = (match.group(0), *match.groups())
                if len(groups) < 3:
                    continue
                name, value = groups[1].strip(), (groups[2] or "").strip()
                if name in metrics:
                    out.append((timestamp, name, value))
    return out


def _json_logs(lines: list[str], metrics: list[str]) -> list[tuple[str, str, str]]:
    """file-metricscollector.go:128-167 (``parseLogsInJsonFormat``)."""
    out: list[tuple[str, str, str]] = []
    for line in lines:
        if not line:  # :132
            continue
        try:
            obj = json.loads(line, parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c)))  # Go has no NaN
        except ValueError as e:
            raise CollectorError("errParseJson", str(e)) from None
        if not isinstance(obj, dict):  # json.Unmarshal into map[string]interface{}
            raise CollectorError("errParseJson", "not an object")
        timestamp = ZERO_TIME
        if TIMESTAMP_KEY in obj and (parsed := parse_timestamp(obj[TIMESTAMP_KEY])):  # :141-150
            timestamp = parsed
        for m in metrics:  # :152-164 — only string values count
            value = obj.get(m)
            if isinstance(value, str):
                out.append((timestamp, m, value))
    return out


def collect(path: str | os.PathLike[str], metrics: list[str], filters: list[str] | None = None,
            fmt: str = "JSON") -> list[tuple[str, str, str]]:  # fmt: skip
    """file-metricscollector.go:45-70 (``CollectObservationLog``): ``[(timestamp, name, value)]``."""
    if fmt not in ("JSON", "TEXT"):  # :47-49
        raise CollectorError("errFileFormat", fmt)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise CollectorError("errOpenFile", str(e)) from None
    lines = text.split("\n")  # :64/:66 strings.Split(logs, "\n")
    logs = _text_logs(lines, metrics, filters or []) if fmt == "TEXT" else _json_logs(lines, metrics)
    return _observation(logs, metrics)


# ------------------------------------------------------------------------------- experiment defaults


def set_defaults(exp: dict[str, Any]) -> dict[str, Any]:
    """experiment_defaults.go:27-200 (``SetDefault``): what Katib's mutating webhook fills in."""
    exp = copy.deepcopy(exp)
    spec = exp.setdefault("spec", {})
    spec.setdefault("parallelTrialCount", 3)  # :36-41 (DefaultTrialParallelCount, constants.go)
    spec.setdefault("resumePolicy", "Never")  # :43-47
    obj = spec.get("objective")
    if obj is not None:  # :49-94
        strategies = obj.setdefault("metricStrategies", [])
        named = {s["name"] for s in strategies}
        default = {"minimize": "min", "maximize": "max"}.get(obj.get("type", ""), "latest")
        if obj.get("objectiveMetricName") not in named:
            strategies.append({"name": obj.get("objectiveMetricName"), "value": default})
        for m in obj.get("additionalMetricNames") or []:
            if m not in named:
                strategies.append({"name": m, "value": default})
    t = spec.get("trialTemplate")
    if t is not None and t.get("trialSpec") is not None:  # :96-137
        kind = t["trialSpec"].get("kind")
        if kind == "Job":
            t.setdefault("successCondition", 'status.conditions.#(type=="Complete")#|#(status=="True")#')
            t.setdefault("failureCondition", 'status.conditions.#(type=="Failed")#|#(status=="True")#')
        elif kind in ("TFJob", "PyTorchJob", "XGBoostJob", "MPIJob", "PaddleJob", "JAXJob"):
            t.setdefault("successCondition", 'status.conditions.#(type=="Succeeded")#|#(status=="True")#')
            t.setdefault("failureCondition", 'status.conditions.#(type=="Failed")#|#(status=="True")#')
            t.setdefault("primaryPodLabels", {"training.kubeflow.org/job-role": "master"})
    mc = spec.setdefault("metricsCollectorSpec", {})  # :139-192
    mc.setdefault("collector", {"kind": "StdOut"})
    if mc["collector"].get("kind") == "File":
        fsp = mc.setdefault("source", {}).setdefault("fileSystemPath", {})
        fsp.setdefault("kind", "File")
        fsp.setdefault("path", "/var/log/katib/metrics.log")
        fsp.setdefault("format", "TEXT")
    for p in spec.get("parameters") or []:  # :194-200
        p.setdefault("feasibleSpace", {}).setdefault("distribution", "uniform")
    return exp


# ------------------------------------------------------------------------------- validating webhook

PARAM_RE = re.compile(r"\$\{trialParameters\..+?\}")  # consts/const.go:138
META_RE = re.compile(r"\$\{trialSpec\.(.+?)\}")  # consts/const.go:141
META_PARSE_RE = re.compile(r"(.+)\[(.+)]")  # consts/const.go:143
META_KEYS = ("Name", "Namespace", "Kind", "APIVersion", "Annotations", "Labels")  # consts/const.go:146-151


def katib_config() -> dict[str, Any]:
    """``manifests/v1beta1/installs/katib-standalone/katib-config.yaml``: the suggestions, early stoppings,
    collectors and trial kinds a stock install knows (the webhook asks the config, validator.go:215/233/495)."""
    return yaml.safe_load((FIXTURES / "katib-config.yaml").read_text(encoding="utf-8"))


def _is_meta_key(ref: str) -> bool:
    """validator.go:576-593 (``isMetaKey``)."""
    m = META_RE.search(ref)
    if not m:
        return False
    key = m.group(1)
    if key in META_KEYS:
        return True
    sub = META_PARSE_RE.search(key)
    return bool(sub) and sub.group(1) in META_KEYS


def _validate_trial_job(run_spec: dict[str, Any], k8s_version: str | None) -> str | None:
    """validator.go:440-485 (``validateTrialJob``): a batch/v1 Job must convert to Kubernetes' Job type with
    nothing left over (its JSON-patch check); kubernetes-validate's strict schema is that same type."""
    if run_spec.get("apiVersion") != "batch/v1" or run_spec.get("kind") != "Job":
        return None  # :443-446 other kinds are not validated
    import kubernetes_validate

    try:
        kubernetes_validate.validate(run_spec, k8s_version or kubernetes_validate.utils.latest_version(), strict=True)
    except kubernetes_validate.ValidationError as e:
        return f"invalid spec.trialTemplate: {e.message}"
    return None


def validate_experiment(exp: dict[str, Any], *, k8s_version: str | None = None) -> list[str]:
    """validator.go:81-181 (``ValidateExperiment`` for a new Experiment): every error as ``path: message``."""
    cfg = katib_config()
    errs: list[str] = []
    name = (exp.get("metadata") or {}).get("name", "")
    if not re.match(r"^[a-z]([-a-z0-9]*[a-z0-9])?", name) or len(name) > 40:  # :84-92
        errs.append("metadata.name: must be a lower-case DNS-like name of at most 40 characters")
    spec = exp.get("spec") or {}
    max_failed, max_trials, parallel = (spec.get(k) for k in ("maxFailedTrialCount", "maxTrialCount",
                                                              "parallelTrialCount"))  # fmt: skip
    if max_failed is not None and max_failed < 0:  # :94-96
        errs.append("spec.maxFailedTrialCount: should not be less than 0")
    if max_trials is not None and max_trials <= 0:  # :97-99
        errs.append("spec.maxTrialCount: must be greater than 0")
    if parallel is not None and parallel <= 0:  # :100-102
        errs.append("spec.parallelTrialCount: must be greater than 0")
    if max_failed is not None and max_trials is not None and max_failed > max_trials:  # :104-109
        errs.append("spec.maxFailedTrialCount: should be less than or equal to spec.maxTrialCount")
    if parallel is not None and max_trials is not None and parallel > max_trials:  # :110-115
        errs.append("spec.parallelTrialCount: should be less than or equal to spec.maxTrialCount")
    obj = spec.get("objective")  # :144-147, validateObjective :183-202
    if obj is None:
        return [*errs, "spec.objective: must be specified"]
    if obj.get("type") not in ("minimize", "maximize"):
        errs.append("spec.objective.type: must be minimize or maximize")
    if not obj.get("objectiveMetricName"):
        errs.append("spec.objective.objectiveMetricName: must be specified")
    if obj.get("objectiveMetricName") in (obj.get("additionalMetricNames") or []):
        errs.append("spec.objective.additionalMetricNames: should not contain spec.objective.objectiveMetricName")
    alg = spec.get("algorithm")  # validateAlgorithm :204-221
    if alg is None:
        errs.append("spec.algorithm: must be specified")
    else:
        if not alg.get("algorithmName"):
            errs.append("spec.algorithm.algorithmName: must be specified")
        if alg.get("algorithmName") not in {s["algorithmName"] for s in cfg["runtime"]["suggestions"]}:
            errs.append(f"spec.algorithm.algorithmName: {alg.get('algorithmName')!r}: no Suggestion config data")
    es = spec.get("earlyStopping")  # validateEarlyStopping :223-239
    if es is not None:
        if not es.get("algorithmName"):
            errs.append("spec.earlyStopping.algorithmName: must be specified")
        if es.get("algorithmName") not in {s["algorithmName"] for s in cfg["runtime"]["earlyStoppings"]}:
            errs.append(f"spec.earlyStopping.algorithmName: {es.get('algorithmName')!r}: no EarlyStopping config")
    if spec.get("resumePolicy", "") not in ("", "Never", "LongRunning", "FromVolume"):  # :241-253
        errs.append("spec.resumePolicy: invalid ResumePolicyType")
    errs += _validate_trial_template(exp, cfg, k8s_version)  # :158-160
    params = spec.get("parameters") or []
    if not params and spec.get("nasConfig") is None:  # :162-164
        errs.append("spec: spec.parameters or spec.nasConfig must be specified")
    if params and spec.get("nasConfig") is not None:  # :166-169
        errs.append("spec: only one of spec.parameters and spec.nasConfig can be specified")
    errs += _validate_parameters(params)  # :171-175
    errs += _validate_metrics_collector(spec.get("metricsCollectorSpec") or {}, cfg)  # :177-179
    return errs


def _validate_parameters(params: list[dict[str, Any]]) -> list[str]:
    """validator.go:255-303 (``validateParameters``)."""
    errs = []
    for i, p in enumerate(params):
        where = f"spec.parameters[{i}]"
        ptype = p.get("parameterType", "")
        if ptype not in ("int", "double", "categorical", "discrete", "unknown"):  # :259-266
            errs.append(f"{where}.parameterType: {ptype} is not supported")
        fs = p.get("feasibleSpace") or {}
        if fs.get("distribution", "") not in ("", "uniform", "logUniform", "normal", "logNormal", "unknown"):  # :268-277
            errs.append(f"{where}.feasibleSpace.distribution: {fs['distribution']} is not supported")
        if not fs:  # :279-281
            errs.append(f"{where}.feasibleSpace: feasibleSpace must be specified")
        elif ptype in ("double", "int"):  # :283-292
            if fs.get("list"):
                errs.append(f"{where}.feasibleSpace.list: not supported for parameterType {ptype}")
            if not fs.get("max") or not fs.get("min"):
                errs.append(f"{where}.feasibleSpace.max: feasibleSpace.max or .min must be specified for {ptype}")
        elif ptype in ("categorical", "discrete") and (fs.get("max") or fs.get("min") or fs.get("step")):  # :293-298
            errs.append(f"{where}.feasibleSpace: .max, .min and .step are not supported for {ptype}")
        for key in ("min", "max", "step"):  # the Go type: FeasibleSpace fields are strings
            if key in fs and not isinstance(fs[key], str):
                errs.append(f"{where}.feasibleSpace.{key}: must be a string (Go: string)")
        if any(not isinstance(v, str) for v in fs.get("list") or []):
            errs.append(f"{where}.feasibleSpace.list: items must be strings (Go: []string)")
    return errs


def _validate_trial_template(exp: dict[str, Any], cfg: dict[str, Any], k8s_version: str | None) -> list[str]:
    """validator.go:305-438 (``validateTrialTemplate``)."""
    spec = exp.get("spec") or {}
    t = spec.get("trialTemplate")
    where = "spec.trialTemplate"
    if t is None:  # :309-312
        return [f"{where}: must be specified"]
    errs = []
    if not t.get("primaryContainerName"):  # :315-317
        errs.append(f"{where}.primaryContainerName: must be specified")
    if not t.get("successCondition") or not t.get("failureCondition"):  # :320-322
        errs.append(f"{where}: successCondition and failureCondition must be specified")
    if t.get("trialParameters") is None:  # :325-327
        return [*errs, f"{where}.trialParameters: must be specified"]
    if t.get("trialSpec") is None and t.get("configMap") is None:  # :330-332
        return [*errs, f"{where}: spec.trialTemplate.trialSpec or spec.trialTemplate.configMap must be specified"]
    if t.get("trialSpec") is not None and t.get("configMap") is not None:  # :335-337
        return [*errs, f"{where}: only one of trialSpec or configMap can be specified"]
    template = json.dumps(t["trialSpec"])  # :348-352 GetTrialTemplate (ConvertUnstructuredToString)
    exp_params = {p.get("name") for p in spec.get("parameters") or []}
    names: set[str] = set()
    refs: set[str] = set()
    for i, p in enumerate(t["trialParameters"]):  # :362-404
        pname, ref = p.get("name", ""), p.get("reference", "")
        if not pname or not ref or "{" in pname or "}" in pname:  # :364-369
            errs.append(f"{where}.trialParameters[{i}]: name and reference must be specified, no '{{' or '}}'")
            continue
        if pname in names:  # :372-376
            errs.append(f"{where}.trialParameters[{i}].name: {pname} can't be duplicated")
            continue
        if ref in refs:  # :378-382
            errs.append(f"{where}.trialParameters[{i}].reference: {ref} can't be duplicated")
            continue
        names.add(pname)
        refs.add(ref)
        if exp_params and not _is_meta_key(ref) and ref not in exp_params:  # :387-394
            errs.append(f"{where}.trialParameters[{i}].reference: {ref} does not exist in spec.parameters")
        placeholder = "${trialParameters." + pname + "}"
        if placeholder not in template:  # :397-401
            return [*errs, f"{where}.trialParameters[{i}].name: {pname} not found in spec.trialTemplate"]
        template = template.replace(placeholder, "test-value")  # :403
    left = PARAM_RE.findall(template)  # :407-412
    if left:
        errs.append(f"{where}: parameters {left} in spec.trialTemplate not found in spec.trialParameters")
    try:
        run_spec = json.loads(template)  # :415-419 ConvertStringToUnstructured
    except ValueError:
        return [*errs, f"{where}: unable to convert spec.trialTemplate to unstructured"]
    meta = run_spec.get("metadata") or {}
    if meta.get("name") or meta.get("namespace"):  # :422-424
        errs.append(f"{where}: metadata.name and metadata.namespace in spec.trialTemplate must be omitted")
    if not run_spec.get("apiVersion") or not run_spec.get("kind"):  # :427-429
        errs.append(f"{where}: APIVersion and Kind in spec.trialTemplate must be specified")
    if (problem := _validate_trial_job(run_spec, k8s_version)) is not None:  # :433-435
        errs.append(f"{where}: {problem}")
    group, _, version = run_spec.get("apiVersion", "").rpartition("/")
    kind_key = f"{run_spec.get('kind')}.{version}.{group or 'core'}".replace(".core", "")
    if kind_key not in cfg["init"]["controller"]["trialResources"]:  # katib-config.yaml:8-14 (controller)
        errs.append(f"{where}: {kind_key} is not a trial resource the Katib controller watches")
    return errs


def _validate_metrics_collector(mc: dict[str, Any], cfg: dict[str, Any]) -> list[str]:
    """validator.go:487-574 (``validateMetricsCollector``)."""
    errs = []
    kind = (mc.get("collector") or {}).get("kind")
    known = {c["kind"] for c in cfg["runtime"]["metricsCollectors"]}
    if kind in ("StdOut", "TensorFlowEvent", "File", "PrometheusMetric") and kind not in known:  # :491-500
        errs.append(f"spec.metricsCollectorSpec.collector.kind: {kind}: GetMetricsCollectorConfigData failed")
    source = mc.get("source") or {}
    fsp = source.get("fileSystemPath") or {}
    if kind in ("Push", "StdOut"):  # :503-504
        pass
    elif kind == "File":  # :505-520
        if fsp.get("kind") != "File" or not str(fsp.get("path", "")).startswith("/"):
            errs.append("spec.metricsCollectorSpec.source.fileSystemPath.path: file path where metrics file exists is required")
        if fsp.get("format") not in ("TEXT", "JSON"):
            errs.append("spec.metricsCollectorSpec.source.fileSystemPath.format: format of metrics file is required")
        if fsp.get("format") == "JSON" and source.get("filter") is not None:
            errs.append("spec.metricsCollectorSpec.source.filter: filter must be nil when format of metrics file is json")
    elif kind == "TensorFlowEvent":  # :521-530
        if fsp.get("kind") != "Directory" or not str(fsp.get("path", "")).startswith("/"):
            errs.append("spec.metricsCollectorSpec.source: directory path where tensorflow event files exist is required")
    elif kind in ("PrometheusMetric", "Custom"):  # :531-552 (not used by kolors-job)
        pass
    else:  # :553-555
        errs.append(f"spec.metricsCollectorSpec.collector.kind: invalid metrics collector kind: {kind}")
    for fmt in (source.get("filter") or {}).get("metricsFormat") or []:  # :557-571
        try:
            re.compile(fmt)
        except re.error as e:
            errs.append(f"spec.metricsCollectorSpec.source.filter.metricsFormat: invalid filter: {e}")
            continue
        if not re.match(r".*\(.*\).*\(.*\).*", fmt):
            errs.append("spec.metricsCollectorSpec.source.filter.metricsFormat: two top subexpressions are required")
    return errs


# ------------------------------------------------------------------------------- trial generation


def substitute(exp: dict[str, Any], trial_name: str, namespace: str, assignments: dict[str, str]) -> dict[str, Any]:
    """generator.go:88-197 (``GetRunSpecWithHyperParameters`` / ``applyParameters``): the trial's workload."""
    t = exp["spec"]["trialTemplate"]
    template = json.dumps(t["trialSpec"])  # :199-208 GetTrialTemplate
    trial_spec = t["trialSpec"]
    values: dict[str, str] = {}
    non_meta = 0
    for p in t["trialParameters"]:  # :134-183
        m = META_RE.search(p["reference"])
        if not m:
            if p["reference"] not in assignments:  # :139-145
                raise KeyError(f"parameter {p['reference']} not in the assignments")
            values[p["name"]] = assignments[p["reference"]]
            non_meta += 1
            continue
        key = m.group(1)
        index = None
        if sub := META_PARSE_RE.search(key):  # :151-157
            key, index = sub.group(1), sub.group(2)
        meta = trial_spec.get("metadata") or {}
        values[p["name"]] = {  # :159-181
            "Name": trial_name, "Namespace": namespace, "Kind": trial_spec.get("kind"),
            "APIVersion": trial_spec.get("apiVersion"),
            "Annotations": (meta.get("annotations") or {}).get(index or ""),
            "Labels": (meta.get("labels") or {}).get(index or ""),
        }[key]  # fmt: skip
    if len(assignments) != non_meta:  # :185-189
        raise KeyError("every parameter assignment must be a trial parameter")
    for name, value in values.items():  # :191-194 strings.Replace(template, "${trialParameters.<name>}", value)
        template = template.replace("${trialParameters." + name + "}", value)
    run_spec = json.loads(template)  # :97
    run_spec.setdefault("metadata", {})
    run_spec["metadata"]["name"] = trial_name  # :103
    run_spec["metadata"]["namespace"] = namespace  # :104
    return run_spec


def wrap_primary_container(container: dict[str, Any], *, collector_kind: str, metrics_path: str,
                           early_stopping: bool = False) -> list[str]:  # fmt: skip
    """pod/utils.go:155-199 (``wrapWorkerContainer``) with :201-221: the primary container's new argv
    (``command`` + ``args``) once Katib's pod webhook has injected its metrics collector."""
    if not container.get("command"):  # :100-117 it would fetch the image's ENTRYPOINT from the registry
        raise ValueError("no command: Katib's webhook would have to read the image's ENTRYPOINT from its registry")
    args = [*container["command"], *(container.get("args") or [])]  # getContainerCommand :96-126
    command = ["sh", "-c"]  # :161
    if args[0] in ("sh", "bash") and args[1] == "-c":  # :167-172
        command = args[0:2]
        args = args[2:]
    if collector_kind == "StdOut":  # :173-176
        args.append(f"1>{metrics_path} 2>&1")
    metrics_dir = os.path.dirname(metrics_path)  # :179-183 (FileKind)
    if early_stopping:  # :186-188 getEarlyStoppingCommand :201-215
        args += ["||", f"if test -f {metrics_dir}/$$$$.pid && [ $(head -n 1 {metrics_dir}/$$.pid) = early-stopped ]; "
                       "then echo Training Container was Early Stopped; else echo Training Container was Failed; exit 1; fi"]
    args += ["&&", f"echo completed > {metrics_dir}/$$$$.pid"]  # :190 getMarkCompletedCommand :217-221
    return [*command, " ".join(args)]  # :192-195


def kubernetes_expand(text: str, env: dict[str, str] | None = None) -> str:
    """What the kubelet does to a container's command before running it: ``$(VAR)`` expands, ``$$`` becomes
    ``$`` (Kubernetes' ``expansion.Expand``); Katib's ``$$$$.pid`` relies on it."""
    env = env or {}
    out, i = [], 0
    while i < len(text):
        if text.startswith("$$", i):
            out.append("$")
            i += 2
        elif text.startswith("$(", i) and (end := text.find(")", i)) > 0 and text[i + 2:end] in env:
            out.append(env[text[i + 2:end]])
            i = end + 1
        else:
            out.append(text[i])
            i += 1
    return "".join(out)
