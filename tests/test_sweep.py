"""Sweeps without running a job: the sweep file, ``run --set``, the trial's metric lines, ``sweep report``.

Whole trials run once in tests/test_sweep_emulation.py; here every check is on inputs and planted outputs.
Planted trial directories copy what a job leaves (``status.json``, ``report.json``, ``manifest.resolved.yaml``,
``_claim/``, ``_SUCCESS``; docs/design.md §3) as the job writes them, through the storage API.
"""

from __future__ import annotations

import hashlib
import io
import json
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from kolors_job import cli
from kolors_job.core.errors import ExitCode, ManifestError
from kolors_job.manifest.spec import Manifest
from kolors_job.storage import open_store
from kolors_job.sweep import overrides
from kolors_job.sweep.metrics import TrialMetrics, parse_weights
from kolors_job.sweep.report import outcome_code, rank, sweep_report
from kolors_job.sweep.spec import load_sweep

try:
    from tests import katib
except ModuleNotFoundError:
    import katib  # type: ignore[no-redef]

ROOT = Path(__file__).resolve().parents[1]
MINIMAL = ROOT / "examples" / "minimal.yaml"


def base() -> Manifest:
    return Manifest.model_validate(yaml.safe_load(MINIMAL.read_text(encoding="utf-8")))


def write_sweep(tmp: Path, spec: dict[str, Any], name: str = "s1") -> Path:
    (tmp / "job.yaml").write_text(MINIMAL.read_text(encoding="utf-8"), encoding="utf-8")
    doc = {"apiVersion": "kolors-job/v1", "kind": "LoraSweep", "metadata": {"name": name},
           "spec": {"manifest": "job.yaml", **spec}}  # fmt: skip
    path = tmp / "sweep.yaml"
    path.write_text(yaml.safe_dump(doc, allow_unicode=True, sort_keys=False), encoding="utf-8")
    return path


# ------------------------------------------------------------------------------- the sweep file


def test_the_example_sweep_loads_with_its_manifest() -> None:
    loaded = load_sweep(str(ROOT / "examples" / "sweep.yaml"))
    assert loaded.name == "purple-sweep" and loaded.base.spec.output.uri == "oss://my-bucket/kolors-jobs/"
    assert set(loaded.body.parameters) == {"train.learning_rate", "train.rank", "story.lora_scale"}
    assert loaded.body.objective.weights == {"mean_aesthetic": 1.0, "consistency": 2.0}


def test_every_bad_sweep_field_is_one_line_naming_it(tmp_path: Path) -> None:
    path = write_sweep(tmp_path, {
        "parameters": {"train.lr": [1], "train.rank": [8, 16.5], "story.lora_scale": {"uniform": [0.4, 9]},
                       "train.steps": {"uniform": [100, 200]}, "dataset.caption.prefix": ["a b"],
                       "output.uri": ["s3://x/"], "train.alpha": {"uniform": [2, 1]}},
        "algorithm": "grid",
    })  # fmt: skip
    with pytest.raises(ManifestError) as e:
        load_sweep(str(path))
    assert e.value.problems == ["spec.parameters.train.alpha: uniform: low must be less than high"]
    # the file's own shape is checked first; once it parses, each path and value against the manifest
    doc = yaml.safe_load(path.read_text())
    doc["spec"]["parameters"].pop("train.alpha")
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    with pytest.raises(ManifestError) as e:
        load_sweep(str(path))
    assert e.value.problems == [
        "spec.parameters.train.lr: no such field in the manifest's spec (paths are under spec, see `kolors-job "
        "schema`); did you mean train.rank?",
        "spec.parameters.train.rank: 16.5: Input should be a valid integer, got a number with a fractional part",
        "spec.parameters.story.lora_scale: algorithm grid needs a step for a uniform range (or a list)",
        "spec.parameters.story.lora_scale: 9.0: Input should be less than or equal to 4",
        "spec.parameters.train.steps: an integer field: use int: [low, high] (or a list)",
        "spec.parameters.dataset.caption.prefix: 'a b': a listed value must be a number or a word without spaces, "
        "quotes or shell characters (the engines put it into a command line)",
        "spec.parameters.output.uri: cannot be swept or set: the engine gives every trial its output (run --output)",
    ]


def test_the_cli_refuses_a_bad_sweep_with_exit_2_and_one_line_each(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    path = write_sweep(tmp_path, {"parameters": {"train.rnak": [4]}, "algorithm": "hyperband",
                                  "objective": "loss"})  # fmt: skip
    code = cli.main(["render", "katib", "--sweep", str(path), "--image", "x"])
    err = capsys.readouterr().err
    assert code == ExitCode.INVALID_MANIFEST
    lines = [json.loads(x)["message"] if x.startswith("{") else x for x in err.strip().splitlines()]
    assert lines == [
        "spec.objective.weights.loss.[key]: Input should be 'mean_aesthetic' or 'consistency'",
        "spec.algorithm: Input should be 'random', 'grid', 'bayesianoptimization' or 'tpe'",
    ]
    path = write_sweep(tmp_path, {"parameters": {"train.rnak": [4]}, "max_trials": 2, "parallel_trials": 3})
    assert cli.main(["render", "katib", "--sweep", str(path), "--image", "x"]) == ExitCode.INVALID_MANIFEST
    assert "spec: parallel_trials must be <= max_trials" in capsys.readouterr().err
    path = write_sweep(tmp_path, {"parameters": {"train.rnak": [4]}})
    assert cli.main(["render", "katib", "--sweep", str(path), "--image", "x"]) == ExitCode.INVALID_MANIFEST
    assert "spec.parameters.train.rnak: no such field" in capsys.readouterr().err


def test_early_stopping_needs_validation_points(tmp_path: Path) -> None:
    job = yaml.safe_load(MINIMAL.read_text())
    job["spec"]["train"] = {"validation": {"every": 0}}
    path = write_sweep(tmp_path, {"parameters": {"train.rank": [4, 8]}, "early_stopping": {"min_trials": 2}})
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    with pytest.raises(ManifestError, match=r"spec.early_stopping: needs validation points"):
        load_sweep(str(path))


# ------------------------------------------------------------------------------- run --set


def test_set_validates_each_value_as_the_manifest_does_and_records_it() -> None:
    m = overrides.apply_text(base(), ["train.rank=8", "train.learning_rate=1.2e-05", "dataset.caption.prefix=16",
                                      "story.frames.2.seed=7", "dataset.filters.aspect_ratio=[0.5, 3]"])  # fmt: skip
    assert (m.spec.train.rank, m.spec.train.learning_rate, m.spec.dataset.caption.prefix) == (8, 1.2e-05, "16")
    assert m.spec.story.frames[2].seed == 7 and m.spec.dataset.filters.aspect_ratio == (0.5, 3.0)
    assert m.metadata.labels["kolors-job/set.train.learning_rate"] == "1.2e-05"
    assert overrides.recorded(m.metadata.labels)["dataset.caption.prefix"] == "16"
    assert yaml.safe_load(m.to_yaml())["metadata"]["labels"]["kolors-job/set.train.rank"] == "8"
    # the same values written in the manifest give the same job (same digest): --set is the manifest's field
    doc = yaml.safe_load(MINIMAL.read_text())
    doc["spec"]["train"] = {"rank": 8, "learning_rate": 1.2e-05}
    doc["spec"]["dataset"] = {"caption": {"prefix": "16"}, "filters": {"aspect_ratio": [0.5, 3]}}
    written = Manifest.model_validate(doc)
    frames = [f.model_dump() for f in written.spec.story.frames]
    frames[2]["seed"] = 7
    written = Manifest.model_validate({**doc, "spec": {**doc["spec"], "story": {"frames": frames}}})
    assert written.digest() == m.digest()


@pytest.mark.parametrize(("item", "line"), [
    ("train.rank=0", "--set train.rank: Input should be greater than or equal to 1"),
    ("train.rank=abc", "--set train.rank: Input should be a valid integer, unable to parse string as an integer"),
    ("train.lr=1", "--set train.lr: no such field in the manifest's spec (paths are under spec, see `kolors-job "
                   "schema`); did you mean train.rank?"),
    ("recipe=tuned", "--set recipe: cannot be swept or set: the recipe fills switches when the manifest is read; "
                     "set it in the manifest"),
    ("story.frames.20.seed=1", "--set story.frames.20.seed: no such field in the manifest's spec (paths are under "
                               "spec, see `kolors-job schema`); did you mean story.frames.2.seed?"),
    ("train.warmup_steps=900", "--set train.warmup_steps: warmup_steps must not exceed steps"),
    ("noequals", "--set 'noequals': expected PATH=VALUE, e.g. train.rank=16 (a path under spec)"),
])  # fmt: skip
def test_set_refuses_what_the_manifest_refuses(item: str, line: str) -> None:
    with pytest.raises(ManifestError) as e:
        overrides.apply_text(base(), [item])
    assert e.value.problems == [line]


def test_run_with_a_bad_set_exits_2_before_anything_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KOLORS_JOB_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "out"
    job = yaml.safe_load(MINIMAL.read_text())
    job["spec"]["output"]["uri"] = str(out)
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    code = cli.main(["run", "--manifest", str(tmp_path / "job.yaml"), "--log-format", "text",
                     "--set", "train.rank=-1", "--set", "story.lora_scale=9"])  # fmt: skip
    assert code == ExitCode.INVALID_MANIFEST
    err = capsys.readouterr().err
    assert "--set train.rank: Input should be greater than or equal to 1" in err
    assert "--set story.lora_scale: Input should be less than or equal to 4" in err
    assert not out.exists(), "nothing written"
    code = cli.main(["run", "--manifest", str(tmp_path / "job.yaml"), "--trial", "a", "--job-id", "b"])
    assert code == ExitCode.INVALID_MANIFEST


def test_trial_names_become_job_ids() -> None:
    assert overrides.trial_job_id("purple-sweep-k7x2m9qa") == "purple-sweep-k7x2m9qa"  # Katib's: kept
    upper, lower = overrides.trial_job_id("sX5O9Q8-mf99W4"), overrides.trial_job_id("sx5o9q8-mf99w4")
    assert upper != lower and upper.startswith("sx5o9q8-mf99w4-")  # PAI's mixed case: two trials, two jobs
    import re

    from kolors_job.manifest.fields import JOB_ID_PATTERN

    assert re.fullmatch(JOB_ID_PATTERN, upper)
    with pytest.raises(ManifestError):
        overrides.trial_job_id("")


# ------------------------------------------------------------------------------- metric lines


def test_katib_json_lines_parse_with_katibs_collector(tmp_path: Path) -> None:
    path = tmp_path / "katib" / "kolors-metrics.json"
    sink = TrialMetrics(parse_weights("mean_aesthetic=1,consistency=2"), katib_file=path)
    sink.validation_point({"step": 100, "mean_aesthetic": 5.5, "consistency": 0.8125, "images": []})
    sink.validation_point({"step": 200, "mean_aesthetic": 6.0, "consistency": None})  # one frame: no objective
    sink.final({"mean": 6.25, "consistency": 0.75, "passed": True, "threshold": 6.0}, step=200)
    got = katib.collect(path, ["objective", "mean_aesthetic", "consistency"], fmt="JSON")
    assert [(n, v) for _, n, v in got] == [
        ("objective", "7.125"), ("mean_aesthetic", "5.5"), ("consistency", "0.8125"),
        ("mean_aesthetic", "6.0"),
        ("objective", "7.75"), ("mean_aesthetic", "6.25"), ("consistency", "0.75"),
    ]  # fmt: skip
    assert all(katib._is_rfc3339(ts) for ts, _, _ in got)
    # under the gate: the final objective is Katib's "unavailable", never a number
    gate = TrialMetrics(katib_file=tmp_path / "g.json")
    gate.final({"mean": 4.5, "consistency": 0.5, "passed": False})
    assert katib.collect(tmp_path / "g.json", ["objective", "mean_aesthetic"]) == [
        (katib.collect(tmp_path / "g.json", ["objective"])[0][0], "objective", "unavailable"),
        (katib.collect(tmp_path / "g.json", ["objective"])[0][0], "mean_aesthetic", "4.5"),
    ]


def test_pai_json_metric_file_follows_the_points_and_hides_a_failed_gate(bucket: str) -> None:
    """PAI AutoML's json metric: an object whose keys ``metric_dict`` weights (``{objective: 1}``)."""
    uri = f"{bucket}sweeps/s1/_automl/exp1-Tr1.json"
    sink = TrialMetrics(parse_weights("mean_aesthetic=1,consistency=2"), pai_json=uri)
    store = open_store(f"{bucket}sweeps/s1/_automl/")

    def final_metric() -> float | None:
        doc = json.loads(store.read_bytes("exp1-Tr1.json"))
        metric_dict = {"objective": 1.0}
        return None if any(k not in doc for k in metric_dict) else sum(w * doc[k] for k, w in metric_dict.items())

    sink.validation_point({"step": 2, "mean_aesthetic": 5.0, "consistency": 0.5})
    assert final_metric() == pytest.approx(6.0)
    sink.final({"mean": 5.5, "consistency": 0.25, "passed": True})
    assert final_metric() == pytest.approx(6.0) and json.loads(store.read_bytes("exp1-Tr1.json"))["mean_aesthetic"] == 5.5
    sink.final({"mean": 5.5, "consistency": 0.25, "passed": False})
    doc = json.loads(store.read_bytes("exp1-Tr1.json"))
    assert final_metric() is None and doc["quality_gate"] == "failed"


def test_objective_flag_is_checked() -> None:
    with pytest.raises(ManifestError, match="'loss' is not a metric"):
        parse_weights("loss=1")
    with pytest.raises(ManifestError, match="non-zero weight"):
        parse_weights("mean_aesthetic=0")
    assert parse_weights("consistency") == {"consistency": 1.0}


# ------------------------------------------------------------------------------- sweep report


def plant(store: Any, name: str, *, state: str, mean: float | None = None, consistency: float | None = None,
          passed: bool | None = None, exit_code: int | None = None, params: dict[str, str] | None = None,
          heartbeat: float | None = None, success: bool = False, lora: bytes = b"") -> None:  # fmt: skip
    """A trial directory as a job leaves it (runner.py, status.py, claim.py), written through the storage API."""
    t = store.child(name)
    labels = {f"kolors-job/set.{k}": v for k, v in (params or {}).items()}
    t.write_bytes("manifest.resolved.yaml", yaml.safe_dump({"metadata": {"name": "j", "labels": labels}}).encode())
    now = time.time()
    claim = {"owner": "h-1-ab", "digest": "d", "heartbeat": heartbeat or now - 600, "lease_s": 120.0,
             "started": now - 700, "released": state != "running"}  # fmt: skip
    t.write_bytes("_claim/00000001.json", json.dumps(claim).encode())
    if mean is not None:
        frames = [{"index": i, "image": f"images/{i:02d}.png"} for i in range(1, 9)]
        report = {"job_id": name, "score": {"mean": mean, "consistency": consistency, "threshold": 6.0,
                                            "passed": passed}, "story": {"frames": frames},
                  "lora_files": {"diffusers": "lora/pytorch_lora_weights.safetensors"},
                  "timings": {"train": 600.0, "story": 25.5}, "train": {"steps": 500}}  # fmt: skip
        t.write_bytes("report.json", json.dumps(report).encode())
        t.write_bytes("report.html", b"<html></html>")
        t.write_bytes("story.jpg", _jpeg())
        for f in frames:
            t.write_bytes(f["image"], _png())
        t.write_bytes("lora/pytorch_lora_weights.safetensors", lora or name.encode())
    status = {"job_id": name, "state": state, "stage": "train" if state == "running" else "report",
              "exit_code": exit_code, "error": {"message": "boom"} if state == "failed" else None}  # fmt: skip
    t.write_bytes("status.json", json.dumps(status).encode())
    if success:
        t.write_bytes("_SUCCESS", b"")


def _png() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (120, 30, 200)).save(buf, "PNG")
    return buf.getvalue()


def _jpeg() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (64, 128), (10, 30, 200)).save(buf, "JPEG")
    return buf.getvalue()


@pytest.fixture
def bucket(s3_server: Any, storage_env: Any, monkeypatch: pytest.MonkeyPatch) -> str:
    """``s3://<fresh bucket>/`` on moto; the env points the storage layer (and any subprocess) at it."""
    monkeypatch.setenv("KOLORS_JOB_S3_ENDPOINT_URL", s3_server.endpoint_url)
    monkeypatch.setenv("KOLORS_JOB_S3_REGION", s3_server.region)
    monkeypatch.setenv("KOLORS_JOB_S3_ADDRESSING_STYLE", "path")
    return f"s3://{s3_server.create_bucket()}/"


@pytest.fixture
def experiment(bucket: str) -> str:
    uri = f"{bucket}sweeps/s1/"
    store = open_store(uri)
    plant(store, "s1-low", state="succeeded", mean=6.1, consistency=0.80, passed=True, success=True,
          params={"train.rank": "8"}, lora=b"low-lora")  # fmt: skip
    plant(store, "s1-high", state="succeeded", mean=6.4, consistency=0.70, passed=True, success=True,
          params={"train.rank": "16"}, lora=b"high-lora")  # fmt: skip
    plant(store, "s1-gate", state="failed", mean=5.9, consistency=0.99, passed=False, exit_code=3,
          params={"train.rank": "32"})  # a higher objective than both, but under the gate  # fmt: skip
    plant(store, "s1-run", state="running", heartbeat=time.time(), params={"train.rank": "4"})
    plant(store, "s1-dead", state="running", heartbeat=time.time() - 3600, params={"train.rank": "4"})
    plant(store, "s1-bad", state="failed", exit_code=4, params={"train.rank": "64"})
    return uri


def test_report_ranks_by_objective_gate_first_and_publishes_the_winner(experiment: str) -> None:
    result = sweep_report(experiment, weights={"mean_aesthetic": 1.0, "consistency": 2.0})
    assert [(t.name, t.state) for t in result.trials] == [
        ("s1-high", "succeeded"), ("s1-low", "succeeded"), ("s1-gate", "failed-gate"),
        ("s1-run", "running"), ("s1-bad", "failed"), ("s1-dead", "crashed"),
    ]  # fmt: skip
    high, low, gate = result.trials[:3]
    assert high.objective == pytest.approx(7.8) and low.objective == pytest.approx(7.7)
    assert gate.objective == pytest.approx(7.88) and gate.objective > high.objective, "never ranked above a pass"
    assert result.best is high and outcome_code(result) == 0
    store = open_store(experiment)
    assert store.read_bytes("best/lora/pytorch_lora_weights.safetensors") == b"high-lora"
    pointer = json.loads(store.read_bytes("best/BEST.json"))
    assert pointer["trial"] == "s1-high" and pointer["params"] == {"train.rank": "16"}
    assert pointer["files"]["lora/pytorch_lora_weights.safetensors"] == hashlib.sha256(b"high-lora").hexdigest()
    assert store.exists("best/_SUCCESS")
    rows = json.loads(store.read_bytes("sweep.json"))["trials"]
    assert rows[4]["detail"] == "exit 4: boom" and "last heartbeat" in rows[5]["detail"]
    html = store.read_text("sweep.html")
    assert "<svg" in html and html.count("<circle") == 3  # the three scored trials, on the one parameter's plot
    assert "0.52 h of job time" in html  # the three trials that ran to the end: 3 × 625.5 s


def test_a_new_winner_replaces_best_whole_and_reruns_write_nothing(experiment: str) -> None:
    weights = {"mean_aesthetic": 1.0, "consistency": 2.0}
    sweep_report(experiment, weights=weights)
    assert sweep_report(experiment, weights=weights).written == []
    store = open_store(experiment)
    store.child("best").write_bytes("lora/stale.safetensors", b"a previous winner's extra file")
    store.child("s1-low").write_bytes("report.json", json.dumps({
        **json.loads(store.child("s1-low").read_bytes("report.json")),
        "score": {"mean": 7.0, "consistency": 0.9, "threshold": 6.0, "passed": True}}).encode())
    result = sweep_report(experiment, weights=weights)
    assert result.best is not None and result.best.name == "s1-low"
    assert store.read_bytes("best/lora/pytorch_lora_weights.safetensors") == b"low-lora"
    assert not store.exists("best/lora/stale.safetensors")
    assert json.loads(store.read_bytes("best/BEST.json"))["trial"] == "s1-low"
    best_keys = [k for k in result.written if k.startswith("best/")]
    assert best_keys[-2:] == ["best/BEST.json", "best/_SUCCESS"], "the pointer, then the marker, last"
    assert "best/images/01.png" not in best_keys, "a file already holding the same bytes is not written again"


def test_no_passing_trial_means_exit_3_or_75_and_no_best(bucket: str) -> None:
    uri = f"{bucket}sweeps/s2/"
    store = open_store(uri)
    plant(store, "s2-gate", state="failed", mean=5.0, consistency=0.5, passed=False, exit_code=3)
    result = sweep_report(uri)
    assert result.best is None and outcome_code(result) == ExitCode.QUALITY_GATE
    assert not store.exists("best/BEST.json")
    plant(store, "s2-run", state="running", heartbeat=time.time())
    assert outcome_code(sweep_report(uri)) == ExitCode.TEMPORARY


def test_rank_orders_states_and_never_zeroes_a_gate_failure() -> None:
    from kolors_job.sweep.report import Trial

    trials = rank([Trial("b", "failed-gate", objective=9.0), Trial("a", "succeeded", objective=1.0),
                   Trial("c", "succeeded", objective=2.0), Trial("d", "crashed")])  # fmt: skip
    assert [t.name for t in trials] == ["c", "a", "b", "d"] and [t.rank for t in trials] == [1, 2, 3, 4]
    assert trials[2].objective == 9.0
