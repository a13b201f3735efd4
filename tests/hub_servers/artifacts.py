"""Tiny random stand-ins for the three default sources, written in their REAL hub layouts.

A fixture saved with plain file names proved nothing about the real repos (issue 11): the real
``Kwai-Kolors/Kolors-diffusers`` ships only fp16-variant weights, the predictor ships a torch pickle,
and the dataset is parquet. Each writer below says where its layout comes from. Weights come from
``kolors_job.models.tiny`` (the same tiny architectures every other test uses), only re-saved.

Layout sources (public hub listings, read 2026-11):

- Kolors-diffusers, https://huggingface.co/Kwai-Kolors/Kolors-diffusers/tree/main (commit 7e091c7):
  ``imgs/``, ``scheduler/``, ``text_encoder/`` (``config.json``, ``model.fp16-0000{1,2,3}-of-00003.safetensors``
  4.91/4.90/2.68 GB, ``model.safetensors.index.fp16.json`` 19 kB), ``tokenizer/``, ``unet/``
  (``diffusion_pytorch_model.fp16.safetensors`` 5.16 GB), ``vae/`` (``diffusion_pytorch_model.fp16.safetensors``
  167 MB), ``.gitattributes``, ``MODEL_LICENSE``, ``README.md``, ``model_index.json``. No plain-named weights.
- aesthetics-predictor, https://huggingface.co/shunk031/aesthetics-predictor-v2-sac-logos-ava1-l14-linearMSE
  at bfb9ed8 (2023): ``.gitattributes``, ``config.json``, ``merges.txt``, ``preprocessor_config.json``,
  ``pytorch_model.bin`` (1.22 GB, LFS), ``special_tokens_map.json``, ``tokenizer.json``,
  ``tokenizer_config.json``, ``vocab.json``. Commits of 2024-06 add ``configuration_predictor.py`` and
  ``modeling_v2.py`` (custom code, tag ``custom_code``).
- lowres_anime: see :func:`write_lowres_anime`.
- sdxl-vae-fp16-fix: see :func:`write_sdxl_vae_fp16_fix`.
"""

from __future__ import annotations

import io
import json
import random
import shutil
import threading
from pathlib import Path

from kolors_job.models.tiny import build_tiny_aesthetic_predictor, build_tiny_kolors

__all__ = [
    "ANIME_FOLDER_ID",
    "ANIME_IMAGES",
    "ANIME_NATIVE_ID",
    "KOLORS_BOTH_ID",
    "KOLORS_FP16_LOADER_FILES",
    "KOLORS_ID",
    "PREDICTOR_CUSTOM_ID",
    "VAE_FP16_FIX_FILES",
    "VAE_FP16_FIX_LAYOUT",
    "anime_text",
    "build_default_artifacts",
    "fp16_loader_files",
    "write_aesthetic_predictor",
    "write_kolors_both_variants",
    "write_kolors_diffusers",
    "write_lowres_anime",
    "write_lowres_anime_folder",
    "write_lowres_anime_native",
    "write_sdxl_vae_fp16_fix",
]

TEXT_ENCODER_SHARDS = 3
"""The real text encoder is split in three fp16 shards; the tiny one is re-sharded to match."""

GITATTRIBUTES = """\
*.7z filter=lfs diff=lfs merge=lfs -text
*.bin filter=lfs diff=lfs merge=lfs -text
*.ckpt filter=lfs diff=lfs merge=lfs -text
*.parquet filter=lfs diff=lfs merge=lfs -text
*.pt filter=lfs diff=lfs merge=lfs -text
*.pth filter=lfs diff=lfs merge=lfs -text
*.safetensors filter=lfs diff=lfs merge=lfs -text
*.png filter=lfs diff=lfs merge=lfs -text
tokenizer.model filter=lfs diff=lfs merge=lfs -text
"""
"""The hub's default LFS rules (trimmed): what they mark as LFS is what the emulators serve as LFS."""

_LOCK = threading.Lock()


def _tiny_source(kind: str, dest: Path) -> Path:
    """The plain-named tiny model, built once (seconds) in ``.tiny-src`` next to ``dest`` and reused."""
    build = build_tiny_kolors if kind == "kolors" else build_tiny_aesthetic_predictor
    with _LOCK:
        return build(Path(dest).parent / ".tiny-src" / kind, seed=0)


def _png(size: tuple[int, int], colour: tuple[int, int, int], seed: int) -> bytes:
    """A flat colour with sparse noise: cheap to encode even at 1024 px, and not all-identical."""
    from PIL import Image

    img = Image.new("RGB", size, colour)
    rng = random.Random(seed)
    px = img.load()
    for _ in range(64):
        x, y = rng.randrange(size[0]), rng.randrange(size[1])
        px[x, y] = (rng.randrange(256), rng.randrange(256), rng.randrange(256))
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def _common_model_files(dest: Path, title: str) -> None:
    (dest / ".gitattributes").write_text(GITATTRIBUTES)
    (dest / "README.md").write_text(
        f"---\nlicense: apache-2.0\n---\n# {title} (tiny random test copy)\n\n"
        "Random weights in the real repository's file layout, for loopback hub tests.\n"
    )


def _resave_kolors(dest: Path, *, fp16_variant: bool, plain_fp32: bool, src: Path | None = None) -> None:
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.pipelines.kolors.text_encoder import ChatGLMModel

    src = src or _tiny_source("kolors", dest)
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy2(src / "model_index.json", dest / "model_index.json")
    for sub in ("scheduler", "tokenizer"):
        shutil.copytree(src / sub, dest / sub, dirs_exist_ok=True)
    unet = UNet2DConditionModel.from_pretrained(src / "unet")
    vae = AutoencoderKL.from_pretrained(src / "vae")
    text_encoder = ChatGLMModel.from_pretrained(src / "text_encoder")
    if plain_fp32:
        unet.save_pretrained(dest / "unet", safe_serialization=True)
        vae.save_pretrained(dest / "vae", safe_serialization=True)
        text_encoder.save_pretrained(dest / "text_encoder", safe_serialization=True)
    if fp16_variant:
        unet.to(torch.float16).save_pretrained(dest / "unet", variant="fp16", safe_serialization=True)
        vae.to(torch.float16).save_pretrained(dest / "vae", variant="fp16", safe_serialization=True)
        _save_sharded_fp16(text_encoder.to(torch.float16), dest / "text_encoder")
    (dest / "imgs").mkdir(exist_ok=True)
    (dest / "imgs" / "t2i.png").write_bytes(_png((64, 64), (200, 120, 80), seed=7))
    (dest / "MODEL_LICENSE").write_text("Kolors model license (placeholder text for the tiny test copy).\n")
    _common_model_files(dest, "Kolors-diffusers")


def _save_sharded_fp16(model, out: Path) -> None:
    """``save_pretrained(variant="fp16", max_shard_size=...)`` with the shard size that gives exactly 3 shards.

    transformers shards greedily in state-dict order, so the count is found by trying sizes between
    the largest tensor and a third of the total (a handful of saves of a 9 MB model).
    """
    tensors = [t.numel() * t.element_size() for t in model.state_dict().values()]
    total, largest = sum(tensors), max(tensors)
    for fraction in (0.34, 0.36, 0.38, 0.40, 0.42, 0.45, 0.5):
        limit = max(int(total * fraction), largest)
        tmp = out.with_name(out.name + ".try")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp, variant="fp16", max_shard_size=limit, safe_serialization=True)
        shards = sorted(tmp.glob("model.fp16-*-of-*.safetensors"))
        if len(shards) == TEXT_ENCODER_SHARDS:
            out.mkdir(parents=True, exist_ok=True)
            for f in tmp.iterdir():
                shutil.move(str(f), out / f.name)
            tmp.rmdir()
            return
        shutil.rmtree(tmp)
    raise RuntimeError(f"no max_shard_size gives {TEXT_ENCODER_SHARDS} text-encoder shards")


def write_kolors_diffusers(dest: Path, src: Path | None = None) -> Path:
    """The tiny Kolors re-saved exactly like ``Kwai-Kolors/Kolors-diffusers``: fp16-variant weights only.

    ``text_encoder/model.fp16-0000{1,2,3}-of-00003.safetensors`` + ``model.safetensors.index.fp16.json``,
    ``unet``/``vae`` ``diffusion_pytorch_model.fp16.safetensors`` (tensors stored as float16), the
    ChatGLM tokenizer files, the real scheduler config, and the top-level extras the real repo carries
    (``README.md``, ``.gitattributes``, ``MODEL_LICENSE``, ``imgs/t2i.png``) that a loader must not fetch.
    """
    _resave_kolors(Path(dest), fp16_variant=True, plain_fp32=False, src=src)
    return Path(dest)


def write_kolors_both_variants(dest: Path) -> Path:
    """Like :func:`write_kolors_diffusers` plus fp32 plain-named weights: for testing variant choice."""
    _resave_kolors(Path(dest), fp16_variant=True, plain_fp32=True)
    return Path(dest)


CONFIGURATION_PREDICTOR = """\
from transformers.models.clip.configuration_clip import CLIPVisionConfig


class AestheticsPredictorConfig(CLIPVisionConfig):
    model_type = "aesthetics_predictor"
"""

MODELING_V2 = """\
import torch.nn as nn
from transformers import CLIPVisionModelWithProjection
from transformers.modeling_outputs import ImageClassifierOutputWithNoAttention

from .configuration_predictor import AestheticsPredictorConfig


class AestheticsPredictorV2Linear(CLIPVisionModelWithProjection):
    config_class = AestheticsPredictorConfig

    def __init__(self, config):
        super().__init__(config)
        self.layers = nn.Sequential(
            nn.Linear(config.projection_dim, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )
        self.post_init()

    def forward(self, pixel_values=None, output_attentions=None, output_hidden_states=None, labels=None,
                return_dict=None):
        outputs = super().forward(pixel_values=pixel_values, output_attentions=output_attentions,
                                  output_hidden_states=output_hidden_states, return_dict=True)
        image_embeds = outputs[0]
        image_embeds = image_embeds / image_embeds.norm(dim=-1, keepdim=True)
        prediction = self.layers(image_embeds)
        return ImageClassifierOutputWithNoAttention(loss=None, logits=prediction, hidden_states=image_embeds)
"""


def write_aesthetic_predictor(dest: Path, *, custom_code: bool = False) -> Path:
    """The tiny predictor re-saved like ``shunk031/aesthetics-predictor-v2-sac-logos-ava1-l14-linearMSE``.

    ``config.json``, ``preprocessor_config.json``, the CLIP tokenizer files (``vocab.json``, ``merges.txt``,
    ``tokenizer.json``, ``tokenizer_config.json``, ``special_tokens_map.json``) and the weights as
    ``pytorch_model.bin`` (a torch pickle, ``safe_serialization=False``): no safetensors, as in the 2023
    revisions the ModelScope copy ``AI-ModelScope/...`` was taken from.

    ``custom_code=True`` adds the 2024 revisions' ``configuration_predictor.py`` and ``modeling_v2.py``
    and an ``auto_map`` in ``config.json``. Their exact content could not be fetched (hub unreachable,
    not in any searchable mirror): these files are plausible reconstructions (same class names, same
    head as ``aesthetics_predictor.v2``), so only the *presence* of custom code is realistic, not its text.
    """
    from aesthetics_predictor import AestheticsPredictorV2Linear

    dest = Path(dest)
    src = _tiny_source("aesthetic", dest)
    dest.mkdir(parents=True, exist_ok=True)
    model = AestheticsPredictorV2Linear.from_pretrained(src)
    model.save_pretrained(dest, safe_serialization=False)
    for name in (
        "preprocessor_config.json",
        "vocab.json",
        "merges.txt",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
    ):
        shutil.copy2(src / name, dest / name)
    (dest / ".gitattributes").write_text(GITATTRIBUTES)
    if custom_code:
        (dest / "configuration_predictor.py").write_text(CONFIGURATION_PREDICTOR)
        (dest / "modeling_v2.py").write_text(MODELING_V2)
        config = json.loads((dest / "config.json").read_text())
        config["auto_map"] = {
            "AutoConfig": "configuration_predictor.AestheticsPredictorConfig",
            "AutoModel": "modeling_v2.AestheticsPredictorV2Linear",
        }
        (dest / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return dest


KOLORS_ID = "Kwai-Kolors/Kolors-diffusers"
KOLORS_BOTH_ID = "kolors-job-tests/Kolors-diffusers-fp32-and-fp16"
"""Not a real repo: Kolors with fp32 plain-named AND fp16 variant weights, for variant-choice tests."""
PREDICTOR_CUSTOM_ID = "kolors-job-tests/aesthetics-predictor-custom-code"
"""Not a real repo: the predictor as its 2024 revisions ship it (custom code + auto_map)."""
ANIME_NATIVE_ID = "kolors-job-tests/lowres_anime_native"
"""Not a real repo: lowres_anime's rows in ModelScope's native layout (:func:`write_lowres_anime_native`)."""
ANIME_FOLDER_ID = "kolors-job-tests/lowres_anime_folder"
"""Not a real repo: lowres_anime's rows as an image folder + metadata file (:func:`write_lowres_anime_folder`)."""
"""Repo ids both hubs serve under the same name."""

KOLORS_FP16_LOADER_FILES = [
    "model_index.json",
    "scheduler/*",
    "tokenizer/*",
    "text_encoder/config.json",
    "text_encoder/model.safetensors.index.fp16.json",
    "text_encoder/model.fp16-*.safetensors",
    "unet/config.json",
    "unet/diffusion_pytorch_model.fp16.safetensors",
    "vae/config.json",
    "vae/diffusion_pytorch_model.fp16.safetensors",
]
"""What the loaders open for Kolors-diffusers' fp16 variant (from diffusers' and transformers'
``from_pretrained``, not from ``kolors_job.sources``): no README, licence, sample images or .gitattributes."""


def fp16_loader_files(folder: Path) -> dict[str, int]:
    """{path: size} of the files in a Kolors-diffusers folder that :data:`KOLORS_FP16_LOADER_FILES` names."""
    from fnmatch import fnmatch

    files = {p.relative_to(folder).as_posix(): p.stat().st_size for p in Path(folder).rglob("*") if p.is_file()}
    return {p: n for p, n in files.items() if any(fnmatch(p, pat) for pat in KOLORS_FP16_LOADER_FILES)}


ANIME_IMAGES: list[tuple[str, tuple[int, int], bool]] = [
    ("square_1024", (1024, 1024), True),
    ("portrait_1024x1536", (1024, 1536), True),
    ("landscape_1536x1024", (1536, 1024), True),
    ("small_512", (512, 512), False),
    ("too_wide_2400x1024", (2400, 1024), False),
    ("too_tall_1024x2200", (1024, 2200), False),
]
"""(name, (width, height), kept by the default filters: min side 1024, aspect 0.5-2.0)."""


def anime_text(name: str) -> str:
    """The ``text`` column's caption for an :data:`ANIME_IMAGES` row (the mirror's second column)."""
    return f"二次元，{name.replace('_', ' ')}"

ANIME_README = """\
---
size_categories:
- 1K<n<10K
task_categories:
- text-to-image
pretty_name: anime
dataset_info:
  features:
  - name: image
    dtype: image
  - name: text
    dtype: string
  splits:
  - name: train
    num_examples: {n}
configs:
- config_name: default
  data_files:
  - split: train
    path: data/train-*
tags:
- art
---

# anime characters datasets (tiny test copy)
"""


def write_lowres_anime(dest: Path) -> Path:
    """``AI-ModelScope/lowres_anime`` (subset ``default``, split ``train``) as the hub hosts it: parquet.

    What is established: the challenge notebook loads it with
    ``MsDataset.load('AI-ModelScope/lowres_anime', subset_name='default', split='train')`` and reads
    ``data["image"]`` as a PIL image. ``AI-ModelScope/*`` datasets are ModelScope's mirrors of Hugging Face
    repos; the source is https://huggingface.co/datasets/lowres/anime, whose card declares one feature
    ``image`` (dtype ``image``), ``configs: [{config_name: default, data_files: [{split: train, path:
    data/train-*}, ...]}]`` and whose ``data/`` holds ``train-00000-of-00002.parquet`` (405 MB) and
    ``train-00001-of-00002.parquet`` (337 MB, 1454 rows in all, columns ``image`` and ``text``) plus
    per-character splits (``miku-*``, ``aiohto-*``...).
    What is inferred (the ModelScope listing itself could not be read): the mirror keeps those files.
    So this writes ``README.md`` with that card and ``data/train-0000{0,1}-of-00002.parquet`` whose
    ``image`` column is the ``datasets`` Image struct ``{bytes, path}`` (what ``push_to_hub`` writes) and
    whose ``text`` column is a caption (:func:`anime_text`), plus a ``data/miku-00000-of-00001.parquet``
    split a loader must not fetch for ``split='train'``.
    The images are :data:`ANIME_IMAGES`: three the default filters keep, three they reject. The other
    layouts a ModelScope dataset repo may have for the same rows: :func:`write_lowres_anime_native`,
    :func:`write_lowres_anime_folder`.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    dest = Path(dest)
    data = dest / "data"
    data.mkdir(parents=True, exist_ok=True)
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    features = {"info": {"features": {"image": {"_type": "Image"}, "text": {"dtype": "string", "_type": "Value"}}}}
    schema = pa.schema(
        [pa.field("image", image_type), pa.field("text", pa.string())], metadata={"huggingface": json.dumps(features)}
    )

    def write(path: Path, rows: list[tuple[str, tuple[int, int], bool]], colour_seed: int) -> None:
        records = [
            {"bytes": _png(size, ((40 * i + colour_seed) % 256, 90, 160), seed=i), "path": f"{name}.png"}
            for i, (name, size, _) in enumerate(rows)
        ]
        texts = [anime_text(name) for name, _, _ in rows]
        table = pa.table({"image": pa.array(records, type=image_type), "text": pa.array(texts)}, schema=schema)
        pq.write_table(table, path)

    write(data / "train-00000-of-00002.parquet", ANIME_IMAGES[:3], 0)
    write(data / "train-00001-of-00002.parquet", ANIME_IMAGES[3:], 120)
    write(data / "miku-00000-of-00001.parquet", [("miku_64", (64, 64), False)], 200)
    (dest / "README.md").write_text(ANIME_README.format(n=len(ANIME_IMAGES)))
    (dest / ".gitattributes").write_text(GITATTRIBUTES)
    return dest


VAE_FP16_FIX_LAYOUT = (
    ".gitattributes", "README.md", "config.json", "diffusion_pytorch_model.safetensors", "sdxl.vae.safetensors",
    "images/orig-fp32.png", "images/orig-fp16.png", "images/fix-fp32.png", "images/fix-fp16.png",
    "images/activation-magnitudes.jpg",
)
"""The repo's files (sources: :func:`write_sdxl_vae_fp16_fix`)."""
VAE_FP16_FIX_FILES = ("config.json", "diffusion_pytorch_model.safetensors")
"""What the reference downloads of it (DiffSynth's ``download_models(["SDXL-vae-fp16-fix"])`` preset names
``diffusion_pytorch_model.safetensors``) plus the config diffusers' ``AutoencoderKL.from_pretrained`` reads."""


def write_sdxl_vae_fp16_fix(dest: Path) -> Path:
    """The tiny Kolors VAE re-saved like ``madebyollin/sdxl-vae-fp16-fix`` (ModelScope copy
    ``AI-ModelScope/sdxl-vae-fp16-fix``, which the reference's ``download_models(["SDXL-vae-fp16-fix"])``
    reads: DiffSynth ``diffsynth/configs/model_config.py``, preset ``SDXL-vae-fp16-fix``).

    Layout sources: the repo's README (on the hub, and copied at ``smalltong02/keras-llm-robot``
    ``models/imagegeneration/sdxl-vae-fp16-fix/README.md``) shows ``images/orig-fp32.png``, ``orig-fp16.png``,
    ``fix-fp32.png``, ``fix-fp16.png``, ``activation-magnitudes.jpg`` and loads the diffusers files
    (``config.json``, ``diffusion_pytorch_model.safetensors``, fp32: 335 MB) with ``AutoencoderKL``; a
    downloader's file list (``Capsize-Games/airunner``, ``tiny_autoencoder.py``) names
    ``sdxl.vae.safetensors`` beside them, the single-file copy for other UIs. Its config says
    ``"force_upcast": false`` (fp16 is safe: the point of the fix). No fp16 variant files.
    """
    src = _tiny_source("kolors", dest) / "vae"
    dest = Path(dest)
    (dest / "images").mkdir(parents=True, exist_ok=True)
    config = json.loads((src / "config.json").read_text())
    config["force_upcast"] = False
    (dest / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    shutil.copyfile(src / "diffusion_pytorch_model.safetensors", dest / "diffusion_pytorch_model.safetensors")
    shutil.copyfile(src / "diffusion_pytorch_model.safetensors", dest / "sdxl.vae.safetensors")
    for i, name in enumerate(("orig-fp32.png", "orig-fp16.png", "fix-fp32.png", "fix-fp16.png")):
        (dest / "images" / name).write_bytes(_png((64, 64), (30 * i, 120, 200), seed=20 + i))
    (dest / "images" / "activation-magnitudes.jpg").write_bytes(_png((64, 32), (90, 90, 90), seed=30))
    _common_model_files(dest, "SDXL-VAE-FP16-Fix")
    assert sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file()) == sorted(VAE_FP16_FIX_LAYOUT)
    return dest


def _anime_pngs() -> list[tuple[str, bytes]]:
    """The :data:`ANIME_IMAGES` rows as PNG files (the parquet writer's pixels, shard by shard)."""
    out = []
    for rows, seed in ((ANIME_IMAGES[:3], 0), (ANIME_IMAGES[3:], 120)):
        out += [(name, _png(size, ((40 * i + seed) % 256, 90, 160), seed=i)) for i, (name, size, _) in enumerate(rows)]
    return out


def write_lowres_anime_native(dest: Path) -> Path:
    """The same rows in ModelScope's native dataset layout (a stand-in repo, not a real id).

    ``modelscope.msdatasets.meta.data_meta_manager.parse_dataset_structure`` reads ``<dataset name>.json``:
    subset → split → ``{"meta": <csv>, "file": <zip>}`` (the shape ``dataset_utils.get_target_dataset_structure``
    documents: ``{"default": {"train": {"meta": "my_train.csv", "file": "pictures.zip"}}}``); the csv's
    ``image:FILE`` cells name files inside the zip, which ``MsDataset`` downloads and extracts
    (``dataset_cls/dataset.py``: ``if k.endswith(':FILE'): ... dl_manager.download_and_extract(v)``), and a
    ``text`` column carries the caption. Here: ``lowres_anime_native.json``, ``train.csv`` and ``train.zip``
    (members ``train/<name>.png``), plus a ``test`` split the job must not fetch.
    """
    import csv
    import zipfile

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    structure = {"default": {"train": {"meta": "train.csv", "file": "train.zip"},
                             "test": {"meta": "test.csv", "file": "test.zip"}}}  # fmt: skip
    (dest / "lowres_anime_native.json").write_text(json.dumps(structure, indent=2))
    for split, rows in (("train", _anime_pngs()), ("test", [("miku_64", _png((64, 64), (200, 90, 160), seed=9))])):
        with zipfile.ZipFile(dest / f"{split}.zip", "w", zipfile.ZIP_STORED) as zf:
            for name, data in rows:
                zf.writestr(f"{split}/{name}.png", data)
        with open(dest / f"{split}.csv", "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["image:FILE", "text"])
            writer.writerows([f"{split}/{name}.png", anime_text(name)] for name, _ in rows)
    (dest / "README.md").write_text("# lowres anime (tiny test copy, ModelScope native layout)\n")
    (dest / ".gitattributes").write_text(GITATTRIBUTES)
    return dest


def write_lowres_anime_folder(dest: Path) -> Path:
    """The same rows as an image folder with a metadata file (a stand-in repo, not a real id): the
    ``imagefolder`` convention ``datasets`` documents (``train/metadata.csv`` with ``file_name`` and a caption
    column beside the images), the images packed in ``train/images.zip``."""
    import csv
    import zipfile

    dest = Path(dest)
    (dest / "train").mkdir(parents=True, exist_ok=True)
    rows = _anime_pngs()
    with zipfile.ZipFile(dest / "train" / "images.zip", "w", zipfile.ZIP_STORED) as zf:
        for name, data in rows:
            zf.writestr(f"{name}.png", data)
    with open(dest / "train" / "metadata.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["file_name", "text"])
        writer.writerows([f"{name}.png", anime_text(name)] for name, _ in rows)
    (dest / "README.md").write_text("# lowres anime (tiny test copy, image folder layout)\n")
    (dest / ".gitattributes").write_text(GITATTRIBUTES)
    return dest


def build_default_artifacts(root: Path) -> dict[str, Path]:
    """Every artifact the emulators serve by default, under ``root`` (skips those already complete)."""
    root = Path(root)
    writers = {
        "kolors": write_kolors_diffusers,
        "kolors_both": write_kolors_both_variants,
        "predictor": write_aesthetic_predictor,
        "predictor_custom": lambda d: write_aesthetic_predictor(d, custom_code=True),
        "anime": write_lowres_anime,
        "vae_fp16_fix": write_sdxl_vae_fp16_fix,
        "anime_native": write_lowres_anime_native,
        "anime_folder": write_lowres_anime_folder,
    }
    out: dict[str, Path] = {}
    for name, write in writers.items():
        path = root / name
        done = root / f"{name}.complete"
        if not done.is_file():
            tmp = root / f".{name}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            write(tmp)
            shutil.rmtree(path, ignore_errors=True)
            tmp.rename(path)
            done.touch()
        out[name] = path
    return out
