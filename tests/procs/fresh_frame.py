"""Frame 1 drawn by plain diffusers in a process of its own (tests/test_generate.py): ``python -m
tests.procs.fresh_frame ARGS_JSON`` saves the image as a .npy file. Nothing of kolors_job is imported here."""

import json
import sys

import numpy as np
import torch
from diffusers import KolorsPipeline

a = json.loads(sys.argv[1])
torch.set_num_threads(1)
pipe = KolorsPipeline.from_pretrained(a["model"])
pipe.load_lora_weights(a["lora"])
image = pipe(a["prompt"], negative_prompt=a["negative"], timesteps=a["timesteps"],
             guidance_scale=a["cfg"], width=a["size"], height=a["size"],
             generator=torch.Generator("cpu").manual_seed(a["seed"]),
             cross_attention_kwargs={"scale": a["scale"]}).images[0]  # fmt: skip
np.save(a["out"], np.asarray(image))
