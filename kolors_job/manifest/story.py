"""``spec.story``: the frames (the challenge notebook's eight by default) and how they are drawn."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from kolors_job.manifest.fields import MAX_PROMPT_CHARS, FreeText, Strict, registered_name
from kolors_job.models.schedulers import SCHEDULERS

__all__ = ["REFERENCE_NEGATIVE", "Frame", "SamplingPrecision", "StorySpec"]


REFERENCE_NEGATIVE = "丑陋、变形、嘈杂、模糊、低对比度"


class Frame(Strict):
    prompt: FreeText = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    """What the frame shows (Chinese or English; ChatGLM reads up to 256 tokens)."""
    seed: int = Field(0, ge=0, le=2**32 - 1)
    """Seed of this frame's starting noise (each frame has its own generator)."""
    negative_prompt: FreeText | None = Field(None, max_length=MAX_PROMPT_CHARS)
    """Replaces the story's negative prompt for this frame."""
    negative_prompt_extra: FreeText | None = Field(None, max_length=MAX_PROMPT_CHARS)
    """Appended to the story's negative prompt with "，" (the reference does this on frames 3 and 4)."""


def _reference_frames() -> list[Frame]:
    """The challenge notebook's eight frames, in its order (sources: tests/reference/reference.yaml)."""
    rows = [
        ("二次元，一个紫色短发小女孩，在家中沙发上坐着，双手托着腮，很无聊，全身，粉色连衣裙", 0, None),
        (
            "二次元，日系动漫，演唱会的观众席，人山人海，一个紫色短发小女孩穿着粉色吊带漏肩连衣裙坐在演唱会的观众席，"
            "舞台上衣着华丽的歌星们在唱歌",
            1,
            None,
        ),
        ("二次元，一个紫色短发小女孩穿着粉色吊带漏肩连衣裙坐在演唱会的观众席，露出憧憬的神情", 2, "色情擦边"),
        (
            "二次元，一个紫色短发小女孩穿着粉色吊带漏肩连衣裙，对着流星许愿，闭着眼睛，十指交叉，侧面",
            5,
            "扭曲的手指，多余的手指",
        ),
        ("二次元，一个紫色中等长度头发小女孩穿着粉色吊带漏肩连衣裙，在练习室练习唱歌", 0, None),
        ("二次元，一个紫色长发小女孩穿着粉色吊带漏肩连衣裙，在练习室练习唱歌，手持话筒", 1, None),
        ("二次元，紫色长发少女，穿着黑色连衣裙，试衣间，心情忐忑", 7, None),
        ("二次元，紫色长发少女，穿着黑色礼服，连衣裙，在台上唱歌", 0, None),
    ]
    return [Frame(prompt=p, seed=s, negative_prompt_extra=x) for p, s, x in rows]


Scheduler = registered_name(lambda: SCHEDULERS)  # one list: the sampler table's names


SamplingPrecision = Literal["auto", "fp16", "bf16", "fp32"]


class StorySpec(Strict):
    negative_prompt: FreeText = Field(REFERENCE_NEGATIVE, max_length=MAX_PROMPT_CHARS)
    """What every frame should not show (each frame may replace or extend it)."""
    cfg_scale: float = Field(4.0, ge=0.0, le=50.0)
    """Classifier-free guidance scale (the reference: 4)."""
    steps: int = Field(50, ge=1, le=1000)
    """Denoising steps per frame (the reference: 50)."""
    width: int = Field(1024, ge=64, le=4096, multiple_of=8)
    """Frame width in pixels (a multiple of 8)."""
    height: int = Field(1024, ge=64, le=4096, multiple_of=8)
    """Frame height in pixels (a multiple of 8)."""
    scheduler: Scheduler = "reference"
    """``reference``: DiffSynth's Kolors DDIM grid (1099, 1077, ..., 22, 0, then fully clean), as the
    reference draws; ``euler`` is Kolors-diffusers' own sampler (leading grid 1079 ... 1). See ``models.SCHEDULERS``."""
    precision: SamplingPrecision = "auto"
    """``auto``: fp16 on CUDA like the reference (the VAE decodes in fp32 unless it is an fp16-fix VAE), fp32 on
    CPU. The LoRA is fused into the weights only in fp16/fp32; in bf16 it stays a separate branch, since bf16's
    8-bit mantissa rounds small weight updates away."""
    lora_scale: float = Field(0.5, ge=0.0, le=4.0)
    """0.5 reproduces the reference, which trains with α 4 but loads with α 2 (halving the LoRA)."""
    frames: list[Frame] = Field(default_factory=_reference_frames, min_length=8, max_length=64)
    """The story: at least 8 frames (the challenge asks for 8), each a prompt + seed."""
    best_of: int = Field(1, ge=1, le=16)
    """Candidates per frame; the highest aesthetic score is kept, the rest go to images/candidates/."""
    batch_size: int = Field(8, ge=1, le=64)
    """Frames per pipeline call. Each frame keeps its own seeded generator, so a frame's noise never depends on
    the batch; its pixels may still differ by a colour level when drawn in another batch size (float sums in
    another order), which is why ``kolors-job sample`` redraws a story in the story's batch."""
    compile: bool = False
    """``torch.compile`` the UNet while drawing (CUDA only); the compile cache lives on the cache volume."""
    tiling: Literal["notebook", "lanczos"] = "notebook"
    """How ``story.jpg`` is made from the frames (4 rows of 2, resized to 1024×2048 either way): ``notebook``
    as the reference does it (each frame saved as ``N.jpg`` at PIL's default quality and read back, tiled
    with numpy, resized with PIL's default filter); ``lanczos`` (``tuned``) tiles the lossless frames and
    resizes with Lanczos."""

    def negative_for(self, frame: Frame) -> str:
        base = frame.negative_prompt if frame.negative_prompt is not None else self.negative_prompt
        return f"{base}，{frame.negative_prompt_extra}" if frame.negative_prompt_extra else base
