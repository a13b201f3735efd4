"""Run full-size modules without memory: fake tensors, CUDA's autocast rules on the CPU, live-storage accounting.

Why each piece (measured here on torch 2.14, 2 CPU cores):

* ``FakeTensorMode`` on the **CPU device**, not ``meta``: the CPU's SDPA picks the flash-attention kernel, whose
  memory profile (output + log-sum-exp saved) is the one a CUDA GPU has for fp16/bf16; the meta device takes
  the math path and keeps the N² attention matrix (~40× too much). Fake ``cuda`` tensors fail in backward
  without a driver.
* CUDA's autocast casts ``group_norm``, ``layer_norm``, ``softmax``... to fp32; the CPU's autocast does not. Those
  fp32 outputs are a GiB of a 1024² UNet step, so :func:`cuda_autocast_rules` registers CUDA's fp32 policy on the
  ``AutocastCPU`` dispatch key for the duration of a simulation (and removes it after: a CPU training run in the
  same process keeps the CPU's rules).
* :class:`LiveMemory` counts live tensor storages as ``torch.cuda.max_memory_allocated`` counts blocks (512-byte
  rounding). A freed storage is noticed lazily — only when the running total could pass the peak — so the peak
  is exact while a whole UNet step costs seconds, not the 20+ minutes of ``MemTracker`` (which also assumes
  every parameter trains and fails on a frozen base model).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterable, Iterator
from itertools import compress
from typing import Any

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

__all__ = ["LiveMemory", "cuda_autocast_rules", "materialize", "simulation"]

_expired = torch.UntypedStorage._expired  # what StorageWeakRef.expired calls

BLOCK = 512
"""The CUDA caching allocator rounds every block up to a multiple of 512 bytes."""

# Ops CUDA's autocast runs in fp32 (aten/src/ATen/autocast_mode.cpp, the CUDA ``fp32`` policy) that the CPU's
# runs in the input dtype; the ones Kolors' UNet, VAE, ChatGLM and the losses reach.
_CUDA_FP32_OPS = (
    "group_norm",
    "layer_norm",
    "softmax.int",
    "log_softmax.int",
    "exp",
    "pow.Tensor_Scalar",
    "pow.Tensor_Tensor",
    "rsqrt",
    "sum",
    "sum.dim_IntList",
    "cumsum",
    "norm.Scalar",
    "mse_loss",
)
_HALF = (torch.float16, torch.bfloat16)


def _fp32_kernel(op: Any) -> Callable[..., Any]:
    keys = torch._C.DispatchKeySet(torch._C.DispatchKey.AutocastCPU)

    def cast(a: Any) -> Any:
        return a.float() if isinstance(a, torch.Tensor) and a.dtype in _HALF else a

    def kernel(*args: Any, **kwargs: Any) -> Any:
        with torch._C._ExcludeDispatchKeyGuard(keys):
            return op(*[cast(a) for a in args], **{k: cast(v) for k, v in kwargs.items()})

    return kernel


@contextlib.contextmanager
def cuda_autocast_rules() -> Iterator[None]:
    """``torch.autocast("cpu", ...)`` with CUDA's fp32 policy, inside the block only."""
    lib = torch.library.Library("aten", "IMPL")
    try:
        with warnings.catch_warnings():  # "overriding a previously registered kernel": that is the point
            warnings.simplefilter("ignore")
            for name in _CUDA_FP32_OPS:
                base, _, overload = name.partition(".")
                op = getattr(getattr(torch.ops.aten, base), overload or "default")
                lib.impl(name, _fp32_kernel(op), "AutocastCPU")
        yield
    finally:
        lib._destroy()


class LiveMemory(TorchDispatchMode):
    """The bytes of live tensor storage, and their peak, over the ops run inside it (fake or real tensors).

    ``add`` registers tensors that existed before (weights, optimizer state). Storages are keyed by their
    ``StorageImpl``; a view or an in-place op allocates nothing. ``current`` is an upper bound between sweeps
    (frees are found by sweeping); a sweep runs whenever the bound would pass the peak, so ``peak`` is exact.
    """

    def __init__(self) -> None:
        super().__init__()
        self._live: dict[int, tuple[StorageWeakRef, int]] = {}
        self._weak: dict[int, int] = {}  # the same keys: each weak reference's handle, what a sweep tests
        self.current = 0
        self.peak = 0

    def add(self, tensors: Iterable[Any]) -> None:
        for t in tensors:
            if isinstance(t, torch.Tensor):
                self._track(t)

    def live(self) -> int:
        """Exact bytes live now."""
        self._sweep()
        return self.current

    def reset_peak(self) -> int:
        """Start a new peak from what is live now; returns it."""
        self.peak = self.live()
        return self.peak

    def _track(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        key = storage._cdata
        old = self._live.get(key)
        if old is not None:
            if not old[0].expired():
                return  # a view of, or an in-place op on, a live storage
            self.current -= old[1]
        size = -(-storage.nbytes() // BLOCK) * BLOCK
        ref = StorageWeakRef(storage)
        self._live[key] = (ref, size)
        self._weak[key] = ref.cdata
        self.current += size
        if self.current > self.peak:
            self._sweep()
            self.peak = max(self.peak, self.current)

    def _sweep(self) -> None:
        # StorageWeakRef.expired's own test, looped in C: a training step sweeps thousands of times over thousands
        # of storages (the Python loop was a third of a simulated step's time)
        dead = list(compress(self._weak, map(_expired, self._weak.values())))
        for k in dead:
            del self._weak[k]
            self.current -= self._live.pop(k)[1]

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._track(t)
        return out


@contextlib.contextmanager
def simulation() -> Iterator[Any]:
    """A fake-tensor world on the CPU device with CUDA's autocast rules; yields the ``FakeTensorMode``."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode()
    with cuda_autocast_rules(), mode:
        yield mode


def materialize(module: torch.nn.Module, dtype_of: Callable[[str, torch.Tensor], torch.dtype]) -> torch.nn.Module:
    """Swap every parameter and buffer of a module built on the meta device for a fake CPU tensor of
    ``dtype_of(name, tensor)`` (call inside :func:`simulation`). ``requires_grad`` is kept. Done by hand:
    ``Module.to`` under fake mode fails to swap parameters."""
    for prefix, sub in module.named_modules():
        for name, p in list(sub._parameters.items()):
            if p is not None:
                full = f"{prefix}.{name}" if prefix else name
                fake = torch.empty(p.shape, dtype=dtype_of(full, p), device="cpu")
                sub._parameters[name] = torch.nn.Parameter(fake, requires_grad=p.requires_grad)
        for name, b in list(sub._buffers.items()):
            if b is not None:
                full = f"{prefix}.{name}" if prefix else name
                sub._buffers[name] = torch.empty(b.shape, dtype=dtype_of(full, b), device="cpu")
    return module
