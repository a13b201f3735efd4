"""Export a trained Kolors UNet LoRA so it loads everywhere: diffusers, ComfyUI/WebUI and DiffSynth.

The trainer hands us what ``KolorsPipeline.save_lora_weights(dir, unet_lora_layers=
convert_state_dict_to_diffusers(get_peft_model_state_dict(unet)))`` writes (diffusers 0.39:
``unet.<module>.lora.down.weight`` / ``.lora.up.weight``); peft (``lora_A``/``lora_B``), old
attention-processor (``processor.to_q_lora.down``), kohya and DiffSynth keys are accepted too. The
training ``lora_alpha`` α is not in the keys (only in the header, when the trainer passed
``unet_lora_adapter_metadata``), and every consumer treats a missing α differently, so each writer
below makes the effective update ``(α / r) · B A`` explicit for its consumer:

==========  ===============================================  ======================================
format      keys                                             how α survives
==========  ===============================================  ======================================
diffusers   ``unet.<diffusers module>.lora.down/up.weight``  α/r baked into B (loaders use α = r)
kohya       ``lora_unet_<diffusers module, . → _>``          ``.alpha`` = α per module, B untouched
            ``.lora_down/.lora_up.weight``, ``.alpha``
diffsynth   ``<DiffSynth module>.lora_A/B.default.weight``   B · α/α_load for the reference's α_load
==========  ===============================================  ======================================

Module names for DiffSynth come from DiffSynth's own ``SDXLUNetStateDictConverter`` applied to the
*base* UNet's key names (design.md §5), and every export is checked against the parameters the
consumer actually creates, because the reference DiffSynth loader uses ``strict=False`` and would
silently drop a wrong key.
"""

from __future__ import annotations

import collections
import copy
import functools
import json
import logging
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kolors_job.storage.base import atomic_target

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_DIFFSYNTH_LOAD_ALPHA",
    "DIFFSYNTH_TARGET_MODULES",
    "DIFFUSERS_WEIGHT_NAME",
    "EXPORT_FORMATS",
    "LoraInfo",
    "diffsynth_lora_parameter_shapes",
    "diffsynth_module_map",
    "diffsynth_state_dict",
    "diffusers_state_dict",
    "export_all",
    "export_diffsynth",
    "export_diffusers",
    "export_kohya",
    "kohya_state_dict",
    "load_lora_file",
    "lora_modules",
    "write_model_card",
]

DIFFUSERS_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
"""diffusers' ``LORA_WEIGHT_NAME_SAFE``: the name ``load_lora_weights(dir)`` looks for first."""

DEFAULT_DIFFSYNTH_LOAD_ALPHA = 2.0
"""The reference notebook injects ``LoraConfig(r=16, lora_alpha=2.0)`` at sampling time (design.md §7)."""

DIFFSYNTH_TARGET_MODULES = ("to_q", "to_k", "to_v", "to_out")
"""The reference's peft ``target_modules`` for DiffSynth's ``SDXLUNet`` (its ``to_out`` is a bare Linear)."""

EXPORT_FORMATS = ("diffusers", "kohya", "diffsynth")

_META_PREFIX = "kolors_job."
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
            out[f"{_META_PREFIX}{key}"] = str(value)
        return out


def _metadata_alpha(metadata: Mapping[str, str] | None) -> tuple[float | None, bool]:
    """``(training α, already baked into B?)`` from safetensors metadata we or diffusers wrote."""
    if not metadata:
        return None, False
    baked = metadata.get(f"{_META_PREFIX}alpha_baked", "").lower() == "true"
    if f"{_META_PREFIX}alpha" in metadata:
        return float(metadata[f"{_META_PREFIX}alpha"]), baked
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
        p = p / DIFFUSERS_WEIGHT_NAME
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
    what the seed baseline trains), mapped back through DiffSynth's converter table.
    """
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
    for key, tensor in peft.items():
        for prefix in ("base_model.model.", "unet."):
            key = key.removeprefix(prefix)
        m = _PEFT_KEY.match(key)
        if m is None:
            raise ValueError(f"not a LoRA weight key: {key!r}")
        halves[m["module"]][m["ab"]] = tensor
    if halves and all(name.startswith("blocks.") for name in halves):
        # DiffSynth names (e.g. the reference trainer's Lightning checkpoint): invert DiffSynth's own map.
        inverse = {ds: du for du, ds in diffsynth_module_map().items()}
        unknown = sorted(set(halves) - set(inverse))
        if unknown:
            raise ValueError(f"LoRA module {unknown[0]!r} is not a module of DiffSynth's Kolors UNet")
        halves = {inverse[name]: ab for name, ab in halves.items()}
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
    return modules, kohya_alpha


def _uniform_rank(modules: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> int:
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
    rank = _uniform_rank(modules)
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


def _scaled(t: torch.Tensor, factor: float) -> torch.Tensor:
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


def _save(tensors: Mapping[str, torch.Tensor], path: Path, metadata: Mapping[str, str]) -> Path:
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


def _file_metadata(info: LoraInfo, fmt: str, **extra: Any) -> dict[str, str]:
    meta = info.to_metadata()
    meta[f"{_META_PREFIX}format"] = fmt
    meta.update({f"{_META_PREFIX}{k}": str(v) for k, v in extra.items()})
    return meta


def diffusers_state_dict(
    modules: Mapping[str, tuple[torch.Tensor, torch.Tensor]], tensor_scale: float
) -> dict[str, torch.Tensor]:
    """The keys ``KolorsPipeline.save_lora_weights`` writes, with α/r baked into B."""
    out: dict[str, torch.Tensor] = {}
    for module, (a, b) in modules.items():
        out[f"unet.{module}.lora.down.weight"] = _scaled(a, 1.0)
        out[f"unet.{module}.lora.up.weight"] = _scaled(b, tensor_scale)
    return out


def export_diffusers(
    state_dict: Mapping[str, torch.Tensor],
    info: LoraInfo,
    out_dir: str | os.PathLike[str],
    *,
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write ``out_dir/pytorch_lora_weights.safetensors`` for ``KolorsPipeline.load_lora_weights``.

    Why bake α/r into B instead of writing diffusers' ``lora_adapter_metadata``: without metadata
    diffusers builds its ``LoraConfig`` with ``lora_alpha = r`` (``get_peft_kwargs``), ComfyUI reads
    diffusers-format keys with no alpha at all, and a ``LoraConfig.to_dict()`` from a new peft fails
    to construct on older peft versions. Baking gives the same output in all of them. The training
    α is kept as informational ``kolors_job.*`` metadata (with ``alpha_baked=true``) so reading the
    file back never scales twice. Returns the file path.
    """
    info, modules, tensor_scale = resolve_info(info, state_dict, metadata)
    tensors = diffusers_state_dict(modules, tensor_scale)
    meta = _file_metadata(info, "diffusers", alpha_baked="true", baked_scale=repr(tensor_scale))
    return _save(tensors, Path(out_dir) / DIFFUSERS_WEIGHT_NAME, meta)


def kohya_state_dict(
    modules: Mapping[str, tuple[torch.Tensor, torch.Tensor]], tensor_scale: float
) -> dict[str, torch.Tensor]:
    """Kohya keys from diffusers' own ``convert_state_dict_to_kohya``, with a real ``.alpha``.

    ``convert_state_dict_to_kohya`` writes ``alpha = rank`` (scale 1); we replace it with
    ``tensor_scale · rank`` (= the training α for a raw LoRA) so every kohya reader applies
    ``alpha / rank`` exactly as training did, and B stays as trained.
    """
    import torch
    from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya

    peft: dict[str, torch.Tensor] = {}
    for module, (a, b) in modules.items():
        peft[f"unet.{module}.lora_A.weight"] = _scaled(a, 1.0)
        peft[f"unet.{module}.lora_B.weight"] = _scaled(b, 1.0)
    kohya = convert_state_dict_to_kohya(peft)
    for key in list(kohya):
        if key.endswith(".alpha"):
            down = kohya[key.removesuffix(".alpha") + ".lora_down.weight"]
            kohya[key] = torch.tensor(float(tensor_scale) * down.shape[0], dtype=torch.float32)
    return kohya


def _check_kohya_roundtrip(kohya: Mapping[str, torch.Tensor], modules: Mapping[str, Any]) -> None:
    """diffusers' non-diffusers path must map every key back to the module it came from."""
    back, _ = lora_modules(kohya)
    if set(back) != set(modules):
        missing = sorted(set(modules) - set(back))[:3]
        extra = sorted(set(back) - set(modules))[:3]
        raise RuntimeError(
            f"kohya keys do not round-trip through diffusers: missing {missing}, extra {extra}"
        )


def export_kohya(
    state_dict: Mapping[str, torch.Tensor],
    info: LoraInfo,
    out_path: str | os.PathLike[str],
    *,
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write a kohya/WebUI-style file for ComfyUI: ``lora_unet_<module>.lora_down/up.weight``, ``.alpha``.

    Which spelling of the module path, checked against the sources:

    * ComfyUI ``comfy/lora.py::model_lora_keys_unet`` registers *both* ``lora_unet_<SGM key>``
      (``input_blocks_4_1_...``, from the model's own state dict) and ``lora_unet_<diffusers key>``
      (``down_blocks_1_attentions_0_...``, via ``comfy.utils.unet_to_diffusers(unet_config)``). The
      Kolors ComfyUI integrations (ComfyUI-Kolors-MZ registers ``class Kolors(supported_models.SDXL)``
      with the SDXL ``unet_config``) use that same key map, so both spellings load there. (WebUI-style
      loaders such as SD.Next's also build a diffusers → LDM map for SDXL ``lora_unet_down_blocks_*``.)
    * diffusers 0.39: ``KolorsPipeline`` uses ``StableDiffusionLoraLoaderMixin``, whose
      ``lora_state_dict`` remaps SGM block numbers only when the caller passes ``unet_config=...``
      (the SDXL mixin does it for you, the Kolors one does not). Without it
      ``_convert_unet_lora_key`` turns ``input_blocks_4_1`` into ``down_blocks.4.1``, a module that
      does not exist: tried here, ``pipe.load_lora_weights`` fails with peft's
      ``NoMatchingPeftModuleError`` (a file mixing spellings would lose the SGM part with only a
      warning). The diffusers spelling converts to the right module with no extra argument.

    So the diffusers spelling is the one both accept; the export verifies the round trip through
    diffusers' converter. Returns ``out_path``.
    """
    info, modules, tensor_scale = resolve_info(info, state_dict, metadata)
    kohya = kohya_state_dict(modules, tensor_scale)
    _check_kohya_roundtrip(kohya, modules)
    meta = _file_metadata(info, "kohya")
    meta.update(
        {
            "ss_network_module": "networks.lora",
            "ss_network_dim": str(info.rank),
            "ss_network_alpha": repr(tensor_scale * (info.rank or 0)),
            "ss_sd_model_name": info.base_model,
        }
    )
    return _save(kohya, Path(out_path), meta)


# --------------------------------------------------------------------------------------------
# DiffSynth
# --------------------------------------------------------------------------------------------


def _default_unet_config() -> dict[str, Any]:
    from kolors_job.tiny import KOLORS_UNET_CONFIG

    return copy.deepcopy(KOLORS_UNET_CONFIG)


@functools.lru_cache(maxsize=4)
def _diffsynth_module_map_cached(unet_config_json: str) -> dict[str, str]:
    import torch
    from diffsynth.models.sdxl_unet import SDXLUNet
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**json.loads(unet_config_json))
    names = list(unet.state_dict().keys())
    # Tag every base key with its index: the converter only renames (and squeezes proj_in/out),
    # so the tag tells us which diffusers key each DiffSynth key came from, whatever the order.
    tagged = {name: torch.tensor([i]) for i, name in enumerate(names)}
    converted = SDXLUNet.state_dict_converter().from_diffusers(tagged)
    if isinstance(converted, tuple):
        converted = converted[0]
    if len(converted) != len(names):
        raise RuntimeError(f"DiffSynth's converter merged keys: {len(names)} -> {len(converted)}")
    mapping: dict[str, str] = {}
    for new_name, tag in converted.items():
        old_name = names[int(tag.reshape(-1)[0])]
        if old_name.endswith(".weight") and new_name.endswith(".weight"):
            mapping[old_name.removesuffix(".weight")] = new_name.removesuffix(".weight")
    return mapping


def diffsynth_module_map(unet_config: Mapping[str, Any] | None = None) -> dict[str, str]:
    """``{diffusers module path: DiffSynth module path}`` for every weight of the base Kolors UNet.

    Derived by running DiffSynth's ``SDXLUNetStateDictConverter.from_diffusers`` over the base
    UNet's full key list (built on the meta device: no memory). The converter numbers DiffSynth
    blocks by counting the blocks it sees, so it must see all of them — a partial LoRA would be
    misnumbered (design.md §5).
    """
    cfg = dict(unet_config) if unet_config is not None else _default_unet_config()
    return dict(_diffsynth_module_map_cached(json.dumps(cfg, sort_keys=True)))


@functools.lru_cache(maxsize=4)
def diffsynth_lora_parameter_shapes(rank: int) -> dict[str, tuple[int, ...]]:
    """Name → shape of every LoRA parameter the reference loader creates in ``SDXLUNet(is_kolors=True)``.

    Built on the meta device with the reference's exact ``LoraConfig``; the ground truth that an
    export is checked against (α does not change names or shapes).
    """
    import torch
    from diffsynth.models.sdxl_unet import SDXLUNet
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(
        r=rank,
        lora_alpha=DEFAULT_DIFFSYNTH_LOAD_ALPHA,
        init_lora_weights="gaussian",
        target_modules=list(DIFFSYNTH_TARGET_MODULES),
    )
    with torch.device("meta"):
        model = inject_adapter_in_model(config, SDXLUNet(is_kolors=True))
    return {k: tuple(v.shape) for k, v in model.state_dict().items() if ".lora_" in k}


def diffsynth_state_dict(
    modules: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    tensor_scale: float,
    rank: int,
    *,
    load_alpha: float = DEFAULT_DIFFSYNTH_LOAD_ALPHA,
    unet_config: Mapping[str, Any] | None = None,
    validate: bool = True,
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """``(DiffSynth LoRA state dict, modules zero-filled)``.

    The reference injects with ``lora_alpha=load_alpha`` → peft scale ``load_alpha / r``; we want
    ``tensor_scale`` (α/r), so B is multiplied by ``tensor_scale · r / load_alpha``. With
    ``validate`` the key set and shapes must equal exactly the LoRA parameters DiffSynth creates:
    an unexpected key or wrong shape raises; a DiffSynth LoRA module we have no weights for (the
    training targeted fewer modules) is written as zeros, so ``load_state_dict(strict=False)``
    reports nothing missing and that module stays a no-op, as in training.
    """
    import torch

    name_map = diffsynth_module_map(unet_config)
    factor = tensor_scale * rank / load_alpha
    out: dict[str, torch.Tensor] = {}
    for module, (a, b) in modules.items():
        if module not in name_map:
            raise ValueError(f"LoRA module {module!r} is not a weight of the Kolors UNet")
        target = name_map[module]
        out[f"{target}.lora_A.default.weight"] = _scaled(a, 1.0)
        out[f"{target}.lora_B.default.weight"] = _scaled(b, factor)
    zero_filled: list[str] = []
    if validate:
        expected = diffsynth_lora_parameter_shapes(rank)
        unexpected = sorted(set(out) - set(expected))
        if unexpected:
            raise ValueError(
                f"{len(unexpected)} DiffSynth LoRA keys are not parameters of SDXLUNet(is_kolors=True), "
                f"e.g. {unexpected[0]!r} (strict=False would silently drop them)"
            )
        wrong = [(k, tuple(v.shape), expected[k]) for k, v in out.items() if tuple(v.shape) != expected[k]]
        if wrong:
            raise ValueError(f"DiffSynth LoRA shape mismatch: {wrong[0]}")
        dtype = next(iter(out.values())).dtype
        for key in sorted(set(expected) - set(out)):
            out[key] = torch.zeros(expected[key], dtype=dtype)
            module = key.split(".lora_")[0]
            if not zero_filled or zero_filled[-1] != module:
                zero_filled.append(module)
        if zero_filled:
            log.warning("DiffSynth export: %d untrained LoRA modules written as zeros", len(zero_filled))
    return out, zero_filled


def export_diffsynth(
    state_dict: Mapping[str, torch.Tensor],
    info: LoraInfo,
    out_path: str | os.PathLike[str],
    *,
    load_alpha: float = DEFAULT_DIFFSYNTH_LOAD_ALPHA,
    metadata: Mapping[str, str] | None = None,
    unet_config: Mapping[str, Any] | None = None,
) -> Path:
    """Write the LoRA as DiffSynth 1.1.9's reference loader expects it.

    Keys are the parameter names peft creates in DiffSynth's ``SDXLUNet(is_kolors=True)`` with
    ``LoraConfig(r=rank, lora_alpha=load_alpha, init_lora_weights="gaussian",
    target_modules=["to_q","to_k","to_v","to_out"])`` — e.g.
    ``blocks.7.transformer_blocks.0.attn1.to_q.lora_A.default.weight`` — and B is rescaled so that
    injecting with ``load_alpha`` reproduces the trained update (see ``diffsynth_state_dict``). The
    load α is recorded in the metadata (``kolors_job.diffsynth_load_alpha``) and the model card.
    ``.safetensors`` (default) or ``.ckpt``/``.pt`` (``torch.load``-able, as the reference notebook
    reads its Lightning checkpoint). Returns ``out_path``.
    """
    info, modules, tensor_scale = resolve_info(info, state_dict, metadata)
    assert info.rank is not None
    tensors, zero_filled = diffsynth_state_dict(
        modules, tensor_scale, info.rank, load_alpha=load_alpha, unet_config=unet_config
    )
    meta = _file_metadata(
        info,
        "diffsynth",
        diffsynth_load_alpha=repr(float(load_alpha)),
        diffsynth_lora_rank=str(info.rank),
        diffsynth_target_modules=json.dumps(list(DIFFSYNTH_TARGET_MODULES)),
        zero_filled_modules=str(len(zero_filled)),
    )
    return _save(tensors, Path(out_path), meta)


# --------------------------------------------------------------------------------------------
# model card and the whole set
# --------------------------------------------------------------------------------------------


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(_fmt(v) for v in value)
    if isinstance(value, dict):
        return json.dumps(value, ensure_ascii=False)
    return str(value)


def _default_file_names(info: LoraInfo) -> dict[str, str]:
    return {
        "diffusers": DIFFUSERS_WEIGHT_NAME,
        "kohya": f"{info.slug}_comfyui.safetensors",
        "diffsynth": f"{info.slug}_diffsynth.safetensors",
    }


def write_model_card(
    out_dir: str | os.PathLike[str],
    info: LoraInfo,
    scores: Mapping[str, Any] | None,
    dataset_summary: Mapping[str, Any] | None,
    *,
    files: Mapping[str, str | os.PathLike[str]] | None = None,
    load_alpha: float = DEFAULT_DIFFSYNTH_LOAD_ALPHA,
) -> Path:
    """Write ``out_dir/README.md``: what the LoRA is, how it was trained and scored, and how to load it.

    The card doubles as the challenge's "LoRA description" and as the ModelScope model page, so it
    carries ModelScope front matter and copy-paste loading code for every exported file — including
    the α the DiffSynth file expects, since the reference loader takes α as an argument and a
    different α silently changes the strength.
    """
    out = Path(out_dir)
    names = {k: Path(v).name for k, v in (files or {}).items()} or {
        k: v for k, v in _default_file_names(info).items() if (out / v).exists()
    }
    scale = info.scale if info.rank and info.alpha is not None else None
    lines = [
        "---",
        "frameworks:",
        "- Pytorch",
        "license: apache-2.0",
        "tasks:",
        "- text-to-image-synthesis",
        "base_model:",
        f"- {info.base_model}",
        "base_model_relation: adapter",
        "---",
        "",
        f"# {info.name}",
        "",
        f"A LoRA for the **Kolors** UNet (base model `{info.base_model}`), trained with diffusers + peft.",
        "",
        "## Trigger / caption",
        "",
        f"Every training image was captioned `{info.trigger}`; start prompts with it."
        if info.trigger
        else "No trigger word: training captions were left as given.",
        "",
        "## Training",
        "",
        "| setting | value |",
        "|---|---|",
        f"| rank (r) | {info.rank} |",
        f"| lora_alpha (α) | {_fmt(info.alpha)} |",
        f"| effective scale α/r | {_fmt(scale) if scale is not None else 'unknown'} |",
        f"| target modules | {', '.join(info.target_modules)} |",
    ]
    for label, value in (
        ("steps", info.steps),
        ("learning rate", info.learning_rate),
        ("resolution", info.resolution),
        ("batch size", info.batch_size),
        ("precision", info.precision),
        ("seed", info.seed),
    ):
        if value is not None:
            lines.append(f"| {label} | {_fmt(value)} |")
    lines += [f"| {k} | {v} |" for k, v in info.extra.items()]
    lines.append("")
    if dataset_summary:
        lines += ["## Training data", ""]
        lines += [f"- **{k}**: {_fmt(v)}" for k, v in dataset_summary.items()]
        lines.append("")
    if scores:
        lines += ["## Scores", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {_fmt(v)} |" for k, v in scores.items()]
        lines.append("")
    lines += ["## Files", "", "| file | for | α handling |", "|---|---|---|"]
    purpose = {
        "diffusers": ("diffusers `load_lora_weights`", "α/r baked into the up weights: load at scale 1"),
        "kohya": ("ComfyUI / WebUI (kohya keys)", f"`.alpha` = {_fmt(info.alpha)} per module"),
        "diffsynth": ("DiffSynth-Studio 1.1.9", f"inject with `lora_alpha={float(load_alpha)!r}`"),
    }
    for fmt, name in names.items():
        what, alpha_note = purpose.get(fmt, (fmt, ""))
        lines.append(f"| `{name}` | {what} | {alpha_note} |")
    lines += ["", "## Usage", ""]
    if "diffusers" in names:
        lines += [
            "### diffusers",
            "",
            "```python",
            "import torch",
            "from diffusers import KolorsPipeline",
            "",
            "pipe = KolorsPipeline.from_pretrained(",
            f'    "{info.base_model}", torch_dtype=torch.float16, variant="fp16"',
            ")",
            f'pipe.load_lora_weights("path/to/this/folder", weight_name="{names["diffusers"]}")',
            'pipe.to("cuda")',
            f'prompt = "{info.trigger or "your prompt"}"',
            "image = pipe(prompt, num_inference_steps=50, guidance_scale=4.0).images[0]",
            "```",
            "",
        ]
    if "kohya" in names:
        lines += [
            "### ComfyUI / WebUI",
            "",
            f"Copy `{names['kohya']}` to `ComfyUI/models/loras/` and use the standard **Load LoRA**",
            "node on a Kolors model (e.g. the ComfyUI-Kolors-MZ UNet loader), strength 1.0. Keys are",
            "`lora_unet_down_blocks_…` with a per-module `.alpha`, which ComfyUI maps through",
            "`unet_to_diffusers` for SDXL-architecture UNets. diffusers also reads this file:",
            f'`pipe.load_lora_weights("path/to/this/folder", weight_name="{names["kohya"]}")`.',
            "",
        ]
    if "diffsynth" in names:
        lines += [
            "### DiffSynth-Studio (1.1.9, the challenge baseline)",
            "",
            f"The up weights are pre-scaled for injection with **`lora_alpha={float(load_alpha)!r}`** and",
            f"**`r={info.rank}`** (the baseline notebook's values); other α values change the strength.",
            "",
            "```python",
            "import torch",
            "from diffsynth import ModelManager, SDXLImagePipeline",
            "from peft import LoraConfig, inject_adapter_in_model",
            "from safetensors.torch import load_file",
            "",
            'model_manager = ModelManager(torch_dtype=torch.float16, device="cuda", file_path_list=[',
            '    "models/kolors/Kolors/text_encoder",',
            '    "models/kolors/Kolors/unet/diffusion_pytorch_model.safetensors",',
            '    "models/kolors/Kolors/vae/diffusion_pytorch_model.safetensors",',
            "])",
            "pipe = SDXLImagePipeline.from_model_manager(model_manager)",
            "config = LoraConfig(",
            f'    r={info.rank}, lora_alpha={float(load_alpha)!r}, init_lora_weights="gaussian",',
            '    target_modules=["to_q", "to_k", "to_v", "to_out"],',
            ")",
            "pipe.unet = inject_adapter_in_model(config, pipe.unet)",
            f'lora = load_file("{names["diffsynth"]}")',
            "missing, unexpected = pipe.unet.load_state_dict(lora, strict=False)",
            'assert not unexpected and not [k for k in missing if "lora_" in k]',
            "```",
            "",
            "Or merge it with DiffSynth's own loader, which adds `lora_alpha · B A` (so pass α/r):",
            f'`model_manager.load_lora("{names["diffsynth"]}", '
            f"lora_alpha={_fmt(load_alpha / (info.rank or 1))})` before building the pipeline.",
            "",
        ]
    path = out / "README.md"
    out.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def _fits_full_size_kolors(state_dict: Mapping[str, torch.Tensor]) -> bool:
    """Does any LoRA module have the shape DiffSynth's full-size UNet gives that module?

    No match at all means a differently sized UNet (the tiny test/demo model), which DiffSynth cannot
    load anyway; a partial match is a real mismatch and is left to ``export_diffsynth`` to reject.
    """
    modules, _ = lora_modules(state_dict)
    rank = _uniform_rank(modules)
    name_map = diffsynth_module_map()
    expected = diffsynth_lora_parameter_shapes(rank)
    return any(
        expected.get(f"{name_map.get(module)}.lora_A.default.weight") == tuple(a.shape)
        for module, (a, _) in modules.items()
    )


def export_all(
    lora_dir_or_state_dict: str | os.PathLike[str] | Mapping[str, torch.Tensor],
    info: LoraInfo | None,
    out_dir: str | os.PathLike[str],
    formats: list[str] | tuple[str, ...] = EXPORT_FORMATS,
    *,
    scores: Mapping[str, Any] | None = None,
    dataset_summary: Mapping[str, Any] | None = None,
    load_alpha: float = DEFAULT_DIFFSYNTH_LOAD_ALPHA,
    write_card: bool = True,
) -> dict[str, Path]:
    """Export in every requested format into ``out_dir`` (the job's ``lora/``) plus ``README.md``.

    ``lora_dir_or_state_dict`` is the trainer's save dir (``pytorch_lora_weights.safetensors``), a
    LoRA file, or an in-memory state dict. Returns ``{format: path}`` with ``"card"`` for the README.
    ``diffsynth`` is skipped (with a warning, absent from the result) for a LoRA of a differently sized
    UNet, such as the tiny model of tests and ``make demo``: DiffSynth only has the full-size Kolors.
    """
    unknown = sorted(set(formats) - set(EXPORT_FORMATS))
    if unknown:
        raise ValueError(f"unknown LoRA export format(s) {unknown}; choose from {list(EXPORT_FORMATS)}")
    if isinstance(lora_dir_or_state_dict, Mapping):
        state_dict, metadata = dict(lora_dir_or_state_dict), {}
    else:
        state_dict, metadata = load_lora_file(lora_dir_or_state_dict)
    info, _, _ = resolve_info(info, state_dict, metadata)  # fail once, early, on a bad alpha/rank
    out = Path(out_dir)
    names = _default_file_names(info)
    paths: dict[str, Path] = {}
    for fmt in formats:
        if fmt == "diffusers":
            paths[fmt] = export_diffusers(state_dict, info, out, metadata=metadata)
        elif fmt == "kohya":
            paths[fmt] = export_kohya(state_dict, info, out / names["kohya"], metadata=metadata)
        elif fmt == "diffsynth":
            if not _fits_full_size_kolors(state_dict):
                log.warning(
                    "DiffSynth export skipped: the LoRA belongs to a UNet of another size (DiffSynth 1.1.9 "
                    "hard-codes the full-size Kolors UNet)"
                )
                continue
            paths[fmt] = export_diffsynth(
                state_dict, info, out / names["diffsynth"], load_alpha=load_alpha, metadata=metadata
            )
    if write_card:
        paths["card"] = write_model_card(
            out, info, scores, dataset_summary, files=dict(paths), load_alpha=load_alpha
        )
    return paths
