"""CLIP text encoder: prompts -> the (B, 77, D) context the UNet cross-attends to (Radford et al. 2021, §2.4).

A thin wrapper over open_clip's tokenizer and transformer blocks, so that module names are open_clip's
and an SD2 checkpoint's `cond_stage_model.model.*` weights load with plain `load_state_dict`. Textual inversion
(adapters/textual_inversion.py) adds words of its own: `add_token` appends their vectors to `token_embedding`.
"""
from __future__ import annotations

import functools
import unicodedata
from dataclasses import dataclass, replace

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
    final_norm: bool = True  # ln_final on the context: SD1/SD2 yes, SDXL no (it reads the raw penultimate layer)
    projection_dim: int | None = None  # SDXL's bigG: the pooled output ln_final(last layer)[EOS] @ text_projection

    def __post_init__(self):
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation {self.activation!r} is not one of {sorted(ACTIVATIONS)}")
        if not -self.layers <= self.layer_index <= -1:
            raise ValueError(f"layer_index {self.layer_index} must lie in [-{self.layers}, -1]")
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by heads {self.heads}")

    @classmethod
    def from_transformers(cls, config: dict, pad_token_id: int, sdxl: bool = False,
                          projection: bool = False) -> TextEncoderConfig:
        """The config of a diffusers folder's `text_encoder/config.json` (transformers' CLIPTextConfig).

        SD folders realise SD2's penultimate layer by storing 23 of ViT-H's 24 layers, so the last stored
        layer is the one read. SDXL folders store every layer and read the penultimate one without the final
        norm (`sdxl`); a CLIPTextModelWithProjection (`projection`) also gives the pooled output. The pad
        token lives in the tokenizer folder, hence the argument.
        """
        if config["intermediate_size"] != 4 * config["hidden_size"]:
            raise ValueError(f"intermediate_size {config['intermediate_size']} must be 4 x hidden_size "
                             f"{config['hidden_size']}, as in every CLIP text encoder")
        return cls(width=config["hidden_size"], layers=config["num_hidden_layers"],
                   heads=config["num_attention_heads"], activation=config["hidden_act"],
                   layer_index=-2 if sdxl else -1, pad_token_id=pad_token_id, vocab_size=config["vocab_size"],
                   context_length=config["max_position_embeddings"], final_norm=not sdxl,
                   projection_dim=config["projection_dim"] if projection else None)


SD1_TEXT = TextEncoderConfig(width=768, layers=12, heads=12)  # OpenAI CLIP ViT-L/14
SD2_TEXT = TextEncoderConfig(width=1024, layers=24, heads=16, activation="gelu", layer_index=-2,
                             pad_token_id=0)  # OpenCLIP ViT-H/14
TINY_SD1_TEXT = TextEncoderConfig(width=64, layers=2, heads=2)
TINY_SD2_TEXT = TextEncoderConfig(width=64, layers=3, heads=2, activation="gelu", layer_index=-2, pad_token_id=0)
# SDXL reads both towers at the penultimate layer, before ln_final; bigG also gives the pooled embedding.
SDXL_CLIP_L = replace(SD1_TEXT, layer_index=-2, final_norm=False)  # OpenAI CLIP ViT-L/14
SDXL_CLIP_G = TextEncoderConfig(width=1280, layers=32, heads=20, activation="gelu", layer_index=-2, pad_token_id=0,
                                final_norm=False, projection_dim=1280)  # OpenCLIP ViT-bigG/14


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


def bos_eos() -> tuple[int, int]:
    """CLIP's <|startoftext|> and <|endoftext|> ids, which open and close every 77-token context."""
    return _bpe().sot_token_id, _bpe().eot_token_id


@functools.cache
def special_tokens(pad_token_id: int) -> dict[str, int]:
    """Strings transformers' CLIPTokenizer maps to ids before cleaning and BPE, so they never merge with neighbours."""
    special = {"<|startoftext|>": _bpe().sot_token_id, "<|endoftext|>": _bpe().eot_token_id}
    if pad_token_id not in special.values():  # SD2's "!": a prompt's "!!" is two pad tokens, not one "!!" token
        special[_bpe().decode([pad_token_id]).strip()] = pad_token_id
    return special


def in_clip_vocabulary(word: str) -> bool:
    """Whether CLIP's vocabulary holds the word, in any case: whole ("cat</w>"), as a piece ("cat") or special."""
    bpe, word = _bpe(), word.lower()
    piece = "".join(bpe.byte_encoder[b] for b in word.encode("utf-8"))
    return piece in bpe.encoder or piece + "</w>" in bpe.encoder or word in special_tokens(bpe.eot_token_id)


def token_pattern(tokens: list[str]) -> regex.Pattern:
    """One group per token, in the given order (longest first, so a longer token wins where both could match).

    A token matches in any case, with any run of whitespace between its words, and never inside a word: where it
    begins (ends) with a letter or digit, the prompt's character just before (after) the match is not one. So
    "mystyle" fires in "a MyStyle", "mystyle," and "(mystyle)", not in "mystyles" or "notmystyle"; "<my-style>"
    fires in "a<my-style>b" too.
    """
    edge = regex.compile(r"[\p{L}\p{N}]")
    groups = []
    for token in tokens:
        body = r"\s+".join(map(regex.escape, token.split()))
        before = r"(?<![\p{L}\p{N}])" if edge.match(token[0]) else ""
        after = r"(?![\p{L}\p{N}])" if edge.match(token[-1]) else ""
        groups.append(f"({before}{body}{after})")
    return regex.compile("|".join(groups), regex.IGNORECASE)


def prompt_ids(prompt: str, pad_token_id: int) -> list[int]:
    """A prompt's token ids, without BOS and EOS, split and encoded as transformers' CLIPTokenizer does."""
    special = special_tokens(pad_token_id)
    parts = regex.split("(" + "|".join(map(regex.escape, special)) + ")", prompt)
    return [i for part in parts for i in ([special[part]] if part in special else bpe_ids(part))]


class TextEncoder(nn.Module):
    """CLIP's causal text transformer, read at `config.layer_index` then layer-normed (SD's FrozenCLIPEmbedder;
    SDXL reads the raw penultimate layer, and its bigG also gives a pooled embedding)."""

    def __init__(self, config: TextEncoderConfig):
        super().__init__()
        c = self.config = config
        self.token_embedding = nn.Embedding(c.vocab_size, c.width)
        self.added_tokens: dict[str, list[int]] = {}  # textual inversion: word -> its ids, vocab_size and above
        self._added_order: list[str] = []  # added_tokens longest first, the order of token_pattern's groups
        self._added_pattern: regex.Pattern | None = None
        self.positional_embedding = nn.Parameter(torch.empty(c.context_length, c.width).normal_(std=0.01))
        self.transformer = Transformer(c.width, c.layers, c.heads, act_layer=ACTIVATIONS[c.activation])
        self.ln_final = LayerNorm(c.width)
        if c.projection_dim is not None:  # open_clip's (width, embed_dim) matrix, applied as x @ text_projection
            self.text_projection = nn.Parameter(torch.empty(c.width, c.projection_dim).normal_(std=c.width ** -0.5))

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
        rows = [[bos, *self.text_ids(p)[: n - 2], eos] for p in prompts]
        return torch.tensor([row + [pad] * (n - len(row)) for row in rows])

    def text_ids(self, text: str) -> list[int]:
        """A text's ids without BOS and EOS: each added token (see `token_pattern`) as its ids, the rest as CLIP's."""
        return [i for piece in self.text_pieces(text) for i in ([piece] if isinstance(piece, int) else piece)]

    def text_pieces(self, text: str) -> list[int | tuple[int, ...]]:
        """text_ids, with each added token's ids as one tuple (A1111 keeps an embedding inside one chunk)."""
        pad = self.config.pad_token_id
        if self._added_pattern is None:
            return prompt_ids(text, pad)
        text, pieces, start = unicodedata.normalize("NFC", text), [], 0
        for match in self._added_pattern.finditer(text):
            token = self._added_order[match.lastindex - 1]
            pieces += [*prompt_ids(text[start:match.start()], pad), tuple(self.added_tokens[token])]
            start = match.end()
        return pieces + prompt_ids(text[start:], pad)

    def check_new_token(self, token: str, vectors: torch.Tensor) -> str:
        """The token as `add_token` stores it (NFC, single spaces), or a ValueError saying why it cannot be added."""
        word = " ".join(unicodedata.normalize("NFC", token).split())
        if not word:
            raise ValueError(f"token {token!r} is empty; a textual inversion embedding needs a word for prompts to use")
        if in_clip_vocabulary(word):
            raise ValueError(f"token {word!r} is already in CLIP's vocabulary, and an embedding would hide that word; "
                             f"pass token= with a word CLIP does not know, such as '<{word}>'")
        loaded = {t.lower(): t for t in self.added_tokens}
        if word.lower() in loaded:
            raise ValueError(f"token {word!r} is already loaded (as {loaded[word.lower()]!r}; tokens match in any "
                             f"case) and is never overwritten; pass another token=")
        if vectors.ndim != 2 or not len(vectors) or vectors.shape[1] != self.config.width:
            raise ValueError(f"vectors of shape {tuple(vectors.shape)} do not fit this text encoder: it takes "
                             f"(n_vectors >= 1, width {self.config.width})")
        return word

    def add_token(self, token: str, vectors: torch.Tensor) -> list[int]:
        """Give a new word its own rows of `token_embedding` (textual inversion), ids vocab_size, vocab_size + 1, ...

        Args:
            token: the word prompts use; it matches as `token_pattern` says.
            vectors: (n_vectors, width); the word reads as n_vectors tokens.
        Returns: the new ids.
        """
        word = self.check_new_token(token, vectors)
        old, c = self.token_embedding.weight, self.config
        grown = nn.Embedding(c.vocab_size + len(vectors), c.width, device=old.device, dtype=old.dtype)
        with torch.no_grad():
            grown.weight.copy_(torch.cat([old, vectors.to(old)]))
        grown.weight.requires_grad_(old.requires_grad)
        self.token_embedding = grown
        self.config = replace(c, vocab_size=grown.num_embeddings)  # so TextEncoder(config) loads this state dict
        self.added_tokens[word] = list(range(c.vocab_size, grown.num_embeddings))
        self._added_order = sorted(self.added_tokens, key=len, reverse=True)
        self._added_pattern = token_pattern(self._added_order)
        return self.added_tokens[word]

    def forward(self, prompts: str | list[str] | torch.Tensor, clip_skip: int | None = None) -> torch.Tensor:
        """The UNet's context: (B, 77, width), on the module's device and dtype.

        Args:
            prompts: prompt strings, or token ids (B, 77) from `tokenize`.
            clip_skip: read that many blocks before the one the config reads (diffusers' meaning, see `encode`).
        """
        return self.encode(prompts, clip_skip)[0]

    def encode(self, prompts: str | list[str] | torch.Tensor,
               clip_skip: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(context (B, 77, width), pooled (B, projection_dim) or None when the tower has no projection).

        clip_skip k reads the output of k blocks before the one `config.layer_index` names, through the same
        final norm (or none): SD 1.x's hidden state -(k+1) then ln_final, SDXL's -(k+2) raw, as diffusers. The
        pooled embedding always comes from the last block.
        """
        c, n = self.config, self.config.context_length
        tokens = prompts if isinstance(prompts, torch.Tensor) else self.tokenize(prompts)
        if tokens.dtype != torch.long or tokens.shape[1:] != (n,):
            raise ValueError(f"token ids must be int64 of shape (B, {n}), got {tokens.dtype} {tuple(tokens.shape)}")
        tokens = tokens.to(self.positional_embedding.device)
        # Positions are always 0..76: checkpoints' position_ids (int, float or absent) are never read.
        x = self.token_embedding(tokens) + self.positional_embedding  # (B, 77, D)
        # Causal mask: token i attends to tokens 0..i only, as CLIP was trained. Built here rather than kept as a
        # buffer, so an encoder made on the meta device loads with load_state_dict(assign=True).
        mask = torch.full((n, n), float("-inf"), device=x.device, dtype=x.dtype).triu(1)
        read_at = c.layers + c.layer_index + 1 - (clip_skip or 0)  # blocks run before the context is read
        if read_at < 1:
            raise ValueError(f"clip_skip {clip_skip} skips all {read_at + clip_skip} blocks this text encoder reads "
                             f"through; at most {read_at + clip_skip - 1}")
        pooled = None
        for i, block in enumerate(self.transformer.resblocks[: c.layers if c.projection_dim else read_at]):
            x = block(x, attn_mask=mask)
            if i + 1 == read_at:
                context = self.ln_final(x) if c.final_norm else x
        if c.projection_dim is not None:  # CLIP's text feature: the final-normed state at the (first) EOS token
            # found by its id, not as transformers' legacy argmax(ids), which an added token (id > EOS) would win
            eos = (tokens == _bpe().eot_token_id).int().argmax(dim=1)  # (B,)
            pooled = self.ln_final(x)[torch.arange(len(x), device=x.device), eos] @ self.text_projection
        return context, pooled


class DualTextEncoder(nn.Module):
    """SDXL's text conditioning: OpenAI CLIP ViT-L and OpenCLIP ViT-bigG, their penultimate layers concatenated
    (768 + 1280 = 2048 per token) and bigG's pooled embedding (Podell et al. 2023, §2.1). The refiner has bigG only.
    """

    def __init__(self, clip_l: TextEncoderConfig | None, clip_g: TextEncoderConfig):
        super().__init__()
        if clip_g.projection_dim is None:
            raise ValueError("SDXL's second text encoder needs projection_dim: it gives the pooled embedding")
        self.clip_l = TextEncoder(clip_l) if clip_l is not None else None
        self.clip_g = TextEncoder(clip_g)

    def forward(self, prompts: str | list[str], prompts_2: str | list[str] | None = None,
                clip_skip: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(context (B, 77, 2048), pooled (B, 1280)); the refiner's context is bigG's alone, (B, 77, 1280).

        Args:
            prompts: the text for CLIP ViT-L (and, on the refiner, for bigG, as diffusers reads it).
            prompts_2: the text for bigG; None = prompts.
            clip_skip: on both towers (TextEncoder.encode).
        """
        if self.clip_l is None:
            if prompts_2 is not None and prompts_2 != prompts:
                raise ValueError("the refiner has one text encoder (bigG), which reads `prompts`; prompts_2 has "
                                 "nowhere to go")
            return self.clip_g.encode(prompts, clip_skip)
        context_l, _ = self.clip_l.encode(prompts, clip_skip)
        context_g, pooled = self.clip_g.encode(prompts if prompts_2 is None else prompts_2, clip_skip)
        if len(context_l) != len(context_g):
            raise ValueError(f"prompts and prompts_2 must be as many, got {len(context_l)} and {len(context_g)}")
        return torch.cat([context_l, context_g], dim=-1), pooled  # (B, 77, 768 + 1280)


def text_towers(text_encoder: TextEncoder | DualTextEncoder) -> dict[str, TextEncoder]:
    """{component path: tower} of a model's text encoder: one for SD 1.x / 2.x, clip_l and clip_g for SDXL (the
    refiner: clip_g), in the order their contexts are concatenated."""
    if isinstance(text_encoder, TextEncoder):
        return {"text_encoder": text_encoder}
    towers = {"text_encoder.clip_l": text_encoder.clip_l, "text_encoder.clip_g": text_encoder.clip_g}
    return {component: tower for component, tower in towers.items() if tower is not None}
