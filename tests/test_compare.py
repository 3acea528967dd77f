"""`compare` finds every module equal on correct checkpoints, and names the module of each deliberate fault.

The checkpoints are the tiny random ones of the other tests (checkpoint_fixtures, sdxl_fixtures), loaded by our
loader and by diffusers' own `from_pretrained` / `from_single_file`; the full-size networks are SD1.5's UNet and
SD2.1's ViT-H text tower with random weights. Each fault is made in our model only, and must be reported at the
module where it was made, or (for code between modules) at the first module it feeds, with its input parted.
"""
from __future__ import annotations

import sys
from dataclasses import replace

import pytest
import torch
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

import checkpoint_fixtures as fx
import reference
import sdxl_fixtures as sx
from diffusion_core import compare as C
from diffusion_core.checkpoints.keymaps import unet_from_diffusers, vae_from_diffusers
from diffusion_core.checkpoints.loader import load_components
from diffusion_core.checkpoints.text_keys import text_from_transformers
from diffusion_core.cli import main
from diffusion_core.models import unet as unet_module
from diffusion_core.models.text_encoder import SD2_TEXT, TextEncoder, TextEncoderConfig
from diffusion_core.models.unet import SD15_UNET, UNetConfig, UNetModel
from diffusion_core.models.vae import VAE, VAEConfig
from parity import perturb_

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py
SIZE = 64  # pixels: 8x8 latents


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """(family, layout) -> a tiny random checkpoint on disk, written once."""
    folder = tmp_path_factory.mktemp("compare")
    ref = {"sd1": fx.tiny_reference("sd1"), "sd2": fx.tiny_reference("sd2"), "sdxl": sx.tiny_sdxl("base"),
           "sdxl_refiner": sx.tiny_sdxl("refiner")}
    paths = {("sd1", "single"): fx.save_single_file_from_reference(ref["sd1"], folder / "sd1.safetensors"),
             ("sd2", "folder"): fx.save_diffusers_folder(ref["sd2"], folder / "sd2"),
             ("sdxl", "single"): sx.save_sdxl_single_file(ref["sdxl"], folder / "sdxl.safetensors"),
             ("sdxl_refiner", "folder"): sx.save_sdxl_folder(ref["sdxl_refiner"], folder / "refiner")}
    return paths


def tiny_unet(config: dict = reference.TINY_SD1_UNET) -> tuple[UNetModel, nn.Module]:
    ref = reference.build_unet(config)
    our_config = UNetConfig.from_diffusers(config)
    ours = UNetModel(our_config).eval()
    ours.load_state_dict(unet_from_diffusers(ref.state_dict(), our_config))
    return ours, ref


def unet_inputs(ref: nn.Module, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    sample = torch.randn(1, ref.config.in_channels, 8, 8, generator=gen, dtype=torch.float64)
    context = torch.randn(1, 77, ref.config.cross_attention_dim, generator=gen, dtype=torch.float64)
    return sample.to(dtype), context.to(dtype)


def text_pair(config: TextEncoderConfig, blocks_held: int, projection: bool = False):
    """A perturbed transformers tower (blocks_held of them, as a diffusers folder stores) and ours from its weights."""
    torch.manual_seed(0)
    model_class = CLIPTextModelWithProjection if projection else CLIPTextModel
    ref = model_class(CLIPTextConfig(
        vocab_size=49408, hidden_size=config.width, intermediate_size=4 * config.width, num_hidden_layers=blocks_held,
        num_attention_heads=config.heads, hidden_act=config.activation, projection_dim=config.projection_dim or 512,
        bos_token_id=49406, eos_token_id=49407)).eval()
    perturb_(ref)
    state = ref.state_dict()
    ours = TextEncoder(config).eval()
    ours.load_state_dict(text_from_transformers(state, config))
    return ours, ref


def parameter_modules(model: nn.Module) -> set[str]:
    """Every module holding parameters of its own, except the root (its positions and projection are compared
    through the outputs) and nn.MultiheadAttention's out_proj, whose weights it applies without calling it."""
    return {name for name, m in model.named_modules()
            if name and any(True for _ in m.parameters(recurse=False)) and not name.endswith("attn.out_proj")}


# ---- correct checkpoints: every module within the tolerance -------------------------------------------------

@pytest.mark.parametrize("key", [("sd1", "single"), ("sd2", "folder"), ("sdxl", "single"), ("sdxl_refiner", "folder")],
                         ids=lambda k: "-".join(k))
def test_every_module_of_a_tiny_checkpoint_agrees(checkpoints, key):
    results = C.compare_checkpoint(checkpoints[key], size=SIZE)
    towers = {"sd1": ["text_encoder"], "sd2": ["text_encoder"], "sdxl": ["text_encoder", "text_encoder_2"],
              "sdxl_refiner": ["text_encoder_2"]}[key[0]]
    assert list(results) == [*towers, "vae", "unet"]
    for name, comparison in results.items():
        assert comparison.passed, f"{name}:\n{comparison.table()}"
        assert comparison.tolerance == 1e-4
        assert all(r.max_rel <= 1e-4 for r in comparison.rows)
        assert not comparison.only_ours
    ours = load_components(checkpoints[key])
    assert parameter_modules(ours.unet) <= {r.ours for r in results["unet"].rows}
    assert parameter_modules(ours.vae) <= {r.ours for r in results["vae"].rows}


def test_vae_attention_rows_are_compared_in_the_reference_layout():
    """diffusers' VAE attention works on (B, H·W, C) tokens, ours on (B, C, H, W) maps: both are compared."""
    ref = reference.build_vae(reference.TINY_VAE)
    config = VAEConfig.from_diffusers(reference.TINY_VAE)
    ours = VAE(config).eval()
    ours.load_state_dict(vae_from_diffusers(ref.state_dict(), config))
    gen = torch.Generator().manual_seed(2)
    image, latent = torch.rand(1, 3, 32, 32, generator=gen) * 2 - 1, torch.randn(1, 4, 4, 4, generator=gen)
    comparison = C.compare_vae(ours, ref, image, latent)
    assert comparison.passed, comparison.table()
    rows = {r.ours: r for r in comparison.rows}
    for part in ("encoder", "decoder"):
        for module in ("norm", "q", "k", "v", "proj_out"):
            assert f"{part}.mid.attn_1.{module}" in rows
    assert rows["decoder.mid.attn_1.q"].reference == "decoder.mid_block.attentions.0.to_q"
    assert parameter_modules(ours) <= set(rows)


@pytest.mark.slow
def test_full_size_sd15_unet_agrees_in_every_module():
    ref = reference.build_unet(reference.SD15_UNET)
    with torch.device("meta"):  # share the reference's tensors: one 3.4 GB copy, not two
        ours = UNetModel(SD15_UNET).eval()
    ours.load_state_dict(unet_from_diffusers(ref.state_dict(), SD15_UNET), assign=True)
    sample, context = unet_inputs(ref)
    comparison = C.compare_unet(ours, ref, sample, 801, context)
    assert comparison.passed, comparison.table()
    assert parameter_modules(ours) <= {r.ours for r in comparison.rows}


@pytest.mark.slow
def test_full_size_sd21_text_tower_agrees_in_every_module():
    """ViT-H as SD2.1's folder stores it: the 23 of 24 blocks SD reads, the last one read."""
    ours, ref = text_pair(replace(SD2_TEXT, layers=23, layer_index=-1), blocks_held=23)
    comparison = C.compare_text(ours, ref, ["a photograph of an astronaut riding a horse"],
                                fx.clip_tokenizer("sd2"))
    assert comparison.passed, comparison.table()
    assert parameter_modules(ours) <= {r.ours for r in comparison.rows}


def test_windows_give_the_same_rows_as_one_pass():
    """With little memory for reference activations, the comparison runs in windows: the same rows, same order."""
    ours, ref = tiny_unet()
    sample, context = unet_inputs(ref)
    whole = C.compare_unet(ours, ref, sample, 801, context)
    windowed = C.compare_unet(ours, ref, sample, 801, context, stored_bytes=200_000)
    assert windowed.rows == whole.rows and len(whole.rows) > 300


# ---- deliberate faults, each named at its module -----------------------------------------------------------

def assert_parts_at(comparison: C.Comparison, ours: str, reference_name: str, input_parted: bool) -> None:
    row = comparison.first_parted
    assert row is not None, comparison.table()
    assert (row.ours, row.reference) == (ours, reference_name), comparison.table()
    assert (row.input_rel is not None and row.input_rel > comparison.tolerance) == input_parted, comparison.table()
    assert f"PARTS at {ours}" in comparison.verdict()
    first = comparison.rows.index(row)
    assert all(r.max_rel <= comparison.tolerance for r in comparison.rows[:first])


def test_a_groupnorm_eps_of_1e5_in_one_transformer_block_is_found_there():
    """1e-5 for 1e-6 moves the norm's output by ~1e-5 relative: under fp32's bar, so this fault is hunted in fp64."""
    ours, ref = (m.double() for m in tiny_unet())
    ours.input_blocks[4][1].norm.eps = 1e-5
    sample, context = unet_inputs(ref, torch.float64)
    comparison = C.compare_unet(ours, ref, sample, 801, context)
    assert comparison.tolerance == 1e-9
    assert_parts_at(comparison, "input_blocks.4.1.norm", "down_blocks.1.attentions.0.norm", input_parted=False)


def test_gelu_for_quickgelu_is_found_at_the_activation():
    ours, ref = text_pair(TextEncoderConfig(width=64, layers=2, heads=2), blocks_held=2)
    ours.transformer.resblocks[1].mlp.gelu = nn.GELU()
    comparison = C.compare_text(ours, ref, ["a red circle"])
    assert_parts_at(comparison, "transformer.resblocks.1.mlp.gelu", "encoder.layers.1.mlp.activation_fn",
                    input_parted=False)


def test_a_transposed_text_projection_is_found_at_the_projection():
    """bigG's projection is square (1280 x 1280), so the transposed matrix loads without a shape error."""
    config = TextEncoderConfig(width=64, layers=2, heads=2, activation="gelu", layer_index=-2, pad_token_id=0,
                               final_norm=False, projection_dim=64)
    ours, ref = text_pair(config, blocks_held=2, projection=True)
    with torch.no_grad():
        ours.text_projection.copy_(ours.text_projection.T.clone())
    comparison = C.compare_text(ours, ref, ["a red circle"])
    assert_parts_at(comparison, "text_projection", "text_projection", input_parted=False)
    assert comparison.rows[-1].ours == "text_projection"  # the pooled output: every module before it agreed


def test_one_swapped_q_k_weight_is_found_at_the_query():
    ours, ref = tiny_unet()
    attention = ours.output_blocks[3][1].transformer_blocks[0].attn1
    with torch.no_grad():
        q = attention.to_q.weight.clone()
        attention.to_q.weight.copy_(attention.to_k.weight)
        attention.to_k.weight.copy_(q)
    sample, context = unet_inputs(ref)
    comparison = C.compare_unet(ours, ref, sample, 801, context)
    assert_parts_at(comparison, "output_blocks.3.1.transformer_blocks.0.attn1.to_q",
                    "up_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", input_parted=False)


def flipped_timestep_embedding(timesteps: torch.Tensor, dim: int) -> torch.Tensor:
    """[sin, cos] instead of diffusers' flip_sin_to_cos=True [cos, sin]: the wrong order."""
    cos, sin = correct_timestep_embedding(timesteps, dim).chunk(2, dim=-1)
    return torch.cat([sin, cos], dim=-1)


correct_timestep_embedding = unet_module.timestep_embedding


def test_the_wrong_timestep_embedding_order_is_found_at_its_first_module(monkeypatch):
    """The sinusoidal embedding is a function, not a module: the first module it feeds parts, its input parted."""
    monkeypatch.setattr(unet_module, "timestep_embedding", flipped_timestep_embedding)
    ours, ref = tiny_unet()
    sample, context = unet_inputs(ref)
    comparison = C.compare_unet(ours, ref, sample, 801, context)
    assert_parts_at(comparison, "time_embed.0", "time_embedding.linear_1", input_parted=True)
    assert "cause lies in the code that feeds it" in comparison.verdict()


# ---- dtypes -------------------------------------------------------------------------------------------------

def test_the_tolerance_follows_the_dtype():
    """Ours in fp16 against the reference in fp32: fp16's tolerance, and every row within it."""
    ours, ref = tiny_unet()
    sample, context = unet_inputs(ref)
    comparison = C.compare_unet(ours.half(), ref, sample, 801, context)
    assert comparison.tolerance == C.TOLERANCE[torch.float16] == 1e-2
    assert comparison.passed, comparison.table()
    assert max(r.max_rel for r in comparison.rows) > 1e-4  # half precision shows: these are not fp32 numbers


# ---- the command --------------------------------------------------------------------------------------------

def test_the_command_prints_the_verdict_and_writes_every_row(checkpoints, tmp_path, capsys):
    out = tmp_path / "rows.csv"
    assert main(["compare", str(checkpoints[("sd1", "single")]), "--size", str(SIZE), "--out", str(out),
                 "--pipeline", "--steps", "3"]) == 0
    printed = capsys.readouterr().out
    assert "== unet ==" in printed and "largest pixel difference" in printed and "verdict: EQUAL" in printed
    lines = out.read_text().splitlines()
    assert lines[0] == "network,index,ours,reference,shape,max_abs,max_rel,input_rel,parted"
    networks = [line.split(",")[0] for line in lines[1:]]
    assert set(networks) == {"text_encoder", "vae", "unet"}
    assert all(line.endswith(",0") for line in lines[1:])


def test_the_command_exits_1_and_names_the_module_when_one_parts(checkpoints, monkeypatch, capsys):
    monkeypatch.setattr(unet_module, "timestep_embedding", flipped_timestep_embedding)
    assert main(["compare", str(checkpoints[("sd2", "folder")]), "--size", str(SIZE)]) == 1
    printed = capsys.readouterr().out
    assert "PARTS at time_embed.0 (reference: time_embedding.linear_1)" in printed
    assert "verdict: PARTS" in printed


def test_without_diffusers_the_command_says_what_to_install(checkpoints, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "diffusers", None)  # import diffusers now raises ImportError
    with pytest.raises(SystemExit) as exit_info:
        main(["compare", str(checkpoints[("sd1", "single")])])
    assert exit_info.value.code == 2
    assert "pip install 'diffusion-core[compare]'" in capsys.readouterr().err


def test_a_size_that_is_no_multiple_of_8_is_a_clear_error(checkpoints, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["compare", str(checkpoints[("sd1", "single")]), "--size", "60"])
    assert exit_info.value.code == 2
    assert "--size must be a positive multiple of 8, got 60" in capsys.readouterr().err


def test_pipeline_on_a_refiner_is_a_clear_error(checkpoints, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["compare", str(checkpoints[("sdxl_refiner", "folder")]), "--size", str(SIZE), "--pipeline"])
    assert exit_info.value.code == 2
    assert "--pipeline compares text-to-image" in capsys.readouterr().err
