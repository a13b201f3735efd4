"""CPU regression smoke: time the tiny pipeline's stages through the job's real code path.

Not a pass/fail test (CI runs it and prints the table): it makes slowdowns in our own code visible
without a GPU. Full-size numbers come from ``python -m bench.gpu`` on a lent GPU.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import torch

from kolors_job.core.settings import Settings
from kolors_job.data.scan import scan_dataset
from kolors_job.demo import DEMO_RESOLUTION, build_demo_dataset, demo_manifest
from kolors_job.sources import resolve_model
from kolors_job.story.draw import generate_story
from kolors_job.train.loop import train_lora


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--threads", type=int, default=1, help="1: stable numbers on a shared 2-core runner")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(cache_dir=Path(tmp) / "cache")
        manifest = demo_manifest(settings, output=str(Path(tmp) / "out"))
        spec = manifest.spec
        rows: list[tuple[str, float, str]] = []

        t = time.perf_counter()
        model = resolve_model("tiny://kolors", kind="pipeline", settings=settings)
        rows.append(("build tiny Kolors", time.perf_counter() - t, ""))

        data = build_demo_dataset(settings.cache_dir / "demo-dataset")
        t = time.perf_counter()
        scan = scan_dataset(data, spec.datasets[0], exif_orientation=spec.train.exif_orientation)
        rows.append(("scan dataset", time.perf_counter() - t, f"{scan.kept} kept"))

        train_spec = spec.train.model_copy(update={"steps": args.steps, "checkpoint_every": 10**6})
        t = time.perf_counter()
        result = train_lora(model, scan.items, train_spec, work_dir=Path(tmp) / "train", device="cpu", progress=False)
        total = time.perf_counter() - t
        rows.append((f"train {result.steps} steps @ {DEMO_RESOLUTION}² (incl. caching)", total,
                     f"{1000 * total / max(result.steps, 1):.0f} ms/step"))

        t = time.perf_counter()
        frames = generate_story(model, spec.story, out_dir=Path(tmp) / "story", lora_dir=result.lora_dir,
                                device="cpu", progress=False)
        total = time.perf_counter() - t
        rows.append((f"story {len(frames)} frames × {spec.story.steps} steps (CFG)", total,
                     f"{1000 * total / (len(frames) * spec.story.steps):.1f} ms/CFG step"))

    print(f"# bench.cpu — {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{args.threads} threads, {time.strftime('%Y-%m-%d')}")
    print("| stage | seconds | note |\n|---|---:|---|")
    for name, seconds, note in rows:
        print(f"| {name} | {seconds:.2f} | {note} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
