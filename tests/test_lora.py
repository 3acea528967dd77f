"""LoRA and LyCORIS files merge into the weights exactly as the reference tools compute them.

References: diffusers' `load_lora_weights` + `fuse_lora(lora_scale=s)` for kohya / A1111 files (diffusers- and
LDM-named) and diffusers' own files, where diffusers handles the format correctly; `peft`'s `merge_and_unload`
for PEFT files; the `lycoris-lora` package's functional `diff_weight` for LoCon, LoHa, LoKr and its
`weight_decompose` for DoRA. Where diffusers 0.42 is wrong (reproduced below, one test each), ours is checked
against the formula. Every file here is random, written in the format's own key names.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from diffusers import StableDiffusionPipeline
from lycoris.functional import locon, loha, lokr
from lycoris.functional.general import weight_decompose
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
from safetensors.torch import save_file

import checkpoint_fixtures as fx
import sdxl_fixtures as sx
from diffusion_core.a1111 import version
from diffusion_core import DiffusionModel, GenerationConfig
from diffusion_core.adapters.lora import dora_delta, lora_delta
from diffusion_core.adapters.lora_names import model_targets
from diffusion_core.checkpoints.keymaps import unet_from_diffusers
from diffusion_core.checkpoints.text_keys import text_from_transformers
from diffusion_core.cli import lora_argument, main
from diffusion_core.generation import read_png_parameters
from test_pipeline import PROMPT, assert_same_pixels, seeded

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

TOL = dict(rtol=1e-5, atol=1e-6)  # weights: fp32 sums in another order
# kohya's diffusers-named SD 1.x modules: attention, feed-forward, 1x1 proj, 3x3 resnet convs (LoCon), shortcut,
# down / up sampler, time embedding; the text encoder's attention and MLP
SD1_UNET = ["down_blocks_0_attentions_1_transformer_blocks_0_attn1_to_q", "down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k",
            "down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_out_0", "up_blocks_1_attentions_2_transformer_blocks_0_ff_net_0_proj",
            "up_blocks_2_attentions_0_transformer_blocks_0_ff_net_2", "down_blocks_0_attentions_1_proj_in", "mid_block_attentions_0_proj_out",
            "mid_block_resnets_0_conv1", "up_blocks_2_resnets_0_conv_shortcut", "down_blocks_0_downsamplers_0_conv",
            "up_blocks_0_upsamplers_0_conv", "down_blocks_0_resnets_1_time_emb_proj", "up_blocks_0_resnets_2_conv2"]
TEXT = ["encoder_layers_{i}_self_attn_q_proj", "encoder_layers_{i}_self_attn_k_proj", "encoder_layers_{i}_self_attn_v_proj",
        "encoder_layers_{i}_self_attn_out_proj", "encoder_layers_{i}_mlp_fc1", "encoder_layers_{i}_mlp_fc2"]
# kohya's LDM-named SDXL modules (sgm's UNet)
SDXL_UNET = ["input_blocks_4_1_transformer_blocks_0_attn1_to_q", "input_blocks_4_1_transformer_blocks_0_attn2_to_v",
             "input_blocks_4_1_proj_in", "middle_block_1_transformer_blocks_0_ff_net_0_proj", "output_blocks_2_1_transformer_blocks_0_attn1_to_out_0",
             "input_blocks_1_0_in_layers_2", "middle_block_2_out_layers_3", "output_blocks_0_0_skip_connection",
             "input_blocks_3_0_op", "output_blocks_0_0_emb_layers_1"]


# ---- building random files ---------------------------------------------------------------------------------

def weight_of(model: DiffusionModel, name: str) -> torch.Tensor:
    """The weight (or row block) a LoRA module name points at, as our model holds it now."""
    target = model_targets(model.unet.config, model.text_encoder)[name]
    return target.view(target.parameter(model).detach())


def target_shape(model: DiffusionModel, name: str) -> tuple[int, ...]:
    return tuple(weight_of(model, name).shape)


def lora_pair(shape: tuple[int, ...], rank: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(down (r, in[, kh, kw]), up (out, r[, 1, 1])): a LoRA of the weight's shape, kohya's layout."""
    out, inp, *kernel = shape
    down = torch.randn(rank, inp, *kernel, generator=g) * 0.1
    return down, torch.randn(out, rank, *[1] * len(kernel), generator=g) * 0.1


def kohya_file(path: Path, model: DiffusionModel, names: list[str], alphas: list[float] | float = 2.0,
               rank: int = 4, seed: int = 0) -> Path:
    g = torch.Generator().manual_seed(seed)
    alphas = alphas if isinstance(alphas, list) else [alphas] * len(names)
    state = {}
    for name, alpha in zip(names, alphas):
        down, up = lora_pair(target_shape(model, name), rank, g)
        state.update({f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up, f"{name}.alpha": torch.tensor(alpha)})
    save_file(state, path)
    return path


def fused_by_diffusers(pipe, path: Path, scale: float):
    pipe.load_lora_weights(str(path))
    pipe.fuse_lora(lora_scale=scale)
    pipe.unload_lora_weights()  # keeps the fused weights, drops the adapters
    return pipe


def assert_unet_equal(ours: DiffusionModel, diffusers_unet) -> None:
    theirs = unet_from_diffusers(diffusers_unet.state_dict(), ours.unet.config)
    for key, value in ours.unet.state_dict().items():
        torch.testing.assert_close(value, theirs[key], **TOL, msg=key)


def assert_text_equal(ours_tower, transformers_model) -> None:
    theirs = text_from_transformers(transformers_model.state_dict(), ours_tower.config)
    for key, value in ours_tower.state_dict().items():
        torch.testing.assert_close(value, theirs[key], **TOL, msg=key)


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    """A tiny SD1 checkpoint as a diffusers folder; `fresh()` gives our model and diffusers' pipeline, unchanged."""
    root = tmp_path_factory.mktemp("sd1")
    folder = fx.save_diffusers_folder(fx.tiny_reference("sd1"), root / "folder")

    def fresh():
        pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        return DiffusionModel.from_pretrained(folder), pipe
    fresh.folder = folder
    return fresh


# ---- kohya / A1111 files against diffusers -----------------------------------------------------------------

def test_kohya_sd1_lora_equals_diffusers_fuse_lora(sd1, tmp_path):
    ours, pipe = sd1()
    names = [f"lora_unet_{n}" for n in SD1_UNET] + [f"lora_te_text_model_{n.format(i=i)}" for i in (0, 1) for n in TEXT]
    path = kohya_file(tmp_path / "style.safetensors", ours, names)
    report = ours.load_lora(path, scale=0.7)
    fused_by_diffusers(pipe, path, 0.7)
    assert_unet_equal(ours, pipe.unet)
    assert_text_equal(ours.text_encoder, pipe.text_encoder)
    assert report.format == {"lora": len(names)} and len(report.changed["unet"]) == len(SD1_UNET)
    assert len(report.changed["text_encoder"]) == 2 * len(TEXT)

    config = GenerationConfig(PROMPT, width=64, height=64, num_inference_steps=3, seed=3)
    theirs = pipe(PROMPT, width=64, height=64, num_inference_steps=3, generator=seeded(3)).images[0]
    assert_same_pixels(ours.generate(config, progress=False).image, theirs)


def test_kohya_sdxl_lora_with_ldm_names_equals_diffusers(tmp_path):
    ref = sx.tiny_sdxl("base")
    ours = DiffusionModel.from_pretrained(sx.save_sdxl_single_file(ref, tmp_path / "xl.safetensors"))
    pipe = sx.sdxl_pipeline(ref)
    names = ([f"lora_unet_{n}" for n in SDXL_UNET] + [f"lora_te1_text_model_{n.format(i=0)}" for n in TEXT]
             + [f"lora_te2_text_model_{n.format(i=1)}" for n in TEXT])
    path = kohya_file(tmp_path / "xl_lora.safetensors", ours, names, alphas=8.0, rank=8)
    report = ours.load_lora(path, scale=1.3)
    fused_by_diffusers(pipe, path, 1.3)
    assert_unet_equal(ours, pipe.unet)
    assert_text_equal(ours.text_encoder.clip_l, pipe.text_encoder)
    assert_text_equal(ours.text_encoder.clip_g, pipe.text_encoder_2)
    assert set(report.changed) == {"unet", "text_encoder.clip_l", "text_encoder.clip_g"}


def test_diffusers_lora_file_with_its_metadata_equals_diffusers(sd1, tmp_path):
    """A file diffusers itself saves (PEFT's lora_A / lora_B, α in the safetensors header)."""
    ours, pipe = sd1()
    config = LoraConfig(r=4, lora_alpha=12, target_modules=["to_q", "to_v", "proj_in", "conv1"], alpha_pattern={"conv1": 2})
    pipe.unet.add_adapter(config)
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        for name, p in pipe.unet.named_parameters():
            if "lora_B" in name:  # PEFT starts lora_B at zero; a trained file does not
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    StableDiffusionPipeline.save_lora_weights(tmp_path, unet_lora_layers=get_peft_model_state_dict(pipe.unet),
                                              unet_lora_adapter_metadata=config.to_dict())
    path = tmp_path / "pytorch_lora_weights.safetensors"
    ours.load_lora(path, scale=0.6)
    _, pipe = sd1()
    fused_by_diffusers(pipe, path, 0.6)
    assert_unet_equal(ours, pipe.unet)


def test_peft_file_equals_peft_merge(sd1, tmp_path):
    """A PEFT adapter of the text encoder (adapter_model.safetensors + adapter_config.json), with alpha_pattern
    and rank-stabilised scaling, against PEFT's own merge."""
    ours, pipe = sd1()
    config = LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "fc1"], alpha_pattern={"fc1": 4},
                        use_rslora=True)
    peft_model = get_peft_model(pipe.text_encoder, config)
    with torch.no_grad():
        g = torch.Generator().manual_seed(2)
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    peft_model.save_pretrained(tmp_path)
    ours.load_lora(tmp_path / "adapter_model.safetensors")
    assert_text_equal(ours.text_encoder, peft_model.merge_and_unload())


def test_peft_dora_file_equals_peft_merge(sd1, tmp_path):
    """PEFT's DoRA (`lora_magnitude_vector`, one magnitude per output row): W' = m·(W + (α/r)·B·A)/‖W + (α/r)·B·A‖,
    on q (a row block of our fused [q; k; v]), v and an MLP layer, against PEFT's own merge."""
    ours, pipe = sd1()
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "fc1"], use_dora=True)
    peft_model = get_peft_model(pipe.text_encoder, config)
    with torch.no_grad():
        g = torch.Generator().manual_seed(3)
        for name, p in peft_model.named_parameters():
            if "lora_B" in name or "lora_magnitude_vector" in name:  # trained: neither at its initial value
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    peft_model.save_pretrained(tmp_path)
    report = ours.load_lora(tmp_path / "adapter_model.safetensors")
    assert report.format == {"lora": 6} and not report.skipped
    assert_text_equal(ours.text_encoder, peft_model.merge_and_unload())


# ---- LyCORIS against the lycoris-lora package --------------------------------------------------------------

def lycoris_case(kind: str, shape: tuple[int, ...], g: torch.Generator):
    """(the file's tensors for one module, lycoris' ΔW for them): each LyCORIS layout we read."""
    out, inp, *k = shape
    r, alpha = 4, 3.0
    n = lambda *s: torch.randn(*s, generator=g) * 0.2  # noqa: E731
    if kind == "locon_tucker":  # LoCon on a 3x3 conv, Tucker core: down (r, in, 1, 1), mid (r, r, 3, 3), up (out, r, 1, 1)
        down, mid, up = n(r, inp, 1, 1), n(r, r, *k), n(out, r, 1, 1)
        return ({"lora_down.weight": down, "lora_mid.weight": mid, "lora_up.weight": up, "alpha": torch.tensor(alpha)},
                locon.diff_weight(down, up, mid, gamma=alpha / r, backend="torch"))
    if kind == "loha":
        w1a, w1b, w2a, w2b = n(out, r), n(r, inp, *k), n(out, r), n(r, inp, *k)
        return ({"hada_w1_a": w1a, "hada_w1_b": w1b, "hada_w2_a": w2a, "hada_w2_b": w2b, "alpha": torch.tensor(alpha)},
                loha.diff_weight(w1b, w1a, w2b, w2a, None, None, gamma=alpha / r, backend="torch"))
    if kind == "loha_tucker":
        t1, w1a, w1b, t2, w2a, w2b = n(r, r, *k), n(r, out), n(r, inp), n(r, r, *k), n(r, out), n(r, inp)
        return ({"hada_t1": t1, "hada_w1_a": w1a, "hada_w1_b": w1b, "hada_t2": t2, "hada_w2_a": w2a, "hada_w2_b": w2b,
                 "alpha": torch.tensor(alpha)},
                loha.diff_weight(w1b, w1a, w2b, w2a, t1, t2, gamma=alpha / r, backend="torch"))
    a, c = 4, 8  # out = a·b, in = c·d
    b, d = out // a, inp // c
    if kind == "lokr_factored":  # full w1, low-rank w2: the α/r rule applies
        w1, w2a, w2b = n(a, c), n(b, r), n(r, d, *k)
        return ({"lokr_w1": w1, "lokr_w2_a": w2a, "lokr_w2_b": w2b, "alpha": torch.tensor(alpha)},
                lokr.diff_weight(w1, None, None, None, w2a, w2b, None, gamma=alpha, backend="torch"))
    if kind == "lokr_full":  # both halves full: scale 1 whatever α says
        w1, w2 = n(a, c), n(b, d, *k)
        return ({"lokr_w1": w1, "lokr_w2": w2, "alpha": torch.tensor(alpha)},
                lokr.diff_weight(w1, None, None, w2, None, None, None, gamma=alpha, backend="torch"))
    if kind == "lokr_tucker":  # both halves factored, w2 with a Tucker core
        w1a, w1b, t2, w2a, w2b = n(a, r), n(r, c), n(r, r, *k), n(r, b), n(r, d)
        return ({"lokr_w1_a": w1a, "lokr_w1_b": w1b, "lokr_t2": t2, "lokr_w2_a": w2a, "lokr_w2_b": w2b,
                 "alpha": torch.tensor(alpha)},
                lokr.diff_weight(None, w1a, w1b, None, w2a, w2b, t2, gamma=alpha, backend="torch"))
    raise ValueError(kind)


LYCORIS = [("locon_tucker", "lora_unet_mid_block_resnets_0_conv1"), ("loha", "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k"),
           ("loha", "lora_unet_up_blocks_0_resnets_2_conv2"), ("loha_tucker", "lora_unet_down_blocks_0_resnets_1_conv2"),
           ("lokr_factored", "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"),
           ("lokr_factored", "lora_unet_mid_block_resnets_1_conv1"), ("lokr_full", "lora_te_text_model_encoder_layers_1_mlp_fc1"),
           ("lokr_tucker", "lora_unet_up_blocks_1_resnets_0_conv1")]


@pytest.mark.parametrize("kind, name", LYCORIS)
@pytest.mark.parametrize("scale", [1.0, 0.4])
def test_lycoris_formats_equal_the_lycoris_package(sd1, tmp_path, kind, name, scale):
    ours, _ = sd1()
    shape = target_shape(ours, name)
    tensors, delta = lycoris_case(kind, shape, torch.Generator().manual_seed(len(kind)))
    save_file({f"{name}.{s}": t for s, t in tensors.items()}, tmp_path / "lyco.safetensors")
    before = weight_of(ours, name).clone()
    report = ours.load_lora(tmp_path / "lyco.safetensors", scale=scale)
    family = kind.split("_")[0]
    assert report.format == {"lora" if family == "locon" else family: 1}
    torch.testing.assert_close(weight_of(ours, name), before + scale * delta.reshape(shape), **TOL)


@pytest.mark.parametrize("axis", ["output", "input"])
def test_dora_equals_lycoris_weight_decompose_and_the_strength_rule(sd1, tmp_path, axis):
    """DoRA at strength 1 is LyCORIS' W' = m·(W+ΔW)/‖W+ΔW‖; at strength s, A1111's and ComfyUI's W + s·(W' − W)."""
    name = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k"
    g = torch.Generator().manual_seed(5)
    model, _ = sd1()
    shape = target_shape(model, name)
    down, up = lora_pair(shape, 4, g)
    weight = weight_of(model, name).clone()
    delta = lora_delta(up, down, 2.0 / 4)
    norm_shape = (shape[0], 1) if axis == "output" else (1, shape[1])
    magnitude = (weight + delta).norm(dim=1 if axis == "output" else 0, keepdim=True) * (1 + torch.rand(norm_shape, generator=g))
    save_file({f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up, f"{name}.alpha": torch.tensor(2.0),
               f"{name}.dora_scale": magnitude}, tmp_path / "dora.safetensors")
    expected = weight_decompose(weight + delta, magnitude, 1.0, wd_on_out=axis == "output", backend="torch")
    for scale in (1.0, 0.3):
        model, _ = sd1()
        model.load_lora(tmp_path / "dora.safetensors", scale=scale)
        torch.testing.assert_close(weight_of(model, name), weight + scale * (expected - weight), **TOL)
    torch.testing.assert_close(dora_delta(weight, delta, magnitude), expected - weight, **TOL)


def test_full_diff_and_diffusers_older_names_follow_the_formula(sd1, tmp_path):
    """LyCORIS' full ΔW (`diff`), and diffusers' attention-processor names (`processor.to_q_lora.down.weight`),
    which mean the same as kohya's `to_q.lora_down.weight`."""
    ours, _ = sd1()
    g = torch.Generator().manual_seed(4)
    full, old = f"lora_unet_{SD1_UNET[7]}", f"lora_unet_{SD1_UNET[0]}"
    diff = torch.randn(target_shape(ours, full), generator=g) * 0.01
    down, up = lora_pair(target_shape(ours, old), 4, g)
    before = {n: weight_of(ours, n).clone() for n in (full, old)}
    module = "unet.down_blocks.0.attentions.1.transformer_blocks.0.attn1"
    save_file({f"{full}.diff": diff, f"{module}.processor.to_q_lora.down.weight": down,
               f"{module}.processor.to_q_lora.up.weight": up}, tmp_path / "mixed.safetensors")
    assert ours.load_lora(tmp_path / "mixed.safetensors", scale=0.5).format == {"full": 1, "lora": 1}
    torch.testing.assert_close(weight_of(ours, full), before[full] + 0.5 * diff, **TOL)
    torch.testing.assert_close(weight_of(ours, old), before[old] + 0.5 * up @ down, **TOL)


# ---- what diffusers 0.42 gets wrong: ours follows the formula --------------------------------------------

def formula(weight: torch.Tensor, path: Path, name: str, scale: float = 1.0) -> torch.Tensor:
    """W + s·(α/r)·up·down for one module of a kohya file, from the file's own tensors."""
    from safetensors.torch import load_file
    t = load_file(path)
    up, down = t[f"{name}.lora_up.weight"], t[f"{name}.lora_down.weight"]
    return weight + scale * lora_delta(up, down, t[f"{name}.alpha"].item() / down.shape[0]).reshape(weight.shape)


def test_regression_per_module_alphas_in_unet_attention(sd1, tmp_path):
    """diffusers' `_get_alpha_name` splits on ".lora." but attention keys become "to_q_lora.down": every attention
    module then falls back to the file's most common α."""
    ours, pipe = sd1()
    names = [f"lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_{p}" for p in "qkv"]
    path = kohya_file(tmp_path / "alphas.safetensors", ours, names, alphas=[1.0, 1.0, 8.0])
    before = weight_of(ours, names[2]).clone()
    ours.load_lora(path)
    torch.testing.assert_close(weight_of(ours, names[2]), formula(before, path, names[2]), **TOL)
    fused_by_diffusers(pipe, path, 1.0)
    theirs = pipe.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1.to_v.weight
    assert (theirs - weight_of(ours, names[2])).abs().max() > 0.1, "diffusers fixed this: compare against it instead"


def test_regression_text_encoder_alphas_other_than_the_most_common(sd1, tmp_path):
    ours, pipe = sd1()
    names = [f"lora_te_text_model_encoder_layers_0_self_attn_{p}_proj" for p in ("q", "k", "v", "out")]
    path = kohya_file(tmp_path / "te_alphas.safetensors", ours, names, alphas=[1.0, 1.0, 1.0, 8.0])
    before = weight_of(ours, names[3]).clone()
    ours.load_lora(path)
    torch.testing.assert_close(weight_of(ours, names[3]), formula(before, path, names[3]), **TOL)
    fused_by_diffusers(pipe, path, 1.0)
    theirs = pipe.text_encoder.encoder.layers[0].self_attn.out_proj.weight
    assert (theirs - weight_of(ours, names[3])).abs().max() > 0.1, "diffusers fixed this: compare against it instead"


def test_regression_text_encoder_qkv_without_out_proj(sd1, tmp_path):
    """A file training only q/k/v of the text encoder: diffusers refuses it ("Could not automatically infer state
    dict type"); it is a plain LoRA, and each of q, k, v lands in its row block of open_clip's fused in_proj."""
    ours, pipe = sd1()
    names = [f"lora_te_text_model_encoder_layers_1_self_attn_{p}_proj" for p in "qkv"]
    path = kohya_file(tmp_path / "qkv.safetensors", ours, names)
    before = [weight_of(ours, n).clone() for n in names]
    report = ours.load_lora(path, scale=0.5)
    for name, weight in zip(names, before):
        torch.testing.assert_close(weight_of(ours, name), formula(weight, path, name, 0.5), **TOL)
    assert report.changed["text_encoder"] == [f"transformer.resblocks.1.attn.in_proj_weight[{p}]" for p in "qkv"]
    with pytest.raises(ValueError, match="Could not automatically infer"):
        pipe.load_lora_weights(str(path))


def test_regression_a_zero_scale_erases_no_other_scale(sd1, tmp_path):
    """diffusers: one call with cross_attention_kwargs={"scale": 0} resets every adapter's weight from
    `set_adapters` to 1. Here a scale belongs to its file: a file at scale 0 changes nothing, the others keep theirs."""
    ours, pipe = sd1()
    name = SD1_UNET[0]
    a = kohya_file(tmp_path / "a.safetensors", ours, [f"lora_unet_{name}"], seed=1)
    b = kohya_file(tmp_path / "b.safetensors", ours, [f"lora_unet_{name}"], seed=2)
    before = weight_of(ours, f"lora_unet_{name}").clone()
    ours.load_lora(a, scale=0.5)
    ours.load_lora(b, scale=0.8)
    ours.load_lora(a, scale=0.0, name="a_off")
    expected = formula(formula(before, a, f"lora_unet_{name}", 0.5), b, f"lora_unet_{name}", 0.8)
    torch.testing.assert_close(weight_of(ours, f"lora_unet_{name}"), expected, **TOL)

    pipe.load_lora_weights(str(a), adapter_name="a")
    pipe.load_lora_weights(str(b), adapter_name="b")
    pipe.set_adapters(["a", "b"], [0.5, 0.8])
    sample = dict(sample=torch.randn(1, 4, 8, 8, generator=seeded(0)), timestep=10,
                  encoder_hidden_states=torch.randn(1, 77, fx.TEXT_WIDTH, generator=seeded(1)))
    with torch.no_grad():
        weighted = pipe.unet(**sample).sample
        pipe.unet(**sample, cross_attention_kwargs={"scale": 0.0})
        after_zero = pipe.unet(**sample).sample
    assert (weighted - after_zero).abs().max() > 1e-4, "diffusers fixed this"


# ---- stacking, unloading, refusing -----------------------------------------------------------------------

def test_stacked_loras_sum_and_unload_restores_bit_for_bit(sd1, tmp_path):
    ours, _ = sd1()
    names = [f"lora_unet_{n}" for n in SD1_UNET[:4]] + [f"lora_te_text_model_{TEXT[0].format(i=0)}"]
    a = kohya_file(tmp_path / "a.safetensors", ours, names, seed=1)
    b = kohya_file(tmp_path / "b.safetensors", ours, names[1:3], seed=2)
    original = {k: v.clone() for k, v in ours.unet.state_dict().items()}
    original_text = {k: v.clone() for k, v in ours.text_encoder.state_dict().items()}
    ours.load_lora(a, scale=0.6)
    ours.load_lora(b, scale=-1.2)
    expected = formula(formula(original_weight(ours, original, names[1]), a, names[1], 0.6), b, names[1], -1.2)
    torch.testing.assert_close(weight_of(ours, names[1]), expected, **TOL)
    ours.unload_lora("b")
    torch.testing.assert_close(weight_of(ours, names[1]),
                               formula(original_weight(ours, original, names[1]), a, names[1], 0.6), **TOL)
    ours.unload_lora()
    assert all(torch.equal(v, original[k]) for k, v in ours.unet.state_dict().items())
    assert all(torch.equal(v, original_text[k]) for k, v in ours.text_encoder.state_dict().items())
    assert ours.loras.reports == []


def original_weight(model: DiffusionModel, unet_state: dict, name: str) -> torch.Tensor:
    return unet_state[model_targets(model.unet.config, model.text_encoder)[name].key]


def test_fp16_model_merges_in_fp32_and_restores_bit_for_bit(sd1, tmp_path):
    ours, _ = sd1()
    ours.to(dtype=torch.float16)
    name = f"lora_unet_{SD1_UNET[1]}"
    path = kohya_file(tmp_path / "a.safetensors", ours, [name])
    before = weight_of(ours, name).clone()
    ours.load_lora(path, scale=0.9)
    assert torch.equal(weight_of(ours, name), formula(before.float(), path, name, 0.9).half())
    ours.unload_lora()
    assert torch.equal(weight_of(ours, name), before)


def test_a_key_matching_nothing_refuses_the_file_and_changes_nothing(sd1, tmp_path):
    ours, _ = sd1()
    good = f"lora_unet_{SD1_UNET[0]}"
    path = kohya_file(tmp_path / "a.safetensors", ours, [good])
    from safetensors.torch import load_file
    state = load_file(path)
    state["lora_unet_down_blocks_7_attentions_0_proj_in.lora_down.weight"] = torch.zeros(4, 32)
    state["lora_unet_down_blocks_7_attentions_0_proj_in.lora_up.weight"] = torch.zeros(32, 4)
    state[f"{good}.bias"] = torch.zeros(4)
    save_file(state, tmp_path / "bad.safetensors")
    before = {k: v.clone() for k, v in ours.unet.state_dict().items()}
    with pytest.raises(ValueError, match=r"3 keys match no weight.*down_blocks_7.*strict=False"):
        ours.load_lora(tmp_path / "bad.safetensors")
    assert all(torch.equal(v, before[k]) for k, v in ours.unet.state_dict().items())
    assert ours.loras.reports == []
    with pytest.warns(UserWarning, match=r"3 keys were not applied.*down_blocks_7"):
        report = ours.load_lora(tmp_path / "bad.safetensors", strict=False)
    assert len(report.skipped) == 3 and report.changed == {"unet": [model_targets(
        ours.unet.config, ours.text_encoder)[good].key]}


def test_a_lora_for_another_family_is_refused_naming_the_shapes(sd1, tmp_path):
    ours, _ = sd1()
    name = f"lora_unet_{SD1_UNET[1]}"  # attn2.to_k reads the text context: 128 wide here
    save_file({f"{name}.lora_down.weight": torch.zeros(4, 1024), f"{name}.lora_up.weight": torch.zeros(64, 4)},
              tmp_path / "sd2_lora.safetensors")
    with pytest.raises(ValueError, match=r"shape \(64, 1024\).*\(64, 128\).*another model"):
        ours.load_lora(tmp_path / "sd2_lora.safetensors")


@pytest.mark.parametrize("call, message", [
    (lambda m, p: m.load_lora(p, scale=float("nan")), "finite number"),
    (lambda m, p: m.load_lora(p.with_name("missing.safetensors")), "does not exist"),
    (lambda m, p: (m.load_lora(p), m.load_lora(p)), "already loaded"),
    (lambda m, p: m.unload_lora("nothing"), "no LoRA named 'nothing'"),
])
def test_bad_requests_are_clear_errors(sd1, tmp_path, call, message):
    ours, _ = sd1()
    path = kohya_file(tmp_path / "a.safetensors", ours, [f"lora_unet_{SD1_UNET[0]}"])
    with pytest.raises(ValueError, match=message):
        call(ours, path)


# ---- the command line and the PNG ------------------------------------------------------------------------

def test_cli_lora_is_recorded_in_the_png_and_redone_from_it(sd1, tmp_path, capsys):
    ours, _ = sd1()
    path = kohya_file(tmp_path / "toy_style.safetensors", ours, [f"lora_unet_{n}" for n in SD1_UNET[:5]])
    sha256 = hashlib.sha256(path.read_bytes()).hexdigest()
    checkpoint = ["--checkpoint", str(sd1.folder)]
    out = tmp_path / "out"
    common = ["--steps", "3", "--width", "64", "--height", "64", "--out", str(out)]
    assert main(["generate", PROMPT, *checkpoint, "--lora", f"{path}:0.7", *common]) == 0
    assert "LoRA 'toy_style' at scale 0.7 (5 lora): changed 5 weights of unet" in capsys.readouterr().err
    [png] = out.glob("*.png")
    assert read_png_parameters(png)["loras"] == [{"name": "toy_style", "file": path.name, "sha256": sha256, "scale": 0.7}]
    infotext = Image.open(png).text["parameters"]
    assert infotext.startswith(f"{PROMPT} <lora:toy_style:0.7>\n")
    assert infotext.endswith(f', Lora hashes: "toy_style: {sha256[:12]}", Version: {version()}')  # A1111's order

    ours.load_lora(path, 0.7)
    direct = ours.generate(GenerationConfig.from_png(png), progress=False)
    assert (np.asarray(direct.image) == np.asarray(Image.open(png))).all()
    assert main(["generate", "--from", str(png), *checkpoint, "--lora", f"{path}:0.7", "--quiet", "--out", str(out)]) == 0
    redone = out / capsys.readouterr().out.split()[0]
    assert (np.asarray(Image.open(redone)) == np.asarray(Image.open(png))).all()
    with pytest.raises(SystemExit) as error:
        main(["generate", "--from", str(png), *checkpoint, "--lora", f"{path}:0.5", "--out", str(out)])
    assert error.value.code == 2
    assert f"made with LoRA toy_style.safetensors (sha256 {sha256[:12]}) at scale 0.7: pass --lora" in capsys.readouterr().err


def test_lora_argument_takes_the_scale_after_the_last_colon():
    assert lora_argument("a.safetensors") == (Path("a.safetensors"), 1.0)
    assert lora_argument("dir/a.safetensors:-0.5") == (Path("dir/a.safetensors"), -0.5)
    assert lora_argument("C:\\loras\\a.safetensors") == (Path("C:\\loras\\a.safetensors"), 1.0)
