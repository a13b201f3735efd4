"""Story tiling, report.json/report.html content and safety, and a real headless-browser render."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kolors_job.report.html import RANDOM_WEIGHTS_BANNER, device_info, package_versions, tile_story, write_report

COLORS = [
    (255, 0, 0),
    (0, 255, 0),
    (0, 0, 255),
    (255, 255, 0),
    (0, 255, 255),
    (255, 0, 255),
    (40, 40, 40),
    (255, 128, 0),
]
HOSTILE = '<script>alert("x")</script> & "quotes" \'single\' <img src=x onerror=alert(1)>'


def solid_frames(n: int = 8, size: tuple[int, int] = (64, 64)) -> list[Image.Image]:
    return [Image.new("RGB", size, COLORS[i % len(COLORS)]) for i in range(n)]


def test_tile_eight_frames_reference_layout() -> None:
    grid = tile_story(solid_frames(8))
    assert grid.size == (2048, 1024)
    for i, color in enumerate(COLORS):
        cx, cy = (i % 4) * 512 + 256, (i // 4) * 512 + 256
        assert grid.getpixel((cx, cy)) == color, i


def test_tile_other_counts_and_sizes() -> None:
    five = tile_story(solid_frames(5))
    assert five.size == (2048, 1024)
    assert five.getpixel((256, 768)) == COLORS[4]
    assert five.getpixel((512 + 256, 768)) == (255, 255, 255)  # empty cells are white
    assert tile_story(solid_frames(3)).size == (1536, 512)  # fewer frames than columns: no blank column
    assert tile_story(solid_frames(9)).size == (2048, 1536)  # ceil(9 / 4) = 3 rows
    # the notebook's literal layout: 4 rows × 2 cols, resized to 1024 wide × 2048 high
    tall = tile_story(solid_frames(8), cols=2, size=(1024, 2048))
    assert tall.size == (1024, 2048) and tall.getpixel((768, 256 + 512)) == COLORS[3]
    mixed = [Image.new("RGBA", (64, 64), (0, 0, 0, 0)), Image.new("L", (32, 32), 100)]
    out = tile_story(mixed)
    assert out.mode == "RGB" and out.getpixel((256, 256)) == (255, 255, 255)
    assert out.getpixel((768, 256)) == (100, 100, 100)
    with pytest.raises(ValueError):
        tile_story([])


def make_run(out: Path, *, random_weights: bool = False, threshold: float = 6.0) -> dict:
    (out / "images").mkdir(parents=True)
    frames = []
    for i, img in enumerate(solid_frames(8, (96, 96))):
        rel = f"images/{i + 1:02d}.png"
        img.save(out / rel)
        frames.append(
            {
                "index": i + 1,
                "prompt": HOSTILE if i == 2 else f"二次元，第{i + 1}帧",
                "negative_prompt": "丑陋、变形、嘈杂、模糊、低对比度",
                "seed": [0, 1, 2, 5, 0, 1, 7, 0][i],
                "image": rel,
                "score": 5.5 + 0.2 * i,
            }
        )
    scores = [f["score"] for f in frames]
    return {
        "job_id": "purple-hair-girl",
        "manifest_digest": "ab" * 32,
        "created": "2026-11-24T10:00:00Z",
        "model": {"base": "tiny://kolors", "vae": None, "random_weights": random_weights},
        "dataset": {
            "source": "modelscope://AI-ModelScope/lowres_anime",
            "kept": 10,
            "examined": 14,
            "not_examined": 0,
            "skipped": {"too_small": 3, "corrupt": 1},
            "skipped_examples": {"too_small": ["a.png", "b.png", "<evil>.png"], "corrupt": ["c.jpg"]},
            "captions_truncated": 0,
            "notes": {},
        },
        "train": {
            "steps": 50,
            "losses": [1.0 / (i + 1) for i in range(50)],
            "seconds": 12.5,
            "precision": "fp32",
        },
        "story": {
            "frames": frames,
            "settings": {"cfg_scale": 4.0, "steps": 50, "width": 1024, "height": 1024},
        },
        "score": {
            "per_image": scores,
            "mean": sum(scores) / 8,
            "threshold": threshold,
            "passed": sum(scores) / 8 >= threshold,
            "consistency": 0.83,
        },
        "timings": {"dataset": 1.5, "train": 12.5, "story": 3.25, "score": 0.5},
        "device": {"name": "cpu", "peak_memory_bytes": None},
        "versions": {"torch": "2.14.1", "diffusers": "0.39.0"},
        "manifest": {"apiVersion": "kolors-job/v1", "spec": {"story": {"frames": [{"prompt": HOSTILE}]}}},
    }


def test_write_report_json_and_html(tmp_path: Path) -> None:
    report = make_run(tmp_path)
    paths = write_report(tmp_path, report)
    assert [p.name for p in paths] == ["report.json", "report.html"]

    assert json.loads((tmp_path / "report.json").read_text(encoding="utf-8")) == report
    assert "二次元" in (tmp_path / "report.json").read_text(encoding="utf-8")  # ensure_ascii=False

    page = (tmp_path / "report.html").read_text(encoding="utf-8")
    imgs = re.findall(r"<img\b[^>]*>", page)
    assert len(imgs) == 8
    assert all(re.search(r'src="data:image/jpeg;base64,[A-Za-z0-9+/=]+"', tag) for tag in imgs)
    assert not re.search(r"(?i)\b(?:https?|ftp)://|//[a-z0-9-]+\.[a-z]", page)  # no external URL
    assert "<script" not in page.lower() and "<img src=x" not in page
    assert "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;" in page  # jinja2's autoescape (markupsafe)
    assert "&lt;img src=x onerror=alert(1)&gt;" in page and "&lt;evil&gt;.png" in page
    assert page.count('<figure class="pass"') == 5 and page.count('<figure class="fail"') == 3  # 6.1+ pass
    assert page.count("<polyline") == 2  # raw loss + moving average
    assert RANDOM_WEIGHTS_BANNER not in page
    for text in ("purple-hair-girl", "0.830", "too_small", "12.5 s", "2.14.1", "apiVersion: kolors-job/v1"):
        assert text in page, text

    # the frames really are the right images: decode the first data URI
    import base64
    import io

    first = re.search(r'src="data:image/jpeg;base64,([^"]+)"', imgs[0]).group(1)
    thumb = Image.open(io.BytesIO(base64.b64decode(first)))
    r, g, b = thumb.convert("RGB").getpixel((48, 48))
    assert r > 240 and g < 15 and b < 15


class _Elements(HTMLParser):
    """The page as a browser's parser sees it: every start tag, and the text of each ``p.prompt``."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[str] = []
        self.prompts: list[str] = []
        self._in_prompt = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        self._in_prompt = tag == "p" and ("class", "prompt") in attrs
        if self._in_prompt:
            self.prompts.append("")

    def handle_endtag(self, tag: str) -> None:
        self._in_prompt = False

    def handle_data(self, data: str) -> None:
        if self._in_prompt:
            self.prompts[-1] += data


def test_hostile_input_is_text_not_markup(tmp_path: Path) -> None:
    report = make_run(tmp_path)
    report["job_id"] = HOSTILE
    report["dataset"]["skipped_examples"]["corrupt"] = [HOSTILE]
    report["versions"]["<script>"] = HOSTILE
    write_report(tmp_path, report)
    parser = _Elements()
    parser.feed((tmp_path / "report.html").read_text(encoding="utf-8"))
    assert not {"script", "iframe", "object", "embed", "link", "base"} & set(parser.tags)
    assert parser.prompts[2] == HOSTILE  # shown verbatim, as text
    assert parser.tags.count("img") == 8  # the frames' own, no injected one


def test_random_weights_banner_missing_images_and_nan(tmp_path: Path) -> None:
    report = make_run(tmp_path, random_weights=True)
    report["story"]["frames"][0]["image"] = "../../etc/passwd"  # never read outside the run dir
    report["story"]["frames"][1]["image"] = "images/nope.png"
    report["train"]["losses"][3] = float("nan")
    write_report(tmp_path, report)
    page = (tmp_path / "report.html").read_text(encoding="utf-8")
    assert RANDOM_WEIGHTS_BANNER in page and 'class="banner"' in page
    assert len(re.findall(r"<img\b", page)) == 6 and page.count("image missing") == 2
    data = json.loads((tmp_path / "report.json").read_text(encoding="utf-8"))
    assert data["train"]["losses"][3] is None  # strict JSON: NaN -> null


def test_secrets_are_scrubbed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OSS_ACCESS_KEY_SECRET", "s3cr3t-value-xyz")
    report = make_run(tmp_path)
    report["story"]["frames"][0]["prompt"] = "leak s3cr3t-value-xyz here"
    report["dataset"]["source"] = "s3://AKID:s3cr3t-value-xyz@bucket/data/"
    write_report(tmp_path, report)
    for name in ("report.json", "report.html"):
        assert "s3cr3t-value-xyz" not in (tmp_path / name).read_text(encoding="utf-8")


def test_empty_report_still_renders(tmp_path: Path) -> None:
    write_report(tmp_path, {"job_id": "x"})
    page = (tmp_path / "report.html").read_text(encoding="utf-8")
    assert "not scored" in page and "no frames" in page


def test_versions_and_device() -> None:
    versions = package_versions()
    for key in (
        "torch",
        "diffusers",
        "transformers",
        "peft",
        "accelerate",
        "diffsynth",
        "kolors-job",
        "python",
    ):
        assert versions.get(key)
    assert versions["torch"].startswith("2.")
    info = device_info()
    assert isinstance(info["name"], str) and info["name"]
    if info["name"] == "cpu":
        assert info["peak_memory_bytes"] is None
    else:
        assert isinstance(info["peak_memory_bytes"], int)


CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (apt-get install chromium)")
def test_report_renders_in_headless_chromium(tmp_path: Path) -> None:
    run = tmp_path / "run"
    write_report(run, make_run(run, random_weights=True))
    shot = tmp_path / "shot.png"
    cmd = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--no-first-run",
        "--disable-component-update",
        "--disable-sync",
        "--hide-scrollbars",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--window-size=1280,1800",
        f"--screenshot={shot}",
        (run / "report.html").as_uri(),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=90)
    assert shot.is_file(), proc.stderr[-2000:]
    img = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert img.shape[0] >= 1000 and img.shape[1] >= 1200
    assert img.std() > 10  # not blank
    # the embedded frames rendered: each frame colour covers a visible area of the screenshot
    for color in COLORS[:8]:  # all 8 frames are visible
        close = (np.abs(img - np.array(color)).sum(axis=2) < 30).sum()
        assert close > 2000, color


def test_validation_strip_per_checkpoint(tmp_path: Path) -> None:
    """One table row per validated checkpoint with a thumbnail per frame; the selected one marked."""
    report = make_run(tmp_path)
    report["validation"] = []
    for step, color in ((100, COLORS[0]), (200, COLORS[1])):
        images = []
        for index in (1, 8):
            rel = f"validation/step-{step}/{index:02d}.png"
            (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (64, 64), color).save(tmp_path / rel)
            images.append(rel)
        report["validation"].append(
            {"step": step, "images": images, "scores": [5.0, 5.2], "mean_aesthetic": 5.1, "consistency": 0.9}
        )
    report["selected_checkpoint"] = {"step": 200, "reason": "best_aesthetic: test", "mean_aesthetic": 5.1}
    write_report(tmp_path, report)
    assert json.loads((tmp_path / "report.json").read_text())["validation"] == report["validation"]
    page = (tmp_path / "report.html").read_text()
    rows = re.findall(r'<tr class="vstep( selected)?" data-step="(\d+)">(.*?)</tr>', page, re.S)
    assert [(sel, step) for sel, step, _ in rows] == [("", "100"), (" selected", "200")]
    assert all(len(re.findall(r'<img src="data:image/jpeg;base64,', body)) == 2 for _, _, body in rows)
    assert "story and LoRA files from step 200: best_aesthetic: test" in page
