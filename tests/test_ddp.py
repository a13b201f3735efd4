"""DDP for real, on CPU with gloo: ``torchrun -m kolors_job run`` on 2 ranks of one node, and on 2 "nodes"
(two torchrun launchers, one process each, separate disks), against 1 process with the same effective batch.

Checks: both ranks train the same LoRA (node 1's own copy equals the published one, byte for byte), each
draws half of the story, rank 0 alone writes the output — every object once, as the recording proxy in
front of the S3 server sees it — and the result equals the 1-process run to float tolerance.

Not bitwise: DDP averages two per-sample gradients after the backward (all-reduce, then / 2) while
one process differentiates the mean over a batch of 2, so the sums associate differently (~1e-7
relative); Adam's g/√v then amplifies last-bit differences of near-zero gradients, so after 4 steps at
lr 1e-2 the LoRA tensors agree to ~1e-4 absolute (bound: 2e-3, a fifth of one step's size), and the
frames drawn with them to 2/255.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kolors_job.export.lora_io import LORA_WEIGHT_NAME
from kolors_job.launch import pod

try:
    from tests.storage_servers.fixtures import s3_settings
except ModuleNotFoundError:  # tests/ not importable as a package
    from storage_servers.fixtures import s3_settings

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------ the whole job on 2 ranks


class JobWorld:
    """A bucket behind a recording proxy, the shared tiny job's manifest (tests/scenarios.py) and dataset, and
    ``torchrun -m kolors_job run`` launchers."""

    def __init__(self, tmp_path: Path, cache: Path, s3_server, proxy, tiny) -> None:
        from kolors_job.core.settings import Settings

        self.tmp, self.proxy, self.tiny = tmp_path, proxy, tiny
        self.bucket = s3_server.create_bucket()
        self.output = f"s3://{self.bucket}/runs/"
        self.env = {
            **os.environ,
            "OMP_NUM_THREADS": "1",
            "KOLORS_JOB_CACHE_DIR": str(cache),
            "KOLORS_JOB_LOG_FORMAT": "json",
            "KOLORS_JOB_S3_ENDPOINT_URL": proxy.endpoint,
            "KOLORS_JOB_S3_REGION": s3_server.region,
            "KOLORS_JOB_S3_ADDRESSING_STYLE": "path",
        }
        self.settings = Settings(  # for runs and reads in this process, straight to the server (not counted)
            cache_dir=cache, work_dir=tmp_path / "work-here", log_format="json",
            backends={"s3": s3_settings(s3_server.endpoint_url, s3_server.region)},
        )

    def manifest_file(self, name: str, batch_size: int, steps: int = 4) -> Path:
        """The shared tiny job (4 steps of batch 2, lr 1e-2, Kaiming-uniform A: on the tiny model the reference's
        gaussian A leaves many near-zero B gradients, whose float-noise sign flips Adam turns into whole steps,
        1.8e-3 against 1e-2 moved) as job ``name`` with ``batch_size`` per rank."""
        import yaml

        path = self.tmp / f"{name}.yaml"
        doc = self.tiny.manifest_doc(self.output, name=name,
                                     overrides={"train.batch_size": batch_size, "train.steps": steps})
        path.write_text(yaml.safe_dump(doc, allow_unicode=True))
        return path

    def launch(self, torchrun_args: list[str], manifest: Path, work_dir: Path, log_path: Path) -> subprocess.Popen:
        cmd = [sys.executable, "-m", "kolors_job.launch.torchrun", *torchrun_args,
               "-m", "kolors_job", "run", "--manifest", str(manifest)]
        env = {**self.env, "KOLORS_JOB_WORK_DIR": str(work_dir)}
        with log_path.open("w") as log:  # a file, not a pipe: a full pipe would block the ranks
            return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)

    def store(self, name: str):
        from kolors_job.storage import open_store

        return open_store(f"{self.output}{name}/", self.settings)

    def write_counts(self, name: str) -> dict[str, int]:
        """PUT/POST requests per key of job ``name`` as the proxy saw them (status.json and the claim, which
        its heartbeat rewrites, left out)."""
        prefix = f"/{self.bucket}/runs/{name}/"
        keys = [t.split("?")[0].removeprefix(prefix) for m, t in self.proxy.requests
                if m in ("PUT", "POST") and t.startswith(prefix)]
        return {k: keys.count(k) for k in set(keys) if k != "status.json" and not k.startswith("_claim/")}


@pytest.fixture
def job_world(tmp_path: Path, shared_cache: Path, s3_server, tiny_s3_job, monkeypatch: pytest.MonkeyPatch):
    try:
        from tests.storage_servers.fault_proxy import FaultProxy
    except ModuleNotFoundError:
        from storage_servers.fault_proxy import FaultProxy

    for var in list(os.environ):
        if var.startswith(("AWS_", "KOLORS_JOB_")):
            monkeypatch.delenv(var)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.secret_key)
    with FaultProxy(s3_server.endpoint_url, flavour="s3") as proxy:  # no faults: it only records requests
        yield JobWorld(tmp_path, shared_cache, s3_server, proxy, tiny_s3_job)


class PeakRss:
    """Peak resident memory (``VmHWM``) of each rank under a torchrun launcher, sampled while it runs, and
    the peak of its private part (``RssAnon``: what the rank does not share with the others), by pid. A rank is
    a process under the launcher that leads a session of its own (torchrun starts each worker so), not one whose
    environment says ``RANK``: a rank the tests start warm (tests/warm_start.py) shows the environment it was
    forked with in ``/proc/<pid>/environ``."""

    def __init__(self, launcher: subprocess.Popen) -> None:
        import threading

        self.launcher, self.peaks, self._stop = launcher, {}, threading.Event()
        self.private: dict[int, int] = {}
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        import psutil

        while not self._stop.is_set():
            try:
                children = psutil.Process(self.launcher.pid).children(recursive=True)
            except psutil.NoSuchProcess:
                return
            for child in children:
                try:
                    if os.getsid(child.pid) != child.pid:
                        continue
                    status = Path(f"/proc/{child.pid}/status").read_text()
                except OSError:
                    continue
                kib = {ln.split(":")[0]: int(ln.split()[1]) for ln in status.splitlines()
                       if ln.startswith(("VmHWM:", "RssAnon:"))}  # fmt: skip
                self.peaks[child.pid] = max(self.peaks.get(child.pid, 0), kib.get("VmHWM", 0) * 1024)
                self.private[child.pid] = max(self.private.get(child.pid, 0), kib.get("RssAnon", 0) * 1024)
            self._stop.wait(0.2)

    def stop(self) -> dict[int, int]:
        self._stop.set()
        self._thread.join(timeout=5)
        return self.peaks


def _wait(procs: list[subprocess.Popen], logs: list[Path], timeout: float = 600) -> None:
    try:
        for proc in procs:
            proc.wait(timeout=timeout)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for proc, log in zip(procs, logs, strict=True):
        assert proc.returncode == 0, log.read_text()[-4000:]


def _records(*logs: Path, msg: str) -> list[dict]:
    """The JSON log records with message ``msg`` (every rank's records carry its ``rank``)."""
    out = []
    for log in logs:
        for line in log.read_text().splitlines():
            if line.startswith("{") and f'"msg": "{msg}' in line:
                out.append(json.loads(line))
    return out


def _frames_by_rank(*logs: Path) -> dict[int, list[int]]:
    return {r["rank"]: r["frames"] for r in _records(*logs, msg="story: this rank draws frames")}


def _assert_written_once(world: JobWorld, name: str) -> set[str]:
    keys = set(world.store(name).list())
    assert {f"images/{i:02d}.png" for i in range(1, 9)} | {"_SUCCESS", "report.json"} <= keys
    # logs/: TensorBoard's event files grow and go up again with every checkpoint (a killed job keeps its curves)
    assert {k: v for k, v in world.write_counts(name).items() if not k.startswith("logs/")} == {
        k: 1 for k in keys if k != "status.json" and not k.startswith(("_claim/", "logs/"))}  # fmt: skip
    assert any(k.startswith("logs/tensorboard/events.out.tfevents.") for k in keys)
    assert json.loads(world.store(name).read_bytes("status.json"))["state"] == "succeeded"
    return keys


def test_whole_job_on_two_ranks_splits_the_story_and_writes_once(job_world: JobWorld, tmp_path: Path) -> None:
    """``torchrun --nproc_per_node=2 -m kolors_job run``: both ranks train one LoRA, each draws half of the
    frames, rank 0 alone uploads — every object is written exactly once — and the output matches a
    1-process run with the same effective batch (frames to 2/255, the LoRA to the tolerance above): the session's
    shared tiny job (``tiny_s3_job``, tests/scenarios.py), whose manifest this is with batch 1 per rank."""
    import io

    import numpy as np
    from PIL import Image
    from safetensors.torch import load

    w = job_world
    one = w.tiny
    assert one.doc["spec"]["train"]["batch_size"] == 2 and one.returncode == 0, one.log.decode(errors="replace")[-3000:]
    log = tmp_path / "torchrun.log"
    proc = w.launch(["--standalone", "--nproc_per_node=2"], w.manifest_file("ddp", 1), tmp_path / "work", log)
    rss = PeakRss(proc)
    _wait([proc], [log])
    # Each rank's own host peak (k8s sizes a pod's memory as ranks x HOST_MEMORY_PER_RANK_GIB + base + shm).
    peaks = rss.stop()
    print("\nper-rank peak RSS (2-rank CPU run, tiny model): "
          + ", ".join(f"pid {r}: {b / 2**20:.0f} MiB ({rss.private[r] / 2**20:.0f} MiB private)"
                      for r, b in sorted(peaks.items())))
    assert len(peaks) == 2 and set(peaks) == set(rss.private), peaks
    assert all(0 < b < pod.HOST_MEMORY_PER_RANK_GIB * 2**30 for b in peaks.values()), peaks
    assert all(0 < rss.private[r] <= peaks[r] for r in peaks), (rss.private, peaks)

    keys = _assert_written_once(w, "ddp")
    rank1_rng = {f"checkpoints/step-{n}/random_states_1.pkl" for n in (2, 4)}  # resumes rank 1 bitwise
    # event file names carry the time and the host; everything else is the same set of objects
    assert {k.replace("ddp_", f"{one.name}_") for k in keys - rank1_rng if not k.startswith("logs/")} == {
        k for k in one.objects if not k.startswith("logs/")}  # fmt: skip
    assert _frames_by_rank(log) == {0: [1, 2, 3, 4], 1: [5, 6, 7, 8]}
    trained = {r["rank"]: r["lora_sha256"] for r in _records(log, msg="trained")}
    assert set(trained) == {0, 1} and trained[0] == trained[1]  # identical weights on both ranks
    steps = [r for r in _records(log, msg="step") if r["step"] == 1]
    assert len(steps) == 2 and steps[0]["loss"] == steps[1]["loss"]  # the mean over ranks, on each

    ddp, single = w.store("ddp"), one.objects
    # rank 0 drew the validation frames while rank 1 waited at the broadcast
    points = [json.loads(report)["validation"] for report in (ddp.read_bytes("report.json"), single["report.json"])]
    assert [p["step"] for p in points[0]] == [p["step"] for p in points[1]] == [2, 4]
    assert [r["step"] for r in _records(log, msg="validation")] == [2, 4]
    for i in range(1, 9):  # the same pictures as one process
        a, b = (np.asarray(Image.open(io.BytesIO(data)), dtype=np.int16)
                for data in (ddp.read_bytes(f"images/{i:02d}.png"), single[f"images/{i:02d}.png"]))
        assert np.abs(a - b).max() <= 2, i
    lora = "lora/pytorch_lora_weights.safetensors"
    a, b = load(ddp.read_bytes(lora)), load(single[lora])
    assert a.keys() == b.keys()
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst < 2e-3, worst
    moved = max(float(b[k].abs().max()) for k in b if "lora_B" in k or ".lora.up." in k)
    assert moved > 10 * worst  # the tolerance is far below what training moved


def test_whole_job_on_two_nodes_sharing_one_volume(job_world: JobWorld, tmp_path: Path) -> None:
    """Two torchrun launchers (``--nnodes=2``, one process each, as a Kubeflow PyTorchJob runs them) whose
    work dir is one shared volume (the ReadWriteMany cache PVC): each node keeps its own LoRA copy and
    checkpoints under ``node-N/``, draws its half, and only node 0 writes the output, once per object."""
    import socket

    w = job_world
    manifest = w.manifest_file("nodes", 1)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    logs = [tmp_path / f"node{n}.log" for n in (0, 1)]
    procs = [
        w.launch(["--nnodes=2", "--nproc_per_node=1", f"--node_rank={n}", "--master_addr=127.0.0.1",
                  f"--master_port={port}"], manifest, tmp_path / "shared", logs[n])
        for n in (0, 1)
    ]
    _wait(procs, logs)
    _assert_written_once(w, "nodes")
    assert _frames_by_rank(*logs) == {0: [1, 2, 3, 4], 1: [5, 6, 7, 8]}
    (group,) = (tmp_path / "shared" / "nodes").iterdir()  # this torchrun group's scratch: one per run
    names = sorted(p.name for p in group.iterdir())
    owners = [n for n in names if n.startswith(".owner-")]
    assert group.name.startswith("ddp-") and [n for n in names if n not in owners] == ["node-0", "node-1"]
    assert len(owners) == 2  # one record per rank: a later run removes this scratch once both processes are gone
    node1 = group / "node-1"
    assert {p.name for p in (node1 / "train" / "checkpoints").iterdir()} == {"step-2", "step-4"}
    # node 1 trained the very same LoRA: its own export is byte-identical to the one node 0 published
    assert (node1 / "lora" / LORA_WEIGHT_NAME).read_bytes() == w.store("nodes").read_bytes(f"lora/{LORA_WEIGHT_NAME}")
    assert sorted(p.name for p in (node1 / "images").glob("*.png")) == [f"{i:02d}.png" for i in range(5, 9)]
    assert not (node1 / "report.json").exists()



def test_sigterm_to_torchrun_checkpoints_exits_75_and_the_rerun_resumes(job_world: JobWorld, tmp_path: Path) -> None:
    """What a preempted PyTorchJob pod goes through: SIGTERM reaches torchrun mid-training, both ranks agree
    to stop at one step, checkpoint, and the launcher exits 75 — each rank within the window torchrun now
    derives from the grace period (not its 30 s default); the rerun resumes from that checkpoint (both
    ranks load it from the node's copy) and finishes the job."""
    import datetime
    import signal
    import time

    from kolors_job.launch.torchrun import DEFAULT_GRACE_SECONDS, shutdown_timeout

    w = job_world
    manifest = w.manifest_file("preempted", 1, steps=20)
    args = ["--standalone", "--nproc_per_node=2"]
    first_log = tmp_path / "first.log"
    proc = w.launch(args, manifest, tmp_path / "work", first_log)
    try:
        deadline = time.monotonic() + 300
        while not _records(first_log, msg="step") and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert proc.poll() is None, first_log.read_text()[-4000:]
        sent = time.time()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=300)
        exited = time.time() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 75, first_log.read_text()[-4000:]
    stopped = _records(first_log, msg="stopping at step")
    took = {r["rank"]: datetime.datetime.fromisoformat(r["ts"].replace("Z", "+00:00")).timestamp() - sent
            for r in stopped}
    print(f"\nSIGTERM -> checkpoint saved: {', '.join(f'rank {r}: {s:.2f} s' for r, s in sorted(took.items()))}; "
          f"launcher exited after {exited:.2f} s (grace {DEFAULT_GRACE_SECONDS} s, "
          f"torchrun shutdown timeout {shutdown_timeout(DEFAULT_GRACE_SECONDS)} s)")
    assert set(took) == {0, 1}, first_log.read_text()[-4000:]
    assert all(s < shutdown_timeout(DEFAULT_GRACE_SECONDS) for s in took.values()) and exited < DEFAULT_GRACE_SECONDS
    status = json.loads(w.store("preempted").read_bytes("status.json"))
    assert status["state"] == "interrupted" and status["exit_code"] == 75
    saved = sorted(int(k.split("/")[1].removeprefix("step-")) for k in w.store("preempted").list("checkpoints/")
                   if k.endswith("/COMPLETE"))
    assert saved and saved[-1] < 20

    second_log = tmp_path / "second.log"
    _wait([w.launch(args, manifest, tmp_path / "work", second_log)], [second_log])
    resumed = _records(second_log, msg=f"train: resuming from checkpoints/step-{saved[-1]}")
    assert {r["rank"] for r in resumed} == {0, 1}
    first_step = min(r["step"] for r in _records(second_log, msg="step"))
    assert first_step == saved[-1] + 1  # nothing retrained
    assert json.loads(w.store("preempted").read_bytes("status.json"))["state"] == "succeeded"
    assert json.loads(w.store("preempted").read_bytes("_state/train.json"))["steps"] == 20


def test_log_lines_carry_the_rank_only_under_ddp(monkeypatch: pytest.MonkeyPatch) -> None:
    import logging

    from kolors_job.core.log import JsonFormatter, TextFormatter

    record = logging.LogRecord("kolors_job.train.loop", logging.INFO, __file__, 1, "step", None, None)
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    assert "rank" not in json.loads(JsonFormatter().format(record))
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    assert json.loads(JsonFormatter().format(record))["rank"] == 3
    assert " train[3]: step" in TextFormatter().format(record)
