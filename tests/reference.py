"""Random diffusers reference models for parity tests: config dicts (tiny and full-size) and seeded builders."""
from __future__ import annotations

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor2_0


_CROSS, _DOWN, _UP, _CROSS_UP = "CrossAttnDownBlock2D", "DownBlock2D", "UpBlock2D", "CrossAttnUpBlock2D"

# SD1-shaped: 1x1-conv proj_in/out, a fixed number of heads (8), attention on all but the last level.
TINY_SD1_UNET = dict(sample_size=16, in_channels=4, out_channels=4, block_out_channels=[32, 64, 64],
                     layers_per_block=2, down_block_types=[_CROSS, _CROSS, _DOWN],
                     up_block_types=[_UP, _CROSS_UP, _CROSS_UP],
                     cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32)
# SD2-shaped: Linear proj_in/out, a fixed head size (8 channels: 4, 8, 8 heads), upcast flag, 2 blocks per transformer.
TINY_SD2_UNET = dict(TINY_SD1_UNET, cross_attention_dim=48, attention_head_dim=[4, 8, 8], use_linear_projection=True,
                     upcast_attention=True, transformer_layers_per_block=2)
# Inpainting-shaped: 9 input channels (noisy latent, mask, masked-image latent).
TINY_INPAINT_UNET = dict(TINY_SD1_UNET, in_channels=9)

# unet/config.json of runwayml/stable-diffusion-v1-5 and stabilityai/stable-diffusion-2-1.
SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4, block_out_channels=[320, 640, 1280, 1280],
                 layers_per_block=2, down_block_types=[_CROSS, _CROSS, _CROSS, _DOWN],
                 up_block_types=[_UP, _CROSS_UP, _CROSS_UP, _CROSS_UP], cross_attention_dim=768, attention_head_dim=8,
                 act_fn="silu", center_input_sample=False, downsample_padding=1, flip_sin_to_cos=True, freq_shift=0,
                 mid_block_scale_factor=1, norm_eps=1e-5, norm_num_groups=32)
SD21_UNET = dict(SD15_UNET, sample_size=96, cross_attention_dim=1024, attention_head_dim=[5, 10, 20, 20],
                 use_linear_projection=True, upcast_attention=True, dual_cross_attention=False,
                 only_cross_attention=False, num_class_embeds=None)

# unet/config.json of stabilityai/stable-diffusion-xl-base-1.0 and -refiner-1.0 (the keys SDXL adds to SD's).
SDXL_BASE_UNET = dict(SD15_UNET, sample_size=128, block_out_channels=[320, 640, 1280],
                      down_block_types=[_DOWN, _CROSS, _CROSS], up_block_types=[_CROSS_UP, _CROSS_UP, _UP],
                      cross_attention_dim=2048, attention_head_dim=[5, 10, 20], transformer_layers_per_block=[1, 2, 10],
                      use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
                      projection_class_embeddings_input_dim=2816, upcast_attention=None)
SDXL_REFINER_UNET = dict(SDXL_BASE_UNET, block_out_channels=[384, 768, 1536, 1536],
                         down_block_types=[_DOWN, _CROSS, _CROSS, _DOWN],
                         up_block_types=[_UP, _CROSS_UP, _CROSS_UP, _UP],
                         cross_attention_dim=1280, attention_head_dim=[6, 12, 24, 24], transformer_layers_per_block=4,
                         projection_class_embeddings_input_dim=2560)

# text_encoder/config.json of runwayml/stable-diffusion-v1-5 (OpenAI CLIP ViT-L/14, also SDXL's first tower), of
# stabilityai/stable-diffusion-2-1 (OpenCLIP ViT-H/14, its 24th block dropped: SD2 reads the 23rd) and
# text_encoder_2/config.json of stabilityai/stable-diffusion-xl-base-1.0 (OpenCLIP ViT-bigG/14): CLIPTextConfig's.
SD15_TEXT = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                 num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5,
                 bos_token_id=0, eos_token_id=2)
SD21_TEXT = dict(SD15_TEXT, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
                 hidden_act="gelu", projection_dim=512)
SDXL_TEXT_2 = dict(SD15_TEXT, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                   hidden_act="gelu", projection_dim=1280)

TINY_VAE = dict(in_channels=3, out_channels=3, block_out_channels=[32, 64, 64], layers_per_block=2,
                down_block_types=["DownEncoderBlock2D"] * 3, up_block_types=["UpDecoderBlock2D"] * 3,
                latent_channels=4, norm_num_groups=32, sample_size=32)
# vae/config.json shared by SD 1.5 and 2.1 (sample_size aside).
SD_VAE = dict(in_channels=3, out_channels=3, block_out_channels=[128, 256, 512, 512], layers_per_block=2,
              down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
              latent_channels=4, norm_num_groups=32, sample_size=512, act_fn="silu", scaling_factor=0.18215)
SDXL_VAE = dict(SD_VAE, sample_size=1024, scaling_factor=0.13025, force_upcast=True)


POOL_SIZE = (1 << 25) + 15  # 33.5M: more than the largest SD tensor (29.5M), so a tensor repeats no value
NORMS = (torch.nn.GroupNorm, torch.nn.LayerNorm)


@torch.no_grad()
def randomize_(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every parameter seeded random values, norms included: weights at PyTorch's default-init
    scale, norm weights 1 ± 0.05, biases ± 0.05, so no zero or unit tensor hides a mapping bug.

    Each tensor is a window of one pool of normals, at its own random offset: drawing 860M fresh
    normals for a full-size UNet takes over 20 s on one core, a window is a copy. With offsets drawn
    from 33M, two tensors of the same shape (which a key map could swap) hold different values.
    """
    gen = torch.Generator().manual_seed(seed)
    pool = torch.randn(POOL_SIZE, generator=gen).repeat(2)  # twice, so every window is one slice
    for name, p in module.named_parameters():
        offset = int(torch.randint(POOL_SIZE, (), generator=gen))
        window = pool[offset:offset + min(p.numel(), POOL_SIZE)]
        z = window.repeat(-(-p.numel() // POOL_SIZE))[:p.numel()].view(p.shape)
        if p.ndim > 1:
            p.copy_(z / (3 * p[0].numel()) ** 0.5)  # the std of uniform(±1/√fan_in), PyTorch's default init
        elif isinstance(module.get_submodule(name.rsplit(".", 1)[0]), NORMS) and name.endswith("weight"):
            p.copy_(1.0 + 0.05 * z)
        else:
            p.copy_(0.05 * z)
    return module


def build_unet(config: dict, seed: int = 0) -> UNet2DConditionModel:
    """A diffusers UNet with seeded random weights (randomize_), attending through SDPA."""
    with torch.device("meta"):  # skip diffusers' own init: randomize_ overwrites every parameter anyway
        model = UNet2DConditionModel(**config)
    model = randomize_(model.to_empty(device="cpu").eval(), seed)
    model.set_attn_processor(AttnProcessor2_0())
    return model


def build_vae(config: dict, seed: int = 0) -> AutoencoderKL:
    """A diffusers AutoencoderKL with seeded random weights (randomize_), attending through SDPA."""
    with torch.device("meta"):
        model = AutoencoderKL(**config)
    model = randomize_(model.to_empty(device="cpu").eval(), seed)
    model.set_attn_processor(AttnProcessor2_0())
    return model


@torch.no_grad()
def random_fp16_weights_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Seeded weights that fp16 holds exactly: matrices with std 1/sqrt(fan_in), norm scales near 1, small biases.

    Uniform draws into a meta-built model skip the reference's own (slow) random init.
    """
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if p.ndim >= 2:
            bound = (3 / p[0].numel()) ** 0.5
            p.uniform_(-bound, bound, generator=gen)
        elif "norm" in name and name.endswith("weight"):
            p.uniform_(0.8, 1.2, generator=gen)
        else:
            p.uniform_(-0.1, 0.1, generator=gen)
        p.copy_(p.half())
    return model


def full_size(build, seed: int) -> torch.nn.Module:
    with torch.device("meta"):
        model = build()
    model.to_empty(device="cpu")
    for name, buffer in model.named_buffers():  # CLIP's position ids, the only buffer
        assert name.endswith("position_ids"), name
        buffer.copy_(torch.arange(buffer.shape[-1]).expand_as(buffer))
    if hasattr(model, "set_attn_processor"):
        model.set_attn_processor(AttnProcessor2_0())
    return random_fp16_weights_(model, seed).eval()
