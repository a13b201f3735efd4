"""Job subprocesses that start warm: a fork server that has imported torch once, for the whole test session.

Why: every ``python -m kolors_job`` the suite starts paid ~6 CPU-s of imports before its first step (torch and
the compiler and distributed modules diffusers pulls in: about two thirds of it), and the suite starts dozens
of them, because their subject is a process (a signal, a race between runs, a fresh interpreter). Here a
server process imports the torch family once; each job is a fork of it that then runs ``kolors_job`` as
``python -m`` would. What a job reads from its environment at import (the hub clients' endpoints, diffusers,
transformers, the SDKs, kolors_job itself) is *not* imported in the server, so each fork imports those afresh
under its own environment; a job whose environment differs from the server's in anything the preloaded
modules read at import (``TORCH*``, ``OMP_*``, ``PYTHON*``, locale, …) starts cold, as before.

The fork is a real child of the test process, so ``Popen``'s pid, ``wait``, ``poll``, signals (SIGSTOP and
SIGKILL too) and exit statuses are what they would be: the server forks twice and the intermediate exits, and
the test process is a child subreaper (``prctl(PR_SET_CHILD_SUBREAPER)``), so the orphaned job is re-parented
to it. ``subprocess.Popen`` is patched at one place (``_execute_child``) for argv ``[sys.executable, "-m",
"kolors_job[.…]", …]`` with no ``preexec_fn``/``pass_fds``/uid changes; everything else runs exactly as before.

A torchrun launcher (``python -m kolors_job.launch.torchrun``) started warm starts its workers (``python -u -m
kolors_job``) warm too: before torchrun runs, the launcher forks a copy of itself that serves its workers as the
session's server serves the test process, and is itself their child subreaper, so torchrun's ``Popen``s, its
signals to them and their exit codes are what they would be.

``KOLORS_TEST_COLD=1`` turns it off (every job process starts cold).
"""

from __future__ import annotations

import ctypes
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PRELOAD_PACKAGES = frozenset({
    "torch", "torchvision", "torchgen", "functorch", "triton", "numpy", "PIL", "sympy", "mpmath", "networkx",
    "safetensors", "jinja2", "markupsafe", "yaml", "pydantic", "pydantic_core", "annotated_types",
    "typing_inspection", "typing_extensions", "regex", "filelock", "fsspec", "packaging", "dateutil", "six",
})  # fmt: skip
"""Top-level packages the server imports: none reads an environment variable at import that a test varies
(``_SAME_ENV`` lists what they do read; a job that changes one starts cold). The hub clients, diffusers,
transformers, peft, accelerate, the storage SDKs, tqdm, rich and kolors_job are left to each job."""

_SAME_ENV = ("PYTHON", "TORCH", "PYTORCH", "TRITON", "OMP_", "MKL_", "KMP_", "CUDA", "NVIDIA", "LC_", "LANG",
             "NUMPY", "NPY_", "OPENBLAS", "SYMPY", "NETWORKX", "FSSPEC", "TMPDIR", "TEMP", "TMP", "USER", "LOGNAME")  # fmt: skip
"""Environment prefixes a warm job must share with the server: read at import by the preloaded modules (torch's
compile settings, thread pools, the temporary directory and user name torch's debug directory is made of, …) or
by the interpreter's own start-up."""

_READ_LATER = frozenset({"TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR", "PYTHONUNBUFFERED", "PYTHONPATH",
                         "TORCH_NCCL_ASYNC_ERROR_HANDLING"})  # fmt: skip
_READ_LATER_PREFIXES = ("TORCHELASTIC_",)
"""Of those, read only when used (the compile caches; what torchrun tells its workers: run id, restart count,
error file, …) or applied to the job here: its streams (``-u``), its ``sys.path`` (``PYTHONPATH``, where it
shadows no preloaded module)."""

LAUNCHERS = frozenset({"kolors_job.launch.torchrun"})
"""Modules whose warm process serves its own workers (``python -u -m …``) warm."""

_TOPS = PRELOAD_PACKAGES | sys.stdlib_module_names
"""The top-level names the server may have imported."""

_PR_SET_CHILD_SUBREAPER = 36
_MAX_MESSAGE = 1 << 20


def _subreaper_refusal() -> str:
    """Make this process the child subreaper of what it starts (orphans re-parent to it); why not, if it cannot."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        return os.strerror(ctypes.get_errno())
    return ""


def _env_key(env: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in env.items()
            if k.startswith(_SAME_ENV) and k not in _READ_LATER and not k.startswith(_READ_LATER_PREFIXES)}


def _pythonpath(env: dict[str, str], cwd: str) -> list[str]:
    """``PYTHONPATH``'s entries as the interpreter puts them on ``sys.path`` (relative ones against cwd)."""
    return [os.path.join(cwd, p) for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]


def _shadows_preloaded(entries: list[str]) -> bool:
    """Whether a directory the job puts first on ``sys.path`` holds a module the server already imported from
    elsewhere (a fresh interpreter would import that one instead)."""
    for entry in entries:
        try:
            names = os.listdir(entry)
        except OSError:
            continue
        if any(name.removesuffix(".py") in _TOPS for name in names):
            return True
    return False


# ---------------------------------------------------------------- the server (a process of its own) ---------


def _discover_modules() -> list[str]:
    """The modules ``import kolors_job.runner`` loads from ``PRELOAD_PACKAGES`` and the standard library, in
    import order, found in a throwaway child so that the server itself never imports the rest."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        os.close(read)
        os.dup2(os.open(os.devnull, os.O_WRONLY), 2)  # its import warnings are each job's to print
        try:
            import kolors_job.runner  # noqa: F401

            names = [m for m in sys.modules if m.split(".")[0] in _TOPS]
            os.write(write, json.dumps(names).encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as f:
        data = f.read()
    os.waitpid(pid, 0)
    return json.loads(data) if data else []


def _serve(sock: socket.socket) -> dict:
    """Imports, then answers one request per job: forks it, sends back its pid; returns its request in the job
    only."""
    import gc
    import importlib

    for name in _discover_modules():
        try:
            importlib.import_module(name)
        except Exception:  # a module that fails here fails the same way in the job
            pass
    # what every job inherits, out of the collector's sight: a job's collections neither walk it nor, by writing
    # to each object's header, copy the server's pages into the job (the use gc.freeze's documentation gives)
    gc.collect()
    gc.freeze()
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
        if not message:
            sys.exit(0)  # the test session ended
        request = json.loads(message)
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

    sys.stdin = sys.__stdin__ = stream(0, "r", errors, False)
    sys.stdout = sys.__stdout__ = stream(1, "w", errors, os.isatty(1))
    sys.stderr = sys.__stderr__ = stream(2, "w", "backslashreplace", True)
    if "tempfile" in sys.modules:
        sys.modules["tempfile"].tempdir = None  # found again from the job's TMPDIR at first use, as in a fresh one
    if "numpy" in sys.modules:
        sys.modules["numpy"].random.seed()  # a fresh process's global generator is seeded from the OS
    while os.getppid() == middle:  # it exits at once: from its first line, the job's parent is the Popen caller's
        time.sleep(0.0005)
    return request


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
    WarmStarter(tuple(request["modules"])).adopt(ours, _env_key(dict(os.environ)))
    return None


def _server_main() -> None:
    sock = socket.socket(fileno=int(sys.argv[2]))
    request = _serve(sock)
    if request["argv"][2] in LAUNCHERS:
        request = _serve_workers(request) or request  # in a worker of that launcher: the worker's
    argv, cwd = request["argv"], request["cwd"]
    # Now the job, at the top of the stack, as ``python -m kolors_job …`` runs: the interpreter's normal exit
    # (atexit, thread joins, stream flushes) follows whatever kolors_job's __main__ raises.
    import runpy

    sys.path[0:1] = [cwd, *_pythonpath(dict(os.environ), cwd)]
    sys.argv = ["-m", *argv[3:]]
    runpy.run_module(argv[2], run_name="__main__", alter_sys=True)


# ---------------------------------------------------------------- the test process's side ---------------------


class WarmStarter:
    """The test session's handle on the server: patches ``Popen`` (``install``), starts the server at the first
    job (a session that starts none pays nothing), stops it (``uninstall``)."""

    def __init__(self, modules: tuple[str, ...] = ("kolors_job",)) -> None:
        self.modules = modules
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._server: subprocess.Popen | None = None
        self._env: dict[str, str] = {}
        self._cold = subprocess.Popen._execute_child
        self.installed = False
        self.warm = self.cold = 0
        self.differed: set[str] = set()
        self.failure = ""
        """Why the server is not (or no longer) there: every job starts cold once it is set."""

    def install(self) -> None:
        starter = self
        self.installed = True

        def _execute_child(popen, args, executable, preexec_fn, close_fds, pass_fds, cwd, env, startupinfo,
                           creationflags, shell, p2cread, p2cwrite, c2pread, c2pwrite, errread, errwrite,
                           restore_signals, gid, gids, uid, umask, start_new_session, process_group):  # fmt: skip
            every = (args, executable, preexec_fn, close_fds, pass_fds, cwd, env, startupinfo, creationflags, shell,
                     p2cread, p2cwrite, c2pread, c2pwrite, errread, errwrite, restore_signals, gid, gids, uid,
                     umask, start_new_session, process_group)  # fmt: skip
            request = starter._request(args, executable, preexec_fn, pass_fds, cwd, env, shell, gid, gids, uid,
                                       umask, start_new_session, process_group)  # fmt: skip
            if request is None:
                return starter._cold(popen, *every)
            fds = [fd if fd != -1 else default for fd, default in ((p2cread, 0), (c2pwrite, 1), (errwrite, 2))]
            pid = starter._fork(request, fds)
            if pid is None:
                starter.cold += 1
                return starter._cold(popen, *every)
            popen.pid, popen._child_created = pid, True
            popen._close_pipe_fds(p2cread, p2cwrite, c2pread, c2pwrite, errread, errwrite)
            starter.warm += 1
            return None

        subprocess.Popen._execute_child = _execute_child

    def adopt(self, sock: socket.socket, env: dict[str, str]) -> None:
        """Install, with a server already running behind ``sock`` whose import-time environment is ``env``."""
        self._sock, self._env = sock, env
        self.install()

    def uninstall(self) -> None:
        subprocess.Popen._execute_child = self._cold
        self.installed = False
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None
            if self._server is not None:
                self._server.wait(timeout=30)

    def _request(self, args, executable, preexec_fn, pass_fds, cwd, env, shell, gid, gids, uid, umask,
                 start_new_session, process_group) -> dict | None:  # fmt: skip
        """What the server needs to start this job warm; None for any other command, or a job that must start
        cold (an interpreter flag, a ``preexec_fn``, passed descriptors, another user, an import-time setting
        the server does not share, a missing cwd: the cold path raises what ``Popen`` raises)."""
        if shell or executable is not None or preexec_fn is not None or pass_fds or gid is not None:
            return None
        if gids is not None or uid is not None or not isinstance(args, list | tuple):
            return None
        argv = [os.fsdecode(a) for a in args]
        unbuffered = argv[1:2] == ["-u"]  # torchrun starts its workers so
        if unbuffered:
            del argv[1]
        if len(argv) < 3 or argv[:2] != [sys.executable, "-m"]:
            return None
        if not any(argv[2] == m or argv[2].startswith(m + ".") for m in self.modules):
            return None
        env = dict(os.environ if env is None else env)
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in env.items()):
            return None
        cwd = os.path.abspath(os.fsdecode(cwd) if cwd is not None else os.getcwd())
        if not os.path.isdir(cwd) or _shadows_preloaded([cwd, *_pythonpath(env, cwd)]):
            return None
        return {"argv": argv, "cwd": cwd, "env": env, "umask": umask, "new_session": bool(start_new_session),
                "process_group": process_group, "unbuffered": unbuffered, "modules": self.modules}  # fmt: skip

    def _fork(self, request: dict, fds: list[int]) -> int | None:
        """The job's pid, forked by the server; None where it must start cold."""
        with self._lock:
            if self._sock is None and not self.failure:
                self._start()
            if self._sock is None:
                return None
            theirs = _env_key(request["env"])
            if theirs != self._env:
                self.differed.update(k for k in theirs.keys() | self._env.keys() if theirs.get(k) != self._env.get(k))
                return None
            try:
                socket.send_fds(self._sock, [json.dumps(request).encode()], fds)
                return int(self._sock.recv(64))
            except (OSError, ValueError) as e:  # the server is gone: every later job starts cold
                self.failure = f"the fork server stopped answering ({e!r})"
                self._sock.close()
                self._sock = None
                return None

    def _start(self) -> None:
        if refusal := _subreaper_refusal():
            self.failure = f"this process cannot be a child subreaper ({refusal})"
            return
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._env = _env_key(dict(os.environ))
        # its own output goes nowhere: it starts inside some test, whose captured stderr it would otherwise keep
        self._server = subprocess.Popen([sys.executable, __file__, "serve", str(theirs.fileno())],
                                        pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)  # fmt: skip
        theirs.close()
        ready = json.loads(ours.recv(_MAX_MESSAGE) or b'{"ready": false, "threads": null}')
        if not ready["ready"]:
            self.failure = f"the fork server did not start (threads after its imports: {ready['threads']})"
            ours.close()
            self._server.wait()
            return
        self._sock = ours


if __name__ == "__main__" and sys.argv[1:2] == ["serve"]:
    sys.path[0] = str(ROOT)  # kolors_job for the discovery child, as the test process finds it
    _server_main()
