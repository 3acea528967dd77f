"""Control images in the one denoising loop: ControlNet residuals and T2I-Adapter features, step by step.

`ControlInput(model, image, scale, start, end)` is what a user passes (`DiffusionModel.generate(..., control=[...])`).
`Controls` is what the loop holds: each image prepared once, as diffusers' pipelines prepare it, and asked at
every step for the extra inputs the UNet adds to its skips (`unet_inputs`):

  ControlNet (models/controlnet.py), run at every step in its window, several summed:
      down_i = Σ_k s_k·keep_k(i)·ControlNet_k(x_t, t, c, image_k)        (diffusers' MultiControlNetModel)
  T2I-Adapter (models/t2i_adapter.py), run once, its features reused by every step in its window:
      F^l = Σ_k ω_k·Adapter_k(image_k)                                    (diffusers' MultiAdapter)

Guess mode (ControlNet §4.6): the ControlNet sees only the conditional half of the guided batch, and the
negative half gets no residual, so the control image alone must carry the content when the prompt is empty.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from PIL import Image

from .images import image_to_unit_range
from .models.controlnet import ControlNetModel
from .models.t2i_adapter import T2IAdapter
from .models.unet import UNetModel


@dataclass(frozen=True)
class ControlInput:
    """One control: a ControlNet or a T2I-Adapter, its image, its strength and the part of the schedule it acts on."""

    model: ControlNetModel | T2IAdapter
    image: Image.Image | torch.Tensor  # PIL, or a tensor (C, H, W) / (1, C, H, W) in [0, 1] (inpainting: -1 masked)
    scale: float | None = None         # strength, multiplying the residuals (features); None = diffusers' default:
                                       # 1.0, ControlNets 0.8 in image-to-image, 0.5 in SD inpainting
    start: float = 0.0                 # the share of the steps done before the control acts
    end: float = 1.0                   # the share of the steps done when it stops

    def __post_init__(self):
        if not isinstance(self.model, (ControlNetModel, T2IAdapter)):
            raise ValueError(f"ControlInput.model must be a ControlNetModel or a T2IAdapter, got "
                             f"{type(self.model).__name__}; load one with ControlNetModel.from_pretrained(path)")
        if isinstance(self.image, torch.Tensor):
            if not (self.image.ndim == 3 or (self.image.ndim == 4 and len(self.image) == 1)):
                raise ValueError(f"a control image tensor must be (C, H, W) or (1, C, H, W), got "
                                 f"{tuple(self.image.shape)}")
        elif not isinstance(self.image, Image.Image):
            raise ValueError(f"ControlInput.image must be a PIL image or a tensor, got {type(self.image).__name__}")
        for name in ("scale", "start", "end"):
            value = getattr(self, name)
            if value is None and name == "scale":
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"ControlInput.{name} must be a number, got {value!r}")
        if not 0 <= self.start < self.end <= 1:
            raise ValueError(f"ControlInput needs 0 <= start < end <= 1 (shares of the steps), got start="
                             f"{self.start}, end={self.end}")

    @property
    def is_adapter(self) -> bool:
        return isinstance(self.model, T2IAdapter)

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of the image."""
        return self.image.size if isinstance(self.image, Image.Image) else tuple(self.image.shape[-1:-3:-1])

    @property
    def size_multiple(self) -> int:
        """What a width or height taken from this image is rounded down to: the adapter's unshuffle factor."""
        return self.model.config.downscale_factor if self.is_adapter else 1

    def record(self) -> dict[str, str | float | None]:
        """What a GeneratedImage (and its PNG) records of this control; the CLI adds its files."""
        return {"kind": "t2i_adapter" if self.is_adapter else "controlnet", "scale": self.scale,
                "start": self.start, "end": self.end}

    def pixels(self, width: int, height: int) -> torch.Tensor:
        """The image as the model reads it: (1, C, height, width) in [0, 1], as diffusers prepares it (ControlNet:
        VaeImageProcessor without normalisation, RGB then Lanczos; adapters: the adapter's channels, Lanczos)."""
        if isinstance(self.image, torch.Tensor):
            image = self.image if self.image.ndim == 4 else self.image[None]
            if image.shape[-2:] != (height, width):
                image = F.interpolate(image, size=(height, width))  # nearest, as diffusers resizes tensors
            return image.float()
        channels = self.model.config.in_channels if self.is_adapter else self.model.controlnet_config.hint_channels
        mode = {1: "L", 3: "RGB"}.get(channels)
        if mode is None:
            raise ValueError(f"a {channels}-channel control model reads tensors, not PIL images")
        return image_to_unit_range(self.image, width, height, mode)


def controlnet_keep(i: int, steps: int, start: float, end: float) -> float:
    """1 while step i of `steps` lies in [start, end] of the schedule, else 0 (diffusers' controlnet_keep)."""
    return 1.0 - float(i / steps < start or (i + 1) / steps > end)


class Controls:
    """A run's controls, prepared for the loop: images at the run's size, the adapters' features computed once."""

    def __init__(self, controls: list[ControlInput], width: int, height: int, batch: int, guided: bool,
                 guess_mode: bool, steps: int, num_inference_steps: int, device: torch.device):
        """Args:
            batch: images in the run; each control image is repeated for each (twice when guided, unless guess mode).
            steps: the steps this loop runs (image-to-image: a tail of the schedule), for the ControlNet window.
            num_inference_steps: the whole schedule's steps, for the adapter window (diffusers'
                adapter_conditioning_factor counts those).
        """
        nets = [c for c in controls if not c.is_adapter]
        # diffusers: a shuffle ControlNet (global pooling) is always run in guess mode; the first one decides
        self.guess_mode = guess_mode or (bool(nets) and nets[0].model.controlnet_config.global_pool_conditions)
        self.guided = guided
        rows = 2 * batch if guided and not self.guess_mode else batch
        self.nets = [(c.model, c.pixels(width, height).to(device, _dtype(c.model)).repeat(rows, 1, 1, 1),
                      [c.scale * controlnet_keep(i, steps, c.start, c.end) for i in range(steps)]) for c in nets]
        adapters = [c for c in controls if c.is_adapter]
        self.features = self._adapter_features(adapters, width, height, batch, device)
        self.adapter_steps = [range(int(num_inference_steps * c.start), int(num_inference_steps * c.end))
                              for c in adapters]

    def _adapter_features(self, adapters: list[ControlInput], width: int, height: int, batch: int,
                          device: torch.device) -> list[torch.Tensor] | None:
        """F^l = Σ_k ω_k·Adapter_k(image_k), one batch row per image (both halves of a guided batch get them)."""
        if not adapters:
            return None
        total: list[torch.Tensor] | None = None
        for c in adapters:
            features = c.model(c.pixels(width, height).to(device, _dtype(c.model)))
            total = [c.scale * f for f in features] if total is None else [
                t + c.scale * f for t, f in zip(total, features)]
        return [f.repeat(2 * batch if self.guided else batch, 1, 1, 1) for f in total]

    def unet_inputs(self, i: int, x_in: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                    added: dict[str, torch.Tensor]) -> dict[str, list[torch.Tensor] | torch.Tensor]:
        """What the UNet adds at step i: `down_residuals` / `mid_residual` and `adapter_features`, as needed.

        x_in, context, added: the UNet's scaled input (4 latent channels) and conditioning at this step.
        """
        inputs: dict[str, list[torch.Tensor] | torch.Tensor] = {}
        if any(scales[i] for _, _, scales in self.nets):
            inputs["down_residuals"], inputs["mid_residual"] = self._residuals(i, x_in, t, context, added)
        if self.features is not None and any(i in steps for steps in self.adapter_steps):
            inputs["adapter_features"] = self.features
        return inputs

    def _residuals(self, i: int, x_in: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                   added: dict[str, torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The residuals of the ControlNets acting at step i, summed in order (one outside its window would add
        exactly 0, so it is not run); in guess mode computed on the conditional half only."""
        half = self.guess_mode and self.guided
        if half:  # [negative; positive]: keep the positive rows
            x_in, context = x_in.chunk(2)[1], context.chunk(2)[1]
            added = {k: v.chunk(2)[1] for k, v in added.items()}
        down: list[torch.Tensor] | None = None
        for net, image, scales in self.nets:
            if not scales[i]:
                continue
            d, m = net(x_in, t, context, image, scale=scales[i], guess_mode=self.guess_mode, **added)
            down, mid = (d, m) if down is None else ([a + b for a, b in zip(down, d)], mid + m)
        if half:  # the negative half gets no control
            down, mid = [torch.cat([torch.zeros_like(d), d]) for d in down], torch.cat([torch.zeros_like(mid), mid])
        return down, mid


def check_controls(controls: list[ControlInput], unet: UNetModel, family: str) -> None:
    """Each control fits the model (`family`, its UNet): made for this architecture, on its device, in its precision."""
    if not isinstance(controls, (list, tuple)) or not all(isinstance(c, ControlInput) for c in controls):
        raise ValueError("control= takes a list of ControlInput(model, image, scale, start, end)")
    weight = next(unet.parameters())
    for k, c in enumerate(controls):
        kind, made_for = ("T2I-Adapter", c.model.family) if c.is_adapter else (
            "ControlNet", c.model.controlnet_config.family)
        if not _fits(c, unet):
            raise ValueError(f"control[{k}] is a {kind} for {made_for} models; this model is {family} "
                             f"(its outputs would not fit this UNet's levels)")
        own = next(c.model.parameters())
        if own.device != weight.device or own.dtype != weight.dtype:
            raise ValueError(f"control[{k}]'s {kind} is on {own.device} in {own.dtype}, the model on {weight.device} "
                             f"in {weight.dtype}; move it with .to({str(weight.device)!r}, {weight.dtype})")


def _fits(c: ControlInput, unet: UNetModel) -> bool:
    """A ControlNet fits a UNet whose encoder it copies (same skips, context and added embedding); an adapter one
    of its family whose level widths its features have (SDXL's: a fourth feature for the middle block)."""
    if not c.is_adapter:
        own, theirs = c.model.controlnet_config.unet, unet.config
        return c.model.skip_channels == unet.skip_channels and \
            (own.context_dim, own.adm_in_channels) == (theirs.context_dim, theirs.adm_in_channels)
    widths = [w for _, w, _ in c.model.config.levels()]
    levels = [unet.config.model_channels * m for m in unet.config.channel_mult]
    if c.model.family != "sdxl":
        return unet.config.adm_in_channels is None and widths == levels
    middle = levels[-1]
    return unet.config.adm_in_channels is not None and widths in (levels, levels + [middle])


def _dtype(model: torch.nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype
