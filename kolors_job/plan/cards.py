"""The GPUs people rent for this job: memory as the driver reports it, and whether they compute in bf16."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["CARDS", "FRACTION", "Card", "card_from_memory", "visible_card"]

MIB = 1 << 20
GIB = 1 << 30
FRACTION = 0.9
"""The share of a card a plan may fill: the rest is the CUDA context (~0.3–0.6 GiB, not in the allocator's
count), cuDNN/cuBLAS workspaces and the caching allocator's fragmentation."""


@dataclass(frozen=True)
class Card:
    name: str
    total: int
    """Bytes, as ``nvidia-smi`` / ``torch.cuda.mem_get_info`` report the card's total."""
    bf16: bool
    """Computes in bf16 (Ampere and later); T4 (Turing) and V100 (Volta) do not."""
    free: int | None = None
    """Bytes free now (the card this process sees); None for a card from the list."""

    @property
    def budget(self) -> int:
        """What a plan may use: 90 % of the card; on a visible card also no more than its free memory less
        5 % of the card (its free memory already lacks the CUDA context and other processes' memory)."""
        share = int(FRACTION * self.total)
        if self.free is None:
            return share
        return min(share, self.free - self.total // 20)

    def describe(self) -> str:
        free = f", {self.free / GIB:.1f} GiB free" if self.free is not None else ""
        return f"{self.name} ({self.total / GIB:.1f} GiB{free}, {'bf16' if self.bf16 else 'no bf16'})"


CARDS: dict[str, Card] = {
    "t4": Card("T4", 15360 * MIB, bf16=False),
    "v100-16g": Card("V100-16G", 16160 * MIB, bf16=False),
    "a10": Card("A10", 23028 * MIB, bf16=True),
    "l4": Card("L4", 23034 * MIB, bf16=True),
    "4090": Card("RTX 4090", 24564 * MIB, bf16=True),
    "a100-40g": Card("A100-40G", 40960 * MIB, bf16=True),
    "a100-80g": Card("A100-80G", 81920 * MIB, bf16=True),
    "h100": Card("H100", 81559 * MIB, bf16=True),
}
"""Totals as ``nvidia-smi`` prints them for each card (MiB)."""


def card_from_memory(gib: float, *, bf16: bool = True) -> Card:
    return Card(f"{gib:g} GiB card", int(gib * GIB), bf16=bf16)


def visible_card(device: int = 0) -> Card:
    """The CUDA device this process uses, with its free memory now."""
    import torch

    free, total = torch.cuda.mem_get_info(device)
    bf16 = torch.cuda.is_bf16_supported(including_emulation=False)  # a T4 "supports" bf16 only by emulation
    return Card(torch.cuda.get_device_name(device), total, bf16=bf16, free=free)
