"""Dataset fetch/scan/load against real files: every hostile file kind is built here, byte for byte."""

from __future__ import annotations

import io
import json
import os
import random
import socket
import struct
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from kolors_job.core.errors import InputError
from kolors_job.core.settings import Settings
from kolors_job.data.images import ImageItem, load_image
from kolors_job.data.scan import DatasetScan, SkipReason, scan_dataset
from kolors_job.manifest.dataset import CaptionSpec, DatasetSpec, FilterSpec
from kolors_job.sources import fetch_dataset
from kolors_job.sources.datasets import export_rows
from kolors_job.storage.atomic import COMPLETE_MARKER

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------- builders


def solid(
    path: Path, size: tuple[int, int], color=(120, 60, 200), fmt: str | None = None, mode="RGB"
) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path, format=fmt)
    return path


def noise_jpeg(path: Path, size: tuple[int, int]) -> Path:
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(
        path, "JPEG", quality=90
    )
    return path


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return (
        struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    )


def png_bomb(path: Path, side: int = 100_000) -> Path:
    """A valid PNG header claiming side×side RGB pixels with a few bytes of data: 200 bytes on disk."""
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    data = b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr)
    data += png_chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + png_chunk(b"IEND", b"")
    path.write_bytes(data)
    return path


def exif_rotated(path: Path) -> Path:
    """Stored 1200×1100 landscape, left half red / right half blue, EXIF orientation 6 (rotate 90° CW)."""
    img = Image.new("RGB", (1200, 1100), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 600, 1100))
    exif = Image.Exif()
    exif[0x0112] = 6
    img.save(path, "JPEG", exif=exif.tobytes(), quality=95)
    return path


def small_filters(**kw) -> FilterSpec:
    return FilterSpec(min_width=kw.pop("min_width", 512), min_height=kw.pop("min_height", 512), **kw)


# --------------------------------------------------------------------------------------------- scan


@pytest.fixture
def hostile_root(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    root.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    # kept
    solid(root / "good.png", (600, 600))
    cmyk = Image.new("CMYK", (600, 600), (0, 255, 255, 0))  # pure red in CMYK
    cmyk.save(root / "cmyk.jpg", "JPEG")
    Image.fromarray(np.full((600, 600), 32768, dtype=np.uint16)).save(root / "grey16.png")
    rgba = Image.new("RGBA", (600, 600), (0, 0, 0, 0))
    rgba.paste((255, 0, 0, 255), (0, 0, 300, 600))
    rgba.save(root / "rgba.png")
    (root / "sub").mkdir()
    exif_rotated(root / "sub" / "rotated.jpg")
    solid(root / "link_inside_target.png", (600, 600))
    os.symlink(root / "link_inside_target.png", root / "link_inside.png")
    # skipped
    good_jpeg = noise_jpeg(tmp_path / "whole.jpg", (600, 600)).read_bytes()
    (root / "truncated.jpg").write_bytes(good_jpeg[: len(good_jpeg) // 2])
    (root / "empty.png").write_bytes(b"")
    (root / "text.png").write_text("this is not a png\n")
    (root / "LICENSE").write_text("Apache-2.0\n")
    Image.new("RGB", (600, 600)).save(root / "eps.png", "EPS")  # PIL would hand EPS to Ghostscript
    solid(root / "tiny.png", (300, 300))
    solid(root / "wide.png", (3000, 1000))
    png_bomb(root / "bomb.png")
    solid(outside / "secret.png", (600, 600))
    os.symlink(outside / "secret.png", root / "escape.png")
    os.symlink(outside, root / "escape_dir")
    os.mkfifo(root / "fifo.png")
    solid(root / "real_png.dat", (600, 600), fmt="PNG")
    # ignored: companions, hidden
    (root / "metadata.csv").write_text("file_name,text\ngood.png,hello\n")
    (root / "good.txt").write_text("a sidecar")
    (root / "README.md").write_text("# data\n")
    (root / ".hidden.png").write_bytes(b"junk")
    (root / ".cache").mkdir()
    (root / ".cache" / "x.png").write_bytes(b"junk")
    return root


def test_scan_counts_every_reason_exactly(hostile_root: Path) -> None:
    spec = DatasetSpec(source=str(hostile_root), filters=small_filters())
    scan = scan_dataset(hostile_root, spec, workers=2)

    kept = sorted(i.path.relative_to(hostile_root).as_posix() for i in scan.items)
    assert kept == [
        "cmyk.jpg",
        "good.png",
        "grey16.png",
        "link_inside.png",
        "link_inside_target.png",
        "rgba.png",
        "sub/rotated.jpg",
    ]
    assert scan.skipped == {
        SkipReason.BAD_ASPECT: ["wide.png"],
        SkipReason.CORRUPT: ["truncated.jpg"],
        SkipReason.NOT_IMAGE: ["LICENSE", "eps.png", "text.png"],
        SkipReason.SYMLINK_OUTSIDE_ROOT: ["escape.png", "escape_dir"],
        SkipReason.TOO_MANY_PIXELS: ["bomb.png"],
        SkipReason.TOO_SMALL: ["tiny.png"],
        SkipReason.UNREADABLE: ["fifo.png"],
        SkipReason.WRONG_EXTENSION: ["real_png.dat"],
        SkipReason.ZERO_BYTE: ["empty.png"],
    }
    assert scan.examined == 7 + 11  # escape_dir is a directory: reported, not examined
    assert all(i.caption == "二次元" for i in scan.items)
    rotated = next(i for i in scan.items if i.path.name == "rotated.jpg")
    assert (rotated.width, rotated.height) == (1100, 1200)  # EXIF-oriented: portrait

    report = scan.report("file:///x").to_dict()
    assert report["kept"] == 7
    assert report["skipped"][SkipReason.NOT_IMAGE] == 3
    assert report["skipped_examples"][SkipReason.ZERO_BYTE] == ["empty.png"]
    json.dumps(report)


def test_scan_never_decodes_a_bomb(tmp_path: Path) -> None:
    # 100000² RGB would be 30 GB: if PIL decoded it the test would die, not fail.
    png_bomb(tmp_path / "bomb.png")
    png_bomb(tmp_path / "bomb2.png", side=20_000)  # 400 MP: under PIL's 2x error limit, over ours
    scan = scan_dataset(tmp_path, DatasetSpec(source=str(tmp_path)), workers=1)
    assert scan.skipped == {SkipReason.TOO_MANY_PIXELS: ["bomb.png", "bomb2.png"]}


def test_max_pixels_cap_between_one_and_two_times(tmp_path: Path) -> None:
    solid(tmp_path / "a_small.png", (300, 300))  # 90 000 px
    solid(tmp_path / "b_big.png", (400, 400))  # 160 000 px: PIL would only warn here
    spec = DatasetSpec(
        source=str(tmp_path), filters=FilterSpec(min_width=8, min_height=8, max_pixels=100_000)
    )
    scan = scan_dataset(tmp_path, spec)
    assert [i.path.name for i in scan.items] == ["a_small.png"]
    assert scan.skipped == {SkipReason.TOO_MANY_PIXELS: ["b_big.png"]}
    assert Image.MAX_IMAGE_PIXELS == 89478485  # the process-global limit is restored


def test_shape_and_aspect_filters_match_data_juicer(tmp_path: Path) -> None:
    # image_shape_filter keeps w >= min_w and h >= min_h; image_aspect_ratio_filter keeps low <= w/h <= high
    for w, h in [
        (1024, 1024),
        (1023, 1024),
        (1024, 1023),
        (2048, 1024),
        (2050, 1024),
        (1024, 2048),
        (1024, 2050),
    ]:
        solid(tmp_path / f"{w}x{h}.png", (w, h), color=(0, 0, 0))
    scan = scan_dataset(tmp_path, DatasetSpec(source=str(tmp_path)))
    assert sorted(i.path.name for i in scan.items) == ["1024x1024.png", "1024x2048.png", "2048x1024.png"]
    assert scan.skipped == {
        SkipReason.TOO_SMALL: ["1023x1024.png", "1024x1023.png"],
        SkipReason.BAD_ASPECT: ["1024x2050.png", "2050x1024.png"],
    }


def test_max_images_keeps_first_sorted(tmp_path: Path) -> None:
    for name in ["e", "a", "d", "b", "c"]:
        solid(tmp_path / f"{name}.png", (16, 16))
    spec = DatasetSpec(source=str(tmp_path), filters=FilterSpec(min_width=8, min_height=8, max_images=2))
    scan = scan_dataset(tmp_path, spec, workers=2)
    assert [i.path.name for i in scan.items] == ["a.png", "b.png"]
    assert scan.not_examined == 3
    assert scan.report().not_examined == 3


GBK = "二次元".encode("gbk")


def test_captions_from_csv_jsonl_and_sidecars(tmp_path: Path) -> None:
    for name in ["a", "b", "c", "d", "e", "sub/f", "sub/g", "sub/h"]:
        solid(tmp_path / f"{name}.png", (16, 16))
    (tmp_path / "metadata.csv").write_bytes(
        b"file_name,text\n"
        + b'a.png,"caption a, with comma"\n'
        + b"b.png,"
        + GBK
        + b"\n"
        + b"missing.png,nobody\n"
    )
    (tmp_path / "a.txt").write_text("sidecar loses to metadata")
    (tmp_path / "c.txt").write_text("caption c\n", encoding="utf-8")
    (tmp_path / "d.txt").write_bytes(GBK)
    (tmp_path / "sub" / "metadata.jsonl").write_bytes(
        json.dumps({"file_name": "f.png", "text": "漂亮的 f"}, ensure_ascii=False).encode()
        + b"\n{not json\n"
        + b'{"file_name": "g.png", "text": "'
        + GBK
        + b'"}\n'
        + b"\n"
    )
    (tmp_path / "sub" / "h.txt").write_text("   \n")  # blank caption = no caption
    spec = DatasetSpec(
        source=str(tmp_path),
        caption=CaptionSpec(fixed=None, prefix="sty, "),
        filters=FilterSpec(min_width=8, min_height=8),
    )
    scan = scan_dataset(tmp_path, spec)
    captions = {i.path.relative_to(tmp_path).as_posix(): i.caption for i in scan.items}
    assert captions == {
        "a.png": "sty, caption a, with comma",
        "c.png": "sty, caption c",
        "sub/f.png": "sty, 漂亮的 f",
    }
    assert scan.skipped == {
        SkipReason.CAPTION_NOT_UTF8: ["b.png", "d.png", "sub/g.png"],
        SkipReason.NO_CAPTION: ["e.png", "sub/h.png"],
    }
    assert scan.notes == {"metadata_rows_invalid": 1}
    assert scan.captions_truncated == 0


def test_caption_truncation_is_counted_not_skipped(tmp_path: Path) -> None:
    solid(tmp_path / "a.png", (16, 16))
    solid(tmp_path / "b.png", (16, 16))
    (tmp_path / "a.txt").write_text("x" * 30)
    (tmp_path / "b.txt").write_text("short")
    spec = DatasetSpec(
        source=str(tmp_path),
        caption=CaptionSpec(fixed=None, prefix="p:", max_chars=10),
        filters=FilterSpec(min_width=8, min_height=8),
    )
    scan = scan_dataset(tmp_path, spec)
    assert [i.caption for i in scan.items] == ["p:xxxxxxxx", "p:short"]
    assert scan.captions_truncated == 1
    assert scan.skipped == {}
    assert scan.report().captions_truncated == 1


# --------------------------------------------------------------------------------------------- load


def scanned(root: Path, name: str) -> ImageItem:
    scan = scan_dataset(root, DatasetSpec(source=str(root), filters=FilterSpec(min_width=8, min_height=8)))
    return next(i for i in scan.items if i.path.name == name)


def test_load_16bit_png_is_mid_grey_not_white(tmp_path: Path) -> None:
    Image.fromarray(np.full((64, 64), 32768, dtype=np.uint16)).save(tmp_path / "g.png")
    assert Image.open(tmp_path / "g.png").mode == "I;16"
    tensor, _ = load_image(scanned(tmp_path, "g.png"), 32, center_crop=True, flip=False)
    assert tensor.shape == (3, 32, 32) and tensor.dtype == torch.float32
    assert torch.allclose(tensor, torch.full_like(tensor, 128 / 127.5 - 1), atol=1e-6)


def test_load_rgba_composites_on_white_and_cmyk_is_red(tmp_path: Path) -> None:
    rgba = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    rgba.paste((255, 0, 0, 255), (0, 0, 32, 64))
    rgba.save(tmp_path / "rgba.png")
    Image.new("CMYK", (64, 64), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg", "JPEG", quality=95)
    t, _ = load_image(scanned(tmp_path, "rgba.png"), 64, center_crop=True, flip=False)
    assert torch.allclose(
        t[:, :, :28], torch.tensor([1.0, -1.0, -1.0]).view(3, 1, 1).expand(3, 64, 28), atol=0.02
    )
    assert torch.all(t[:, :, 36:] > 0.98)  # transparent black became white, not black
    c, _ = load_image(scanned(tmp_path, "cmyk.jpg"), 64, center_crop=True, flip=False)
    mean = c.mean(dim=(1, 2))
    assert mean[0] > 0.9 and mean[1] < -0.9 and mean[2] < -0.9


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda: Image.new("L", (4, 4), 100), (100, 100, 100)),
        (lambda: Image.new("1", (4, 4), 1), (255, 255, 255)),
        (
            lambda: Image.fromarray(np.full((4, 4), 25700, dtype=np.int32)),
            (100, 100, 100),
        ),  # mode I, 16-bit range
        (
            lambda: Image.fromarray(np.full((4, 4), 0.5, dtype=np.float32)),
            (128, 128, 128),
        ),  # mode F in [0, 1]
        (lambda: Image.new("LA", (4, 4), (0, 0)), (255, 255, 255)),  # transparent -> white
        (lambda: Image.new("RGBA", (4, 4), (255, 0, 0, 128)), (255, 127, 127)),  # half red over white
        (lambda: Image.new("YCbCr", (4, 4), (76, 85, 255)), (254, 0, 0)),
    ],
)
def test_to_rgb8_modes(make, expected) -> None:
    from kolors_job.data.images import to_rgb8

    out = to_rgb8(make())
    assert out.mode == "RGB"
    assert all(abs(a - b) <= 1 for a, b in zip(out.getpixel((1, 1)), expected, strict=True)), out.getpixel(
        (1, 1)
    )


def test_palette_transparency_composites_on_white(tmp_path: Path) -> None:
    img = Image.new("P", (64, 64), 0)
    img.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    img.paste(1, (0, 0, 32, 64))
    img.info["transparency"] = 0
    img.save(tmp_path / "p.png", transparency=0)
    t, _ = load_image(scanned(tmp_path, "p.png"), 64, center_crop=True, flip=False)
    assert torch.all(t[:, :, 36:] > 0.98)  # palette index 0 is transparent black -> white
    assert t[0, :, :28].min() > 0.98 and t[1, :, :28].max() < -0.98


def test_load_exif_rotated_content(tmp_path: Path) -> None:
    exif_rotated(tmp_path / "r.jpg")
    item = scanned(tmp_path, "r.jpg")
    assert (item.width, item.height) == (1100, 1200)
    t, time_ids = load_image(item, 64, center_crop=True, flip=False)
    # displayed upright: the stored left (red) half is now the top half
    top, bottom = t[:, :24].mean(dim=(1, 2)), t[:, -24:].mean(dim=(1, 2))
    assert top[0] > 0.9 and top[2] < -0.9
    assert bottom[0] < -0.9 and bottom[2] > 0.9
    # 1100×1200 -> 64×70 (shortest side 64), centre crop top = round(6 / 2) = 3
    assert time_ids == (1200, 1100, 3, 0, 64, 64)


def gradient_item(tmp_path: Path) -> ImageItem:
    x = np.linspace(0, 255, 600)[None, :, None] * np.ones((400, 1, 1))
    y = np.linspace(0, 255, 400)[:, None, None] * np.ones((1, 600, 1))
    arr = np.concatenate([x, y, np.full((400, 600, 1), 50.0)], axis=2).astype(np.uint8)
    Image.fromarray(arr).save(tmp_path / "grad.png")
    return scanned(tmp_path, "grad.png")


def resized_reference(item: ImageItem, size: tuple[int, int]) -> torch.Tensor:
    img = Image.open(item.path).convert("RGB").resize(size, Image.Resampling.LANCZOS)
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float() / 127.5 - 1


def test_time_ids_center_and_random_crop(tmp_path: Path) -> None:
    item = gradient_item(tmp_path)  # 600 wide × 400 high
    full = resized_reference(item, (300, 200))

    t, ids = load_image(item, 200, center_crop=True, flip=False)
    assert ids == (400, 600, 0, 50, 200, 200)  # (orig_h, orig_w, top, left, target_h, target_w)
    assert torch.equal(t, full[:, 0:200, 50:250])

    seen = set()
    for seed in range(6):
        t1, ids1 = load_image(item, 200, center_crop=False, flip=False, rng=random.Random(seed))
        t2, ids2 = load_image(item, 200, center_crop=False, flip=False, rng=random.Random(seed))
        assert ids1 == ids2 and torch.equal(t1, t2)  # reproducible from the RNG
        _, _, top, left, _, _ = ids1
        assert top == 0 and 0 <= left <= 100
        assert torch.equal(t1, full[:, top : top + 200, left : left + 200])  # ids describe the real crop
        seen.add(left)
    assert len(seen) > 1
    g = torch.Generator().manual_seed(3)
    _, ids_g = load_image(item, 200, center_crop=False, flip=False, rng=g)
    assert 0 <= ids_g[3] <= 100


def test_flip_mirrors_pixels(tmp_path: Path) -> None:
    item = gradient_item(tmp_path)
    plain, ids = load_image(item, 200, center_crop=True, flip=False)
    flipped, ids_f = load_image(item, 200, center_crop=True, flip=True)
    assert not torch.equal(plain, flipped)
    assert torch.equal(flipped, plain.flip(-1))  # centre crop is symmetric here (50 px each side)
    assert ids == ids_f


# --------------------------------------------------------------------------------------------- fetch


def test_fetch_plain_path_in_place_and_missing(tmp_path: Path) -> None:
    settings = Settings(cache_dir=tmp_path / "cache")
    assert fetch_dataset(DatasetSpec(source=str(tmp_path)), settings) == tmp_path
    with pytest.raises(InputError, match="not a directory"):
        fetch_dataset(DatasetSpec(source=str(tmp_path / "nope")), settings)


def test_fetch_file_uri_caches_with_marker_and_reuses(tmp_path: Path) -> None:
    src = tmp_path / "src"
    solid(src / "a.png", (16, 16), color=(1, 2, 3))
    (src / "a.txt").write_text("one")
    settings = Settings(cache_dir=tmp_path / "cache")
    spec = DatasetSpec(source=src.as_uri())

    first = fetch_dataset(spec, settings)
    assert first.parent == tmp_path / "cache" / "datasets"
    assert (first / COMPLETE_MARKER).is_file()
    assert (first / "a.txt").read_text() == "one"
    assert [p.name for p in first.parent.iterdir()] == [first.name]  # no staging dir left behind

    (src / "a.txt").write_text("two")  # same keys: the cached copy is reused, not re-downloaded
    assert fetch_dataset(spec, settings) == first
    assert (first / "a.txt").read_text() == "one"

    (src / "b.txt").write_text("new file")  # a new key set is a new dataset
    second = fetch_dataset(spec, settings)
    assert second != first and (second / "b.txt").is_file() and (second / COMPLETE_MARKER).is_file()


def test_fetch_rebuilds_an_incomplete_cache(tmp_path: Path) -> None:
    src = tmp_path / "src"
    solid(src / "a.png", (16, 16))
    settings = Settings(cache_dir=tmp_path / "cache")
    spec = DatasetSpec(source=src.as_uri())
    final = fetch_dataset(spec, settings)
    (final / COMPLETE_MARKER).unlink()
    (final / "a.png").write_bytes(b"half")
    again = fetch_dataset(spec, settings)
    assert again == final and (final / COMPLETE_MARKER).is_file()
    assert Image.open(final / "a.png").size == (16, 16)


def test_export_rows_then_scan(tmp_path: Path) -> None:
    """The ModelScope export path on real row shapes (no hub): PIL image with a file, in-memory PIL,
    HF {"bytes"} dict, and a row without any image."""
    src = solid(tmp_path / "orig.jpg", (16, 16), color=(200, 0, 0))
    png = io.BytesIO()
    Image.new("RGB", (16, 16), (0, 200, 0)).save(png, "PNG")
    rows = [
        {"image:FILE": Image.open(src), "text:LABEL": "first"},
        {"image:FILE": Image.new("RGB", (16, 16), (0, 0, 200))},
        {"image": {"bytes": png.getvalue(), "path": None}, "caption": "third"},
        {"id": 7, "text": "no image here"},
    ]
    out = tmp_path / "out"
    assert export_rows(rows, out) == 3
    assert (out / "0000000.jpg").read_bytes() == src.read_bytes()  # original bytes, not re-encoded
    assert sorted(p.name for p in out.iterdir()) == [
        "0000000.jpg",
        "0000001.png",
        "0000002.png",
        "metadata.jsonl",
    ]
    spec = DatasetSpec(
        source=str(out), caption=CaptionSpec(fixed=None), filters=FilterSpec(min_width=8, min_height=8)
    )
    scan: DatasetScan = scan_dataset(out, spec)
    assert [(i.path.name, i.caption) for i in scan.items] == [
        ("0000000.jpg", "first"),
        ("0000002.png", "third"),
    ]
    assert scan.skipped == {SkipReason.NO_CAPTION: ["0000001.png"]}


def test_modelscope_unreachable_is_one_line_temporary_error(tmp_path: Path) -> None:
    """The real ModelScope client against a closed local port (the hub is not reachable offline)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = textwrap.dedent(
        """
        import json, sys
        from kolors_job.sources import fetch_dataset
        from kolors_job.core.errors import JobError
        from kolors_job.manifest.dataset import DatasetSpec
        from kolors_job.core.settings import Settings
        try:
            fetch_dataset(DatasetSpec(), Settings())
        except JobError as e:
            print(json.dumps({"type": type(e).__name__, "code": int(e.exit_code), "msg": str(e)}))
            sys.exit(0)
        print(json.dumps({"type": None}))
        """
    )
    env = {
        **os.environ,
        "MODELSCOPE_ENDPOINT": f"http://127.0.0.1:{port}",
        "MODELSCOPE_API_MAX_RETRIES": "1",  # the default 5 retries with backoff take 15 s
        "MODELSCOPE_CACHE": str(tmp_path / "ms"),
        "KOLORS_JOB_CACHE_DIR": str(tmp_path / "cache"),
        "PYTHONPATH": str(ROOT),
    }
    proc = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["code"] == 75
    assert "\n" not in result["msg"] and len(result["msg"]) < 500
    assert result["msg"].startswith("ModelScope unreachable for 'modelscope://AI-ModelScope/lowres_anime' (")
    assert result["msg"].endswith(": retry later")
    datasets = tmp_path / "cache" / "datasets"
    assert not datasets.exists() or list(datasets.iterdir()) == []  # nothing half-written left


@pytest.mark.parametrize("scheme", ["s3", "oss"])
def test_fetch_bucket_prefix_into_cache(scheme: str, request: pytest.FixtureRequest) -> None:
    """A bucket prefix on the local moto / OSS-proxy servers lands in the cache with its marker, once."""
    from kolors_job.storage import open_store

    settings: Settings = request.getfixturevalue("storage_env")
    server = request.getfixturevalue("s3_server" if scheme == "s3" else "oss_server")
    uri = f"{scheme}://{server.create_bucket()}/data/"
    store = open_store(uri, settings)
    png = io.BytesIO()
    Image.new("RGB", (16, 16), (9, 8, 7)).save(png, "PNG")
    store.write_bytes("a.png", png.getvalue())
    store.write_bytes("sub/b.png", png.getvalue())
    store.write_text("a.txt", "一个标题")

    local = fetch_dataset(DatasetSpec(source=uri), settings)
    assert (local / COMPLETE_MARKER).is_file()
    assert (local / "sub" / "b.png").read_bytes() == png.getvalue()
    assert (local / "a.txt").read_text(encoding="utf-8") == "一个标题"
    marker = (local / COMPLETE_MARKER).read_text()
    store.write_bytes("a.png", b"changed")  # same key set: reused, not downloaded again
    assert fetch_dataset(DatasetSpec(source=uri), settings) == local
    assert (local / COMPLETE_MARKER).read_text() == marker and (
        local / "a.png"
    ).read_bytes() == png.getvalue()
    spec = DatasetSpec(
        source=uri, caption=CaptionSpec(fixed=None), filters=FilterSpec(min_width=8, min_height=8)
    )
    scan = scan_dataset(local, spec)
    assert [(i.path.name, i.caption) for i in scan.items] == [("a.png", "一个标题")]
    assert scan.skipped == {SkipReason.NO_CAPTION: ["sub/b.png"]}
