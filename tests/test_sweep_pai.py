"""PAI AutoML: the sweep as a CreateHpoExperiment request through the pinned SDK's models (nothing dropped),
its trial command as AutoML substitutes it, and ``submit pai-automl`` over a real HTTP exchange with a
loopback AutoML API, reading the trials' outputs from the OSS server on 127.0.0.1."""

from __future__ import annotations

import copy
import json
import shlex
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import pytest
import yaml
from alibabacloud_paiautoml20220828.models import CreateHpoExperimentRequest

from kolors_job import cli
from kolors_job.core.errors import ExitCode
from kolors_job.launch import dlc, pai_automl
from kolors_job.storage import open_store
from kolors_job.sweep import trial
from kolors_job.sweep.spec import load_sweep
from tests.pai_api import FakePaiApi

try:
    from tests.test_sweep import plant
except ModuleNotFoundError:
    from test_sweep import plant  # type: ignore[no-redef]

ROOT = Path(__file__).resolve().parents[1]
SPEC = ROOT / "pai" / "automl.yaml"
SWEEP = ROOT / "examples" / "sweep.yaml"
MANIFEST_URI = "oss://my-bucket/kolors-jobs/purple-sweep/manifest.yaml"


def build(**kw: Any) -> CreateHpoExperimentRequest:
    args: dict[str, Any] = {"manifest_uri": MANIFEST_URI, "image": "reg/kj:1", "region": "cn-beijing",
                            "overrides": ["WorkspaceId=12345"], "cache_dataset": "d-cache01"}  # fmt: skip
    args.update(kw)
    return pai_automl.build_request(pai_automl.load_spec(SPEC), load_sweep(str(SWEEP)), **args)


def test_the_spec_round_trips_through_the_sdks_request() -> None:
    spec = pai_automl.load_spec(SPEC)
    request = CreateHpoExperimentRequest().from_map(copy.deepcopy(spec))
    assert dlc.prune(request.to_map()) == spec, "nothing dropped, nothing changed"
    bad = copy.deepcopy(spec)
    bad["HpoExperimentConfiguration"]["metric_config"]["metric_typ"] = "json"  # a typo the SDK would drop
    bad["HpoExperimentConfiguration"]["yml_config"]["trialConcurrency"] = 2  # camelCase: not the API's name
    with pytest.raises(dlc.DlcSpecError) as e:
        pai_automl.to_request(bad)
    assert "metric_config.metric_typ: unknown to the SDK's CreateHpoExperimentRequest" in str(e.value)
    assert "yml_config.trialConcurrency" in str(e.value)


def test_the_request_carries_the_sweep() -> None:
    m = build().to_map()
    assert dlc.prune(CreateHpoExperimentRequest().from_map(copy.deepcopy(m)).to_map()) == dlc.prune(m)
    assert m["Name"] == "purple-sweep" and m["WorkspaceId"] == "12345"
    config = m["HpoExperimentConfiguration"]
    assert config["search_space"] == {
        "${train_learning_rate}": {"_type": "loguniform", "_value": [3e-05, 0.0003]},
        "${train_rank}": {"_type": "choice", "_value": [8, 16, 32]},
        "${story_lora_scale}": {"_type": "uniform", "_value": [0.4, 0.9]},
    }
    assert config["metric_config"] == {
        "metric_type": "json", "final_mode": "final", "metric_dict": {"objective": 1.0},
        "metric_source": ["oss://my-bucket/kolors-jobs/purple-sweep/_automl/${exp_id}-${trial_id}.json"],
    }  # fmt: skip
    yml = config["yml_config"]
    assert (yml["trial_concurrency"], yml["max_trial_number"], yml["tuner"]["name"]) == (2, 12, "TPE")
    assert yml["assessor"] == {"name": "PAIAssessor", "class_args": {"start_step": 2, "optimize_mode": "maximize",
                                                                     "earlystop": True}}  # fmt: skip
    (cmd,) = config["platform_config"]["cmd"]
    words = shlex.split(cmd)
    assert words[:3] == ["dlc", "submit", "pytorchjob"]
    flags = dict(w[2:].split("=", 1) for w in words[3:])
    assert flags["workspace_id"] == "12345" and flags["worker_image"] == "reg/kj:1"
    assert flags["data_sources"] == "d-cache01"
    envs = dict(kv.split("=", 1) for kv in flags["envs"].split(","))
    assert envs["KOLORS_JOB_MANIFEST_URI"] == MANIFEST_URI
    assert envs["KOLORS_JOB_OSS_ENDPOINT"] == "https://oss-cn-beijing-internal.aliyuncs.com"


def test_a_trial_command_as_automl_substitutes_it_runs_those_values() -> None:
    """AutoML replaces ``${exp_id}``, ``${trial_id}`` and each ``${name}`` in the command; the DLC client runs
    ``--command``'s text; ``kolors-job run`` reads it back as a trial with those manifest fields."""
    cmd = build().to_map()["HpoExperimentConfiguration"]["platform_config"]["cmd"][0]
    values = {"${exp_id}": "sX5O9Q8", "${trial_id}": "mf99W4", "${train_learning_rate}": "0.00012",
              "${train_rank}": "32", "${story_lora_scale}": "0.61"}  # fmt: skip
    for k, v in values.items():
        cmd = cmd.replace(k, v)
    command = next(w for w in shlex.split(cmd) if w.startswith("--command="))[len("--command="):]
    words = shlex.split(command)
    assert words[:2] == ["python", "/app/entrypoint.py"]
    args = cli.build_parser().parse_args(words[2:])
    run = trial.prepare(args, load_sweep(str(SWEEP)).base)
    spec = run.manifest.spec
    assert (spec.train.learning_rate, spec.train.rank, spec.story.lora_scale) == (0.00012, 32, 0.61)
    assert run.job_id is not None and run.job_id.startswith("sx5o9q8-mf99w4-")
    assert args.output == "oss://my-bucket/kolors-jobs/purple-sweep/"
    assert run.metrics is not None
    assert run.metrics.pai_json == "oss://my-bucket/kolors-jobs/purple-sweep/_automl/sX5O9Q8-mf99W4.json"
    assert run.metrics.weights == {"mean_aesthetic": 1.0, "consistency": 2.0}


@pytest.mark.parametrize(("kw", "message"), [
    ({"overrides": []}, "<WORKSPACE_ID>"),
    ({"image": None}, "--image fills <IMAGE>"),
    ({"cache_dataset": None}, "<CACHE_DATASET_ID>"),
    ({"manifest_uri": "s3://b/m.yaml"}, "must be an oss:// object"),
    ({"output": "s3://b/out/"}, "must be an oss:// prefix"),
    ({"region": "Beijing"}, "not an Alibaba Cloud region id"),
    ({"overrides": ["WorkspaceId=1", "Nope=1"]}, "Nope: unknown to the SDK's CreateHpoExperimentRequest"),
    ({"overrides": ["WorkspaceId=1", "HpoExperimentConfiguration.platform_config.cmd.5=x"]}, "no such place"),
])  # fmt: skip
def test_what_cannot_be_sent_is_refused(kw: dict[str, Any], message: str) -> None:
    with pytest.raises(dlc.DlcSpecError, match=message):
        build(**kw)


def test_integer_ranges_follow_nnis_exclusive_randint(tmp_path: Path) -> None:
    (tmp_path / "job.yaml").write_text((ROOT / "examples" / "minimal.yaml").read_text())
    (tmp_path / "s.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kolors-job/v1", "kind": "LoraSweep", "metadata": {"name": "ints"},
        "spec": {"manifest": "job.yaml", "algorithm": "grid", "parameters": {
            "train.steps": {"int": [300, 800], "step": 100}, "train.rank": {"int": [4, 32]},
            "train.learning_rate": {"log_uniform": [1.0e-5, 1.0e-3], "step": 1.0e-5}}}}))  # fmt: skip
    space = pai_automl.search_space(load_sweep(str(tmp_path / "s.yaml")))
    assert space == {
        "${train_steps}": {"_type": "quniform", "_value": [300, 800, 100]},
        "${train_rank}": {"_type": "randint", "_value": [4, 33]},  # NNI's randint excludes its upper end
        "${train_learning_rate}": {"_type": "qloguniform", "_value": [1e-05, 0.001, 1e-05]},
    }
    m = pai_automl.build_request(pai_automl.load_spec(SPEC), load_sweep(str(tmp_path / "s.yaml")),
                                 manifest_uri=MANIFEST_URI, image="i", region="cn-beijing",
                                 overrides=["WorkspaceId=1"], cache_dataset="d").to_map()  # fmt: skip
    assert m["HpoExperimentConfiguration"]["yml_config"]["tuner"] == {"name": "GridSearch"}
    assert "assessor" not in m["HpoExperimentConfiguration"]["yml_config"]


def test_render_pai_automl_prints_the_request(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["render", "pai-automl", "--sweep", str(SWEEP), "--manifest-uri", MANIFEST_URI, "--image", "reg/kj:1",
            "--region", "cn-beijing", "--set", "WorkspaceId=7", "--cache-dataset", "d-1", "--automl-spec", str(SPEC)]
    assert cli.main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["Name"] == "purple-sweep" and "--workspace_id=7" in out["HpoExperimentConfiguration"]["platform_config"]["cmd"][0]
    assert cli.main([*argv[:-4], "--automl-spec", str(SPEC)]) == ExitCode.INVALID_MANIFEST
    assert "<CACHE_DATASET_ID>" in capsys.readouterr().err


# ------------------------------------------------------------------------------- loopback AutoML API


class FakeAutoML(FakePaiApi):
    """Answers CreateHpoExperiment, then GetHpoExperiment / ListHpoTrials from a queue of snapshots."""

    def __init__(self) -> None:
        super().__init__()
        self.snapshots: list[tuple[str, list[dict[str, Any]]]] = []
        self.experiment_id = "sX5O9Q8"

    def on_post(self, path: str) -> dict[str, Any]:
        return {"ExperimentId": self.experiment_id, "RequestId": "req-create"}

    def on_get(self, path: str) -> dict[str, Any]:
        status, trials = self.snapshots[0]
        if path.split("?")[0].endswith("/trials"):
            return {"Trials": trials, "TotalCount": len(trials), "RequestId": "req-trials"}
        if len(self.snapshots) > 1:
            self.snapshots.pop(0)
        return {"ExperimentId": self.experiment_id, "Status": status, "RequestId": "req-get"}


@pytest.fixture
def fake_automl(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeAutoML]:
    for var in ("ALIBABA_CLOUD_PROFILE", "ALIBABA_CLOUD_ROLE_ARN", "ALIBABA_CLOUD_OIDC_TOKEN_FILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("ALIBABA_CLOUD_ECS_METADATA_DISABLED", "true")  # storage_env clears ALIBABA_CLOUD_*
    monkeypatch.setenv("ALIBABA_CLOUD_ACCESS_KEY_ID", "kolors-test-ak")
    monkeypatch.setenv("ALIBABA_CLOUD_ACCESS_KEY_SECRET", "kolors-test-secret")
    with FakeAutoML() as fake:
        yield fake


def test_submit_pai_automl_creates_follows_and_reports(
    oss_server: Any, storage_env: Any, fake_automl: FakeAutoML, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("KOLORS_JOB_OSS_ENDPOINT", oss_server.endpoint)
    monkeypatch.setenv("KOLORS_JOB_OSS_REGION", oss_server.region)
    bucket = f"oss://{oss_server.create_bucket()}/"
    prefix = f"{bucket}sweeps/purple-sweep/"
    store = open_store(prefix)
    best_id = pai_automl_job_id = trial_job_id("sX5O9Q8-mf99W4")
    plant(store, best_id, state="succeeded", mean=6.5, consistency=0.8, passed=True, success=True,
          params={"train.rank": "16"}, lora=b"automl-winner")  # fmt: skip
    plant(store, trial_job_id("sX5O9Q8-Qz00aa"), state="failed", exit_code=4, params={"train.rank": "8"})
    fake_automl.snapshots = [
        ("RUNNING", [{"TrialId": "mf99W4", "Status": "RUNNING"}]),
        ("RUNNING", [{"TrialId": "mf99W4", "Status": "FINISHED", "FinalMetric": "8.1",
                      "Hyperparam": '{"${train_rank}": 16}'}, {"TrialId": "Qz00aa", "Status": "RUNNING"}]),
        ("DONE", [{"TrialId": "mf99W4", "Status": "FINISHED", "FinalMetric": "8.1", "Hyperparam": '{"${train_rank}": 16}'},
                  {"TrialId": "Qz00aa", "Status": "FAILED", "Hyperparam": '{"${train_rank}": 8}'}]),
    ]  # fmt: skip
    code = cli.main(["submit", "pai-automl", "--sweep", str(SWEEP), "--bucket", f"{bucket}manifests",
                     "--output", f"{bucket}sweeps/", "--image", "reg/kj:1", "--region", "cn-hangzhou",
                     "--endpoint", fake_automl.endpoint, "--set", "WorkspaceId=12345", "--cache-dataset", "d-1",
                     "--automl-spec", str(SPEC), "--poll", "0.05", "--timeout", "60"])  # fmt: skip
    err = capsys.readouterr()
    assert code == 0, err.err
    assert err.out == ""
    method, path, headers, body = fake_automl.requests[0]
    assert (method, path) == ("POST", "/api/automl/v1/hpo/experiment")
    assert headers["x-acs-action"] == "CreateHpoExperiment" and headers["x-acs-version"] == "2022-08-28"
    assert "Credential=kolors-test-ak" in headers["Authorization"] and b"kolors-test-secret" not in body
    sent = json.loads(body)
    uploaded = f"{bucket}manifests/purple-sweep/manifest.yaml"
    assert open_store(f"{bucket}manifests/purple-sweep/").read_bytes("manifest.yaml") == \
        (ROOT / "examples" / "minimal.yaml").read_bytes()  # fmt: skip
    assert f"KOLORS_JOB_MANIFEST_URI={uploaded}" in sent["HpoExperimentConfiguration"]["platform_config"]["cmd"][0]
    assert sent["HpoExperimentConfiguration"]["metric_config"]["metric_source"] == [
        f"{prefix}_automl/${{exp_id}}-${{trial_id}}.json"]
    lines = err.err.splitlines()
    assert "trial mf99W4 FINISHED: metric 8.1  {\"${train_rank}\": 16}" in lines
    assert "trial Qz00aa FAILED: metric n/a  {\"${train_rank}\": 8}" in lines
    assert "experiment sX5O9Q8 DONE" in lines
    assert open_store(f"{prefix}best/").read_bytes("lora/pytorch_lora_weights.safetensors") == b"automl-winner"
    assert pai_automl_job_id in json.loads(store.read_bytes("sweep.json"))["best"]["trial"]


def trial_job_id(name: str) -> str:
    from kolors_job.sweep.overrides import trial_job_id as derive

    return derive(name)


def test_submit_pai_automl_maps_a_denied_create_to_5(fake_automl: FakeAutoML, capsys: pytest.CaptureFixture[str],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    class Denied(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = json.dumps({"Code": "Forbidden.RAM", "Message": "no permission", "RequestId": "r"}).encode()
            self.send_response(403)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    fake_automl.server.RequestHandlerClass = Denied
    code = cli.main(["submit", "pai-automl", "--sweep", str(SWEEP), "--manifest-uri", MANIFEST_URI,
                     "--image", "reg/kj:1", "--region", "cn-hangzhou", "--endpoint", fake_automl.endpoint,
                     "--set", "WorkspaceId=1", "--cache-dataset", "d-1", "--automl-spec", str(SPEC)])  # fmt: skip
    assert code == ExitCode.STORAGE_DENIED
    assert "PAI AutoML CreateHpoExperiment failed: Forbidden.RAM" in capsys.readouterr().err
