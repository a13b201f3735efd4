"""A sweep end to end on the CPU, with Katib emulated by its own ported rules (tests/katib.py).

``render katib`` renders the Experiment; three parameter sets are substituted into its trial template as
Katib's controller does (``generator.go``); each trial's primary container is wrapped as Katib's pod webhook
wraps it (``sh -c "<command> && echo completed > …"``, ``$$`` expanded by the kubelet's rule); the resulting
command runs for real — the tiny random Kolors, the S3 server on 127.0.0.1 — with the container's own
environment. Paths stand in for the pod's mounts (``/cache``, ``/tmp``, ``/var/log/katib``, the image's
``/app/entrypoint.py``), ``tini`` and ``python`` come from a shim directory. One trial passes the gate, one
fails it (its swept threshold is 10), one is killed mid-training (SIGKILL: out of memory, a lost node).
Katib's File collector (ported) reads each trial's metric file; then ``kolors-job sweep report`` ranks the
three from storage alone and publishes the winner to ``best/``.

The three trials are whole jobs: they run once per session (``sweep_run``) and every test asserts on them.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from kolors_job.core.errors import ExitCode
from kolors_job.core.settings import Settings
from kolors_job.demo import build_demo_dataset, tiny_job
from kolors_job.storage import open_store
from kolors_job.sweep.metrics import parse_weights

try:
    from tests.storage_servers.fixtures import s3_settings
except ModuleNotFoundError:  # tests/ not importable as a package
    from storage_servers.fixtures import s3_settings

try:
    from tests import katib
except ModuleNotFoundError:  # tests/ is not a package and the repo root is not on sys.path
    import katib  # type: ignore[no-redef]

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENT = "tiny-sweep"
NAMESPACE = "kolors"
TRIALS = {
    # name (Katib: <experiment>-<8 random>) → Katib's parameter assignments (strings, as its suggestions give)
    "tiny-sweep-k7x2m9qa": {"train-learning-rate": "0.001", "score-threshold": "1.0"},  # passes the gate
    "tiny-sweep-p3c8w1zd": {"train-learning-rate": "0.003", "score-threshold": "10.0"},  # fails the gate
    "tiny-sweep-f5n0r4bt": {"train-learning-rate": "0.002", "score-threshold": "1.0"},  # killed mid-training
}
GOOD, GATE, CRASH = TRIALS
WEIGHTS = {"mean_aesthetic": 1.0, "consistency": 2.0}
SHIM_TINI = """#!/bin/sh
# tini's command line (Dockerfile ENTRYPOINT): options up to "--", then the program it runs and reaps
while [ "$#" -gt 0 ] && [ "$1" != "--" ]; do shift; done
shift
exec "$@"
"""


@dataclass
class SweepRun:
    bucket_prefix: str
    experiment: dict[str, Any]
    env: dict[str, str]
    metrics_dirs: dict[str, Path]
    exit_codes: dict[str, int]
    logs: dict[str, str]
    commands: dict[str, str]
    report_exit: int = -1
    report_stderr: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def _storage_env(s3_server: Any) -> dict[str, str]:
    return {
        "KOLORS_JOB_S3_ENDPOINT_URL": s3_server.endpoint_url,
        "KOLORS_JOB_S3_REGION": s3_server.region,
        "KOLORS_JOB_S3_ADDRESSING_STYLE": "path",
        "AWS_ACCESS_KEY_ID": s3_server.access_key,
        "AWS_SECRET_ACCESS_KEY": s3_server.secret_key,
        "AWS_EC2_METADATA_DISABLED": "true",
    }


def _pod_env(container: dict[str, Any], mounts: dict[str, Path]) -> dict[str, str]:
    """The container's env, with each mount point's path mapped to this machine's directory."""
    env = {}
    for item in container["env"]:
        value = item["value"]
        for point, local in mounts.items():
            if value == point or value.startswith(point + "/"):
                value = str(local) + value[len(point):]
        env[item["name"]] = value
    return env


@pytest.fixture(scope="session")
def sweep_run(tmp_path_factory: pytest.TempPathFactory, shared_cache: Path, s3_server: Any) -> Iterator[SweepRun]:
    tmp = tmp_path_factory.mktemp("sweep")
    data = build_demo_dataset(tmp / "data", n=6)
    bucket = s3_server.create_bucket()
    prefix = f"s3://{bucket}/sweeps/"
    # a tiny job: 2 steps, one validation at step 2, 64 px, 2 sampling steps
    job = tiny_job(data, prefix, {"dataset.caption": {"fixed": None}, "train.steps": 2, "train.batch_size": 1,
                                  "train.checkpoint_every": 2, "train.validation": {"steps": 2},
                                  "story.steps": 2}, name="tiny-sweep-job")  # fmt: skip
    (tmp / "job.yaml").write_text(yaml.safe_dump(job, allow_unicode=True), encoding="utf-8")
    sweep = {
        "apiVersion": "kolors-job/v1", "kind": "LoraSweep", "metadata": {"name": EXPERIMENT},
        "spec": {"manifest": "job.yaml",
                 "parameters": {"train.learning_rate": [0.001, 0.002, 0.003], "score.threshold": [1.0, 10.0]},
                 "objective": {"weights": WEIGHTS}, "algorithm": "random", "parallel_trials": 3, "max_trials": 3,
                 "early_stopping": {"min_trials": 2, "start_step": 1}},
    }  # fmt: skip
    (tmp / "sweep.yaml").write_text(yaml.safe_dump(sweep), encoding="utf-8")
    storage = _storage_env(s3_server)
    settings = Settings(cache_dir=shared_cache, backends={"s3": s3_settings(s3_server.endpoint_url, s3_server.region)})

    # render katib, exactly as the CLI does (stdout holds only the objects)
    render = subprocess.run(
        [sys.executable, "-m", "kolors_job", "render", "katib", "--sweep", str(tmp / "sweep.yaml"),
         "--image", "reg/kolors-job:test", "--namespace", NAMESPACE],
        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300,
    )  # fmt: skip
    assert render.returncode == 0, render.stderr
    docs = list(yaml.safe_load_all(render.stdout))
    experiment = next(d for d in docs if d["kind"] == "Experiment")

    shims = tmp / "bin"
    shims.mkdir()
    (shims / "tini").write_text(SHIM_TINI)
    (shims / "tini").chmod(0o755)
    (shims / "python").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')  # a venv's python, not a link
    (shims / "python").chmod(0o755)

    run = SweepRun(f"{prefix}{EXPERIMENT}/", experiment, {}, {}, {}, {}, {})
    defaulted = katib.set_defaults(experiment)
    mc = defaulted["spec"]["metricsCollectorSpec"]
    metrics_path = mc["source"]["fileSystemPath"]["path"]
    early = "earlyStopping" in experiment["spec"]
    procs: dict[str, subprocess.Popen[bytes]] = {}
    for name, assignments in TRIALS.items():
        job_obj = katib.substitute(defaulted, name, NAMESPACE, assignments)
        container = job_obj["spec"]["template"]["spec"]["containers"][0]
        argv = katib.wrap_primary_container(container, collector_kind=mc["collector"]["kind"],
                                            metrics_path=metrics_path, early_stopping=early)  # fmt: skip
        argv = [katib.kubernetes_expand(a) for a in argv]
        mounts = {"/var/log/katib": tmp / name / "katib", "/cache": shared_cache, "/tmp": tmp / name / "tmp",
                  "/app/entrypoint.py": ROOT / "entrypoint.py", "/home/kolors": tmp / name / "home"}  # fmt: skip
        for local in mounts.values():
            if local.suffix != ".py":
                local.mkdir(parents=True, exist_ok=True)
        pattern = "|".join(re.escape(p) for p in sorted(mounts, key=len, reverse=True))
        script = re.sub(pattern, lambda m, mounts=mounts: str(mounts[m.group(0)]), argv[2])  # one pass
        env = {**os.environ, **_pod_env(container, mounts), **storage,
               "PATH": f"{shims}:{os.environ['PATH']}", "PYTHONPATH": str(ROOT), "HOME": str(mounts["/home/kolors"]),
               "KOLORS_JOB_CLAIM_LEASE_S": "3"}  # fmt: skip
        run.env = env
        run.metrics_dirs[name] = mounts["/var/log/katib"]
        run.commands[name] = script
        log = open(tmp / f"{name}.log", "wb")  # noqa: SIM115 - closed when the trial ends
        procs[name] = subprocess.Popen([*argv[:2], script], env=env, stdout=log, stderr=subprocess.STDOUT,
                                       start_new_session=True)  # fmt: skip
        run.extra[name] = log
        if name == CRASH:
            # Killed mid-training, before its first validation writes a metric: once its log says the train stage
            # started and its status.json says so too, SIGKILL the whole pod (process group). The stage loads,
            # caches and takes two steps first (~0.5 s of a tiny job): the log is watched every 20 ms, not
            # status.json every 0.5 s, which a faster job outran
            store = open_store(f"{run.bucket_prefix}{name}/", settings)
            deadline = time.monotonic() + 600
            while time.monotonic() < deadline and procs[name].poll() is None:
                try:
                    if (b"stage train: started" in (tmp / f"{name}.log").read_bytes()
                            and json.loads(store.read_bytes("status.json")).get("stage") == "train"):
                        break
                except Exception:
                    pass
                time.sleep(0.02)
            os.killpg(procs[name].pid, signal.SIGKILL)
        else:
            procs[name].wait(timeout=1200)  # one at a time: the 2-core machine is shared
    for name, proc in procs.items():
        run.exit_codes[name] = proc.wait(timeout=1200)
        run.extra[name].close()
        run.logs[name] = (tmp / f"{name}.log").read_text(errors="replace")
    time.sleep(3.5)  # the killed trial's claim lease (3 s) runs out: it is crashed, not running

    # the report runs where the person runs it, with the bucket's credentials: not in a trial's pod
    report = subprocess.run([sys.executable, "-m", "kolors_job", "sweep", "report", run.bucket_prefix],
                            capture_output=True, text=True, env={**os.environ, **storage, "PYTHONPATH": str(ROOT)},
                            timeout=600)  # fmt: skip
    run.report_exit, run.report_stderr = report.returncode, report.stderr
    yield run


@pytest.fixture
def s3_env(sweep_run: SweepRun, monkeypatch: pytest.MonkeyPatch) -> None:
    for k in ("KOLORS_JOB_S3_ENDPOINT_URL", "KOLORS_JOB_S3_REGION", "KOLORS_JOB_S3_ADDRESSING_STYLE",
              "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):  # fmt: skip
        monkeypatch.setenv(k, sweep_run.env[k])


def _store(run: SweepRun, *parts: str) -> Any:
    return open_store(run.bucket_prefix + "".join(p + "/" for p in parts))


def test_the_experiment_passes_katibs_own_admission_rules(sweep_run: SweepRun) -> None:
    assert katib.validate_experiment(katib.set_defaults(sweep_run.experiment)) == []


def test_trials_exit_through_katibs_wrapper(sweep_run: SweepRun, s3_env: None) -> None:
    assert sweep_run.exit_codes[GOOD] == 0, sweep_run.logs[GOOD][-3000:]
    # With early stopping on, Katib's wrapper turns every failing exit into 1 (pod/utils.go:213); the
    # job's own code stays in its status.json, which is what sweep report reads
    assert sweep_run.exit_codes[GATE] == 1, sweep_run.logs[GATE][-3000:]
    assert sweep_run.logs[GATE].rstrip().endswith("Training Container was Failed")
    assert json.loads(_store(sweep_run, GATE).read_bytes("status.json"))["exit_code"] == ExitCode.QUALITY_GATE
    assert sweep_run.exit_codes[CRASH] == -signal.SIGKILL
    # Katib's completion marker: written only by the trial that exited 0 (its `&& echo completed`)
    marks = {n: [p.read_text().strip() for p in d.glob("*.pid")] for n, d in sweep_run.metrics_dirs.items()}
    assert marks[GOOD] == ["completed"] and marks[GATE] == [] and marks[CRASH] == []


def test_each_trial_ran_its_own_parameters_under_its_trial_name(sweep_run: SweepRun, s3_env: None) -> None:
    for name, assignments in TRIALS.items():
        resolved = yaml.safe_load(_store(sweep_run, name).read_bytes("manifest.resolved.yaml"))
        assert resolved["spec"]["train"]["learning_rate"] == float(assignments["train-learning-rate"])
        assert resolved["spec"]["score"]["threshold"] == float(assignments["score-threshold"])
        labels = resolved["metadata"]["labels"]
        assert labels["kolors-job/set.train.learning_rate"] == assignments["train-learning-rate"]
        assert labels["kolors-job/set.score.threshold"] == assignments["score-threshold"]
        assert parse_weights(labels["kolors-job/objective"]) == WEIGHTS
        status = json.loads(_store(sweep_run, name).read_bytes("status.json"))
        assert status["job_id"] == name


def test_katibs_file_collector_reads_the_objective_the_report_holds(sweep_run: SweepRun, s3_env: None) -> None:
    names = ["objective", "mean_aesthetic", "consistency"]
    good = katib.collect(sweep_run.metrics_dirs[GOOD] / "kolors-metrics.json", names, fmt="JSON")
    score = json.loads(_store(sweep_run, GOOD).read_bytes("report.json"))["score"]
    objective = [float(v) for _, n, v in good if n == "objective"]
    assert len(objective) == 2, good  # the validation point at step 2, then the final story
    assert objective[-1] == pytest.approx(score["mean"] + 2 * score["consistency"])  # the `latest` strategy
    assert all(ts != katib.ZERO_TIME for ts, _, _ in good), "every line carries a timestamp Katib parses"
    gate = katib.collect(sweep_run.metrics_dirs[GATE] / "kolors-metrics.json", names, fmt="JSON")
    assert [v for _, n, v in gate if n == "objective"][-1] == katib.UNAVAILABLE  # failed-gate, not zero
    assert [float(v) for _, n, v in gate if n == "mean_aesthetic"][-1] == pytest.approx(
        json.loads(_store(sweep_run, GATE).read_bytes("report.json"))["score"]["mean"])
    # killed before its first validation: no metric file at all, so Katib has no observation for it
    with pytest.raises(katib.CollectorError) as e:
        katib.collect(sweep_run.metrics_dirs[CRASH] / "kolors-metrics.json", names)
    assert e.value.kind == "errOpenFile"


def test_katib_stdout_collector_reads_only_our_lines_among_the_jobs_logs(sweep_run: SweepRun) -> None:
    """Katib's StdOut collector reads the container's stdout *and* stderr (``1>file 2>&1``) with its default
    filter: the job's real log lines (JSON, ``"key": value``) must never look like ``name=value``."""
    from kolors_job.sweep.metrics import TrialMetrics

    log_path = sweep_run.metrics_dirs[GOOD].parent / "stdout-collector.log"
    lines = sweep_run.logs[GOOD]
    out = io.StringIO()
    sink = TrialMetrics(WEIGHTS, katib_stdout=True, out=out)
    sink.validation_point({"step": 2, "mean_aesthetic": 5.25, "consistency": 0.75})
    sink.final({"mean": 5.5, "consistency": 0.5, "passed": True})
    log_path.write_text(lines + out.getvalue())
    got = katib.collect(log_path, ["objective", "mean_aesthetic", "consistency"], fmt="TEXT")
    assert [(n, v) for _, n, v in got] == [
        ("objective", "6.75"), ("mean_aesthetic", "5.25"), ("consistency", "0.75"),
        ("objective", "6.5"), ("mean_aesthetic", "5.5"), ("consistency", "0.5"),
    ]  # fmt: skip
    assert all(ts != katib.ZERO_TIME for ts, _, _ in got), "each line starts with an RFC 3339 time"
    assert '"mean_aesthetic":' in lines, "the job's own JSON log lines were in the mix"


def test_sweep_report_ranks_all_three_and_publishes_the_winner(sweep_run: SweepRun, s3_env: None) -> None:
    assert sweep_run.report_exit == 0, sweep_run.report_stderr
    root = _store(sweep_run)
    summary = json.loads(root.read_bytes("sweep.json"))
    rows = {t["name"]: t for t in summary["trials"]}
    assert [t["name"] for t in summary["trials"]] == [GOOD, GATE, CRASH]
    assert [rows[n]["state"] for n in (GOOD, GATE, CRASH)] == ["succeeded", "failed-gate", "crashed"]
    good_score = json.loads(_store(sweep_run, GOOD).read_bytes("report.json"))["score"]
    assert rows[GOOD]["objective"] == pytest.approx(good_score["mean"] + 2 * good_score["consistency"])
    assert rows[GATE]["objective"] is not None, "a failed-gate trial keeps its score; it is never zeroed"
    assert rows[GOOD]["params"] == {"train.learning_rate": "0.001", "score.threshold": "1.0"}
    assert summary["best"]["trial"] == GOOD
    html = root.read_text("sweep.html")
    assert html.index(GOOD) < html.index(GATE) < html.index(CRASH)
    assert "failed-gate" in html and "crashed" in html and "<svg" in html
    assert html.count('<img src="data:image/jpeg;base64,') == 16, "the two scored trials' 8 frames each"
    # best/ holds the winner's LoRA, report and story, byte for byte, with a pointer to its trial
    best, src = _store(sweep_run, "best"), _store(sweep_run, GOOD)
    pointer = json.loads(best.read_bytes("BEST.json"))
    assert pointer["trial"] == GOOD and pointer["source"].endswith(f"/{EXPERIMENT}/{GOOD}/")
    lora = "lora/pytorch_lora_weights.safetensors"
    for key in (lora, "report.json", "story.jpg", "images/01.png"):
        assert best.read_bytes(key) == src.read_bytes(key), key
    assert pointer["files"][lora] == hashlib.sha256(src.read_bytes(lora)).hexdigest()
    assert pointer["params"] == {"train.learning_rate": "0.001", "score.threshold": "1.0"}
    assert best.exists("_SUCCESS")


def test_a_rerun_of_the_report_writes_nothing(sweep_run: SweepRun, s3_env: None) -> None:
    from kolors_job.sweep.report import sweep_report

    root = _store(sweep_run)
    before = {k: root.read_bytes(k) for k in root.list("") if k.startswith(("best/", "sweep."))}
    result = sweep_report(sweep_run.bucket_prefix)
    assert result.written == [] and result.best is not None and result.best.name == GOOD
    assert {k: root.read_bytes(k) for k in root.list("") if k.startswith(("best/", "sweep."))} == before
