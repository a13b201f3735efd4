"""What every LoRA format shares: the training facts (``LoraInfo``), reading any LoRA file into
``{diffusers module: (A, B)}`` with its scale, and writing a file so equal LoRAs are equal bytes.

The training ``lora_alpha`` α is not in the keys (only in the header, when the trainer passed
``unet_lora_adapter_metadata``), and every consumer treats a missing α differently, so
``resolve_info`` pins α down once and each format writer makes ``(α / r) · B A`` explicit for its
consumer.
"""

from __future__ import annotations

import collections
import copy
import json
import logging
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kolors_job.storage.atomic import atomic_target

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

__all__ = [
    "DIFFUSERS_WEIGHT_NAME",
    "LORA_CONFIG_NAME",
    "LORA_WEIGHT_NAME",
    "LoraInfo",
    "canonical_safetensors",
    "file_metadata",
    "load_lora_file",
    "lora_magnitudes",
    "lora_modules",
    "resolve_info",
    "save_lora",
    "scaled",
    "uniform_rank",
]

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
"""diffusers' ``LORA_WEIGHT_NAME_SAFE``: the name ``load_lora_weights(dir)`` looks for first; the trainer
saves under it and the diffusers export keeps it."""
DIFFUSERS_WEIGHT_NAME = LORA_WEIGHT_NAME
LORA_CONFIG_NAME = "lora_config.json"
"""The trainer's peft ``LoraConfig`` beside its weights (rank, α, target modules)."""

META_PREFIX = "kolors_job."
_KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")
_DIFFUSERS_UNET_MODULE = re.compile(
    r"^(down_blocks|mid_block|up_blocks|conv_in|conv_out|conv_norm_out|time_embedding|add_embedding|encoder_hid_proj)"
    r"(\.|$)"
)
_PEFT_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.(?P<adapter>[^.]+))?\.weight$")


# --------------------------------------------------------------------------------------------
# what we know about the LoRA
# --------------------------------------------------------------------------------------------



@dataclass
class LoraInfo:
    """Everything a consumer needs besides the tensors.

    ``alpha`` is the *training* ``lora_alpha``; ``None`` means "read it from the file's metadata"
    (``export_all``/``resolve_info`` refuse to guess, because guessing α = r would silently make the
    reference r16/α4 LoRA four times too strong).
    """

    rank: int | None = None
    alpha: float | None = None
    target_modules: Sequence[str] = ("to_q", "to_k", "to_v", "to_out.0")
    base_model: str = "Kwai-Kolors/Kolors-diffusers"
    trigger: str = ""
    """Caption / trigger text every training image carried (the reference uses the fixed caption "二次元")."""
    name: str = "kolors-lora"
    steps: int | None = None
    learning_rate: float | None = None
    resolution: int | None = None
    batch_size: int | None = None
    seed: int | None = None
    precision: str | None = None
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def scale(self) -> float:
        """peft's ``scaling`` = α / r: the factor the training forward pass applied to ``B A``."""
        if self.rank is None or self.alpha is None:
            raise ValueError("LoraInfo.rank and LoraInfo.alpha must be known to compute the LoRA scale")
        return float(self.alpha) / float(self.rank)

    @property
    def slug(self) -> str:
        """A file-name-safe form of ``name``."""
        return re.sub(r"[^A-Za-z0-9._-]+", "-", self.name).strip("-.") or "kolors-lora"

    def to_metadata(self) -> dict[str, str]:
        """Flat ``str -> str`` safetensors metadata (``kolors_job.*`` keys; loaders ignore them)."""
        out: dict[str, str] = {}
        for key, value in asdict(self).items():
            if value is None or value == "" or value == {}:
                continue
            if isinstance(value, (list, tuple, dict)):
                value = json.dumps(value, ensure_ascii=False)
            out[f"{META_PREFIX}{key}"] = str(value)
        return out


def _metadata_alpha(metadata: Mapping[str, str] | None) -> tuple[float | None, bool]:
    """``(training α, already baked into B?)`` from safetensors metadata we or diffusers wrote."""
    if not metadata:
        return None, False
    baked = metadata.get(f"{META_PREFIX}alpha_baked", "").lower() == "true"
    if f"{META_PREFIX}alpha" in metadata:
        return float(metadata[f"{META_PREFIX}alpha"]), baked
    raw = metadata.get("lora_adapter_metadata")
    if (
        raw
    ):  # diffusers' save_lora_weights(unet_lora_adapter_metadata=LoraConfig.to_dict()) -> "unet.lora_alpha"
        try:
            cfg = json.loads(raw)
        except json.JSONDecodeError:
            return None, baked
        for key in ("unet.lora_alpha", "lora_alpha"):
            if key in cfg:
                return float(cfg[key]), baked
    if "ss_network_alpha" in metadata:  # kohya's training metadata
        try:
            return float(metadata["ss_network_alpha"]), baked
        except ValueError:
            return None, baked
    return None, baked


# --------------------------------------------------------------------------------------------
# reading and normalising
# --------------------------------------------------------------------------------------------


def load_lora_file(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``(state_dict, safetensors metadata)`` of a LoRA file or the one ``load_lora_weights(dir)`` takes."""
    from safetensors import safe_open

    p = Path(path)
    if p.is_dir():
        p = p / LORA_WEIGHT_NAME
    if p.suffix != ".safetensors":
        import torch

        return dict(torch.load(p, map_location="cpu", weights_only=True)), {}
    tensors: dict[str, torch.Tensor] = {}
    with safe_open(str(p), framework="pt", device="cpu") as f:
        metadata = dict(f.metadata() or {})
        for key in f.keys():  # noqa: SIM118 - safe_open is not a Mapping
            tensors[key] = f.get_tensor(key)
    return tensors, metadata


def lora_modules(
    state_dict: Mapping[str, torch.Tensor],
) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], float | None]:
    """``({diffusers UNet module path: (A [r, in], B [out, r])}, α found in the keys or None)``.

    Accepts diffusers (``unet.X.lora.down.weight``), peft (``X.lora_A[.default].weight``), old
    attention-processor and kohya keys, by running diffusers' own converters
    (``_convert_non_diffusers_lora_to_diffusers``, ``convert_unet_state_dict_to_peft``) so we read
    exactly what ``load_lora_weights`` would; and DiffSynth keys (``blocks.7....lora_A.default.weight``,
    what the seed baseline trains), mapped back through DiffSynth's converter table. A DoRA's magnitude
    vectors are not A/B pairs: :func:`lora_magnitudes` reads them.
    """
    modules, _magnitudes, alpha = _lora_parts(state_dict)
    return modules, alpha


def lora_magnitudes(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``{diffusers UNet module path: DoRA magnitude [out]}`` (peft's ``lora_magnitude_vector``, diffusers'
    reading of a kohya ``dora_scale``); empty for a plain LoRA."""
    return _lora_parts(state_dict)[1]


_MAGNITUDE_KEY = re.compile(r"^(?P<module>.+?)\.lora_magnitude_vector(?:\.[^.]+)*$")


def _lora_parts(
    state_dict: Mapping[str, torch.Tensor],
) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], dict[str, torch.Tensor], float | None]:
    """``(modules, DoRA magnitudes, α found in the keys)``: see :func:`lora_modules`."""
    from diffusers.utils.state_dict_utils import convert_unet_state_dict_to_peft

    sd = dict(state_dict)
    if not sd:
        raise ValueError("the LoRA state dict is empty")
    kohya_alpha: float | None = None
    if all(k.startswith(_KOHYA_PREFIXES) for k in sd):
        from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_lora_to_diffusers

        sd, network_alphas = _convert_non_diffusers_lora_to_diffusers(sd)
        alphas = set((network_alphas or {}).values())
        if len(alphas) > 1:
            raise ValueError(f"per-module kohya alphas are not supported: {sorted(alphas)}")
        kohya_alpha = float(alphas.pop()) if alphas else None
    text_keys = [k for k in sd if k.startswith(("text_encoder", "lora_te"))]
    if text_keys:
        raise ValueError(f"text-encoder LoRA keys are not supported for Kolors (ChatGLM): {text_keys[0]}")
    peft = convert_unet_state_dict_to_peft(sd)

    halves: dict[str, dict[str, torch.Tensor]] = collections.defaultdict(dict)
    magnitudes: dict[str, torch.Tensor] = {}
    for key, tensor in peft.items():
        for prefix in ("base_model.model.", "unet."):
            key = key.removeprefix(prefix)
        if mag := _MAGNITUDE_KEY.match(key):
            magnitudes[mag["module"]] = tensor
            continue
        m = _PEFT_KEY.match(key)
        if m is None:
            raise ValueError(f"not a LoRA weight key: {key!r}")
        halves[m["module"]][m["ab"]] = tensor
    if halves and all(name.startswith("blocks.") for name in halves):
        # DiffSynth names (e.g. the reference trainer's Lightning checkpoint): invert DiffSynth's own map.
        from kolors_job.export.diffsynth_names import diffsynth_module_map

        inverse = {ds: du for du, ds in diffsynth_module_map().items()}
        unknown = sorted((set(halves) | set(magnitudes)) - set(inverse))
        if unknown:
            raise ValueError(f"LoRA module {unknown[0]!r} is not a module of DiffSynth's Kolors UNet")
        halves = {inverse[name]: ab for name, ab in halves.items()}
        magnitudes = {inverse[name]: m for name, m in magnitudes.items()}
    foreign = sorted(name for name in halves if not _DIFFUSERS_UNET_MODULE.match(name))
    if foreign:
        raise ValueError(f"LoRA module {foreign[0]!r} is not a diffusers UNet module path")
    modules: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for module, ab in sorted(halves.items()):
        if set(ab) != {"A", "B"}:
            raise ValueError(f"LoRA module {module!r} lacks its {'B' if 'A' in ab else 'A'} matrix")
        a, b = ab["A"], ab["B"]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise ValueError(f"LoRA module {module!r}: A {tuple(a.shape)} and B {tuple(b.shape)} do not pair")
        modules[module] = (a, b)
    stray = sorted(set(magnitudes) - set(modules))
    if stray:
        raise ValueError(f"DoRA magnitude of {stray[0]!r} has no LoRA A/B pair")
    return modules, dict(sorted(magnitudes.items())), kohya_alpha


def uniform_rank(modules: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> int:
    """The one rank every module shares (every writer's α/r arithmetic assumes a single r)."""
    ranks = collections.Counter(int(a.shape[0]) for a, _ in modules.values())
    if len(ranks) != 1:
        raise ValueError(f"mixed LoRA ranks are not supported: {dict(ranks)}")
    return next(iter(ranks))


def resolve_info(
    info: LoraInfo | None,
    state_dict: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str] | None = None,
) -> tuple[LoraInfo, dict[str, tuple[torch.Tensor, torch.Tensor]], float]:
    """``(info with rank/alpha filled, modules, tensor scale)``.

    The *tensor scale* is what must multiply ``B A`` to get the trained update: α/r for a raw
    training LoRA, 1 for a file whose scale is already baked in (our own diffusers export) — so
    re-exporting an export never applies α/r twice.
    """
    info = copy.deepcopy(info) if info is not None else LoraInfo()
    modules, kohya_alpha = lora_modules(state_dict)
    rank = uniform_rank(modules)
    if info.rank is not None and info.rank != rank:
        raise ValueError(f"LoraInfo.rank={info.rank} but the tensors have rank {rank}")
    info.rank = rank
    meta_alpha, baked = _metadata_alpha(metadata)
    if info.alpha is None:
        info.alpha = meta_alpha if meta_alpha is not None else kohya_alpha
    if info.alpha is None:
        raise ValueError(
            "the training lora_alpha is unknown: pass LoraInfo(alpha=...) (it is not in the LoRA file); "
            "guessing alpha = rank would change the LoRA's strength"
        )
    if meta_alpha is not None and abs(meta_alpha - info.alpha) > 1e-9:
        if not baked:  # the file says how strong it is; a different α would silently change that
            raise ValueError(
                f"LoraInfo.alpha={info.alpha} but the LoRA file was trained with alpha {meta_alpha}"
            )
        log.warning(
            "LoraInfo.alpha=%s differs from the alpha %s recorded with the baked file", info.alpha, meta_alpha
        )
    if baked:
        tensor_scale = 1.0
    elif kohya_alpha is not None:
        tensor_scale = kohya_alpha / rank
    else:
        tensor_scale = info.alpha / rank
    return info, modules, tensor_scale


# --------------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------------


def scaled(t: torch.Tensor, factor: float) -> torch.Tensor:
    """``t * factor`` computed in fp32 (no extra rounding in bf16/fp16) and stored in ``t``'s dtype."""
    import torch

    if t.device.type == "meta":  # shapes only (key checks on the meta device)
        return t if factor == 1.0 else t * factor
    if factor == 1.0:
        return t.detach().to("cpu").contiguous()
    return (t.detach().to("cpu", torch.float32) * factor).to(t.dtype).contiguous()


def canonical_safetensors(path: Path) -> None:
    """Rewrite the header with sorted keys: safetensors keeps metadata in a Rust HashMap, so two saves of
    the same tensors differ in header byte order. Sorted, equal LoRAs are equal files (hashes, resume)."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    text = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)  # keep the data 8-byte aligned, as safetensors does
    with atomic_target(path) as tmp:
        tmp.write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + n :])


def save_lora(tensors: Mapping[str, torch.Tensor], path: Path, metadata: Mapping[str, str]) -> Path:
    """Write atomically (temp file + rename) so a crash never leaves a half file that looks complete."""
    import torch
    from safetensors.torch import save_file

    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    with atomic_target(path) as tmp:
        if path.suffix == ".safetensors":
            save_file(tensors, str(tmp), metadata={"format": "pt", **metadata})
            canonical_safetensors(tmp)  # equal LoRAs are equal files, whichever process wrote them
        else:  # .ckpt / .pt / .bin: what the reference notebook's torch.load expects
            torch.save(tensors, tmp)
    return path


def file_metadata(info: LoraInfo, fmt: str, **extra: Any) -> dict[str, str]:
    """The ``kolors_job.*`` header every export carries: the training facts, the format, ``extra``."""
    meta = info.to_metadata()
    meta[f"{META_PREFIX}format"] = fmt
    meta.update({f"{META_PREFIX}{k}": str(v) for k, v in extra.items()})
    return meta
