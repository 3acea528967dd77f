"""`make demo`: pictures from the bundled shapes model, of the forward process and of the noise schedules."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from matplotlib import cbook  # noqa: E402
from PIL import Image  # noqa: E402

from . import schedules  # noqa: E402
from .images import make_grid, pil_to_tensor, tensor_to_pil  # noqa: E402
from .generation import GenerationConfig  # noqa: E402
from .pipeline import DiffusionModel  # noqa: E402
from .schedulers import make_scheduler  # noqa: E402

OUT = Path("outputs/demo")
SD_BETAS = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
TIMESTEPS = (0, 50, 100, 200, 400, 600, 800, 999)
PROMPTS = ("a red circle on a blue background", "a yellow triangle on a purple background",
           "a white square on a green background", "a blue circle on a orange background",
           "a green square on a black background", "a orange triangle on a white background",
           "a purple circle on a yellow background", "a black circle on a red background")


def shapes_grid(path: Path) -> None:
    """Eight prompts, two seeds each, from the bundled text-to-image model (one batch, a few seconds on a CPU)."""
    configs = [GenerationConfig(prompt, seed=seed) for seed in (0, 1) for prompt in PROMPTS]
    images = [result.image for result in DiffusionModel().generate_batch(configs, progress=False)]
    make_grid(images, columns=len(PROMPTS)).save(path)


def forward_noising(path: Path) -> None:
    """x_t = sqrt(ᾱ_t)·x0 + sqrt(1-ᾱ_t)·ε at several t, on a photograph that matplotlib ships."""
    photo = Image.open(cbook.get_sample_data("grace_hopper.jpg")).convert("RGB").resize((192, 240))
    x0 = pil_to_tensor(photo).expand(len(TIMESTEPS), -1, -1, -1)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    x_t = make_scheduler("ddim", **SD_BETAS).add_noise(x0, noise, torch.tensor(TIMESTEPS))
    make_grid(tensor_to_pil(x_t), columns=len(TIMESTEPS)).save(path)


def schedule_plot(path: Path) -> None:
    """ᾱ_t and σ_t = sqrt((1-ᾱ_t)/ᾱ_t) for each β schedule, and where 20 steps of each spacing land."""
    fig, (ax_a, ax_s, ax_t) = plt.subplots(1, 3, figsize=(15, 4))
    for label, config in [("linear (DDPM)", dict(beta_schedule="linear", beta_start=1e-4, beta_end=0.02)),
                          ("scaled_linear (SD)", SD_BETAS),
                          ("squaredcos_cap_v2 (cosine)", dict(beta_schedule="squaredcos_cap_v2")),
                          ("scaled_linear, zero SNR", dict(SD_BETAS, rescale_betas_zero_snr=True))]:
        alpha_bar = make_scheduler("ddim", **config).alphas_cumprod
        ax_a.plot(alpha_bar, label=label)
        ax_s.semilogy(schedules.sigma_from_alpha_bar(alpha_bar), label=label)
    for row, spacing in enumerate(schedules.TIMESTEP_SPACINGS):
        ts = schedules.spaced_timesteps(spacing, 20, 1000, steps_offset=1 if spacing == "leading" else 0)
        ax_t.plot(ts, [row] * len(ts), "|", markersize=14, label=spacing)
    ax_a.set(title="ᾱ_t (signal kept)", xlabel="t")
    ax_s.set(title="σ_t = sqrt((1-ᾱ_t)/ᾱ_t)", xlabel="t")
    ax_t.set(title="20 inference steps by spacing", xlabel="t", yticks=[])
    for ax in (ax_a, ax_s, ax_t):
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    for name, draw in [("shapes.png", shapes_grid), ("forward_noising.png", forward_noising),
                       ("schedules.png", schedule_plot)]:
        draw(OUT / name)
        print(f"wrote {OUT / name}")


if __name__ == "__main__":
    main()
