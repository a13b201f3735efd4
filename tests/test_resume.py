"""Kill and resume: a preempted job loses nothing and a rerun redoes nothing that is finished.

The tiny job runs on the CPU in subprocesses (``python -m kolors_job run``, JSON logs, one thread); the
uninterrupted references they are compared with run in this process (same bytes, no second start-up).
SIGTERM at a random training step → exit 75, status "interrupted", a checkpoint; a torn newer
checkpoint (no ``COMPLETE``) is planted and must be ignored; the rerun resumes from the last
complete checkpoint and is killed again once story frames have been uploaded; the third run draws
only the missing frames. The final LoRA must equal an uninterrupted run's bit for bit. A finished
job reruns as a no-op unless ``--force``; another manifest's output prefix is refused with exit 6.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from kolors_job.core.errors import ExitCode
from kolors_job.core.settings import Settings
from kolors_job.demo import build_demo_dataset, tiny_job
from kolors_job.manifest.spec import Manifest
from tests.cli_lines import json_record

ROOT = Path(__file__).resolve().parents[1]
STEPS, EVERY, FRAMES = 12, 2, 8
JOB = "resume-job"
LORA = "lora/pytorch_lora_weights.safetensors"


def manifest_dict(cache_dir: Path, output: Path, *, seed: int = 0) -> dict:
    data = build_demo_dataset(cache_dir / "demo-dataset")
    return tiny_job(data, str(output), {
        "train.steps": STEPS, "train.batch_size": 1, "train.learning_rate": 1e-3, "train.checkpoint_every": EVERY,
        "train.seed": seed,
        # batch 1: frames are drawn (and uploaded) one by one, so a kill can land between them
        "story.steps": 3, "story.batch_size": 1, "score.gate": False, "output.lora_formats": ["diffusers"],
    }, name=JOB)


@dataclass
class Run:
    rc: int | None = None
    lines: list[str] = field(default_factory=list)
    records: list[dict] = field(default_factory=list)
    signalled_at: dict | None = None
    seconds: float = 0.0

    def msgs(self, msg: str) -> list[dict]:
        return [r for r in self.records if r.get("msg") == msg]

    def text(self) -> str:
        return "".join(self.lines[-60:])


def start(manifest: Path, env: dict[str, str], *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "kolors_job", "run", "--manifest", str(manifest), *extra],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
    )


def follow(proc: subprocess.Popen, kill_when=None, timeout: float = 300) -> Run:
    """Read the JSON log line by line; send SIGTERM once ``kill_when(record)`` says so."""
    run = Run()
    watchdog = threading.Timer(timeout, proc.kill)  # a hung job fails the test, never hangs it
    watchdog.start()
    try:
        for line in proc.stdout:
            run.lines.append(line)
            record = json_record(line)
            if record is None:
                continue
            run.records.append(record)
            if kill_when and run.signalled_at is None and kill_when(record):
                run.signalled_at = record
                proc.send_signal(signal.SIGTERM)
        run.rc = proc.wait()
    finally:
        watchdog.cancel()
    return run


def lora_tensors(path: Path) -> dict[str, bytes]:
    from safetensors.torch import load_file

    return {k: v.numpy().tobytes() for k, v in sorted(load_file(path).items())}


def snapshot(root: Path) -> dict[str, tuple[int, int, int]]:
    """(inode, mtime_ns, size) of every file: a rewrite, even of the same bytes, changes it."""
    return {
        p.relative_to(root).as_posix(): (p.stat().st_ino, p.stat().st_mtime_ns, p.stat().st_size)
        for p in root.rglob("*")
        if p.is_file()
    }


def reference_run(manifest: Path, cache: Path, work_dir: Path) -> tuple[int, str]:
    """The uninterrupted run of ``manifest``, in this process (its bytes are a subprocess's: one thread both;
    a process of its own would only add its start-up): (exit code, message)."""
    from kolors_job.runner import Job, run_job

    outcome = run_job(Job(Manifest.model_validate(json.loads(manifest.read_text())),
                          settings=Settings(cache_dir=cache, work_dir=work_dir)))  # fmt: skip
    return outcome.exit_code, outcome.message


@pytest.fixture(scope="module")
def resume_runs(shared_cache, tmp_path_factory):
    """Run A (SIGTERM in training) → torn checkpoint → run B (SIGTERM after the first frame) → run C (finishes);
    then the reference: the same manifest run uninterrupted."""
    base = tmp_path_factory.mktemp("resume")
    rng = random.Random(os.environ.get("KOLORS_TEST_SEED") or time.time_ns())
    kill_step = rng.randint(3, STEPS - 3)
    env = {k: v for k, v in os.environ.items() if not k.startswith("KOLORS_JOB_")}
    env.update(KOLORS_JOB_CACHE_DIR=str(shared_cache), KOLORS_JOB_LOG_FORMAT="json", OMP_NUM_THREADS="1",
               MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    out, ref_out = base / "out", base / "ref-out"
    manifest, ref_manifest = base / "job.json", base / "ref.json"
    manifest.write_text(json.dumps(manifest_dict(shared_cache, out)))
    ref_manifest.write_text(json.dumps(manifest_dict(shared_cache, ref_out)))
    job_env = {**env, "KOLORS_JOB_WORK_DIR": str(base / "work")}
    # the tiny models built once, here, before the runs
    from kolors_job.sources import resolve_model

    for uri, kind in (("tiny://kolors", "pipeline"), ("tiny://aesthetic", "aesthetic")):
        resolve_model(uri, kind=kind, settings=Settings(cache_dir=shared_cache))

    t0 = time.monotonic()
    a = follow(start(manifest, job_env), lambda r: r.get("msg") == "step" and r.get("step") == kill_step)
    a.seconds = time.monotonic() - t0
    status_a = json.loads((out / JOB / "status.json").read_text())
    after_a = sorted(snapshot(out / JOB))
    ckpt_dir = out / JOB / "checkpoints"
    complete_a = sorted(int(p.name.removeprefix("step-")) for p in ckpt_dir.iterdir() if (p / "COMPLETE").is_file())
    # a torn checkpoint, newer than every complete one: files present, COMPLETE missing
    torn_step = STEPS - 1
    torn = ckpt_dir / f"step-{torn_step}"
    torn.mkdir()
    for name in ("pytorch_lora_weights.safetensors", "state.json", "optimizer.bin"):
        (torn / name).write_bytes(b"\x00garbage: a preempted upload\x00")

    t0 = time.monotonic()
    status_at_resume: dict = {}

    def at_resume_then_first_frame(r: dict) -> bool:
        if r.get("msg") == "resumed":  # status.json is written before training goes on: read it now
            status_at_resume.update(json.loads((out / JOB / "status.json").read_text()))
        return r.get("msg") == "frame"

    b = follow(start(manifest, job_env), at_resume_then_first_frame)
    b.seconds = time.monotonic() - t0
    status_b = json.loads((out / JOB / "status.json").read_text())
    frames_b = snapshot(out / JOB / "images")

    t0 = time.monotonic()
    c = follow(start(manifest, job_env))
    c.seconds = time.monotonic() - t0

    ref_rc, ref_log = reference_run(ref_manifest, shared_cache, base / "ref-work")
    return {
        "kill_step": kill_step, "out": out / JOB, "ref_out": ref_out / JOB, "ref_rc": ref_rc,
        "ref_log": ref_log, "a": a, "b": b, "c": c, "status_a": status_a, "status_b": status_b,
        "status_at_resume": status_at_resume,
        "complete_a": complete_a, "after_a": after_a, "torn_step": torn_step, "frames_b": frames_b,
        "manifest": manifest, "env": job_env, "shared_cache": shared_cache, "base": base,
    }


def test_sigterm_in_training_exits_75_interrupted_with_a_checkpoint(resume_runs):
    a, k = resume_runs["a"], resume_runs["kill_step"]
    assert a.signalled_at is not None, f"never reached step {k}: {a.text()}"
    assert a.rc == ExitCode.TEMPORARY == 75, f"kill at step {k}: {a.text()}"
    status = resume_runs["status_a"]
    assert status["state"] == "interrupted" and status["exit_code"] == 75 and status["stage"] == "train", status
    assert any("SIGTERM" in r.get("msg", "") for r in a.records)
    steps = [r["step"] for r in a.msgs("step")]
    assert max(steps) <= k + 2, f"kept training after SIGTERM at step {k}: {steps}"  # 1 step of slack for a busy box
    # the stop checkpoint is the newest complete one (older ones pruned to keep_checkpoints=2)
    assert resume_runs["complete_a"] and max(resume_runs["complete_a"]) == max(steps), resume_runs["complete_a"]
    assert "_SUCCESS" not in resume_runs["after_a"] and LORA not in resume_runs["after_a"]
    assert not any(k.startswith("images/") for k in resume_runs["after_a"])


def test_rerun_resumes_from_the_last_complete_checkpoint_never_a_torn_one(resume_runs):
    b = resume_runs["b"]
    newest = max(resume_runs["complete_a"])
    resumed = b.msgs("resumed")
    assert len(resumed) == 1 and resumed[0]["step"] == newest, b.text()
    assert f"checkpoints/step-{resume_runs['torn_step']}" not in "".join(b.lines + resume_runs["c"].lines)
    first_step = min(r["step"] for r in b.msgs("step"))
    assert first_step == newest + 1, "steps already done were trained again"


def test_status_shows_the_resumed_step_not_step_0(resume_runs):
    """A person watching status.json of a resumed run sees where it resumed, before the next step ends."""
    newest = max(resume_runs["complete_a"])
    status = resume_runs["status_at_resume"]
    assert status, "run B never logged 'resumed'"
    assert (status["state"], status["stage"], status["step"]) == ("running", "train", newest), status


def test_every_log_line_is_json_but_the_last(resume_runs):
    """Interrupted, resumed and finishing runs write only JSON lines (warnings of torch, PIL, diffusers
    included) — a log pipeline parsing the pod's output never meets a stray line; the CLI's own
    one-line summary comes last."""
    for name in ("a", "b", "c"):
        run = resume_runs[name]
        lines = [line for line in run.lines if line.strip()]
        stray = [line for line in lines[:-1] if not line.lstrip().startswith("{")]
        assert not stray, f"run {name}: non-JSON lines {stray[:5]}"
        for line in lines[:-1]:
            assert isinstance(json.loads(line), dict)


def test_final_lora_equals_an_uninterrupted_run_bit_for_bit(resume_runs):
    c = resume_runs["c"]
    assert resume_runs["ref_rc"] == 0, resume_runs["ref_log"]
    assert c.rc == 0, c.text()
    assert (resume_runs["out"] / "_SUCCESS").is_file()
    assert json.loads((resume_runs["out"] / "status.json").read_text())["state"] == "succeeded"
    ours, reference = lora_tensors(resume_runs["out"] / LORA), lora_tensors(resume_runs["ref_out"] / LORA)
    assert ours.keys() == reference.keys() and len(ours) > 0
    differing = [k for k in ours if ours[k] != reference[k]]
    assert not differing, f"killed at step {resume_runs['kill_step']}: {len(differing)} tensors differ, e.g. {differing[:3]}"
    # and the frames drawn from it are the same pictures
    for i in range(1, FRAMES + 1):
        name = f"images/{i:02d}.png"
        assert (resume_runs["out"] / name).read_bytes() == (resume_runs["ref_out"] / name).read_bytes(), name


def test_kill_in_the_story_keeps_finished_frames(resume_runs):
    b, c = resume_runs["b"], resume_runs["c"]
    assert b.signalled_at is not None and b.rc == 75, b.text()
    assert resume_runs["status_b"]["state"] == "interrupted" and resume_runs["status_b"]["stage"] == "story"
    done = resume_runs["frames_b"]
    assert 1 <= len(done) < FRAMES, f"frames after the kill: {sorted(done)}"
    # run C drew only the missing frames; the finished ones were not rewritten (same inode, mtime)
    drawn = sorted(r["index"] for r in c.msgs("frame"))
    assert drawn == [i for i in range(1, FRAMES + 1) if f"{i:02d}.png" not in done], drawn
    after = snapshot(resume_runs["out"] / "images")
    for name, stat in done.items():
        assert after[name] == stat, f"{name} was rewritten"
    assert c.msgs("resumed") == [] and c.msgs("step") == []  # training was not redone either
    assert any(f"story: {len(done)} frame(s) already in the output" in r.get("msg", "") for r in c.records)


def _noop_rerun(resume_runs, caplog):
    from kolors_job.job.context import Job
    from kolors_job.runner import run_job

    out = resume_runs["out"]
    assert (out / "_SUCCESS").is_file()
    manifest = Manifest.model_validate(json.loads(resume_runs["manifest"].read_text()))
    settings = Settings(cache_dir=resume_runs["shared_cache"], work_dir=resume_runs["base"] / "work2")
    before = snapshot(out)
    with caplog.at_level(logging.INFO, logger="kolors_job"):
        outcome = run_job(Job(manifest, settings=settings))
    return outcome, before, snapshot(out)


def test_finished_job_is_a_no_op(resume_runs, caplog):
    outcome, before, after = _noop_rerun(resume_runs, caplog)
    assert outcome.exit_code == 0 and outcome.state == "skipped", outcome
    assert "already complete" in outcome.message and "--force" in outcome.message
    assert any("already complete" in r.getMessage() for r in caplog.records)
    assert not any(r.getMessage().startswith(("stage models", "stage train")) for r in caplog.records)
    recomputed = sorted(k for k in before if after.get(k) != before[k] and k != "status.json")
    assert recomputed == [] and sorted(after) == sorted(before), recomputed


def test_finished_job_status_stays_succeeded_after_a_no_op_rerun(resume_runs, caplog):
    _noop_rerun(resume_runs, caplog)
    status = json.loads((resume_runs["out"] / "status.json").read_text())
    assert status["state"] == "succeeded", status


def test_force_recomputes_instead_of_skipping(resume_runs, tmp_path):
    """--force must not stop at _SUCCESS: it clears the prefix and runs the (here: changed) manifest.
    The new manifest names a missing model, so the forced run stops cheaply at the models stage."""
    from kolors_job.job.context import Job
    from kolors_job.runner import run_job

    out = resume_runs["out"]
    assert (out / "_SUCCESS").is_file()
    data = json.loads(resume_runs["manifest"].read_text())
    data["spec"]["model"]["base"] = str(tmp_path / "no-such-model")
    manifest = Manifest.model_validate(data)
    settings = Settings(cache_dir=resume_runs["shared_cache"], work_dir=tmp_path / "work")
    outcome = run_job(Job(manifest, settings=settings, force=True))
    assert outcome.exit_code == ExitCode.INVALID_INPUT and "no-such-model" in outcome.message, outcome
    left = sorted(snapshot(out))
    assert "_SUCCESS" not in left and LORA not in left and not any(k.startswith(("images/", "checkpoints/")) for k in left)
    assert "no-such-model" in (out / "manifest.resolved.yaml").read_text()  # the forced run's manifest


def _conflict(resume_runs, tmp_path):
    from kolors_job.job.context import Job
    from kolors_job.runner import run_job

    out = tmp_path / "shared-prefix"
    mine = Manifest.model_validate(manifest_dict(resume_runs["shared_cache"], out))
    theirs = mine.model_copy(deep=True)
    theirs.spec.train.rank = 4  # a different job under the same id
    (out / JOB / "lora").mkdir(parents=True)
    (out / JOB / "manifest.resolved.yaml").write_text(theirs.to_yaml())
    (out / JOB / LORA).write_bytes(b"their lora")
    (out / JOB / "status.json").write_text('{"state": "succeeded"}')
    (out / JOB / "_SUCCESS").write_bytes(b"")
    before = snapshot(out)
    settings = Settings(cache_dir=resume_runs["shared_cache"], work_dir=tmp_path / "work")
    return run_job(Job(mine, settings=settings)), out, before


def test_other_manifest_in_the_prefix_is_a_conflict(resume_runs, tmp_path):
    outcome, out, before = _conflict(resume_runs, tmp_path)
    assert outcome.exit_code == ExitCode.OUTPUT_CONFLICT == 6, outcome
    assert "different manifest" in outcome.message and JOB in outcome.message and "--force" in outcome.message
    after = snapshot(out)
    assert sorted(after) == sorted(before)
    assert {k: v for k, v in after.items() if k != f"{JOB}/status.json"} == {
        k: v for k, v in before.items() if k != f"{JOB}/status.json"
    }
    assert (out / JOB / LORA).read_bytes() == b"their lora"


def test_conflict_leaves_the_other_runs_status_alone(resume_runs, tmp_path):
    _outcome, out, _before = _conflict(resume_runs, tmp_path)
    assert json.loads((out / JOB / "status.json").read_text()) == {"state": "succeeded"}


def test_kill_after_a_validation_keeps_it_and_the_rerun_does_not_redo_it(shared_cache, tmp_path):
    """Validation on (every checkpoint, frames 1 and 8), ``select: best_aesthetic``: SIGTERM once step 4's
    validation is logged; the rerun validates only the later steps, leaves the earlier PNGs alone, and ends
    with every point and the selection an uninterrupted run makes."""
    data = build_demo_dataset(shared_cache / "demo-dataset")
    env = {k: v for k, v in os.environ.items() if not k.startswith("KOLORS_JOB_")}
    env.update(KOLORS_JOB_CACHE_DIR=str(shared_cache), KOLORS_JOB_LOG_FORMAT="json", OMP_NUM_THREADS="1",
               MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1", KOLORS_JOB_WORK_DIR=str(tmp_path / "work"))
    reports = {}
    runs: dict[str, list[Run]] = {"killed": []}
    for name in ("killed", "ref"):
        out = tmp_path / name
        manifest = tmp_path / f"{name}.json"
        manifest.write_text(json.dumps(tiny_job(data, str(out), {
            "train.steps": 8, "train.batch_size": 1, "train.learning_rate": 1e-3, "train.checkpoint_every": 2,
            "train.validation": {"steps": 2}, "train.select": "best_aesthetic", "story.steps": 2,
            "score.gate": False, "output.lora_formats": ["diffusers"],
        }, name="watch-resume")))  # fmt: skip
        if name == "killed":
            a = follow(start(manifest, env), lambda r: r.get("msg") == "validation" and r.get("step") == 4)
            assert a.signalled_at is not None and a.rc == ExitCode.TEMPORARY, a.text()
            runs[name].append(a)
            before = snapshot(out / "watch-resume" / "validation")
            runs[name].append(follow(start(manifest, env)))
            assert runs[name][-1].rc == 0, runs[name][-1].text()
        else:  # the uninterrupted reference
            rc, message = reference_run(manifest, shared_cache, tmp_path / "ref-work")
            assert rc == 0, message
        reports[name] = json.loads((out / "watch-resume" / "report.json").read_text())
    a, b = runs["killed"]
    assert [r["step"] for r in a.msgs("validation")] == [2, 4]
    assert sorted(r["step"] for r in b.msgs("validation")) == [6, 8], "a finished validation was redone"
    after = snapshot(tmp_path / "killed" / "watch-resume" / "validation")
    assert {k: after[k] for k in before} == before and set(before) == {
        f"step-{s}/{i:02d}.png" for s in (2, 4) for i in (1, 8)}  # fmt: skip
    killed, ref = reports["killed"], reports["ref"]
    assert [p["step"] for p in killed["validation"]] == [2, 4, 6, 8]
    assert killed["validation"] == ref["validation"] and killed["selected_checkpoint"] == ref["selected_checkpoint"]
    assert lora_tensors(tmp_path / "killed" / "watch-resume" / LORA) == lora_tensors(tmp_path / "ref" / "watch-resume" / LORA)
    assert list((tmp_path / "killed" / "watch-resume" / "logs" / "tensorboard").glob("events.out.tfevents.*"))


def test_a_checkpoint_of_another_job_is_never_resumed(tmp_path, caplog):
    """Two manifests that differ only in their story share every training setting, yet a checkpoint one of
    them left in a prefix is passed over by the other: the job's identity is part of what each records."""
    from kolors_job.storage import open_store
    from kolors_job.train import checkpoints
    from kolors_job.train.fingerprint import VERSION

    store = open_store(str(tmp_path / "out"))
    for step, job, version in ((2, "mine", VERSION), (4, "theirs", VERSION), (5, "mine", VERSION - 1)):
        state = {"fingerprint": {"job": job, "version": version}}
        store.write_bytes(f"checkpoints/step-{step}/state.json", json.dumps(state).encode())
        store.write_bytes(f"checkpoints/step-{step}/COMPLETE", b"")
    store.write_bytes("checkpoints/step-6/COMPLETE", b"")  # no state.json: nothing vouches for it
    with caplog.at_level(logging.WARNING, logger="kolors_job"):
        assert checkpoints.newest_complete(store, identity="mine") == 2
    assert [r.getMessage() for r in caplog.records] == [
        "checkpoint checkpoints/step-6 was written by another job: not resumed",
        f"checkpoint checkpoints/step-5 was written by kolors-job with fingerprints of version {VERSION - 1}: "
        "not resumed",
        "checkpoint checkpoints/step-4 was written by another job: not resumed",
    ]
    assert checkpoints.newest_complete(store, identity="nobody") is None
    assert checkpoints.newest_complete(store) == 6


def test_a_stopped_job_with_urls_in_its_prompts_resumes(shared_cache, tmp_path):
    """Issue #31 (3c): a negative prompt ``blurry, a url like https://shop.example/?sale``, a caption prefix and a
    dataset source with upper-case schemes; the job is stopped once ``manifest.resolved.yaml`` exists (exit 75,
    "rerun to resume") and rerun: it is the same job (not exit 6, "a different manifest"), and the stored
    manifest holds every prompt and URI byte for byte."""
    import yaml

    from kolors_job.core.stop import StopFlag
    from kolors_job.job.context import Job
    from kolors_job.manifest.load import parse_manifest
    from kolors_job.runner import run_job

    data = build_demo_dataset(shared_cache / "demo-dataset")
    doc = tiny_job(data, (tmp_path / "out").as_uri().replace("file://", "FILE://"), {
        "story.negative_prompt": "blurry, a url like https://shop.example/?sale",
        "story.frames": [{"prompt": f"二次元 {i}, see HTTPS://Example.COM/a?b&c=&d=%41#x", "seed": i} for i in range(8)],
        "dataset.caption": {"fixed": None, "prefix": "S3://trigger?word&a=b "},
    }, name="url-job")  # fmt: skip
    doc["spec"]["dataset"]["source"] = "FILE://" + str(data)
    text = json.dumps(doc, ensure_ascii=False)
    settings = Settings(cache_dir=shared_cache, work_dir=tmp_path / "work")
    resolved = tmp_path / "out" / "url-job" / "manifest.resolved.yaml"

    class StopOncePrepared(StopFlag):  # SIGTERM landing right after the resolved manifest is written
        def __call__(self) -> bool:
            return resolved.is_file()

    outcomes = []
    for _ in range(2):  # the run, stopped; its rerun, stopped at the same point: never "another manifest"
        outcomes.append(run_job(Job(parse_manifest(text), settings=settings, stop=StopOncePrepared())))
    assert [o.exit_code for o in outcomes] == [ExitCode.TEMPORARY, ExitCode.TEMPORARY], outcomes
    assert all("rerun to resume" in o.message for o in outcomes), outcomes
    stored = resolved.read_bytes()
    job = parse_manifest(text)
    assert Manifest.model_validate(yaml.safe_load(stored)).digest() == job.digest()
    assert yaml.safe_load(stored) == job.model_dump(mode="json")
    for given in ("blurry, a url like https://shop.example/?sale", "?b&c=&d=%41#x", "S3://trigger?word&a=b ", "FILE://"):
        assert given in stored.decode(), given


def _plant_scratch(path: Path, record: dict | None, *, age_s: float = 0.0) -> Path:
    """A scratch directory another process left on the shared work volume (with its owner record, if any)."""
    from kolors_job.job.scratch import OWNER_PREFIX

    path.mkdir(parents=True)
    (path / "lora.safetensors").write_bytes(b"\0" * 64)
    files = [path / "lora.safetensors", path]
    if record is not None:
        owner = path / f"{OWNER_PREFIX}{record['host']}-{record['pid']}.json"
        owner.write_text(json.dumps(record))
        files.insert(0, owner)
    stamp = time.time() - age_s
    for p in files:
        os.utime(p, (stamp, stamp))
    return path


def test_sigkilled_runs_leave_no_scratch_and_live_ones_keep_theirs(shared_cache, tmp_path):
    """Issue #31 (2): runs SIGKILLed mid-training and mid-story (no cleanup of their own) leave their scratch
    behind; the next run removes it as it starts — and never the scratch of a process that still exists, here
    or on another machine sharing the volume (seen through its owner record's heartbeat)."""
    from kolors_job.job.scratch import LEGACY_STALE_S, STALE_S, identity

    work = tmp_path / "work"
    data = build_demo_dataset(shared_cache / "demo-dataset")
    manifest = tmp_path / "job.json"
    manifest.write_text(json.dumps(tiny_job(data, str(tmp_path / "out"), {
        "train.steps": 4, "train.checkpoint_every": 2, "train.batch_size": 1, "story.steps": 1,
        "story.batch_size": 1, "score.gate": False, "output.lora_formats": ["diffusers"],
    }, name="killed")))  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("KOLORS_JOB_")}
    env.update(KOLORS_JOB_CACHE_DIR=str(shared_cache), KOLORS_JOB_WORK_DIR=str(work), KOLORS_JOB_LOG_FORMAT="json",
               KOLORS_JOB_CLAIM_LEASE_S="3", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")

    live = subprocess.Popen(["sleep", "600"])  # a live process of this machine, and one that has ended
    ended = subprocess.Popen(["sleep", "0.1"])
    ended_record = identity(ended.pid)
    ended.wait()
    here = identity()
    others = work / "other-job"
    keep = {
        "live": _plant_scratch(others / f"run-{live.pid}-aaaaaa", identity(live.pid)),
        "other-node, renewing": _plant_scratch(others / "run-77-bbbbbb", {**here, "host": "other-node", "pid": 77},
                                               age_s=STALE_S / 10),
        "old layout, recent": _plant_scratch(others / "run-78-cccccc", None, age_s=60),
    }
    gone = {
        "ended": _plant_scratch(others / f"run-{ended.pid}-dddddd", ended_record),
        "pid reused": _plant_scratch(others / f"run-{live.pid}-eeeeee", {**identity(live.pid), "start": "1"}),
        "other-node, silent": _plant_scratch(others / "run-79-ffffff", {**here, "host": "other-node", "pid": 79},
                                             age_s=STALE_S * 2),
        "old layout, idle": _plant_scratch(others / "run-80-aaaaaa", None, age_s=LEGACY_STALE_S * 2),
        "this machine, earlier boot": _plant_scratch(others / "run-81-aaaaaa", {**here, "pid": 81, "boot": "earlier"}),
    }

    def killed_at(what) -> set[Path]:
        run = start(manifest, env)
        for line in run.stdout:
            with contextlib.suppress(ValueError):
                if what(json.loads(line)):
                    run.kill()  # SIGKILL: no handler runs, nothing is cleaned up
                    break
        assert run.wait(60) == -signal.SIGKILL
        return set((work / "killed").iterdir())

    try:
        first = killed_at(lambda r: r.get("msg") == "step" and r.get("step") == 3)  # mid-training
        assert len(first) == 1 and all(p.name.startswith("run-") for p in first), first  # left behind
        second = killed_at(lambda r: r.get("msg") == "frame")  # mid-story, after resuming
        assert len(second) == 1 and not first & second, (first, second)  # the first one's went at its start
        last = follow(start(manifest, env))
        assert last.rc == 0, last.text()
        assert not (work / "killed").exists(), sorted((work / "killed").rglob("*"))
        for name, path in keep.items():
            assert path.is_dir(), f"the scratch of a {name} owner was removed"
        for name, path in gone.items():
            assert not path.exists(), f"the scratch of a {name} owner is still there"
        assert sorted(p.name for p in others.iterdir()) == sorted(p.name for p in keep.values())
        print(f"\nscratch: 2 SIGKILLed runs' directories removed by the next run's start; {len(gone)} planted "
              f"dead owners' removed, {len(keep)} live ones' kept")
    finally:
        live.kill()
        live.wait()
