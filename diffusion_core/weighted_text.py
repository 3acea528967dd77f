"""AUTOMATIC1111-weighted prompts as the UNet's context: 75-token chunks, "Original" emphasis, text over the steps.

prompts.py reads the syntax; this file encodes it as stable-diffusion-webui's sd_hijack_clip.py does. Each chunk of
75 tokens is wrapped in BOS / EOS and read by CLIP on its own, giving z (77, D). Every token's state is multiplied
by its weight w, and the chunk rescaled so that its mean is what it was (A1111's "Original" emphasis):

    z' = (z ⊙ w) · mean(z) / mean(z ⊙ w)

The chunks are laid side by side, (1, 77·n, D): cross-attention reads any number of tokens, so a long prompt is
not cut at 77. SDXL does this on each tower with the same text and takes the pooled embedding from the first chunk.
A1111 takes each mean over the whole batch of prompts in a chunk; here it is each prompt's own, which is the same
for one image and keeps an image independent of its batch mates.
"""
from __future__ import annotations

import torch

from .models.text_encoder import DualTextEncoder, TextEncoder, bos_eos, text_towers
from .prompts import COMMA_BACKTRACK, Chunk, empty_chunk, parse_prompt_attention, prompt_chunks, prompt_schedules
from .sampling import Conditioning


def text_chunks(tower: TextEncoder, text: str, comma_backtrack: int = COMMA_BACKTRACK) -> list[Chunk]:
    """A prompt in A1111's syntax as the tower's 77-token chunks, each token with its emphasis weight."""
    bos, eos = bos_eos()
    return prompt_chunks(parse_prompt_attention(text), tower.text_pieces, bos=bos, eos=eos,
                         pad=tower.config.pad_token_id, comma_backtrack=comma_backtrack)


def emphasised_context(tower: TextEncoder, chunks: list[Chunk],
                       clip_skip: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(context (1, 77·n, D), pooled (1, P) from the first chunk, or None): each chunk encoded, then emphasised."""
    tokens = torch.tensor([chunk.tokens for chunk in chunks])
    z, pooled = tower.encode(tokens, clip_skip)  # (n, 77, D): the chunks as a batch, each read on its own
    w = torch.tensor([chunk.weights for chunk in chunks], device=z.device)[..., None]  # (n, 77, 1)
    original = z.float()  # the means in fp32: in fp16 or bf16 their rounding would rescale an unweighted chunk
    weighted = original * w
    weighted = weighted * (original.mean(dim=(1, 2), keepdim=True) / weighted.mean(dim=(1, 2), keepdim=True))
    return weighted.to(z.dtype).reshape(1, -1, z.shape[-1]), None if pooled is None else pooled[:1]


class WeightedTextEncoder:
    """A model's text encoder reading A1111's syntax: texts (one per tower) -> Conditioning with n chunks.

    SD 1.x / 2.x have one tower; SDXL two (CLIP ViT-L, then bigG, whose contexts are concatenated per token and
    whose pooled embedding is the text_embeds); the refiner bigG only.
    """

    def __init__(self, text_encoder: TextEncoder | DualTextEncoder, clip_skip: int | None = None):
        self.towers = list(text_towers(text_encoder).values())
        self.clip_skip = clip_skip
        self._encoded: dict[tuple[tuple[str, ...], int], Conditioning] = {}  # a text that holds for many steps

    def chunk_count(self, schedules: list[list[tuple[int, tuple[str, ...]]]]) -> int:
        """The chunks the longest text takes, of any row at any step (merged_schedule's rows); all are padded to it."""
        return max(len(text_chunks(tower, text)) for schedule in schedules for _, texts in schedule
                   for tower, text in zip(self.towers, texts, strict=True))

    def __call__(self, texts: tuple[str, ...], n_chunks: int) -> Conditioning:
        """One row: each tower reads its text, padded with empty chunks (A1111's) to n_chunks."""
        if (texts, n_chunks) not in self._encoded:
            self._encoded[texts, n_chunks] = self._encode(texts, n_chunks)
        return self._encoded[texts, n_chunks]

    def _encode(self, texts: tuple[str, ...], n_chunks: int) -> Conditioning:
        bos, eos = bos_eos()
        contexts, pooled = [], None
        for tower, text in zip(self.towers, texts, strict=True):
            chunks = text_chunks(tower, text)
            chunks += [empty_chunk(bos=bos, eos=eos, pad=tower.config.pad_token_id)] * (n_chunks - len(chunks))
            context, tower_pooled = emphasised_context(tower, chunks, self.clip_skip)
            contexts.append(context)
            pooled = tower_pooled if tower_pooled is not None else pooled  # only bigG has a projection
        return Conditioning(torch.cat(contexts, dim=-1), pooled)


def merged_schedule(texts: tuple[str, ...], steps: int) -> list[tuple[int, tuple[str, ...]]]:
    """The prompt schedules of several texts (one per tower) as one: (last step, the texts then) at each change.

    The ends are prompt_schedules' step numbers; A1111's denoiser compares its step, counted from 0, with them, so
    (10, texts) conditions the loop's steps 0..10 (see sampling.ConditioningSchedule).
    """
    schedules = prompt_schedules(list(texts), steps)
    ends = sorted({end for schedule in schedules for end, _ in schedule})
    return [(end, tuple(text_at(schedule, end) for schedule in schedules)) for end in ends]


def text_at(schedule: list[tuple[int, object]], step: int):
    """What a schedule of (last step, value) pairs holds at a step: the first value whose last step is >= it."""
    return next(value for last, value in schedule if step <= last)
