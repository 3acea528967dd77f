"""The CLIP text encoder and its tokenizer equal transformers' CLIPTextModel and CLIPTokenizer (SD1 and SD2)."""
import pytest
import torch
from open_clip.transformer import TextTransformer
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from diffusion_core.checkpoints.text_keys import (TRANSFORMERS_PREFIX, text_from_open_clip, text_from_transformers,
                                                   text_to_transformers)
from diffusion_core.models.text_encoder import (ACTIVATIONS, SD1_TEXT, SD2_TEXT, TINY_SD1_TEXT, TINY_SD2_TEXT,
                                                TextEncoder, TextEncoderConfig)
from diffusion_core.reference import clip_vocab_dir as reference_vocab_dir
from parity import assert_rel_close, perturb_

LONG_PROMPT = " ".join(f"a {adjective} cat number {i}," for i, adjective in enumerate(["red", "tiny", "fluffy"] * 12))
PROMPTS = ["a photograph of an astronaut riding a horse", "",
           "Hello, World!!! (masterpiece:1.2), [ugly], 8K UHD; don't STOP?!", LONG_PROMPT]
TOKENIZER_PROMPTS = PROMPTS + ["UPPER Case WORDS", "wow!? a!b !!! it's", "ÉCOLE naïve café 1234567 $5.00",
                               "tabs\tand\nnewlines   spaced  ", "x<|endoftext|>y <|startoftext|>",
                               " ".join(f"word{i}" for i in range(100))]
TINY = {"sd1": TINY_SD1_TEXT, "sd2": TINY_SD2_TEXT}


def transformers_config(config: TextEncoderConfig, layers: int) -> CLIPTextConfig:
    return CLIPTextConfig(vocab_size=config.vocab_size, hidden_size=config.width, intermediate_size=4 * config.width,
                          num_hidden_layers=layers, num_attention_heads=config.heads,
                          max_position_embeddings=config.context_length, hidden_act=config.activation,
                          layer_norm_eps=1e-5, bos_token_id=49406, eos_token_id=49407)


def reference(config: TextEncoderConfig, seed: int = 0) -> tuple[CLIPTextModel, dict]:
    """A perturbed CLIPTextModel as a diffusers folder stores it (the layers SD never reads dropped, so 23 of
    ViT-H's 24), and the full-depth state dict an SD checkpoint holds, whose unread layers get random weights."""
    used = config.layers + config.layer_index + 1
    model = perturb_(CLIPTextModel(transformers_config(config, used)), seed).eval()
    state_dict = dict(model.state_dict())
    gen = torch.Generator().manual_seed(seed + 1)
    for i in range(used, config.layers):
        for key, value in model.state_dict().items():
            if key.startswith("encoder.layers.0."):
                state_dict[key.replace("layers.0.", f"layers.{i}.")] = value + torch.randn(value.shape, generator=gen)
    return model, state_dict


@torch.no_grad()
def check_parity(config: TextEncoderConfig) -> None:
    ref, state_dict = reference(config)
    with torch.device("meta"):  # as a loader builds it: no random init, weights assigned
        ours = TextEncoder(config).eval()
    ours.load_state_dict(text_from_transformers(state_dict, config), assign=True)
    expected = ref(input_ids=ours.tokenize(PROMPTS)).last_hidden_state
    assert_rel_close(ours(PROMPTS), expected, 1e-4, f"text encoder {config}")


@pytest.mark.parametrize("name", TINY)
def test_tiny_text_encoder_equals_transformers(name):
    check_parity(TINY[name])


@pytest.mark.slow
@pytest.mark.parametrize("config", [SD1_TEXT, SD2_TEXT], ids=["sd1_vit_l14", "sd2_vit_h14"])
def test_full_size_text_encoder_equals_transformers(config):
    check_parity(config)


@pytest.mark.parametrize("name", TINY)
@torch.no_grad()
def test_config_from_a_diffusers_folder(name):
    """A diffusers folder's config.json alone builds the encoder that equals its CLIPTextModel."""
    ref, _ = reference(TINY[name])
    config = TextEncoderConfig.from_transformers(ref.config.to_dict(), pad_token_id=TINY[name].pad_token_id)
    ours = TextEncoder(config).eval()
    ours.load_state_dict(text_from_transformers(ref.state_dict(), config))
    assert_rel_close(ours(PROMPTS), ref(input_ids=ours.tokenize(PROMPTS)).last_hidden_state, 1e-4)


@torch.no_grad()
def test_sd2_reads_open_clip_weights_and_layer():
    """open_clip's own text tower (an SD2 file's layout) loads by name; its penultimate layer + ln_final is ours."""
    config = TINY_SD2_TEXT
    tower = TextTransformer(width=config.width, heads=config.heads, layers=config.layers, output_dim=32,
                            act_layer=ACTIVATIONS[config.activation])
    perturb_(tower).eval()
    ours = TextEncoder(config).eval()
    ours.load_state_dict(text_from_open_clip({**tower.state_dict(), "logit_scale": torch.tensor(4.6)}))
    tokens = ours.tokenize(PROMPTS)
    expected = tower.forward_intermediates(tokens, indices=[config.layers + config.layer_index],
                                           normalize_intermediates=True, intermediates_only=True, output_fmt="NLC")
    assert_rel_close(ours(tokens), expected["text_intermediates"][0], 1e-4)


@pytest.mark.parametrize("layout", ["transformers5", "text_model_int_position_ids", "text_model_float_position_ids",
                                    "text_model_no_position_ids"])
def test_key_map_round_trip(layout):
    config = TINY_SD2_TEXT
    _, expected = reference(config)
    prefix = "" if layout == "transformers5" else TRANSFORMERS_PREFIX
    expected = {prefix + key: value for key, value in expected.items()}
    given = dict(expected)
    if "position_ids" in layout:
        ids = torch.arange(config.context_length)[None]
        given[prefix + "embeddings.position_ids"] = ids.float() if "float" in layout else ids
    back = text_to_transformers(text_from_transformers(given, config), config, prefix=prefix)
    assert back.keys() == expected.keys()
    for key in expected:
        assert torch.equal(back[key], expected[key]), key


def test_key_map_rejects_a_wrong_depth():
    _, state_dict = reference(TINY_SD1_TEXT)
    with pytest.raises(ValueError, match="3 layers expects transformers keys missing"):
        text_from_transformers(state_dict, TINY_SD2_TEXT)


@pytest.mark.parametrize("prompts", [None, 3, ["ok", 3], [], torch.zeros(2, 77), torch.zeros(2, 10, dtype=torch.long)],
                         ids=["none", "int", "mixed_list", "empty_list", "float_ids", "short_ids"])
def test_bad_prompts_raise(prompts):
    with pytest.raises(ValueError, match="prompts must be|token ids must be"):
        TextEncoder(TINY_SD1_TEXT)(prompts)


@pytest.fixture(scope="module")
def clip_vocab_dir():
    return reference_vocab_dir()


@pytest.mark.parametrize("name, pad_token", [("sd1", "<|endoftext|>"), ("sd2", "!")])
def test_tokenize_equals_transformers(clip_vocab_dir, name, pad_token):
    reference_tokenizer = CLIPTokenizer.from_pretrained(clip_vocab_dir, pad_token=pad_token)
    expected = reference_tokenizer(TOKENIZER_PROMPTS, padding="max_length", truncation=True, max_length=77,
                                   return_tensors="pt").input_ids
    tokens = TextEncoder(TINY[name]).tokenize(TOKENIZER_PROMPTS)
    assert reference_tokenizer.pad_token_id == TINY[name].pad_token_id
    torch.testing.assert_close(tokens, expected, rtol=0, atol=0)


def test_tokenize_known_ids():
    """Ids anyone can check against OpenAI's CLIP: BOS, a photo of a cat, EOS, then SD1's pad."""
    tokens = TextEncoder(TINY_SD1_TEXT).tokenize(["a photo of a cat"])
    assert tokens[0, :8].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407, 49407]
