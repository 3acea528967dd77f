"""Load Stable Diffusion checkpoints, original single files and diffusers folders, with no network.

Our modules carry the original LDM names, so a single file loads by stripping its prefixes
(`model.diffusion_model.`, `first_stage_model.`, and the text towers' of TEXT_TOWERS); a diffusers folder
goes through the declarative key maps of keymaps.py and text_keys.py. A `.ckpt` is read with
`torch.load(weights_only=True)` only: a checkpoint never runs code.
"""
from __future__ import annotations

import json
import logging
import pickle
import zipfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import save_file
from torch import nn

from ..models.text_encoder import DualTextEncoder, TextEncoder, TextEncoderConfig
from ..models.unet import UNetConfig, UNetModel
from ..models.vae import VAE, VAEConfig
from ..schedulers import NoiseScheduler, scheduler_class
from .configs import ModelConfig, config_from_weights, sdxl_config_from_weights
from .keymaps import unet_from_diffusers, vae_from_diffusers
from .ldm_yaml import config_from_ldm_yaml, ldm_yaml_from_config
from .text_keys import TRANSFORMERS_PREFIX, text_from_open_clip, text_from_transformers, text_to_transformers

logger = logging.getLogger(__name__)

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."


@dataclass(frozen=True)
class TextTower:
    """Where one text tower lives: in our text encoder's state dict, in an original file, and in ModelConfig."""

    module: str   # our key prefix: "" for SD's one encoder, "clip_l." / "clip_g." in SDXL's DualTextEncoder
    prefix: str   # the original file's key prefix
    layout: str   # the file's layout: "transformers" (CLIPTextModel) or "open_clip" (its text tower)
    config: str   # the ModelConfig field that describes it: "text" or "text_2"


# Each family's text towers in an original file. LDM's FrozenCLIPEmbedder holds transformers' CLIPTextModel,
# FrozenOpenCLIPEmbedder open_clip's tower; sgm's GeneralConditioner numbers its embedders in its yaml's order.
TEXT_TOWERS = {
    "sd1": (TextTower("", "cond_stage_model.transformer.", "transformers", "text"),),
    "sd2": (TextTower("", "cond_stage_model.model.", "open_clip", "text"),),
    "sdxl": (TextTower("clip_l.", "conditioner.embedders.0.transformer.", "transformers", "text"),
             TextTower("clip_g.", "conditioner.embedders.1.model.", "open_clip", "text_2")),
    "sdxl_refiner": (TextTower("clip_g.", "conditioner.embedders.0.model.", "open_clip", "text_2"),),
}
# LDM's LitEma keeps a copy of each UNet parameter as a buffer named without dots:
# model.diffusion_model.input_blocks.0.0.weight -> model_ema.diffusion_modelinput_blocks00weight
EMA_PREFIX = "model_ema.diffusion_model"
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")

# diffusers' scheduler classes -> our sampler names
SAMPLER_OF_CLASS = {"DDPMScheduler": "ddpm", "DDIMScheduler": "ddim", "PNDMScheduler": "pndm",
                    "EulerDiscreteScheduler": "euler", "EulerAncestralDiscreteScheduler": "euler_a",
                    "DPMSolverMultistepScheduler": "dpmpp_2m", "UniPCMultistepScheduler": "unipc"}
# diffusers folder component -> the classes model_index.json may name for it
_TOKENIZERS = ("CLIPTokenizer", "CLIPTokenizerFast")
FOLDER_CLASSES = {"unet": ("UNet2DConditionModel",), "vae": ("AutoencoderKL",), "text_encoder": ("CLIPTextModel",),
                  "tokenizer": _TOKENIZERS, "scheduler": tuple(SAMPLER_OF_CLASS),
                  "text_encoder_2": ("CLIPTextModelWithProjection",), "tokenizer_2": _TOKENIZERS}  # the last two: SDXL
# weight file names in a diffusers folder, most wanted first; "{variant}" is "" or ".fp16"
FOLDER_WEIGHTS = ("diffusion_pytorch_model{variant}.safetensors", "model{variant}.safetensors",
                  "diffusion_pytorch_model{variant}.bin", "pytorch_model{variant}.bin")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file and what was wrong."""


@dataclass
class Components:
    """The three networks of a checkpoint, its default scheduler and the config that rebuilds them."""

    unet: UNetModel
    vae: VAE
    text_encoder: TextEncoder | DualTextEncoder  # SDXL: both CLIP towers (the refiner: bigG alone)
    scheduler: NoiseScheduler
    config: ModelConfig


def text_encoder_for(config: ModelConfig) -> TextEncoder | DualTextEncoder:
    """The text encoder module of a config: one CLIP (SD 1.x / 2.x) or SDXL's two."""
    return TextEncoder(config.text) if config.text_2 is None else DualTextEncoder(config.text, config.text_2)


def load_components(path: str | Path, original_config: str | Path | Mapping | None = None, device: str |
                    torch.device = "cpu", dtype: torch.dtype = torch.float32, prediction_type: str | None = None,
                    use_ema: bool = True) -> Components:
    """Load a diffusers folder or an original single file (.safetensors / .ckpt) into our modules.

    Args:
        path: a diffusers folder (model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/),
            or one file in the original LDM layout.
        original_config: the LDM yaml (path or parsed dict) describing a single file's architecture. Without
            it, `<file stem>.yaml` beside the file is used if present, else SD 1.x / 2.x / inpainting are
            recognised from the weights.
        device, dtype: where the weights go; fp16 files are cast to `dtype`.
        prediction_type: "epsilon" or "v_prediction", overriding the file's guess or the folder's scheduler.
        use_ema: use a single file's EMA weights (`model_ema.*`) when it has them.
    """
    path = Path(path)
    if prediction_type not in (None, "epsilon", "v_prediction"):
        raise ValueError(f"prediction_type {prediction_type!r} is not one of None, 'epsilon', 'v_prediction'")
    if path.is_dir():
        if original_config is not None:
            raise ValueError(f"{path}: original_config applies to single files; a diffusers folder has its configs")
        return _load_folder(path, torch.device(device), dtype, prediction_type)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file or folder; expected a diffusers folder or a "
                                f"{' / '.join(SINGLE_FILE_SUFFIXES)} file")
    if path.suffix not in SINGLE_FILE_SUFFIXES:
        raise CheckpointError(f"{path}: unknown file type {path.suffix!r}; expected "
                              f"{' or '.join(SINGLE_FILE_SUFFIXES)}, or a diffusers folder")
    return _load_single_file(path, original_config, torch.device(device), dtype, prediction_type, use_ema)


# ---------------------------------------------------------------- reading weights files


@dataclass
class WeightsFile:
    """A weights file opened for reading: every tensor's shape at once, each tensor's data on demand."""

    path: Path
    shapes: dict[str, tuple[int, ...]]
    read: Callable[[str, torch.dtype | None], torch.Tensor]  # (key, dtype): the tensor, floats cast to dtype
    global_step: int | None = None  # the training step a Lightning .ckpt records, if any

    def under(self, prefix: str) -> dict[str, tuple[int, ...]]:
        """Shapes of the keys starting with `prefix`, the prefix removed."""
        return {k[len(prefix):]: s for k, s in self.shapes.items() if k.startswith(prefix)}


def open_weights(path: Path) -> WeightsFile:
    """Open a .safetensors file, or a torch pickle (.ckpt, .bin) under weights_only=True."""
    return _open_safetensors(path) if path.suffix == ".safetensors" else _open_pickle(path)


# safetensors' dtype names (https://github.com/huggingface/safetensors, "Format")
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}


def _open_safetensors(path: Path) -> WeightsFile:
    """Parse the header (8-byte length, then JSON: name -> dtype, shape, byte range); read tensors on demand.

    Tensors are read with plain file reads into their final memory, not through a memory map, and a
    tensor stored in another dtype passes through one reused buffer: nothing of the file stays resident,
    so peak memory is the model plus its largest tensor.
    """
    size = path.stat().st_size
    try:
        with open(path, "rb") as file:
            header_size = int.from_bytes(file.read(8), "little")
            if not 2 <= header_size <= size - 8:
                raise ValueError(f"header of {header_size} bytes in a file of {size}")
            header = json.loads(file.read(header_size))
        header.pop("__metadata__", None)
        entries = {k: (SAFETENSORS_DTYPES[e["dtype"]], tuple(e["shape"]), *e["data_offsets"])
                   for k, e in header.items()}
        end = max((stop for *_, stop in entries.values()), default=0)
        if 8 + header_size + end != size:
            raise ValueError(f"the header covers {8 + header_size + end} bytes, the file has {size}")
    except (ValueError, KeyError, TypeError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise CheckpointError(f"{path}: not a readable .safetensors file (truncated, or not weights): {e}") from e

    staging = [torch.empty(0, dtype=torch.uint8)]

    def read(key: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        stored, shape, start, stop = entries[key]
        cast = dtype is not None and stored.is_floating_point and dtype != stored
        if cast:
            if staging[0].numel() < stop - start:
                staging[0] = torch.empty(stop - start, dtype=torch.uint8)
            raw = staging[0][: stop - start]
        else:
            out = torch.empty(shape, dtype=stored)
            raw = out.reshape(-1).view(torch.uint8)
        with open(path, "rb") as file:
            file.seek(8 + header_size + start)
            file.readinto(raw.numpy())
        return raw.view(stored).reshape(shape).to(dtype) if cast else out

    return WeightsFile(path, {k: shape for k, (_, shape, *_) in entries.items()}, read)


def _open_pickle(path: Path) -> WeightsFile:
    is_zip = zipfile.is_zipfile(path)  # torch >= 1.6 writes a zip archive; older torch a bare pickle
    with open(path, "rb") as file:
        is_pickle = file.read(1) == pickle.PROTO
    if not (is_zip or is_pickle):
        raise CheckpointError(f"{path}: not a readable checkpoint (truncated, or not a weights file): "
                              f"neither a zip archive nor a pickle")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip)  # a zip is memory-mapped
    except pickle.UnpicklingError as e:
        reason = next((line for line in str(e).splitlines() if "GLOBAL" in line or "Unsupported" in line), "")
        raise CheckpointError(f"{path}: refused: it holds more than tensors and plain data, and unpickling it "
                              f"could run code (only torch.load(weights_only=True) is used). {reason.strip()} "
                              f"Convert the file to .safetensors with a tool you trust.") from e
    except Exception as e:  # a damaged archive raises whatever its first bad byte triggers
        raise CheckpointError(f"{path}: not a readable checkpoint (truncated, or not a weights file): "
                              f"{type(e).__name__}: {e}") from e
    global_step = obj.get("global_step") if isinstance(obj, dict) else None
    while isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):  # Lightning nests the weights
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a dict of named tensors")
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}

    def read(key: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        tensor = tensors[key]
        return tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor

    return WeightsFile(path, {k: tuple(v.shape) for k, v in tensors.items()}, read,
                       global_step if isinstance(global_step, int) else None)


def check_keys(what: str, expected: Mapping[str, tuple[int, ...]], found: Mapping[str, tuple[int, ...]]) -> None:
    """Raise a CheckpointError listing the first missing, unexpected and wrongly shaped keys, if any."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    wrong = [f"{k}: {tuple(found[k])} here, {tuple(expected[k])} expected" for k in expected
             if k in found and tuple(found[k]) != tuple(expected[k])]
    problems = [f"{len(keys)} {name} keys, first {keys[:5]}" for name, keys in
                (("missing", missing), ("unexpected", unexpected), ("wrongly shaped", wrong)) if keys]
    if problems:
        raise CheckpointError(f"{what}: " + "; ".join(problems))


# ---------------------------------------------------------------- building modules


def _empty(module_class: Callable[[Any], nn.Module], config: Any) -> nn.Module:
    """The module with its parameters on the meta device: no memory, no random init (seconds for SD's UNet)."""
    with torch.device("meta"):
        return module_class(config)


def _expected_shapes(module: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def _fill(module: nn.Module, tensors: Iterable[tuple[str, torch.Tensor]], device: torch.device,
          dtype: torch.dtype) -> nn.Module:
    """Give a meta-device module its weights (checked beforehand), cast to dtype on device.

    `tensors` may be a generator reading from the file: each is cast as it comes, and the file's copy freed.
    """
    module.load_state_dict({k: t.to(device, dtype) if t.is_floating_point() else t.to(device)
                            for k, t in tensors}, assign=True)
    return module.eval()


# ---------------------------------------------------------------- single files


def _read_yaml(original_config: str | Path | Mapping) -> tuple[Mapping, str]:
    if isinstance(original_config, Mapping):
        return original_config, "original_config"
    source = Path(original_config)
    if not source.is_file():
        raise FileNotFoundError(f"{source}: no such LDM yaml (original_config)")
    return yaml.safe_load(source.read_text()), str(source)


def _single_file_config(f: WeightsFile, original_config: str | Path | Mapping | None, family: str,
                        prediction_type: str | None) -> ModelConfig:
    """The architecture from the yaml (given, or beside the file), else recognised from the weights."""
    beside = f.path.with_suffix(".yaml")
    if family.startswith("sdxl"):
        return _sdxl_single_file_config(f, original_config, family, prediction_type)
    if original_config is None and beside.is_file():
        logger.info("%s: using the LDM yaml beside it, %s", f.path, beside)
        original_config = beside
    text_shapes = f.under(TEXT_TOWERS[family][0].prefix)
    if original_config is None:
        try:
            config = config_from_weights(f.under(UNET_PREFIX), family, text_shapes, f.global_step, prediction_type)
        except ValueError as e:
            raise CheckpointError(f"{f.path}: {e}") from e
        logger.info("%s: recognised %s from its weights", f.path, config.name)
        return replace(config, name=f.path.stem)
    original, source = _read_yaml(original_config)
    try:
        config = config_from_ldm_yaml(original, family, text_shapes, name=f.path.stem)
    except (KeyError, TypeError) as e:
        raise CheckpointError(f"{source}: not an LDM yaml for {f.path}: missing or malformed {e}") from e
    except ValueError as e:
        raise CheckpointError(f"{source} (for {f.path}): {e}") from e
    return replace(config, prediction_type=prediction_type) if prediction_type else config


def _sdxl_single_file_config(f: WeightsFile, original_config: str | Path | Mapping | None, family: str,
                             prediction_type: str | None) -> ModelConfig:
    """SDXL files carry everything their architecture needs in their shapes; no yaml is read."""
    if original_config is not None:
        raise CheckpointError(f"{f.path}: an SDXL file is recognised from its weights; original_config (an LDM yaml) "
                              f"describes SD 1.x / 2.x only. Use prediction_type= for a v-prediction SDXL model")
    if f.path.with_suffix(".yaml").is_file():
        logger.warning("%s: not reading the yaml beside it: SDXL files are recognised from their weights (pass "
                       "prediction_type='v_prediction' if that yaml says parameterization: v)", f.path)
    towers = {tower.config: f.under(tower.prefix) for tower in TEXT_TOWERS[family]}
    try:
        config = sdxl_config_from_weights(f.under(UNET_PREFIX), f.under(VAE_PREFIX), towers.get("text"),
                                          towers["text_2"], prediction_type or "epsilon", name=f.path.stem)
    except ValueError as e:
        raise CheckpointError(f"{f.path}: {e}") from e
    logger.info("%s: recognised %s from its weights", f.path, family)
    return config


def _unet_sources(f: WeightsFile, expected: Mapping[str, tuple[int, ...]], use_ema: bool) -> dict[str, str]:
    """Our UNet key -> the file's key holding its weights: the EMA copy when there is one and it is wanted."""
    check_keys(f"{f.path}: UNet (keys under {UNET_PREFIX!r})", expected, f.under(UNET_PREFIX))
    if not (use_ema and any(k.startswith(EMA_PREFIX) for k in f.shapes)):
        return {k: UNET_PREFIX + k for k in expected}
    sources = {k: EMA_PREFIX + k.replace(".", "") for k in expected}
    check_keys(f"{f.path}: UNet EMA weights (use_ema=False to use the raw ones)",
               {sources[k]: s for k, s in expected.items()},
               {sources[k]: f.shapes[sources[k]] for k in expected if sources[k] in f.shapes})
    logger.info("%s: using the EMA weights (model_ema.*); use_ema=False uses the raw ones", f.path)
    return sources


def _vae_tensor(f: WeightsFile, key: str, expected: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    tensor = f.read(VAE_PREFIX + key, dtype)
    # some converted files store the mid-block attention's 1x1 convs as Linear (C, C): the same map
    return tensor[:, :, None, None] if tensor.ndim == 2 and len(expected) == 4 else tensor


def _single_file_text(f: WeightsFile, family: str, config: ModelConfig,
                      dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Every text tower's weights in open_clip's names, under our module prefixes."""
    out = {}
    for tower in TEXT_TOWERS[family]:
        raw = {k: f.read(tower.prefix + k, dtype) for k in f.under(tower.prefix)}
        tower_config = getattr(config, tower.config)
        try:
            tensors = (text_from_transformers(raw, tower_config) if tower.layout == "transformers"
                       else text_from_open_clip(raw, tower_config))
        except ValueError as e:
            raise CheckpointError(f"{f.path}: text encoder (keys under {tower.prefix!r}): {e}") from e
        out.update({tower.module + k: v for k, v in tensors.items()})
    return out


def _load_single_file(path: Path, original_config: str | Path | Mapping | None, device: torch.device,
                      dtype: torch.dtype, prediction_type: str | None, use_ema: bool) -> Components:
    f = open_weights(path)
    families = [family for family, towers in TEXT_TOWERS.items() if all(f.under(t.prefix) for t in towers)]
    if not f.under(UNET_PREFIX) or not f.under(VAE_PREFIX) or len(families) != 1:
        towers = " or ".join(" + ".join(t.prefix for t in towers) for towers in TEXT_TOWERS.values())
        raise CheckpointError(f"{path}: unknown layout: an original SD checkpoint has keys under each of "
                              f"{[UNET_PREFIX, VAE_PREFIX, towers]}; this file's first keys are {sorted(f.shapes)[:5]}")
    family = families[0]
    config = _single_file_config(f, original_config, family, prediction_type)
    if config.prediction_type == "v_prediction":  # SD2-768-v overflows fp16 attention without the upcast
        config = replace(config, unet=replace(config.unet, upcast_attention=True))

    unet = _empty(UNetModel, config.unet)
    sources = _unet_sources(f, _expected_shapes(unet), use_ema)
    unet = _fill(unet, ((k, f.read(source, dtype)) for k, source in sources.items()), device, dtype)

    vae = _empty(VAE, config.vae)
    expected = _expected_shapes(vae)
    found = {k: s + (1, 1) if len(s) == 2 and len(expected.get(k, ())) == 4 else s
             for k, s in f.under(VAE_PREFIX).items()}
    check_keys(f"{path}: VAE (keys under {VAE_PREFIX!r})", expected, found)
    vae = _fill(vae, ((k, _vae_tensor(f, k, s, dtype)) for k, s in expected.items()), device, dtype)

    text_encoder = _empty(text_encoder_for, config)
    tensors = _single_file_text(f, family, config, dtype)
    prefixes = " and ".join(repr(t.prefix) for t in TEXT_TOWERS[family])
    check_keys(f"{path}: text encoder (keys under {prefixes}, in open_clip's names)",
               _expected_shapes(text_encoder), {k: tuple(t.shape) for k, t in tensors.items()})
    text_encoder = _fill(text_encoder, tensors.items(), device, dtype)
    return Components(unet, vae, text_encoder, _scheduler(config), config)


def _scheduler(config: ModelConfig) -> NoiseScheduler:
    return scheduler_class(config.scheduler_name).from_config(config.scheduler)


# ---------------------------------------------------------------- diffusers folders


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; a diffusers folder has model_index.json and "
                              f"{', '.join(f'{c}/' for c in FOLDER_CLASSES)}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON: {e}") from e


def _folder_weights(folder: Path, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """All tensors of a component folder's weights file; the fp16 variant first when fp16 is wanted."""
    variants = (".fp16", "") if dtype == torch.float16 else ("", ".fp16")
    candidates = [folder / name.format(variant=v) for v in variants for name in FOLDER_WEIGHTS]
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        raise CheckpointError(f"{folder}: no weights file; expected one of {[p.name for p in candidates]}")
    f = open_weights(path)
    return {k: f.read(k, dtype) for k in f.shapes}


def _pad_token_id(tokenizer: Path) -> int:
    """The id of the folder's pad token: "<|endoftext|>" (49407) for SD1, "!" (0) for SD2."""
    settings = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):  # newer transformers write only the second
        if (tokenizer / name).is_file():
            settings.update(_read_json(tokenizer / name))
    pad = settings.get("pad_token")
    pad = pad.get("content") if isinstance(pad, dict) else pad
    if (tokenizer / "vocab.json").is_file():  # the slow tokenizer's files, as SD's published folders hold
        vocab = _read_json(tokenizer / "vocab.json")
    else:  # transformers 5 saves only the fast tokenizer's tokenizer.json
        vocab = _read_json(tokenizer / "tokenizer.json")["model"]["vocab"]
    if pad not in vocab:
        raise CheckpointError(f"{tokenizer}: pad_token {pad!r} is not in its vocabulary")
    return vocab[pad]


def _declared(index: dict[str, Any], component: str) -> str | None:
    """The class model_index.json names for a component (None when absent or null, as the refiner's text_encoder)."""
    return (index.get(component) or [None, None])[1]


def _folder_config(folder: Path, prediction_type: str | None) -> ModelConfig:
    index = _read_json(folder / "model_index.json")
    sdxl = _declared(index, "text_encoder_2") is not None
    required = ["unet", "vae", "scheduler", *(["text_encoder_2", "tokenizer_2"] if sdxl else []),
                *(["text_encoder", "tokenizer"] if not sdxl or _declared(index, "text_encoder") else [])]
    for component in required:
        if _declared(index, component) not in FOLDER_CLASSES[component]:
            raise CheckpointError(f"{folder / 'model_index.json'}: {component} is {_declared(index, component)!r}; "
                                  f"supported: {list(FOLDER_CLASSES[component])}")
    unet_json, vae_json = _read_json(folder / "unet/config.json"), _read_json(folder / "vae/config.json")
    scheduler_json = _read_json(folder / "scheduler/scheduler_config.json")
    try:
        unet, vae = UNetConfig.from_diffusers(unet_json), VAEConfig.from_diffusers(vae_json)
        text = text_2 = None
        if "text_encoder" in required:
            text = TextEncoderConfig.from_transformers(_read_json(folder / "text_encoder/config.json"),
                                                       _pad_token_id(folder / "tokenizer"), sdxl=sdxl)
        if sdxl:  # diffusers' SDXL pipelines: the fp16 VAE upcasts unless its config says not to
            text_2 = TextEncoderConfig.from_transformers(_read_json(folder / "text_encoder_2/config.json"),
                                                         _pad_token_id(folder / "tokenizer_2"), sdxl=True,
                                                         projection=True)
            vae = replace(vae, force_upcast=vae_json.get("force_upcast", True))
            if index.get("requires_aesthetics_score", False) != (text is None):
                raise CheckpointError(f"{folder / 'model_index.json'}: requires_aesthetics_score is "
                                      f"{index.get('requires_aesthetics_score')}, but only a refiner (no text_encoder) "
                                      f"is conditioned on an aesthetic score")
        scheduler = {k: v for k, v in scheduler_json.items() if not k.startswith("_")}
        return ModelConfig(name=folder.name, unet=unet, vae=vae, text=text,
                           prediction_type=prediction_type or scheduler.get("prediction_type", "epsilon"),
                           native_size=unet_json.get("sample_size", 64) * 2 ** (len(vae.ch_mult) - 1),
                           scheduler=scheduler, scheduler_name=SAMPLER_OF_CLASS[scheduler_json["_class_name"]],
                           default_guidance=5.0 if sdxl else 7.5, text_2=text_2,
                           force_zeros_for_empty_prompt=sdxl and index.get("force_zeros_for_empty_prompt", True))
    except CheckpointError:
        raise
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"{folder}: {type(e).__name__}: {e}") from e


# diffusers folder component holding each of our text modules' weights
FOLDER_TEXT = {"": ("text_encoder", "text"), "clip_l.": ("text_encoder", "text"), "clip_g.": ("text_encoder_2", "text_2")}


def _load_folder(folder: Path, device: torch.device, dtype: torch.dtype, prediction_type: str | None) -> Components:
    config = _folder_config(folder, prediction_type)
    if config.prediction_type == "v_prediction":
        config = replace(config, unet=replace(config.unet, upcast_attention=True))
    modules = [name for name in (("clip_l.", "clip_g.") if config.text_2 else ("",))
               if getattr(config, FOLDER_TEXT[name][1]) is not None]
    try:
        unet_weights = unet_from_diffusers(_folder_weights(folder / "unet", dtype), config.unet)
        vae_weights = vae_from_diffusers(_folder_weights(folder / "vae", dtype), config.vae)
        text_weights = {}
        for module in modules:
            part, field = FOLDER_TEXT[module]
            tensors = text_from_transformers(_folder_weights(folder / part, dtype), getattr(config, field))
            text_weights.update({module + k: v for k, v in tensors.items()})
    except CheckpointError:
        raise
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"{folder}: {e}") from e
    built = []
    for module_class, module_config, weights, part in ((UNetModel, config.unet, unet_weights, "unet"),
                                                       (VAE, config.vae, vae_weights, "vae"),
                                                       (text_encoder_for, config, text_weights, "text encoder")):
        module = _empty(module_class, module_config)
        check_keys(f"{folder}: {part}", _expected_shapes(module), {k: tuple(t.shape) for k, t in weights.items()})
        built.append(_fill(module, weights.items(), device, dtype))
    return Components(*built, _scheduler(config), config)


# ---------------------------------------------------------------- writing single files


def original_state_dict(components: Components) -> dict[str, torch.Tensor]:
    """All weights under the original LDM names, as SD's own training code saves them."""
    config = components.config
    state = {UNET_PREFIX + k: v for k, v in components.unet.state_dict().items()}
    state.update({VAE_PREFIX + k: v for k, v in components.vae.state_dict().items()})
    ours = components.text_encoder.state_dict()
    for tower in TEXT_TOWERS[config.family]:
        text = {k[len(tower.module):]: v for k, v in ours.items() if k.startswith(tower.module)}
        if tower.layout == "transformers":  # LDM files hold CLIPTextModel as transformers 4 named it
            tower_config = getattr(config, tower.config)
            text = text_to_transformers(text, tower_config, prefix=TRANSFORMERS_PREFIX)
            text[TRANSFORMERS_PREFIX + "embeddings.position_ids"] = torch.arange(tower_config.context_length)[None]
        state.update({tower.prefix + k: v for k, v in text.items()})
    return state


def save_single_file(components: Components, path: str | Path, dtype: torch.dtype | None = None,
                     write_yaml: bool = True) -> None:
    """Write the components as one original-layout file (.safetensors, or .ckpt with a `state_dict`).

    Args:
        dtype: cast the weights (e.g. torch.float16 halves the file); None keeps them as they are.
        write_yaml: SD 1.x / 2.x: also write `<stem>.yaml`, the LDM config load_components reads beside the
            file, so the architecture and prediction type survive the round trip. SDXL files need none: their
            architecture is checked to read back from the weights, and what they cannot carry is logged.
    """
    path = Path(path)
    if path.suffix not in SINGLE_FILE_SUFFIXES:
        raise ValueError(f"{path}: a single file ends in {' or '.join(SINGLE_FILE_SUFFIXES)}")
    config = components.config
    sdxl = config.family.startswith("sdxl")
    original = ldm_yaml_from_config(config) if write_yaml and not sdxl else None
    state = original_state_dict(components)
    if sdxl:
        _check_sdxl_round_trip(state, config, path)
    state = {k: v.detach().to("cpu", dtype if dtype is not None and v.is_floating_point() else v.dtype).contiguous()
             for k, v in state.items()}
    if path.suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save({"state_dict": state}, path)
    if original is not None:
        path.with_suffix(".yaml").write_text(yaml.safe_dump(original, sort_keys=False))


def _check_sdxl_round_trip(state: dict[str, torch.Tensor], config: ModelConfig, path: Path) -> None:
    """Refuse an SDXL architecture its weights cannot describe; name the settings a reader must give again."""
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    under = {prefix: {k[len(prefix):]: s for k, s in shapes.items() if k.startswith(prefix)}
             for prefix in (UNET_PREFIX, VAE_PREFIX, *(t.prefix for t in TEXT_TOWERS[config.family]))}
    towers = {t.config: under[t.prefix] for t in TEXT_TOWERS[config.family]}
    read = sdxl_config_from_weights(under[UNET_PREFIX], under[VAE_PREFIX], towers.get("text"), towers["text_2"],
                                    config.prediction_type)
    unet = replace(config.unet, upcast_attention=False)
    vae = replace(config.vae, scaling_factor=read.vae.scaling_factor, force_upcast=read.vae.force_upcast)
    if (read.unet, read.vae, read.text, read.text_2) != (unet, vae, config.text, config.text_2):
        raise ValueError(f"{path}: an SDXL single file carries no config, and this architecture would not read back "
                         f"from its weights (SDXL files have 64-channel heads and 32 GroupNorm groups)")
    lost = {name: value for name, value, default in (
        ("prediction_type", config.prediction_type, "epsilon"),
        ("VAE scaling_factor", config.vae.scaling_factor, read.vae.scaling_factor),
        ("scheduler", config.scheduler, read.scheduler)) if value != default}
    if lost:
        logger.warning("%s: an SDXL file does not record %s; whoever loads it must set them again", path, lost)
