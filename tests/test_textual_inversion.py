"""Textual-inversion embeddings equal diffusers' load_textual_inversion in every file format it reads (SD1 and SDXL),
and three tests pin down where the reference goes wrong: a token's case, a token inside another word, and SDXL's
pooled embedding read at an added token. Those tests check our result against the formula itself: the file's
vectors at the token's positions, every other position as in the prompt without the token.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file, save_file

import checkpoint_fixtures as fx
import sdxl_fixtures as sx
from diffusion_core.a1111 import version
from diffusion_core import DiffusionModel, GenerationConfig
from diffusion_core.models.text_encoder import TextEncoder
from test_pipeline import assert_same_pixels, seeded

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

TOL = dict(rtol=1e-5, atol=1e-5)
BOS, EOS, FIRST_ADDED = 49406, 49407, 49408  # CLIP's vocabulary has 49408 entries; added ids follow
LEFT, RIGHT = "a photo of", "on a blue background"  # a prompt's text around the token


def vectors(n: int, width: int = fx.TEXT_WIDTH, seed: int = 0) -> torch.Tensor:
    """(n, width) embedding vectors, large enough beside CLIP's (std ~0.05) that a misplaced one shows."""
    return 0.5 * torch.randn(n, width, generator=torch.Generator().manual_seed(seed))


def write(path: Path, state: dict) -> Path:
    if path.suffix == ".safetensors":
        save_file(state, path)
    else:
        torch.save(state, path)
    return path


def a1111_pt(token: str, v: torch.Tensor) -> dict:
    """What AUTOMATIC1111's textual-inversion training saves (modules/textual_inversion/textual_inversion.py)."""
    return {"string_to_token": {"*": 265}, "string_to_param": {"*": v.clone().requires_grad_()}, "name": token,
            "step": 3000, "sd_checkpoint": "c0ffee12", "sd_checkpoint_name": "v1-5-pruned-emaonly"}


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    """A tiny SD1 checkpoint as a diffusers folder; `fresh()` gives our model and diffusers' pipeline, unchanged."""
    folder = fx.save_diffusers_folder(fx.tiny_reference("sd1"), tmp_path_factory.mktemp("sd1") / "folder")

    def fresh():
        pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        return DiffusionModel.from_pretrained(folder), pipe
    return fresh


def diffusers_context(pipe: StableDiffusionPipeline, prompt: str) -> torch.Tensor:
    return pipe.encode_prompt(prompt, "cpu", 1, False)[0]


def diffusers_ids(pipe, tokenizer, prompt: str) -> list[int]:
    """The ids diffusers feeds its text encoder: the prompt after maybe_convert_prompt, tokenized."""
    return tokenizer(pipe.maybe_convert_prompt(prompt, tokenizer)).input_ids


@torch.no_grad()
def spliced(encoder, tokenizer, left: str, v: torch.Tensor, right: str, first_id: int = FIRST_ADDED):
    """The formula, on a transformers text encoder with no embedding loaded: `left` and `right` tokenized as without
    the token, the token's n positions holding `v` after the embedding lookup. Returns the ids we must make (the
    token's positions hold first_id, first_id + 1, ...), the encoder's output and the EOS position."""
    words = lambda text: tokenizer(text, add_special_tokens=False).input_ids  # noqa: E731
    start, n = 1 + len(words(left)), len(v)
    row = [BOS, *words(left), *[0] * n, *words(right), EOS]  # 0: a placeholder the hook overwrites
    ids = torch.tensor([row + [tokenizer.pad_token_id] * (77 - len(row))])

    def splice(module, args, output):
        output = output.clone()
        output[:, start:start + n] = v
        return output
    handle = encoder.get_input_embeddings().register_forward_hook(splice)
    try:
        output = encoder(input_ids=ids, output_hidden_states=True)
    finally:
        handle.remove()
    ids[0, start:start + n] = torch.arange(first_id, first_id + n)
    return ids, output, len(row) - 1


# ---- SD1 against diffusers, every format -----------------------------------------------------------------------

FORMATS = {  # name -> (file name, contents); A1111 files go by their stem, diffusers files by their key
    "diffusers_bin": ("learned_embeds.bin", lambda token, v: {token: v[0] if len(v) == 1 else v}),
    "diffusers_safetensors": ("learned_embeds.safetensors", lambda token, v: {token: v}),
    "a1111_pt": ("{token}.pt", a1111_pt),
    "a1111_safetensors": ("{token}.safetensors", lambda token, v: {"emb_params": v}),
}


@pytest.mark.parametrize("n", [1, 3], ids=["single_vector", "multi_vector"])
@pytest.mark.parametrize("layout", FORMATS)
def test_embedding_equals_diffusers(sd1, tmp_path, layout, n):
    ours, pipe = sd1()
    token, v = "mystyle", vectors(n)
    name, contents = FORMATS[layout]
    path = write(tmp_path / name.format(token=token), contents(token, v))
    assert ours.load_textual_inversion(path) == token
    # A1111 files name no token diffusers reads as A1111 does: pass the stem, as diffusers' docs do for .pt files
    pipe.load_textual_inversion(str(path), **({"token": token} if layout.startswith("a1111") else {}))
    prompt = f"{LEFT} {token} {RIGHT}"
    torch.testing.assert_close(ours.text_encoder(prompt), diffusers_context(pipe, prompt), **TOL)
    assert not torch.allclose(ours.text_encoder(prompt), ours.text_encoder(f"{LEFT} {RIGHT}"))  # the token counts


def test_image_with_embedding_equals_diffusers(sd1, tmp_path):
    ours, pipe = sd1()
    path = write(tmp_path / "learned_embeds.safetensors", {"<my-style>": vectors(2)})
    ours.load_textual_inversion(path)
    pipe.load_textual_inversion(str(path))
    prompt = "a red circle in <my-style> on a blue background"
    image = ours.generate(GenerationConfig(prompt, width=64, height=64, num_inference_steps=3, seed=3),
                          progress=False).image
    assert_same_pixels(image, pipe(prompt, width=64, height=64, num_inference_steps=3, generator=seeded(3)).images[0])


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_a1111_token_is_the_file_stem(sd1, tmp_path, suffix):
    ours, pipe = sd1()
    v = vectors(2)
    path = write(tmp_path / f"mystyle{suffix}", a1111_pt("another_name", v) if suffix == ".pt" else {"emb_params": v})
    assert ours.load_textual_inversion(path) == "mystyle"
    pipe.load_textual_inversion({"mystyle": v})  # the same vectors through diffusers, under the stem
    prompt = f"{LEFT} mystyle {RIGHT}"
    torch.testing.assert_close(ours.text_encoder(prompt), diffusers_context(pipe, prompt), **TOL)
    # diffusers names a file's word after its `name` field (.pt) or its key (.safetensors: "emb_params")
    _, reference = sd1()
    reference.load_textual_inversion(str(path))
    assert ("another_name" if suffix == ".pt" else "emb_params") in reference.tokenizer.get_vocab()


def test_token_argument_overrides_every_default(sd1, tmp_path):
    ours, _ = sd1()
    paths = [write(tmp_path / "a.pt", a1111_pt("a", vectors(1))), write(tmp_path / "b.safetensors", {"b": vectors(1)}),
             write(tmp_path / "c.safetensors", {"emb_params": vectors(1)})]
    assert [ours.load_textual_inversion(p, token=f"<tok{i}>") for i, p in enumerate(paths)] == ["<tok0>", "<tok1>",
                                                                                                "<tok2>"]
    assert list(ours.text_encoder.added_tokens) == ["<tok0>", "<tok1>", "<tok2>"]


def test_grown_encoder_keeps_its_config_consistent(sd1, tmp_path):
    ours, _ = sd1()
    untouched = ours.text_encoder.state_dict()
    ours.load_textual_inversion(write(tmp_path / "mystyle.pt", a1111_pt("mystyle", vectors(3))))
    encoder = ours.text_encoder
    assert encoder.config.vocab_size == encoder.token_embedding.num_embeddings == FIRST_ADDED + 3
    TextEncoder(encoder.config).load_state_dict(encoder.state_dict())  # the state dict fits the grown config
    torch.testing.assert_close(encoder.token_embedding.weight[:FIRST_ADDED], untouched["token_embedding.weight"],
                               rtol=0, atol=0)


# ---- SDXL: one file, two towers ------------------------------------------------------------------------------

@pytest.fixture
def sdxl(tmp_path):
    """Our tiny SDXL base (from a single file), diffusers' pipeline on the reference modules, and an SDXL embedding
    file with 2 clip_l and 3 clip_g vectors."""
    ref = sx.tiny_sdxl("base")
    ours = DiffusionModel.from_pretrained(sx.save_sdxl_single_file(ref, tmp_path / "xl.safetensors"))
    path = write(tmp_path / "mystyle.safetensors", {"clip_l": vectors(2, sx.WIDTH_L, 1),
                                                    "clip_g": vectors(3, sx.WIDTH_G, 2)})
    return ours, ref, path


def load_sdxl_into_diffusers(pipe, path: Path, token: str) -> None:
    """diffusers' documented recipe for SDXL embeddings: one call per tower."""
    state = load_file(path)
    pipe.load_textual_inversion(state["clip_l"], token=token, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(state["clip_g"], token=token, text_encoder=pipe.text_encoder_2,
                                tokenizer=pipe.tokenizer_2)


def test_sdxl_embedding_equals_diffusers(sdxl):
    ours, ref, path = sdxl
    assert ours.load_textual_inversion(path) == "mystyle"
    pipe = sx.sdxl_pipeline(ref)
    load_sdxl_into_diffusers(pipe, path, "mystyle")
    # transformers' fixed EOS rule (PR #24773) for diffusers' pooled output; its legacy rule is the trap tested below
    next(m for m in pipe.text_encoder_2.modules() if hasattr(m, "eos_token_id")).eos_token_id = EOS
    prompt = f"{LEFT} mystyle {RIGHT}"
    context, _, pooled, _ = pipe.encode_prompt(prompt, device="cpu", num_images_per_prompt=1,
                                               do_classifier_free_guidance=False)
    ours_context, ours_pooled = ours.text_encoder(prompt)
    torch.testing.assert_close(ours_context, context, **TOL)
    torch.testing.assert_close(ours_pooled, pooled, **TOL)
    text = ours.text_encoder
    assert [len(text.clip_l.added_tokens["mystyle"]), len(text.clip_g.added_tokens["mystyle"])] == [2, 3]


def test_refiner_takes_the_clip_g_vectors(tmp_path):
    ours = DiffusionModel.from_pretrained(sx.save_sdxl_single_file(sx.tiny_sdxl("refiner"), tmp_path / "r.safetensors"))
    v = vectors(3, sx.WIDTH_G, 2)
    path = write(tmp_path / "mystyle.safetensors", {"clip_l": vectors(2, sx.WIDTH_L), "clip_g": v})
    ours.load_textual_inversion(path)  # bigG is the refiner's one tower: the clip_l vectors have nowhere to go
    torch.testing.assert_close(ours.text_encoder.clip_g.token_embedding.weight[FIRST_ADDED:], v, rtol=0, atol=0)
    assert ours.text_encoder.clip_g.tokenize("mystyle")[0, 1:5].tolist() == [FIRST_ADDED + i for i in range(3)] + [EOS]


# ---- the reference's traps, each against the formula ---------------------------------------------------------

def test_trap_1_token_matches_in_any_case(sd1, tmp_path):
    ours, pipe = sd1()
    v = vectors(2)
    path = write(tmp_path / "learned_embeds.safetensors", {"MyStyle": v})
    ours.load_textual_inversion(path)
    ids, output, _ = spliced(pipe.text_encoder, pipe.tokenizer, LEFT, v, RIGHT)
    pipe.load_textual_inversion(str(path))
    for word in ("MyStyle", "mystyle", "MYSTYLE"):
        prompt = f"{LEFT} {word} {RIGHT}"
        assert torch.equal(ours.text_encoder.tokenize(prompt), ids)
        torch.testing.assert_close(ours.text_encoder(prompt), output.last_hidden_state, **TOL)
        # diffusers: the tokenizer yields "mystyle", which is not the added "MyStyle", so maybe_convert_prompt never
        # expands the word into MyStyle MyStyle_1 and the prompt gets the first vector only, in every case
        assert FIRST_ADDED in diffusers_ids(pipe, pipe.tokenizer, prompt)
        assert FIRST_ADDED + 1 not in diffusers_ids(pipe, pipe.tokenizer, prompt)


def test_trap_2_token_matches_only_as_a_whole_word(sd1, tmp_path):
    ours, pipe = sd1()
    v = vectors(1)
    path = write(tmp_path / "learned_embeds.safetensors", {"mystyle": v})
    ours.load_textual_inversion(path)
    # delimited by punctuation or the prompt's ends, the token fires: the formula
    for left, right in (("(", ")"), ("a photo,", ", blue"), ("", "")):
        ids, output, _ = spliced(pipe.text_encoder, pipe.tokenizer, left, v, right)
        prompt = f"{left}mystyle{right}"
        assert torch.equal(ours.text_encoder.tokenize(prompt), ids), prompt
        torch.testing.assert_close(ours.text_encoder(prompt), output.last_hidden_state, **TOL)
    # inside a word it does not: the prompt reads as it does without any embedding
    inside = ["a photo of mystyles", "notmystyle art", "mystyle2 and 2mystyle"]
    plain = pipe.tokenizer(inside, padding="max_length", max_length=77, return_tensors="pt").input_ids
    assert torch.equal(ours.text_encoder.tokenize(inside), plain)
    with torch.no_grad():
        torch.testing.assert_close(ours.text_encoder(inside), pipe.text_encoder(plain).last_hidden_state, **TOL)
    # diffusers: transformers' added tokens match anywhere, so "notmystyle" reads "not" + the embedding
    pipe.load_textual_inversion(str(path))
    assert FIRST_ADDED in diffusers_ids(pipe, pipe.tokenizer, "notmystyle art")


def test_trap_3_pooled_embedding_is_read_at_the_real_eos(sdxl):
    ours, ref, path = sdxl
    ours.load_textual_inversion(path)
    state = load_file(path)
    ids_l, output_l, _ = spliced(ref["text_encoder"], ref["tokenizer"], LEFT, state["clip_l"], RIGHT)
    ids_g, output_g, eos = spliced(ref["text_encoder_2"], ref["tokenizer_2"], LEFT, state["clip_g"], RIGHT)
    g = ref["text_encoder_2"]
    with torch.no_grad():  # CLIP's text feature: the final-normed state at EOS, projected
        expected_pooled = g.text_projection(output_g.last_hidden_state[:, eos])
    prompt = f"{LEFT} mystyle {RIGHT}"
    context, pooled = ours.text_encoder(prompt)
    assert torch.equal(ours.text_encoder.clip_g.tokenize(prompt), ids_g)
    torch.testing.assert_close(pooled, expected_pooled, **TOL)
    torch.testing.assert_close(context, torch.cat([output_l.hidden_states[-2], output_g.hidden_states[-2]], -1), **TOL)
    # diffusers: bigG's config says eos_token_id=2, so transformers pools at argmax(ids), the added token's position
    pipe = sx.sdxl_pipeline(ref)
    load_sdxl_into_diffusers(pipe, path, "mystyle")
    _, _, theirs, _ = pipe.encode_prompt(prompt, device="cpu", num_images_per_prompt=1,
                                         do_classifier_free_guidance=False)
    assert g.config.eos_token_id == 2 and ids_g[0].argmax() != eos
    assert not torch.allclose(theirs, expected_pooled, **TOL)


# ---- errors -------------------------------------------------------------------------------------------------

def test_file_of_no_known_layout_is_refused(sd1, tmp_path):
    ours, _ = sd1()
    path = write(tmp_path / "two.safetensors", {"first": vectors(1), "second": vectors(1)})
    with pytest.raises(ValueError, match=r"no known textual inversion layout; found keys \['first', 'second'\]"):
        ours.load_textual_inversion(path)
    with pytest.raises(ValueError, match="one term in 'string_to_param'"):
        ours.load_textual_inversion(write(tmp_path / "x.pt", {"string_to_param": {"*": vectors(1), "+": vectors(1)}}))
    with pytest.raises(ValueError, match="must be a float tensor of shape"):
        ours.load_textual_inversion(write(tmp_path / "y.safetensors", {"emb_params": torch.zeros(2, 3, 4)}))


def test_pickled_code_is_never_unpickled(sd1, tmp_path):
    ours, _ = sd1()
    # the original textual_inversion repository saved an nn.ParameterDict: a module, which only full unpickling reads
    params = torch.nn.ParameterDict({"*": torch.nn.Parameter(vectors(1))})
    with pytest.raises(ValueError, match="weights_only=True"):
        ours.load_textual_inversion(write(tmp_path / "old.pt", {"string_to_param": params}))


def test_vector_width_that_fits_no_tower_is_refused(sd1, sdxl, tmp_path):
    ours, _ = sd1()
    with pytest.raises(ValueError, match=rf"vectors 64 wide fit no text tower of this model \(widths: text "
                                         rf"{fx.TEXT_WIDTH}\)"):
        ours.load_textual_inversion(write(tmp_path / "narrow.safetensors", {"mystyle": vectors(1, 64)}))
    xl, _, _ = sdxl
    with pytest.raises(ValueError, match=rf"widths: clip_l {sx.WIDTH_L}, clip_g {sx.WIDTH_G}"):
        xl.load_textual_inversion(write(tmp_path / "odd.safetensors", {"mystyle": vectors(1, 96)}))
    wrong = write(tmp_path / "wrong.safetensors", {"clip_l": vectors(1, sx.WIDTH_L), "clip_g": vectors(1, sx.WIDTH_L)})
    with pytest.raises(ValueError, match=rf"clip_g vectors are {sx.WIDTH_L} wide, but this model's clip_g tower is "
                                         rf"{sx.WIDTH_G} wide"):
        xl.load_textual_inversion(wrong)
    assert not xl.text_encoder.clip_l.added_tokens  # all or nothing
    with pytest.raises(ValueError, match="is an SDXL embedding"):
        ours.load_textual_inversion(write(tmp_path / "xl.safetensors", {"clip_l": vectors(1), "clip_g": vectors(1)}))


def test_token_clip_knows_or_already_loaded_is_refused(sd1, tmp_path):
    ours, _ = sd1()
    for word in ("cat", "Cat", "<|endoftext|>"):
        with pytest.raises(ValueError, match="already in CLIP's vocabulary"):
            ours.load_textual_inversion(write(tmp_path / "cat.safetensors", {word: vectors(1)}))
    first = vectors(2)
    ours.load_textual_inversion(write(tmp_path / "mystyle.pt", a1111_pt("mystyle", first)))
    for token in ("mystyle", "MyStyle"):  # nothing is overwritten, in any case
        again = write(tmp_path / "again.safetensors", {"emb_params": vectors(2, seed=1)})
        with pytest.raises(ValueError, match="is already loaded"):
            ours.load_textual_inversion(again, token)
    encoder = ours.text_encoder
    assert encoder.token_embedding.num_embeddings == FIRST_ADDED + 2
    torch.testing.assert_close(encoder.token_embedding.weight[FIRST_ADDED:], first, rtol=0, atol=0)


@pytest.mark.parametrize("token", ["", "   "])
def test_empty_token_is_refused(sd1, tmp_path, token):
    ours, _ = sd1()
    with pytest.raises(ValueError, match="is empty"):
        ours.load_textual_inversion(write(tmp_path / "x.safetensors", {"emb_params": vectors(1)}), token=token)


# ---- with prompt weighting, in the PNG and on the command line ----------------------------------------------

def test_weighted_prompt_keeps_an_embedding_whole_in_one_chunk(sd1, tmp_path):
    """A1111 closes a chunk early rather than split an embedding's vectors between two chunks."""
    from diffusion_core.weighted_text import text_chunks
    ours, _ = sd1()
    token = ours.load_textual_inversion(write(tmp_path / "mystyle.pt", a1111_pt("mystyle", vectors(3))))
    cat = ours.text_encoder.text_ids("cat")
    first, second = text_chunks(ours.text_encoder, "cat " * 74 + f"({token}:1.2)")
    assert first.tokens == [BOS] + cat * 74 + [EOS] * 2 and first.weights == [1.0] * 77
    assert second.tokens == [BOS, FIRST_ADDED, FIRST_ADDED + 1, FIRST_ADDED + 2] + [EOS] * 73
    assert second.weights == [1.0] + [1.2] * 3 + [1.0] * 73


def test_png_records_the_embeddings_the_prompts_use_as_a1111s_ti_hashes(sd1, tmp_path):
    import hashlib
    from PIL import Image
    from diffusion_core.generation import read_png_parameters
    ours, _ = sd1()
    used = write(tmp_path / "mystyle.safetensors", {"emb_params": vectors(2)})
    unused = write(tmp_path / "otherstyle.safetensors", {"emb_params": vectors(1, seed=1)})
    ours.load_textual_inversion(used), ours.load_textual_inversion(unused)
    result = ours.generate(GenerationConfig(f"{LEFT} MyStyle {RIGHT}", num_inference_steps=1), progress=False)
    sha = hashlib.sha256(used.read_bytes()).hexdigest()
    assert result.embeddings == [{"token": "mystyle", "file": "mystyle.safetensors", "sha256": sha}]
    png = result.save(tmp_path / "out.png")
    assert read_png_parameters(png)["embeddings"] == result.embeddings
    assert Image.open(png).text["parameters"].endswith(f', TI hashes: "mystyle: {sha[:12]}", Version: {version()}')


def test_embedding_on_the_command_line_and_from_needs_it_again(tmp_path):
    from PIL import Image
    from diffusion_core.cli import main
    path = write(tmp_path / "mystyle.safetensors", {"emb_params": vectors(2, width=64)})  # the shapes model's width
    args = ["generate", "a mystyle circle on a blue background", "--steps", "2", "--quiet"]
    assert main([*args, "--embedding", str(path), "--out", str(tmp_path / "a")]) == 0
    [png] = (tmp_path / "a").glob("*.png")
    with pytest.raises(SystemExit) as refused:
        main(["generate", "--from", str(png), "--quiet", "--out", str(tmp_path / "b")])
    assert refused.value.code == 2
    assert main(["generate", "--from", str(png), "--embedding", str(path), "--quiet", "--out", str(tmp_path / "c")]) == 0
    [again] = (tmp_path / "c").glob("*.png")
    assert Image.open(again).tobytes() == Image.open(png).tobytes()
    assert main([*args, "--out", str(tmp_path / "d")]) == 0  # without it, "mystyle" is plain text: another image
    [plain] = (tmp_path / "d").glob("*.png")
    assert Image.open(plain).tobytes() != Image.open(png).tobytes()
