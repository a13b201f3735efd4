"""The challenge bundle: a good one passes, and each broken one is rejected with a message naming the problem."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from kolors_job.core.errors import ExitCode, JobError
from kolors_job.report.submission import build_submission, check_submission, push_to_modelscope

N_FRAMES = 8


def _inputs(tmp_path: Path, n: int = N_FRAMES, mean: float = 6.4) -> dict[str, Any]:
    src = tmp_path / "work"
    src.mkdir()
    lora = src / "pytorch_lora_weights.safetensors"
    save_file(
        {
            "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora.down.weight": torch.ones(
                4, 8
            ),
            "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora.up.weight": torch.ones(
                8, 4
            ),
        },
        str(lora),
    )
    images = []
    for i in range(n):
        path = src / f"frame{i}.{'jpg' if i == 0 else 'png'}"  # one JPEG: the bundle must hold PNGs only
        Image.new("RGB", (16, 16), (30 * i, 100, 200)).save(path)
        images.append(path)
    story = src / "story.png"
    Image.new("RGB", (64, 32), "white").save(story)
    card = src / "README.md"
    card.write_text("# purple hair girl\n\nA Kolors LoRA.\n", encoding="utf-8")
    prompts = [
        {
            "image": f"images/{i + 1:02d}.png",
            "prompt": f"二次元，一个紫色短发小女孩，场景 {i}",
            "seed": i,
            "score": 6.4,
        }
        for i in range(n)
    ]
    return {
        "lora_file": lora,
        "model_card": card,
        "images": images,
        "prompts": prompts,
        "story_jpg": story,
        "score": {"mean": mean, "threshold": 6.0, "per_image": [mean] * n, "passed": mean >= 6.0},
    }


@pytest.fixture
def bundle(tmp_path: Path) -> Path:
    return build_submission(tmp_path / "out", **_inputs(tmp_path))


def test_good_bundle_passes_and_has_the_layout(bundle: Path) -> None:
    assert bundle.name == "submission"
    assert check_submission(bundle) == []
    names = {p.name for p in bundle.iterdir()}
    assert {f"{i:02d}.png" for i in range(1, 9)} <= names
    assert {
        "pytorch_lora_weights.safetensors",
        "README.md",
        "prompts.json",
        "prompts.txt",
        "story.jpg",
    } <= names
    with Image.open(bundle / "01.png") as im:
        assert im.format == "PNG"  # converted from the JPEG input
    with Image.open(bundle / "story.jpg") as im:
        assert im.format == "JPEG"
    records = json.loads((bundle / "prompts.json").read_text(encoding="utf-8"))
    assert [r["image"] for r in records] == [f"{i:02d}.png" for i in range(1, 9)]  # not the work-dir path
    assert records[2]["seed"] == 2
    assert "03.png: 二次元，一个紫色短发小女孩，场景 2" in (bundle / "prompts.txt").read_text(
        encoding="utf-8"
    )
    score = json.loads((bundle / "score.json").read_text())
    assert (score["aesthetic_mean"], score["threshold"], score["passed"]) == (6.4, 6.0, True)


def test_rebuild_replaces_the_old_bundle_and_accepts_card_text(tmp_path: Path) -> None:
    inputs = _inputs(tmp_path)
    first = build_submission(tmp_path / "out", **inputs)
    (first / "stale.txt").write_text("old")
    second = build_submission(tmp_path / "out", **{**inputs, "model_card": "# name\n\ndescription text"})
    assert second == first and not (second / "stale.txt").exists()
    assert (second / "README.md").read_text(encoding="utf-8") == "# name\n\ndescription text"
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["submission"]  # no temp dirs left behind


def test_build_refuses_images_without_prompts(tmp_path: Path) -> None:
    inputs = _inputs(tmp_path)
    with pytest.raises(ValueError, match="8 images but 7 prompts"):
        build_submission(tmp_path / "out", **{**inputs, "prompts": inputs["prompts"][:7]})
    with pytest.raises(FileNotFoundError):
        build_submission(tmp_path / "out", **{**inputs, "model_card": Path("/nonexistent/README.md")})


def test_seven_images(tmp_path: Path) -> None:
    bundle = build_submission(tmp_path / "out", **_inputs(tmp_path, n=7))
    assert check_submission(bundle) == ["images: 7 found (01.png…), at least 8 are required"]


def test_missing_prompt(bundle: Path) -> None:
    records = json.loads((bundle / "prompts.json").read_text(encoding="utf-8"))
    records[2]["prompt"] = " "
    del records[5]
    (bundle / "prompts.json").write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    assert check_submission(bundle) == ["prompts: no prompt for 03.png", "prompts: no prompt for 06.png"]


def test_mean_below_threshold(tmp_path: Path) -> None:
    bundle = build_submission(tmp_path / "out", **_inputs(tmp_path, mean=5.8))
    assert check_submission(bundle) == ["score: aesthetic mean 5.800 is below the threshold 6.000"]


def test_corrupt_lora(bundle: Path) -> None:
    lora = bundle / "pytorch_lora_weights.safetensors"
    lora.write_bytes(lora.read_bytes()[:-20])  # truncated upload
    (problem,) = check_submission(bundle)
    assert problem.startswith("LoRA: pytorch_lora_weights.safetensors is not a loadable safetensors file")


def test_every_problem_is_named_at_once(bundle: Path) -> None:
    (bundle / "pytorch_lora_weights.safetensors").unlink()
    (bundle / "README.md").write_text("  \n")
    (bundle / "08.png").unlink()
    (bundle / "02.png").write_bytes(b"not a png")
    (bundle / "score.json").write_text(json.dumps({"threshold": 6.0}))
    (bundle / "story.jpg").write_bytes(b"\xff\xd8broken")
    problems = check_submission(bundle)
    assert problems[0] == "LoRA: no .safetensors file in the submission"
    assert problems[1] == "description: README.md is empty"
    assert problems[2] == "images: 7 found (01.png…), at least 8 are required"
    assert problems[3].startswith("images: 02.png does not open")
    assert problems[4] == "score: the aesthetic mean is not recorded as a number (got None)"
    assert problems[5].startswith("story: story.jpg does not open")
    assert len(problems) == 6
    assert check_submission(bundle.parent / "nope") == [
        f"submission folder {bundle.parent / 'nope'} does not exist"
    ]


def test_lora_without_lora_tensors(bundle: Path) -> None:
    save_file({"weight": torch.zeros(2)}, str(bundle / "pytorch_lora_weights.safetensors"))
    assert check_submission(bundle) == ["LoRA: pytorch_lora_weights.safetensors holds no LoRA tensors"]


def test_push_needs_a_token(bundle: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MODELSCOPE_API_TOKEN", raising=False)
    with pytest.raises(JobError, match=r"\$MODELSCOPE_API_TOKEN is not set") as e:
        push_to_modelscope("team/kolors-lora", bundle)
    assert e.value.exit_code == ExitCode.INVALID_INPUT


def test_push_unreachable_fails_in_one_line_without_the_token(
    bundle: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    token = "ms-0123456789abcdef-secret"
    monkeypatch.setenv("MY_MS_CRED", token)  # a name the generic scrubber would not recognise
    with pytest.raises(JobError) as e:
        push_to_modelscope(
            "team/kolors-lora", bundle, token_env="MY_MS_CRED", endpoint="http://127.0.0.1:9", max_retries=0
        )
    message = str(e.value)
    assert message.startswith(f"ModelScope upload of {bundle} to team/kolors-lora failed: ")
    assert "\n" not in message and token not in message
    assert e.value.__cause__ is None and e.value.__suppress_context__
    assert e.value.exit_code == ExitCode.TEMPORARY
    assert token not in caplog.text
