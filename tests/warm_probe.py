"""What a process run as ``python -m tests.warm_probe CODE|wait|raise|exit [libraries]`` sees of its own start, as one
JSON line on stdout (tests/test_warm_start.py compares a warm start with a cold one)."""

import gc
import json
import os
import signal
import sys

preloaded = "huggingface_hub" in sys.modules  # a job started from a layer finds its libraries imported

import huggingface_hub.constants  # noqa: E402 - reads HF_ENDPOINT at import: the job's, not a layer's

libraries = {}
if sys.argv[2:3] == ["libraries"]:  # what libraries keep at import of the process's state, as the job sees it
    import rich
    import transformers.utils.logging as transformers_logging

    handler = transformers_logging._default_handler
    libraries = {
        "rich_cwd": rich._IMPORT_CWD,  # the working directory at import
        "handler_stderr": handler.stream is sys.stderr,  # the handler made at import writes to the job's stderr
        "handler_flush": handler.flush == sys.stderr.flush,
    }

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
    "preloaded": preloaded,  # and, from a layer, its libraries' (frozen too)
    **libraries,
}), flush=True)  # fmt: skip
if sys.argv[1] == "wait":
    signal.pause()
if sys.argv[1] == "raise":
    raise RuntimeError("the probe was asked to fail")
if sys.argv[1] == "exit":  # what the interpreter's exit runs: the thread joined first, then atexit's functions
    import atexit
    import threading
    import time

    atexit.register(print, "atexit ran")
    threading.Thread(target=lambda: (time.sleep(0.3), print("thread ran"))).start()
    sys.exit("the probe exits with a message")
sys.exit(int(sys.argv[1]))
