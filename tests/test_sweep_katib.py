"""Katib: the rendered Experiment against Katib's own rules and models, the collector port against Katib's
own test cases, the trial command's signal handling, and ``submit katib`` against a fake kubectl.

Katib's Experiment CRD carries no schema (``x-kubernetes-preserve-unknown-fields``), so the CRD proves
nothing; the checks are Katib's API models (``kubeflow-katib-api``, a round trip that must lose nothing),
its admission webhook's rules (tests/katib.py, ported with file and line) and, for the trial's batch Job,
Kubernetes' own strict schema (``kubernetes-validate``), which is what the webhook converts it to.
"""

from __future__ import annotations

import argparse
import copy
import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from kolors_job import cli
from kolors_job.core.errors import ExitCode
from kolors_job.launch import katib as katib_mod
from kolors_job.launch import register_cli
from kolors_job.storage import open_store

try:
    from tests import katib
    from tests.test_sweep import plant
except ModuleNotFoundError:
    import katib  # type: ignore[no-redef]
    from test_sweep import plant  # type: ignore[no-redef]

ROOT = Path(__file__).resolve().parents[1]
SWEEP = ROOT / "examples" / "sweep.yaml"
CASES = json.loads((katib.FIXTURES / "file-metricscollector" / "cases.json").read_text(encoding="utf-8"))
BASE_ARGS = ["--sweep", str(SWEEP), "--image", "reg/kolors-job:1", "--oss-region", "cn-beijing"]


def render(*extra: str, capsys: pytest.CaptureFixture[str]) -> list[dict[str, Any]]:
    assert cli.main(["render", "katib", *BASE_ARGS, *extra]) == 0
    return [d for d in yaml.safe_load_all(capsys.readouterr().out) if d]


def experiment_of(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return next(d for d in docs if d["kind"] == "Experiment")


# ------------------------------------------------------------------------------- the collector port


@pytest.mark.parametrize("case", CASES["cases"], ids=[c["name"] for c in CASES["cases"]])
def test_the_collector_port_gives_katibs_own_expected_results(case: dict[str, Any], tmp_path: Path) -> None:
    """Each case of Katib's ``TestCollectObservationLog``; the JSON ones from its historical testdata files."""
    path = tmp_path / case["file"]
    historical = katib.FIXTURES / "file-metricscollector" / "JSON" / case["file"]
    if historical.exists():
        assert historical.read_text().rstrip("\n") == case["data"].rstrip("\n")
        path.write_text(historical.read_text())
    elif case["data"] is not None:
        path.write_text(case["data"])
    if case["error"]:
        with pytest.raises(katib.CollectorError) as e:
            katib.collect(path, case["metrics"], case["filters"], case["format"])
        assert e.value.kind == case["error"]
    else:
        got = katib.collect(path, case["metrics"], case["filters"], case["format"])
        assert [list(x) for x in got] == case["expected"]


def test_the_default_filter_is_katibs() -> None:
    """``common/const.go:39-47`` documents what the default StdOut filter must read."""
    import re

    for text, value in [("loss=0.3", "0.3"), ("accuracy=.98", ".98"), ("Score=-7.53e-05", "-7.53e-05"),
                        ("Score=-7.53e+05", "-7.53e+05"), ("Score=1E0", "1E0"), ("Score=1.23E10", "1.23E10")]:  # fmt: skip
        assert re.search(katib.DEFAULT_FILTER, text, re.ASCII).group(2) == value


# ------------------------------------------------------------------------------- the Experiment


def test_render_katib_gives_an_experiment_katib_admits(capsys: pytest.CaptureFixture[str]) -> None:
    docs = render(capsys=capsys)
    assert [d["kind"] for d in docs] == ["PersistentVolumeClaim", "Experiment"]
    exp = experiment_of(docs)
    katib_mod.check_experiment(exp)  # Katib's API models read it back unchanged
    assert katib.validate_experiment(katib.set_defaults(exp)) == []
    spec = exp["spec"]
    assert spec["objective"]["metricStrategies"] == [{"name": m, "value": "latest"}
                                                      for m in ("objective", "mean_aesthetic", "consistency")]  # fmt: skip
    assert spec["algorithm"] == {"algorithmName": "tpe"} and spec["maxFailedTrialCount"] == 12
    assert {p["name"]: p["parameterType"] for p in spec["parameters"]} == {
        "train-learning-rate": "double", "train-rank": "discrete", "story-lora-scale": "double"}
    lr = next(p for p in spec["parameters"] if p["name"] == "train-learning-rate")
    assert lr["feasibleSpace"] == {"min": "0.00003", "max": "0.0003", "distribution": "logUniform"}
    assert spec["earlyStopping"]["algorithmName"] == "medianstop"
    # the trial template is render k8s's Job: same volumes, security context, failure policy
    k8s_job = _render_k8s_job(capsys)
    trial = spec["trialTemplate"]["trialSpec"]
    assert trial["spec"]["podFailurePolicy"] == k8s_job["spec"]["podFailurePolicy"]
    pod, k8s_pod = trial["spec"]["template"]["spec"], k8s_job["spec"]["template"]["spec"]
    for key in ("volumes", "securityContext", "terminationGracePeriodSeconds", "serviceAccountName", "tolerations"):
        assert pod[key] == k8s_pod[key], key
    c, k8s_c = pod["containers"][0], k8s_pod["containers"][0]
    for key in ("image", "resources", "volumeMounts", "securityContext"):
        assert c[key] == k8s_c[key], key
    env = {e["name"]: e["value"] for e in c["env"]}
    assert yaml.safe_load(env["KOLORS_JOB_MANIFEST"]) == yaml.safe_load((ROOT / "examples/minimal.yaml").read_text())
    assert env["KOLORS_JOB_OSS_ENDPOINT"] == "https://oss-cn-beijing-internal.aliyuncs.com"


def _render_k8s_job(capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    assert cli.main(["render", "k8s", "--manifest-uri", "s3://b/m.yaml", "--image", "reg/kolors-job:1",
                     "--oss-region", "cn-beijing", "--job-id", "x"]) == 0  # fmt: skip
    return next(d for d in yaml.safe_load_all(capsys.readouterr().out) if d and d["kind"] == "Job")


def test_a_multi_node_sweep_runs_pytorchjob_trials(capsys: pytest.CaptureFixture[str]) -> None:
    exp = experiment_of(render("--nodes", "2", "--gpus", "8", "--namespace", "kolors", capsys=capsys))
    t = exp["spec"]["trialTemplate"]
    assert t["trialSpec"]["kind"] == "PyTorchJob" and t["primaryContainerName"] == "pytorch"
    assert t["primaryPodLabels"] == {"training.kubeflow.org/job-role": "master"}
    assert katib.validate_experiment(katib.set_defaults(exp)) == []
    for replica in t["trialSpec"]["spec"]["pytorchReplicaSpecs"].values():  # every rank: the same --set values
        script = replica["template"]["spec"]["containers"][0]["command"][2]
        assert "kolors_job.launch.torchrun" in script and "--set 'train.rank=${trialParameters.train-rank}'" in script


def test_the_namespace_is_labelled_for_katibs_injection(capsys: pytest.CaptureFixture[str]) -> None:
    docs = render("--namespace", "kolors", capsys=capsys)
    ns = next(d for d in docs if d["kind"] == "Namespace")
    assert ns["metadata"]["labels"][katib_mod.INJECTION_LABEL] == "enabled"


def test_a_substituted_trial_is_a_valid_job_of_its_values(capsys: pytest.CaptureFixture[str]) -> None:
    import kubernetes_validate

    exp = katib.set_defaults(experiment_of(render(capsys=capsys)))
    job = katib.substitute(exp, "purple-sweep-x8k2m0qa", "kolors",
                           {"train-learning-rate": "0.000123", "train-rank": "32", "story-lora-scale": "0.75"})
    kubernetes_validate.validate(job, kubernetes_validate.utils.latest_version(), strict=True)
    assert job["metadata"]["name"] == "purple-sweep-x8k2m0qa"
    assert job["metadata"]["labels"]["kolors-job/job-id"] == "purple-sweep-x8k2m0qa"
    script = job["spec"]["template"]["spec"]["containers"][0]["command"][2]
    words = _run_words(script)
    args = cli.build_parser().parse_args(words)
    assert args.trial == "purple-sweep-x8k2m0qa" and args.output == "oss://my-bucket/kolors-jobs/purple-sweep/"
    from kolors_job.sweep import trial
    from kolors_job.sweep.spec import load_sweep

    run = trial.prepare(args, load_sweep(str(SWEEP)).base)
    assert (run.manifest.spec.train.learning_rate, run.manifest.spec.train.rank) == (0.000123, 32)
    assert run.manifest.spec.story.lora_scale == 0.75 and run.job_id == "purple-sweep-x8k2m0qa"
    assert run.metrics is not None and str(run.metrics.katib_file) == katib_mod.METRICS_FILE


def _run_words(script: str) -> list[str]:
    import shlex

    words = shlex.split(script.split(" & pid=")[0].split("; ", 1)[1])
    return words[words.index("run"):]


@pytest.mark.parametrize(("mutate", "rule"), [
    (lambda e: e["metadata"].update(name="x" * 41), "metadata.name"),  # validator.go:84-92
    (lambda e: e["spec"].update(parallelTrialCount=13), "spec.parallelTrialCount"),  # :110-115
    (lambda e: e["spec"].update(maxFailedTrialCount=-1), "spec.maxFailedTrialCount"),  # :94-96
    (lambda e: e["spec"]["objective"].update(additionalMetricNames=["objective"]), "additionalMetricNames"),  # :197
    (lambda e: e["spec"]["algorithm"].update(algorithmName="hyperopt"), "algorithmName"),  # :215-218
    (lambda e: e["spec"]["earlyStopping"].update(algorithmName="nope"), "earlyStopping"),  # :233-236
    (lambda e: e["spec"]["trialTemplate"].pop("primaryContainerName"), "primaryContainerName"),  # :315-317
    (lambda e: e["spec"]["trialTemplate"]["trialParameters"].pop(1), "not found in spec.trialParameters"),  # :407-412
    (lambda e: e["spec"]["trialTemplate"]["trialParameters"].append(
        {"name": "unused", "reference": "train-rank"}), "can't be duplicated"),  # :378-382
    (lambda e: e["spec"]["trialTemplate"]["trialSpec"]["metadata"].update(name="x"), "must be omitted"),  # :422-424
    (lambda e: e["spec"]["trialTemplate"]["trialSpec"]["spec"].update(unknownField=1), "invalid spec.trialTemplate"),  # :433
    (lambda e: e["spec"]["parameters"][0]["feasibleSpace"].update(list=["1"]), "feasibleSpace.list"),  # :284-287
    (lambda e: e["spec"]["metricsCollectorSpec"]["source"].update(filter={"metricsFormat": ["(.*)"]}), "filter"),  # :517
    (lambda e: e["spec"]["metricsCollectorSpec"]["source"]["fileSystemPath"].update(path="rel.json"), "path"),  # :506
])  # fmt: skip
def test_the_webhook_port_catches_each_broken_rule(mutate: Any, rule: str, capsys: pytest.CaptureFixture[str]) -> None:
    exp = copy.deepcopy(experiment_of(render(capsys=capsys)))
    mutate(exp)
    errors = katib.validate_experiment(katib.set_defaults(exp))
    assert any(rule in e for e in errors), errors


def test_katibs_own_e2e_experiments_pass_and_fail_the_port_as_in_katibs_ci() -> None:
    """``test/e2e/v1beta1/testdata``: Katib's CI applies the valid one and expects the invalid one refused."""
    valid = yaml.safe_load((katib.FIXTURES / "e2e" / "valid-experiment.yaml").read_text())
    invalid = yaml.safe_load((katib.FIXTURES / "e2e" / "invalid-experiment.yaml").read_text())
    assert katib.validate_experiment(katib.set_defaults(valid)) == []
    assert katib.validate_experiment(katib.set_defaults(invalid)) == [
        "spec.algorithm.algorithmName: 'invalid-algorithm': no Suggestion config data"]


def test_katibs_api_models_refuse_a_field_they_would_drop(capsys: pytest.CaptureFixture[str]) -> None:
    exp = experiment_of(render(capsys=capsys))
    bad = copy.deepcopy(exp)
    bad["spec"]["maxTrialCounts"] = 3  # a typo Katib's decoder would drop
    bad["spec"]["trialTemplate"]["retainn"] = True
    with pytest.raises(ValueError, match=r"spec.maxTrialCounts: unknown to Katib's V1beta1Experiment") as e:
        katib_mod.check_experiment(bad)
    assert "spec.trialTemplate.retainn" in str(e.value)
    bad = copy.deepcopy(exp)
    bad["spec"]["parallelTrialCount"] = "2"  # a string where Go has an int32
    with pytest.raises(ValueError, match=r"parallelTrialCount"):
        katib_mod.check_experiment(bad)


def test_the_stdout_collector_experiment(capsys: pytest.CaptureFixture[str]) -> None:
    exp = experiment_of(render("--collector", "stdout", capsys=capsys))
    assert exp["spec"]["metricsCollectorSpec"] == {"collector": {"kind": "StdOut"}}
    assert katib.validate_experiment(katib.set_defaults(exp)) == []
    assert "--metrics-stdout" in exp["spec"]["trialTemplate"]["trialSpec"]["spec"]["template"]["spec"][
        "containers"][0]["command"][2]


def test_the_example_experiment_file_is_current(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)  # the examples name examples/sweep.yaml relative to the repository
    assert cli.main(["render", "katib", "--write-examples", str(tmp_path)]) == 0
    fresh = (tmp_path / "katib-experiment.yaml").read_text()
    assert (ROOT / "k8s" / "katib-experiment.yaml").read_text() == fresh, "run render katib --write-examples k8s/"
    exp = next(d for d in yaml.safe_load_all(fresh) if d and d["kind"] == "Experiment")
    assert katib.validate_experiment(katib.set_defaults(exp)) == []


# ------------------------------------------------------------------------------- the trial's signals


CHILD = """
import signal, sys, time
def stop(*_):
    print("child: SIGTERM, checkpointing", flush=True)
    sys.exit(75)
signal.signal(signal.SIGTERM, stop)
print("child: started", flush=True)
time.sleep(60)
sys.exit(0)
"""


def test_the_wrapped_trial_command_passes_sigterm_on_and_keeps_the_exit_code(tmp_path: Path) -> None:
    """Katib's wrapper makes ``sh`` the container's first process, which would ignore SIGTERM: our script
    traps it, passes it to the job (which checkpoints and exits 75) and ends with the job's code, so
    ``&& echo completed`` does not run and the Job's exit-code policy sees 75."""
    (tmp_path / "child.py").write_text(CHILD)
    script = katib_mod.signal_script([sys.executable, str(tmp_path / "child.py")])
    metrics = tmp_path / "katib" / "m.json"
    metrics.parent.mkdir()
    argv = katib.wrap_primary_container({"command": ["sh", "-c", script]}, collector_kind="File",
                                        metrics_path=str(metrics))  # fmt: skip
    argv = [katib.kubernetes_expand(a) for a in argv]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, start_new_session=True)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "child: started"
    proc.send_signal(signal.SIGTERM)  # the kubelet signals the container's first process only
    out, _ = proc.communicate(timeout=30)
    assert "checkpointing" in out and proc.returncode == 75
    assert list(metrics.parent.glob("*.pid")) == [], "no completion marker for a stopped trial"
    # and a trial that ends by itself is marked completed with its code
    (tmp_path / "ok.py").write_text("print('done')")
    argv = katib.wrap_primary_container(
        {"command": ["sh", "-c", katib_mod.signal_script([sys.executable, str(tmp_path / "ok.py")])]},
        collector_kind="StdOut", metrics_path=str(metrics))  # fmt: skip
    assert subprocess.run([katib.kubernetes_expand(a) for a in argv], timeout=30).returncode == 0
    assert metrics.read_text() == "done\n", "StdOut: Katib's redirect applies to the whole script"
    assert [p.read_text() for p in metrics.parent.glob("*.pid")] == ["completed\n"]


# ------------------------------------------------------------------------------- submit katib


FAKE_KUBECTL = r'''#!PYTHON
"""A kubectl for Katib objects: apply records, get answers from a script of snapshots (one per poll)."""
import json, os, sys
import yaml

state_path, log_path = os.environ["FAKE_KUBECTL_STATE"], os.environ["FAKE_KUBECTL_LOG"]
argv = sys.argv[1:]
with open(log_path, "a") as log:
    log.write(json.dumps(argv) + "\n")
state = json.load(open(state_path))
verb, rest = argv[0], argv[1:]
if verb == "apply":
    docs = [d for d in yaml.safe_load_all(sys.stdin.read()) if d]
    state.setdefault("applied", []).append(docs)
    json.dump(state, open(state_path, "w"))
    for d in docs:
        print(f"{d['kind'].lower()}/{d['metadata']['name']} created")
    sys.exit(0)
if verb == "get":
    what = rest[0]
    if "-o" in rest and rest[rest.index("-o") + 1] == "name":
        sys.exit(0 if what in state.get("existing", []) else 1)
    snaps = state["snapshots"]
    i = min(state.get("poll", 0), len(snaps) - 1)
    if what.startswith("experiment/"):
        state["poll"] = state.get("poll", 0) + 1
        json.dump(state, open(state_path, "w"))
        print(json.dumps(snaps[i]["experiment"]))
    elif what == "trials":
        print(json.dumps({"items": snaps[i]["trials"]}))
    sys.exit(0)
sys.exit(f"fake kubectl: unsupported {argv}")
'''


def _trial(name: str, state: str | None, objective: str | None, rank: str) -> dict[str, Any]:
    conditions = [{"type": "Created", "status": "True"}, {"type": "Running", "status": "True" if not state else "False"}]
    if state:
        conditions.append({"type": state, "status": "True"})
    status: dict[str, Any] = {"conditions": conditions}
    if objective:
        status["observation"] = {"metrics": [{"name": "objective", "latest": objective, "max": objective}]}
    return {"metadata": {"name": name, "labels": {"katib.kubeflow.org/experiment": "purple-sweep"}},
            "spec": {"parameterAssignments": [{"name": "train-rank", "value": rank}]}, "status": status}


def test_submit_katib_applies_follows_the_trials_and_exits_with_the_best(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], s3_server: Any,
    storage_env: Any,
) -> None:
    monkeypatch.setenv("KOLORS_JOB_S3_ENDPOINT_URL", s3_server.endpoint_url)
    monkeypatch.setenv("KOLORS_JOB_S3_REGION", s3_server.region)
    monkeypatch.setenv("KOLORS_JOB_S3_ADDRESSING_STYLE", "path")
    bucket = f"s3://{s3_server.create_bucket()}/"
    store = open_store(f"{bucket}purple-sweep/")
    # the trials' own outputs, as the jobs leave them (the same planting as tests/test_sweep.py)
    plant(store, "purple-sweep-aaaa1111", state="succeeded", mean=6.5, consistency=0.8, passed=True, success=True,
          params={"train.rank": "16"}, lora=b"winner")  # fmt: skip
    plant(store, "purple-sweep-bbbb2222", state="failed", mean=5.2, consistency=0.9, passed=False, exit_code=3,
          params={"train.rank": "32"})  # fmt: skip
    binary = tmp_path / "bin" / "kubectl"
    binary.parent.mkdir()
    binary.write_text(FAKE_KUBECTL.replace("PYTHON", sys.executable, 1))
    binary.chmod(0o755)
    state_path, log_path = tmp_path / "state.json", tmp_path / "kubectl.log"
    running = {"status": {"conditions": [{"type": "Running", "status": "True"}]}}
    done = {"status": {"conditions": [{"type": "Succeeded", "status": "True", "reason": "ExperimentMaxTrialsReached"}],
                       "currentOptimalTrial": {"bestTrialName": "purple-sweep-aaaa1111"}}}  # fmt: skip
    a_ok = _trial("purple-sweep-aaaa1111", "Succeeded", "8.1", "16")
    b_fail = _trial("purple-sweep-bbbb2222", "Failed", None, "32")
    state_path.write_text(json.dumps({"snapshots": [
        {"experiment": running, "trials": [_trial("purple-sweep-aaaa1111", None, None, "16")]},
        {"experiment": running, "trials": [a_ok, _trial("purple-sweep-bbbb2222", None, None, "32")]},
        {"experiment": done, "trials": [a_ok, b_fail]},
    ], "existing": ["namespace/kolors"]}))  # fmt: skip
    log_path.write_text("")
    monkeypatch.setenv("FAKE_KUBECTL_STATE", str(state_path))
    monkeypatch.setenv("FAKE_KUBECTL_LOG", str(log_path))
    p = argparse.ArgumentParser(prog="kolors-job")
    register_cli(p.add_subparsers(dest="command", required=True))
    ns = p.parse_args(["submit", "katib", "--sweep", str(SWEEP), "--image", "reg/kolors-job:1", "--kubectl",
                       str(binary), "--namespace", "kolors", "--output", bucket, "--poll", "0.05", "--timeout", "60"])
    code = ns.func(ns)
    err = capsys.readouterr()
    assert code == 0, err.err
    assert err.out == "", "submit says everything on stderr"
    state = json.loads(state_path.read_text())
    (applied,) = state["applied"]
    assert [d["kind"] for d in applied] == ["PersistentVolumeClaim", "Experiment"], "the existing namespace is kept"
    assert katib.validate_experiment(katib.set_defaults(applied[-1])) == []
    lines = err.err.splitlines()
    assert "trial purple-sweep-aaaa1111 Succeeded: objective 8.1  train-rank=16" in lines
    assert "trial purple-sweep-bbbb2222 Failed: objective n/a  train-rank=32" in lines
    assert sum("purple-sweep-aaaa1111 Succeeded" in x for x in lines) == 1, "each trial once, as it ends"
    assert any(x.startswith("experiment purple-sweep Succeeded") for x in lines)
    assert open_store(f"{bucket}purple-sweep/best/").read_bytes("lora/pytorch_lora_weights.safetensors") == b"winner"
    # every trial under the gate: the sweep's exit is the gate's
    store.child("purple-sweep-aaaa1111").delete("_SUCCESS")
    store.child("purple-sweep-aaaa1111").write_bytes("status.json", json.dumps(
        {"state": "failed", "exit_code": 3}).encode())
    state = json.loads(state_path.read_text())
    state["poll"] = 0
    state["existing"].append("experiment/purple-sweep")
    state_path.write_text(json.dumps(state))
    assert ns.func(ns) == ExitCode.QUALITY_GATE
    assert "attaching to experiment purple-sweep" in capsys.readouterr().err
    assert len(json.loads(state_path.read_text())["applied"]) == 1, "an existing experiment is not applied again"


def test_submit_katib_times_out_with_75(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    binary = tmp_path / "kubectl"
    binary.write_text(FAKE_KUBECTL.replace("PYTHON", sys.executable, 1))
    binary.chmod(0o755)
    state_path = tmp_path / "s.json"
    state_path.write_text(json.dumps({"snapshots": [{"experiment": {"status": {}}, "trials": []}]}))
    monkeypatch.setenv("FAKE_KUBECTL_STATE", str(state_path))
    monkeypatch.setenv("FAKE_KUBECTL_LOG", str(tmp_path / "log"))
    t0 = time.monotonic()
    code = cli.main(["submit", "katib", "--sweep", str(SWEEP), "--image", "x", "--oss-region", "cn-beijing",
                     "--kubectl", str(binary), "--output", str(tmp_path / "out"), "--poll", "0.05", "--timeout", "0.5"])
    assert code == ExitCode.TEMPORARY and time.monotonic() - t0 < 30
    assert "timed out" in capsys.readouterr().err
