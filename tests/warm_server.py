"""The warm starter's server side (tests/warm_start.py has the why): the fork server, its layers, and what a job
forked from them sets up to be what a fresh ``python -m`` would be. Run as ``python tests/warm_server.py serve FD``.
"""

from __future__ import annotations

import io
import json
import os
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

from warm_start import (  # type: ignore[import-not-found]  # run as a script: tests/ is sys.path[0]
    _MAX_MESSAGE,
    _TOPS,
    LAUNCHERS,
    ROOT,
    STARTS_BY_SETTING_TRANSPORT,
    WarmStarter,
    _agrees,
    _env_key,
    _pythonpath,
    _subreaper_refusal,
)

_ITERATED_AT_IMPORT = {"diffusers/utils/import_utils.py": "COLAB_"}
"""Where a layer's libraries iterate over the environment at import, and the prefix they look for (read in the
source: diffusers' ``_is_google_colab = … any(k.startswith("COLAB_") for k in os.environ)``): a layer keys on
the variables with that prefix. A layer whose imports iterate anywhere else is refused."""

_CWD_AT_IMPORT = {
    "rich/__init__.py": ("rich", "_IMPORT_CWD", lambda: os.path.abspath(os.getcwd())),
    "transformers/utils/auto_docstring.py": ("transformers.utils.auto_docstring", "PATH_TO_TRANSFORMERS",
                                             lambda: Path("src").resolve() / "transformers"),
}  # fmt: skip
"""Where a layer's libraries read the working directory at import, and the module attribute each keeps it in, as
its source computes it: a job forked from a layer recomputes them in its own directory. A layer whose imports
read it anywhere else is refused."""

_LAYER: dict | None = None
"""In a layer (and every job forked from it): what its imports read (``keys``, ``prefixes``, ``cwd``) and the
top-level names it imported (``tops``)."""

_LIBRARIES: list[str] = []
"""In the server: the modules a layer imports (what ``import kolors_job.runner`` loads besides the server's own
and kolors_job's), in import order."""


# ---------------------------------------------------------------- the server (a process of its own) ---------


def _discover_modules() -> tuple[list[str], list[str]]:
    """The modules ``import kolors_job.runner`` loads from ``PRELOAD_PACKAGES`` and the standard library, and
    the other libraries it loads (a layer's), in import order, found in a throwaway child so that the server
    itself never imports the rest."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        os.close(read)
        os.dup2(os.open(os.devnull, os.O_WRONLY), 2)  # its import warnings are each job's to print
        import gc

        gc.disable()  # what it imports lives until it exits: the collector would walk it for nothing
        try:
            before = set(sys.modules)  # the server's own: the standard library it runs on
            import kolors_job.runner  # noqa: F401

            tops = {m: m.split(".")[0] for m in sys.modules}
            names = [m for m, top in tops.items() if top in _TOPS]
            others = [m for m, top in tops.items() if top not in _TOPS | {"kolors_job"} and m not in before]
            os.write(write, json.dumps([names, others]).encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as f:
        data = f.read()
    os.waitpid(pid, 0)
    return tuple(json.loads(data)) if data else ([], [])  # type: ignore[return-value]


def _serve(sock: socket.socket) -> dict:
    """Imports, then answers one request per job: forks it, sends back its pid; returns its request in the job
    only."""
    names, _LIBRARIES[:] = _discover_modules()
    _import_frozen(names)
    threads = len(os.listdir("/proc/self/task"))
    sock.send(json.dumps({"ready": threads == 1, "threads": threads}).encode())
    if threads != 1:
        sys.exit(1)  # forking a process with threads would copy their locks, held
    return _answer(sock)


def _answer(sock: socket.socket) -> dict:
    """The server's loop: one fork per request, until the other side closes."""
    while True:
        try:
            message, fds, _, _ = socket.recv_fds(sock, _MAX_MESSAGE, 3)
        except ConnectionError:
            message = b""
        if not message:  # the test session ended, or the layer was closed
            os._exit(0)  # what the imports registered to run at exit is each job's to run, not a template's
        request = json.loads(message)
        _reap_layers()
        if request.get("layer"):
            layer = os.fork()
            if layer == 0:
                sock.close()
                return _become_layer(request["env"], socket.socket(fileno=fds[0]))
            for fd in fds:
                os.close(fd)
            sock.send(str(layer).encode())
            continue
        read, write = os.pipe()
        middle = os.fork()
        if middle == 0:
            middle = os.getpid()  # not the job's getppid(): by then it may be the subreaper already
            job = os.fork()
            if job == 0:
                os.close(read)
                os.close(write)
                sock.close()
                return _become_job(request, fds, middle)
            os.write(write, str(job).encode())
            os._exit(0)
        os.close(write)
        for fd in fds:
            os.close(fd)
        with os.fdopen(read, "rb") as f:
            job_pid = int(f.read())
        os.waitpid(middle, 0)  # once the middle process is gone, the job is the test process's child
        sock.send(str(job_pid).encode())


def _import_frozen(names: list[str]) -> None:
    """Imports ``names`` with the collector off, as the job's own CLI does (kolors_job.cli._imports_frozen): all of
    it lives for every job forked after. One that fails here fails the same way in the job, which then imports it
    itself. Then one collection and ``gc.freeze()``: what every job inherits is out of the collector's sight, so a
    job's collections neither walk it nor, by writing to each object's header, copy the server's pages into the
    job (the use gc.freeze's documentation gives)."""
    import gc
    import importlib

    gc.disable()
    for name in names:
        try:
            importlib.import_module(name)
        except Exception:
            pass
    gc.collect()
    gc.freeze()
    gc.enable()


def _reap_layers() -> None:
    """Layers this server forked that have since been closed (a job's middle process is waited for at once)."""
    while True:
        try:
            if os.waitpid(-1, os.WNOHANG)[0] == 0:
                return
        except ChildProcessError:
            return


def _caller(skip: tuple[str, ...]) -> str:
    """The file of the nearest frame outside ``skip`` (the standard library's plumbing between it and us)."""
    frame = sys._getframe(2)
    while frame is not None and frame.f_code.co_filename.endswith(skip):
        frame = frame.f_back
    return frame.f_code.co_filename if frame is not None else "?"


def _site(filename: str, sites: dict) -> str | None:
    return next((site for site in sites if filename.endswith("/" + site)), None)


def _become_layer(env: dict[str, str], sock: socket.socket) -> dict:
    """A layer: this server's copy that imports the libraries under one job's environment, noting what of the
    environment and the working directory they read, then serves the jobs that agree with it on all of that
    (their libraries preloaded, as they would have imported them). Returns a job's request in each job."""

    global _LAYER
    before = set(sys.modules)
    os.environ.clear()
    os.environ.update(env)
    keys: set[str] = set()
    iterated: set[str] = set()
    cwd_read: set[str] = set()
    plumbing = ("/os.py", "<frozen os>", "_collections_abc.py", "<frozen _collections_abc>")

    class Recording(type(os.environ)):  # type: ignore[misc]
        def __getitem__(self, key):
            keys.add(key)
            return super().__getitem__(key)

        def __contains__(self, key):
            keys.add(key)
            return super().__contains__(key)

        def __iter__(self):
            iterated.add(_caller(plumbing))
            return super().__iter__()

        def __len__(self):
            iterated.add(_caller(plumbing))
            return super().__len__()

    getcwd, environ_class = os.getcwd, type(os.environ)

    def recording_getcwd() -> str:
        cwd_read.add(_caller(("<frozen posixpath>", "posixpath.py", "pathlib.py")))
        return getcwd()

    os.environ.__class__, os.getcwd = Recording, recording_getcwd
    try:
        _import_frozen(_LIBRARIES)
    finally:
        os.environ.__class__, os.getcwd = environ_class, getcwd
    prefixes = {_ITERATED_AT_IMPORT[s] for f in iterated if (s := _site(f, _ITERATED_AT_IMPORT))}
    unknown = sorted({f for f in iterated if not _site(f, _ITERATED_AT_IMPORT)}
                     | {f for f in cwd_read if not _site(f, _CWD_AT_IMPORT)})  # fmt: skip
    _LAYER = {
        "keys": {k: env.get(k) for k in sorted(keys)},
        "prefixes": {p: {k: v for k, v in env.items() if k.startswith(p)} for p in sorted(prefixes)},
        "cwd": sorted({s for f in cwd_read if (s := _site(f, _CWD_AT_IMPORT))}),
        "tops": sorted({m.split(".")[0] for m in sys.modules if m not in before}),
    }
    threads = len(os.listdir("/proc/self/task"))
    why = (f"its imports read the environment or the working directory at {', '.join(unknown)}" if unknown
           else f"{threads} threads after its imports" if threads != 1 else "")  # fmt: skip
    sock.send(json.dumps({"why": why, **_LAYER}).encode())
    if why:
        os._exit(1)
    return _answer(sock)


def _become_job(request: dict, fds: list[int], middle: int) -> dict:
    """In the job: the process state a fresh ``python -m kolors_job`` would have; returns the request."""
    if request["new_session"]:
        os.setsid()
    elif request["process_group"] >= 0:
        os.setpgid(0, request["process_group"])
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
    os.closerange(3, os.sysconf("SC_OPEN_MAX"))
    if request["umask"] >= 0:
        os.umask(request["umask"])
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    # the standard streams as the interpreter makes them at start-up, on the job's descriptors
    encoding, errors = sys.stdout.encoding, sys.stdout.errors
    unbuffered = bool(request["env"].get("PYTHONUNBUFFERED")) or request["unbuffered"]

    def stream(fd: int, mode: str, errors: str, line_buffering: bool) -> io.TextIOWrapper:
        raw = io.FileIO(fd, mode, closefd=False)
        if mode == "w" and unbuffered:
            return io.TextIOWrapper(raw, encoding=encoding, errors=errors, write_through=True)  # type: ignore[arg-type]
        buffered = io.BufferedReader(raw) if mode == "r" else io.BufferedWriter(raw)
        return io.TextIOWrapper(buffered, encoding=encoding, errors=errors, line_buffering=line_buffering)

    servers = (sys.stdout, sys.stderr)
    sys.stdin = sys.__stdin__ = stream(0, "r", errors, False)
    sys.stdout = sys.__stdout__ = stream(1, "w", errors, os.isatty(1))
    sys.stderr = sys.__stderr__ = stream(2, "w", "backslashreplace", True)
    _adopt_streams(servers)
    for site in (_LAYER or {}).get("cwd", ()):
        module, attribute, compute = _CWD_AT_IMPORT[site]
        if module in sys.modules:
            setattr(sys.modules[module], attribute, compute())
    if "tempfile" in sys.modules:
        sys.modules["tempfile"].tempdir = None  # found again from the job's TMPDIR at first use, as in a fresh one
    if "numpy" in sys.modules:
        sys.modules["numpy"].random.seed()  # a fresh process's global generator is seeded from the OS
    while os.getppid() == middle:  # it exits at once: from its first line, the job's parent is the Popen caller's
        time.sleep(0.0005)
    return request


def _adopt_streams(servers: tuple) -> None:
    """Handlers made at import hold the stream ``sys.stderr`` was then (transformers' and diffusers' also its
    ``flush``): the job's own, as a fresh process would have made them, not the server's."""
    if "logging" not in sys.modules:
        return
    import logging

    for ref in list(logging._handlerList):  # type: ignore[attr-defined]
        handler = ref()
        if not isinstance(handler, logging.StreamHandler):
            continue
        for old, ours in zip(servers, (sys.stdout, sys.stderr), strict=True):
            if handler.stream is not old:
                continue
            handler.stream = ours
            flush = handler.__dict__.get("flush")
            if flush is not None and getattr(flush, "__self__", None) is old:
                handler.flush = ours.flush
            break


def _serve_workers(request: dict) -> dict | None:
    """In a warm launcher, before it runs (one thread still): a copy of it that forks the launcher's workers,
    the launcher their subreaper and its ``Popen`` patched to ask that copy. Returns a worker's request in each
    worker, None in the launcher."""
    if _subreaper_refusal():
        return None  # its workers start cold
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    if os.fork() == 0:
        ours.close()
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):  # the launcher's streams stay the launcher's: a reader sees their end when it ends
            os.dup2(null, fd)
        return _answer(theirs)
    theirs.close()
    WarmStarter(tuple(request["modules"])).adopt(ours, _env_key(dict(os.environ)), _LAYER, request["restarts_file"])
    return None


def _as_the_module_starts(request: dict) -> None:
    """``python -m kolors_job`` first imports ``kolors_job.cli``, whose first import sets the hub clients'
    environment from the job's settings (their timeouts: ``kolors_job.sources.transport``), which they read when
    imported; then ``run`` sets the compile caches' directories where the environment does not, before the
    stages import the libraries. A job from a layer imports the CLI now; where that changed a variable the
    layer's libraries read at import (a job asking for other timeouts), or ``run`` would set one they read, it
    starts again cold — ``exec``: the same pid, descriptors, directory and session — before anything has run.
    ``python -m bench.gpu`` sets nothing itself; the kolors_job modules it imports set the hub clients' timeouts
    the same way, so it imports those now and is checked alike."""
    if request["argv"][2] not in STARTS_BY_SETTING_TRANSPORT:
        return  # torchrun's launcher (its workers are checked as they start), the probe: they set nothing first
    caches: dict[str, str] = {}
    if request["argv"][2] == "kolors_job":
        from kolors_job.cli import COMPILE_CACHES

        caches = COMPILE_CACHES
    else:  # bench.gpu
        import kolors_job.sources.transport  # noqa: F401

    env = dict(os.environ)
    if not _agrees(_LAYER["keys"], _LAYER["prefixes"], env) or any(
        k in _LAYER["keys"] and k not in env for k in caches
    ):
        argv = [sys.executable, *(["-u"] if request["unbuffered"] else []), *request["argv"][1:]]
        with open(request["restarts_file"], "a") as f:  # counted in the session's summary line
            f.write(f"{' '.join(argv)}\n")
        os.execve(sys.executable, argv, request["env"])


def _server_main() -> None:
    sock = socket.socket(fileno=int(sys.argv[2]))
    request = _serve(sock)
    if request["argv"][2] in LAUNCHERS:
        request = _serve_workers(request) or request  # in a worker of that launcher: the worker's
    argv, cwd = request["argv"], request["cwd"]
    # Now the job, at the top of the stack, as ``python -m kolors_job …`` runs it, then its exit.
    import runpy

    sys.path[0:1] = [cwd, *_pythonpath(dict(os.environ), cwd)]
    if _LAYER is not None:
        _as_the_module_starts(request)
    sys.argv = ["-m", *argv[3:]]
    _exit_after(lambda: runpy.run_module(argv[2], run_name="__main__", alter_sys=True))


def _exit_after(run: Callable[[], object]) -> NoReturn:
    """Runs the job, then exits as the interpreter does after ``-m`` — the traceback or ``SystemExit``'s status,
    non-daemon threads joined, the ``atexit`` functions (logging's shutdown, ``weakref.finalize``'s), the standard
    streams flushed (status 120 if that fails) — but by ``os._exit``, without freeing the heap: freeing every object
    writes the reference counts of all the server's objects the job holds, which copies their pages into it first
    (~50k page faults, ~0.3 of a warm tiny job's ~1.7 CPU-s). Skipped with it: what objects' ``__del__`` would do
    at teardown — a file the job left open and unflushed would lose its last bytes, and a test would see it.
    KeyboardInterrupt is left to the interpreter (it exits by SIGINT)."""
    import atexit

    status = 0
    try:
        run()
    except SystemExit as e:  # the interpreter's rule: None is 0, an int its status, anything else printed, 1
        if e.code is None or isinstance(e.code, int):
            status = e.code or 0
        else:
            print(e.code, file=sys.stderr)
            status = 1
    except KeyboardInterrupt:
        raise
    except BaseException:
        sys.excepthook(*sys.exc_info())
        status = 1
    if "threading" in sys.modules:
        sys.modules["threading"]._shutdown()  # type: ignore[attr-defined]
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # the interpreter's status for a stream it cannot flush
            status = 120
    os._exit(status)


if __name__ == "__main__" and sys.argv[1:2] == ["serve"]:
    sys.path[0] = str(ROOT)  # kolors_job for the discovery child, as the test process finds it
    _server_main()
