"""VAE equals diffusers' AutoencoderKL (encode, sample, decode), weights carried over by the key map."""
from __future__ import annotations

import functools

import pytest
import reference
import torch
from diffusers import AutoencoderKL
from parity import assert_rel_close

from diffusion_core.checkpoints.keymaps import vae_from_diffusers, vae_key_pairs, vae_to_diffusers
from diffusion_core.models.vae import SD_VAE, TINY_VAE, VAE, VAEConfig

MAX_REL = 1e-4


@functools.cache
def tiny_pair() -> tuple[AutoencoderKL, VAE]:
    """The perturbed diffusers reference and our VAE loaded from its converted weights."""
    ref = reference.build_vae(reference.TINY_VAE)
    ours = VAE(TINY_VAE).eval()
    ours.load_state_dict(vae_from_diffusers(ref.state_dict(), TINY_VAE))
    return ref, ours


def image(size: int, batch: int = 2) -> torch.Tensor:
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(1)) * 2 - 1  # in [-1, 1]


@torch.no_grad()
def assert_same_encoding(ref: AutoencoderKL, ours: VAE, x: torch.Tensor) -> None:
    expected, posterior = ref.encode(x).latent_dist, ours.encode(x)
    for name in ("mean", "logvar", "std"):
        assert_rel_close(getattr(posterior, name), getattr(expected, name), MAX_REL, name)
    assert torch.equal(posterior.mode(), posterior.mean)
    sample = posterior.sample(torch.Generator().manual_seed(7))
    assert_rel_close(sample, expected.sample(generator=torch.Generator().manual_seed(7)), MAX_REL, "sample")


@torch.no_grad()
def assert_same_decoding(ref: AutoencoderKL, ours: VAE, z: torch.Tensor) -> None:
    assert_rel_close(ours.decode(z), ref.decode(z).sample, MAX_REL)


def test_tiny_encode_matches_diffusers():
    assert_same_encoding(*tiny_pair(), image(32))


def test_tiny_sample_with_one_generator_per_image():
    ref, ours = tiny_pair()
    x = image(32)
    with torch.no_grad():
        expected = ref.encode(x).latent_dist.sample(generator=[torch.Generator().manual_seed(s) for s in (5, 6)])
        actual = ours.encode(x).sample([torch.Generator().manual_seed(s) for s in (5, 6)])
    assert_rel_close(actual, expected, MAX_REL)


def test_tiny_decode_matches_diffusers():
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    assert_same_decoding(*tiny_pair(), z)


def test_state_dict_round_trip():
    ref, _ = tiny_pair()
    sd = ref.state_dict()
    back = vae_to_diffusers(vae_from_diffusers(sd, TINY_VAE), TINY_VAE)
    assert back.keys() == sd.keys()
    assert all(torch.equal(back[k], sd[k]) for k in sd)


def test_old_diffusers_attention_names_are_accepted():
    """Folders saved before diffusers 0.14 call the mid attention query/key/value/proj_attn."""
    ref, _ = tiny_pair()
    sd = ref.state_dict()
    old = {k.replace(".to_q.", ".query.").replace(".to_k.", ".key.").replace(".to_v.", ".value.")
           .replace(".to_out.0.", ".proj_attn."): v for k, v in sd.items()}
    assert any(".proj_attn." in k for k in old)
    new, converted = vae_from_diffusers(sd, TINY_VAE), vae_from_diffusers(old, TINY_VAE)
    assert new.keys() == converted.keys() and all(torch.equal(new[k], converted[k]) for k in new)


def test_sampling_uses_the_seed_like_diffusers():
    """sample(generator) = mean + std·ε with ε = randn(mean.shape, generator) on the generator's device."""
    _, ours = tiny_pair()
    with torch.no_grad():
        posterior = ours.encode(image(32))
    eps = torch.randn(posterior.mean.shape, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(posterior.sample(torch.Generator().manual_seed(3)), posterior.mean + posterior.std * eps)


@pytest.mark.parametrize("config", [SD_VAE, TINY_VAE], ids=["sd", "tiny"])
def test_key_map_covers_every_parameter(config):
    """Each (diffusers, original) pair names parameters of the same size, and no parameter is left out."""
    with torch.device("meta"):
        theirs = AutoencoderKL(**config.to_diffusers()).state_dict()
        ours = VAE(config).state_dict()
    pairs = vae_key_pairs(config)
    assert sorted(d for d, _ in pairs) == sorted(theirs) and sorted(o for _, o in pairs) == sorted(ours)
    assert all(theirs[d].numel() == ours[o].numel() for d, o in pairs)


def test_diffusers_configs_give_the_presets():
    assert VAEConfig.from_diffusers(reference.SD_VAE) == SD_VAE
    assert VAEConfig.from_diffusers(reference.TINY_VAE) == TINY_VAE
    assert VAEConfig.from_diffusers(SD_VAE.to_diffusers()) == SD_VAE


@pytest.mark.parametrize("name", ["TINY_VAE", "SD_VAE"])
def test_a_saved_diffusers_config_reads_the_same(name):
    """A model's full config (what config.json holds, every default spelled out) gives the same VAEConfig."""
    with torch.device("meta"):
        saved = dict(AutoencoderKL(**getattr(reference, name)).config)
    assert VAEConfig.from_diffusers(saved) == VAEConfig.from_diffusers(getattr(reference, name))


def test_unsupported_diffusers_option_is_a_clear_error():
    with pytest.raises(ValueError, match="use_quant_conv"):
        VAEConfig.from_diffusers(dict(reference.SD_VAE, use_quant_conv=False))


@pytest.mark.slow
def test_full_size_vae_matches_diffusers():
    ref = reference.build_vae(reference.SD_VAE)
    ours = VAE(SD_VAE).eval()
    ours.load_state_dict(vae_from_diffusers(ref.state_dict(), SD_VAE))
    assert_same_encoding(ref, ours, image(64, batch=1))
    assert_same_decoding(ref, ours, torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2)))
