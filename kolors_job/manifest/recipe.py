"""The two recipes: ``reference`` (the challenge notebook's workflow, as DiffSynth ran it in 2024-08) and
``tuned`` (kolors-job's own choices), each one value per switch.

A recipe only fills the switches a manifest leaves unset, so every switch stays settable on its own.
The models' field defaults are the reference column (``TrainSpec()`` is the reference's), and
``tests/test_recipe.py`` keeps the two in step. Where each reference value comes from is in
``tests/reference/reference.yaml``; why the tuned value differs is in the README's "Differences from the
reference".
"""

from __future__ import annotations

from typing import Any, Literal

RecipeName = Literal["reference", "tuned"]
RECIPES: tuple[RecipeName, ...] = ("reference", "tuned")

REFERENCE_TRAIN_VAE = "modelscope://AI-ModelScope/sdxl-vae-fp16-fix"
"""What DiffSynth's ``download_models(["SDXL-vae-fp16-fix"])`` fetches; its Kolors trainer encodes with it."""

SWITCHES: dict[str, tuple[Any, Any]] = {
    # path under spec: (reference, tuned)
    "model.train_vae": (REFERENCE_TRAIN_VAE, None),
    "train.resize_filter": ("bilinear", "lanczos"),
    "train.latent": ("mean", "sample"),
    "train.time_ids": ("target", "crop"),
    "train.data_order": ("random", "shuffle"),
    "train.exif_orientation": (False, True),
    "train.jpeg_reencode": (2, 0),
    "story.tiling": ("notebook", "lanczos"),
}
"""Every choice on which the two recipes differ."""


def recipe_value(path: str, recipe: RecipeName) -> Any:
    return SWITCHES[path][RECIPES.index(recipe)]


def fill_switches(spec: dict[str, Any], recipe: RecipeName) -> dict[str, Any]:
    """``spec`` (a manifest's raw ``spec`` mapping) with each switch it does not set taken from ``recipe``.

    Only the tuned recipe writes anything: the models' defaults are the reference's already. A section
    that is not a mapping is left for validation to reject."""
    if recipe == "reference":
        return spec
    out = dict(spec)
    for path, values in SWITCHES.items():
        section, field = path.split(".")
        node = out.get(section, {})
        if not isinstance(node, dict):
            continue
        if field not in node:
            out[section] = {**node, field: values[1]}
    return out


def switch_values(spec: Any) -> dict[str, Any]:
    """``{path: value}`` of every switch in a validated ``Spec`` (what report.json and prompts.json record)."""
    out: dict[str, Any] = {}
    for path in SWITCHES:
        section, field = path.split(".")
        out[path] = getattr(getattr(spec, section), field)
    return out


def describe(spec: Any) -> dict[str, Any]:
    """The recipe record: its name, every switch's value, and the switches set away from that recipe."""
    values = switch_values(spec)
    name: RecipeName = spec.recipe
    return {
        "name": name,
        "switches": values,
        "overridden": sorted(p for p, v in values.items() if v != recipe_value(p, name)),
    }
