"""The sampling loop: one `denoise` for SD 1.x, SD 2.x and SDXL, and the `Conditioning` it hands the UNet.

The reverse process (Rombach et al. 2022, §3.3) asks the UNet for ε (or v) at each timestep, steers it with
classifier-free guidance (Ho & Salimans 2022) and lets the scheduler take one step. What differs between
model families is only what the UNet sees besides x_t and t, and that travels in `Conditioning`.
"""
from __future__ import annotations

from collections.abc import Callable
import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn
from tqdm import tqdm

from .guidance import classifier_free_guidance, is_guided
from .schedulers import NoiseScheduler

if TYPE_CHECKING:
    from .control import Controls

# callback(step_index, t, x, pred_x0): x is the sample after the step, pred_x0 the model's x̂0 at t; returning
# True stops the loop there (a server's interrupt)
StepCallback = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], bool | None]


@dataclass
class Conditioning:
    """What the UNet sees besides x_t and t: one row per UNet batch item, [negative; positive] when guided."""

    context: torch.Tensor                      # (B, 77, D) text-encoder states the cross-attention reads
    text_embeds: torch.Tensor | None = None    # SDXL: (B, 1280) pooled text embedding
    time_ids: torch.Tensor | None = None       # SDXL: (B, 6) size and crop ids; the refiner's (B, 5) end in a score
    inpainting: torch.Tensor | None = None     # 9-channel inpainting: (B, 5, h, w) = [mask, masked-image latents]
    control: Controls | None = None            # ControlNets / T2I-Adapters: what they add to the UNet at each step

    @classmethod
    def guided(cls, negative: Conditioning, positive: Conditioning) -> Conditioning:
        """The batch classifier-free guidance runs: [negative; positive] along the batch for every field."""
        return cls.cat([negative, positive])

    @classmethod
    def cat(cls, rows: list[Conditioning]) -> Conditioning:
        """Several conditionings as one batch, each tensor field concatenated along the batch (controls are
        attached to the whole batch afterwards)."""
        tensors = ("context", "text_embeds", "time_ids", "inpainting")
        return cls(**{name: None if getattr(rows[0], name) is None else
                      torch.cat([getattr(row, name) for row in rows]) for name in tensors})

    def added(self) -> dict[str, torch.Tensor]:
        """SDXL's added conditions, as diffusers' `added_cond_kwargs`: empty for SD 1.x / 2.x."""
        return {} if self.text_embeds is None else {"text_embeds": self.text_embeds, "time_ids": self.time_ids}

    def at(self, step: int) -> Conditioning:
        """The conditioning of the loop's step `step`: always this one (see ConditioningSchedule)."""
        return self

    def replace(self, **changes: torch.Tensor | Controls) -> Conditioning:
        return dataclasses.replace(self, **changes)

    def after(self, steps: int) -> Conditioning:
        """The conditioning of a loop that continues another one of `steps` steps: this one."""
        return self


@dataclass
class ConditioningSchedule:
    """Conditioning that changes during sampling (A1111's prompt editing `[from:to:when]` and alternation `[a|b]`).

    parts[k] holds for the loop's steps i <= ends[k] after the previous end, i counted from 0 as A1111's denoiser
    counts them; so an edit that ends at step 10 of 20 shows its `from` text on steps 0..10, eleven steps.
    """

    ends: list[int]
    parts: list[Conditioning]

    def at(self, step: int) -> Conditioning:
        return next((part for end, part in zip(self.ends, self.parts) if step <= end), self.parts[-1])

    def replace(self, **changes: torch.Tensor | Controls) -> ConditioningSchedule:
        """The same schedule with fields set that do not change over the steps (SDXL's time ids, inpainting,
        controls)."""
        return ConditioningSchedule(self.ends, [part.replace(**changes) for part in self.parts])

    def after(self, steps: int) -> ConditioningSchedule:
        """The schedule of a loop that continues one of `steps` steps (the SDXL refiner after the base)."""
        return ConditioningSchedule([end - steps for end in self.ends], self.parts)


@dataclass
class InpaintingLatents:
    """What 4-channel inpainting pastes back outside the mask after every step (diffusers' StableDiffusionInpaint)."""

    mask: torch.Tensor           # (B, 1, h, w): 1 = repaint, 0 = keep
    image_latents: torch.Tensor  # (B, 4, h, w): latents of the whole image
    noise: torch.Tensor          # (B, 4, h, w): the noise x_T was made with


@torch.no_grad()
def denoise(unet: nn.Module, scheduler: NoiseScheduler, latents: torch.Tensor,
            conditioning: Conditioning | ConditioningSchedule,
            timesteps: torch.Tensor, guidance_scale: float, guidance_rescale: float = 0.0,
            generator: torch.Generator | list[torch.Generator] | None = None,
            inpainting: InpaintingLatents | None = None, callback: StepCallback | None = None,
            progress: bool = True) -> torch.Tensor:
    """Run the reverse process from `latents` = x_T (or a noised image) down to x_0 (LDM §3.3; Ho & Salimans 2022).

    Args:
        unet: ε_θ(x_t, t, c), or v_θ; the scheduler knows which.
        scheduler: set_timesteps already called; it turns each prediction into the next sample.
        latents: x at timesteps[0], (B, 4, h, w), already scaled by scheduler.init_noise_sigma.
        conditioning: what the UNet sees besides x_t and t, 2B rows [negative; positive] when guided; a
            ConditioningSchedule changes it from step to step.
        timesteps: the timesteps to visit, usually scheduler.timesteps (a tail of it for image-to-image).
        guidance_scale: s of classifier-free guidance; <= 1 runs the conditional pass only.
        guidance_rescale: φ of Lin et al. 2023 §3.4; 0 is plain guidance.
        generator: the noise source of stochastic samplers (one per image, or one for the batch).
        inpainting: for a 4-channel UNet, the image re-noised to each step is pasted back outside the mask.
        callback: called after each step with (step index, t, x after the step, x̂0 predicted at t). When it
            returns True the loop stops and returns that step's x̂0, the model's best guess of the finished
            image (what A1111 shows of an interrupted image), rather than a sample still full of noise.
        progress: show a tqdm bar.
    """
    guided = is_guided(guidance_scale)
    for i, t in enumerate(tqdm(timesteps, desc="denoising", disable=not progress)):
        # both halves of the guided batch start from the same x_t; only their conditioning differs
        x_in = torch.cat([latents] * 2) if guided else latents
        x_in = scheduler.scale_model_input(x_in, t)
        c = conditioning.at(i)
        control = {} if c.control is None else c.control.unet_inputs(i, x_in, t, c.context, c.added())
        if c.inpainting is not None:  # the ControlNet above saw the latent's 4 channels, as in diffusers
            x_in = torch.cat([x_in, c.inpainting], dim=1)  # (B', 9, h, w)
        prediction = unet(x_in, t, c.context, **c.added(), **control)
        if guided:
            uncond, cond = prediction.chunk(2)
            prediction = classifier_free_guidance(uncond, cond, guidance_scale, guidance_rescale)
        step = scheduler.step(prediction, t, latents, generator=generator)
        latents = step.prev_sample
        if inpainting is not None:
            latents = _keep_outside_mask(latents, inpainting, scheduler, timesteps, i)
        if callback is not None and callback(i, t, latents, step.pred_original_sample):
            return step.pred_original_sample
    return latents


def _keep_outside_mask(latents: torch.Tensor, inpainting: InpaintingLatents, scheduler: NoiseScheduler,
                       timesteps: torch.Tensor, i: int) -> torch.Tensor:
    """4-channel inpainting, RePaint eq. 8 without resampling (Lugmayr et al. 2022, arXiv:2201.09865), in latent
    space as diffusers does: outside the mask the original image noised to the next timestep (with the noise
    x_T was made with), inside the sample."""
    known = inpainting.image_latents
    if i < len(timesteps) - 1:
        known = scheduler.add_noise(known, inpainting.noise, timesteps[i + 1:i + 2])
    return (1 - inpainting.mask) * known + inpainting.mask * latents


def timesteps_for_strength(scheduler: NoiseScheduler, num_inference_steps: int, strength: float) -> torch.Tensor:
    """The last int(n·strength) steps of the schedule: image-to-image starts part-way down (SDEdit, Meng et al. 2021)."""
    init_steps = min(int(num_inference_steps * strength), num_inference_steps)
    start = max(num_inference_steps - init_steps, 0)
    return scheduler.timesteps[start * scheduler.order:]


def handover_timestep(scheduler: NoiseScheduler, switch_at: float) -> int:
    """The training timestep round(T·(1 - f)) where the ensemble of experts hands over (eDiff-I, Balaji et al.
    2022; SDXL §2.5): the base denoises t >= it, the refiner the timesteps below it (diffusers' denoising_end/start)."""
    T = scheduler.config.num_train_timesteps
    return int(round(T - switch_at * T))


def timesteps_before_handover(scheduler: NoiseScheduler, timesteps: torch.Tensor, switch_at: float) -> torch.Tensor:
    """The base's share of `timesteps`: those at or above the handover timestep."""
    return timesteps[:int((timesteps >= handover_timestep(scheduler, switch_at)).sum())]


def timesteps_after_handover(scheduler: NoiseScheduler, switch_at: float) -> torch.Tensor:
    """The refiner's share of its own schedule: the timesteps below the handover timestep (our samplers are all
    of order 1; diffusers adds a step for second-order ones)."""
    n = int((scheduler.timesteps < handover_timestep(scheduler, switch_at)).sum())
    return scheduler.timesteps[len(scheduler.timesteps) - n:]
