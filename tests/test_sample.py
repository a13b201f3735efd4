"""``kolors-job sample`` on a finished tiny job's output (the session's ``finished_tiny_job``): the story's own
frames redrawn byte for byte, the grid, scales and the base model, buckets as the LoRA's source and the
output, and every bad input as one line and its exit code."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from PIL import Image

from kolors_job.cli import main
from kolors_job.core.errors import ExitCode
from kolors_job.core.settings import Settings
from kolors_job.manifest.story import StorySpec
from kolors_job.sample.prompts import PromptDefaults, command_line, parse_prompts_file, resolve_prompts
from tests.cli_lines import messages, run_on_terminal
from tests.scenarios import URL_PROMPT

ROOT = Path(__file__).resolve().parents[1]


def pixels(data: bytes | Path) -> np.ndarray:
    raw = data.read_bytes() if isinstance(data, Path) else data
    return np.asarray(Image.open(io.BytesIO(raw)).convert("RGB")).astype(np.int16)


def sample(*argv: str) -> int:
    return main(["sample", *argv])


def errors(capsys: pytest.CaptureFixture[str]) -> list[str]:
    """What the command said to a person on stderr: its CLI lines (off a terminal each is a JSON record of the
    ``kolors_job.cli`` logger; a plain line in text mode), not the stages' log records."""
    out = []
    for line in capsys.readouterr().err.splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            out.append(line)
            continue
        if isinstance(record, dict) and record.get("logger") == "kolors_job.cli":
            out.append(str(record.get("msg", "")))
    return out


def test_the_story_redrawn_from_its_prompts_json_is_byte_identical(
    finished_tiny_job: Path, job_env: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The job's prompts.json as the prompts file, every other setting (base model, sampler, steps, cfg, size,
    negatives, LoRA scale, batch of 8) from the job: each sample is the story's frame, byte for byte."""
    job, out = finished_tiny_job, job_env / "redraw"
    assert sample(str(job), "--prompts", str(job / "prompts.json"), "--output", str(out)) == ExitCode.OK
    record = json.loads((out / "prompts.json").read_text())
    story = json.loads((job / "prompts.json").read_text())
    assert [c["label"] for c in record["columns"]] == ["lora0.5"]  # the story's lora_scale
    for n in range(1, 9):
        assert (out / f"images/{n:02d}-lora0.5.png").read_bytes() == (job / f"images/{n:02d}.png").read_bytes(), n
        row = record["prompts"][n - 1]
        frame = story["frames"][n - 1]
        assert (row["prompt"], row["negative_prompt"], row["seed"]) == (
            frame["prompt"], frame["negative_prompt"], frame["seed"],
        )  # fmt: skip
    # the job supplied the base model, the recipe and the sampler it recorded itself
    assert record["model"]["base"] == "tiny://kolors" and record["lora"]["job_finished"] is True
    assert record["recipe"] == story["recipe"]
    drawn_with = {k: v for k, v in story["sampler"].items() if k not in ("width", "height", "lora_scale", "best_of")}
    assert {k: record["sampler"][k] for k in drawn_with} == drawn_with
    assert record["sampler"]["batch_size"] == 8
    assert errors(capsys)[-1].endswith(f"{out}/grid.png")


def test_one_frame_from_the_command_line(finished_tiny_job: Path, job_env: Path) -> None:
    """Frame 3 given as arguments (its prompt, --seed, --negative, --width/--height). Drawn alone, not in the
    story's batch of 8: CPU kernels are not batch-invariant, so it may differ from the story's frame by one level
    in a few values (measured: at most 1, in a pixel or two) — never by a different picture."""
    job, out = finished_tiny_job, job_env / "one"
    frame = json.loads((job / "prompts.json").read_text())["frames"][2]
    size = str(json.loads((job / "prompts.json").read_text())["sampler"]["width"])
    code = sample(str(job), frame["prompt"], "--seed", str(frame["seed"]), "--negative", frame["negative_prompt"],
                  "--width", size, "--height", size, "--output", str(out))  # fmt: skip
    assert code == ExitCode.OK
    got, want = pixels(out / "images/01-lora0.5.png"), pixels(job / "images/03.png")
    assert got.shape == want.shape and np.abs(got - want).max() <= 1 and (got != want).mean() < 0.001


def test_grid_scales_base_sizes_and_scores(finished_tiny_job: Path, job_env: Path, tmp_path: Path) -> None:
    """Rows = prompts, columns = scales then the base model. The base column is a pipeline without the LoRA, so
    scale 0 equalling it is a finding, not a tautology; the LoRA columns differ from it."""
    prompts = tmp_path / "prompts.yaml"
    doc = {
        "negative_prompt": "文件里的负面提示",
        "prompts": ["二次元，一只猫", {"prompt": "二次元，城市夜景", "seed": 7, "negative_prompt": "模糊", "width": 64,
                                        "height": 96}],
    }  # fmt: skip
    prompts.write_text(yaml.safe_dump(doc, allow_unicode=True), encoding="utf-8")
    out = job_env / "grid"
    code = sample(str(finished_tiny_job), "二次元，海边", "--prompts", str(prompts), "--scale", "0,1", "--scale",
                  "0.5", "--compare-base", "--seed", "3", "--score", "--output", str(out))  # fmt: skip
    assert code == ExitCode.OK
    record = json.loads((out / "prompts.json").read_text())
    labels = ["lora0", "lora1", "lora0.5", "base"]
    assert [c["label"] for c in record["columns"]] == labels
    rows = record["prompts"]
    assert [r["prompt"] for r in rows] == ["二次元，一只猫", "二次元，城市夜景", "二次元，海边"]  # file first, then args
    assert [(r["seed"], r["negative_prompt"], r["width"], r["height"]) for r in rows] == [
        (3, "文件里的负面提示", 64, 64),  # --seed fills what the file leaves unset
        (7, "模糊", 64, 96),  # the prompt's own fields win
        (3, URL_PROMPT, 64, 64),  # the job's story negative (the shared job's: tests/scenarios.py)
    ]
    img = {(r, c): pixels(out / f"images/{r + 1:02d}-{c}.png") for r in range(3) for c in labels}
    assert img[1, "base"].shape == (96, 64, 3)
    grid = pixels(out / "grid.png")
    assert record["grid"]["rows"] == 3 and record["grid"]["cols"] == 4 and record["grid"]["cell"] == [64, 96]
    assert grid.shape == (3 * 96, 4 * 64, 3)
    for r in range(3):
        for c, label in enumerate(labels):
            cell = grid[r * 96 : (r + 1) * 96, c * 64 : (c + 1) * 64]
            h = img[r, label].shape[0]
            top = (96 - h) // 2  # a 64x64 image sits centred on white in the 64x96 cell
            assert np.array_equal(cell[top : top + h], img[r, label]), (r, label)
            assert (cell[:top] == 255).all() and (cell[top + h :] == 255).all()
    for r in range(3):
        assert np.array_equal(img[r, "lora0"], img[r, "base"])  # scale 0 is the base model, bit for bit
        assert np.abs(img[r, "lora1"] - img[r, "base"]).max() > 2  # the LoRA moves pixels ...
        assert np.abs(img[r, "lora1"] - img[r, "base"]).mean() > np.abs(img[r, "lora0.5"] - img[r, "base"]).mean()
    # aesthetic scores: the predictor's own number for each written image
    from kolors_job.models.aesthetic import AestheticScorer
    from kolors_job.sources import fetch_model

    scorer = AestheticScorer.load(fetch_model("tiny://aesthetic", kind="aesthetic", settings=Settings())[0])
    want = scorer.score([Image.open(out / im["image"]).convert("RGB") for r in rows for im in r["images"]])
    got = [im["score"] for r in rows for im in r["images"]]
    assert got == pytest.approx(want, abs=1e-5)
    assert record["aesthetic"]["mean"]["base"] == pytest.approx(np.mean([r["images"][3]["score"] for r in rows]))
    # a sample's prompts.json is a prompts file too: the same prompts come back
    again = parse_prompts_file((out / "prompts.json").read_bytes(), "prompts.json")
    assert [(p.prompt, p.seed, p.negative_prompt, p.width, p.height) for p in again.prompts] == [
        (r["prompt"], r["seed"], r["negative_prompt"], r["width"], r["height"]) for r in rows
    ]


def test_a_bucket_as_the_loras_source_and_as_the_output(
    finished_tiny_job: Path, storage_env: Settings, s3_bucket_uri: str, shared_cache: Path, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    """The job's output copied to S3 (moto on loopback): its prefix as the LoRA (base model and settings from
    its manifest), and its lora/ prefix alone (--base and the story's settings as options), draw the same bytes
    into S3; a second sample into the
    same prefix is refused (exit 6) and changes nothing."""
    from kolors_job.storage import open_store

    for var, value in {"CACHE_DIR": shared_cache, "WORK_DIR": tmp_path / "work", "LOG_FORMAT": "json",
                       "S3_ENDPOINT_URL": storage_env.backends["s3"].endpoint_url,
                       "S3_REGION": storage_env.backends["s3"].region,
                       "S3_ADDRESSING_STYLE": "path"}.items():  # fmt: skip
        monkeypatch.setenv(f"KOLORS_JOB_{var}", str(value))
    settings = Settings()
    bucket = open_store(s3_bucket_uri, settings)
    bucket.child("runs", "tiny-job").upload_dir(finished_tiny_job)
    job_uri, lora_uri = s3_bucket_uri + "runs/tiny-job/", s3_bucket_uri + "runs/tiny-job/lora/"
    prompt = ["二次元，一个紫色短发小女孩", "--seed", "5", "--scale", "1", "--compare-base"]
    assert sample(job_uri, *prompt, "--output", s3_bucket_uri + "samples/a/") == ExitCode.OK
    # the lora/ prefix alone names no job: the base model and the story's size and steps come from the options
    story = ["--base", "tiny://kolors", "--width", "64", "--height", "64", "--steps", "3", "--negative", URL_PROMPT]
    assert sample(lora_uri, *prompt, *story, "--output", s3_bucket_uri + "samples/b") == ExitCode.OK
    a, b = bucket.child("samples", "a"), bucket.child("samples", "b")
    assert a.list() == b.list() == ["grid.png", "images/01-base.png", "images/01-lora1.png", "prompts.json"]
    for key in ("grid.png", "images/01-lora1.png", "images/01-base.png"):
        assert a.read_bytes(key) == b.read_bytes(key), key
    assert not np.array_equal(pixels(a.read_bytes("images/01-lora1.png")), pixels(a.read_bytes("images/01-base.png")))
    rec_a, rec_b = json.loads(a.read_bytes("prompts.json")), json.loads(b.read_bytes("prompts.json"))
    assert rec_a["lora"]["job"] == job_uri and rec_b["lora"]["job"] is None
    assert rec_a["lora"]["sha256"] == rec_b["lora"]["sha256"]
    assert rec_a["recipe"]["name"] == "reference" and rec_b["recipe"] is None
    capsys.readouterr()
    before = {k: a.read_bytes(k) for k in a.list()}
    assert sample(job_uri, *prompt, "--output", s3_bucket_uri + "samples/a/") == ExitCode.OUTPUT_CONFLICT
    (line,) = errors(capsys)
    assert "samples/a/ already holds 4 file(s)" in line and "never overwrites" in line
    assert {k: a.read_bytes(k) for k in a.list()} == before


def test_an_oss_output(
    finished_tiny_job: Path, storage_env: Settings, oss_bucket_uri: str, shared_cache: Path, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    """oss:// through the OSS proxy (oss2 on loopback): the files, created only if absent, and a second sample
    into the same prefix refused."""
    from kolors_job.storage import open_store

    for var, value in {"CACHE_DIR": shared_cache, "WORK_DIR": tmp_path / "work", "LOG_FORMAT": "json",
                       "OSS_ENDPOINT": storage_env.backends["oss"].endpoint,
                       "OSS_REGION": storage_env.backends["oss"].region}.items():  # fmt: skip
        monkeypatch.setenv(f"KOLORS_JOB_{var}", str(value))
    out = oss_bucket_uri + "samples/x/"
    assert sample(str(finished_tiny_job), "二次元，一只猫", "--output", out) == ExitCode.OK
    store = open_store(out, Settings())
    assert store.list() == ["grid.png", "images/01-lora0.5.png", "prompts.json"]
    assert pixels(store.read_bytes("images/01-lora0.5.png")).shape == (64, 64, 3)
    assert json.loads(store.read_bytes("prompts.json"))["grid"] == {
        "image": "grid.png", "rows": 1, "cols": 1, "size": [64, 64], "cell": [64, 64],
    }  # fmt: skip
    capsys.readouterr()
    assert sample(str(finished_tiny_job), "二次元，一只狗", "--output", out) == ExitCode.OUTPUT_CONFLICT
    (line,) = errors(capsys)
    assert "already holds 3 file(s)" in line


def _bad_prompts(tmp: Path, text: str) -> str:
    path = tmp / "bad.yaml"
    path.write_text(text, encoding="utf-8")
    return str(path)


BAD = [
    # (arguments; the LoRA is the job unless the first argument is given; exit code; what the one line says)
    (["/nowhere/lora", "p"], ExitCode.INVALID_INPUT,
     "lora /nowhere/lora: no pytorch_lora_weights.safetensors there, and not a job's output"),
    (["{job}", "--prompts", "{bad:prompts: [{prompt: a, seed: -1}]}"], ExitCode.INVALID_MANIFEST,
     "bad.yaml: prompts[0].seed: Input should be greater than or equal to 0"),
    (["{job}", "--prompts", "{bad:prompts: [ok, {prompt: a, sede: 3}]}"], ExitCode.INVALID_MANIFEST,
     "bad.yaml: prompts[1].sede: unknown field"),
    (["{job}", "--prompts", "{bad:prompts: [{prompt: a, width: 100}]}"], ExitCode.INVALID_MANIFEST,
     "bad.yaml: prompts[0].width: Input should be a multiple of 8"),
    (["{job}", "--prompts", "{bad:prompts: []}"], ExitCode.INVALID_MANIFEST,
     "bad.yaml: prompts: List should have at least 1 item"),
    (["{job}", "--prompts", "{bad:prompts: [a\n  b: c}"], ExitCode.INVALID_MANIFEST, "bad.yaml: invalid YAML/JSON"),
    (["{job}", "--prompts", "/nowhere/p.yaml"], ExitCode.INVALID_MANIFEST,
     "/nowhere/p.yaml: cannot read the prompts file: no such file"),
    (["{job}", "p", "--scale", "9"], ExitCode.INVALID_MANIFEST, "--scale '9': Input should be less than or equal to 4"),
    (["{job}", "p", "--scale", "0.5,x"], ExitCode.INVALID_MANIFEST, "--scale 'x': Input should be a valid number"),
    (["{job}", "p", "--seed", "-2"], ExitCode.INVALID_MANIFEST, "--seed: Input should be greater than or equal to 0"),
    (["{job}", "p", "--steps", "0"], ExitCode.INVALID_MANIFEST, "--steps: Input should be greater than or equal to 1"),
    (["{job}", "p", "--scheduler", "dpm"], ExitCode.INVALID_MANIFEST, "--scheduler: Input should be 'reference'"),
    (["{job}"], ExitCode.INVALID_MANIFEST, "no prompts: give them as arguments or in --prompts FILE"),
    (["{notlora}", "p"], ExitCode.INVALID_INPUT, "pytorch_lora_weights.safetensors is not a usable Kolors LoRA"),
    (["{unexported}", "p"], ExitCode.INVALID_INPUT,
     "a job's output with no lora/pytorch_lora_weights.safetensors (not exported yet?)"),
]  # fmt: skip


@pytest.mark.parametrize(("argv", "code", "says"), BAD, ids=[b[2][:40] for b in BAD])
def test_bad_inputs_are_one_line_and_an_exit_code(
    argv: list[str], code: int, says: str, finished_tiny_job: Path, job_env: Path, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    not_lora = tmp_path / "notlora"
    not_lora.mkdir()
    (not_lora / "pytorch_lora_weights.safetensors").write_bytes(b"not a safetensors file")
    unexported = tmp_path / "unexported"  # a job's output before its export stage: no lora/ yet
    unexported.mkdir()
    (unexported / "manifest.resolved.yaml").write_bytes((finished_tiny_job / "manifest.resolved.yaml").read_bytes())
    out = tmp_path / "out"

    def fill(arg: str) -> str:
        if arg.startswith("{bad:"):
            return _bad_prompts(tmp_path, arg[5:-1])
        for name, path in (("job", finished_tiny_job), ("notlora", not_lora), ("unexported", unexported)):
            arg = arg.replace(f"{{{name}}}", str(path))
        return arg

    assert sample(*map(fill, argv), "--output", str(out)) == code
    (line,) = errors(capsys)
    assert says in line, line
    assert not out.exists()  # nothing was written


def test_an_output_that_holds_files_is_never_overwritten(
    finished_tiny_job: Path, job_env: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = job_env / "taken"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert sample(str(finished_tiny_job), "p", "--output", str(out)) == ExitCode.OUTPUT_CONFLICT
    (line,) = errors(capsys)
    assert "already holds 1 file(s) (notes.txt" in line
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and (out / "notes.txt").read_text() == "mine"


def test_the_command_in_its_own_process_prints_one_line(tmp_path: Path) -> None:
    """No traceback and the documented code from the real entry point (what a shell or a pod sees)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "KOLORS_JOB_CACHE_DIR": str(tmp_path / "cache")}
    proc = subprocess.run([sys.executable, "-m", "kolors_job", "sample", str(tmp_path / "none"), "a prompt"],
                          capture_output=True, text=True, env=env, timeout=300)  # fmt: skip
    assert proc.returncode == ExitCode.INVALID_INPUT
    assert messages(proc.stderr) == [  # off a terminal: one JSON record
        f"lora {tmp_path / 'none'}: no pytorch_lora_weights.safetensors there, and not a job's output "
        "(manifest.resolved.yaml + lora/)"
    ]


def test_prompt_fields_fall_back_prompt_then_command_line_then_file_then_story() -> None:
    file = parse_prompts_file(
        b"seed: 4\nwidth: 128\nnegative_prompt: file\nprompts:\n- a\n- {prompt: b, seed: 9, height: 72}\n"
        b"- {prompt: c, negative_prompt_extra: extra}\n",
        "p.yaml",
    )
    cli, defaults = command_line(["d"], {"seed": "2", "negative_prompt": None, "width": None, "height": None})
    assert cli is not None
    story = StorySpec(width=64, height=80, negative_prompt="story")
    got = [(p.prompt, p.seed, p.negative_prompt, p.width, p.height)
           for p in resolve_prompts([file, cli], defaults, story)]  # fmt: skip
    assert got == [
        ("a", 2, "file", 128, 80),  # --seed beats the file's seed; the file's width; the story's height
        ("b", 9, "file", 128, 72),
        ("c", 2, "file，extra", 128, 80),  # appended as the story appends negative_prompt_extra
        ("d", 2, "story", 64, 80),  # a command-line prompt: the story's defaults
    ]
    # a bare list is a prompts file too; a story's prompts.json keeps only what a prompt is
    assert [p.prompt for p in parse_prompts_file(b"[x, y]", "l.yaml").prompts] == ["x", "y"]
    story_json: dict[str, Any] = {"sampler": {"width": 96, "height": 64, "steps": 3}, "recipe": {},
                                  "frames": [{"index": 1, "image": "images/01.png", "prompt": "f", "seed": 5,
                                              "negative_prompt": "n"}]}  # fmt: skip
    parsed = parse_prompts_file(json.dumps(story_json).encode(), "prompts.json")
    assert resolve_prompts([parsed], PromptDefaults(), StorySpec()) == resolve_prompts(
        [parse_prompts_file(b"width: 96\nheight: 64\nprompts: [{prompt: f, seed: 5, negative_prompt: n}]", "x")],
        PromptDefaults(), StorySpec(),
    )  # fmt: skip


def test_the_fused_path_loads_the_lora_again_at_each_scale(finished_tiny_job: Path, shared_cache: Path) -> None:
    """CUDA's default (the story's speed path: the LoRA merged into the weights at its scale, then unloaded, q/k/v
    fused) run here on the CPU: each scale column is exactly the story's fused pipeline at that scale — a merged
    LoRA cannot be rescaled in place — and the base column is the model without it."""
    import torch

    from kolors_job.render.pipeline import ImageJob, load_story_pipeline, render, to_device
    from kolors_job.sample.prompts import SamplePrompt
    from kolors_job.sample.request import Column
    from kolors_job.sample.run import draw
    from kolors_job.sources import fetch_model

    model = fetch_model("tiny://kolors", kind="pipeline", settings=Settings(cache_dir=shared_cache))[0]
    lora = finished_tiny_job / "lora"
    spec = StorySpec(width=64, height=64, steps=3)
    prompts = [SamplePrompt("二次元，一只猫", spec.negative_prompt, 1, 64, 64)]
    columns = [Column(1.0), Column(0.5), Column(None)]
    got: dict[int, np.ndarray] = {}
    draw(model, spec, prompts, columns, lora_dir=lora, vae_dir=None, device=torch.device("cpu"), fused=True,
         on_image=lambda _row, col, image: got.__setitem__(col, np.asarray(image)))  # fmt: skip
    job = ImageJob(1, 0, prompts[0].prompt, prompts[0].negative_prompt, 1)
    for col, column in enumerate(columns):
        at = spec.model_copy(update={"lora_scale": column.scale or 0.0})
        pipe = load_story_pipeline(model, at, lora_dir=lora if column.scale else None, device="cpu", fused=True)
        to_device(pipe, at, "cpu", fused=True)
        assert not any("lora" in name for name, _ in pipe.unet.named_parameters())  # merged, wrappers gone
        assert np.array_equal(got[col], np.asarray(render(pipe, [job], at)[0])), column
    assert not np.array_equal(got[0], got[1]) and not np.array_equal(got[1], got[2])


def test_on_a_terminal_bars_and_no_warnings(finished_tiny_job: Path, shared_cache: Path, tmp_path: Path) -> None:
    """On a TTY: the image bar and the denoising bar under it, text log lines, none of the libraries' warnings
    (as ``kolors-job demo`` shows them, tests/test_terminal.py)."""
    env = {**os.environ, "KOLORS_JOB_CACHE_DIR": str(shared_cache), "KOLORS_JOB_WORK_DIR": str(tmp_path / "work"),
           "OMP_NUM_THREADS": "1", "COLUMNS": "160", "PYTHONPATH": str(ROOT)}  # fmt: skip
    env.pop("KOLORS_JOB_LOG_FORMAT", None)
    env.pop("PYTHONWARNINGS", None)
    argv = [sys.executable, "-m", "kolors_job", "sample", str(finished_tiny_job), "二次元，一只猫", "二次元，海边",
            "--compare-base", "--output", str(tmp_path / "out")]  # fmt: skip
    rc, screen = run_on_terminal(argv, env, ROOT)
    assert rc == 0, screen[-4000:]
    for noise in ("Warning", "pynvml", "gemm_4bit", "Traceback"):
        assert noise not in screen, f"{noise!r} on the screen:\n{screen[:3000]}"
    assert re.search(r"sample: +\d+%\|.*\| *4/4 ", screen) and "denoise" in screen, screen
    assert re.search(r" I sample: sample done +\[images=4 ", screen), screen
