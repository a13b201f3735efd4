"""``spec.recipe``: the reference by default, ``tuned`` as one named set of switches, each settable on its own.

What the reference's values *are* is tests/test_reference_oracle.py's business (against the reference's own
sources); here: the recipes fill exactly the switches a manifest leaves unset, and the record says so.
"""

from __future__ import annotations

import pytest

from kolors_job.data.images import resized_size
from kolors_job.manifest.load import parse_manifest
from kolors_job.manifest.recipe import SWITCHES, describe, recipe_value, switch_values
from kolors_job.manifest.spec import Manifest, ModelSpec
from kolors_job.manifest.story import StorySpec
from kolors_job.manifest.train import TrainSpec
from kolors_job.train.data import SampleStream

OUT = "  output: {uri: file:///tmp/out/}\n"


def _spec(extra: str = "") -> Manifest:
    return parse_manifest("spec:\n" + OUT + extra)


def test_the_models_defaults_are_the_reference_column() -> None:
    """``TrainSpec()`` & co. are the reference's, so code that builds a section alone gets the reference too."""
    sections = {"model": ModelSpec(), "train": TrainSpec(), "story": StorySpec()}
    for path, (reference, _) in SWITCHES.items():
        section, field = path.split(".")
        assert getattr(sections[section], field) == reference, path
    assert switch_values(_spec().spec) == {p: v[0] for p, v in SWITCHES.items()}


def test_tuned_fills_every_switch_and_each_stays_settable() -> None:
    tuned = _spec("  recipe: tuned\n").spec
    assert switch_values(tuned) == {p: v[1] for p, v in SWITCHES.items()}
    assert describe(tuned) == {"name": "tuned", "switches": switch_values(tuned), "overridden": []}
    for path, (reference, _) in SWITCHES.items():
        section, field = path.split(".")
        yaml_value = "null" if reference is None else str(reference).lower() if isinstance(reference, bool) else reference
        one = _spec(f"  recipe: tuned\n  {section}: {{{field}: {yaml_value}}}\n").spec
        assert switch_values(one) == {p: (reference if p == path else v[1]) for p, v in SWITCHES.items()}
        assert describe(one)["overridden"] == [path]


def test_a_set_switch_wins_over_the_reference_recipe_too() -> None:
    spec = _spec("  train: {resize_filter: lanczos}\n  story: {tiling: lanczos}\n").spec
    assert describe(spec)["overridden"] == ["story.tiling", "train.resize_filter"]
    assert spec.train.latent == recipe_value("train.latent", "reference")


def test_the_resolved_manifest_round_trips_and_the_recipes_are_different_work() -> None:
    """``manifest.resolved.yaml`` holds every switch's value: read back it is the same job (a rerun finds its
    output), and the two recipes are different jobs (different digests)."""
    for extra in ("", "  recipe: tuned\n", "  recipe: tuned\n  train: {latent: mean}\n"):
        m = _spec(extra)
        again = parse_manifest(m.to_yaml())
        assert again == m and again.digest() == m.digest()
    assert _spec().digest() != _spec("  recipe: tuned\n").digest()


def test_an_unknown_recipe_is_one_line() -> None:
    from kolors_job.core.errors import ManifestError

    with pytest.raises(ManifestError) as e:
        _spec("  recipe: fancy\n")
    assert e.value.problems == ["spec.recipe: Input should be 'reference' or 'tuned'"]


def test_the_reference_long_side_is_floored_like_torchvision_and_tuned_rounds() -> None:
    from torchvision.transforms import functional

    # 1024 * 1537 / 1100 = 1430.8: torchvision's Resize(1024) gives 1430 (checked against torchvision itself)
    assert functional._compute_resized_output_size((1100, 1537), [1024]) == [1024, 1430]
    assert resized_size(1537, 1100, 1024, "bilinear") == (1430, 1024)
    assert resized_size(1537, 1100, 1024, "lanczos") == (1431, 1024)
    assert resized_size(1100, 1537, 1024, "bilinear") == (1024, 1430)
    assert resized_size(2048, 1024, 1024, "bilinear") == resized_size(2048, 1024, 1024, "lanczos") == (2048, 1024)


def test_the_random_data_order_is_a_function_of_the_sample_index() -> None:
    """A resumed or DDP-split run sees the same images: sample g's image depends on (seed, g) alone."""
    a, b = SampleStream(5, 3, "random"), SampleStream(5, 3, "random")
    forward = [a.item(g) for g in range(200)]
    assert [b.item(g) for g in reversed(range(200))][::-1] == forward
    assert forward != [SampleStream(5, 4, "random").item(g) for g in range(200)]
    assert sorted(set(forward)) == list(range(5))
    with pytest.raises(ValueError, match="unknown data order"):
        SampleStream(5, 3, "sorted")
