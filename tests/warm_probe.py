"""What a process run as ``python -m tests.warm_probe CODE|wait`` sees of its own start, as one JSON line on
stdout (tests/test_warm_start.py compares a warm start with a cold one)."""

import gc
import json
import os
import signal
import sys

import huggingface_hub.constants  # reads HF_ENDPOINT at import: the job's, not the fork server's

print(json.dumps({
    "pid": os.getpid(),
    "parent": os.getppid(),
    "argv": sys.argv,
    "name": __name__,
    "cwd": os.getcwd(),
    "path": sys.path[:2],
    "env": os.environ.get("KOLORS_PROBE"),
    "hf_endpoint": huggingface_hub.constants.ENDPOINT,
    "stdin": sys.stdin.readline().strip(),
    "stdout": [sys.stdout.isatty(), sys.stdout.line_buffering, sys.stdout.write_through, sys.stdout.encoding],
    "stderr": [sys.stderr.line_buffering, sys.stderr.errors],
    "descriptors": len(os.listdir("/proc/self/fd")),  # 0, 1, 2 and the listing's own: nothing of the server's
    "umask": os.umask(0o022),
    "session": os.getsid(0) == os.getpid(),
    "frozen": gc.get_freeze_count() > 0,  # a warm start inherits the server's imports, frozen: its one difference
}), flush=True)  # fmt: skip
if sys.argv[1] == "wait":
    signal.pause()
if sys.argv[1] == "raise":
    raise RuntimeError("the probe was asked to fail")
sys.exit(int(sys.argv[1]))
