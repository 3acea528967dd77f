"""SDXL's networks and files: the UNet with its added embedding, the two text towers, loading both layouts.

Everything is compared with diffusers / transformers on random, perturbed weights: tiny models for the
mechanics and the file formats, the full-size SDXL base (from an fp16 single file read into fp32) for the
architecture itself.
"""
from __future__ import annotations

import functools
import json
import logging
import re
from dataclasses import replace

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

import checkpoint_fixtures as fx
import reference
import sdxl_fixtures as sx
from diffusion_core import DiffusionModel
from diffusion_core.checkpoints.configs import (SDXL_BASE, SDXL_INPAINT, SDXL_PRESETS, SDXL_REFINER,
                                                sdxl_config_from_weights)
from diffusion_core.checkpoints.keymaps import unet_from_diffusers, vae_from_diffusers
from diffusion_core.checkpoints.loader import (TEXT_TOWERS, CheckpointError, Components, load_components,
                                               open_weights, save_single_file, text_encoder_for)
from diffusion_core.checkpoints.text_keys import TRANSFORMERS_PREFIX, text_from_transformers, text_to_transformers
from diffusion_core.models.text_encoder import DualTextEncoder, TextEncoderConfig
from diffusion_core.models.unet import SDXL_BASE_UNET, SDXL_REFINER_UNET, UNetConfig, UNetModel
from diffusion_core.models.vae import SDXL_VAE
from parity import assert_rel_close, max_rel_error

MAX_REL = 1e-4
PROMPTS = ["a photograph of an astronaut riding a horse", "", "Hello, World!!! (masterpiece:1.2), 8K"]
PROMPTS_2 = ["an oil painting", "a red circle on a blue background", "!!"]


def added_inputs(batch: int, pooled: int, ids: int, context: int, in_channels: int = 4, size: int = 16):
    """A latent, a context, a pooled embedding and time ids that differ between the batch items."""
    gen = torch.Generator().manual_seed(3)
    time_ids = torch.tensor([[1024.0, 768, 0, 0, 1024, 768], [512, 512, 96, 32, 1024, 1024]])[:batch, :ids]
    if ids == 5:  # the refiner: original size, crop, aesthetic score
        time_ids[:, 4] = torch.tensor([6.0, 2.5])[:batch]
    return dict(sample=torch.randn(batch, in_channels, size, size, generator=gen),
                context=torch.randn(batch, 77, context, generator=gen),
                text_embeds=torch.randn(batch, pooled, generator=gen), time_ids=time_ids)


# ---------------------------------------------------------------- the UNet


@functools.cache
def tiny_unet_pair(kind: str) -> tuple[UNet2DConditionModel, UNetModel]:
    ref = sx.tiny_sdxl(kind)["unet"]
    config = UNetConfig.from_diffusers(dict(ref.config))
    ours = UNetModel(config).eval()
    ours.load_state_dict(unet_from_diffusers(ref.state_dict(), config))
    return ref, ours


@pytest.mark.parametrize("kind", sx.KINDS)
@pytest.mark.parametrize("timestep", [981, 423.5, torch.tensor([999.0, 17.0])], ids=["int", "float", "per_sample"])
@torch.no_grad()
def test_tiny_sdxl_unet_equals_diffusers(kind, timestep):
    ref, ours = tiny_unet_pair(kind)
    x = added_inputs(2, sx.PROJECTION, sx.TIME_IDS[kind], sx.CONTEXT[kind], ref.config.in_channels)
    expected = ref(x["sample"], timestep, x["context"], added_cond_kwargs={
        "text_embeds": x["text_embeds"], "time_ids": x["time_ids"]}).sample
    assert_rel_close(ours(x["sample"], timestep, x["context"], text_embeds=x["text_embeds"], time_ids=x["time_ids"]),
                     expected, MAX_REL)


@torch.no_grad()
def test_the_time_ids_reach_the_prediction():
    """The micro-conditioning is not decoration: another crop gives another prediction."""
    _, ours = tiny_unet_pair("base")
    x = added_inputs(1, sx.PROJECTION, 6, sx.CONTEXT["base"])
    cropped = x["time_ids"].clone()
    cropped[:, 2:4] = torch.tensor([256.0, 128.0])
    a = ours(x["sample"], 500, x["context"], text_embeds=x["text_embeds"], time_ids=x["time_ids"])
    b = ours(x["sample"], 500, x["context"], text_embeds=x["text_embeds"], time_ids=cropped)
    assert max_rel_error(a, b) > 1e-2


def test_the_released_diffusers_configs_give_the_presets():
    """(The key maps of the presets are covered, parameter for parameter, in tests/test_unet.py.)"""
    assert UNetConfig.from_diffusers(reference.SDXL_BASE_UNET) == SDXL_BASE_UNET
    assert UNetConfig.from_diffusers(reference.SDXL_REFINER_UNET) == SDXL_REFINER_UNET
    assert SDXL_BASE_UNET.transformer_depth == (0, 2, 10) and SDXL_BASE_UNET.transformer_depth_middle == 10
    with torch.device("meta"):  # the sizes the SDXL paper states: 2.6 B parameters in the base UNet
        sizes = [sum(p.numel() for p in UNetModel(c).parameters()) for c in (SDXL_BASE_UNET, SDXL_REFINER_UNET)]
    assert sizes == [2_567_463_684, 2_259_526_660]


@torch.no_grad()
def test_added_conditions_are_checked():
    _, sdxl = tiny_unet_pair("base")
    x = added_inputs(1, sx.PROJECTION, 6, sx.CONTEXT["base"])
    with pytest.raises(ValueError, match="needs text_embeds"):
        sdxl(x["sample"], 500, x["context"])
    with pytest.raises(ValueError, match="give 1376 values; this UNet's label_emb takes 1632"):
        sdxl(x["sample"], 500, x["context"], text_embeds=x["text_embeds"], time_ids=x["time_ids"][:, :5])
    sd = UNetModel(replace(sdxl.config, adm_in_channels=None)).eval()
    with pytest.raises(ValueError, match="this UNet has no added embedding"):
        sd(x["sample"], 500, x["context"], text_embeds=x["text_embeds"], time_ids=x["time_ids"])


# ---------------------------------------------------------------- the two text towers


def tower_configs(ref: dict) -> tuple[TextEncoderConfig | None, TextEncoderConfig]:
    l_model, g_model = ref["text_encoder"], ref["text_encoder_2"]
    clip_l = None if l_model is None else TextEncoderConfig.from_transformers(l_model.config.to_dict(), 49407,
                                                                              sdxl=True)
    return clip_l, TextEncoderConfig.from_transformers(g_model.config.to_dict(), 0, sdxl=True, projection=True)


def dual_encoder(ref: dict) -> DualTextEncoder:
    clip_l, clip_g = tower_configs(ref)
    ours = DualTextEncoder(clip_l, clip_g).eval()
    if clip_l is not None:
        ours.clip_l.load_state_dict(text_from_transformers(ref["text_encoder"].state_dict(), clip_l))
    ours.clip_g.load_state_dict(text_from_transformers(ref["text_encoder_2"].state_dict(), clip_g))
    return ours


@torch.no_grad()
def test_tiny_text_towers_equal_transformers():
    """context = [ViT-L's hidden_states[-2]; bigG's hidden_states[-2]], pooled = bigG's text_embeds, as diffusers'
    StableDiffusionXLPipeline.encode_prompt reads them; prompt_2 goes to bigG."""
    ref = sx.tiny_sdxl("base")
    ours = dual_encoder(ref)
    context, pooled = ours(PROMPTS, PROMPTS_2)
    ids_l = ref["tokenizer"](PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    ids_g = ref["tokenizer_2"](PROMPTS_2, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    assert torch.equal(ours.clip_l.tokenize(PROMPTS), ids_l.input_ids)
    assert torch.equal(ours.clip_g.tokenize(PROMPTS_2), ids_g.input_ids)
    out_l = ref["text_encoder"](ids_l.input_ids, output_hidden_states=True)
    out_g = ref["text_encoder_2"](ids_g.input_ids, output_hidden_states=True)
    assert_rel_close(context, torch.cat([out_l.hidden_states[-2], out_g.hidden_states[-2]], dim=-1), MAX_REL)
    assert_rel_close(pooled, out_g.text_embeds, MAX_REL)


@torch.no_grad()
def test_refiner_text_tower_reads_prompt_with_bigg():
    ref = sx.tiny_sdxl("refiner")
    ours = dual_encoder(ref)
    context, pooled = ours(PROMPTS)
    ids = ref["tokenizer_2"](PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    out = ref["text_encoder_2"](ids.input_ids, output_hidden_states=True)
    assert_rel_close(context, out.hidden_states[-2], MAX_REL)
    assert_rel_close(pooled, out.text_embeds, MAX_REL)
    with pytest.raises(ValueError, match="prompts_2 has nowhere to go"):
        ours(PROMPTS, PROMPTS_2)


def test_projection_is_transposed_between_the_layouts():
    """open_clip applies x @ P, transformers a Linear with weight Pᵀ; the key map round-trips exactly."""
    ref = sx.tiny_sdxl("base")["text_encoder_2"]
    _, config = tower_configs(sx.tiny_sdxl("base"))
    open_clip = text_from_transformers(ref.state_dict(), config)
    assert open_clip["text_projection"].shape == (sx.WIDTH_G, sx.PROJECTION)
    torch.testing.assert_close(open_clip["text_projection"], ref.state_dict()["text_projection.weight"].T, rtol=0,
                               atol=0)
    back = text_to_transformers(open_clip, config, prefix=TRANSFORMERS_PREFIX)
    assert back.keys() == ref.state_dict().keys()
    assert all(torch.equal(back[k], v) for k, v in ref.state_dict().items())


# ---------------------------------------------------------------- recognising and loading files


def meta_shapes(config) -> tuple[dict, dict, dict | None, dict]:
    """(UNet, VAE, ViT-L in transformers' layout or None, bigG) shapes of a preset, as its file holds them."""
    with torch.device("meta"):
        unet, vae, text = UNetModel(config.unet), AutoencoderKL(**reference.SDXL_VAE), text_encoder_for(config)
        vae_shapes = vae_from_diffusers(vae.state_dict(), SDXL_VAE)
    shapes = lambda state: {k: tuple(v.shape) for k, v in state.items()}  # noqa: E731
    clip_l = None if text.clip_l is None else shapes(
        text_to_transformers(text.clip_l.state_dict(), config.text, prefix=TRANSFORMERS_PREFIX))
    return shapes(unet.state_dict()), shapes(vae_shapes), clip_l, shapes(text.clip_g.state_dict())


@pytest.mark.parametrize("name", SDXL_PRESETS)
def test_sdxl_presets_are_recognised_from_the_weights(name):
    preset = SDXL_PRESETS[name]
    assert sdxl_config_from_weights(*meta_shapes(preset), name=preset.name) == preset


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """kind -> (reference, folder, fp32 single file, fp16 single file)."""
    cache = {}

    def get(kind: str):
        if kind not in cache:
            ref = sx.tiny_sdxl(kind)
            root = tmp_path_factory.mktemp(f"sdxl_{kind}")
            cache[kind] = (ref, sx.save_sdxl_folder(ref, root / "folder"),
                           sx.save_sdxl_single_file(ref, root / f"{kind}.safetensors"),
                           sx.save_sdxl_single_file(ref, root / f"{kind}-fp16.ckpt", dtype=torch.float16))
        return cache[kind]
    return get


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("kind", sx.KINDS)
def test_folder_and_single_file_give_the_same_model(saved, kind):
    ref, folder, single, half = saved(kind)
    from_folder, from_single = load_components(folder), load_components(single)
    for part in ("unet", "vae", "text_encoder"):
        assert same_weights(getattr(from_folder, part), getattr(from_single, part)), part
    family = "sdxl_refiner" if kind == "refiner" else "sdxl"
    assert from_folder.config.family == from_single.config.family == family
    for field in ("unet", "vae", "text", "text_2", "force_zeros_for_empty_prompt", "prediction_type"):
        assert getattr(from_folder.config, field) == getattr(from_single.config, field), field
    assert from_single.config.force_zeros_for_empty_prompt == (kind != "refiner")
    assert from_single.config.vae.scaling_factor == 0.13025 and from_single.config.vae.force_upcast
    # the fp16 .ckpt read into fp32 holds the same weights rounded to fp16
    rounded = load_components(half)
    for ours, full in ((rounded.unet, from_single.unet), (rounded.text_encoder, from_single.text_encoder)):
        for (name, p), q in zip(ours.named_parameters(), full.parameters()):
            assert p.dtype == torch.float32 and torch.equal(p, q.half().float()), name


@pytest.mark.parametrize("kind", ["base", "refiner"])
def test_save_single_file_round_trips(saved, tmp_path, kind):
    _, folder, _, _ = saved(kind)
    components = load_components(folder)
    path = tmp_path / "round_trip.safetensors"
    save_single_file(components, path)
    assert not path.with_suffix(".yaml").exists()  # SDXL files need none
    again = load_components(path)
    for part in ("unet", "vae", "text_encoder"):
        assert same_weights(getattr(components, part), getattr(again, part)), part
    keys = open_weights(path).shapes
    for tower in TEXT_TOWERS["sdxl_refiner" if kind == "refiner" else "sdxl"]:  # sgm's names, as real files have
        assert any(k.startswith(tower.prefix) for k in keys), tower.prefix


def test_an_architecture_the_weights_cannot_describe_is_refused(saved, tmp_path):
    _, folder, _, _ = saved("base")
    components = load_components(folder)
    narrow = replace(components.config, unet=replace(components.config.unet, num_head_channels=32))
    with torch.device("meta"):
        unet = UNetModel(narrow.unet)
    with pytest.raises(ValueError, match="would not read back from its weights"):
        save_single_file(Components(unet, components.vae, components.text_encoder, components.scheduler, narrow),
                         tmp_path / "narrow.safetensors")
    assert not (tmp_path / "narrow.safetensors").exists()


# ---------------------------------------------------------------- errors name the file and the keys


@pytest.mark.parametrize("change, expected", [
    ("missing", "1 missing keys, first ['clip_g.transformer.resblocks.1.attn.out_proj.weight']"),
    ("unexpected", "1 unexpected keys, first ['clip_g.transformer.resblocks.1.extra']"),
    ("wrong_shape", "clip_g.transformer.resblocks.1.attn.out_proj.weight: (3, 3) here"),
])
def test_missing_unexpected_or_misshaped_text_keys_are_listed(tmp_path, change, expected):
    state = sx.sdxl_original_state_dict(sx.tiny_sdxl("base"))
    key = "conditioner.embedders.1.model.transformer.resblocks.1.attn.out_proj.weight"
    if change == "missing":
        del state[key]
    elif change == "unexpected":
        state["conditioner.embedders.1.model.transformer.resblocks.1.extra"] = torch.zeros(3)
    else:
        state[key] = torch.zeros(3, 3)
    path = fx.write_weights(state, tmp_path / "broken.safetensors")
    with pytest.raises(CheckpointError, match=r"broken.safetensors: text encoder.*" + re.escape(expected)):
        load_components(path)


def test_a_unet_key_missing_from_an_sdxl_file_is_named(tmp_path):
    state = sx.sdxl_original_state_dict(sx.tiny_sdxl("base"))
    del state["model.diffusion_model.label_emb.0.2.bias"]
    path = fx.write_weights(state, tmp_path / "broken.safetensors")
    with pytest.raises(CheckpointError, match=re.escape("1 missing keys, first ['label_emb.0.2.bias']")):
        load_components(path)


def test_truncated_sdxl_file(saved, tmp_path):
    _, _, single, _ = saved("base")
    path = tmp_path / "sd_xl_base_1.0.safetensors"
    path.write_bytes(single.read_bytes()[: single.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"sd_xl_base_1.0.safetensors: not a readable"):
        load_components(path)


def test_an_ldm_yaml_is_not_read_for_sdxl(saved, tmp_path, caplog):
    _, _, single, _ = saved("base")
    with pytest.raises(CheckpointError, match="an SDXL file is recognised from its weights"):
        load_components(single, original_config={"model": {}})
    path = tmp_path / "model.safetensors"
    path.write_bytes(single.read_bytes())
    path.with_suffix(".yaml").write_text("model: {}\n")
    with caplog.at_level(logging.WARNING):
        load_components(path)
    assert "not reading the yaml beside it" in caplog.text


def test_folder_whose_aesthetic_flag_contradicts_its_model(saved, tmp_path):
    ref, _, _, _ = saved("base")
    folder = sx.save_sdxl_folder(ref, tmp_path / "folder")
    index = folder / "model_index.json"
    index.write_text(json.dumps({**json.loads(index.read_text()), "requires_aesthetics_score": True}))
    with pytest.raises(CheckpointError, match="requires_aesthetics_score"):
        load_components(folder)


def test_fp16_sdxl_vae_runs_in_fp32(saved):
    """diffusers' force_upcast: the fp16 SDXL VAE decodes in fp32, on weights rounded to fp16."""
    _, folder, _, _ = saved("base")
    full = load_components(folder)
    model = DiffusionModel(load_components(folder), dtype=torch.float16)
    assert model.dtype == torch.float16 and next(model.text_encoder.parameters()).dtype == torch.float16
    for p, q in zip(model.vae.parameters(), full.vae.parameters()):
        assert p.dtype == torch.float32 and torch.equal(p, q.half().float())


# ---------------------------------------------------------------- full size, from an fp16 single file


@torch.no_grad()
def full_size_sdxl_file(path) -> dict:
    """A random full-size SDXL base as an fp16 single file (sgm's layout), and diffusers' / transformers' outputs
    on those weights. Each reference is built, run, reduced to fp16 tensors and freed before the next: the
    fp32 UNet alone is 10 GB."""
    gen = torch.Generator().manual_seed(0)
    x = added_inputs(1, 1280, 6, 2048, size=16)
    expected = dict(x, latent=torch.randn(1, 4, 16, 16, generator=gen))
    unet = reference.full_size(lambda: UNet2DConditionModel(**reference.SDXL_BASE_UNET), 1)
    expected["unet"] = unet(x["sample"], 701, x["context"], added_cond_kwargs={
        "text_embeds": x["text_embeds"], "time_ids": x["time_ids"]}).sample
    state = {f"model.diffusion_model.{k}": v.half() for k, v in
             unet_from_diffusers(unet.state_dict(), SDXL_BASE_UNET).items()}
    del unet
    vae = reference.full_size(lambda: AutoencoderKL(**reference.SDXL_VAE), 2)
    expected["decoded"] = vae.decode(expected["latent"]).sample
    state.update({f"first_stage_model.{k}": v.half()
                  for k, v in vae_from_diffusers(vae.state_dict(), SDXL_VAE).items()})
    del vae
    clip_l = reference.full_size(lambda: CLIPTextModel(CLIPTextConfig(**reference.SD15_TEXT)), 3)
    ids_l = fx.clip_tokenizer("sd1")(PROMPTS, padding="max_length", max_length=77, return_tensors="pt").input_ids
    expected["context_l"] = clip_l(ids_l, output_hidden_states=True).hidden_states[-2]
    state.update({f"conditioner.embedders.0.transformer.{TRANSFORMERS_PREFIX}{k}": v.half()
                  for k, v in clip_l.state_dict().items()})
    del clip_l
    clip_g = reference.full_size(lambda: CLIPTextModelWithProjection(CLIPTextConfig(**reference.SDXL_TEXT_2)), 4)
    ids_g = fx.clip_tokenizer("sd2")(PROMPTS_2, padding="max_length", max_length=77, return_tensors="pt").input_ids
    out = clip_g(ids_g, output_hidden_states=True)
    expected.update(context_g=out.hidden_states[-2], pooled=out.text_embeds)
    layout = {**text_from_transformers(clip_g.state_dict(), SDXL_BASE.text_2), "logit_scale": torch.tensor(4.6052)}
    state.update({f"conditioner.embedders.1.model.{k}": v.half() for k, v in layout.items()})
    del clip_g
    fx.write_weights(state, path)
    return expected


@pytest.mark.slow
@torch.no_grad()
def test_full_size_sdxl_base_from_an_fp16_single_file(tmp_path):
    path = tmp_path / "sd_xl_base_1.0.safetensors"
    expected = full_size_sdxl_file(path)
    components = load_components(path)  # read into fp32
    assert replace(components.config, name=SDXL_BASE.name) == SDXL_BASE
    assert all(p.dtype == torch.float32 for p in components.unet.parameters())
    x = expected
    ours = components.unet(x["sample"], 701, x["context"], text_embeds=x["text_embeds"], time_ids=x["time_ids"])
    assert_rel_close(ours, x["unet"], MAX_REL, "unet")
    del components.unet  # 10 GB freed before the text towers run
    context, pooled = components.text_encoder(PROMPTS, PROMPTS_2)
    assert_rel_close(context, torch.cat([x["context_l"], x["context_g"]], dim=-1), MAX_REL, "context")
    assert_rel_close(pooled, x["pooled"], MAX_REL, "pooled")
    assert_rel_close(components.vae.decode(x["latent"]), x["decoded"], MAX_REL, "vae decode")
