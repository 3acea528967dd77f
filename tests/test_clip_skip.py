"""clip_skip with diffusers' meaning, for SD 1.x, SD 2.x and SDXL, images equal to diffusers fed the same embeddings.

transformers 5 flattened CLIPTextModel (no `.text_model`), which breaks diffusers' own SD1 clip_skip path
(it reaches for `text_encoder.text_model.final_layer_norm`). So the reference here is computed from transformers'
hidden states exactly as diffusers' code does, and diffusers' pipeline gets it as `prompt_embeds`:
SD 1.x / 2.x: final_layer_norm(hidden_states[-(k + 1)]); SDXL: hidden_states[-(k + 2)] of both towers, no norm,
the pooled embedding unchanged. diffusers applies clip_skip to the positive prompt only; we apply it to both, and
so does the reference below (its negative embeddings are computed the same way).
"""
from __future__ import annotations

import pytest
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image

import checkpoint_fixtures as fx
import sdxl_fixtures as sx
from diffusion_core import DiffusionModel, GenerationConfig
from test_pipeline import PROMPT, assert_same_pixels, diffusers_pipeline, seeded, checkpoint  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py
NEGATIVE = "blurry, dark"


@torch.no_grad()
def sd_embeddings(ref: dict, text: str, k: int) -> torch.Tensor:
    """diffusers' StableDiffusionPipeline.encode_prompt with clip_skip=k, on transformers 5's flat CLIPTextModel."""
    ids = ref["tokenizer"](text, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    hidden = ref["text_encoder"](ids, output_hidden_states=True).hidden_states[-(k + 1)]
    return ref["text_encoder"].final_layer_norm(hidden)


@pytest.mark.parametrize("kind, layout", [("sd1", "folder"), ("sd1", "single"), ("sd2_v", "folder"), ("sd2_v", "single")])
def test_sd_clip_skip_equals_diffusers(checkpoint, kind, layout):
    ck = checkpoint(kind)
    ours = ck.models[layout]
    config = GenerationConfig(PROMPT, negative_prompt=NEGATIVE, width=64, height=64, num_inference_steps=3, seed=5,
                              clip_skip=1)
    positive, negative = sd_embeddings(ck.ref, PROMPT, 1), sd_embeddings(ck.ref, NEGATIVE, 1)
    with torch.no_grad():
        context = ours.text_encoder([NEGATIVE, PROMPT], clip_skip=1)
    torch.testing.assert_close(context, torch.cat([negative, positive]), rtol=1e-5, atol=1e-5)
    pipe = diffusers_pipeline(StableDiffusionPipeline, ck, layout, None)
    theirs = pipe(prompt_embeds=positive, negative_prompt_embeds=negative, width=64, height=64, num_inference_steps=3,
                  generator=seeded(5)).images[0]
    assert_same_pixels(ours.generate(config, progress=False).image, theirs)
    unskipped = GenerationConfig(PROMPT, negative_prompt=NEGATIVE, width=64, height=64, num_inference_steps=3, seed=5)
    assert ours.generate(unskipped, progress=False).image.tobytes() != theirs.tobytes()


@torch.no_grad()
def sdxl_embeddings(ref: dict, text: str, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """diffusers' StableDiffusionXLPipeline.encode_prompt with clip_skip=k: (context, pooled)."""
    contexts = []
    for tokenizer, encoder in ((ref["tokenizer"], ref["text_encoder"]), (ref["tokenizer_2"], ref["text_encoder_2"])):
        ids = tokenizer(text, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        out = encoder(ids, output_hidden_states=True)
        contexts.append(out.hidden_states[-(k + 2)])
    return torch.cat(contexts, dim=-1), out[0]  # bigG's text_embeds: the pooled projection, untouched by clip_skip


@pytest.mark.parametrize("layout", ["folder", "single"])
def test_sdxl_clip_skip_equals_diffusers_on_both_prompts(tmp_path, layout):
    ref = sx.tiny_sdxl("base")
    path = (sx.save_sdxl_folder(ref, tmp_path / "xl") if layout == "folder"
            else sx.save_sdxl_single_file(ref, tmp_path / "xl.safetensors"))
    ours = DiffusionModel.from_pretrained(path)
    config = GenerationConfig(PROMPT, negative_prompt=NEGATIVE, width=64, height=64, num_inference_steps=3, seed=2,
                              clip_skip=1)
    (positive, pooled), (negative, negative_pooled) = sdxl_embeddings(ref, PROMPT, 1), sdxl_embeddings(ref, NEGATIVE, 1)
    pipe = sx.sdxl_pipeline(ref)
    theirs = pipe(prompt_embeds=positive, negative_prompt_embeds=negative, pooled_prompt_embeds=pooled,
                  negative_pooled_prompt_embeds=negative_pooled, width=64, height=64, num_inference_steps=3,
                  generator=seeded(2)).images[0]
    assert_same_pixels(ours.generate(config, progress=False).image, theirs)


def test_clip_skip_is_on_the_command_line_and_in_a1111s_infotext(tmp_path):
    from diffusion_core.cli import main
    from diffusion_core.generation import read_png_parameters
    assert main(["generate", "a red circle on a blue background", "--clip-skip", "1", "--steps", "2", "--quiet",
                 "--out", str(tmp_path)]) == 0
    [png] = tmp_path.glob("*.png")
    assert read_png_parameters(png)["clip_skip"] == 1
    assert ", Clip skip: 2" in Image.open(png).text["parameters"]


def test_clip_skip_is_checked(checkpoint):
    ours = checkpoint("sd1").models["folder"]
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="clip_skip must be"):
            GenerationConfig(PROMPT, clip_skip=bad)
    with pytest.raises(ValueError, match=r"clip_skip 2 .* 2 blocks"):
        ours.generate(GenerationConfig(PROMPT, clip_skip=2, num_inference_steps=1, width=64, height=64), progress=False)
