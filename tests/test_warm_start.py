"""Job processes the suite starts warm (tests/warm_start.py) are what a cold start makes of them.

The probe (tests/warm_probe.py) reports its own start as the session's warm starter makes it and as a plain
``fork+exec`` does (``executable=`` set: the warm starter passes such a call on untouched); the two must agree
on everything but the pid. Signals, exit statuses and tracebacks reach the test as from a child of its own.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def warm(warm_starter):
    return warm_starter


def _probe(arg: str, tmp_path: Path, cold: bool, **kw) -> subprocess.Popen:
    env = {**os.environ, "KOLORS_PROBE": "probe-env", "HF_ENDPOINT": "http://127.0.0.1:1", "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": str(tmp_path)}  # fmt: skip
    return subprocess.Popen([sys.executable, "-m", "tests.warm_probe", arg], executable=sys.executable if cold else None,
                            cwd=ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, **kw)  # fmt: skip


def test_a_warm_start_sees_what_a_cold_one_sees(warm, tmp_path) -> None:
    seen = {}
    for cold in (True, False):
        before = warm.warm
        proc = _probe("7", tmp_path, cold, start_new_session=True)
        out, err = proc.communicate("to stdin\n", timeout=120)
        assert proc.returncode == 7, err
        assert warm.warm == before + (0 if cold else 1)  # the warm one started warm, the cold one cold
        seen[cold] = json.loads(out)
        assert seen[cold].pop("pid") == proc.pid  # the Popen's pid is the process that ran the module
        assert seen[cold].pop("frozen") is not cold
        assert seen[cold].pop("preloaded") is not cold
    assert seen[False] == seen[True]
    assert seen[False]["parent"] == os.getpid() and seen[False]["session"]
    assert seen[False]["env"] == "probe-env" and seen[False]["hf_endpoint"] == "http://127.0.0.1:1"
    assert seen[False]["path"] == [str(ROOT), str(tmp_path)] and seen[False]["name"] == "__main__"


def test_a_layer_serves_the_jobs_that_share_what_its_imports_read_and_no_other(warm, tmp_path) -> None:
    """A job starts from a layer that imported its libraries under an environment agreeing with the job's on
    every variable those imports read (``HF_ENDPOINT`` here), else from a new layer made with its own; what the
    libraries keep at import of the working directory and of stderr is the job's, as in a cold start."""
    if not warm.layering:
        pytest.skip("KOLORS_TEST_LAYERS=0: no layers")
    work = tmp_path / "work"  # not the server's directory
    work.mkdir()

    def probe(endpoint: str, cold: bool) -> dict:
        env = {**os.environ, "HF_ENDPOINT": endpoint, "PYTHONPATH": str(ROOT), "KOLORS_PROBE": "layer"}
        res = subprocess.run([sys.executable, "-m", "tests.warm_probe", "0", "libraries"], cwd=work, env=env,
                             executable=sys.executable if cold else None, input="", capture_output=True, text=True,
                             timeout=300)  # fmt: skip
        assert res.returncode == 0, res.stderr[-3000:]
        return json.loads(res.stdout)

    # the endpoint of the probes above (tests/warm_probe.py via _probe): its layer may be open already, made in
    # another directory, whose working directory the libraries must not have kept
    first, cold = probe("http://127.0.0.1:1", cold=False), probe("http://127.0.0.1:1", cold=True)
    assert (first.pop("preloaded"), cold.pop("preloaded"), first.pop("frozen"), cold.pop("frozen")) == (
        True, False, True, False)  # fmt: skip
    first.pop("pid"), cold.pop("pid")
    assert first == cold, (first, cold)
    assert first["rich_cwd"] == str(work) and first["handler_stderr"] and first["handler_flush"]
    made = warm.layers_made
    again = probe("http://127.0.0.1:1", cold=False)
    assert again["preloaded"] and warm.layers_made == made  # the same layer
    other = probe("http://127.0.0.1:3", cold=False)
    assert other["preloaded"] and other["hf_endpoint"] == "http://127.0.0.1:3" and warm.layers_made == made + 1
    assert warm.layers[-1].keys["HF_ENDPOINT"] == "http://127.0.0.1:3" and not warm.layer_failure


def test_signals_exit_statuses_and_tracebacks_reach_the_test_as_from_its_own_child(warm, tmp_path) -> None:
    before = warm.warm
    proc = _probe("wait", tmp_path, cold=False)
    proc.stdin.write("\n")
    proc.stdin.flush()
    assert json.loads(proc.stdout.readline())["pid"] == proc.pid
    proc.send_signal(signal.SIGSTOP)
    deadline = time.monotonic() + 30
    while Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "T":
        assert time.monotonic() < deadline, "SIGSTOP did not stop the job"
        time.sleep(0.05)
    proc.send_signal(signal.SIGCONT)
    proc.kill()
    assert proc.wait(timeout=30) == -signal.SIGKILL
    proc.stdin.close(), proc.stdout.close(), proc.stderr.close()

    failed = _probe("raise", tmp_path, cold=False)
    _, err = failed.communicate("", timeout=120)
    assert failed.returncode == 1 and "RuntimeError: the probe was asked to fail" in err.splitlines()[-1], err
    assert err.startswith("Traceback") or "\nTraceback" in err
    assert warm.warm == before + 2


def test_a_warm_job_exits_as_a_cold_one(warm, tmp_path) -> None:
    """A warm job ends by ``os._exit`` without freeing its heap (tests/warm_server.py ``_exit_after``): what the
    interpreter's exit does first is still done, in its order — a running thread joined, then the ``atexit``
    functions, then ``SystemExit``'s message printed and its status."""
    seen = {}
    for cold in (True, False):
        before = warm.warm
        proc = _probe("exit", tmp_path, cold)
        out, err = proc.communicate("\n", timeout=120)
        assert warm.warm == before + (0 if cold else 1)
        seen[cold] = (proc.returncode, out.splitlines()[1:], err.splitlines()[-1:])
    assert seen[False] == seen[True] == (1, ["thread ran", "atexit ran"], ["the probe exits with a message"])


def test_a_warm_torchrun_launcher_starts_its_workers_warm_as_its_own_children(warm, tmp_path) -> None:
    """``python -m kolors_job.launch.torchrun`` started warm forks its workers (``python -u -m …``) from a copy of
    itself: each is the launcher's child (torchrun waits for it and signals it), unbuffered as ``-u`` makes it, and
    its exit code is the launcher's (kolors_job.launch.torchrun)."""
    env = {**os.environ, "KOLORS_PROBE": "worker-env", "HF_ENDPOINT": "http://127.0.0.1:1"}
    before = warm.warm
    launcher = subprocess.Popen([sys.executable, "-m", "kolors_job.launch.torchrun", "--standalone",
                                 "--nproc-per-node=2", "-m", "tests.warm_probe", "7"], cwd=ROOT, env=env,
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    out, err = launcher.communicate(timeout=300)
    assert launcher.returncode == 7, err[-3000:]
    assert warm.warm == before + 1  # the launcher; its workers it started itself
    workers = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert len(workers) == 2, out
    for seen in workers:
        assert seen["frozen"] and seen["parent"] == launcher.pid and seen["session"]  # torchrun: a new session
        assert seen["preloaded"] is (warm.layering and not warm.layer_failure)  # the launcher's layer's libraries
        assert seen["env"] == "worker-env" and seen["hf_endpoint"] == "http://127.0.0.1:1"
        assert seen["stdout"][2] and seen["name"] == "__main__" and seen["path"][0] == str(ROOT)


def test_a_job_asking_for_other_hub_timeouts_starts_from_a_layer_made_with_them(warm, tmp_path) -> None:
    """``kolors_job``'s CLI sets the hub clients' timeouts from the job's settings before a client is imported
    (kolors_job/sources/transport.py), so a job with another ``KOLORS_JOB_STORAGE_READ_TIMEOUT_S`` than the test
    process's starts from a layer whose clients were imported with its timeouts, not from one made with the
    test process's, which it would leave to start again cold (tests/warm_server.py ``_as_the_module_starts``).
    Last in this file: its layer, made for it alone, closes the least recently used one (three are open), which
    a probe test after it would have had to make again."""
    if not warm.layering:
        pytest.skip("KOLORS_TEST_LAYERS=0: no layers")
    from kolors_job.core.settings import Settings
    from kolors_job.sources.transport import client_env

    manifest = tmp_path / "job.yaml"
    manifest.write_text(f"spec: {{output: {{uri: '{tmp_path / 'out'}'}}}}")
    env = {**os.environ, "KOLORS_JOB_STORAGE_READ_TIMEOUT_S": "3", "PYTHONPATH": str(ROOT)}
    want = client_env(Settings(storage_read_timeout_s=3))
    assert any(os.environ.get(k) != v for k, v in want.items())  # the test process runs with other timeouts
    before, restarted = warm.warm, warm.restarted
    res = subprocess.run([sys.executable, "-m", "kolors_job", "validate", str(manifest)], env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    assert warm.warm == before + 1 and warm.restarted == restarted, "it started again cold"
    read = {k: v for k, v in warm.layers[-1].keys.items() if k in want}
    assert read and read == {k: want[k] for k in read}, read  # the layer's clients read the job's timeouts
