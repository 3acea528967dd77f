"""CLIP text encoder: prompts -> the (B, 77, D) context the UNet cross-attends to (Radford et al. 2021, §2.4).

A thin wrapper over open_clip's tokenizer and transformer blocks, so that module names are open_clip's
and an SD2 checkpoint's `cond_stage_model.model.*` weights load with plain `load_state_dict`.
"""
from __future__ import annotations

import functools
import unicodedata
from dataclasses import dataclass

import regex
import torch
from open_clip.tokenizer import SimpleTokenizer
from open_clip.transformer import LayerNorm, QuickGELU, Transformer
from torch import nn

# open_clip's plain ViT configs use nn.GELU; OpenAI's CLIP (SD1) was trained with QuickGELU x·σ(1.702x).
ACTIVATIONS = {"quick_gelu": QuickGELU, "gelu": nn.GELU}


@dataclass(frozen=True)
class TextEncoderConfig:
    """Shape and reading of a CLIP text transformer (Radford et al. 2021, §2.4; SD's FrozenCLIPEmbedder)."""

    width: int  # hidden size D of each token's feature vector
    layers: int  # residual attention blocks held (and loaded); the last ones may go unused
    heads: int  # attention heads; width // 64 in every released CLIP
    activation: str = "quick_gelu"  # MLP nonlinearity: "quick_gelu" (OpenAI ViT-L/14, SD1), "gelu" (ViT-H/14, SD2)
    layer_index: int = -1  # block whose output (then ln_final) feeds the UNet: -1 last (SD1), -2 penultimate (SD2)
    pad_token_id: int = 49407  # fills the prompt after EOS: <|endoftext|> 49407 for SD1, "!" 0 for SD2
    vocab_size: int = 49408  # CLIP BPE vocabulary, <|startoftext|> and <|endoftext|> included
    context_length: int = 77  # tokens per prompt, BOS and EOS included

    def __post_init__(self):
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation {self.activation!r} is not one of {sorted(ACTIVATIONS)}")
        if not -self.layers <= self.layer_index <= -1:
            raise ValueError(f"layer_index {self.layer_index} must lie in [-{self.layers}, -1]")
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by heads {self.heads}")

    @classmethod
    def from_transformers(cls, config: dict, pad_token_id: int) -> TextEncoderConfig:
        """The config of a diffusers folder's `text_encoder/config.json` (transformers' CLIPTextConfig).

        Such folders realise SD2's penultimate layer by storing 23 of ViT-H's 24 layers, so the last stored
        layer is always the one read. The pad token lives in the tokenizer folder, hence the argument.
        """
        if config["intermediate_size"] != 4 * config["hidden_size"]:
            raise ValueError(f"intermediate_size {config['intermediate_size']} must be 4 x hidden_size "
                             f"{config['hidden_size']}, as in every CLIP text encoder")
        return cls(width=config["hidden_size"], layers=config["num_hidden_layers"],
                   heads=config["num_attention_heads"], activation=config["hidden_act"], layer_index=-1,
                   pad_token_id=pad_token_id, vocab_size=config["vocab_size"],
                   context_length=config["max_position_embeddings"])


SD1_TEXT = TextEncoderConfig(width=768, layers=12, heads=12)  # OpenAI CLIP ViT-L/14
SD2_TEXT = TextEncoderConfig(width=1024, layers=24, heads=16, activation="gelu", layer_index=-2,
                             pad_token_id=0)  # OpenCLIP ViT-H/14
TINY_SD1_TEXT = TextEncoderConfig(width=64, layers=2, heads=2)
TINY_SD2_TEXT = TextEncoderConfig(width=64, layers=3, heads=2, activation="gelu", layer_index=-2, pad_token_id=0)


# transformers' CLIPTokenizer pre-tokenizer (CLIP's, with its own special-token names): words, digits, punctuation.
WORD_PATTERN = regex.compile(r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|"
                             r"[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+")


@functools.cache
def _bpe() -> SimpleTokenizer:
    # Reading the 49k merges takes a second; every encoder shares one tokenizer.
    return SimpleTokenizer()


def bpe_ids(text: str) -> list[int]:
    """CLIP's byte-pair encoding of text, cleaned as transformers' CLIPTokenizer cleans it (NFC, one space, lower case).

    open_clip's own `encode` also runs ftfy and HTML unescaping, which transformers 5 (hence diffusers) does not,
    and names its special tokens <start_of_text> / <end_of_text>.
    """
    bpe = _bpe()
    text = " ".join(unicodedata.normalize("NFC", text).split()).lower()
    words = ("".join(bpe.byte_encoder[b] for b in word.encode("utf-8")) for word in WORD_PATTERN.findall(text))
    return [bpe.encoder[piece] for word in words for piece in bpe.bpe(word).split(" ")]


@functools.cache
def special_tokens(pad_token_id: int) -> dict[str, int]:
    """Strings transformers' CLIPTokenizer maps to ids before cleaning and BPE, so they never merge with neighbours."""
    special = {"<|startoftext|>": _bpe().sot_token_id, "<|endoftext|>": _bpe().eot_token_id}
    if pad_token_id not in special.values():  # SD2's "!": a prompt's "!!" is two pad tokens, not one "!!" token
        special[_bpe().decode([pad_token_id]).strip()] = pad_token_id
    return special


def prompt_ids(prompt: str, pad_token_id: int) -> list[int]:
    """A prompt's token ids, without BOS and EOS, split and encoded as transformers' CLIPTokenizer does."""
    special = special_tokens(pad_token_id)
    parts = regex.split("(" + "|".join(map(regex.escape, special)) + ")", prompt)
    return [i for part in parts for i in ([special[part]] if part in special else bpe_ids(part))]


class TextEncoder(nn.Module):
    """CLIP's causal text transformer, read at `config.layer_index` then layer-normed (SD's FrozenCLIPEmbedder)."""

    def __init__(self, config: TextEncoderConfig):
        super().__init__()
        c = self.config = config
        self.token_embedding = nn.Embedding(c.vocab_size, c.width)
        self.positional_embedding = nn.Parameter(torch.empty(c.context_length, c.width).normal_(std=0.01))
        self.transformer = Transformer(c.width, c.layers, c.heads, act_layer=ACTIVATIONS[c.activation])
        self.ln_final = LayerNorm(c.width)

    def tokenize(self, prompts: str | list[str]) -> torch.Tensor:
        """BOS, BPE tokens, EOS, then pad: (B, 77) ids, equal to transformers' CLIPTokenizer.

        Args:
            prompts: one prompt or a list of them; tokens beyond 75 are dropped, EOS stays last.
        """
        prompts = [prompts] if isinstance(prompts, str) else prompts
        if not isinstance(prompts, (list, tuple)) or not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"prompts must be a string or a non-empty list of strings, got {prompts!r}")
        n, pad = self.config.context_length, self.config.pad_token_id
        bos, eos = _bpe().sot_token_id, _bpe().eot_token_id
        rows = [[bos, *prompt_ids(p, pad)[: n - 2], eos] for p in prompts]
        return torch.tensor([row + [pad] * (n - len(row)) for row in rows])

    def forward(self, prompts: str | list[str] | torch.Tensor) -> torch.Tensor:
        """The UNet's context: (B, 77, width), on the module's device and dtype.

        Args:
            prompts: prompt strings, or token ids (B, 77) from `tokenize`.
        """
        n = self.config.context_length
        tokens = prompts if isinstance(prompts, torch.Tensor) else self.tokenize(prompts)
        if tokens.dtype != torch.long or tokens.shape[1:] != (n,):
            raise ValueError(f"token ids must be int64 of shape (B, {n}), got {tokens.dtype} {tuple(tokens.shape)}")
        # Positions are always 0..76: checkpoints' position_ids (int, float or absent) are never read.
        x = self.token_embedding(tokens.to(self.positional_embedding.device)) + self.positional_embedding  # (B, 77, D)
        # Causal mask: token i attends to tokens 0..i only, as CLIP was trained. Built here rather than kept as a
        # buffer, so an encoder made on the meta device loads with load_state_dict(assign=True).
        mask = torch.full((n, n), float("-inf"), device=x.device, dtype=x.dtype).triu(1)
        for block in self.transformer.resblocks[: self.config.layers + self.config.layer_index + 1]:
            x = block(x, attn_mask=mask)
        return self.ln_final(x)
