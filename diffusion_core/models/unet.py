"""The latent-diffusion UNet ε_θ(z_t, t, c) of Stable Diffusion (Rombach et al. 2022, §3.3 and appendix E.2)."""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from .layers import Downsample, ResBlock, SpatialTransformer, Upsample, timestep_embedding


@dataclass(frozen=True)
class UNetConfig:
    """The UNet's architecture in the terms of LDM's yaml files (`model.params.unet_config.params`)."""

    in_channels: int                      # latent channels in: 4, or 9 for inpainting (latent, mask, masked latent)
    out_channels: int                     # channels predicted: ε (or v) for each latent channel
    model_channels: int                   # width of the first level; level i is model_channels * channel_mult[i]
    channel_mult: tuple[int, ...]         # width multiplier per level; each level after the first halves H and W
    num_res_blocks: int                   # ResBlocks per level going down (one more per level coming up)
    attention_resolutions: tuple[int, ...]  # downsample factors (1, 2, 4, ...) whose levels get a SpatialTransformer
    context_dim: int                      # width of the text-encoder states that cross-attention reads
    num_heads: int = -1                   # heads per attention layer (SD1: 8), or -1 when num_head_channels is set
    num_head_channels: int = -1           # channels per head (SD2: 64), or -1 when num_heads is set
    use_linear_in_transformer: bool = False  # SD2: Linear proj_in/proj_out on tokens; SD1: 1x1 convs on the map
    transformer_depth: int | tuple[int, ...] = 1  # BasicTransformerBlocks per SpatialTransformer, or one per level
    upcast_attention: bool = False        # attend in fp32 when running in fp16/bf16 (SD2-768-v needs it)
    norm_groups: int = 32                 # GroupNorm groups everywhere (LDM hard-codes 32)
    transformer_depth_middle: int | None = None  # the middle block's depth; None = the last level's (as sgm)
    adm_in_channels: int | None = None    # SDXL: width of y = [pooled text; embedded time ids] (2816); None = SD1/SD2
    time_id_dim: int = 256                # SDXL: sinusoidal width of each time id (diffusers' addition_time_embed_dim)

    def __post_init__(self):
        # yaml gives lists; keep the dataclass hashable and its comparisons order-free
        object.__setattr__(self, "channel_mult", tuple(self.channel_mult))
        object.__setattr__(self, "attention_resolutions", tuple(sorted(set(self.attention_resolutions), reverse=True)))
        if (self.num_heads == -1) == (self.num_head_channels == -1):
            raise ValueError(f"UNetConfig: set exactly one of num_heads ({self.num_heads}) and num_head_channels "
                             f"({self.num_head_channels}); the other must be -1")
        n = len(self.channel_mult)
        depth = self.transformer_depth
        depth = (depth,) * n if isinstance(depth, int) else tuple(depth)
        if len(depth) != n:
            raise ValueError(f"UNetConfig: transformer_depth {self.transformer_depth} needs one entry per level ({n})")
        if self.transformer_depth_middle is None:
            object.__setattr__(self, "transformer_depth_middle", depth[-1])
        # a level without attention has no transformer: its depth is 0, whatever the source file said
        object.__setattr__(self, "transformer_depth", tuple(d if self.has_attention(i) else 0
                                                            for i, d in enumerate(depth)))
        if any(d < 1 for i, d in enumerate(self.transformer_depth) if self.has_attention(i)):
            raise ValueError(f"UNetConfig: transformer_depth {depth} must be >= 1 at levels with attention")

    def has_attention(self, level: int) -> bool:
        """Whether level i (downsample factor 2^i) has SpatialTransformers."""
        return 2 ** level in self.attention_resolutions

    def heads(self, channels: int) -> tuple[int, int]:
        """(number of heads, channels per head) of a transformer at this width (LDM openaimodel.py)."""
        if self.num_head_channels == -1:
            return self.num_heads, channels // self.num_heads
        return channels // self.num_head_channels, self.num_head_channels

    @classmethod
    def from_diffusers(cls, config: dict) -> UNetConfig:
        """Read a diffusers `UNet2DConditionModel` config (unet/config.json); refuse options LDM lacks."""
        for key, value in _DIFFUSERS_FIXED.items():
            if config.get(key, value) != value:
                raise ValueError(f"UNet config: {key}={config[key]!r} is not supported; only {value!r} is")
        added = config.get("addition_embed_type")
        if added not in (None, "text_time"):
            raise ValueError(f"UNet config: addition_embed_type={added!r} is not supported; only None (SD) and "
                             f"'text_time' (SDXL) are")
        down, up = list(config["down_block_types"]), list(config["up_block_types"])
        if not set(down) <= set(_UP_OF) or up != [_UP_OF[t] for t in reversed(down)]:
            raise ValueError(f"UNet config: down_block_types {down} / up_block_types {up} must be mirrored "
                             f"choices of {list(_UP_OF)} / {list(_UP_OF.values())}")
        widths = list(config["block_out_channels"])
        if any(w % widths[0] for w in widths):
            raise ValueError(f"UNet config: block_out_channels {widths} must be multiples of the first")
        attn_levels = [i for i, t in enumerate(down) if t == "CrossAttnDownBlock2D"]
        # diffusers' `attention_head_dim` holds the number of heads for SD1/SD2/SDXL (diffusers issue #2011)
        heads = config.get("attention_head_dim", 8)
        per_level = list(heads) if isinstance(heads, (list, tuple)) else [heads] * len(widths)
        used = attn_levels + [len(widths) - 1]  # the middle block takes the last level's entry
        counts, sizes = {per_level[i] for i in used}, {widths[i] // per_level[i] for i in used}
        if len(counts) == 1:  # SD1: 8 heads at every width
            head_kwargs = {"num_heads": counts.pop()}
        elif len(sizes) == 1:  # SD2, SDXL: 64 channels per head at every width
            head_kwargs = {"num_head_channels": sizes.pop()}
        else:
            raise ValueError(f"UNet config: attention_head_dim {heads} gives neither one head count nor one head size")
        depth = config.get("transformer_layers_per_block", 1)
        if not isinstance(depth, int) and any(not isinstance(d, int) for d in depth):
            raise ValueError(f"UNet config: transformer_layers_per_block={depth} varies within a level; not supported")
        return cls(in_channels=config.get("in_channels", 4), out_channels=config.get("out_channels", 4),
                   model_channels=widths[0], channel_mult=tuple(w // widths[0] for w in widths),
                   num_res_blocks=_one_value(config.get("layers_per_block", 2), "layers_per_block"),
                   attention_resolutions=tuple(2 ** i for i in attn_levels),
                   context_dim=config["cross_attention_dim"], **head_kwargs,
                   use_linear_in_transformer=config.get("use_linear_projection", False),
                   transformer_depth=depth, upcast_attention=config.get("upcast_attention") or False,
                   norm_groups=config.get("norm_num_groups", 32),
                   adm_in_channels=config["projection_class_embeddings_input_dim"] if added else None,
                   time_id_dim=config.get("addition_time_embed_dim") or 256)

    def to_diffusers(self) -> dict:
        """The `UNet2DConditionModel(**config)` arguments of the same architecture."""
        widths = [self.model_channels * m for m in self.channel_mult]
        attn = [self.has_attention(i) for i in range(len(widths))]
        down = ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn]
        heads = self.num_heads if self.num_head_channels == -1 else [self.heads(w)[0] for w in widths]
        # diffusers' middle block takes the last level's depth; levels without attention ignore theirs
        depth = [d if a else 1 for d, a in zip(self.transformer_depth, attn)]
        if attn[-1] and depth[-1] != self.transformer_depth_middle:
            raise ValueError(f"diffusers cannot express a middle depth {self.transformer_depth_middle} unlike the "
                             f"last level's {depth[-1]}")
        depth[-1] = self.transformer_depth_middle
        added = {} if self.adm_in_channels is None else dict(
            addition_embed_type="text_time", addition_time_embed_dim=self.time_id_dim,
            projection_class_embeddings_input_dim=self.adm_in_channels)
        return dict(in_channels=self.in_channels, out_channels=self.out_channels, block_out_channels=widths,
                    layers_per_block=self.num_res_blocks, down_block_types=down,
                    up_block_types=[_UP_OF[t] for t in reversed(down)], cross_attention_dim=self.context_dim,
                    attention_head_dim=heads, use_linear_projection=self.use_linear_in_transformer,
                    transformer_layers_per_block=depth[0] if len(set(depth)) == 1 else depth,
                    upcast_attention=self.upcast_attention, norm_num_groups=self.norm_groups, **added)


_UP_OF = {"DownBlock2D": "UpBlock2D", "CrossAttnDownBlock2D": "CrossAttnUpBlock2D"}
# UNet2DConditionModel options with no LDM counterpart: only the value SD uses is accepted
_DIFFUSERS_FIXED = {
    "center_input_sample": False, "flip_sin_to_cos": True, "freq_shift": 0, "downsample_padding": 1,
    "mid_block_scale_factor": 1, "act_fn": "silu", "norm_eps": 1e-5, "mid_block_type": "UNetMidBlock2DCrossAttn",
    "only_cross_attention": False, "dual_cross_attention": False, "class_embed_type": None,
    "num_class_embeds": None, "encoder_hid_dim": None, "encoder_hid_dim_type": None, "num_attention_heads": None,
    "resnet_time_scale_shift": "default", "time_embedding_type": "positional", "time_embedding_dim": None,
    "time_cond_proj_dim": None, "conv_in_kernel": 3, "conv_out_kernel": 3, "attention_type": "default",
    "cross_attention_norm": None, "class_embeddings_concat": False, "mid_block_only_cross_attention": None,
    "reverse_transformer_layers_per_block": None, "resnet_skip_time_act": False, "resnet_out_scale_factor": 1.0,
    "time_embedding_act_fn": None, "timestep_post_act": None,
}


def _one_value(value: int | list[int], name: str) -> int:
    values = set(value) if isinstance(value, (list, tuple)) else {value}
    if len(values) != 1:
        raise ValueError(f"UNet config: {name}={value} must be the same at every level")
    return values.pop()


# Presets: LDM's v1-inference.yaml, v2-inference(-v).yaml and the inpainting yamls.
SD15_UNET = UNetConfig(in_channels=4, out_channels=4, model_channels=320, channel_mult=(1, 2, 4, 4),
                       num_res_blocks=2, attention_resolutions=(4, 2, 1), context_dim=768, num_heads=8)
# stable-diffusion-2-1's own config turns the fp32 attention upcast on; it is a no-op in fp32
SD21_UNET = UNetConfig(in_channels=4, out_channels=4, model_channels=320, channel_mult=(1, 2, 4, 4),
                       num_res_blocks=2, attention_resolutions=(4, 2, 1), context_dim=1024, num_head_channels=64,
                       use_linear_in_transformer=True, upcast_attention=True)
SD15_INPAINT_UNET = replace(SD15_UNET, in_channels=9)
SD2_INPAINT_UNET = replace(SD21_UNET, in_channels=9, upcast_attention=False)
# SDXL (sgm's sd_xl_base.yaml / sd_xl_refiner.yaml): no attention at the first level, deeper transformers lower
# down, 64-channel heads, and y = [pooled bigG text (1280); 6 (refiner: 5) time ids x 256] added to the time embedding.
SDXL_BASE_UNET = UNetConfig(in_channels=4, out_channels=4, model_channels=320, channel_mult=(1, 2, 4), num_res_blocks=2,
                            attention_resolutions=(4, 2), context_dim=2048, num_head_channels=64,
                            use_linear_in_transformer=True, transformer_depth=(0, 2, 10), adm_in_channels=2816)
SDXL_REFINER_UNET = UNetConfig(in_channels=4, out_channels=4, model_channels=384, channel_mult=(1, 2, 4, 4),
                               num_res_blocks=2, attention_resolutions=(4, 2), context_dim=1280, num_head_channels=64,
                               use_linear_in_transformer=True, transformer_depth=4, adm_in_channels=2560)
SDXL_INPAINT_UNET = replace(SDXL_BASE_UNET, in_channels=9)
# An SD1-shaped UNet small enough for CPU tests: 3 levels, attention on the first two.
TINY_UNET = UNetConfig(in_channels=4, out_channels=4, model_channels=32, channel_mult=(1, 2, 2),
                       num_res_blocks=2, attention_resolutions=(2, 1), context_dim=32, num_heads=8)


class TimestepBlock(nn.Sequential):
    """A Sequential that hands each layer what it needs: emb to ResBlocks, context to transformers."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor,
                size: tuple[int, int] | None = None) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            elif isinstance(layer, Upsample):
                x = layer(x, size)
            else:
                x = layer(x)
        return x


class UNetEncoder(nn.Module):
    """The UNet's first half: the timestep embedding (and SDXL's added one), the down path and the middle block.

    UNetModel adds the up path; a ControlNet is a trainable copy of this half (models/controlnet.py).
    """

    def __init__(self, config: UNetConfig):
        super().__init__()
        c = self.config = config
        emb_dim = 4 * c.model_channels  # LDM's time_embed_dim
        self.time_embed = nn.Sequential(nn.Linear(c.model_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        if c.adm_in_channels is not None:  # nested as in sgm's checkpoints: label_emb.0.0, label_emb.0.2
            self.label_emb = nn.Sequential(nn.Sequential(nn.Linear(c.adm_in_channels, emb_dim), nn.SiLU(),
                                                         nn.Linear(emb_dim, emb_dim)))
        ch = c.model_channels
        self.input_blocks = nn.ModuleList([TimestepBlock(nn.Conv2d(c.in_channels, ch, 3, padding=1))])
        self.skip_channels = [ch]     # the width of each input block's output, which the up path takes as a skip
        self.level_ends: list[int] = []  # per level, the input block whose output a T2I-Adapter feature joins
        for level, mult in enumerate(c.channel_mult):
            for _ in range(c.num_res_blocks):
                layers = [self.res_block(ch, mult * c.model_channels)]
                ch = mult * c.model_channels
                if c.has_attention(level):
                    layers.append(self.transformer(ch, c.transformer_depth[level]))
                self.input_blocks.append(TimestepBlock(*layers))
                self.skip_channels.append(ch)
            if level != len(c.channel_mult) - 1:
                self.input_blocks.append(TimestepBlock(Downsample(ch)))
                self.skip_channels.append(ch)
            # diffusers adds a feature before the Downsample in levels with attention, after it in the others
            self.level_ends.append(len(self.input_blocks) - 1 - (c.has_attention(level) and
                                                                 level != len(c.channel_mult) - 1))
        self.middle_block = TimestepBlock(self.res_block(ch, ch), self.transformer(ch, c.transformer_depth_middle),
                                          self.res_block(ch, ch))

    def res_block(self, ch_in: int, ch_out: int) -> ResBlock:
        return ResBlock(ch_in, ch_out, 4 * self.config.model_channels, self.config.norm_groups)

    def transformer(self, ch: int, depth: int) -> SpatialTransformer:
        c = self.config
        return SpatialTransformer(ch, *c.heads(ch), depth, c.context_dim, c.use_linear_in_transformer,
                                  c.norm_groups, c.upcast_attention)

    def embedding(self, sample: torch.Tensor, timestep: torch.Tensor | float | int,
                  text_embeds: torch.Tensor | None, time_ids: torch.Tensor | None) -> torch.Tensor:
        """emb of the ResBlocks: MLP(sinusoid(t)), plus SDXL's MLP(y) of the pooled text and the time ids."""
        t = _batch_timesteps(timestep, sample)
        emb = self.time_embed(timestep_embedding(t, self.config.model_channels).to(sample.dtype))
        if self.config.adm_in_channels is not None:
            emb = emb + self.label_emb(self.added_vector(text_embeds, time_ids).to(emb.dtype))
        elif text_embeds is not None or time_ids is not None:
            raise ValueError("text_embeds and time_ids are SDXL's; this UNet has no added embedding (label_emb)")
        return emb

    def added_vector(self, text_embeds: torch.Tensor | None, time_ids: torch.Tensor | None) -> torch.Tensor:
        """SDXL's y = [pooled text (B, P); each time id's sinusoidal embedding (B, n·256)] (sgm's conditioner)."""
        if text_embeds is None or time_ids is None:
            raise ValueError("an SDXL UNet needs text_embeds (the pooled text embedding) and time_ids (the size and "
                             "crop micro-conditioning)")
        ids = timestep_embedding(time_ids.reshape(-1), self.config.time_id_dim).reshape(len(time_ids), -1)
        y = torch.cat([text_embeds.to(ids.dtype), ids], dim=-1)  # (B, adm_in_channels)
        if y.shape[-1] != self.config.adm_in_channels:
            raise ValueError(f"text_embeds {tuple(text_embeds.shape)} and time_ids {tuple(time_ids.shape)} give "
                             f"{y.shape[-1]} values; this UNet's label_emb takes {self.config.adm_in_channels}")
        return y


class UNetModel(UNetEncoder):
    """Noise predictor ε_θ(z_t, t, c): a ResBlock/transformer UNet with skips (LDM §3.3; openaimodel.py).

    SDXL adds `label_emb`, an MLP of y = [pooled text; sinusoidal time ids] whose output joins the timestep
    embedding (Podell et al. 2023, §2.1-2.2; sgm's `num_classes: sequential`).
    """

    def __init__(self, config: UNetConfig):
        super().__init__(config)
        c, ch, skip_channels = config, config.model_channels * config.channel_mult[-1], list(self.skip_channels)
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(c.channel_mult))):
            for i in range(c.num_res_blocks + 1):
                layers = [self.res_block(ch + skip_channels.pop(), mult * c.model_channels)]
                ch = mult * c.model_channels
                if c.has_attention(level):
                    layers.append(self.transformer(ch, c.transformer_depth[level]))
                if level != 0 and i == c.num_res_blocks:
                    layers.append(Upsample(ch))
                self.output_blocks.append(TimestepBlock(*layers))
        self.out = nn.Sequential(nn.GroupNorm(c.norm_groups, ch, eps=1e-5), nn.SiLU(),
                                 nn.Conv2d(ch, c.out_channels, 3, padding=1))

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor | float | int, context: torch.Tensor,
                text_embeds: torch.Tensor | None = None, time_ids: torch.Tensor | None = None,
                down_residuals: list[torch.Tensor] | None = None, mid_residual: torch.Tensor | None = None,
                adapter_features: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Predict ε (or v) for `sample` (B, in_channels, H, W) at `timestep`, attending to `context` (B, 77, D).

        Args:
            sample: the noisy latent z_t.
            timestep: a number, a 0-d tensor or one per sample (B,); fractional values are fine.
            context: text-encoder hidden states.
            text_embeds, time_ids: SDXL's pooled text embedding (B, 1280) and micro-conditioning ids (B, 6),
                as diffusers' added_cond_kwargs; None for SD 1.x / 2.x.
            down_residuals, mid_residual: a ControlNet's output, one residual per skip and one for the middle
                block, added where diffusers adds its down/mid_block_additional_residual(s).
            adapter_features: a T2I-Adapter's features, one per level (SDXL: the last joins the middle block),
                added inside the down path as diffusers' down_intrablock_additional_residuals.
        """
        emb = self.embedding(sample, timestep, text_embeds, time_ids)
        features = self._adapter_features(adapter_features)
        h, skips = sample, []
        for n, block in enumerate(self.input_blocks):
            h = block(h, emb, context)
            if n in features:
                h = h + features.pop(n)
            skips.append(h)
        if down_residuals is not None:
            if len(down_residuals) != len(skips):
                raise ValueError(f"down_residuals has {len(down_residuals)} tensors; this UNet has {len(skips)} skips")
            skips = [skip + r for skip, r in zip(skips, down_residuals)]
        h = self.middle_block(h, emb, context)
        if "middle" in features:
            h = h + features.pop("middle")
        if mid_residual is not None:
            h = h + mid_residual
        for block in self.output_blocks:
            h = torch.cat([h, skips.pop()], dim=1)  # (B, C + C_skip, H, W)
            h = block(h, emb, context, size=skips[-1].shape[-2:] if skips else None)
        return self.out(h)

    def _adapter_features(self, features: list[torch.Tensor] | None) -> dict[int | str, torch.Tensor]:
        """{input block index, or "middle": feature}: level i's feature joins the output of level_ends[i]; one
        more feature joins the middle block (T2I-Adapter-XL's fourth, for SDXL's three levels)."""
        if features is None:
            return {}
        places: list[int | str] = [*self.level_ends, "middle"]
        if len(features) > len(places):
            raise ValueError(f"{len(features)} adapter features for a UNet with {len(self.level_ends)} levels; "
                             f"at most {len(places)} (one per level and one for the middle block)")
        return dict(zip(places, features))

def _batch_timesteps(timestep: torch.Tensor | float | int, sample: torch.Tensor) -> torch.Tensor:
    """One timestep per sample, (B,), on the sample's device; dtypes as diffusers makes them."""
    if not torch.is_tensor(timestep):
        timestep = torch.tensor([timestep], dtype=torch.float64 if isinstance(timestep, float) else torch.int64)
    return timestep.reshape(-1).to(sample.device).expand(sample.shape[0])
