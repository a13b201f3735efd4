"""LoRA export: every file must reproduce the *trained* UNet output in the tool that reads it.

The ground truth is always the diffusers UNet with the peft LoRA as training left it (α ≠ r, B ≠ 0);
each export is loaded the way its consumer loads it and compared by output, not by key names alone.
DiffSynth hard-codes full Kolors sizes, so its checks use the full-size architecture: key sets on the
meta device, numbers on real 640-wide attention blocks (default run) or the whole UNet (slow).
"""

from __future__ import annotations

import ast
import copy
import json
import math
import os
import re
import types
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open

from kolors_job import export as ex
from kolors_job.models.configs import KOLORS_UNET_CONFIG
from kolors_job.models.tiny import TINY_UNET_CONFIG, build_tiny_kolors

TRAIN_RANK = 16
TRAIN_ALPHA = 4.0  # the reference training α (docs/design.md §7): scale 0.25
LOAD_ALPHA = 2.0  # the reference sampling α
DIFFUSERS_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
# Spot checks that do not come from the converter: docs/design.md §5 and DiffSynth's block list order.
KNOWN_BLOCKS = {"down_blocks.1.attentions.0": "blocks.7", "up_blocks.1.attentions.2": "blocks.41"}


def _slow_selected(config: pytest.Config) -> bool:
    """The full-size test runs only when asked for (``-m slow`` or KOLORS_TEST_SLOW=1), not on a bare ``pytest``."""
    expr = str(config.getoption("markexpr", "") or "")
    return os.environ.get("KOLORS_TEST_SLOW") == "1" or bool(
        re.search(r"\bslow\b", expr) and not re.search(r"\bnot\s+slow\b", expr)
    )


def _lora_config(rank: int, alpha: float, targets: list[str]) -> Any:
    from peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=targets)


def _diffusers_lora_state_dict(unet: torch.nn.Module, prefix: str = "unet.") -> dict[str, torch.Tensor]:
    """What the trainer saves: ``convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))`` (file: ``unet.``)."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    return {
        f"{prefix}{k}": v for k, v in convert_state_dict_to_diffusers(get_peft_model_state_dict(unet)).items()
    }


@torch.no_grad()
def _randomize(module: torch.nn.Module, gen: torch.Generator, *, lora_b_std: float = 0.5) -> None:
    """Init-like random weights (activations stay O(1) through deep stacks) and a clearly non-zero LoRA B."""
    for name, p in module.named_parameters():
        leaf = name.rsplit(".", 2)
        if ".lora_B." in name:
            p.normal_(0.0, lora_b_std / math.sqrt(p.shape[1]), generator=gen)
        elif p.ndim >= 2:  # uniform with std 1/sqrt(fan_in): twice as fast as normal_ over 2.6 B weights
            bound = math.sqrt(3.0 / p[0].numel())
            p.uniform_(-bound, bound, generator=gen)
        elif "norm" in name and leaf[-1] == "weight":
            p.normal_(1.0, 0.1, generator=gen)
        else:
            p.normal_(0.0, 0.02, generator=gen)


@torch.no_grad()
def _randomize_fast(module: torch.nn.Module, gen: torch.Generator) -> None:
    """Like ``_randomize`` at memory speed: each weight is a random window of one shared uniform pool.

    Drawing 2.6 B fresh random numbers costs ~40 s on 2 cores; windows at random offsets are just as
    good for an equivalence test (any weights work if activations stay O(1)) and cost a copy.
    """
    pool = torch.rand(1 << 25, generator=gen) * 2 - 1  # 32 M uniform(-1, 1): larger than any one weight
    for name, p in module.named_parameters():
        flat = p.view(-1)
        start = int(torch.randint(0, pool.numel() - flat.numel() + 1, (), generator=gen))
        window = pool[start : start + flat.numel()]
        is_norm_weight = p.ndim == 1 and "norm" in name and name.endswith("weight")
        scale = math.sqrt(3.0 / p[0].numel()) if p.ndim >= 2 else (0.1 if is_norm_weight else 0.02)
        torch.mul(window, scale, out=flat)
        if is_norm_weight:
            flat.add_(1.0)


def _enable_lora(module: torch.nn.Module, enabled: bool) -> None:
    from peft.tuners.tuners_utils import BaseTunerLayer

    for m in module.modules():
        if isinstance(m, BaseTunerLayer):
            m.enable_adapters(enabled)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


_FULL_MODEL_CALLS = ("ModelManager(", "SDXLImagePipeline.from_model_manager(")


def _card_diffsynth_code(card: str) -> tuple[str, str]:
    """The model card's two DiffSynth code blocks (peft injection, ``ModelManager.load_lora`` merge) as runnable
    source, without the statements that build a ``ModelManager`` or pipeline from the full model files."""
    section = card.split("### DiffSynth-Studio", 1)[1]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 2, blocks
    sources = []
    for block in blocks:
        tree = ast.parse(block)
        tree.body = [
            n for n in tree.body
            if not (isinstance(n, ast.Assign) and ast.unparse(n.value).startswith(_FULL_MODEL_CALLS))
        ]
        sources.append(ast.unparse(tree))
    return sources[0], sources[1]


# --------------------------------------------------------------------------------------------
# (a) DiffSynth keys on the meta device
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def meta_lora_sd() -> dict[str, torch.Tensor]:
    """The trainer's file for the full-size Kolors UNet with the reference r16 peft LoRA, as meta tensors."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**KOLORS_UNET_CONFIG)
        unet.add_adapter(_lora_config(TRAIN_RANK, TRAIN_ALPHA, DIFFUSERS_TARGETS))
    sd = _diffusers_lora_state_dict(unet)
    assert len(sd) == 1120 and next(iter(sd)).endswith(".lora.down.weight")  # what diffusers 0.39 writes
    return sd


@pytest.fixture(scope="module")
def meta_export(meta_lora_sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our DiffSynth state dict for it (shapes only; unvalidated, so the test below is the only judge)."""
    _, modules, scale = ex.resolve_info(ex.LoraInfo(alpha=TRAIN_ALPHA), meta_lora_sd)
    out, zero_filled = ex.diffsynth_state_dict(modules, scale, TRAIN_RANK, validate=False)
    assert zero_filled == []
    return out


def test_diffsynth_keys_are_exactly_the_reference_lora_parameters(
    meta_export: dict[str, torch.Tensor],
) -> None:
    from diffsynth.models.sdxl_unet import SDXLUNet
    from peft import inject_adapter_in_model

    with torch.device("meta"):
        ds = inject_adapter_in_model(
            _lora_config(TRAIN_RANK, LOAD_ALPHA, list(ex.DIFFSYNTH_TARGET_MODULES)), SDXLUNet(is_kolors=True)
        )
    reference = {k: tuple(v.shape) for k, v in ds.state_dict().items() if ".lora_" in k}
    ours = {k: tuple(v.shape) for k, v in meta_export.items()}
    assert len(reference) == 1120
    assert sorted(set(reference) - set(ours)) == []  # nothing missing
    assert sorted(set(ours) - set(reference)) == []  # nothing strict=False would drop
    assert ours == reference  # shapes
    missing, unexpected = ds.load_state_dict(meta_export, strict=False)
    assert unexpected == [] and [k for k in missing if ".lora_" in k] == []
    assert "blocks.7.transformer_blocks.0.attn1.to_q.lora_A.default.weight" in ours
    assert "blocks.7.transformer_blocks.0.attn1.to_out.lora_B.default.weight" in ours


def test_module_map_comes_from_diffsynths_converter_over_the_whole_base_unet() -> None:
    m = ex.diffsynth_module_map()
    assert len(m) > 1000  # every base weight, not only the LoRA targets
    for diffusers_block, ds_block in KNOWN_BLOCKS.items():
        assert m[f"{diffusers_block}.transformer_blocks.1.attn2.to_out.0"] == (
            f"{ds_block}.transformer_blocks.1.attn2.to_out"
        )
    assert (
        m["mid_block.attentions.0.transformer_blocks.9.attn1.to_q"]
        == "blocks.21.transformer_blocks.9.attn1.to_q"
    )
    assert m["encoder_hid_proj"] == "text_intermediate_proj"


def test_diffsynth_keys_read_back_to_the_diffusers_modules(
    meta_lora_sd: dict[str, torch.Tensor], meta_export: dict[str, torch.Tensor]
) -> None:
    """The seed baseline trains DiffSynth-named LoRAs: those import through the inverted converter table."""
    original, _ = ex.lora_modules(meta_lora_sd)
    back, _ = ex.lora_modules(meta_export)
    assert {m: (a.shape, b.shape) for m, (a, b) in back.items()} == {
        m: (a.shape, b.shape) for m, (a, b) in original.items()
    }
    with pytest.raises(ValueError, match="not a diffusers UNet module path"):
        ex.lora_modules(
            {
                "text_model.layers.0.q.lora_A.weight": torch.zeros(1, 2),
                "text_model.layers.0.q.lora_B.weight": torch.zeros(2, 1),
            }
        )


def test_diffsynth_export_zero_fills_untrained_modules_and_rejects_foreign_ones(
    meta_lora_sd: dict[str, torch.Tensor],
) -> None:
    """A LoRA on fewer modules loads completely (zeros = no-op); one on a module DiffSynth has no LoRA on fails."""
    partial = {k: v for k, v in meta_lora_sd.items() if ".to_q." in k or ".to_v." in k}
    _, modules, scale = ex.resolve_info(ex.LoraInfo(alpha=TRAIN_ALPHA), partial)
    out, zero_filled = ex.diffsynth_state_dict(modules, scale, TRAIN_RANK)
    assert set(out) == set(ex.diffsynth_lora_parameter_shapes(TRAIN_RANK))
    assert len(zero_filled) == 70 * 2 * 2  # 70 transformer blocks x 2 attentions x (to_k, to_out)
    assert all(z.endswith(("to_k", "to_out")) for z in zero_filled)

    foreign = dict(partial)
    proj_in = "unet.down_blocks.1.attentions.0.proj_in"
    foreign[f"{proj_in}.lora.down.weight"] = torch.empty(TRAIN_RANK, 640, device="meta")
    foreign[f"{proj_in}.lora.up.weight"] = torch.empty(640, TRAIN_RANK, device="meta")
    _, modules, scale = ex.resolve_info(ex.LoraInfo(alpha=TRAIN_ALPHA), foreign)
    with pytest.raises(ValueError, match="strict=False would silently drop"):
        ex.diffsynth_state_dict(modules, scale, TRAIN_RANK)


# --------------------------------------------------------------------------------------------
# (b) DiffSynth numbers: real full-size attention blocks (default), the whole UNet (slow)
# --------------------------------------------------------------------------------------------


def _diffsynth_reference_load(
    model: torch.nn.Module, lora: dict[str, torch.Tensor], rank: int
) -> torch.nn.Module:
    """The challenge notebook's ``load_lora``: inject with the *load* α, then ``load_state_dict(strict=False)``."""
    from peft import inject_adapter_in_model

    model = inject_adapter_in_model(_lora_config(rank, LOAD_ALPHA, list(ex.DIFFSYNTH_TARGET_MODULES)), model)
    missing, unexpected = model.load_state_dict(lora, strict=False)
    assert unexpected == []
    assert [k for k in missing if ".lora_" in k] == []
    return model


@pytest.mark.filterwarnings("ignore:for .*copying from a non-meta parameter:UserWarning")
def test_diffsynth_export_reproduces_trained_attention_blocks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two real 640-wide blocks (others stay on meta): diffusers+peft LoRA == DiffSynth + our file, loaded both
    ways by the model card's own lines (peft injection at α 2.0, ``ModelManager.load_lora`` at α 2/r)."""
    from diffsynth import ModelManager
    from diffsynth.models.sdxl_unet import SDXLUNet
    from diffusers import UNet2DConditionModel
    from peft import inject_adapter_in_model
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(0)
    with torch.device("meta"):
        unet = UNet2DConditionModel(**KOLORS_UNET_CONFIG)
        ds = SDXLUNet(is_kolors=True)
        ds_merge = SDXLUNet(is_kolors=True)
    for block in KNOWN_BLOCKS:
        unet.get_submodule(block).to_empty(device="cpu")
        _randomize(unet.get_submodule(block), gen)
    base = dict(unet.state_dict())
    converted = SDXLUNet.state_dict_converter().from_diffusers(base)[0]
    for model in (ds, ds_merge):
        for ds_block in KNOWN_BLOCKS.values():
            model.get_submodule(ds_block).to_empty(device="cpu")
        sub = {
            k: v for k, v in converted.items() if k.startswith(tuple(f"{b}." for b in KNOWN_BLOCKS.values()))
        }
        missing, unexpected = model.load_state_dict(sub, strict=False)
        assert unexpected == []
        assert not [k for k in missing if k.startswith(tuple(f"{b}." for b in KNOWN_BLOCKS.values()))]

    # The trained LoRA, injected into the two real blocks only (peft over the whole meta UNet costs seconds).
    sd: dict[str, torch.Tensor] = {}
    for block in KNOWN_BLOCKS:
        module = inject_adapter_in_model(
            _lora_config(TRAIN_RANK, TRAIN_ALPHA, DIFFUSERS_TARGETS), unet.get_submodule(block)
        )
        with torch.no_grad():
            for name, p in module.named_parameters():
                if ".lora_" in name:
                    std = (0.5 if ".lora_B." in name else 1.0) / math.sqrt(p.shape[1])
                    p.copy_(torch.randn(p.shape, generator=gen) * std)
        sd.update(_diffusers_lora_state_dict(module, prefix=f"unet.{block}."))
    assert len(sd) == 2 * 2 * 8 * 2  # 2 blocks x 2 layers x 8 LoRA modules x (A, B)

    paths = ex.export_all(sd, ex.LoraInfo(alpha=TRAIN_ALPHA, name="blocks"), tmp_path, ["diffsynth"])
    path = paths["diffsynth"]
    lora, meta = ex.load_lora_file(path)
    assert meta["kolors_job.diffsynth_load_alpha"] == "2.0"
    assert len(lora) == 1120  # complete for the reference loader; untrained modules are zeros
    # the .ckpt beside it: what the notebook's bare torch.load reads, the very same tensors
    pickled = torch.load(paths["diffsynth_ckpt"], weights_only=True)
    assert paths["diffsynth_ckpt"].name == "blocks_diffsynth.ckpt" and pickled.keys() == lora.keys()
    assert all(torch.equal(pickled[k], v) and pickled[k].dtype == v.dtype for k, v in lora.items())

    # The model card's own DiffSynth lines, run as printed (only the lines that load the full model are left
    # out): the notebook's peft injection, and ModelManager.load_lora's merge (GeneralLoRAFromPeft).
    inject, merge = _card_diffsynth_code(paths["card"].read_text(encoding="utf-8"))
    assert f"lora_alpha={LOAD_ALPHA}" in inject and f"lora_alpha={LOAD_ALPHA / TRAIN_RANK}" in merge
    monkeypatch.chdir(tmp_path)
    pipe = types.SimpleNamespace(unet=ds)
    exec(inject, {"pipe": pipe})
    ds = pipe.unet
    # The merge on a model whose other blocks are on meta: give it the two real blocks' keys under the
    # card's file name, and a real first tensor (GeneralLoRAFromPeft takes its device from it).
    merge_dir = tmp_path / "merge"
    merge_dir.mkdir()
    ours = tuple(f"{b}." for b in KNOWN_BLOCKS.values())
    save_file({k: v for k, v in lora.items() if k.startswith(ours)}, str(merge_dir / path.name))
    first = next(iter(ds_merge.state_dict()))
    ds_merge.get_submodule(first.rsplit(".", 1)[0]).to_empty(device="cpu")
    manager = ModelManager(torch_dtype=torch.float32, device="cpu")
    manager.model, manager.model_name, manager.model_path = [ds_merge], ["sdxl_unet"], ["two real blocks"]
    monkeypatch.chdir(merge_dir)
    exec(merge, {"model_manager": manager})

    x = torch.randn(2, 640, 8, 8, generator=gen)
    text = torch.randn(2, 7, 2048, generator=gen)
    with torch.no_grad():
        for block, ds_block in KNOWN_BLOCKS.items():
            dmod = unet.get_submodule(block)
            want = dmod(x, encoder_hidden_states=text).sample
            got = ds.get_submodule(ds_block)(x, None, text, [])[0]
            merged = ds_merge.get_submodule(ds_block)(x, None, text, [])[0]
            _enable_lora(dmod, False)
            base_out = dmod(x, encoder_hidden_states=text).sample
            _enable_lora(dmod, True)
            errors = {
                "inject": _rel(got, want),
                "merge": _rel(merged, want),
                "lora_effect": _rel(base_out, want),
            }
            assert errors["inject"] < 1e-4 and errors["merge"] < 1e-4, (block, errors)
            assert errors["lora_effect"] > 1e-2, (block, errors, "the LoRA must move the output")
            # the same modules in bf16, as a GPU run holds them: the bound there is 1e-2
            d16 = copy.deepcopy(dmod).to(torch.bfloat16)
            s16 = copy.deepcopy(ds.get_submodule(ds_block)).to(torch.bfloat16)
            want16 = d16(x.bfloat16(), encoder_hidden_states=text.bfloat16()).sample.float()
            got16 = s16(x.bfloat16(), None, text.bfloat16(), [])[0].float()
            assert _rel(got16, want16) < 1e-2, (block, _rel(got16, want16))
            assert _rel(got16, want) < 1e-2, (block, _rel(got16, want))


@pytest.mark.slow
@pytest.mark.usefixtures("all_torch_threads")
def test_diffsynth_export_reproduces_the_full_trained_unet(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Whole full-size UNets on CPU, fp32: 11 GB peak (DiffSynth shares the diffusers base tensors), ~3 min on 2 cores."""
    if not _slow_selected(request.config):
        pytest.skip("full-size CPU test: run with -m slow or KOLORS_TEST_SLOW=1")
    from diffsynth.models.sdxl_unet import SDXLUNet
    from diffusers import UNet2DConditionModel

    gen = torch.Generator().manual_seed(0)
    with torch.device("meta"):
        unet = UNet2DConditionModel(**KOLORS_UNET_CONFIG)
        ds = SDXLUNet(is_kolors=True)
    unet.to_empty(device="cpu")
    _randomize_fast(unet, gen)
    converted = SDXLUNet.state_dict_converter().from_diffusers(unet.state_dict())[0]
    ds.load_state_dict(converted, strict=True, assign=True)  # shares the diffusers tensors: no second copy
    unet.add_adapter(_lora_config(TRAIN_RANK, TRAIN_ALPHA, DIFFUSERS_TARGETS))
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if ".lora_B." in name:
                p.normal_(0.0, 0.5 / math.sqrt(p.shape[1]), generator=gen)
    path = ex.export_diffsynth(
        _diffusers_lora_state_dict(unet), ex.LoraInfo(alpha=TRAIN_ALPHA), tmp_path / "ds.safetensors"
    )
    ds = _diffsynth_reference_load(ds, ex.load_lora_file(path)[0], TRAIN_RANK)

    latents = torch.randn(1, 4, 16, 16, generator=gen)  # 128 px: every block, a quarter of the FLOPs of 32²
    text = torch.randn(1, 16, 4096, generator=gen)
    pooled = torch.randn(1, 4096, generator=gen)
    time_ids = torch.tensor([[128.0, 128.0, 0.0, 0.0, 128.0, 128.0]])
    t = torch.tensor([500])
    cond = {"text_embeds": pooled, "time_ids": time_ids}
    with torch.no_grad():
        want = unet(latents, t, encoder_hidden_states=text, added_cond_kwargs=cond).sample
        got = ds(latents, t, text, time_ids, pooled)
        unet.disable_adapters()
        base_out = unet(latents, t, encoder_hidden_states=text, added_cond_kwargs=cond).sample
    errors = {"inject": _rel(got, want), "lora_effect": _rel(base_out, want)}
    assert errors["inject"] < 1e-4 and errors["lora_effect"] > 1e-2, errors


# --------------------------------------------------------------------------------------------
# diffusers and kohya files on a tiny Kolors (c)
# --------------------------------------------------------------------------------------------

TINY_RANK, TINY_ALPHA = 4, 2.0  # scale 0.5: a file that ignored α would be twice too strong


@pytest.fixture(scope="module")
def tiny_kolors(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_kolors(tmp_path_factory.mktemp("tiny") / "kolors", seed=0)


@pytest.fixture(scope="module")
def trained(tiny_kolors: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A 'trained' tiny LoRA saved exactly like the trainer saves it, and the output it must reproduce."""
    from diffusers import KolorsPipeline

    pipe = KolorsPipeline.from_pretrained(tiny_kolors)
    unet = pipe.unet
    unet.add_adapter(_lora_config(TINY_RANK, TINY_ALPHA, DIFFUSERS_TARGETS))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if ".lora_B." in name:
                p.normal_(0.0, 1.0, generator=gen)
    lora_dir = tmp_path_factory.mktemp("trained")
    KolorsPipeline.save_lora_weights(lora_dir, unet_lora_layers=_diffusers_lora_state_dict(unet, prefix=""))
    inputs = _unet_inputs()
    with torch.no_grad():
        want = unet(**inputs).sample
        unet.disable_adapters()
        base = unet(**inputs).sample
    assert _rel(base, want) > 1e-2
    return {"dir": lora_dir, "want": want, "base": base}


def _unet_inputs() -> dict[str, Any]:
    gen = torch.Generator().manual_seed(2)
    hidden = TINY_UNET_CONFIG["encoder_hid_dim"]
    return {
        "sample": torch.randn(2, 4, 8, 8, generator=gen),
        "timestep": torch.tensor([10, 700]),
        "encoder_hidden_states": torch.randn(2, 5, hidden, generator=gen),
        "added_cond_kwargs": {
            "text_embeds": torch.randn(2, hidden, generator=gen),
            "time_ids": torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]] * 2),
        },
    }


def _load_and_run(tiny_kolors: Path, lora_file: Path) -> torch.Tensor:
    from diffusers import KolorsPipeline

    pipe = KolorsPipeline.from_pretrained(tiny_kolors)
    pipe.load_lora_weights(str(lora_file.parent), weight_name=lora_file.name)
    assert pipe.unet.peft_config, "no adapter was loaded"
    with torch.no_grad():
        return pipe.unet(**_unet_inputs()).sample


def test_trainer_file_has_the_keys_diffusers_writes(trained: dict[str, Any]) -> None:
    sd, _ = ex.load_lora_file(trained["dir"])
    assert "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora.down.weight" in sd
    assert "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_out.0.lora.up.weight" in sd


def test_diffusers_export_loads_with_the_trained_strength(
    trained: dict[str, Any], tiny_kolors: Path, tmp_path: Path
) -> None:
    path = ex.export_diffusers(ex.load_lora_file(trained["dir"])[0], ex.LoraInfo(alpha=TINY_ALPHA), tmp_path)
    assert path == tmp_path / "pytorch_lora_weights.safetensors"
    got = _load_and_run(tiny_kolors, path)
    assert _rel(got, trained["want"]) < 1e-5

    # Re-exporting our own (baked) export must not apply α/r a second time.
    again = ex.export_all(path, None, tmp_path / "again", ["diffusers"], write_card=False)["diffusers"]
    assert _rel(_load_and_run(tiny_kolors, again), trained["want"]) < 1e-5


def test_kohya_export_loads_through_diffusers_non_diffusers_path(
    trained: dict[str, Any], tiny_kolors: Path, tmp_path: Path
) -> None:
    path = ex.export_kohya(
        ex.load_lora_file(trained["dir"])[0], ex.LoraInfo(alpha=TINY_ALPHA), tmp_path / "k.safetensors"
    )
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
        alpha = f.get_tensor("lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_out_0.alpha")
        assert f.metadata()["ss_network_alpha"] == "2.0"
    assert all(k.startswith("lora_unet_") for k in keys)
    assert all(k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha")) for k in keys)
    assert "lora_unet_down_blocks_1_attentions_0_transformer_blocks_1_attn2_to_k.lora_up.weight" in keys
    assert alpha.item() == TINY_ALPHA
    got = _load_and_run(tiny_kolors, path)
    assert _rel(got, trained["want"]) < 1e-5

    # ComfyUI's model_lora_keys_unet maps "lora_unet_" + a diffusers weight key ("." -> "_", no ".weight"),
    # taking the diffusers keys from comfy.utils.unet_to_diffusers: every LoRA name must be one of those.
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        base = UNet2DConditionModel(**TINY_UNET_CONFIG).state_dict()
    comfy_names = {
        "lora_unet_" + k.removesuffix(".weight").replace(".", "_") for k in base if k.endswith(".weight")
    }
    assert {k.split(".")[0] for k in keys} <= comfy_names


def test_why_not_sgm_spelled_kohya_keys(tiny_kolors: Path) -> None:
    """kohya's own SDXL spelling (input_blocks_*) needs unet_config=..., which KolorsPipeline does not pass."""
    from diffusers import KolorsPipeline

    pipe = KolorsPipeline.from_pretrained(tiny_kolors)
    q = pipe.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1.to_q
    name = "lora_unet_input_blocks_3_1_transformer_blocks_0_attn1_to_q"  # = down_blocks.1.attentions.0 here
    sgm = {
        f"{name}.lora_down.weight": torch.zeros(TINY_RANK, q.in_features),
        f"{name}.lora_up.weight": torch.zeros(q.out_features, TINY_RANK),
        f"{name}.alpha": torch.tensor(TINY_ALPHA),
    }
    with pytest.raises(ValueError, match=r"down_blocks\.3\.1.*not found"):
        pipe.load_lora_weights(dict(sgm))
    state, _ = KolorsPipeline.lora_state_dict(dict(sgm), unet_config=pipe.unet.config)
    assert next(iter(state)).startswith("unet.down_blocks.1.attentions.0.")


def test_alpha_is_required_or_read_from_metadata(trained: dict[str, Any], tmp_path: Path) -> None:
    sd, meta = ex.load_lora_file(trained["dir"])
    with pytest.raises(ValueError, match="lora_alpha is unknown"):
        ex.export_all(trained["dir"], None, tmp_path, ["diffusers"])
    with pytest.raises(ValueError, match="rank"):
        ex.resolve_info(ex.LoraInfo(rank=8, alpha=1.0), sd)
    # diffusers' own lora_adapter_metadata (save_lora_weights(unet_lora_adapter_metadata=...)) carries α.
    meta = {"lora_adapter_metadata": json.dumps({"unet.r": TINY_RANK, "unet.lora_alpha": TINY_ALPHA})}
    info, _, scale = ex.resolve_info(None, sd, meta)
    assert (info.rank, info.alpha, scale) == (TINY_RANK, TINY_ALPHA, TINY_ALPHA / TINY_RANK)
    with pytest.raises(ValueError, match=r"trained with alpha 2\.0"):
        ex.resolve_info(ex.LoraInfo(alpha=8.0), sd, meta)  # the caller's α contradicts the file's


def test_export_all_on_the_tiny_model_skips_diffsynth_and_keeps_the_rest(
    trained: dict[str, Any], tiny_kolors: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The runner's tiny/demo path: DiffSynth cannot hold a tiny UNet, so that one format is skipped, loudly."""
    out = tmp_path / "lora"
    paths = ex.export_all(trained["dir"], ex.LoraInfo(alpha=TINY_ALPHA), out, list(ex.EXPORT_FORMATS))
    assert set(paths) == {"diffusers", "kohya", "card"}
    assert "DiffSynth export skipped" in caplog.text
    card = paths["card"].read_text(encoding="utf-8")
    assert "DiffSynth-Studio" not in card and "kolors-lora_comfyui.safetensors" in card
    assert _rel(_load_and_run(tiny_kolors, paths["kohya"]), trained["want"]) < 1e-5


def test_export_all_writes_every_format_and_a_model_card(
    meta_lora_sd: dict[str, torch.Tensor], tmp_path: Path
) -> None:
    # DiffSynth only has the full-size UNet, so this needs a full-size LoRA (zeros: only files are checked).
    sd = {k: torch.zeros(v.shape, dtype=torch.float16) for k, v in meta_lora_sd.items()}
    info = ex.LoraInfo(
        alpha=TRAIN_ALPHA, trigger="二次元", name="purple hair girl", steps=500, learning_rate=1e-4
    )
    paths = ex.export_all(
        sd,
        info,
        tmp_path / "lora",
        ["diffusers", "kohya", "diffsynth"],
        scores={"aesthetic_mean": 6.41, "threshold": 6.0},
        dataset_summary={"source": "AI-ModelScope/lowres_anime", "images": 123},
    )
    assert set(paths) == {"diffusers", "kohya", "diffsynth", "diffsynth_ckpt", "card"}
    assert paths["kohya"].name == "purple-hair-girl_comfyui.safetensors"
    assert paths["diffsynth_ckpt"].name == "purple-hair-girl_diffsynth.ckpt"
    assert all(p.is_file() for p in paths.values())
    card = paths["card"].read_text(encoding="utf-8")
    for needle in (
        "Kwai-Kolors/Kolors-diffusers",
        "二次元",
        "| rank (r) | 16 |",
        "lora_alpha (α) | 4",
        "6.41",
        "lowres_anime",
        "load_lora_weights",
        "ComfyUI",
        "lora_alpha=2",
        "purple-hair-girl_diffsynth.safetensors",
        'torch.load("purple-hair-girl_diffsynth.ckpt")',
        "load_state_dict(",
        'model_manager.load_lora("purple-hair-girl_diffsynth.safetensors", lora_alpha=0.125)',
    ):
        assert needle in card, needle
    with pytest.raises(ValueError, match="unknown LoRA export format"):
        ex.export_all(sd, info, tmp_path / "x", ["onnx"])


def test_model_card_escapes_user_text_where_markdown_or_python_would_break(tmp_path: Path) -> None:
    """The card is a jinja2 template without HTML autoescape: user text is escaped per context instead."""
    info = ex.LoraInfo(rank=4, alpha=2.0, trigger='say "hi" `now`', extra={"note": "a|b"})
    files = {"diffusers": tmp_path / ex.DIFFUSERS_WEIGHT_NAME}
    card = ex.write_model_card(tmp_path, info, {"mean|max": 6.5}, None, files=files).read_text(encoding="utf-8")
    assert "| note | a\\|b |" in card and "| mean\\|max | 6.5 |" in card  # one table row each
    assert 'captioned `` say "hi" `now` ``;' in card  # a code span that holds a backtick
    (code,) = re.findall(r"```python\n(.*?)```", card, flags=re.S)
    prompts = [n.value for n in ast.parse(code).body if isinstance(n, ast.Assign) and ast.unparse(n.targets[0]) == "prompt"]
    assert [ast.literal_eval(p) for p in prompts] == [info.trigger]  # a valid Python literal of the trigger
