"""Export a trained Kolors UNet LoRA so it loads everywhere: diffusers, ComfyUI/WebUI and DiffSynth.

The trainer hands us what ``KolorsPipeline.save_lora_weights(dir, unet_lora_layers=
convert_state_dict_to_diffusers(get_peft_model_state_dict(unet)))`` writes (diffusers 0.39:
``unet.<module>.lora.down.weight`` / ``.lora.up.weight``); peft (``lora_A``/``lora_B``), old
attention-processor (``processor.to_q_lora.down``), kohya and DiffSynth keys are accepted too
(``lora_io``). Each format is a module that registers itself (``registry``), and each makes the
effective update ``(α / r) · B A`` explicit for its consumer:

==========  ===============================================  ======================================
format      keys                                             how α survives
==========  ===============================================  ======================================
diffusers   ``unet.<diffusers module>.lora.down/up.weight``  α/r baked into B (loaders use α = r);
                                                             diffusers only: ComfyUI maps none of
                                                             these keys and reads the kohya file
kohya       ``lora_unet_<diffusers module, . → _>``          ``.alpha`` = α per module, B untouched
            ``.lora_down/.lora_up.weight``, ``.alpha``
diffsynth   ``<DiffSynth module>.lora_A/B.default.weight``   B · α/α_load for the reference's α_load
            (``.safetensors`` + the same as ``.ckpt``)
==========  ===============================================  ======================================
"""

from __future__ import annotations

from kolors_job.export import diffsynth, kohya, peft_diffusers  # noqa: F401 - each registers its format
from kolors_job.export.bundle import export_all
from kolors_job.export.card import render_model_card, write_model_card
from kolors_job.export.diffsynth import (
    DEFAULT_DIFFSYNTH_LOAD_ALPHA,
    DIFFSYNTH_TARGET_MODULES,
    diffsynth_lora_parameter_shapes,
    diffsynth_state_dict,
    export_diffsynth,
    fits_full_size_kolors,
    model_manager_alpha,
)
from kolors_job.export.diffsynth_names import diffsynth_module_map
from kolors_job.export.kohya import export_kohya, kohya_state_dict
from kolors_job.export.lora_io import (
    DIFFUSERS_WEIGHT_NAME,
    LORA_CONFIG_NAME,
    LORA_WEIGHT_NAME,
    LoraInfo,
    canonical_safetensors,
    load_lora_file,
    lora_modules,
    resolve_info,
)
from kolors_job.export.peft_diffusers import diffusers_state_dict, export_diffusers
from kolors_job.export.registry import (
    ExportFormat,
    ExportSource,
    applicable_formats,
    default_format_names,
    format_names,
    get_format,
    register,
    unregister,
)

EXPORT_FORMATS = default_format_names()
"""The built-in formats (``diffusers``, ``kohya``, ``diffsynth``); ``format_names()`` also lists any added later."""

__all__ = [
    "DEFAULT_DIFFSYNTH_LOAD_ALPHA",
    "DIFFSYNTH_TARGET_MODULES",
    "DIFFUSERS_WEIGHT_NAME",
    "EXPORT_FORMATS",
    "LORA_CONFIG_NAME",
    "LORA_WEIGHT_NAME",
    "ExportFormat",
    "ExportSource",
    "LoraInfo",
    "applicable_formats",
    "canonical_safetensors",
    "default_format_names",
    "diffsynth_lora_parameter_shapes",
    "diffsynth_module_map",
    "diffsynth_state_dict",
    "diffusers_state_dict",
    "export_all",
    "export_diffsynth",
    "export_diffusers",
    "export_kohya",
    "fits_full_size_kolors",
    "format_names",
    "get_format",
    "kohya_state_dict",
    "load_lora_file",
    "lora_modules",
    "model_manager_alpha",
    "register",
    "render_model_card",
    "resolve_info",
    "unregister",
    "write_model_card",
]
