"""Checkpoints load into models equal to diffusers', from diffusers folders and original single files alike.

The single files are written by our own inverse key map and proven to be the original layout by
diffusers' own `from_single_file(..., config=<folder>)` reading back the very same weights.
"""
from __future__ import annotations

import logging
import re
import pickle
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml
from diffusers import (AutoencoderKL, StableDiffusionInpaintPipeline, StableDiffusionPipeline,
                       UNet2DConditionModel)
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModel

import checkpoint_fixtures as fx
import reference
from reference import full_size
from diffusion_core.checkpoints.configs import (PRESETS, SD15, SD15_INPAINT, SD2_INPAINT, SD21_768V, SD21_BASE,
                                                config_from_weights, sd_scheduler_config)
from diffusion_core.checkpoints.ldm_yaml import config_from_ldm_yaml, ldm_yaml_from_config
from diffusion_core.checkpoints.loader import (CheckpointError, load_components, original_state_dict,
                                               save_single_file)
from diffusion_core.checkpoints.keymaps import unet_from_diffusers, vae_from_diffusers
from diffusion_core.checkpoints.text_keys import TRANSFORMERS_PREFIX, text_from_transformers, text_to_transformers
from diffusion_core.models.text_encoder import SD2_TEXT, TextEncoder
from diffusion_core.models.unet import UNetConfig, UNetModel
from diffusion_core.models.vae import SD_VAE
from parity import assert_rel_close

MAX_REL = 1e-4
PROMPTS = ["a photograph of an astronaut riding a horse", "", "Hello, World!!! (masterpiece:1.2)",
           " ".join(f"word{i}" for i in range(90))]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """kind -> (reference, its diffusers folder, its single file with the yaml beside it), built once per kind."""
    cache = {}

    def get(kind: str):
        if kind not in cache:
            ref = fx.tiny_reference(kind)
            root = tmp_path_factory.mktemp(kind)
            folder = fx.save_diffusers_folder(ref, root / "folder")
            cache[kind] = ref, folder, fx.save_single_file_from_reference(ref, root / f"{kind}.safetensors")
        return cache[kind]
    return get


@torch.no_grad()
def assert_same_models(components, ref: dict) -> None:
    """UNet, VAE (posterior and decoding), tokenizer + text encoder and scheduler all equal the reference's."""
    gen = torch.Generator().manual_seed(0)
    unet = ref["unet"]
    sample = torch.randn(2, unet.config.in_channels, 16, 16, generator=gen)
    context = torch.randn(2, 77, unet.config.cross_attention_dim, generator=gen)
    assert_rel_close(components.unet(sample, 500, context), unet(sample, 500, context).sample, MAX_REL, "unet")
    image = torch.rand(2, 3, 32, 32, generator=gen) * 2 - 1
    expected, ours = ref["vae"].encode(image).latent_dist, components.vae.encode(image)
    assert_rel_close(ours.mean, expected.mean, MAX_REL, "vae mean")
    assert_rel_close(ours.logvar, expected.logvar, MAX_REL, "vae logvar")
    latent = torch.randn(2, 4, 8, 8, generator=gen)
    assert_rel_close(components.vae.decode(latent), ref["vae"].decode(latent).sample, MAX_REL, "vae decode")
    assert components.vae.scaling_factor == ref["vae"].config.scaling_factor
    ids = ref["tokenizer"](PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    assert torch.equal(components.text_encoder.tokenize(PROMPTS), ids)
    assert_rel_close(components.text_encoder(ids), ref["text_encoder"](ids).last_hidden_state, MAX_REL, "text")
    assert_same_scheduler(components.scheduler, ref["scheduler"])


def assert_same_scheduler(ours, theirs) -> None:
    assert type(ours).__name__ == type(theirs).__name__
    assert ours.config.prediction_type == theirs.config.prediction_type
    ours.set_timesteps(50)
    theirs.set_timesteps(50)
    torch.testing.assert_close(ours.timesteps, theirs.timesteps, rtol=0, atol=0, check_dtype=False)
    torch.testing.assert_close(ours.alphas_cumprod, theirs.alphas_cumprod, rtol=1e-6, atol=0)


def assert_same_weights(pipeline, ref: dict) -> None:
    for name in ("unet", "vae", "text_encoder"):
        loaded, expected = getattr(pipeline, name).state_dict(), ref[name].state_dict()
        assert loaded.keys() == expected.keys(), name
        for key in expected:
            assert torch.equal(loaded[key], expected[key]), f"{name}: {key}"


def diffusers_from_single_file(path: Path, folder: Path, ref: dict):
    """diffusers' own single-file loader, configured by the saved folder only (no network)."""
    pipeline_class = StableDiffusionInpaintPipeline if ref["unet"].config.in_channels == 9 else StableDiffusionPipeline
    return pipeline_class.from_single_file(str(path), config=str(folder), local_files_only=True)


# ---------------------------------------------------------------- both layouts, every kind


@pytest.mark.parametrize("kind", fx.KINDS)
def test_diffusers_folder_loads_equal_models(saved, kind):
    ref, folder, _ = saved(kind)
    components = load_components(folder)
    assert_same_models(components, ref)
    assert components.config.prediction_type == ref["prediction_type"]
    assert components.config.native_size == 64


@pytest.mark.parametrize("kind", fx.KINDS)
def test_single_file_is_the_original_layout(saved, kind):
    """diffusers reads our inverse key map's file back into exactly the reference weights."""
    ref, folder, path = saved(kind)
    assert_same_weights(diffusers_from_single_file(path, folder, ref), ref)


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
@pytest.mark.parametrize("kind", fx.KINDS)
def test_single_file_loads_equal_models(saved, tmp_path, kind, suffix):
    ref, _, _ = saved(kind)
    path = fx.save_single_file_from_reference(ref, tmp_path / f"model{suffix}")
    components = load_components(path)
    assert_same_models(components, ref)
    assert components.config.prediction_type == ref["prediction_type"]
    assert components.config.unet.upcast_attention == (kind == "sd2_v")
    assert components.config.scheduler == sd_scheduler_config(ref["prediction_type"])


@pytest.mark.parametrize("kind", fx.KINDS)
def test_save_single_file_is_read_back_by_diffusers_and_by_us(saved, tmp_path, kind):
    ref, folder, _ = saved(kind)
    components = load_components(folder)
    path = tmp_path / "saved.safetensors"
    save_single_file(components, path)
    assert_same_weights(diffusers_from_single_file(path, folder, ref), ref)
    again = load_components(path)
    assert replace(again.config, name="", scheduler={}) == replace(components.config, name="", scheduler={})
    assert_same_models(again, ref)


def test_original_config_argument_and_yaml_beside_the_file_agree(saved, tmp_path):
    ref, _, _ = saved("sd2_v")
    path = fx.save_single_file_from_reference(ref, tmp_path / "model.ckpt", write_yaml=False)
    yaml_path = tmp_path / "elsewhere.yaml"
    yaml_path.write_text(yaml.safe_dump(fx.ldm_yaml(ref)))
    by_path = load_components(path, original_config=yaml_path)
    by_dict = load_components(path, original_config=fx.ldm_yaml(ref))
    assert by_path.config == by_dict.config and by_path.config.prediction_type == "v_prediction"
    assert_same_models(by_path, ref)


# ---------------------------------------------------------------- what users' files look like


@pytest.mark.parametrize("use_ema", [True, False])
def test_ema_weights_are_used_unless_told_otherwise(saved, tmp_path, use_ema):
    ref, _, _ = saved("sd1")
    path = fx.save_single_file_from_reference(ref, tmp_path / "ema.ckpt", ema=True)
    components = load_components(path, use_ema=use_ema)
    raw = torch.load(path, weights_only=True)["state_dict"]
    loaded = components.unet.state_dict()
    if use_ema:
        assert_same_models(components, ref)
    for key, value in loaded.items():
        ema = raw["model_ema.diffusion_model" + key.replace(".", "")]
        assert torch.equal(value, ema if use_ema else raw["model.diffusion_model." + key]), key
    assert not torch.equal(raw["model.diffusion_model.out.2.weight"], raw["model_ema.diffusion_modelout2weight"])


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_fp16_file_loads_in_the_requested_dtype(saved, tmp_path, suffix):
    ref, _, _ = saved("sd2")
    path = fx.save_single_file_from_reference(ref, tmp_path / f"half{suffix}", dtype=torch.float16)
    half = fx.original_state_dict_from_reference(ref)
    for dtype in (torch.float32, torch.float16):
        components = load_components(path, dtype=dtype)
        ours = original_state_dict(components)
        for key, value in ours.items():
            expected = half[key].to(torch.float16).to(dtype)
            assert value.dtype == dtype and torch.equal(value, expected), key


def test_fp16_variant_folder_loads_in_either_dtype(saved, tmp_path):
    ref, folder, _ = saved("sd1")
    half_folder = fx.save_diffusers_folder(ref, tmp_path / "fp16")
    for part, name in (("unet", "diffusion_pytorch_model"), ("vae", "diffusion_pytorch_model"),
                       ("text_encoder", "model")):
        full = half_folder / part / f"{name}.safetensors"
        save_file({k: v.half() for k, v in load_file(full).items()}, half_folder / part / f"{name}.fp16.safetensors")
        full.unlink()
    for dtype in (torch.float32, torch.float16):
        components = load_components(half_folder, dtype=dtype)
        assert all(p.dtype == dtype for module in (components.unet, components.vae, components.text_encoder)
                   for p in module.parameters())
    reference = load_components(folder)
    rounded = load_components(half_folder)
    for ours, full in ((rounded.unet, reference.unet), (rounded.text_encoder, reference.text_encoder)):
        for (key, value), expected in zip(ours.state_dict().items(), full.state_dict().values()):
            assert torch.equal(value, expected.half().float()), key


@pytest.mark.parametrize("layout", ["transformers5", "transformers4_text_model_prefix"])
def test_folder_text_encoder_key_layouts(saved, tmp_path, layout):
    """transformers 4 saved CLIPTextModel under `text_model.`; transformers 5 saves without it."""
    ref, _, _ = saved("sd1")
    folder = fx.save_diffusers_folder(ref, tmp_path / layout)
    weights = folder / "text_encoder" / "model.safetensors"
    state = load_file(weights)
    assert not any(k.startswith(TRANSFORMERS_PREFIX) for k in state)
    if layout != "transformers5":
        save_file({TRANSFORMERS_PREFIX + k: v for k, v in state.items()}, weights)
    assert_same_models(load_components(folder), ref)


def test_folder_with_pickled_bin_weights(saved, tmp_path):
    """Folders saved before safetensors hold diffusion_pytorch_model.bin / pytorch_model.bin."""
    ref, _, _ = saved("sd2_v")
    folder = tmp_path / "bin"
    fx.diffusers_pipeline(ref).save_pretrained(folder, safe_serialization=False)
    text = folder / "text_encoder" / "model.safetensors"  # transformers 5 writes safetensors only: as transformers 4
    torch.save({TRANSFORMERS_PREFIX + k: v for k, v in load_file(text).items()}, text.with_name("pytorch_model.bin"))
    text.unlink()
    assert (folder / "unet" / "diffusion_pytorch_model.bin").is_file()
    assert not list(folder.glob("*/*.safetensors"))
    assert_same_models(load_components(folder), ref)


def test_vae_attention_stored_as_linear_weights(saved, tmp_path):
    """Some converted files hold the VAE's mid-block attention q/k/v/proj_out as Linear (C, C) weights."""
    ref, _, _ = saved("sd1")
    state = fx.original_state_dict_from_reference(ref)
    linear = [k for k in state if re.search(r"mid\.attn_1\.(q|k|v|proj_out)\.weight$", k)]
    assert len(linear) == 8
    state.update({k: state[k][:, :, 0, 0] for k in linear})
    path = fx.write_weights(state, tmp_path / "linear_attention.safetensors")
    (tmp_path / "linear_attention.yaml").write_text(yaml.safe_dump(fx.ldm_yaml(ref)))
    assert_same_models(load_components(path), ref)


@pytest.mark.parametrize("position_ids", ["int", "float", "missing"])
def test_position_ids_int_float_or_missing(saved, tmp_path, position_ids):
    ref, _, _ = saved("sd1")
    path = fx.save_single_file_from_reference(ref, tmp_path / "model.safetensors", position_ids=position_ids)
    key = "cond_stage_model.transformer.text_model.embeddings.position_ids"
    assert (key in load_file(path)) == (position_ids != "missing")
    assert_same_models(load_components(path), ref)


def test_prediction_type_overrides_the_file(saved, tmp_path):
    ref, folder, path = saved("sd2")
    for source in (folder, path):
        components = load_components(source, prediction_type="v_prediction")
        assert components.config.prediction_type == components.scheduler.config.prediction_type == "v_prediction"
        assert components.unet.config.upcast_attention
    with pytest.raises(ValueError, match="prediction_type 'sample'"):
        load_components(path, prediction_type="sample")


# ---------------------------------------------------------------- recognising files with no yaml


def full_size_shapes(config) -> tuple[dict, str, dict]:
    """(UNet shapes, text family, text shapes in the file's layout) of a preset, with no memory used."""
    with torch.device("meta"):
        unet = {k: tuple(v.shape) for k, v in UNetModel(config.unet).state_dict().items()}
        text = TextEncoder(config.text).state_dict()
    if config.family == "sd1":
        text = text_to_transformers(text, config.text, prefix=TRANSFORMERS_PREFIX)
    return unet, config.family, {k: tuple(v.shape) for k, v in text.items()}


@pytest.mark.parametrize("name", PRESETS)
def test_presets_are_recognised_from_the_weights(name, caplog):
    preset = PRESETS[name]
    global_step = 875000 if preset is SD21_BASE else 110000
    with caplog.at_level(logging.WARNING):
        assert config_from_weights(*full_size_shapes(preset), global_step=global_step) == preset
    assert ("guessing" in caplog.text) == (preset in (SD21_BASE, SD21_768V))


@pytest.mark.parametrize("prediction_type, preset", [("epsilon", SD21_BASE), ("v_prediction", SD21_768V)])
def test_sd2_prediction_type_chooses_base_or_768v(prediction_type, preset, caplog):
    with caplog.at_level(logging.WARNING):
        assert config_from_weights(*full_size_shapes(SD21_768V), prediction_type=prediction_type) == preset
    assert "guessing" not in caplog.text


def test_diffusers_style_sd2_file_with_23_text_blocks_reads_the_same_layer():
    unet, family, text = full_size_shapes(SD21_768V)
    text = {k: s for k, s in text.items() if not k.startswith("transformer.resblocks.23.")}
    config = config_from_weights(unet, family, text)
    assert (config.text.layers, config.text.layer_index) == (23, -1)


# The inference yamls of CompVis/stable-diffusion and Stability-AI/stablediffusion, their model sections verbatim
# (training-only sections left out).
V1_INFERENCE = """
model:
  base_learning_rate: 1.0e-04
  target: ldm.models.diffusion.ddpm.LatentDiffusion
  params:
    linear_start: 0.00085
    linear_end: 0.0120
    num_timesteps_cond: 1
    log_every_t: 200
    timesteps: 1000
    first_stage_key: "jpg"
    cond_stage_key: "txt"
    image_size: 64
    channels: 4
    cond_stage_trainable: false   # Note: different from the one we trained before
    conditioning_key: crossattn
    monitor: val/loss_simple_ema
    scale_factor: 0.18215
    use_ema: False

    unet_config:
      target: ldm.modules.diffusionmodules.openaimodel.UNetModel
      params:
        image_size: 32 # unused
        in_channels: 4
        out_channels: 4
        model_channels: 320
        attention_resolutions: [ 4, 2, 1 ]
        num_res_blocks: 2
        channel_mult: [ 1, 2, 4, 4 ]
        num_heads: 8
        use_spatial_transformer: True
        transformer_depth: 1
        context_dim: 768
        use_checkpoint: True
        legacy: False

    first_stage_config:
      target: ldm.models.autoencoder.AutoencoderKL
      params:
        embed_dim: 4
        monitor: val/rec_loss
        ddconfig:
          double_z: true
          z_channels: 4
          resolution: 256
          in_channels: 3
          out_ch: 3
          ch: 128
          ch_mult:
          - 1
          - 2
          - 4
          - 4
          num_res_blocks: 2
          attn_resolutions: []
          dropout: 0.0
        lossconfig:
          target: torch.nn.Identity

    cond_stage_config:
      target: ldm.modules.encoders.modules.FrozenCLIPEmbedder
"""
V2_INFERENCE_V = """
model:
  base_learning_rate: 1.0e-4
  target: ldm.models.diffusion.ddpm.LatentDiffusion
  params:
    parameterization: "v"
    linear_start: 0.00085
    linear_end: 0.0120
    num_timesteps_cond: 1
    log_every_t: 200
    timesteps: 1000
    first_stage_key: "jpg"
    cond_stage_key: "txt"
    image_size: 96
    channels: 4
    cond_stage_trainable: false
    conditioning_key: crossattn
    monitor: val/loss_simple_ema
    scale_factor: 0.18215
    use_ema: False # we set this to false because this is an inference only config

    unet_config:
      target: ldm.modules.diffusionmodules.openaimodel.UNetModel
      params:
        use_checkpoint: True
        use_fp16: True
        image_size: 32 # unused
        in_channels: 4
        out_channels: 4
        model_channels: 320
        attention_resolutions: [ 4, 2, 1 ]
        num_res_blocks: 2
        channel_mult: [ 1, 2, 4, 4 ]
        num_head_channels: 64 # need to fix for flash-attn
        use_spatial_transformer: True
        use_linear_in_transformer: True
        transformer_depth: 1
        context_dim: 1024
        legacy: False

    first_stage_config:
      target: ldm.models.autoencoder.AutoencoderKL
      params:
        embed_dim: 4
        monitor: val/rec_loss
        ddconfig:
          #attn_type: "vanilla-xformers"
          double_z: true
          z_channels: 4
          resolution: 256
          in_channels: 3
          out_ch: 3
          ch: 128
          ch_mult:
          - 1
          - 2
          - 4
          - 4
          num_res_blocks: 2
          attn_resolutions: []
          dropout: 0.0
        lossconfig:
          target: torch.nn.Identity

    cond_stage_config:
      target: ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder
      params:
        freeze: True
        layer: "penultimate"
"""
# v2-inference.yaml is v2-inference-v.yaml without `parameterization` and with image_size 64; the inpainting
# yamls change the model target, conditioning_key and in_channels.
V2_INFERENCE = V2_INFERENCE_V.replace('    parameterization: "v"\n', "").replace("image_size: 96", "image_size: 64")


def inpainting(text: str) -> str:
    return (text.replace("ddpm.LatentDiffusion", "ddpm.LatentInpaintDiffusion")
            .replace("conditioning_key: crossattn", "conditioning_key: hybrid")
            .replace("in_channels: 4", "in_channels: 9"))


@pytest.mark.parametrize("text, preset", [(V1_INFERENCE, SD15), (V2_INFERENCE_V, SD21_768V),
                                          (V2_INFERENCE, SD21_BASE), (inpainting(V1_INFERENCE), SD15_INPAINT),
                                          (inpainting(V2_INFERENCE), SD2_INPAINT)],
                         ids=["v1", "v2-v", "v2", "v1-inpainting", "v2-inpainting"])
def test_released_ldm_yamls_give_the_presets(text, preset):
    _, family, text_shapes = full_size_shapes(preset)
    config = config_from_ldm_yaml(yaml.safe_load(text), family, text_shapes, name=preset.name)
    # a yaml cannot say upcast_attention: loading turns it on for v-prediction
    assert config == replace(preset, unet=replace(preset.unet, upcast_attention=False))


@pytest.mark.parametrize("name", PRESETS)
def test_written_yaml_reads_back_as_the_preset(name):
    preset = PRESETS[name]
    _, family, text_shapes = full_size_shapes(preset)
    config = config_from_ldm_yaml(ldm_yaml_from_config(preset), family, text_shapes, name=preset.name)
    assert config == replace(preset, unet=replace(preset.unet, upcast_attention=False))


# ---------------------------------------------------------------- errors name the file and the keys


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.safetensors: no such file"):
        load_components(tmp_path / "nope.safetensors")


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
@pytest.mark.parametrize("damage", ["truncated", "text"])
def test_truncated_or_non_weights_file(saved, tmp_path, suffix, damage):
    ref, _, _ = saved("sd1")
    path = fx.save_single_file_from_reference(ref, tmp_path / f"model{suffix}", write_yaml=False)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"<html>404 Not Found</html>\n" * 40)
    with pytest.raises(CheckpointError, match=rf"model\{suffix}: not a readable"):
        load_components(path)


def test_unknown_file_type(tmp_path):
    path = tmp_path / "model.onnx"
    path.write_bytes(b"\0" * 16)
    with pytest.raises(CheckpointError, match=r"model.onnx: unknown file type '.onnx'"):
        load_components(path)


def test_unknown_layout_lists_the_first_keys(saved, tmp_path):
    _, folder, _ = saved("sd1")
    path = tmp_path / "unet_only.safetensors"
    path.write_bytes((folder / "unet" / "diffusion_pytorch_model.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match=r"unet_only.safetensors: unknown layout.*'conv_in.bias'"):
        load_components(path)


def test_unrecognised_architecture_without_yaml(saved, tmp_path):
    ref, _, _ = saved("sd1")
    path = fx.save_single_file_from_reference(ref, tmp_path / "tiny.safetensors", write_yaml=False)
    with pytest.raises(CheckpointError, match=r"tiny.safetensors: .*context width 128.*original_config"):
        load_components(path)


@pytest.mark.parametrize("change", ["missing", "unexpected", "wrong_shape"])
def test_missing_unexpected_or_misshaped_keys_are_listed(saved, tmp_path, change):
    ref, _, _ = saved("sd1")
    state = fx.original_state_dict_from_reference(ref)
    key = "model.diffusion_model.output_blocks.4.1.proj_out.weight"
    if change == "missing":
        del state[key]
    elif change == "unexpected":
        state["model.diffusion_model.output_blocks.4.1.extra.weight"] = torch.zeros(3)
    else:
        state[key] = torch.zeros(3, 3)
    path = fx.write_weights(state, tmp_path / "broken.safetensors")
    (tmp_path / "broken.yaml").write_text(yaml.safe_dump(fx.ldm_yaml(ref)))
    expected = {"missing": "1 missing keys, first ['output_blocks.4.1.proj_out.weight']",
                "unexpected": "1 unexpected keys, first ['output_blocks.4.1.extra.weight']",
                "wrong_shape": "output_blocks.4.1.proj_out.weight: (3, 3) here"}[change]
    with pytest.raises(CheckpointError, match=r"broken.safetensors: UNet.*" + re.escape(expected)):
        load_components(path)


def test_yaml_that_does_not_fit_the_weights(saved, tmp_path):
    ref, _, _ = saved("sd1")
    path = fx.save_single_file_from_reference(ref, tmp_path / "model.safetensors", write_yaml=False)
    sd2_yaml = fx.ldm_yaml(fx.tiny_reference("sd2"))
    with pytest.raises(CheckpointError, match="FrozenOpenCLIPEmbedder is sd2, but the weights hold a sd1"):
        load_components(path, original_config=sd2_yaml)
    wider = fx.ldm_yaml(ref)
    wider["model"]["params"]["unet_config"]["params"]["model_channels"] = 64
    with pytest.raises(CheckpointError, match=r"model.safetensors: UNet.*wrongly shaped keys"):
        load_components(path, original_config=wider)


def test_missing_ema_keys_are_listed(saved, tmp_path):
    ref, _, _ = saved("sd1")
    state = fx.original_state_dict_from_reference(ref)
    state.update(fx.ema_state_dict({k.removeprefix("model.diffusion_model."): v for k, v in state.items()
                                    if k.startswith("model.diffusion_model.")}))
    del state["model_ema.diffusion_modelout2bias"]
    path = fx.write_weights(state, tmp_path / "ema.safetensors")
    (tmp_path / "ema.yaml").write_text(yaml.safe_dump(fx.ldm_yaml(ref)))
    with pytest.raises(CheckpointError, match=r"ema.safetensors: UNet EMA.*\['model_ema.diffusion_modelout2bias'\]"):
        load_components(path)
    load_components(path, use_ema=False)


@pytest.mark.parametrize("damage", ["no_weights", "no_config", "unknown_scheduler"])
def test_broken_diffusers_folder(saved, tmp_path, damage):
    ref, _, _ = saved("sd1")
    folder = fx.save_diffusers_folder(ref, tmp_path / "folder")
    if damage == "no_weights":
        (folder / "vae" / "diffusion_pytorch_model.safetensors").unlink()
        match = r"folder/vae: no weights file; expected one of \['diffusion_pytorch_model.safetensors'"
    elif damage == "no_config":
        (folder / "unet" / "config.json").unlink()
        match = r"folder/unet/config.json: missing"
    else:
        index = (folder / "model_index.json").read_text().replace("PNDMScheduler", "LMSDiscreteScheduler")
        (folder / "model_index.json").write_text(index)
        match = r"model_index.json: scheduler is 'LMSDiscreteScheduler'; supported: \['DDPMScheduler'"
    with pytest.raises(CheckpointError, match=match):
        load_components(folder)


class _WritesMarker:
    """A pickle payload: unpickling it calls open(marker, "w"), creating the marker file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


@pytest.mark.parametrize("container", ["torch_zip", "plain_pickle"])
def test_pickle_that_would_run_code_is_refused(tmp_path, container):
    proof, marker = tmp_path / "proof", tmp_path / "marker"
    pickle.loads(pickle.dumps(_WritesMarker(proof)))  # the payload does run under plain pickle...
    assert proof.exists()
    payload = {"state_dict": {"model.diffusion_model.x": torch.zeros(2)}, "callback": _WritesMarker(marker)}
    path = tmp_path / "evil.ckpt"
    if container == "torch_zip":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload, protocol=2))  # how torch < 1.6 wrote .ckpt files
    with pytest.raises(CheckpointError, match=r"evil.ckpt: refused: .*could run code"):
        load_components(path)
    assert not marker.exists()  # ...and never under ours


# ---------------------------------------------------------------- full-size files, as users hold them


@torch.no_grad()
def full_size_file(path: Path, family: str, global_step: int | None = None) -> dict:
    """Write a random full-size SD1.5 / SD2.1 fp16 single file (no yaml); return diffusers' outputs on it.

    Models are built, run and freed one at a time to stay within a few GB.
    """
    gen = torch.Generator().manual_seed(0)
    inputs = dict(sample=torch.randn(1, 4, 8, 8, generator=gen),
                  context=torch.randn(1, 77, 768 if family == "sd1" else 1024, generator=gen),
                  image=torch.rand(1, 3, 64, 64, generator=gen) * 2 - 1, latent=torch.randn(1, 4, 8, 8, generator=gen))
    unet_config = reference.SD15_UNET if family == "sd1" else reference.SD21_UNET
    unet = full_size(lambda: UNet2DConditionModel(**unet_config), 1)
    expected = dict(inputs, unet=unet(inputs["sample"], 981, inputs["context"]).sample)
    state = {f"model.diffusion_model.{k}": v.half() for k, v in
             unet_from_diffusers(unet.state_dict(), UNetConfig.from_diffusers(dict(unet.config))).items()}
    del unet
    vae = full_size(lambda: AutoencoderKL(**reference.SD_VAE), 2)
    posterior = vae.encode(inputs["image"]).latent_dist
    expected.update(mean=posterior.mean, logvar=posterior.logvar, decoded=vae.decode(inputs["latent"]).sample)
    state.update({f"first_stage_model.{k}": v.half() for k, v in vae_from_diffusers(vae.state_dict(), SD_VAE).items()})
    del vae
    text_config = CLIPTextConfig(**(reference.SD15_TEXT if family == "sd1" else reference.SD21_TEXT))
    text_encoder = full_size(lambda: CLIPTextModel(text_config), 3)
    tokenizer = fx.clip_tokenizer(family)
    ids = tokenizer(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    expected.update(ids=ids, text=text_encoder(ids).last_hidden_state)
    text = {k: v.half() for k, v in text_encoder.state_dict().items()}
    del text_encoder
    if family == "sd1":  # transformers 4's names, float position ids as many fp16 files have them
        state.update({f"cond_stage_model.transformer.{TRANSFORMERS_PREFIX}{k}": v for k, v in text.items()})
        state["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77.0)[None].half()
    else:  # open_clip's names, with the 24th block SD2 never reads, the projection and the temperature
        layout = text_from_transformers(text, replace(SD2_TEXT, layers=23, layer_index=-1))
        gen = torch.Generator().manual_seed(4)
        for key in [k for k in layout if k.startswith("transformer.resblocks.22.")]:
            layout[key.replace(".22.", ".23.")] = torch.randn(layout[key].shape, generator=gen).half()
        layout.update(text_projection=torch.randn(1024, 1024, generator=gen).half(), logit_scale=torch.tensor(4.6))
        state.update({f"cond_stage_model.model.{k}": v for k, v in layout.items()})
    fx.write_weights(state, path, global_step)
    return expected


@torch.no_grad()
def assert_full_size_outputs(components, expected: dict) -> None:
    assert all(p.dtype == torch.float32 for p in components.unet.parameters())
    ours = components.unet(expected["sample"], 981, expected["context"])
    assert_rel_close(ours, expected["unet"], MAX_REL, "unet")
    posterior = components.vae.encode(expected["image"])
    assert_rel_close(posterior.mean, expected["mean"], MAX_REL, "vae mean")
    assert_rel_close(posterior.logvar, expected["logvar"], MAX_REL, "vae logvar")
    assert_rel_close(components.vae.decode(expected["latent"]), expected["decoded"], MAX_REL, "vae decode")
    assert torch.equal(components.text_encoder.tokenize(PROMPTS), expected["ids"])
    assert_rel_close(components.text_encoder(PROMPTS), expected["text"], MAX_REL, "text")


@pytest.mark.slow
def test_full_size_sd15_fp16_safetensors_without_yaml(tmp_path):
    path = tmp_path / "v1-5-pruned-emaonly-fp16.safetensors"
    expected = full_size_file(path, "sd1")
    assert not path.with_suffix(".yaml").exists()
    components = load_components(path)
    assert replace(components.config, name=SD15.name) == SD15
    assert_full_size_outputs(components, expected)


@pytest.mark.slow
def test_full_size_sd21_fp16_ckpt_without_yaml(tmp_path, caplog):
    path = tmp_path / "v2-1_768-ema-pruned.ckpt"
    expected = full_size_file(path, "sd2", global_step=110000)
    with caplog.at_level(logging.WARNING):
        components = load_components(path)
    assert "global_step=110000: guessing v_prediction" in caplog.text
    assert replace(components.config, name=SD21_768V.name) == SD21_768V
    assert_full_size_outputs(components, expected)
