"""Job subprocesses that start warm: a fork server that has imported torch once, for the whole test session, and
layers above it that have imported the job's libraries under the job's environment.

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
to it. ``subprocess.Popen`` is patched at one place (``_execute_child``) for argv ``[sys.executable, "-m", M, …]``
with no ``preexec_fn``/``pass_fds``/uid changes, M one of the starter's modules (the suite's: ``kolors_job[.…]``,
``bench.gpu``, the probe's, ``tests.procs.…``); everything else runs exactly as before (``python -c`` included:
what a test needs a fresh interpreter for goes in ``tests/procs/`` to start warm).

**Layers.** What the server leaves out (diffusers, transformers, peft, accelerate, the hub clients, the storage
SDKs: ~2.7 CPU-s of a warm job's imports) a *layer* imports: a copy of the server that sets one job's whole
environment, imports those libraries (the ones ``import kolors_job.runner`` loads, kolors_job itself left out)
while noting every environment variable they read, where they iterate over the environment, and where they
read the working directory, then serves every job that agrees with it on all of those (the same values, or the
same absence). A job another layer cannot serve gets a new one made with its own environment (the imports it
would have done itself, done once for all that share them), so what a job's libraries read at import is always
its own. "Its own" is the environment its libraries will be imported under: ``kolors_job``'s CLI first sets the
hub clients' timeouts from the job's settings (``_env_at_imports``); a job whose CLI still changes what its
layer's imports read starts again cold, and the summary line counts it. Where they iterate over the environment
(diffusers looks for ``COLAB_*``) the layer keys on that prefix; where they keep the working directory (rich,
transformers' docstring tooling) the job recomputes it in its own; handlers made at import write to the job's
stderr; any other read refuses layers for the session (jobs then import their libraries themselves). Three
layers at most are open, the least recently used closed first. ``KOLORS_TEST_LAYERS=0`` turns layers off.

A torchrun launcher (``python -m kolors_job.launch.torchrun``) started warm starts its workers (``python -u -m
kolors_job``) warm too: before torchrun runs, the launcher forks a copy of itself that serves its workers as the
session's server serves the test process, and is itself their child subreaper, so torchrun's ``Popen``s, its
signals to them and their exit codes are what they would be; started from a layer, its workers start from its
copy where they agree with that layer, and cold where they do not.

A warm job ends as the interpreter ends one (the traceback or ``SystemExit``'s status, threads joined, ``atexit``,
the streams flushed) but by ``os._exit``, without freeing its heap: freeing it would copy every page of the
server's it refers to into the job first (``warm_server._exit_after``; ~0.3 CPU-s of a tiny job's ~1.7).

Two differences stay. What a library prints or warns *while it is imported* (torch's ``pynvml`` deprecation,
bitsandbytes' missing ``kernels``) went to the server's /dev/null, once; a warm job does not print it again.
The tests that check how such lines are shown make them themselves (tests/test_terminal.py). And what objects'
``__del__`` do when the heap is freed at exit a warm job does not do: kolors_job closes what it writes and
removes its scratch itself (the jobs that start cold — the sweep's trials, tests/test_terminal.py's — would
show a job that left it to the interpreter).

``KOLORS_TEST_COLD=1`` turns it off (every job process starts cold).
"""

from __future__ import annotations

import ctypes
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SERVER = Path(__file__).with_name("warm_server.py")

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
                         "TORCH_NCCL_ASYNC_ERROR_HANDLING", "CUDA_VISIBLE_DEVICES"})  # fmt: skip
_READ_LATER_PREFIXES = ("TORCHELASTIC_",)
"""Of those, read only when used (the compile caches; which GPUs are visible: torch reads it when CUDA is first
asked about, which the server never does — a fork after that would be broken anyway; what torchrun tells its
workers: run id, restart count, error file, …) or applied to the job here: its streams (``-u``), its
``sys.path`` (``PYTHONPATH``, where it shadows no preloaded module)."""

LAUNCHERS = frozenset({"kolors_job.launch.torchrun"})
"""Modules whose warm process serves its own workers (``python -u -m …``) warm."""

_TOPS = PRELOAD_PACKAGES | sys.stdlib_module_names
"""The top-level names the server may have imported."""

MAX_LAYERS = 3
"""Layers (below) kept at once, the least recently used closed first: each holds ~0.5 GB of its own."""

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


def _shadows_preloaded(entries: list[str], tops: frozenset[str] | set[str] = _TOPS) -> bool:
    """Whether a directory the job puts first on ``sys.path`` holds a module the server already imported from
    elsewhere (a fresh interpreter would import that one instead)."""
    for entry in entries:
        try:
            names = os.listdir(entry)
        except OSError:
            continue
        if any(name.removesuffix(".py") in tops for name in names):
            return True
    return False


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
        self.layering = True
        """Whether jobs start from layers (their libraries preloaded) where they can."""
        self.layers: list[_Layer] = []
        """Open layers, the most recently used last."""
        self.layers_made = self.preloaded = 0
        self.layer_failure = ""
        """Why no layer is made (any more): jobs start from the server, importing their libraries themselves."""
        self._base: _Layer | None = None
        self.restarts_file = ""
        """Where a job from a layer that started again cold notes it (``warm_server._as_the_module_starts``):
        one line each. Made with the server; a launcher's copy writes to its session's."""
        self._owns_restarts_file = False

    @property
    def restarted(self) -> int:
        """Jobs that started from a layer, then again cold: their CLI set what the layer's imports read otherwise."""
        try:
            with open(self.restarts_file, "rb") as f:
                return f.read().count(b"\n")
        except OSError:
            return 0

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

    def adopt(self, sock: socket.socket, env: dict[str, str], layer: dict | None, restarts_file: str) -> None:
        """Install, with a server already running behind ``sock`` whose import-time environment is ``env`` (and
        a layer's libraries preloaded, where ``layer`` says what they read)."""
        self._sock, self._env, self.restarts_file = sock, env, restarts_file
        if layer is not None:
            self._base = _Layer(sock, layer)
        self.install()

    def uninstall(self) -> None:
        subprocess.Popen._execute_child = self._cold
        self.installed = False
        with self._lock:
            for layer in self.layers:
                layer.sock.close()
            self.layers.clear()
            if self._sock is not None:
                self._sock.close()
                self._sock = None
            if self._server is not None:
                self._server.wait(timeout=30)
            if self._owns_restarts_file:
                os.unlink(self.restarts_file)
                self._owns_restarts_file = False

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
            request["restarts_file"] = self.restarts_file
            try:
                layer = self._layer(request)
                if layer is None and self._base is not None:
                    return None  # its server imported the libraries under an environment this job does not share
                sock = self._sock if layer is None else layer.sock
                socket.send_fds(sock, [json.dumps(request).encode()], fds)
                pid = int(sock.recv(64))
            except (OSError, ValueError) as e:  # the server is gone: every later job starts cold
                self.failure = f"the fork server stopped answering ({e!r})"
                self._sock.close()
                self._sock = None
                return None
            self.preloaded += layer is not None
            return pid

    def _layer(self, request: dict) -> _Layer | None:
        """The layer this job can start from: one that agrees with it on all its imports read, else a new one
        made with its environment; None where no layer can serve it."""
        request = {**request, "env": _env_at_imports(request)}
        if self._base is not None:
            return self._base if self._base.serves(request) else None
        for layer in self.layers:
            if layer.serves(request):
                self.layers.remove(layer)
                self.layers.append(layer)
                return layer
        if not self.layering or self.layer_failure:
            return None
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            socket.send_fds(self._sock, [json.dumps({"layer": True, "env": request["env"]}).encode()],
                            [theirs.fileno()])  # fmt: skip
            int(self._sock.recv(64))
        finally:
            theirs.close()
        seen = json.loads(ours.recv(_MAX_MESSAGE) or b'{"why": "it ended before it was ready"}')
        if seen["why"]:
            self.layer_failure = f"no layers: {seen['why']}"
            ours.close()
            return None
        self.layers.append(layer := _Layer(ours, seen))
        self.layers_made += 1
        while len(self.layers) > MAX_LAYERS:
            self.layers.pop(0).sock.close()  # it exits; the jobs it started run on
        return layer if layer.serves(request) else None  # its PYTHONPATH may shadow a library

    def _start(self) -> None:
        if refusal := _subreaper_refusal():
            self.failure = f"this process cannot be a child subreaper ({refusal})"
            return
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._env = _env_key(dict(os.environ))
        fd, self.restarts_file = tempfile.mkstemp(prefix="kolors-test-restarts-")
        os.close(fd)
        self._owns_restarts_file = True
        # its own output goes nowhere: it starts inside some test, whose captured stderr it would otherwise keep
        self._server = subprocess.Popen([sys.executable, str(SERVER), "serve", str(theirs.fileno())],
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


class _Layer:
    """A layer as the test process sees it: its socket, and what a job must share with it to start from it."""

    def __init__(self, sock: socket.socket, seen: dict) -> None:
        self.sock = sock
        self.keys: dict[str, str | None] = seen["keys"]
        self.prefixes: dict[str, dict[str, str]] = seen["prefixes"]
        self.tops = frozenset(seen["tops"])

    def serves(self, request: dict) -> bool:
        env, cwd = request["env"], request["cwd"]
        return _agrees(self.keys, self.prefixes, env) and not _shadows_preloaded([cwd, *_pythonpath(env, cwd)],
                                                                                  self.tops)  # fmt: skip


STARTS_BY_SETTING_TRANSPORT = frozenset({"kolors_job", "bench.gpu"})
"""Modules whose first imports set the hub clients' environment (``warm_server._as_the_module_starts``)."""


def _env_at_imports(request: dict) -> dict[str, str]:
    """The environment a job's libraries are imported under: for ``python -m kolors_job`` (and ``bench.gpu``),
    its own with the hub clients' transport set from its settings, as ``kolors_job.sources.transport`` sets it on
    import before anything imports a client. A layer chosen or made by the environment the job was given would
    disagree with it wherever a job asks for other timeouts than the test process's, and that job would start
    again cold in the layer's place, having paid for the layer too. Computed from the job's ``KOLORS_JOB_*``
    values alone, not this process's (``model_validate`` reads no environment); invalid ones give the defaults,
    as ``transport.apply`` does. Should it ever disagree with the job, the job still starts cold (correct, slow)."""
    env = request["env"]
    if request["argv"][2] not in STARTS_BY_SETTING_TRANSPORT:
        return env
    from pydantic import ValidationError

    from kolors_job.core.settings import Settings
    from kolors_job.sources import transport

    prefix = Settings.model_config["env_prefix"]
    given = {k[len(prefix):].lower(): v for k, v in env.items() if k.upper().startswith(prefix)}
    try:
        settings = Settings.model_validate({k: v for k, v in given.items() if k in Settings.model_fields})
    except ValidationError:
        settings = Settings.model_construct()
    return {**env, **transport.client_env(settings)}


def _agrees(keys: dict[str, str | None], prefixes: dict[str, dict[str, str]], env: dict[str, str]) -> bool:
    """Whether ``env`` holds what a layer's imports read: each of ``keys`` with its value (None: absent), and
    exactly the variables under each of ``prefixes``."""
    return all(env.get(k) == v for k, v in keys.items()) and all(
        {k: v for k, v in env.items() if k.startswith(p)} == vs for p, vs in prefixes.items())  # fmt: skip
