"""The oracle's checks: a resolved manifest and our code paths against ``reference.yaml``'s literals.

Each check takes a validated ``Manifest`` (the one ``kolors-job validate`` resolves from ``output.uri`` alone,
or a drifted copy in tests/test_oracle_mutations.py) and a scratch directory, runs *our* code with the
manifest's values and the reference's (DiffSynth's classes, torchvision, PIL, peft, torch, called as the
reference calls them) with the fixture's values, and raises ``AssertionError`` on any difference. None of
them reads kolors-job's defaults: a default that drifts from the reference fails here. The checks that need
a model (DiffSynth's pipeline and prompter on the tiny Kolors, its VAE encoder) are in
tests/test_reference_oracle.py; these are the cheap ones, run once per drift by the mutation test.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from functools import cache
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
import yaml
from PIL import Image

from kolors_job.manifest.load import parse_manifest
from kolors_job.manifest.spec import Manifest

FIXTURE = Path(__file__).with_name("reference.yaml")


@cache
def reference() -> dict[str, Any]:
    """``reference.yaml``: ``{"sources": {...}, "values": {name: {"value", "cite", ...}}}``."""
    return yaml.safe_load(FIXTURE.read_text(encoding="utf-8"))


def ref(name: str) -> Any:
    return reference()["values"][name]["value"]


def resolved_default() -> Manifest:
    """What ``kolors-job validate`` prints for a manifest holding only ``spec.output.uri``, read back."""
    minimal = parse_manifest("spec:\n  output: {uri: file:///tmp/oracle/}\n")
    return parse_manifest(minimal.to_yaml())


def _diffusers_targets(modules: list[str]) -> list[str]:
    names = ref("train.lora.diffusers_names")
    return [names.get(m, m) for m in modules]


# ------------------------------------------------------------------------------------------------ story


def check_story_frames(m: Manifest, tmp: Path) -> None:
    """The eight prompts, seeds and negative prompts, byte for byte and in order."""
    story = m.spec.story
    ours = [(f.prompt.encode(), f.seed, story.negative_for(f).encode()) for f in story.frames]
    theirs = [(f["prompt"].encode(), f["seed"], f["negative_prompt"].encode()) for f in ref("story.frames")]
    assert ours == theirs


def check_story_sampling_call(m: Manifest, tmp: Path) -> None:
    """``pipe(cfg_scale=4, num_inference_steps=50, height=1024, width=1024)``."""
    s = m.spec.story
    size = ref("story.size")
    assert (s.cfg_scale, s.steps) == (ref("story.cfg_scale"), ref("story.num_inference_steps"))
    assert (s.height, s.width) == (size["height"], size["width"])


def check_sampling_dtype(m: Manifest, tmp: Path) -> None:
    """On CUDA the story samples in the reference's ``ModelManager(torch_dtype=...)``."""
    from kolors_job.render import pipeline as generate

    assert generate.sampling_dtype(torch.device("cuda"), m.spec.story.precision) == getattr(
        torch, ref("story.sampling_dtype")
    )


def check_sampler_timesteps(m: Manifest, tmp: Path) -> None:
    """Our sampler visits the timesteps DiffSynth's Kolors scheduler visits for the reference's step count."""
    from kolors_job.models.configs import KOLORS_SCHEDULER_CONFIG
    from kolors_job.models.schedulers import make_scheduler, sampler_timesteps

    story = m.spec.story
    ours = make_scheduler(story.scheduler, KOLORS_SCHEDULER_CONFIG)
    timesteps = sampler_timesteps(story.scheduler, story.steps, KOLORS_SCHEDULER_CONFIG)
    ours.set_timesteps(timesteps=timesteps) if timesteps else ours.set_timesteps(story.steps)
    assert [int(t) for t in ours.timesteps] == _reference_timesteps()


@cache
def _reference_timesteps() -> list[int]:
    """DiffSynth's side, from the fixture alone: the same in every check, computed once per process."""
    from diffsynth.schedulers import EnhancedDDIMScheduler

    sampler = ref("story.sampler")
    ddim = EnhancedDDIMScheduler(beta_end=sampler["beta_end"], num_train_timesteps=sampler["num_train_timesteps"])
    ddim.set_timesteps(ref("story.num_inference_steps"))
    return [int(t) for t in ddim.timesteps]


def check_lora_scale_at_sampling(m: Manifest, tmp: Path) -> None:
    """peft scales the LoRA branch by ``weight * alpha / r``: ours loads the trained (rank, alpha) file at
    ``lora_scale``; the reference injects ``LoraConfig(r=16, lora_alpha=2.0)``."""
    from peft import inject_adapter_in_model
    from peft.tuners.lora.config import LoraConfig  # the class itself, whatever a test patches on ``peft``

    def scaling(r: int, alpha: float, weight: float) -> float:
        layer = inject_adapter_in_model(
            LoraConfig(r=r, lora_alpha=alpha, target_modules=["to_q"]), torch.nn.ModuleDict({"to_q": torch.nn.Linear(4, 4)})
        ).to_q
        layer.set_scale("default", weight)
        return float(layer.scaling["default"])

    load = ref("story.lora_at_sampling")
    t = m.spec.train
    assert scaling(t.rank, t.alpha, m.spec.story.lora_scale) == scaling(load["rank"], load["alpha"], 1.0)


def check_story_tiling(m: Manifest, tmp: Path) -> None:
    """``story.jpg``'s picture equals the notebook's cell run on the same frames."""
    from kolors_job.report.html import tile_frames

    frames, notebook = _reference_tiling()
    ours = tile_frames(frames, m.spec.story.tiling)
    assert ours.size == notebook.size and np.array_equal(np.asarray(ours), np.asarray(notebook))


@cache
def _reference_tiling() -> tuple[list[Image.Image], Image.Image]:
    """Eight frames and the notebook's cell run on them, from the fixture alone (once per process)."""
    import tempfile

    tiling = ref("story.tiling")
    rng = np.random.default_rng(0)
    frames = [Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)) for _ in range(8)]
    arrays = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, frame in enumerate(frames, start=1):  # image.save(f"{i}.jpg"); np.array(Image.open(f"{i}.jpg"))
            frame.save(f"{tmp}/{i}.jpg")
            arrays.append(np.array(Image.open(f"{tmp}/{i}.jpg")))
    cols = tiling["cols"]
    grid = np.concatenate([np.concatenate(arrays[i : i + cols], axis=1) for i in range(0, 8, cols)], axis=0)
    return frames, Image.fromarray(grid).resize(tuple(tiling["size"]))


# ------------------------------------------------------------------------------------------------- data


def check_dataset(m: Manifest, tmp: Path) -> None:
    """lowres_anime's train split, captioned 二次元, through data-juicer's two filters' thresholds."""
    d, source, filters = m.spec.dataset, ref("dataset.source"), ref("dataset.filters")
    assert (d.source, d.subset, d.split) == (f"modelscope://{source['id']}", source["subset"], source["split"])
    assert d.caption.fixed == ref("dataset.caption") and not d.caption.prefix and d.caption.dropout == 0
    f = d.filters
    assert (f.min_width, f.min_height) == (filters["min_width"], filters["min_height"])
    assert tuple(f.aspect_ratio) == (filters["min_ratio"], filters["max_ratio"])


def _reference_tensor(src: Path, tmp: Path) -> torch.Tensor:
    """The reference's data step and TextImageDataset transform, run with the fixture's values."""
    from torchvision import transforms

    reencode, resize = ref("train.jpeg_reencode"), ref("train.resize")
    assert reencode["quality"] == "PIL default" and reencode["first"] == 'convert("RGB")'
    image = Image.open(src).convert("RGB")  # data["image"].convert("RGB")
    for i in range(reencode["times"]):  # image.save(f"{data_id}.jpg"), then Image.open(...).save(...)
        path = tmp / f"reference-{i}.jpg"
        image.save(path)
        image = Image.open(path)
    assert not ref("train.exif_orientation") and ref("train.crop") == "center"
    assert resize["interpolation"] == "bilinear" and resize["long_side"] == "floor"  # torchvision's Resize
    size = ref("train.resolution")
    process = transforms.Compose([
        transforms.Resize(resize["short_side"], interpolation=transforms.InterpolationMode.BILINEAR),
        transforms.CenterCrop((size["height"], size["width"])),
        transforms.ToTensor(),
        transforms.Normalize([0.5], [0.5]),
    ])
    return process(image.convert("RGB"))  # Image.open(path).convert("RGB")


def reference_image(path: Path) -> Path:
    """A training image every data choice shows on: landscape as stored (1537x1100) but EXIF says turn it
    (orientation 6), partly transparent, and a size whose resized long side rounds up where the reference
    floors it (1024 * 1537 / 1100 = 1430.8)."""
    path.write_bytes(_reference_png())
    return path


@cache
def _reference_png() -> bytes:
    import io

    rng = np.random.default_rng(1)
    rgba = rng.integers(0, 256, (1100, 1537, 4), dtype=np.uint8)
    rgba[:, :, :3] = np.clip(rgba[:, :, :3] // 4 + np.linspace(0, 190, 1537, dtype=np.uint8)[None, :, None], 0, 255)
    rgba[:, :300, 3] = 40
    rgba[:, 300:, 3] = 255
    exif = Image.Exif()
    exif[0x0112] = 6
    out = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(out, format="PNG", exif=exif)
    return out.getvalue()


def check_training_image(m: Manifest, tmp: Path) -> None:
    """Our scan + ``load_image`` with the manifest's switches gives the tensor the reference's data step and
    dataset give (JPEG twice, no EXIF turn, bilinear with the long side floored, centre crop, resolution)."""
    from kolors_job.data.images import load_image
    from kolors_job.data.scan import scan_dataset

    root = tmp / "data"
    root.mkdir(exist_ok=True)
    reference_image(root / "a.png")
    t = m.spec.train
    scan = scan_dataset(root, m.spec.dataset, workers=1, exif_orientation=t.exif_orientation)
    assert [i.path.name for i in scan.items] == ["a.png"], scan.skipped_counts
    ours, _ = load_image(
        scan.items[0], t.resolution, t.center_crop, False, random.Random(0), t.resize_filter,
        exif_orientation=t.exif_orientation, jpeg_reencode=t.jpeg_reencode,
    )
    theirs = _reference_training_image()
    assert ours.shape == theirs.shape
    assert (ours - theirs).abs().max().item() < 1e-6


@cache
def _reference_training_image() -> torch.Tensor:
    """The reference's side of ``check_training_image``, from the fixture alone (once per process)."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        return _reference_tensor(reference_image(Path(tmp) / "a.png"), Path(tmp))


def check_data_order(m: Manifest, tmp: Path) -> None:
    """The reference draws an image per sample, with replacement: some run of n consecutive samples repeats
    an image (one permutation per epoch never does) and every image comes up."""
    from kolors_job.train.data import SampleStream

    assert ref("train.data_order") == "random"
    n = 4
    stream = SampleStream(n, m.spec.train.seed, m.spec.train.data_order)
    seen = [stream.item(g) for g in range(400)]
    windows = [seen[i : i + n] for i in range(0, len(seen), n)]
    assert any(len(set(w)) < n for w in windows) and set(seen) == set(range(n))


# --------------------------------------------------------------------------------------------- training


def check_lora_shape(m: Manifest, tmp: Path) -> None:
    """rank 16, alpha 4 on to_q/to_k/to_v/to_out (diffusers names ``to_out`` ``to_out.0``)."""
    lora, t = ref("train.lora"), m.spec.train
    assert (t.rank, t.alpha) == (lora["rank"], lora["alpha"])
    assert sorted(t.target_modules) == sorted(_diffusers_targets(lora["target_modules"]))


def check_init(m: Manifest, tmp: Path) -> None:
    """LoRA A starts as the era's trainer started it (``init_lora_weights="gaussian"``): our ``add_lora``
    and peft's ``inject_adapter_in_model`` with the fixture's config (DiffSynth's ``add_lora_to_model``) draw
    the same tensors from one seed, on a tiny UNet."""
    import copy

    from kolors_job.train.setup import add_lora

    ours = copy.deepcopy(_tiny_unet())
    torch.manual_seed(1)
    add_lora(ours, m.spec.train, torch.device("cpu"))
    mine = {k: v for k, v in ours.named_parameters() if "lora_" in k}
    their = _reference_lora_init()
    assert mine.keys() == their.keys() and mine
    assert all(torch.equal(mine[k].float(), their[k].float()) for k in mine)


@cache
def _tiny_unet() -> Any:
    from diffusers import UNet2DConditionModel

    from kolors_job.models.tiny import TINY_UNET_CONFIG

    torch.manual_seed(0)
    return UNet2DConditionModel(**TINY_UNET_CONFIG)


@cache
def _reference_lora_init() -> dict[str, torch.Tensor]:
    """peft's side of ``check_init``, from the fixture alone (once per process)."""
    import copy

    from peft import inject_adapter_in_model
    from peft.tuners.lora.config import LoraConfig  # the class itself, whatever a test patches on ``peft``

    lora = ref("train.lora")
    config = LoraConfig(r=lora["rank"], lora_alpha=lora["alpha"], init_lora_weights=ref("train.init_lora_weights"),
                        target_modules=_diffusers_targets(lora["target_modules"]))
    theirs = copy.deepcopy(_tiny_unet())
    torch.manual_seed(1)
    inject_adapter_in_model(config, theirs)
    return {k: v.detach() for k, v in theirs.named_parameters() if "lora_" in k}


def check_optimizer(m: Manifest, tmp: Path) -> None:
    """``torch.optim.AdamW(params, lr=1e-4)``: every hyperparameter as torch's AdamW defaults them."""
    from kolors_job.train.setup import make_optimizer

    assert ref("train.optimizer") == {"class": "AdamW", "arguments": "lr only"}
    ours = make_optimizer(m.spec.train, [torch.nn.Parameter(torch.zeros(2))], torch.device("cpu"))
    theirs = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=ref("train.learning_rate"))
    assert type(ours) is type(theirs)
    keys = ("lr", "betas", "eps", "weight_decay", "amsgrad", "maximize")
    assert {k: ours.param_groups[0][k] for k in keys} == {k: theirs.param_groups[0][k] for k in keys}
    assert m.spec.train.lr_scheduler == "constant" and m.spec.train.warmup_steps == 0  # Lightning: no scheduler


def check_no_clipping(m: Manifest, tmp: Path) -> None:
    assert m.spec.train.max_grad_norm == ref("train.gradient_clip_val")


def check_precision(m: Manifest, tmp: Path) -> None:
    """Lightning's ``16-mixed`` is fp16 autocast with fp32 master LoRA weights and a GradScaler: accelerate's
    ``fp16`` on CUDA."""
    from kolors_job.train.setup import resolve_precision

    assert {"16-mixed": "fp16"}[ref("train.precision")] == resolve_precision(
        m.spec.train.precision, torch.device("cuda")
    )


def check_schedule(m: Manifest, tmp: Path) -> None:
    """``max_epochs × steps_per_epoch`` optimizer steps of batch 1 without accumulation, whatever the data size,
    at the reference's resolution."""
    from kolors_job.train.setup import total_steps

    sched, t, size = ref("train.schedule"), m.spec.train, ref("train.resolution")
    per_step = t.batch_size * t.gradient_accumulation
    assert per_step == sched["batch_size"] * sched["accumulate_grad_batches"]
    expected = sched["steps_per_epoch"] * sched["max_epochs"]
    assert [total_steps(t, n, per_step) for n in (7, 5000)] == [expected, expected]
    assert t.resolution == size["height"] == size["width"]
    assert t.random_flip is ref("train.random_flip")


def _batch(m: Manifest) -> Any:
    from kolors_job.data.images import ImageItem
    from kolors_job.models.prompts import PromptEmbeds
    from kolors_job.train.data import SampleStream, make_batch
    from kolors_job.train.latents import LatentEntry

    t = m.spec.train
    lat = t.resolution // 8
    gen = torch.Generator().manual_seed(0)
    entry = LatentEntry(
        mean=torch.randn(4, lat, lat, generator=gen), std=torch.rand(4, lat, lat, generator=gen) + 0.1,
        time_ids=(1100, 1537, 38, 203, t.resolution, t.resolution),  # a landscape image, its centre crop
    )
    batch = make_batch(
        [0], SampleStream(1, t.seed, t.data_order), [ImageItem(Path("a.png"), "二次元", 1537, 1100)],
        {(0, False): entry}, {"二次元": PromptEmbeds(torch.zeros(1), torch.zeros(1))}, num_train_timesteps=1100,
        scaling_factor=0.13025, caption_dropout=0.0, random_flip=False, latent=t.latent, time_ids=t.time_ids,
    )
    return batch, entry


def check_time_ids(m: Manifest, tmp: Path) -> None:
    """DiffSynth's ``prepare_extra_input`` on the latent of the reference's crop, whatever the image's size."""
    from diffsynth.pipelines.sdxl_image import SDXLImagePipeline

    assert ref("train.time_ids") == "latent size"
    size = ref("train.resolution")
    latents = torch.zeros(1, 4, size["height"] // 8, size["width"] // 8)
    theirs = SDXLImagePipeline.prepare_extra_input(SimpleNamespace(device="cpu"), latents)["add_time_id"]
    batch, _ = _batch(m)
    assert batch.time_ids.flatten().tolist() == theirs.tolist()


def check_latent(m: Manifest, tmp: Path) -> None:
    """The training latent is the posterior mean times the scaling factor (DiffSynth's encoder output; its
    equality with DiffSynth's own encoder is in tests/test_reference_oracle.py)."""
    assert ref("train.latent") == "posterior mean"
    batch, entry = _batch(m)
    assert torch.equal(batch.latents[0], entry.mean * 0.13025)


def check_training_vae(m: Manifest, tmp: Path) -> None:
    """sdxl-vae-fp16-fix's ``diffusion_pytorch_model.safetensors`` from ModelScope, encoding in fp16 on the
    reference's CUDA precision."""
    from kolors_job.sources.hubs import select_files
    from kolors_job.train.data import vae_encode_dtype
    from kolors_job.train.setup import resolve_precision, weight_dtype_for
    from tests.hub_servers.artifacts import VAE_FP16_FIX_LAYOUT

    vae = ref("train.vae")
    assert m.spec.model.train_vae == f"modelscope://{vae['model_id']}"
    files, _ = select_files("vae", VAE_FP16_FIX_LAYOUT, prefer_fp16=True)
    assert vae["file"] in files and [f for f in files if f.endswith(".safetensors")] == [vae["file"]]
    precision = resolve_precision(m.spec.train.precision, torch.device("cuda"))
    fp16_safe = m.spec.model.train_vae == f"modelscope://{vae['model_id']}"  # its config: force_upcast false
    dtype = vae_encode_dtype(precision, weight_dtype_for(precision), force_upcast=not fp16_safe)
    assert dtype == getattr(torch, ref("train.vae_dtype"))


def check_score_threshold(m: Manifest, tmp: Path) -> None:
    assert m.spec.score.threshold == ref("score.threshold")


CHECKS: dict[str, Callable[[Manifest, Path], None]] = {
    f.__name__.removeprefix("check_"): f
    for f in (
        check_story_frames, check_story_sampling_call, check_sampling_dtype, check_sampler_timesteps,
        check_lora_scale_at_sampling, check_story_tiling, check_dataset, check_training_image, check_data_order,
        check_lora_shape, check_init, check_optimizer, check_no_clipping, check_precision, check_schedule,
        check_time_ids, check_latent, check_training_vae, check_score_threshold,
    )
}
"""Cheapest first: the mutation test stops at the first check that fails."""


def failures(m: Manifest, tmp: Path, *, first_only: bool = False) -> dict[str, str]:
    """``{check: why}`` for every check ``m`` fails (only the first when ``first_only``)."""
    out: dict[str, str] = {}
    for name, check in CHECKS.items():
        sub = tmp / name
        sub.mkdir(parents=True, exist_ok=True)
        try:
            check(m, sub)
        except AssertionError as e:
            out[name] = str(e).splitlines()[0] if str(e) else "assertion failed"
            if first_only:
                break
    return out

