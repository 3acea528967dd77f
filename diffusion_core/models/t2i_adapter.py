"""T2I-Adapter (Mou et al. 2023, arXiv:2302.08453): steering a frozen UNet with a small image network.

The idea in three lines (§3.2-3.3):
  1. pixel-unshuffle the control image (sketch, edges, depth, pose, colour) to latent resolution, so each
     feature pixel sees its d×d patch of image pixels as channels;
  2. a small stack of residual blocks reads it once and gives one feature map F_c^i per UNet level,
     at that level's width and resolution;
  3. at every denoising step the UNet adds ω·F_c^i to its encoder features at level i (eq. 5:
     F̂_enc^i = F_enc^i + F_c^i); the features do not depend on the step, so they are computed once.

Unlike ControlNet (models/controlnet.py) the adapter never sees the noisy latent, the timestep or the prompt:
about 77M parameters against ControlNet's 361M, run once per image, not once per step. Where the UNet adds
the features is models/unet.py's `adapter_features` (diffusers' `down_intrablock_additional_residuals`).

Three architectures, diffusers' `adapter_type`s:
  "full_adapter"     SD 1.x/2.x: unshuffle ×8, conv_in, 4 levels of ResnetBlocks, each level after the first
                     downsampled by 2 (TencentARC's `Adapter`).
  "full_adapter_xl"  SDXL: unshuffle ×16, the same blocks, one downsample only (at the third level): SDXL's
                     UNet has 3 levels, and the fourth feature joins its middle block.
  "light_adapter"    SD 1.x: no conv_in; each level a 1x1 conv down to a quarter width, ResnetBlocks there and
                     a 1x1 conv back out (TencentARC's `Adapter_light`, the colour adapter).

Names: our modules carry TencentARC's original names (ldm/modules/encoders/adapter.py): `conv_in`, then
`body.N` a flat list of ResnetBlocks (`in_conv`, `block1`, `block2`; level i's blocks are N = i·n ... i·n+n-1),
or, for the light adapter, `body.i` one `extractor` per level (`in_conv`, `body.j.block1/block2`, `out_conv`).
So an original .pth loads as it is, and a diffusers T2IAdapter loads through one rename table
(`diffusers_module_pairs`), the same mapping as diffusers' scripts/convert_original_t2iadapter.py.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

logger = logging.getLogger(__name__)

ADAPTER_TYPES = ("full_adapter", "full_adapter_xl", "light_adapter")


@dataclass(frozen=True)
class T2IAdapterConfig:
    """A T2I-Adapter's architecture in diffusers' terms (a T2IAdapter config.json)."""

    in_channels: int = 3                # control-image channels: 3 (canny, depth, pose, colour...), 1 (sketch)
    channels: tuple[int, ...] = (320, 640, 1280, 1280)  # width per level (light: the last level repeats the last)
    num_res_blocks: int = 2             # ResnetBlocks per level
    downscale_factor: int = 8           # pixel-unshuffle factor: 8 gives SD's latent resolution, 16 SDXL's half
    adapter_type: str = "full_adapter"  # one of ADAPTER_TYPES

    def __post_init__(self):
        object.__setattr__(self, "channels", tuple(self.channels))  # JSON gives a list
        if self.adapter_type not in ADAPTER_TYPES:
            raise ValueError(f"T2I-Adapter config: adapter_type {self.adapter_type!r} is not one of {ADAPTER_TYPES}")

    @classmethod
    def from_diffusers(cls, config: dict[str, Any]) -> T2IAdapterConfig:
        """Read a diffusers T2IAdapter config.json (absent keys take diffusers' defaults)."""
        if config.get("_class_name", "T2IAdapter") != "T2IAdapter":
            raise ValueError(f"config.json describes a {config['_class_name']}, not a T2IAdapter")
        return cls(in_channels=config.get("in_channels", 3), channels=config.get("channels", cls.channels),
                   num_res_blocks=config.get("num_res_blocks", 2),
                   downscale_factor=config.get("downscale_factor", 8),
                   adapter_type=config.get("adapter_type", "full_adapter"))

    @property
    def family(self) -> str:
        """The UNets the features fit: "sdxl" for full_adapter_xl, else "sd1/sd2" (both have SD 1.x's widths)."""
        return "sdxl" if self.adapter_type == "full_adapter_xl" else "sd1/sd2"

    @property
    def unshuffled_channels(self) -> int:
        """Channels after pixel-unshuffle: each of the image's channels becomes d² channels."""
        return self.in_channels * self.downscale_factor ** 2

    def levels(self) -> list[tuple[int, int, bool]]:
        """(width in, width out, halve the resolution first) for each level, i.e. for each output feature."""
        c = self.channels
        if self.adapter_type == "light_adapter":
            widths = [*c, c[-1]]  # diffusers' LightAdapter adds a fourth level at the last width
            return [(self.unshuffled_channels if i == 0 else widths[i - 1], w, i > 0) for i, w in enumerate(widths)]
        if self.adapter_type == "full_adapter_xl":  # SDXL: features at 1/16, 1/16, 1/32, 1/32 of the image
            return [(c[max(i - 1, 0)], w, i == 2) for i, w in enumerate(c)]
        return [(c[max(i - 1, 0)], w, i > 0) for i, w in enumerate(c)]  # 1/8, 1/16, 1/32, 1/64

    @property
    def total_downscale_factor(self) -> int:
        """Image pixels per pixel of the last feature, per side."""
        return self.downscale_factor * 2 ** sum(down for *_, down in self.levels())


# diffusers' defaults for each type, as TencentARC's released adapters use them
FULL_ADAPTER = T2IAdapterConfig()                                              # t2iadapter_canny_sd14v1 etc.
SKETCH_ADAPTER = T2IAdapterConfig(in_channels=1)                               # t2iadapter_sketch_sd14v1/sd15v2
FULL_ADAPTER_XL = T2IAdapterConfig(downscale_factor=16, adapter_type="full_adapter_xl")  # t2i-adapter-*-sdxl-1.0
LIGHT_ADAPTER = T2IAdapterConfig(channels=(320, 640, 1280), num_res_blocks=4, adapter_type="light_adapter")  # color


def pixel_unshuffle(image: torch.Tensor, d: int) -> torch.Tensor:
    """Fold each d×d patch into channels, as torch's PixelUnshuffle (channel index c·d² + row·d + column)."""
    return rearrange(image, "b c (h p) (w q) -> b (c p q) h w", p=d, q=d)  # (B, C·d², H/d, W/d)


def downsample(x: torch.Tensor) -> torch.Tensor:
    """Halve the resolution by 2x2 averaging; an odd size rounds up, as diffusers' AvgPool2d(ceil_mode=True)
    (TencentARC's rounds down: the two agree on every even size)."""
    return F.avg_pool2d(x, kernel_size=2, stride=2, ceil_mode=True)


class ResnetBlock(nn.Module):
    """The full adapter's block: [↓2] [1x1 conv to a new width], then x + conv1x1(ReLU(conv3x3(x))).

    TencentARC's ResnetBlock as every released adapter builds it (sk=True, ksize=1, use_conv=False: no skip
    convolution `skep`, pooling rather than a strided conv `down_opt.op`); diffusers' AdapterResnetBlock, with
    AdapterBlock's in_conv and downsample folded into the first block of a level.
    """

    def __init__(self, in_channels: int, out_channels: int, down: bool):
        super().__init__()
        self.down = down
        self.in_conv = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None
        self.block1 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.act = nn.ReLU()
        self.block2 = nn.Conv2d(out_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.down:
            x = downsample(x)
        if self.in_conv is not None:
            x = self.in_conv(x)
        return self.block2(self.act(self.block1(x))) + x


class LightResnetBlock(nn.Module):
    """The light adapter's block: x + conv3x3(ReLU(conv3x3(x))) (TencentARC's ResnetBlock_light)."""

    def __init__(self, channels: int):
        super().__init__()
        self.block1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.act = nn.ReLU()
        self.block2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block2(self.act(self.block1(x))) + x


class Extractor(nn.Module):
    """One light-adapter level: [↓2], 1x1 conv to a quarter of the width, ResnetBlocks there, 1x1 conv back out
    (TencentARC's `extractor`; diffusers' LightAdapterBlock)."""

    def __init__(self, in_channels: int, out_channels: int, num_res_blocks: int, down: bool):
        super().__init__()
        inner = out_channels // 4
        self.down = down
        self.in_conv = nn.Conv2d(in_channels, inner, 1)
        self.body = nn.Sequential(*[LightResnetBlock(inner) for _ in range(num_res_blocks)])
        self.out_conv = nn.Conv2d(inner, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.down:
            x = downsample(x)
        return self.out_conv(self.body(self.in_conv(x)))


class T2IAdapter(nn.Module):
    """The adapter: control image -> one feature map per UNet level (TencentARC's Adapter / Adapter_light)."""

    def __init__(self, config: T2IAdapterConfig = FULL_ADAPTER):
        super().__init__()
        self.config = c = config
        if c.adapter_type == "light_adapter":
            self.body = nn.ModuleList([Extractor(w_in, w_out, c.num_res_blocks, down)
                                       for w_in, w_out, down in c.levels()])
            self.blocks_per_level = 1
        else:
            self.conv_in = nn.Conv2d(c.unshuffled_channels, c.channels[0], 3, padding=1)
            # flat, as in the original files: a level's first block changes the width and the resolution
            self.body = nn.ModuleList([ResnetBlock(w_in if j == 0 else w_out, w_out, down and j == 0)
                                       for w_in, w_out, down in c.levels() for j in range(c.num_res_blocks)])
            self.blocks_per_level = c.num_res_blocks

    @property
    def family(self) -> str:
        """"sd1/sd2" or "sdxl": the UNets whose levels these features fit."""
        return self.config.family

    @property
    def unet_families(self) -> tuple[str, ...]:
        """The model families (DiffusionModel.config.family) this adapter can steer."""
        return ("sdxl",) if self.config.family == "sdxl" else ("sd1", "sd2")

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                        config: T2IAdapterConfig | None = None) -> T2IAdapter:
        """Load a diffusers T2IAdapter folder, a diffusers-keyed single file, or TencentARC's original files
        (t2iadapter_*_sd14v1.pth, *_sd15v2.pth, .safetensors).

        Args:
            path: the folder (config.json + diffusion_pytorch_model[.fp16].safetensors or .bin) or the file.
            device, dtype: where and in which precision the weights go.
            config: the architecture, overriding the folder's config.json or what a single file's shapes say.
        """
        return load_t2i_adapter(path, device=device, dtype=dtype, config=config)

    def forward(self, image: torch.Tensor) -> list[torch.Tensor]:
        """The features F_c (one per level, finest first) of a control image (B, in_channels, H, W) in [0, 1]:
        diffusers' T2IAdapter(image). Scaling them (ω, the adapter's strength) is the caller's."""
        c = self.config
        if image.ndim != 4 or image.shape[1] != c.in_channels:
            raise ValueError(f"T2I-Adapter: expected a control image (B, {c.in_channels}, H, W), got "
                             f"{tuple(image.shape)}; this adapter reads {c.in_channels}-channel images")
        if image.shape[-2] % c.downscale_factor or image.shape[-1] % c.downscale_factor:
            raise ValueError(f"T2I-Adapter: image size {tuple(image.shape[-2:])} is not a multiple of the "
                             f"pixel-unshuffle factor {c.downscale_factor}")
        x = pixel_unshuffle(image.to(next(self.parameters()).dtype), c.downscale_factor)
        if c.adapter_type != "light_adapter":
            x = self.conv_in(x)
        features = []
        for n, block in enumerate(self.body, start=1):
            x = block(x)
            if n % self.blocks_per_level == 0:  # the last block of a level
                features.append(x)
        return features


# ---------------------------------------------------------------- the diffusers rename table


def diffusers_module_pairs(config: T2IAdapterConfig) -> list[tuple[str, str]]:
    """(diffusers module, our = TencentARC module) for every convolution; parameters add .weight/.bias to both."""
    n, pairs = config.num_res_blocks, []
    convs = ("block1", "block2")
    if config.adapter_type == "light_adapter":
        for i, _ in enumerate(config.levels()):
            pairs += [(f"adapter.body.{i}.in_conv", f"body.{i}.in_conv"),
                      (f"adapter.body.{i}.out_conv", f"body.{i}.out_conv")]
            pairs += [(f"adapter.body.{i}.resnets.{j}.{k}", f"body.{i}.body.{j}.{k}") for j in range(n) for k in convs]
        return pairs
    pairs.append(("adapter.conv_in", "conv_in"))
    for i, (w_in, w_out, _) in enumerate(config.levels()):
        if w_in != w_out:  # diffusers' AdapterBlock.in_conv is the level's first ResnetBlock's
            pairs.append((f"adapter.body.{i}.in_conv", f"body.{i * n}.in_conv"))
        pairs += [(f"adapter.body.{i}.resnets.{j}.{k}", f"body.{i * n + j}.{k}") for j in range(n) for k in convs]
    return pairs


def diffusers_key_pairs(config: T2IAdapterConfig) -> list[tuple[str, str]]:
    """(diffusers parameter, our parameter) for every weight and bias."""
    return [(f"{d}.{p}", f"{o}.{p}") for d, o in diffusers_module_pairs(config) for p in ("weight", "bias")]


# ---------------------------------------------------------------- loading

SUFFIXES = (".pth", ".pt", ".ckpt", ".bin", ".safetensors")
FOLDER_WEIGHTS = ("diffusion_pytorch_model{}.safetensors", "diffusion_pytorch_model{}.bin")
# the keys that name each layout's kind of adapter
ORIGINAL_FULL, ORIGINAL_LIGHT = ("conv_in.weight", "body.0.block1.weight"), ("body.0.in_conv.weight",
                                                                             "body.0.body.0.block1.weight")
DIFFUSERS_FULL, DIFFUSERS_LIGHT = ("adapter.conv_in.weight",), ("adapter.body.0.in_conv.weight",
                                                                "adapter.body.0.out_conv.weight")


def load_t2i_adapter(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                     config: T2IAdapterConfig | None = None) -> T2IAdapter:
    """A T2IAdapter from a diffusers folder or a single file; see T2IAdapter.from_pretrained."""
    from ..checkpoints.loader import CheckpointError
    path = Path(path)
    if path.is_dir():
        config = config or T2IAdapterConfig.from_diffusers(_read_config(path / "config.json"))
        return _load(_open(_folder_weights(path, dtype)), config, "diffusers", torch.device(device), dtype)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such T2I-Adapter file or folder")
    if path.suffix not in SUFFIXES:
        raise CheckpointError(f"{path}: unknown T2I-Adapter file type {path.suffix!r}; expected one of {SUFFIXES} "
                              f"or a diffusers folder")
    f = _open(path)
    layout = _layout(f.path, f.shapes)
    if config is None:
        try:
            config = (config_from_diffusers_weights if layout == "diffusers" else config_from_original)(f.shapes)
        except ValueError as e:
            raise CheckpointError(f"{path}: {e}") from e
        logger.info("%s: a %s T2I-Adapter (%s layout): %s", path, config.adapter_type, layout, config)
    return _load(f, config, layout, torch.device(device), dtype)


def _layout(path: Path, shapes: dict[str, tuple[int, ...]]) -> str:
    """"diffusers" or "original" by the keys; anything else is refused, naming what it looks like."""
    from ..checkpoints.loader import CheckpointError
    if all(k in shapes for k in DIFFUSERS_FULL) or all(k in shapes for k in DIFFUSERS_LIGHT):
        return "diffusers"
    if all(k in shapes for k in ORIGINAL_FULL) or all(k in shapes for k in ORIGINAL_LIGHT):
        return "original"
    keys = list(shapes)
    looks = ("a ControlNet (load it with ControlNetModel.from_pretrained)"
             if any("input_hint_block" in k or "controlnet_cond_embedding" in k for k in keys) else
             "a UNet or SD checkpoint" if any(k.startswith(("model.diffusion_model.", "down_blocks.", "input_blocks."))
                                              for k in keys) else "something else")
    raise CheckpointError(f"{path}: not a T2I-Adapter: none of {ORIGINAL_FULL}, {ORIGINAL_LIGHT} (TencentARC) or "
                          f"{DIFFUSERS_FULL}, {DIFFUSERS_LIGHT} (diffusers); its {len(keys)} keys, first "
                          f"{keys[:3]}, look like {looks}")


def config_from_original(shapes: dict[str, tuple[int, ...]]) -> T2IAdapterConfig:
    """The architecture of a TencentARC file from its shapes.

    Full: level 1's first block is the first with an `in_conv` (the width changes), so its index is
    num_res_blocks; a level's width is its first block's. Light: one `extractor` per level, the last repeating
    the width before it. In both, conv_in's input width c·d² gives the image channels c and the unshuffle d.
    """
    if "conv_in.weight" in shapes:
        blocks = _count(shapes, "body.{}.block1.weight")
        starts = [k for k in range(1, blocks) if f"body.{k}.in_conv.weight" in shapes]
        if not starts or blocks % starts[0]:
            raise ValueError(f"{blocks} ResnetBlocks with in_conv at {starts}: cannot tell where levels begin; "
                             f"pass config=")
        n = starts[0]
        channels = [shapes[f"body.{k}.block1.weight"][0] for k in range(0, blocks, n)]
        return _with_unshuffle(shapes["conv_in.weight"][1], channels, n, light=False)
    levels, n = _count(shapes, "body.{}.out_conv.weight"), _count(shapes, "body.0.body.{}.block1.weight")
    channels = [shapes[f"body.{i}.out_conv.weight"][0] for i in range(levels - 1)]
    return _with_unshuffle(shapes["body.0.in_conv.weight"][1], channels, n, light=True)


def config_from_diffusers_weights(shapes: dict[str, tuple[int, ...]]) -> T2IAdapterConfig:
    """The architecture of a diffusers-keyed file without its config.json, from its shapes."""
    levels = _count(shapes, "adapter.body.{}.resnets.0.block1.weight")
    n = _count(shapes, "adapter.body.0.resnets.{}.block1.weight")
    if "adapter.conv_in.weight" in shapes:
        channels = [shapes[f"adapter.body.{i}.resnets.0.block1.weight"][0] for i in range(levels)]
        return _with_unshuffle(shapes["adapter.conv_in.weight"][1], channels, n, light=False)
    channels = [shapes[f"adapter.body.{i}.out_conv.weight"][0] for i in range(levels - 1)]
    return _with_unshuffle(shapes["adapter.body.0.in_conv.weight"][1], channels, n, light=True)


def _count(shapes: dict[str, tuple[int, ...]], key: str) -> int:
    """How many consecutive indices 0, 1, 2, ... have key.format(index) in the file."""
    n = 0
    while key.format(n) in shapes:
        n += 1
    return n


def _with_unshuffle(unshuffled: int, channels: list[int], n: int, light: bool) -> T2IAdapterConfig:
    """Split conv_in's input width into c·d² (c: 1 or 3 image channels, d: 8 or 16); d = 16 means SDXL, as in
    every released adapter (ComfyUI decides the same way)."""
    split = [(c, d) for d in (8, 16) for c in (3, 1) if c * d * d == unshuffled]
    if not split:
        raise ValueError(f"the first convolution takes {unshuffled} channels, not 1 or 3 image channels "
                         f"unshuffled by 8 or 16 (c·d²); pass config=")
    (c, d), = split
    kind = "light_adapter" if light else "full_adapter_xl" if d == 16 else "full_adapter"
    return T2IAdapterConfig(in_channels=c, channels=tuple(channels), num_res_blocks=n, downscale_factor=d,
                            adapter_type=kind)


def _load(f, config: T2IAdapterConfig, layout: str, device: torch.device, dtype: torch.dtype) -> T2IAdapter:
    """Check every key and shape against the architecture (missing and unknown keys are errors), then fill it."""
    from ..checkpoints.loader import CheckpointError, _empty, _expected_shapes, _fill, check_keys
    variants = [k for k in f.shapes if ".skep." in k or ".down_opt.op." in k]
    if variants:
        raise CheckpointError(f"{f.path}: an Adapter trained with a skip convolution (sk=False) or strided-conv "
                              f"downsampling (use_conv=True), keys {variants[:3]}: no released adapter and no "
                              f"diffusers type has these; only sk=True, use_conv=False adapters load")
    model = _empty(T2IAdapter, config)
    expected = _expected_shapes(model)
    if layout == "diffusers":
        ours = dict(diffusers_key_pairs(config))
        check_keys(f"{f.path}: diffusers T2I-Adapter ({config.adapter_type})",
                   {d: expected[o] for d, o in ours.items()}, f.shapes)
        tensors = ((ours[k], f.read(k, dtype)) for k in f.shapes)
    else:
        check_keys(f"{f.path}: TencentARC T2I-Adapter ({config.adapter_type})", expected, f.shapes)
        tensors = ((k, f.read(k, dtype)) for k in f.shapes)
    return _fill(model, tensors, device, dtype)


def _open(path: Path):
    """The file's tensors (checkpoints/loader.py's reader); some .pth files nest them under an "adapter" key."""
    from ..checkpoints.loader import WeightsFile, open_weights
    f = open_weights(path)
    if f.shapes or path.suffix == ".safetensors":
        return f
    nested = torch.load(path, map_location="cpu", weights_only=True).get("adapter")
    if not isinstance(nested, dict):
        return f
    tensors = {k: v for k, v in nested.items() if isinstance(v, torch.Tensor)}

    def read(key: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        tensor = tensors[key]
        return tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor

    return WeightsFile(path, {k: tuple(v.shape) for k, v in tensors.items()}, read)


def _folder_weights(folder: Path, dtype: torch.dtype) -> Path:
    """The folder's weights file; the fp16 variant first when fp16 is wanted."""
    from ..checkpoints.loader import CheckpointError
    variants = (".fp16", "") if dtype == torch.float16 else ("", ".fp16")
    candidates = [folder / name.format(v) for v in variants for name in FOLDER_WEIGHTS]
    found = next((p for p in candidates if p.is_file()), None)
    if found is None:
        raise CheckpointError(f"{folder}: no T2I-Adapter weights; expected one of {[p.name for p in candidates]}")
    return found


def _read_config(path: Path) -> dict[str, Any]:
    from ..checkpoints.loader import CheckpointError
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; a diffusers T2IAdapter folder has config.json and "
                              f"diffusion_pytorch_model.safetensors")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON: {e}") from e
