"""Which device the job runs on, and why a GPU is not usable when it is not.

A full-size Kolors on a CPU takes hours per stage, so a job that lands on the wrong node (no GPU, or
a driver older than the CUDA build in the image) must say so in its first second, with the numbers
a person needs to fix it, instead of silently grinding on.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

__all__ = ["cuda_problem", "pick_device", "resolve_device"]


def _driver_version() -> str | None:
    """The NVIDIA driver version through NVML, None when no driver is loaded."""
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            version = pynvml.nvmlSystemGetDriverVersion()
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # no libnvidia-ml, no driver, no device: all mean "none here"
        return None
    return version.decode() if isinstance(version, bytes) else str(version)


def cuda_problem() -> str | None:
    """None when CUDA is usable, else one sentence saying why not (driver and build versions)."""
    import torch

    if torch.cuda.is_available():
        return None
    build = torch.version.cuda
    if build is None:
        return f"this torch build ({torch.__version__}) has no CUDA support"
    driver = _driver_version()
    if driver is None:
        return (
            f"no NVIDIA GPU or driver is visible (torch {torch.__version__} is built for CUDA {build}); "
            "give the container a GPU (docker --gpus, nvidia.com/gpu)"
        )
    return (
        f"the NVIDIA driver {driver} cannot run torch's CUDA {build} build (or no GPU is visible to it); "
        "use a node with a newer driver"
    )


def pick_device(requested: str, *, world: int = 1, local_rank: int = 0) -> str:
    """``auto`` → CUDA when usable else CPU; ``cpu``/``cuda`` as asked. One GPU per DDP rank."""
    import torch

    if requested == "cpu":
        return "cpu"
    if requested == "cuda" or torch.cuda.is_available():
        return f"cuda:{local_rank}" if world > 1 else "cuda"
    return "cpu"


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``device`` as a ``torch.device``; None: CUDA when it is available, else the CPU."""
    import torch

    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
