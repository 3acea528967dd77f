"""T2IAdapter equals diffusers' T2IAdapter, loaded from diffusers folders and files and TencentARC's original files.

Equality is `parity.assert_rel_close`: torch.testing.assert_close with rtol=0 and atol = 1e-4 × max|reference|,
i.e. a max relative error below 1e-4 in fp32 (DESIGN.md, "Numerical bar"). Every reference parameter is random
(reference.randomize_ / random_fp16_weights_), so no zero or default-initialised layer hides a mapping bug.
"""
from __future__ import annotations

import functools
import re

import pytest
import reference
import torch
from diffusers import ControlNetModel as DiffusersControlNet
from diffusers import T2IAdapter as DiffusersT2IAdapter
from diffusers import UNet2DConditionModel
from parity import assert_rel_close
from safetensors.torch import save_file
from sdxl_fixtures import unet_config as sdxl_unet_config

from diffusion_core.checkpoints.keymaps import unet_from_diffusers
from diffusion_core.models.t2i_adapter import T2IAdapter, T2IAdapterConfig, diffusers_key_pairs
from diffusion_core.models.unet import UNetConfig, UNetModel

pytestmark = pytest.mark.usefixtures("one_thread")

MAX_REL = 1e-4
# CPU-sized, each shaped to steer its tiny UNet: the SD1 one (widths 32, 64, 64; reference.TINY_SD1_UNET) and the
# SDXL one (32, 64, 128 plus the middle block; sdxl_fixtures.unet_config). The full one reads 1-channel sketches.
TINY = {
    "full_adapter": dict(in_channels=1, channels=[32, 64, 64], num_res_blocks=2, downscale_factor=8,
                         adapter_type="full_adapter"),
    "full_adapter_xl": dict(in_channels=3, channels=[32, 64, 128, 128], num_res_blocks=2, downscale_factor=16,
                            adapter_type="full_adapter_xl"),
    "light_adapter": dict(in_channels=3, channels=[32, 64, 128], num_res_blocks=4, downscale_factor=8,
                          adapter_type="light_adapter"),
}
LAYOUTS = ("diffusers_folder", "diffusers_safetensors", "original_pth", "original_safetensors")


def build_adapter(config: dict, seed: int = 0) -> DiffusersT2IAdapter:
    """A diffusers T2IAdapter with every parameter seeded and random (its own init skipped)."""
    with torch.device("meta"):
        model = DiffusersT2IAdapter(**config)
    return reference.randomize_(model.to_empty(device="cpu"), seed).eval()


def original_state_dict(ref: DiffusersT2IAdapter) -> dict[str, torch.Tensor]:
    """The reference's weights under TencentARC's names, mapped as diffusers' scripts/convert_original_t2iadapter.py
    maps them, written out here independently of the module's table: full adapters keep one flat list of
    ResnetBlocks (diffusers' body.i.resnets.j is body.{i·n+j}, its body.i.in_conv the level's first block's),
    the light adapter nests them per level (body.i.resnets.j is body.i.body.j)."""
    n, light = ref.config.num_res_blocks, ref.config.adapter_type == "light_adapter"
    state = {}
    for key, value in ref.state_dict().items():
        key = key.removeprefix("adapter.")
        if light:
            key = re.sub(r"^body\.(\d+)\.resnets\.(\d+)\.", r"body.\1.body.\2.", key)
        else:
            key = re.sub(r"^body\.(\d+)\.resnets\.(\d+)\.", lambda m: f"body.{int(m[1]) * n + int(m[2])}.", key)
            key = re.sub(r"^body\.(\d+)\.in_conv\.", lambda m: f"body.{int(m[1]) * n}.in_conv.", key)
        state[key] = value.clone()
    return state


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """type -> (the diffusers reference, {layout: the path it was saved to}), each built once per module."""
    @functools.cache
    def build(adapter_type: str) -> tuple[DiffusersT2IAdapter, dict]:
        ref = build_adapter(TINY[adapter_type])
        root = tmp_path_factory.mktemp(adapter_type)
        ref.save_pretrained(root / "folder")
        save_file(ref.state_dict(), root / "diffusers.safetensors")
        original = original_state_dict(ref)
        torch.save(original, root / "t2iadapter_tiny.pth")
        save_file(original, root / "t2iadapter_tiny.safetensors")
        return ref, {"diffusers_folder": root / "folder", "diffusers_safetensors": root / "diffusers.safetensors",
                     "original_pth": root / "t2iadapter_tiny.pth",
                     "original_safetensors": root / "t2iadapter_tiny.safetensors"}
    return build


def control_image(ref: DiffusersT2IAdapter, size: int, batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.rand(batch, ref.config.in_channels, size, size, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def assert_same_features(ours: T2IAdapter, ref: DiffusersT2IAdapter, image: torch.Tensor) -> None:
    expected, actual = ref(image), ours(image)
    assert len(actual) == len(expected)
    for i, (a, b) in enumerate(zip(actual, expected)):
        assert a.shape == b.shape, f"feature {i}: {tuple(a.shape)} vs {tuple(b.shape)}"
        assert_rel_close(a, b, MAX_REL, f"feature {i}")


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("adapter_type", TINY)
def test_tiny_adapter_matches_diffusers(tiny, adapter_type, layout):
    """Each type, from each layout: the architecture read from config.json or recognised from the shapes alone,
    and the features equal diffusers' T2IAdapter(image)."""
    ref, paths = tiny(adapter_type)
    ours = T2IAdapter.from_pretrained(paths[layout])
    assert ours.config == T2IAdapterConfig.from_diffusers(dict(ref.config))
    assert ours.family == ("sdxl" if adapter_type == "full_adapter_xl" else "sd1/sd2")
    assert ours.config.total_downscale_factor == ref.total_downscale_factor
    assert_same_features(ours, ref, control_image(ref, 128))


def test_odd_feature_sizes_round_up_as_diffusers(tiny):
    """A 200-pixel image unshuffles to 25: the next level's 2x2 averaging rounds 12.5 up, as diffusers does."""
    ref, paths = tiny("full_adapter")
    assert_same_features(T2IAdapter.from_pretrained(paths["original_pth"]), ref, control_image(ref, 200, batch=1))


def test_fp16_load_and_nested_adapter_key(tiny, tmp_path):
    """dtype= casts while loading; a .pth holding {"adapter": state_dict} (as some files do) loads too."""
    ref, paths = tiny("light_adapter")
    torch.save({"adapter": original_state_dict(ref)}, tmp_path / "nested.pth")
    ours = T2IAdapter.from_pretrained(tmp_path / "nested.pth")
    assert_same_features(ours, ref, control_image(ref, 64))
    half = T2IAdapter.from_pretrained(paths["diffusers_folder"], dtype=torch.float16)
    assert all(p.dtype == torch.float16 for p in half.parameters())


@pytest.mark.slow
def test_full_size_sd15_adapter_from_an_fp16_original_file(tmp_path):
    """TencentARC's SD 1.x full adapter (320, 640, 1280, 1280; 2 blocks; RGB; unshuffle 8) from an fp16 .pth, in
    fp32 at 512x512: max rel. error < 1e-4. Its keys are exactly those convert_original_t2iadapter.py reads."""
    with torch.device("meta"):
        ref = DiffusersT2IAdapter(in_channels=3, channels=[320, 640, 1280, 1280], num_res_blocks=2,
                                  downscale_factor=8, adapter_type="full_adapter")
    reference.random_fp16_weights_(ref.to_empty(device="cpu"), seed=5).eval()  # values fp16 holds exactly
    state = {k: v.half() for k, v in original_state_dict(ref).items()}
    script_keys = {"conv_in", *(f"body.{k}.{conv}" for k in range(8) for conv in ("block1", "block2")),
                   "body.2.in_conv", "body.4.in_conv"}  # the script's asserted shapes and popped keys
    assert set(state) == {f"{m}.{p}" for m in script_keys for p in ("weight", "bias")}
    assert state["body.2.in_conv.weight"].shape == (640, 320, 1, 1)
    path = tmp_path / "t2iadapter_canny_sd14v1.pth"
    torch.save(state, path)
    del state
    ours = T2IAdapter.from_pretrained(path)
    assert ours.config == T2IAdapterConfig() and ours.family == "sd1/sd2"
    assert_same_features(ours, ref, control_image(ref, 512, batch=1))


@torch.no_grad()
@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_features_enter_the_unet_where_diffusers_adds_them(tiny, family):
    """Our UNet with our adapter's features equals diffusers' UNet with diffusers' down_intrablock residuals
    (SDXL: three levels, the fourth feature joining the middle block)."""
    adapter_type, unet_dict = {"sd1": ("full_adapter", reference.TINY_SD1_UNET),
                               "sdxl": ("full_adapter_xl", sdxl_unet_config("base"))}[family]
    ref, paths = tiny(adapter_type)
    adapter = T2IAdapter.from_pretrained(paths["diffusers_folder"])
    ref_unet = reference.build_unet(unet_dict, seed=3)
    config = UNetConfig.from_diffusers(unet_dict)
    unet = UNetModel(config).eval()
    unet.load_state_dict(unet_from_diffusers(ref_unet.state_dict(), config))
    gen = torch.Generator().manual_seed(2)
    sample = torch.randn(2, 4, 16, 16, generator=gen)
    context = torch.randn(2, 77, unet_dict["cross_attention_dim"], generator=gen)
    added = {}
    if family == "sdxl":
        width = unet_dict["projection_class_embeddings_input_dim"] - 6 * unet_dict["addition_time_embed_dim"]
        added = dict(text_embeds=torch.randn(2, width, generator=gen),
                     time_ids=torch.tensor([[128.0, 128.0, 0.0, 0.0, 128.0, 128.0]]).repeat(2, 1))
    image = control_image(ref, 128)
    scale = 0.8  # the pipeline's adapter_conditioning_scale ω multiplies each feature
    expected = ref_unet(sample, 400, context, added_cond_kwargs=added or None,
                        down_intrablock_additional_residuals=[f * scale for f in ref(image)]).sample
    actual = unet(sample, 400, context, **added, adapter_features=[f * scale for f in adapter(image)])
    assert_rel_close(actual, expected, MAX_REL)
    assert not torch.allclose(actual, unet(sample, 400, context, **added), atol=1e-3)  # the features do act


def test_files_of_another_kind_are_refused(tmp_path):
    """A UNet's or a ControlNet's weights are named for what they are, not loaded as an adapter."""
    unet = reference.build_unet(reference.TINY_SD1_UNET)
    save_file(unet.state_dict(), tmp_path / "unet.safetensors")
    with pytest.raises(ValueError, match=r"not a T2I-Adapter.*look like a UNet"):
        T2IAdapter.from_pretrained(tmp_path / "unet.safetensors")
    with torch.device("meta"):
        controlnet = DiffusersControlNet.from_unet(UNet2DConditionModel(**reference.TINY_SD1_UNET))
    torch.save({k: torch.zeros(v.shape) for k, v in controlnet.state_dict().items()}, tmp_path / "controlnet.pth")
    with pytest.raises(ValueError, match=r"not a T2I-Adapter.*ControlNet.*ControlNetModel\.from_pretrained"):
        T2IAdapter.from_pretrained(tmp_path / "controlnet.pth")
    (tmp_path / "adapter.yaml").write_text("a: 1")
    with pytest.raises(ValueError, match="unknown T2I-Adapter file type"):
        T2IAdapter.from_pretrained(tmp_path / "adapter.yaml")


def test_unknown_missing_and_misshapen_keys_are_named(tiny, tmp_path):
    ref, _ = tiny("full_adapter")
    state = original_state_dict(ref)
    state["body.1.extra.weight"] = torch.zeros(3)
    del state["body.3.block2.bias"]
    save_file(state, tmp_path / "odd.safetensors")
    with pytest.raises(ValueError, match=r"missing keys.*body\.3\.block2\.bias.*unexpected keys.*body\.1\.extra"):
        T2IAdapter.from_pretrained(tmp_path / "odd.safetensors")
    diffusers_state = dict(ref.state_dict())
    diffusers_state["adapter.body.0.resnets.1.block2.weight"] = torch.zeros(32, 32, 3, 3)
    save_file(diffusers_state, tmp_path / "misshapen.safetensors")
    with pytest.raises(ValueError, match=r"wrongly shaped.*adapter\.body\.0\.resnets\.1\.block2\.weight"):
        T2IAdapter.from_pretrained(tmp_path / "misshapen.safetensors")
    skip = {**original_state_dict(ref), "body.2.skep.weight": torch.zeros(64, 32, 1, 1)}
    save_file(skip, tmp_path / "skep.safetensors")
    with pytest.raises(ValueError, match=r"skip convolution \(sk=False\).*body\.2\.skep\.weight"):
        T2IAdapter.from_pretrained(tmp_path / "skep.safetensors")


def test_wrong_images_and_configs_are_refused(tiny):
    ref, paths = tiny("full_adapter")
    ours = T2IAdapter.from_pretrained(paths["diffusers_folder"])
    with pytest.raises(ValueError, match=r"\(B, 1, H, W\), got \(1, 3, 64, 64\).*1-channel"):
        ours(torch.rand(1, 3, 64, 64))
    with pytest.raises(ValueError, match=r"\(60, 64\) is not a multiple of the pixel-unshuffle factor 8"):
        ours(torch.rand(1, 1, 60, 64))
    with pytest.raises(ValueError, match="adapter_type 'style_adapter' is not one of"):
        T2IAdapterConfig.from_diffusers({"adapter_type": "style_adapter"})
    with pytest.raises(ValueError, match="describes a ControlNetModel, not a T2IAdapter"):
        T2IAdapterConfig.from_diffusers({"_class_name": "ControlNetModel"})


def test_rename_table_covers_every_parameter_once():
    """The diffusers table is a bijection between diffusers' and our parameter names, for every type."""
    for config in TINY.values():
        ours, ref = T2IAdapter(T2IAdapterConfig.from_diffusers(config)), build_adapter(config)
        pairs = diffusers_key_pairs(ours.config)
        assert sorted(d for d, _ in pairs) == sorted(ref.state_dict())
        assert sorted(o for _, o in pairs) == sorted(ours.state_dict())
