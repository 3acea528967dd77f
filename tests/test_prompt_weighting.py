"""prompt_weighting=True: A1111's emphasis, chunks and prompt schedules, against the formula and diffusers' images.

The reference embeddings are computed here from transformers' CLIP, chunk by chunk, token ids from transformers'
CLIPTokenizer, as A1111's sd_hijack_clip.py does it: each chunk [BOS, 75 tokens, EOS] read on its own, its
states multiplied by the token weights and rescaled to the chunk's original mean, the chunks concatenated
(the shorter of prompt / negative padded with empty chunks). diffusers then generates from those embeddings
(`prompt_embeds`), and for prompt editing and alternation its `callback_on_step_end` swaps them at A1111's steps.
"""
from __future__ import annotations

import pytest
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image

import sdxl_fixtures as sx
from diffusion_core import DiffusionModel, GenerationConfig
from diffusion_core.prompts import empty_chunk, parse_prompt_attention, prompt_chunks
from diffusion_core.weighted_text import merged_schedule
from test_pipeline import assert_same_pixels, diffusers_pipeline, seeded, checkpoint  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py
BOS, EOS = 49406, 49407
LONG = ", ".join(f"a (red:1.2) circle number {i} on a [blue] background" for i in range(9))  # > 75 tokens
WEIGHTED = "a ((red)) circle, (blue background:0.7) BREAK [[dark]] \\(not weighted\\)"


def reference_chunks(tokenizer, text: str, pad: int) -> list:
    """Our chunking of the parsed prompt, fed transformers' token ids (the chunker is tested in test_prompts)."""
    tokenize = lambda piece: tokenizer(piece, add_special_tokens=False).input_ids  # noqa: E731
    return prompt_chunks(parse_prompt_attention(text), tokenize, bos=BOS, eos=EOS, pad=pad)


@torch.no_grad()
def emphasised(encoder, chunks: list, n: int, pad: int, read) -> tuple[torch.Tensor, torch.Tensor]:
    """A1111's "Original" emphasis on transformers' states: z·w · mean(z) / mean(z·w), per chunk, concatenated."""
    chunks = chunks + [empty_chunk(bos=BOS, eos=EOS, pad=pad)] * (n - len(chunks))
    states, pooled = [], None
    for chunk in chunks:
        out = encoder(torch.tensor([chunk.tokens]), output_hidden_states=True)
        z, w = read(encoder, out), torch.tensor(chunk.weights)[None, :, None]
        states.append(z * w * (z.mean() / (z * w).mean()))
        pooled = out[0] if pooled is None else pooled  # SDXL: bigG's text_embeds of the first chunk
    return torch.cat(states, dim=1), pooled


def sd_read(k: int = 0):
    """SD 1.x / 2.x: hidden state -(k + 1), final-normed (diffusers' clip_skip k)."""
    return lambda encoder, out: encoder.final_layer_norm(out.hidden_states[-(k + 1)])


def sd_reference(ck, text: str, negative: str, k: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    tokenizer, encoder = ck.ref["tokenizer"], ck.ref["text_encoder"]
    pad = tokenizer.pad_token_id
    chunks = [reference_chunks(tokenizer, t, pad) for t in (text, negative)]
    n = max(map(len, chunks))
    return tuple(emphasised(encoder, c, n, pad, sd_read(k))[0] for c in chunks)


@pytest.mark.parametrize("kind, layout, text, k", [("sd1", "folder", LONG, 0), ("sd1", "single", WEIGHTED, 1),
                                                    ("sd2_v", "folder", WEIGHTED, 0), ("sd2_v", "single", LONG, 1)])
def test_context_equals_a1111s_formula_on_transformers_clip(checkpoint, kind, layout, text, k):
    ck = checkpoint(kind)
    ours = ck.models[layout]
    positive, negative = sd_reference(ck, text, "blurry", k)
    config = GenerationConfig(text, negative_prompt="blurry", clip_skip=k or None, prompt_weighting=True,
                              num_inference_steps=2, width=64, height=64)
    context = ours.conditioning([config], guided=True).context
    assert context.shape[1] == positive.shape[1] > 77  # several chunks, the negative padded to as many
    torch.testing.assert_close(context, torch.cat([negative, positive]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["sd1", "sd2_v"])
def test_weighted_images_equal_diffusers_fed_the_same_embeddings(checkpoint, kind):
    ck = checkpoint(kind)
    positive, negative = sd_reference(ck, WEIGHTED, "(blurry:1.4), " + LONG)
    pipe = diffusers_pipeline(StableDiffusionPipeline, ck, "folder", None)
    theirs = pipe(prompt_embeds=positive, negative_prompt_embeds=negative, width=64, height=64,
                  num_inference_steps=3, generator=seeded(4)).images[0]
    config = GenerationConfig(WEIGHTED, negative_prompt="(blurry:1.4), " + LONG, width=64, height=64,
                              num_inference_steps=3, seed=4, prompt_weighting=True)
    ours = ck.models["folder"].generate(config, progress=False).image
    assert_same_pixels(ours, theirs)
    literal = ck.models["folder"].generate(GenerationConfig(WEIGHTED, negative_prompt="(blurry:1.4), " + LONG,
                                           width=64, height=64, num_inference_steps=3, seed=4), progress=False)
    assert literal.image.tobytes() != ours.tobytes()


@pytest.mark.parametrize("prompt, texts", [
    ("a [red:green:2] circle", ["a red circle"] * 3 + ["a green circle"]),  # A1111: steps 0, 1, 2 <= 2
    ("a [red|green] circle", ["a red circle", "a red circle", "a green circle", "a red circle"]),
])
def test_prompt_editing_and_alternation_switch_at_a1111s_steps(checkpoint, prompt, texts):
    """The text of each 0-based loop step i is the first schedule entry whose end >= i (A1111's
    reconstruct_cond_batch); diffusers gets the same embeddings swapped in by callback_on_step_end."""
    ck = checkpoint("sd1")
    assert [next(t for end, (t,) in merged_schedule((prompt,), 4) if i <= end) for i in range(4)] == texts
    negative = sd_reference(ck, "", "")[0]
    embeds = [torch.cat([negative, sd_reference(ck, text, "")[0]]) for text in texts]

    def swap(pipe, i, t, tensors):
        return {"prompt_embeds": embeds[min(i + 1, 3)]}

    pipe = diffusers_pipeline(StableDiffusionPipeline, ck, "folder", "euler_a")
    theirs = pipe(prompt_embeds=embeds[0][1:], negative_prompt_embeds=negative, width=64, height=64,
                  num_inference_steps=4, generator=seeded(8), callback_on_step_end=swap,
                  callback_on_step_end_tensor_inputs=["prompt_embeds"]).images[0]
    config = GenerationConfig(prompt, width=64, height=64, num_inference_steps=4, seed=8, sampler="euler_a",
                              prompt_weighting=True)
    assert_same_pixels(ck.models["folder"].generate(config, progress=False).image, theirs)


@torch.no_grad()
def sdxl_reference(ref: dict, text: str, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Both towers at the penultimate layer, no norm, each emphasised on its own; bigG's pooled from chunk 1."""
    contexts = []
    for tokenizer, encoder in ((ref["tokenizer"], ref["text_encoder"]), (ref["tokenizer_2"], ref["text_encoder_2"])):
        pad = tokenizer.pad_token_id
        context, pooled = emphasised(encoder, reference_chunks(tokenizer, text, pad), n, pad,
                                     lambda _, out: out.hidden_states[-2])
        contexts.append(context)
    return torch.cat(contexts, dim=-1), pooled


def test_sdxl_weighted_image_equals_diffusers_fed_the_same_embeddings(tmp_path):
    ref = sx.tiny_sdxl("base")
    ours = DiffusionModel.from_pretrained(sx.save_sdxl_folder(ref, tmp_path / "xl"))
    (positive, pooled), (negative, negative_pooled) = sdxl_reference(ref, LONG, 2), sdxl_reference(ref, "[dark]", 2)
    theirs = sx.sdxl_pipeline(ref)(prompt_embeds=positive, negative_prompt_embeds=negative,
                                   pooled_prompt_embeds=pooled, negative_pooled_prompt_embeds=negative_pooled,
                                   width=64, height=64, num_inference_steps=3, generator=seeded(2)).images[0]
    config = GenerationConfig(LONG, negative_prompt="[dark]", width=64, height=64, num_inference_steps=3, seed=2,
                              prompt_weighting=True)
    assert_same_pixels(ours.generate(config, progress=False).image, theirs)


def test_an_image_does_not_depend_on_the_lengths_of_its_batch_mates(checkpoint):
    model = checkpoint("sd1").models["folder"]
    configs = [GenerationConfig(text, width=64, height=64, num_inference_steps=2, seed=i, prompt_weighting=True)
               for i, text in enumerate(["a (red:1.3) circle", LONG, "a [red:blue:1] square"])]
    batch = model.generate_batch(configs, progress=False)
    for config, result in zip(configs, batch):  # the one-chunk prompts share a batch, the long one runs alone
        assert_same_pixels(result.image, model.generate(config, progress=False).image)


def test_literal_text_is_the_default_and_plain_text_reads_the_same_both_ways(checkpoint):
    model = checkpoint("sd1").models["folder"]
    plain = GenerationConfig("a red circle", negative_prompt="blue", width=64, height=64, num_inference_steps=2)
    weighted = GenerationConfig("a red circle", negative_prompt="blue", width=64, height=64, num_inference_steps=2,
                                prompt_weighting=True)
    assert GenerationConfig("x").prompt_weighting is False
    assert torch.equal(model.conditioning([plain], True).context, model.conditioning([weighted], True).context)


def test_prompt_weighting_is_checked_and_shared_by_a_batch(checkpoint):
    model = checkpoint("sd1").models["folder"]
    with pytest.raises(ValueError, match="prompt_weighting must be True"):
        GenerationConfig("x", prompt_weighting="yes")
    configs = [GenerationConfig("x", width=64, height=64, num_inference_steps=2, prompt_weighting=w)
               for w in (True, False)]
    with pytest.raises(ValueError, match="must share prompt_weighting"):
        model.conditioning(configs, guided=True)
    with pytest.raises(ValueError, match="emphasis weight '1.2.3'"):
        model.generate(GenerationConfig("(x:1.2.3)", prompt_weighting=True, num_inference_steps=1), progress=False)


def test_prompt_weighting_is_on_the_command_line_and_redone_from_the_png(tmp_path):
    from diffusion_core.cli import main
    from diffusion_core.generation import read_png_parameters
    args = ["generate", "a (red:1.4) circle on a [blue] background", "--prompt-weighting", "--steps", "2", "--quiet"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    [png] = (tmp_path / "a").glob("*.png")
    assert read_png_parameters(png)["prompt_weighting"] is True
    assert main(["generate", "--from", str(png), "--quiet", "--out", str(tmp_path / "b")]) == 0
    [again] = (tmp_path / "b").glob("*.png")
    assert Image.open(again).tobytes() == Image.open(png).tobytes()
    assert main(["generate", "--from", str(png), "--no-prompt-weighting", "--quiet", "--out", str(tmp_path / "c")]) == 0
    [literal] = (tmp_path / "c").glob("*.png")
    assert read_png_parameters(literal)["prompt_weighting"] is False
    assert Image.open(literal).tobytes() != Image.open(png).tobytes()


def test_a_schedule_holds_each_part_up_to_its_end_and_the_refiner_counts_on():
    from diffusion_core.sampling import Conditioning, ConditioningSchedule
    schedule = ConditioningSchedule([2, 4, 6], [Conditioning(torch.full((1, 1, 1), k)) for k in range(3)])
    assert [schedule.at(i).context.item() for i in range(6)] == [0, 0, 0, 1, 1, 2]
    assert [schedule.after(4).at(i).context.item() for i in range(2)] == [1, 2]  # steps 4 and 5 of the whole
