"""The challenge submission bundle: build it, check it, optionally push it to ModelScope.

The Kolors LoRA story challenge (docs/design.md §7) asks for the LoRA file, a description of it, at
least 8 images with the prompt of each, and rejects entries whose mean aesthetic score is under the
threshold (6 today). ``build_submission`` lays those out in one folder; ``check_submission`` is the
gate a job runs before it reports success (and a person can run on any folder), naming every
problem instead of stopping at the first, so one run shows everything to fix.

Layout::

    submission/
      <lora>.safetensors    the LoRA (usually the ComfyUI/kohya or diffusers export)
      README.md             the LoRA description (the model card)
      01.png … NN.png       the story frames, in story order
      prompts.json          [{"image": "01.png", "prompt": ..., "negative_prompt": ..., "seed": ...}, ...]
      prompts.txt           the same, one "01.png: prompt" line per image, for pasting into the form
      story.jpg             the frames tiled
      score.json            {"aesthetic_mean", "threshold", "passed", "per_image"}
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from kolors_job.core.errors import ExitCode, JobError
from kolors_job.core.redact import scrub

__all__ = [
    "DESCRIPTION_NAME",
    "MIN_IMAGES",
    "PROMPTS_JSON",
    "PROMPTS_TXT",
    "SCORE_NAME",
    "STORY_NAME",
    "SUBMISSION_DIR",
    "build_submission",
    "check_submission",
    "push_to_modelscope",
]

SUBMISSION_DIR = "submission"
MIN_IMAGES = 8
DESCRIPTION_NAME = "README.md"
PROMPTS_JSON = "prompts.json"
PROMPTS_TXT = "prompts.txt"
STORY_NAME = "story.jpg"
SCORE_NAME = "score.json"
DEFAULT_THRESHOLD = 6.0
_IMAGE_NAME = re.compile(r"^\d{2,}\.png$")


def _score_fields(score: Mapping[str, Any]) -> dict[str, Any]:
    """Normalise the scorer's dict: ``mean``/``aesthetic_mean``, ``threshold``, per-image scores."""
    mean = score.get("aesthetic_mean", score.get("mean"))
    threshold = score.get("threshold", DEFAULT_THRESHOLD)
    per_image = score.get("per_image", score.get("scores"))
    out: dict[str, Any] = {"aesthetic_mean": mean, "threshold": threshold}
    if isinstance(mean, (int, float)) and isinstance(threshold, (int, float)):
        out["passed"] = bool(mean >= threshold)
    if per_image is not None:
        out["per_image"] = per_image
    out.update(
        {
            k: v
            for k, v in score.items()
            if k not in {"mean", "aesthetic_mean", "threshold", "per_image", "scores"}
        }
    )
    return out


def build_submission(
    out_dir: str | os.PathLike[str],
    *,
    lora_file: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    model_card: str | os.PathLike[str],
    images: Sequence[str | os.PathLike[str]],
    prompts: Sequence[Mapping[str, Any]],
    story_jpg: str | os.PathLike[str],
    score: Mapping[str, Any],
) -> Path:
    """Create ``out_dir/submission/`` (replacing an older one) and return its path.

    ``lora_file`` is one file or several (e.g. the diffusers, ComfyUI and DiffSynth exports, so a
    reviewer can load it in whichever tool they use). ``model_card`` is the model card file (a
    ``Path``, e.g. ``lora/README.md``) or its text (a ``str`` that is not an existing file).
    ``prompts[i]`` describes ``images[i]`` and must carry ``"prompt"``; other keys (negative prompt,
    seed, sampler) are kept.
    Images that are not PNG are converted, so the folder always holds ``01.png``…. The folder is
    assembled beside the target and renamed into place, so a crash never leaves a half bundle that
    a later check or upload would take for the real one. Run ``check_submission`` on the result:
    this function records the score, it does not judge it.
    """
    from PIL import Image

    if len(prompts) != len(images):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts: each image needs its prompt")
    for i, p in enumerate(prompts, 1):
        if not str(p.get("prompt", "")).strip():
            raise ValueError(f"prompt {i} is empty")
    loras = [Path(lora_file)] if isinstance(lora_file, (str, os.PathLike)) else [Path(p) for p in lora_file]
    if not loras:
        raise ValueError("no LoRA file given")
    for lora in loras:
        if not lora.is_file():
            raise FileNotFoundError(f"LoRA file {lora} does not exist")

    out = Path(out_dir)
    final = out / SUBMISSION_DIR
    tmp = out / f".{SUBMISSION_DIR}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        for lora in loras:
            shutil.copy2(lora, tmp / lora.name)
        if isinstance(model_card, str) and not ("\n" not in model_card and Path(model_card).is_file()):
            (tmp / DESCRIPTION_NAME).write_text(model_card, encoding="utf-8")  # the description text itself
        else:
            shutil.copy2(
                Path(model_card), tmp / DESCRIPTION_NAME
            )  # a path: missing raises, never copied as text

        width = max(2, len(str(len(images))))
        records: list[dict[str, Any]] = []
        for i, (src, prompt) in enumerate(zip(images, prompts, strict=True), 1):
            name = f"{i:0{width}d}.png"
            src = Path(src)
            if src.suffix.lower() == ".png":
                shutil.copy2(src, tmp / name)
            else:
                with Image.open(src) as im:
                    im.save(tmp / name, format="PNG")
            # the frame dict may carry its own "image" (a work-dir path): the bundle's name wins
            records.append({**{k: v for k, v in dict(prompt).items() if k != "image"}, "image": name})
        (tmp / PROMPTS_JSON).write_text(
            json.dumps(records, ensure_ascii=False, indent=2) + "\n", encoding="utf-8"
        )
        lines = []
        for rec in records:
            lines.append(f"{rec['image']}: {rec['prompt']}")
            if rec.get("negative_prompt"):
                lines.append(f"    negative: {rec['negative_prompt']}")
        (tmp / PROMPTS_TXT).write_text("\n".join(lines) + "\n", encoding="utf-8")

        story = Path(story_jpg)
        if story.suffix.lower() in {".jpg", ".jpeg"}:
            shutil.copy2(story, tmp / STORY_NAME)
        else:
            with Image.open(story) as im:
                im.convert("RGB").save(tmp / STORY_NAME, format="JPEG", quality=95)
        (tmp / SCORE_NAME).write_text(
            json.dumps(_score_fields(score), ensure_ascii=False, indent=2) + "\n", encoding="utf-8"
        )

        if final.exists():
            old = out / f".{SUBMISSION_DIR}.old-{uuid.uuid4().hex[:8]}"
            final.rename(old)
            shutil.rmtree(old)
        tmp.rename(final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return final


def _check_lora(folder: Path) -> list[str]:
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return ["LoRA: no .safetensors file in the submission"]
    problems = []
    for f in files:
        try:
            tensors = load_file(str(f))  # reads every tensor: a truncated file fails here, not at upload
        except Exception as e:  # the safetensors errors have no common base class
            problems.append(f"LoRA: {f.name} is not a loadable safetensors file ({type(e).__name__}: {e})")
            continue
        if not any("lora" in k.lower() or k.endswith(".alpha") for k in tensors):
            problems.append(f"LoRA: {f.name} holds no LoRA tensors")
    return problems


def _check_images(folder: Path) -> tuple[list[str], list[str]]:
    from PIL import Image

    names = sorted((p.name for p in folder.iterdir() if _IMAGE_NAME.match(p.name)), key=lambda n: int(n[:-4]))
    problems = []
    if len(names) < MIN_IMAGES:
        problems.append(f"images: {len(names)} found (01.png…), at least {MIN_IMAGES} are required")
    for name in names:
        try:
            with Image.open(folder / name) as im:
                im.verify()  # structure and checksums
            with Image.open(folder / name) as im:
                im.load()  # and the pixels actually decode
        except Exception as e:  # PIL raises many unrelated types for broken files
            problems.append(f"images: {name} does not open ({type(e).__name__}: {e})")
    return names, problems


def _read_json(folder: Path, name: str, part: str, missing: str) -> tuple[Any, list[str]]:
    """The parsed file, or the one problem that stops its check (missing / not JSON)."""
    path = folder / name
    if not path.is_file():
        return None, [f"{part}: {name} is missing{missing}"]
    try:
        return json.loads(path.read_text(encoding="utf-8")), []
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return None, [f"{part}: {name} is not valid JSON ({e})"]


def _check_prompts(folder: Path, images: list[str]) -> list[str]:
    records, problems = _read_json(folder, PROMPTS_JSON, "prompts", "")
    if problems:
        return problems
    if not isinstance(records, list):
        return [f"prompts: {PROMPTS_JSON} must be a list of {{image, prompt}} records"]
    by_image = {
        r.get("image"): r for r in records if isinstance(r, dict) and str(r.get("prompt", "")).strip()
    }
    return [f"prompts: no prompt for {name}" for name in images if name not in by_image]


def _check_score(folder: Path) -> list[str]:
    data, problems = _read_json(folder, SCORE_NAME, "score", ", so the aesthetic mean is not recorded")
    if problems:
        return problems
    if not isinstance(data, dict):
        return [f"score: {SCORE_NAME} must be an object with aesthetic_mean and threshold"]
    mean, threshold = data.get("aesthetic_mean"), data.get("threshold")

    def number(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    if not number(mean):
        return [f"score: the aesthetic mean is not recorded as a number (got {mean!r})"]
    if not number(threshold):
        return [f"score: the threshold is not recorded as a number (got {threshold!r})"]
    if mean < threshold:
        return [f"score: aesthetic mean {mean:.3f} is below the threshold {threshold:.3f}"]
    return []


def check_submission(path: str | os.PathLike[str]) -> list[str]:
    """Every reason the folder would not be a valid challenge entry; empty means it is one.

    Checks: a LoRA ``.safetensors`` that loads and holds LoRA tensors; a non-empty description
    (``README.md``); at least 8 images ``01.png``… that decode; a prompt for every image in
    ``prompts.json``; the aesthetic mean recorded in ``score.json`` and not under its threshold;
    ``story.jpg`` decodes if present (the tiled story is ours, not a challenge requirement).
    """
    from PIL import Image

    folder = Path(path)
    if not folder.is_dir():
        return [f"submission folder {folder} does not exist"]
    problems = _check_lora(folder)
    card = folder / DESCRIPTION_NAME
    if not card.is_file():
        problems.append(f"description: {DESCRIPTION_NAME} is missing")
    elif not card.read_text(encoding="utf-8", errors="replace").strip():
        problems.append(f"description: {DESCRIPTION_NAME} is empty")
    images, image_problems = _check_images(folder)
    problems += image_problems
    problems += _check_prompts(folder, images)
    problems += _check_score(folder)
    story = folder / STORY_NAME
    if story.exists():
        try:
            with Image.open(story) as im:
                im.load()
        except Exception as e:  # PIL raises many unrelated types for broken files
            problems.append(f"story: {STORY_NAME} does not open ({type(e).__name__}: {e})")
    return problems


def push_to_modelscope(
    repo: str,
    folder: str | os.PathLike[str],
    token_env: str = "MODELSCOPE_API_TOKEN",  # noqa: S107 - the variable's name, not a secret
    *,
    visibility: int = 5,
    chinese_name: str | None = None,
    commit_message: str = "Upload Kolors LoRA",
    endpoint: str | None = None,
    max_retries: int | None = None,
) -> str:
    """Create (if needed) the ModelScope model repo ``repo`` and upload ``folder``; returns the model URL.

    The token is read from ``$token_env`` only — never an argument, so it cannot end up in a
    manifest, a log line or a shell history. Any failure becomes one ``JobError`` line with the
    token scrubbed and the SDK's traceback chain dropped (``from None``): network failures exit
    75 (retryable), the rest 1. ``visibility``: 5 public (the challenge entry must be visible),
    1 private. ``endpoint``/``max_retries`` reach an in-region mirror or fail fast in tests.
    """
    token = os.environ.get(token_env, "").strip()
    if not token:
        raise JobError(
            f"push_to_modelscope: ${token_env} is not set (a ModelScope access token is needed)",
            exit_code=ExitCode.INVALID_INPUT,
        )
    src = Path(folder)
    if not src.is_dir():
        raise JobError(f"push_to_modelscope: {src} is not a folder", exit_code=ExitCode.INVALID_INPUT)

    def clean(text: str) -> str:
        return scrub(text).replace(token, "***")

    try:
        from modelscope.hub.api import HubApi

        kwargs: dict[str, Any] = {"token": token}
        if endpoint is not None:
            kwargs["endpoint"] = endpoint
        if max_retries is not None:
            kwargs["max_retries"] = max_retries
        api = HubApi(**kwargs)
        api.login(token)
        api.create_repo(repo, token=token, visibility=visibility, chinese_name=chinese_name, exist_ok=True)
        api.upload_folder(repo_id=repo, folder_path=str(src), commit_message=commit_message, token=token)
    except Exception as e:
        temporary = isinstance(e, (ConnectionError, TimeoutError)) or type(e).__name__ in {
            "ConnectionError",
            "Timeout",
            "ReadTimeout",
            "ConnectTimeout",
            "NetworkError",
        }
        detail = clean(str(e).strip().splitlines()[0] if str(e).strip() else "")
        raise JobError(
            f"ModelScope upload of {src} to {repo} failed: {type(e).__name__}: {detail}",
            exit_code=ExitCode.TEMPORARY if temporary else ExitCode.INTERNAL,
        ) from None
    return f"https://modelscope.cn/models/{repo}"
