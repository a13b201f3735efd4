"""The results of ``bench.gpu`` read against the issue's goals and the reference anchors: each goal met or not,
the whole job estimated from its parts, and the markdown table beside the JSON."""

from __future__ import annotations

import importlib.metadata
from typing import Any

import torch

from bench.facts import (
    CFG_TFLOP,
    GOALS,
    PEAK_BF16_TFLOPS,
    REFERENCE_ANCHORS,
    STORY_STEPS,
    TRAIN_STEPS_FULL,
    TRAIN_TFLOP_PER_SAMPLE,
)


def short(entry: dict[str, Any]) -> str:
    if entry["status"] != "ok":
        return f"{entry['status']}: {entry.get('reason') or entry.get('error')}"
    parts = []
    if "ms" in entry:
        parts.append(f"{entry['ms']:.1f} ms")
    if "s" in entry:
        parts.append(f"{entry['s']:.1f} s")
    if entry.get("compile_s") is not None:
        parts.append(f"compile {entry['compile_s']:.0f} s")
    if entry.get("peak_gib") is not None:
        parts.append(f"peak {entry['peak_gib']} GiB")
    if entry.get("step_ms") is not None:
        parts.append(f"{entry['step_ms']:.0f} ms/step")
    return "ok " + ", ".join(parts)


def peak_tflops(name: str | None) -> float | None:
    if not name:
        return None
    for key, value in PEAK_BF16_TFLOPS:
        if key in name:
            return value
    return None


def _ok(results: dict[str, Any], name: str) -> dict[str, Any] | None:
    r = results.get(name)
    return r if r and r.get("status") == "ok" else None


def summarize(doc: dict[str, Any]) -> None:
    """Derived numbers (TFLOP/s, distance from the floor, ratios to the reference, goals) and the markdown table."""
    results: dict[str, Any] = doc["results"]
    meta = doc["meta"]
    full = not meta.get("tiny", True)
    peak = meta.get("peak_tflops_assumed")
    ref_ckpt = _ok(results, "ref_train_ckpt")
    ref_nockpt = _ok(results, "ref_train_no_ckpt")
    ref_cfg = _ok(results, "ref_cfg_fp16_lora") or _ok(results, "ref_cfg_fp16")
    for name, r in results.items():
        if r.get("status") != "ok" or "ms" not in r:
            continue
        kind = r.get("kind")
        flop = None
        if full and kind == "train":
            flop = TRAIN_TFLOP_PER_SAMPLE * r.get("batch", 1)
        elif full and kind == "cfg":
            flop = CFG_TFLOP
        if flop is not None:
            r["tflop"] = round(flop, 2)
            r["tflops"] = round(flop / (r["ms"] / 1e3), 1)
            if peak:
                r["pct_of_peak"] = round(100 * r["tflops"] / peak, 1)
                r["floor_ms"] = round(flop / peak * 1e3, 1)
                r["x_floor"] = round(r["ms"] / r["floor_ms"], 1)
        per = r["ms"] / r.get("batch", 1)
        if kind == "train" and not name.startswith("ref_"):
            if ref_ckpt:
                r["speedup_vs_ref_as_run"] = round(ref_ckpt["ms"] / per, 2)
            if ref_nockpt:
                r["speedup_vs_ref_no_ckpt"] = round(ref_nockpt["ms"] / per, 2)
        if kind == "cfg" and not name.startswith("ref_") and ref_cfg:
            r["speedup_vs_ref"] = round(ref_cfg["ms"] / r["ms"], 2)
    doc["goals"] = _goals(results)
    doc["estimates"] = _estimates(results)
    doc["table_md"] = _table(doc)


def _goals(results: dict[str, Any]) -> list[dict[str, Any]]:
    goals: list[dict[str, Any]] = []

    def add(goal: str, target: float, value: float | None, source: str | None, higher: bool) -> None:
        met = None if value is None else (value >= target if higher else value <= target)
        goals.append({"goal": goal, "target": target, "value": value, "from": source, "met": met})

    train = {n: r for n, r in results.items() if r.get("status") == "ok" and r.get("kind") == "train"
             and not n.startswith("ref_")}
    default = train.get("ours_train_bf16_cl_fused")

    def best(key: str) -> tuple[float | None, str | None]:
        cands = [(r[key], n) for n, r in train.items() if r.get(key) is not None
                 and (r.get("peak_gib") is None or r["peak_gib"] <= GOALS["peak_gib"])]
        return max(cands) if cands else (None, None)

    v, src = best("speedup_vs_ref_as_run")
    add("train ≥ 6× reference as it runs (per sample, best variant within 20 GiB)", GOALS["train_vs_ref_as_run"],
        v, src, True)
    if default and default.get("speedup_vs_ref_as_run") is not None:
        add("train ≥ 6× reference as it runs (train.py default, batch 1)", GOALS["train_vs_ref_as_run"],
            default["speedup_vs_ref_as_run"], "ours_train_bf16_cl_fused", True)
    v, src = best("speedup_vs_ref_no_ckpt")
    add("train ≥ 2× reference without grad-ckpt (per sample, best variant within 20 GiB)",
        GOALS["train_vs_ref_no_ckpt"], v, src, True)
    cfg = [(r["ms"], n) for n, r in results.items() if r.get("status") == "ok" and r.get("kind") == "cfg"
           and not n.startswith("ref_")]
    v2 = min(cfg) if cfg else (None, None)
    add("CFG step ≤ 30 ms (batch 2, 1024²)", GOALS["cfg_step_ms"], v2[0], v2[1], False)
    story = [(r["s"], n) for n in ("job_story", "job_story_compile") if (r := _ok(results, n))]
    v3 = min(story) if story else (None, None)
    add("story (8 frames × 50 steps) ≤ 30 s incl. load + compile", GOALS["story_s"], v3[0], v3[1], False)
    est = _estimates(results).get("our_job_s")
    add("whole job (500 steps + story) ≤ 150 s", GOALS["job_s"], est, "estimates.our_job_s", False)
    if default:
        add("peak ≤ 20 GiB (train.py default step)", GOALS["peak_gib"], default.get("peak_gib"),
            "ours_train_bf16_cl_fused", False)
    job_train = _ok(results, "job_train")
    if job_train:
        add("peak ≤ 20 GiB (train_lora, incl. ChatGLM encode)", GOALS["peak_gib"], job_train.get("peak_gib"),
            "job_train", False)
    return goals


def _estimates(results: dict[str, Any]) -> dict[str, Any]:
    """Whole-job numbers for the reference workload (500 steps at 1024², 8 frames × 50 CFG steps), from the parts."""
    est: dict[str, Any] = {}
    ref = _ok(results, "ref_train_ckpt")
    ref_cfg = _ok(results, "ref_cfg_fp16_lora") or _ok(results, "ref_cfg_fp16")
    vae = _ok(results, "vae_decode_fp16") or _ok(results, "vae_decode_bf16")
    if ref and ref_cfg:
        est["reference_job_unet_s"] = round(
            TRAIN_STEPS_FULL * ref["ms"] / 1e3 + 8 * STORY_STEPS * ref_cfg["ms"] / 1e3
            + (8 * vae["ms"] / 1e3 if vae else 0.0), 1)
        est["reference_job_note"] = ("500 × ref_train_ckpt + 400 × ref CFG step + 8 decodes; excludes loading, "
                                     "and the reference's per-step ChatGLM + VAE encode")
    train = _ok(results, "job_train")
    stories = [r["s"] for n in ("job_story", "job_story_compile") if (r := _ok(results, n))]
    if train and train.get("step_ms") and stories:
        steps_left = max(0, TRAIN_STEPS_FULL - int(train["steps"]))
        est["our_job_s"] = round(train["s"] + steps_left * train["step_ms"] / 1e3 + min(stories), 1)
        est["our_job_note"] = (f"job_train ({train['steps']} steps measured, {train['images']} images) "
                               f"+ {steps_left} × its steady step + the faster story; excludes download, scan, "
                               "scoring and upload")
    return est


def _fmt(v: Any, unit: str = "", nd: int = 1) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.{nd}f}{unit}"
    return f"{v}{unit}"


def _table(doc: dict[str, Any]) -> str:
    meta = doc["meta"]
    lines = [
        f"# bench.gpu — {meta.get('device_name')}, torch {meta.get('versions', {}).get('torch')}, "
        f"{meta.get('mode')}, {meta.get('date')}",
        "",
        "| measurement | time | peak GiB | TFLOP/s | % of peak | × floor | vs reference | note |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for name, r in doc["results"].items():
        status = r.get("status")
        if status != "ok":
            detail = r.get("reason") or r.get("error") or ""
            lines.append(f"| {name} | {status} | | | | | | {detail[:120]} |")
            continue
        if "ms" in r:
            time_s = f"{r['ms']:.1f} ms"
            if r.get("batch", 1) > 1 and r.get("kind") == "train":
                time_s += f" (b{r['batch']}, {r['ms'] / r['batch']:.1f}/sample)"
        elif "s" in r:
            time_s = f"{r['s']:.1f} s"
        else:
            time_s = "ok"
        vs = r.get("speedup_vs_ref_as_run") or r.get("speedup_vs_ref")
        vs_s = ""
        if vs is not None:
            vs_s = f"{vs:.2f}×"
            if r.get("speedup_vs_ref_no_ckpt") is not None:
                vs_s += f" ({r['speedup_vs_ref_no_ckpt']:.2f}× no-ckpt)"
        notes = []
        if r.get("compile_s") is not None:
            notes.append(f"compile {r['compile_s']:.0f} s")
        if r.get("step_ms") is not None:
            notes.append(f"{r['step_ms']:.0f} ms/step, setup {r.get('setup_s')} s")
        if r.get("render_s") is not None:
            notes.append(f"render {r['render_s']} s, {r.get('per_image_cfg_step_ms')} ms/img/step")
        if r.get("tflops_measured") is not None:
            notes.append(f"{r['tflops_measured']} TFLOP/s matmul")
        if r.get("lora_tensors"):
            notes.append(f"{r['lora_tensors']} LoRA tensors")
        if r.get("tried"):
            notes.append(f"tried {r['tried']}")
        if r.get("predicted_peak_gib") is not None:
            notes.append(f"planner predicted {r['predicted_peak_gib']:.2f} GiB")
        if name in REFERENCE_ANCHORS:
            notes.append(f"docs/design.md §2 anchor: {REFERENCE_ANCHORS[name]}")
        lines.append(
            f"| {name} | {time_s} | {_fmt(r.get('peak_gib'), nd=2)} | {_fmt(r.get('tflops'))} | "
            f"{_fmt(r.get('pct_of_peak'), '%')} | {_fmt(r.get('x_floor'))} | {vs_s} | {'; '.join(notes)} |"
        )
    lines += ["", "| goal | target | measured | from | met |", "|---|---:|---:|---|---|"]
    for g in doc.get("goals", []):
        met = {True: "yes", False: "**no**", None: "not measured"}[g["met"]]
        lines.append(f"| {g['goal']} | {g['target']} | {_fmt(g['value'], nd=2)} | {g['from'] or ''} | {met} |")
    if doc.get("estimates"):
        lines.append("")
        lines += [f"- {key}: {value}" for key, value in doc["estimates"].items()]
    return "\n".join(lines) + "\n"


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"torch": torch.__version__, "cuda": torch.version.cuda,
                                  "cudnn": str(torch.backends.cudnn.version())}
    for pkg in ("diffusers", "transformers", "peft", "accelerate", "huggingface_hub", "diffsynth", "tokenizers",
                "safetensors", "pydantic"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = None
    return out
