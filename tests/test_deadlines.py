"""Storage deadlines: an endpoint that accepts connections and never answers must end in exit 75
within the storage deadline, and within 30 s of SIGTERM, even in the middle of a transfer.

The default settings bound a dead endpoint at ``storage_deadline_s`` (240) + one read timeout (20)
+ one capped backoff (2) = 262 s < 300 s; the tests shrink them to seconds.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest

from kolors_job.core import stop as core_stop
from kolors_job.core.errors import ExitCode, StorageTemporaryError
from kolors_job.core.settings import Settings
from kolors_job.storage import open_store

try:
    from tests.storage_servers.fixtures import pointed
except ModuleNotFoundError:  # tests/ not importable as a package
    from storage_servers.fixtures import pointed
from tests.cli_lines import last_message


@pytest.fixture
def silent_endpoint() -> Iterator[str]:
    """http://127.0.0.1:PORT that accepts every connection, reads nothing and never answers."""
    server = socket.create_server(("127.0.0.1", 0), backlog=128)
    held: list[socket.socket] = []
    done = threading.Event()

    def accept() -> None:
        server.settimeout(0.2)
        while not done.is_set():
            try:
                held.append(server.accept()[0])
            except TimeoutError:
                continue
            except OSError:
                return

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    done.set()
    thread.join()
    for conn in held:
        conn.close()
    server.close()


def _dead_store(scheme: str, endpoint: str, settings: Settings, **overrides: float):
    settings = pointed(settings, scheme, endpoint, **{"storage_max_attempts": 8, "storage_connect_timeout_s": 1.0,
                                                      "storage_read_timeout_s": 1.0, **overrides})
    return open_store(f"{scheme}://kolors-dead/p/", settings)


@pytest.mark.parametrize("scheme", ["s3", "oss"])
def test_a_dead_endpoint_gives_75_within_the_deadline(scheme, silent_endpoint, storage_env):
    store = _dead_store(scheme, silent_endpoint, storage_env, storage_deadline_s=3.0)
    t0 = time.monotonic()
    with pytest.raises(StorageTemporaryError) as err:
        store.write_bytes("k", b"v")
    elapsed = time.monotonic() - t0
    assert err.value.exit_code == ExitCode.TEMPORARY == 75
    # it kept trying until the deadline (8 tries of 1 s would take longer), then gave up:
    # deadline + one read timeout + one capped backoff, plus slack for a busy machine
    assert 2.5 < elapsed < 3.0 + 1.0 + 2.0 + 3.0, elapsed
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("scheme", ["s3", "oss"])
@pytest.mark.parametrize("op", ["write", "multipart upload"])
def test_a_stop_ends_a_hung_transfer_within_one_read_timeout(scheme, op, silent_endpoint, storage_env, tmp_path):
    store = _dead_store(scheme, silent_endpoint, storage_env, storage_deadline_s=600.0,
                        storage_read_timeout_s=2.0)
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(12 * 1024 * 1024))  # over the 8 MiB multipart threshold of storage_env
    timer = threading.Timer(1.0, core_stop.request_stop)
    timer.start()
    t0 = time.monotonic()
    try:
        with pytest.raises(StorageTemporaryError):
            if op == "write":
                store.write_bytes("k", b"v")
            else:
                store.upload_file("big.bin", big)
        # stopped 1 s in; the attempt under way ends at its 2 s read timeout and is not retried
        assert time.monotonic() - t0 < 1.0 + 2.0 + 2.0 + 3.0
        # nothing new is tried once storage failed while stopping (e.g. the status.json write)
        t1 = time.monotonic()
        with pytest.raises(StorageTemporaryError, match="stopping"):
            store.write_bytes("status.json", b"{}")
        assert time.monotonic() - t1 < 0.5
    finally:
        timer.cancel()
        core_stop.clear_stop()


def test_sigterm_while_storage_hangs_exits_75_within_30s(silent_endpoint, tmp_path, shared_cache):
    """The whole CLI, default timeouts: SIGTERM mid-request → exit 75, one line, well under 30 s."""
    from kolors_job.demo import build_demo_dataset, tiny_job

    data = build_demo_dataset(shared_cache / "demo-dataset")
    manifest = tmp_path / "job.json"
    manifest.write_text(json.dumps(tiny_job(data, "s3://kolors-dead/runs/", name="hung")))
    env = {k: v for k, v in os.environ.items() if not k.startswith("KOLORS_JOB_")}
    env.update(KOLORS_JOB_CACHE_DIR=str(shared_cache), KOLORS_JOB_WORK_DIR=str(tmp_path / "work"),
               KOLORS_JOB_LOG_FORMAT="json", KOLORS_JOB_S3_ENDPOINT_URL=silent_endpoint,
               KOLORS_JOB_S3_ADDRESSING_STYLE="path", AWS_ACCESS_KEY_ID="kolors-dead-ak",
               AWS_SECRET_ACCESS_KEY="kolors-dead-secret", PYTHONPATH=os.getcwd(), PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "kolors_job", "run", "--manifest", str(manifest)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines = []
    for line in proc.stderr:  # the job's first log line, then its first storage request hangs
        lines.append(line)
        if '"job hung' in line:
            break
    time.sleep(2.0)
    assert proc.poll() is None, lines
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(timeout=60)
    elapsed = time.monotonic() - t0
    rest = proc.stderr.read()
    assert code == ExitCode.TEMPORARY == 75, rest
    assert elapsed < 30, elapsed
    assert "Traceback" not in rest and last_message(rest).startswith("error: "), rest
