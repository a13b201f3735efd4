"""Aesthetic scoring against the challenge's own call, on a tiny random predictor in the real format."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from kolors_job.core.errors import InputError
from kolors_job.manifest.spec import ScoreSpec
from kolors_job.models.aesthetic import AestheticScorer, pairwise_consistency
from kolors_job.models.tiny import build_tiny_aesthetic_predictor
from kolors_job.score.challenge import ScoreResult, score_folder, score_story


@pytest.fixture(scope="module")
def predictor_dir(shared_cache: Path) -> Path:
    return build_tiny_aesthetic_predictor(shared_cache / "tiny-aesthetic-score-tests", seed=0)


@pytest.fixture(scope="module")
def scorer(predictor_dir: Path) -> AestheticScorer:
    return AestheticScorer.load(predictor_dir)


def frames(n: int = 4) -> list[Image.Image]:
    rng = np.random.default_rng(1)
    out = [Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)) for _ in range(n - 2)]
    out.append(Image.new("RGB", (40, 40), (250, 200, 10)))
    out.append(Image.new("RGBA", (30, 50), (10, 20, 200, 128)))
    return out


def challenge_score(predictor_dir: Path, image: Image.Image) -> float:
    """The seed code's get_aesthetics_score, verbatim apart from the device."""
    from aesthetics_predictor import AestheticsPredictorV2Linear
    from transformers import CLIPProcessor

    predictor = AestheticsPredictorV2Linear.from_pretrained(predictor_dir)
    processor = CLIPProcessor.from_pretrained(predictor_dir)
    inputs = processor(images=image, return_tensors="pt")
    with torch.no_grad():
        outputs = predictor(**inputs)
    return outputs.logits.tolist()[0][0]


def test_scores_equal_the_challenge_call(scorer: AestheticScorer, predictor_dir: Path) -> None:
    images = frames()
    ours = scorer.score(images)
    direct = [challenge_score(predictor_dir, im) for im in images]
    assert len(ours) == len(images)
    for a, b in zip(ours, direct, strict=True):
        assert abs(a - b) < 1e-6
    assert max(ours) - min(ours) > 1e-3  # different images score differently: the check above is not vacuous


def test_batched_scores_agree(scorer: AestheticScorer) -> None:
    images = frames(6)
    single = scorer.score(images)
    batched = scorer.score(images, batch_size=4)
    assert np.allclose(single, batched, atol=1e-5)


def test_embeddings_are_the_predictors_unit_vectors(scorer: AestheticScorer) -> None:
    images = frames(3)
    emb = scorer.embeddings(images)
    assert emb.shape == (3, scorer.predictor.config.projection_dim) and emb.dtype == torch.float32
    assert torch.allclose(emb.norm(dim=-1), torch.ones(3), atol=1e-5)
    inputs = scorer.processor(images=images[:1], return_tensors="pt")
    with torch.no_grad():
        ref = scorer.predictor(**inputs).hidden_states[0]
    assert torch.allclose(emb[0], ref / ref.norm(), atol=1e-6)


def test_threshold_gate_and_consistency(scorer: AestheticScorer) -> None:
    images = frames(4)
    res = score_story(images, ScoreSpec(threshold=0.0), scorer)
    assert isinstance(res, ScoreResult)
    assert res.mean == pytest.approx(sum(res.per_image) / 4, abs=0)
    assert res.passed is True
    above = score_story(images, ScoreSpec(threshold=min(10.0, res.mean + 1e-3)), scorer)
    assert above.passed is False and above.mean == res.mean
    at = score_story(images, ScoreSpec(threshold=res.mean), scorer)
    assert at.passed is True  # the challenge rejects only mean < threshold

    assert res.consistency is not None and -1.0 <= res.consistency < 0.9999
    same = score_story([images[0]] * 3, ScoreSpec(), scorer)
    assert same.consistency == pytest.approx(1.0, abs=1e-6)
    assert len(set(same.per_image)) == 1
    assert score_story(images[:1], ScoreSpec(), scorer).consistency is None
    assert res.to_dict()["per_image"] == res.per_image


def test_pairwise_consistency_math() -> None:
    e = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    assert pairwise_consistency(e) == pytest.approx((0.0 + 1.0 + 0.0) / 3)


def test_score_folder_mirrors_evaluate(scorer: AestheticScorer, tmp_path: Path) -> None:
    assert score_folder(tmp_path, scorer) == 0
    images = frames(3)
    for i, im in enumerate(images):
        im.save(tmp_path / f"{i + 1:02d}.png")
    (tmp_path / "sub").mkdir()  # directories are skipped, like evaluate's isfile check
    expected = sum(scorer.score([Image.open(tmp_path / f"{i + 1:02d}.png") for i in range(3)])) / 3
    assert score_folder(tmp_path, scorer) == pytest.approx(expected, abs=1e-9)
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(InputError, match=r"notes\.txt"):
        score_folder(tmp_path, scorer)


def test_load_missing_model_is_input_error(tmp_path: Path) -> None:
    with pytest.raises(InputError):
        AestheticScorer.load(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="cannot load"):
        AestheticScorer.load(tmp_path / "empty")
