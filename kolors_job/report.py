"""The run's human-facing output: the tiled story strip, report.json and a self-contained report.html.

report.html is opened from buckets, e-mail attachments and air-gapped consoles, so it carries
everything inline: frames as JPEG ``data:`` URIs, CSS in a ``<style>``, the loss curve as an SVG
polyline drawn here; no script and no external URL (a Content-Security-Policy forbids loading any).
Prompts, file names and manifest values are user input: every piece of text goes through
``html.escape``, and every string is scrubbed of credential values before it is written anywhere.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
import platform
from collections.abc import Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any, TypedDict

from PIL import Image

from kolors_job.redact import scrub
from kolors_job.storage.base import atomic_target

__all__ = [
    "RANDOM_WEIGHTS_BANNER",
    "DatasetInfo",
    "DeviceInfo",
    "FrameInfo",
    "ModelInfo",
    "ReportData",
    "ScoreInfo",
    "StoryInfo",
    "TrainInfo",
    "device_info",
    "package_versions",
    "render_html",
    "tile_story",
    "write_report",
]

RANDOM_WEIGHTS_BANNER = "weights are random: images are noise-like, scores are meaningless"
THUMBNAIL_SIDE = 512
TILE_SIDE = 512
"""Default cell size of ``tile_story``: 8 frames in 2×4 give the reference's 2048×1024 strip."""

VERSION_PACKAGES = (
    "torch",
    "diffusers",
    "transformers",
    "peft",
    "accelerate",
    "diffsynth",
    "simple-aesthetics-predictor",
    "modelscope",
    "pillow",
    "kolors-job",
)


# --------------------------------------------------------------------------------------------- schema


class ModelInfo(TypedDict, total=False):
    base: str
    vae: str | None
    random_weights: bool
    """True for ``tiny://`` or random full-size weights: the HTML shows a warning banner."""


class DatasetInfo(TypedDict, total=False):
    """``kolors_job.dataset.DatasetReport.to_dict()``."""

    source: str
    kept: int
    examined: int
    not_examined: int
    skipped: dict[str, int]
    skipped_examples: dict[str, list[str]]
    captions_truncated: int
    notes: dict[str, int]


class TrainInfo(TypedDict, total=False):
    steps: int
    losses: list[float]
    """One loss per optimizer step (index = step - 1), or ``[step, loss]`` pairs."""
    seconds: float
    precision: str
    # free-form extras (rank, alpha, learning_rate, batch_size, resolution, gradient_checkpointing, ...)
    # are shown as a key/value table


class FrameInfo(TypedDict, total=False):
    index: int
    prompt: str
    negative_prompt: str
    seed: int
    image: str
    """Path relative to the report's directory, e.g. ``images/01.png``."""
    score: float | None


class StoryInfo(TypedDict, total=False):
    frames: list[FrameInfo]
    settings: dict[str, Any]
    """Sampler settings: cfg_scale, steps, width, height, scheduler, lora_scale, ..."""
    sampler: dict[str, Any]
    """``generate.sampler_record``: the sampler actually used, its timesteps, sampling and LoRA-fusion dtype."""


class ScoreInfo(TypedDict, total=False):
    """``kolors_job.score.ScoreResult.to_dict()``."""

    per_image: list[float]
    mean: float
    threshold: float
    passed: bool
    consistency: float | None


class DeviceInfo(TypedDict, total=False):
    name: str
    peak_memory_bytes: int | None


class ReportData(TypedDict, total=False):
    """The keys ``write_report`` understands; every one is optional (a failed run reports what it has).

    ``manifest`` is the resolved, redacted manifest (``Manifest.resolved()``), shown as YAML.
    """

    job_id: str
    manifest_digest: str
    created: str
    model: ModelInfo
    dataset: DatasetInfo
    train: TrainInfo
    story: StoryInfo
    score: ScoreInfo
    timings: dict[str, float]
    device: DeviceInfo
    versions: dict[str, str]
    manifest: dict[str, Any]


# --------------------------------------------------------------------------------------------- facts


def package_versions() -> dict[str, str]:
    """Versions of the packages that decide the numbers (reproducibility is a judging criterion)."""
    out = {"python": platform.python_version()}
    for name in VERSION_PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def device_info() -> dict[str, Any]:
    """Accelerator name and peak memory of this process (CUDA allocator peak; host peak RSS too)."""
    import torch

    info: dict[str, Any] = {"name": "cpu", "peak_memory_bytes": None, "cuda": None, "count": 0}
    try:
        import resource

        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        info["peak_host_memory_bytes"] = int(rss) * (1 if platform.system() == "Darwin" else 1024)
    except (ImportError, OSError):
        pass
    if torch.cuda.is_available():
        idx = torch.cuda.current_device()
        props = torch.cuda.get_device_properties(idx)
        info.update(
            name=torch.cuda.get_device_name(idx),
            peak_memory_bytes=int(torch.cuda.max_memory_allocated(idx)),
            total_memory_bytes=int(props.total_memory),
            cuda=torch.version.cuda,
            count=torch.cuda.device_count(),
        )
    else:
        info["cpu"] = platform.processor() or platform.machine()
    return info


# --------------------------------------------------------------------------------------------- tiling


def _rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        bg.alpha_composite(rgba)
        return bg.convert("RGB")
    return img.convert("RGB")


def tile_story(
    images: Sequence[Image.Image], cols: int = 4, size: tuple[int, int] | None = None
) -> Image.Image:
    """Tile frames row-major into ``ceil(n / cols)`` rows and resize the grid to ``size`` (w, h).

    Cells take the first frame's size (others are resized to it); empty cells are white. With
    ``size=None`` each cell becomes 512 px wide, so 8 square frames give 2048×1024 (design.md §7).
    """
    if not images:
        raise ValueError("tile_story needs at least one image")
    cols = max(1, min(cols, len(images)))
    rows = math.ceil(len(images) / cols)
    cell_w, cell_h = images[0].size
    grid = Image.new("RGB", (cols * cell_w, rows * cell_h), (255, 255, 255))
    for i, img in enumerate(images):
        frame = _rgb(img)
        if frame.size != (cell_w, cell_h):
            frame = frame.resize((cell_w, cell_h), Image.Resampling.LANCZOS)
        grid.paste(frame, ((i % cols) * cell_w, (i // cols) * cell_h))
    target = size or (cols * TILE_SIDE, max(1, round(rows * TILE_SIDE * cell_h / cell_w)))
    if grid.size != tuple(target):
        grid = grid.resize(tuple(target), Image.Resampling.LANCZOS)
    return grid


# --------------------------------------------------------------------------------------------- writing


def _clean(node: Any) -> Any:
    """Scrub secrets from every string; non-finite floats become None (strict JSON has no NaN)."""
    if isinstance(node, Mapping):
        return {str(scrub(str(k))): _clean(v) for k, v in node.items()}
    if isinstance(node, (list, tuple)):
        return [_clean(v) for v in node]
    if isinstance(node, str):
        return scrub(node)
    if isinstance(node, float) and not math.isfinite(node):
        return None
    if isinstance(node, (bool, int, float)) or node is None:
        return node
    return scrub(str(node))  # Path, enum, datetime...: their text form


def _write_atomic(path: Path, text: str) -> None:
    with atomic_target(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_report(out_dir: Path, report: Mapping[str, Any]) -> list[Path]:
    """Write ``report.json`` and ``report.html`` into ``out_dir``; returns both paths.

    Frame images are read from ``out_dir / frame["image"]`` (relative paths only; anything that
    would resolve outside ``out_dir`` is not embedded).
    """
    out_dir = Path(out_dir)
    data = _clean(dict(report))
    json_path, html_path = out_dir / "report.json", out_dir / "report.html"
    _write_atomic(json_path, json.dumps(data, ensure_ascii=False, indent=2, allow_nan=False) + "\n")
    _write_atomic(html_path, render_html(data, out_dir))
    return [json_path, html_path]


# --------------------------------------------------------------------------------------------- html

_CSS = """
:root{--ok:#1a7f37;--bad:#cf222e;--mute:#57606a;--line:#d0d7de;--bg:#f6f8fa}
*{box-sizing:border-box}
body{font:14px/1.5 system-ui,-apple-system,"Segoe UI","Noto Sans CJK SC","PingFang SC",sans-serif;
margin:0 auto;max-width:1280px;padding:16px 24px;color:#1f2328}
h1{font-size:22px;margin:8px 0}h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid var(--line)}
.meta{color:var(--mute);word-break:break-all}
.banner{background:#fff8c5;border:2px solid #d4a72c;padding:10px 14px;font-weight:700;margin:8px 0}
.gate{display:flex;gap:24px;align-items:center;flex-wrap:wrap;background:var(--bg);padding:12px 16px}
.big{font-size:28px;font-weight:700}.badge{padding:2px 10px;border-radius:12px;color:#fff;font-weight:700}
.badge.pass{background:var(--ok)}.badge.fail{background:var(--bad)}.badge.none{background:var(--mute)}
.strip{display:grid;grid-template-columns:repeat(4,minmax(0,1fr));gap:12px}
@media (max-width:760px){.strip{grid-template-columns:repeat(2,minmax(0,1fr))}}
figure{margin:0;border:2px solid var(--line);border-radius:6px;overflow:hidden;background:#fff}
figure.pass{border-color:var(--ok)}figure.fail{border-color:var(--bad)}
figure img{display:block;width:100%;height:auto;background:var(--bg)}
.missing{padding:40px 8px;text-align:center;color:var(--mute);background:var(--bg)}
figcaption{padding:6px 8px}.fhead{display:flex;justify-content:space-between;font-weight:700}
.pass .score{color:var(--ok)}.fail .score{color:var(--bad)}
.prompt{margin:4px 0;white-space:pre-wrap;word-break:break-word}
.small{color:var(--mute);font-size:12px;white-space:pre-wrap;word-break:break-word;margin:2px 0}
table{border-collapse:collapse;margin:4px 0}td,th{border:1px solid var(--line);padding:3px 8px;
text-align:left;vertical-align:top}th{background:var(--bg)}td.num{text-align:right;font-variant-numeric:tabular-nums}
pre{background:var(--bg);padding:12px;overflow:auto;white-space:pre-wrap;word-break:break-word}
svg{background:#fff;border:1px solid var(--line);max-width:100%;height:auto}
.raw{fill:none;stroke:#8c959f;stroke-width:1}.ema{fill:none;stroke:#0969da;stroke-width:2}
.axis{stroke:#57606a;stroke-width:1}.lbl{font-size:11px;fill:#57606a}
"""

_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _num(value: Any, digits: int = 4) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return _e(value if value is not None else "—")
    if isinstance(value, int):
        return f"{value:,}"
    if digits < 0:  # compact: 4.0 -> "4", 0.0001 -> "0.0001", 12.5 -> "12.5"
        return f"{value:.6g}"
    return f"{value:.{digits}f}" if abs(value) < 1e6 else f"{value:.4g}"


def _bytes(n: Any) -> str:
    if not isinstance(n, (int, float)) or isinstance(n, bool):
        return "—"
    return f"{n / 2**30:.2f} GiB"


def _kv_table(items: Mapping[str, Any]) -> str:
    if not items:
        return '<p class="small">not recorded</p>'
    rows = []
    for k, v in items.items():
        if isinstance(v, (dict, list)):
            cell = f"<td>{_e(json.dumps(v, ensure_ascii=False))}</td>"
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            cell = f'<td class="num">{_num(v, -1)}</td>'
        else:
            cell = f"<td>{_e(v)}</td>"
        rows.append(f"<tr><th>{_e(k)}</th>{cell}</tr>")
    return "<table>" + "".join(rows) + "</table>"


def _thumbnail_uri(out_dir: Path, rel: Any) -> str | None:
    """A JPEG ``data:`` URI of ``out_dir/rel``; None if missing, unreadable or outside ``out_dir``."""
    if not isinstance(rel, str) or not rel or os.path.isabs(rel):
        return None
    base = os.path.realpath(out_dir)
    path = os.path.realpath(os.path.join(base, rel))
    if not path.startswith(base.rstrip(os.sep) + os.sep) or not os.path.isfile(path):
        return None
    try:
        with Image.open(path) as img:
            img.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE), Image.Resampling.LANCZOS)
            buf = io.BytesIO()
            _rgb(img).save(buf, "JPEG", quality=85)
    except Exception:  # a broken frame must not cost the whole report
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _frame_html(frame: Mapping[str, Any], threshold: Any, out_dir: Path, position: int) -> str:
    index = frame.get("index", position + 1)
    score = frame.get("score")
    cls = "none"
    if _is_num(score) and _is_num(threshold):
        cls = "pass" if score >= threshold else "fail"
    uri = _thumbnail_uri(out_dir, frame.get("image"))
    picture = (
        f'<img src="{uri}" alt="frame {_e(index)}" loading="lazy">'
        if uri
        else f'<div class="missing">image missing: {_e(frame.get("image"))}</div>'
    )
    neg = frame.get("negative_prompt")
    return (
        f'<figure class="{cls}">{picture}<figcaption>'
        f'<div class="fhead"><span>#{_e(index)}</span><span class="score">'
        f"{_num(score, 3) if _is_num(score) else 'not scored'}</span></div>"
        f'<p class="prompt">{_e(frame.get("prompt"))}</p>'
        + (f'<p class="small">negative: {_e(neg)}</p>' if neg else "")
        + f'<p class="small">seed {_e(frame.get("seed"))}</p></figcaption></figure>'
    )


def _loss_points(losses: Any) -> list[tuple[float, float]]:
    points: list[tuple[float, float]] = []
    if not isinstance(losses, list):
        return points
    for i, item in enumerate(losses):
        if isinstance(item, (list, tuple)) and len(item) == 2:
            step, loss = item
        else:
            step, loss = i + 1, item
        if _is_num(step) and _is_num(loss):
            points.append((float(step), float(loss)))
    return points


def _downsample(points: list[tuple[float, float]], limit: int = 800) -> list[tuple[float, float]]:
    """Bucket means, so a 100k-step run stays a small SVG without aliasing into noise."""
    if len(points) <= limit:
        return points
    size = len(points) / limit
    out = []
    for b in range(limit):
        chunk = points[int(b * size) : max(int((b + 1) * size), int(b * size) + 1)]
        out.append((sum(p[0] for p in chunk) / len(chunk), sum(p[1] for p in chunk) / len(chunk)))
    return out


def loss_svg(losses: Any, width: int = 720, height: int = 260) -> str:
    """Inline SVG: raw loss (grey) and its exponential moving average (blue), axes labelled."""
    points = _loss_points(losses)
    if len(points) < 2:
        return '<p class="small">no loss curve recorded</p>'
    ema: list[tuple[float, float]] = []
    alpha = min(1.0, 2.0 / (max(len(points) / 20.0, 1.0) + 1.0))
    acc = points[0][1]
    for step, loss in points:
        acc = alpha * loss + (1 - alpha) * acc
        ema.append((step, acc))
    raw, smooth = _downsample(points), _downsample(ema)
    x0, x1 = points[0][0], points[-1][0]
    y0, y1 = min(p[1] for p in points), max(p[1] for p in points)
    if x1 == x0:
        x1 = x0 + 1
    if y1 == y0:
        y0, y1 = y0 - 0.5, y1 + 0.5
    left, right, top, bottom = 64, 12, 12, 28
    pw, ph = width - left - right, height - top - bottom

    def poly(ps: list[tuple[float, float]]) -> str:
        return " ".join(
            f"{left + (x - x0) / (x1 - x0) * pw:.1f},{top + (1 - (y - y0) / (y1 - y0)) * ph:.1f}"
            for x, y in ps
        )

    return (
        f'<svg viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img" '
        f'aria-label="training loss">'
        f'<line class="axis" x1="{left}" y1="{top}" x2="{left}" y2="{top + ph}"/>'
        f'<line class="axis" x1="{left}" y1="{top + ph}" x2="{left + pw}" y2="{top + ph}"/>'
        f'<polyline class="raw" points="{poly(raw)}"/>'
        f'<polyline class="ema" points="{poly(smooth)}"/>'
        f'<text class="lbl" x="{left - 4}" y="{top + 10}" text-anchor="end">{y1:.4g}</text>'
        f'<text class="lbl" x="{left - 4}" y="{top + ph}" text-anchor="end">{y0:.4g}</text>'
        f'<text class="lbl" x="{left}" y="{height - 8}">step {x0:g}</text>'
        f'<text class="lbl" x="{left + pw}" y="{height - 8}" text-anchor="end">step {x1:g}</text>'
        "</svg>"
    )


def _dataset_html(ds: Mapping[str, Any]) -> str:
    if not ds:
        return '<p class="small">not recorded</p>'
    head = {
        k: ds.get(k)
        for k in ("source", "kept", "examined", "not_examined", "captions_truncated")
        if ds.get(k) is not None
    }
    skipped = ds.get("skipped") or {}
    examples = ds.get("skipped_examples") or {}
    rows = "".join(
        f'<tr><td>{_e(reason)}</td><td class="num">{_num(count)}</td>'
        f'<td class="small">{_e(", ".join(map(str, examples.get(reason, []))))}</td></tr>'
        for reason, count in skipped.items()
    )
    table = (
        f"<table><tr><th>skipped because</th><th>files</th><th>examples</th></tr>{rows}</table>"
        if rows
        else '<p class="small">no files skipped</p>'
    )
    notes = ds.get("notes") or {}
    return _kv_table(head) + table + (_kv_table(notes) if notes else "")


def _yaml(data: Any) -> str:
    import yaml

    return yaml.safe_dump(data, allow_unicode=True, sort_keys=False, default_flow_style=False)


def render_html(report: Mapping[str, Any], out_dir: Path) -> str:
    """The report page as one string (inputs already scrubbed by ``write_report``)."""
    model = report.get("model") or {}
    score = report.get("score") or {}
    story = report.get("story") or {}
    train = dict(report.get("train") or {})
    device = dict(report.get("device") or {})
    threshold = score.get("threshold")
    job_id = report.get("job_id", "")

    parts = [
        '<!DOCTYPE html><html lang="zh"><head><meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>kolors-job report {_e(job_id)}</title><style>{_CSS}</style></head><body>",
    ]
    if model.get("random_weights"):
        parts.append(f'<div class="banner" role="alert">⚠ {_e(RANDOM_WEIGHTS_BANNER)}</div>')
    parts.append(f"<h1>Kolors LoRA story — {_e(job_id)}</h1>")
    parts.append(
        f'<p class="meta">created {_e(report.get("created"))} · manifest {_e(report.get("manifest_digest"))}'
        f"<br>base model {_e(model.get('base'))}"
        + (f" · VAE {_e(model.get('vae'))}" if model.get("vae") else "")
        + "</p>"
    )

    mean, passed, consistency = score.get("mean"), score.get("passed"), score.get("consistency")
    badge = (
        '<span class="badge none">not scored</span>'
        if passed is None
        else f'<span class="badge {"pass" if passed else "fail"}">{"PASS" if passed else "FAIL"}</span>'
    )
    parts.append(
        '<section class="gate">'
        f'<div><div class="small">mean aesthetic score</div><div class="big">{_num(mean, 3)}</div></div>'
        f'<div><div class="small">threshold</div><div class="big">{_num(threshold, 2)}</div></div>'
        f'<div><div class="small">quality gate</div><div>{badge}</div></div>'
        f'<div><div class="small">style consistency (mean pairwise CLIP cosine)</div>'
        f'<div class="big">{_num(consistency, 3)}</div></div></section>'
    )

    frames = story.get("frames") or []
    parts.append("<h2>Story</h2>")
    parts.append(
        '<div class="strip">'
        + "".join(
            _frame_html(f, threshold, out_dir, i) for i, f in enumerate(frames) if isinstance(f, Mapping)
        )
        + "</div>"
        if frames
        else '<p class="small">no frames</p>'
    )
    if story.get("settings"):
        parts.append("<h3>Sampler</h3>" + _kv_table({**story["settings"], **story.get("sampler", {})}))

    losses = train.pop("losses", None)
    parts.append("<h2>Training</h2>" + loss_svg(losses) + _kv_table(train))
    parts.append("<h2>Dataset</h2>" + _dataset_html(report.get("dataset") or {}))

    timings = report.get("timings") or {}
    rows = "".join(
        f'<tr><th>{_e(k)}</th><td class="num">{_num(v, 1) if _is_num(v) else _e(v)} s</td></tr>'
        for k, v in timings.items()
    )
    parts.append(
        "<h2>Timings</h2>" + (f"<table>{rows}</table>" if rows else '<p class="small">not recorded</p>')
    )

    for key in [k for k in device if k.endswith("_bytes")]:
        device[key] = _bytes(device[key])
    parts.append("<h2>Device</h2>" + _kv_table(device))
    parts.append("<h2>Versions</h2>" + _kv_table(report.get("versions") or {}))
    manifest = report.get("manifest")
    parts.append(
        "<h2>Settings (resolved manifest)</h2>"
        + (f"<pre>{_e(_yaml(manifest))}</pre>" if manifest else '<p class="small">not recorded</p>')
    )
    parts.append("</body></html>\n")
    return "".join(parts)
