"""ControlNetModel equals diffusers' ControlNetModel, loaded from diffusers folders and lllyasviel's original files."""
from __future__ import annotations

import functools
import logging
from pathlib import Path

import pytest
import reference
import torch
from diffusers import ControlNetModel as DiffusersControlNet
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor2_0
from parity import assert_rel_close
from safetensors.torch import save_file
from sdxl_fixtures import unet_config as sdxl_unet_config

from diffusion_core import ControlNetModel
from diffusion_core.checkpoints.controlnet import controlnet_config_from_diffusers
from diffusion_core.checkpoints.keymaps import controlnet_from_diffusers, unet_from_diffusers
from diffusion_core.checkpoints.loader import CheckpointError
from diffusion_core.models.controlnet import controlnet_config_for, copy_encoder
from diffusion_core.models.unet import UNetConfig, UNetModel

MAX_REL = 1e-4
TINY = {"sd1": reference.TINY_SD1_UNET, "sd2": reference.TINY_SD2_UNET, "sdxl": sdxl_unet_config("base")}


def build_controlnet(unet_config: dict, seed: int = 0, **extra) -> DiffusersControlNet:
    """A diffusers ControlNet copying a UNet of this config, every parameter random (zero convs too)."""
    model = DiffusersControlNet.from_unet(UNet2DConditionModel(**unet_config))
    if extra:
        config = {k: v for k, v in model.config.items() if not k.startswith("_")}  # "_" keys reset the rest
        model = DiffusersControlNet.from_config({**config, **extra})
    model = reference.randomize_(model.eval(), seed)
    model.set_attn_processor(AttnProcessor2_0())
    return model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """name -> (the diffusers reference, the folder it saved itself to), each built once per module."""
    @functools.cache
    def build(name: str) -> tuple[DiffusersControlNet, str]:
        ref = build_controlnet(TINY[name])
        folder = tmp_path_factory.mktemp(f"controlnet_{name}")
        ref.save_pretrained(folder)
        return ref, str(folder)
    return build


def inputs(ref: DiffusersControlNet, batch: int = 2, size: int = 16, seed: int = 1) -> dict:
    gen = torch.Generator().manual_seed(seed)
    values = dict(sample=torch.randn(batch, 4, size, size, generator=gen),
                  context=torch.randn(batch, 77, ref.config.cross_attention_dim, generator=gen),
                  cond_image=torch.rand(batch, ref.config.conditioning_channels, 8 * size, 8 * size, generator=gen))
    if ref.config.addition_embed_type == "text_time":
        width = ref.config.projection_class_embeddings_input_dim - 6 * ref.config.addition_time_embed_dim
        values.update(text_embeds=torch.randn(batch, width, generator=gen),
                      time_ids=torch.tensor([[64.0, 48.0, 0.0, 8.0, 64.0, 48.0]]).repeat(batch, 1))
    return values


@torch.no_grad()
def assert_same_residuals(ref: DiffusersControlNet, ours: ControlNetModel, x: dict, timestep, scale: float = 1.0,
                          guess_mode: bool = False) -> None:
    added = {k: x[k] for k in ("text_embeds", "time_ids") if k in x}
    down, mid = ref(x["sample"], timestep, x["context"], x["cond_image"], conditioning_scale=scale,
                    guess_mode=guess_mode, added_cond_kwargs=added or None, return_dict=False)
    our_down, our_mid = ours(x["sample"], timestep, x["context"], x["cond_image"], scale=scale,
                             guess_mode=guess_mode, **added)
    assert len(our_down) == len(down)
    for k, (a, b) in enumerate(zip(our_down, down)):
        assert_rel_close(a, b, MAX_REL, f"down residual {k}")
    assert_rel_close(our_mid, mid, MAX_REL, "mid residual")


@pytest.mark.parametrize("guess_mode", [False, True], ids=["plain", "guess_mode"])
@pytest.mark.parametrize("name", TINY)
def test_tiny_controlnet_from_a_diffusers_folder_matches_diffusers(tiny, name, guess_mode):
    ref, folder = tiny(name)
    ours = ControlNetModel.from_pretrained(folder)
    assert ours.controlnet_config.family == ("sdxl-like (context width 192)" if name == "sdxl" else
                                             f"custom (context width {TINY[name]['cross_attention_dim']})")
    assert_same_residuals(ref, ours, inputs(ref), 981, scale=0.7, guess_mode=guess_mode)
    assert_same_residuals(ref, ours, inputs(ref, seed=2), torch.tensor([17.0, 500.5]))


def test_global_pooling_averages_every_residual_as_diffusers_does(tmp_path):
    """The shuffle models' flag: each residual is its mean over the image (guess mode is then the plain one)."""
    ref = build_controlnet(TINY["sd1"], global_pool_conditions=True)
    ref.save_pretrained(tmp_path)
    ours = ControlNetModel.from_pretrained(tmp_path)
    assert ours.controlnet_config.global_pool_conditions
    for guess_mode in (False, True):
        assert_same_residuals(ref, ours, inputs(ref), 400, scale=0.5, guess_mode=guess_mode)


def original_state(ours: ControlNetModel, prefix: str = "control_model.") -> dict[str, torch.Tensor]:
    return {prefix + k: v.clone() for k, v in ours.state_dict().items()}


@pytest.mark.parametrize("layout", ["control_model.pth", "bare.pth", "control_model.safetensors", "v10_bundle.pth"])
def test_original_files_load_in_every_layout(tiny, tmp_path, caplog, layout):
    """lllyasviel's files: `control_model.*` keys (v1.0 bundles SD's own weights beside them), bare keys in the
    v1.1 .pth files; .pth read with weights_only, .safetensors; the architecture recognised from the shapes."""
    ref, folder = tiny("sd1")
    state = original_state(ControlNetModel.from_pretrained(folder), "" if layout.startswith("bare") else
                           "control_model.")
    if layout.startswith("v10"):
        state.update({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(32, 4, 3, 3),
                      "first_stage_model.encoder.conv_in.weight": torch.zeros(32, 3, 3, 3)})
    path = tmp_path / f"control_sd15_{layout}"
    if path.suffix == ".safetensors":
        save_file(state, path)
    else:
        torch.save({"state_dict": state} if layout.startswith("v10") else state, path)
    with caplog.at_level(logging.WARNING):
        ours = ControlNetModel.from_pretrained(path)
    assert ("2 keys of an SD checkpoint" in caplog.text) == layout.startswith("v10")
    assert ours.controlnet_config.unet == ControlNetModel.from_pretrained(folder).controlnet_config.unet
    assert_same_residuals(ref, ours, inputs(ref), 981, scale=0.9)


def test_a_diffusers_keyed_file_needs_its_config_beside_it(tiny, tmp_path):
    ref, folder = tiny("sd1")
    weights = tmp_path / "diffusion_pytorch_model.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, weights)
    with pytest.raises(CheckpointError, match="config.json beside it"):
        ControlNetModel.from_pretrained(weights)
    (tmp_path / "config.json").write_text((Path(folder) / "config.json").read_text())
    assert_same_residuals(ref, ControlNetModel.from_pretrained(weights), inputs(ref), 10)


def test_files_that_are_not_controlnets_are_refused(tiny, tmp_path):
    ref, folder = tiny("sd1")
    unet = tmp_path / "unet.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(32, 4, 3, 3)}, unet)
    with pytest.raises(CheckpointError, match="not a ControlNet"):
        ControlNetModel.from_pretrained(unet)
    state = original_state(ControlNetModel.from_pretrained(folder))
    state["control_model.extra.weight"] = torch.zeros(3)
    del state["control_model.zero_convs.3.0.bias"]
    odd = tmp_path / "odd.safetensors"
    save_file(state, odd)
    with pytest.raises(CheckpointError, match=r"missing keys.*zero_convs\.3\.0\.bias.*unexpected keys.*extra"):
        ControlNetModel.from_pretrained(odd)
    (tmp_path / "x.yaml").write_text("a: 1")
    with pytest.raises(CheckpointError, match="unknown ControlNet file type"):
        ControlNetModel.from_pretrained(tmp_path / "x.yaml")


def test_zero_convolutions_leave_the_unet_unchanged_at_initialisation():
    """ControlNet's central idea: a fresh ControlNet, copied from the UNet, adds exactly zero to every skip."""
    ref_unet = reference.build_unet(reference.TINY_SD1_UNET)
    config = UNetConfig.from_diffusers(reference.TINY_SD1_UNET)
    unet = UNetModel(config).eval()
    unet.load_state_dict(unet_from_diffusers(ref_unet.state_dict(), config))
    controlnet = copy_encoder(ControlNetModel(controlnet_config_for(config)).eval(), unet)
    assert torch.equal(controlnet.input_blocks[1][0].in_layers[2].weight, unet.input_blocks[1][0].in_layers[2].weight)
    gen = torch.Generator().manual_seed(0)
    x, context = torch.randn(1, 4, 16, 16, generator=gen), torch.randn(1, 77, 32, generator=gen)
    with torch.no_grad():
        down, mid = controlnet(x, 500, context, torch.rand(1, 3, 128, 128, generator=gen))
        assert all(torch.equal(d, torch.zeros_like(d)) for d in [*down, mid])
        assert torch.equal(unet(x, 500, context, down_residuals=down, mid_residual=mid), unet(x, 500, context))


def test_residuals_enter_the_unet_where_diffusers_adds_them(tiny):
    """Our UNet with our ControlNet's residuals equals diffusers' UNet with diffusers' residuals."""
    ref, folder = tiny("sd1")
    ours = ControlNetModel.from_pretrained(folder)
    ref_unet = reference.build_unet(reference.TINY_SD1_UNET, seed=3)
    config = UNetConfig.from_diffusers(reference.TINY_SD1_UNET)
    unet = UNetModel(config).eval()
    unet.load_state_dict(unet_from_diffusers(ref_unet.state_dict(), config))
    x = inputs(ref)
    with torch.no_grad():
        down, mid = ref(x["sample"], 300, x["context"], x["cond_image"], return_dict=False)
        expected = ref_unet(x["sample"], 300, x["context"], down_block_additional_residuals=down,
                            mid_block_additional_residual=mid).sample
        our_down, our_mid = ours(x["sample"], 300, x["context"], x["cond_image"])
        actual = unet(x["sample"], 300, x["context"], down_residuals=our_down, mid_residual=our_mid)
    assert_rel_close(actual, expected, MAX_REL)


@pytest.mark.slow
def test_full_size_sd15_controlnet_from_an_fp16_original_file(tmp_path):
    """lllyasviel's SD 1.5 architecture at full size, from an fp16 cldm-layout file, in fp32: max rel. error < 1e-4."""
    with torch.device("meta"):
        ref = DiffusersControlNet.from_unet(UNet2DConditionModel(**reference.SD15_UNET))
    ref.to_empty(device="cpu").set_attn_processor(AttnProcessor2_0())
    reference.random_fp16_weights_(ref, seed=5).eval()  # values fp16 holds exactly: the file loses nothing
    config = controlnet_config_from_diffusers(dict(ref.config))
    state = {f"control_model.{k}": v.half() for k, v in controlnet_from_diffusers(ref.state_dict(), config).items()}
    path = tmp_path / "control_v11p_sd15_canny.pth"
    torch.save(state, path)
    del state
    ours = ControlNetModel.from_pretrained(path)
    assert ours.controlnet_config.family == "sd1"
    x = inputs(ref, batch=1, size=64)
    assert_same_residuals(ref, ours, x, 801, scale=1.0)
