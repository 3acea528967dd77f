"""Load ControlNets offline: lllyasviel's original files and diffusers' ControlNetModel folders.

Our ControlNetModel carries cldm.py's names, so an original file (`control_model.*` keys, or the same keys bare
as in the v1.1 .pth files) loads by stripping the prefix, its architecture recognised from the shapes. A
diffusers folder goes through the UNet's rename table plus the ControlNet's own modules (keymaps.py).
v1.0 files bundle a whole SD checkpoint beside the ControlNet: those keys are reported, not loaded.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
import yaml

from ..models.controlnet import ControlNetConfig, ControlNetModel
from ..models.t2i_adapter import T2IAdapter
from ..models.unet import UNetConfig
from .configs import encoder_from_weights
from .keymaps import controlnet_from_diffusers, controlnet_key_pairs
from .loader import (FOLDER_WEIGHTS, CheckpointError, WeightsFile, _empty, _expected_shapes, _fill, _read_json,
                     check_keys, open_weights)

logger = logging.getLogger(__name__)

ORIGINAL_PREFIX = "control_model."
SUFFIXES = (".pth", ".pt", ".ckpt", ".safetensors", ".bin")
# what else a v1.0 ControlNet file holds: the SD checkpoint it was trained from
BUNDLED_SD_PREFIXES = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.", "model_ema.")


def load_controlnet(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                    global_pool_conditions: bool | None = None) -> ControlNetModel:
    """A ControlNetModel from a diffusers folder or a single file (original or diffusers-keyed).

    Args:
        global_pool_conditions: average each residual over the image (the shuffle models). None: a diffusers
            config's flag; for an original file, its yaml's `global_average_pooling` when a `<stem>.yaml` is
            beside it, else True exactly when the file name contains "shuffle" (as A1111's extension decides).
    """
    path = Path(path)
    if path.is_dir():
        return _load_folder(path, torch.device(device), dtype, global_pool_conditions)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such ControlNet file or folder")
    if path.suffix not in SUFFIXES:
        raise CheckpointError(f"{path}: unknown ControlNet file type {path.suffix!r}; expected one of {SUFFIXES} "
                              f"or a diffusers folder")
    f = open_weights(path)
    if "controlnet_cond_embedding.conv_in.weight" in f.shapes:  # diffusers' names in one file
        config_file = path.parent / "config.json"
        if not config_file.is_file():
            raise CheckpointError(f"{path}: a ControlNet in diffusers' layout needs its config.json beside it")
        return _from_diffusers(f, _read_json(config_file), torch.device(device), dtype, global_pool_conditions)
    return _load_original(f, torch.device(device), dtype, global_pool_conditions)


def load_control_model(path: str | Path, device: str | torch.device = "cpu",
                       dtype: torch.dtype = torch.float32) -> ControlNetModel | T2IAdapter:
    """A ControlNet or a T2I-Adapter, whichever the folder's config.json or the file's keys show."""
    path = Path(path)
    if path.is_dir():
        kind = _read_json(path / "config.json").get("_class_name") if (path / "config.json").is_file() else None
        adapter = kind == "T2IAdapter"
    elif path.is_file() and path.suffix in SUFFIXES:
        adapter = not any("input_hint_block." in k or k.startswith("controlnet_cond_embedding.")
                          for k in open_weights(path).shapes)
    else:
        raise FileNotFoundError(f"{path}: no ControlNet or T2I-Adapter file ({', '.join(SUFFIXES)}) or folder")
    return T2IAdapter.from_pretrained(path, device, dtype) if adapter else load_controlnet(path, device, dtype)


def _load_original(f: WeightsFile, device: torch.device, dtype: torch.dtype,
                   global_pool: bool | None) -> ControlNetModel:
    prefix = ORIGINAL_PREFIX if any(k.startswith(ORIGINAL_PREFIX) for k in f.shapes) else ""
    bundled = [k for k in f.shapes if k.startswith(BUNDLED_SD_PREFIXES)]
    if bundled:
        logger.warning("%s: also holds %d keys of an SD checkpoint (%s...); they are not loaded: load that model "
                       "with DiffusionModel.from_pretrained", f.path, len(bundled), bundled[0])
    shapes = {k: s for k, s in f.under(prefix).items() if prefix or not k.startswith(BUNDLED_SD_PREFIXES)}
    if "input_hint_block.0.weight" not in shapes:
        raise CheckpointError(f"{f.path}: not a ControlNet: no {prefix}input_hint_block.0.weight (the control-image "
                              f"embedding)")
    params = _yaml_params(f.path)
    try:
        config = _config_from_weights(shapes, _global_pool_of_original(f.path, global_pool, params), params)
    except ValueError as e:
        raise CheckpointError(f"{f.path}: {e}") from e
    model = _empty(ControlNetModel, config)
    check_keys(f"{f.path}: ControlNet (keys under {prefix!r})", _expected_shapes(model), shapes)
    return _fill(model, ((k, f.read(prefix + k, dtype)) for k in shapes), device, dtype)


def _config_from_weights(shapes: dict[str, tuple[int, ...]], global_pool: bool,
                         params: dict[str, Any]) -> ControlNetConfig:
    """The architecture from cldm's key names: the encoder as the UNet's, the hint embedding's widths, and the
    head layout, which weights cannot show: the yaml's (`params`) when one is beside the file, else SD's
    (SD 1.x: 8 heads with 1x1-conv projections; SD 2.x / SDXL: 64-channel heads, Linear)."""
    encoder = encoder_from_weights(shapes)
    heads = {"num_head_channels": 64} if encoder["use_linear_in_transformer"] else {"num_heads": 8}
    if {"num_heads", "num_head_channels"} & params.keys():
        heads = {"num_heads": params.get("num_heads", -1), "num_head_channels": params.get("num_head_channels", -1)}
    heads["upcast_attention"] = bool(params.get("upcast_attention", False))  # attention in fp32 under fp16
    adm = shapes.get("label_emb.0.0.weight")
    unet = UNetConfig(**encoder, out_channels=encoder["in_channels"], **heads,
                      adm_in_channels=None if adm is None else adm[1])
    convs = sorted((int(k.split(".")[1]), s) for k, s in shapes.items()
                   if k.startswith("input_hint_block.") and k.endswith(".weight"))
    return ControlNetConfig(unet, hint_channels=convs[0][1][1], embedding_channels=_hint_widths(convs),
                            global_pool_conditions=global_pool)


def _hint_widths(convs: list[tuple[int, tuple[int, ...]]]) -> tuple[int, ...]:
    """The widths of the hint embedding from its convolutions' shapes: the first, then each stride-2 one's."""
    outs = [shape[0] for _, shape in convs[:-1]]  # the last conv maps to the UNet's width
    return (outs[0], *outs[2::2])


def _yaml_params(path: Path) -> dict[str, Any]:
    """The ControlNet's parameters in the cldm yaml beside an original file (lllyasviel ships `<stem>.yaml`), or {}."""
    beside = path.with_suffix(".yaml")
    if not beside.is_file():
        return {}
    model = (yaml.safe_load(beside.read_text()) or {}).get("model", {})
    return model.get("params", {}).get("control_stage_config", {}).get("params", {})


def _global_pool_of_original(path: Path, given: bool | None, params: dict[str, Any]) -> bool:
    if given is not None:
        return given
    if params:
        return bool(params.get("global_average_pooling", False))
    if "shuffle" in path.name.lower():
        logger.info("%s: a shuffle ControlNet by its name: its residuals are averaged over the image", path)
        return True
    return False


def _load_folder(folder: Path, device: torch.device, dtype: torch.dtype,
                 global_pool: bool | None) -> ControlNetModel:
    config = _read_json(folder / "config.json")
    variants = (".fp16", "") if dtype == torch.float16 else ("", ".fp16")
    candidates = [folder / name.format(variant=v) for v in variants for name in FOLDER_WEIGHTS[::2]]
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        raise CheckpointError(f"{folder}: no ControlNet weights; expected one of {[p.name for p in candidates]}")
    return _from_diffusers(open_weights(path), config, device, dtype, global_pool)


def _from_diffusers(f: WeightsFile, config: dict[str, Any], device: torch.device, dtype: torch.dtype,
                    global_pool: bool | None) -> ControlNetModel:
    try:
        ours = controlnet_config_from_diffusers(config)
    except ValueError as e:
        raise CheckpointError(f"{f.path}: {e}") from e
    if global_pool is not None:
        ours = ControlNetConfig(ours.unet, ours.hint_channels, ours.embedding_channels, global_pool)
    model = _empty(ControlNetModel, ours)
    pairs = controlnet_key_pairs(ours)
    check_keys(f"{f.path}: diffusers ControlNet", {d: _expected_shapes(model)[o] for d, o in pairs}, f.shapes)
    state = controlnet_from_diffusers({k: f.read(k, dtype) for k in f.shapes}, ours)
    return _fill(model, state.items(), device, dtype)


def controlnet_config_from_diffusers(config: dict[str, Any]) -> ControlNetConfig:
    """Our ControlNetConfig from a diffusers ControlNetModel config.json."""
    if config.get("_class_name", "ControlNetModel") != "ControlNetModel":
        raise ValueError(f"config.json describes a {config['_class_name']}, not a ControlNetModel")
    if config.get("controlnet_conditioning_channel_order", "rgb") != "rgb":
        raise ValueError("controlnet_conditioning_channel_order 'bgr' is not supported; only 'rgb'")
    down = list(config["down_block_types"])
    up = [{"CrossAttnDownBlock2D": "CrossAttnUpBlock2D", "DownBlock2D": "UpBlock2D"}.get(t, t) for t in down[::-1]]
    unet = UNetConfig.from_diffusers({**config, "up_block_types": up, "out_channels": config.get("in_channels", 4)})
    return ControlNetConfig(unet, hint_channels=config.get("conditioning_channels", 3),
                            embedding_channels=tuple(config.get("conditioning_embedding_out_channels",
                                                                (16, 32, 96, 256))),
                            global_pool_conditions=bool(config.get("global_pool_conditions", False)))
