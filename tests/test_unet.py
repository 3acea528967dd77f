"""UNetModel equals diffusers' UNet2DConditionModel, weights carried over by the key map."""
from __future__ import annotations

import functools

import pytest
import reference
import torch
from diffusers import UNet2DConditionModel
from parity import assert_rel_close

from diffusion_core.checkpoints.keymaps import unet_from_diffusers, unet_key_pairs, unet_to_diffusers
from diffusion_core.models.layers import attention
from diffusion_core.models.unet import (SD2_INPAINT_UNET, SD15_INPAINT_UNET, SD15_UNET, SD21_UNET, SDXL_BASE_UNET,
                                        SDXL_INPAINT_UNET, SDXL_REFINER_UNET, TINY_UNET, UNetConfig, UNetModel)

MAX_REL = 1e-4
TINY = {"sd1": reference.TINY_SD1_UNET, "sd2": reference.TINY_SD2_UNET, "inpaint": reference.TINY_INPAINT_UNET}
PRESETS = [SD15_UNET, SD21_UNET, SD15_INPAINT_UNET, SD2_INPAINT_UNET, TINY_UNET, SDXL_BASE_UNET, SDXL_REFINER_UNET,
           SDXL_INPAINT_UNET]
PRESET_IDS = ["sd15", "sd21", "sd15_inpaint", "sd2_inpaint", "tiny", "sdxl_base", "sdxl_refiner", "sdxl_inpaint"]


@functools.cache
def tiny_pair(name: str) -> tuple[UNet2DConditionModel, UNetModel]:
    """The perturbed diffusers reference and our model loaded from its converted weights."""
    ref = reference.build_unet(TINY[name])
    config = UNetConfig.from_diffusers(TINY[name])
    ours = UNetModel(config).eval()
    ours.load_state_dict(unet_from_diffusers(ref.state_dict(), config))
    return ref, ours


def inputs(ref: UNet2DConditionModel, batch: int = 2, size: tuple[int, int] = (16, 16)):
    gen = torch.Generator().manual_seed(1)
    sample = torch.randn(batch, ref.config.in_channels, *size, generator=gen)
    context = torch.randn(batch, 77, ref.config.cross_attention_dim, generator=gen)
    return sample, context


@torch.no_grad()
def assert_same_prediction(ref, ours, sample, timestep, context):
    expected = ref(sample, timestep, context).sample
    assert_rel_close(ours(sample, timestep, context), expected, MAX_REL)


TIMESTEPS = {"int": 981, "float": 523.7, "tensor_0d": torch.tensor(17), "per_sample": torch.tensor([999.0, 10.25])}


@pytest.mark.parametrize("timestep", TIMESTEPS.values(), ids=TIMESTEPS.keys())
@pytest.mark.parametrize("name", TINY)
def test_tiny_unet_matches_diffusers(name, timestep):
    ref, ours = tiny_pair(name)
    sample, context = inputs(ref)
    assert_same_prediction(ref, ours, sample, timestep, context)


def test_odd_latent_size_upsamples_to_the_skip_size():
    """A 15x13 latent (not a multiple of 4) comes back up to its skips' sizes, as in diffusers."""
    ref, ours = tiny_pair("sd1")
    sample, context = inputs(ref, size=(15, 13))
    assert_same_prediction(ref, ours, sample, 500, context)


@pytest.mark.parametrize("name", TINY)
def test_state_dict_round_trip(name):
    ref, _ = tiny_pair(name)
    config = UNetConfig.from_diffusers(TINY[name])
    sd = ref.state_dict()
    back = unet_to_diffusers(unet_from_diffusers(sd, config), config)
    assert back.keys() == sd.keys()
    assert all(torch.equal(back[k], sd[k]) for k in sd)


@pytest.mark.parametrize("config", PRESETS, ids=PRESET_IDS)
def test_key_map_covers_every_parameter_of_each_preset(config):
    """Each (diffusers, original) pair names parameters of the same shape, and no parameter is left out."""
    with torch.device("meta"):
        theirs = UNet2DConditionModel(**config.to_diffusers()).state_dict()
        ours = UNetModel(config).state_dict()
    pairs = unet_key_pairs(config)
    assert sorted(d for d, _ in pairs) == sorted(theirs) and sorted(o for _, o in pairs) == sorted(ours)
    assert all(theirs[d].shape == ours[o].shape for d, o in pairs)


@pytest.mark.parametrize("config", PRESETS, ids=PRESET_IDS)
def test_config_round_trips_through_diffusers(config):
    assert UNetConfig.from_diffusers(config.to_diffusers()) == config


def test_diffusers_configs_give_the_presets():
    assert UNetConfig.from_diffusers(reference.SD15_UNET) == SD15_UNET
    assert UNetConfig.from_diffusers(reference.SD21_UNET) == SD21_UNET
    assert UNetConfig.from_diffusers(reference.TINY_SD1_UNET) == TINY_UNET
    assert UNetConfig.from_diffusers(reference.TINY_SD2_UNET).num_head_channels == 8


@pytest.mark.parametrize("name", ["TINY_SD1_UNET", "TINY_SD2_UNET", "TINY_INPAINT_UNET", "SD15_UNET", "SD21_UNET"])
def test_a_saved_diffusers_config_reads_the_same(name):
    """A model's full config (what config.json holds, every default spelled out) gives the same UNetConfig."""
    with torch.device("meta"):
        saved = dict(UNet2DConditionModel(**getattr(reference, name)).config)
    assert UNetConfig.from_diffusers(saved) == UNetConfig.from_diffusers(getattr(reference, name))


def test_unsupported_diffusers_option_is_a_clear_error():
    with pytest.raises(ValueError, match="class_embed_type"):
        UNetConfig.from_diffusers(dict(reference.SD15_UNET, class_embed_type="timestep"))


def test_missing_and_unexpected_keys_are_named():
    ref, _ = tiny_pair("sd1")
    sd = dict(ref.state_dict())
    sd["extra.weight"] = sd.pop("conv_in.weight")
    with pytest.raises(ValueError, match=r"missing keys \['conv_in.weight'\].*unexpected keys \['extra.weight'\]"):
        unet_from_diffusers(sd, TINY_UNET)


def test_upcast_attention_computes_in_fp32():
    """With upcast, bf16 attention is the fp32 result rounded once to bf16."""
    gen = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(2, 64, 4 * 16, generator=gen).bfloat16() for _ in range(3))
    expected = attention(q.float(), k.float(), v.float(), heads=4).bfloat16()
    assert torch.equal(attention(q, k, v, heads=4, upcast=True), expected)


@pytest.mark.slow
@pytest.mark.parametrize("diffusers_config, config",
                         [(reference.SD15_UNET, SD15_UNET), (reference.SD21_UNET, SD21_UNET)], ids=["sd15", "sd21"])
def test_full_size_unet_matches_diffusers(diffusers_config, config):
    ref = reference.build_unet(diffusers_config)
    with torch.device("meta"):  # share the reference's tensors: one 3.4 GB copy, not two
        ours = UNetModel(config).eval()
    ours.load_state_dict(unet_from_diffusers(ref.state_dict(), config), assign=True)
    sample, context = inputs(ref, batch=1, size=(8, 8))
    assert_same_prediction(ref, ours, sample, 801, context)
