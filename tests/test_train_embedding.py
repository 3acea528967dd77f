"""Textual inversion on the bundled model: training moves the new word's rows and nothing else, its A1111 file gives
back exactly the trained vectors through `load_textual_inversion`, and the shipped word is the default recipe's."""
from __future__ import annotations

from dataclasses import asdict, replace

import pytest
import torch
import torch.nn.utils.parametrize as parametrize
from safetensors import safe_open
from safetensors.torch import load_file

from diffusion_core import DiffusionModel
from diffusion_core.models.text_encoder import bpe_ids
from diffusion_core.toy import SUNDISC_EMBEDDING
from diffusion_core.toy.dataset import PALETTE
from diffusion_core.toy.train_embedding import (HELD_OUT_BACKGROUNDS, EmbeddingTrainConfig, NewWord, concept_scenes,
                                                learn_word, save_embedding)

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py
FAST = EmbeddingTrainConfig(steps=3, batch=4, pool_size=64)
PROMPT = "a sundisc on a white background"


def networks(model: DiffusionModel) -> dict[str, torch.Tensor]:
    return {f"{name}.{key}": value.clone() for name in ("unet", "vae", "text_encoder")
            for key, value in getattr(model, name).state_dict().items()}


def test_training_moves_the_new_words_rows_and_nothing_else():
    model = DiffusionModel()
    before = networks(model)
    circle = before["text_encoder.token_embedding.weight"][bpe_ids("circle")]
    vectors, steps = learn_word(model, FAST)
    after = networks(model)
    embedding = after.pop("text_encoder.token_embedding.weight")
    vocab = len(before.pop("text_encoder.token_embedding.weight"))
    assert steps == 3 and after.keys() == before.keys()
    assert all(torch.equal(after[key], before[key]) for key in before)  # every other weight, bit for bit
    assert torch.equal(embedding[:vocab], networks(DiffusionModel())["text_encoder.token_embedding.weight"])
    assert torch.equal(embedding[vocab:], vectors)  # the encoder keeps v* as the word's row
    assert not torch.equal(vectors, circle)  # ... which moved away from "circle", where it started
    assert model.text_encoder.tokenize(PROMPT)[0, :3].tolist() == [49406, 320, vocab]


def test_the_file_gives_back_the_trained_vectors_and_context(tmp_path):
    trained = DiffusionModel()
    trained.text_encoder.add_token("sundisc", torch.zeros(2, 64))
    word = NewWord(torch.randn(2, 64, generator=torch.Generator().manual_seed(0)))  # as if trained, two vectors
    parametrize.register_parametrization(trained.text_encoder.token_embedding, "weight", word)
    with torch.no_grad():
        context = trained.text_encoder([PROMPT])  # what the training loss sees
    config = replace(FAST, n_vectors=2)
    path = save_embedding(word.vectors.detach(), tmp_path, config, steps=3, command="python -m ... --n-vectors 2")

    loaded = DiffusionModel()
    assert path.name == "sundisc.safetensors" and loaded.load_textual_inversion(path) == "sundisc"
    assert torch.equal(loaded.text_encoder.token_embedding.weight[-2:], word.vectors.detach())
    with torch.no_grad():
        assert torch.equal(loaded.text_encoder([PROMPT]), context)
    with safe_open(path, "pt") as f:
        assert f.keys() == ["emb_params"]  # A1111's .safetensors layout
        assert f.metadata() == {"diffusion_core_train_embedding": str(asdict(config)), "init_word": "circle",
                                "steps": "3", "command": "python -m ... --n-vectors 2"}


@pytest.mark.parametrize("change, message", [
    ({"colour": "pink"}, "palette colour"), ({"shape": "star"}, "a shape the model draws"),
    ({"init_word": "yellow circle"}, "is 2 CLIP tokens"), ({"token": "a/b"}, "file's stem"),
    ({"token": "circle"}, "already in CLIP's vocabulary"), ({"n_vectors": 0}, "n_vectors must be at least 1"),
    ({"steps": 0}, "steps must be at least 1"), ({"pool_size": 100}, "multiple of 64"), ({"lr": 0.0}, "positive"),
])
def test_a_config_that_cannot_work_is_refused(change, message):
    model = DiffusionModel()
    with pytest.raises(ValueError, match=message):
        learn_word(model, replace(FAST, **change))
    assert model.text_encoder.added_tokens == {}


def test_the_held_out_backgrounds_are_never_trained_on():
    seen = {s.background for s in concept_scenes(FAST, held_out=False, word="sundisc")}
    held_out = {s.background for s in concept_scenes(FAST, held_out=True, word="sundisc")}
    assert held_out == set(HELD_OUT_BACKGROUNDS) and seen == set(PALETTE) - {"yellow", *HELD_OUT_BACKGROUNDS}
    assert concept_scenes(FAST, False, "sundisc")[0].caption == "a sundisc on a red background"
    assert concept_scenes(FAST, False, None)[0].caption == "a yellow circle on a red background"


def test_the_shipped_word_is_the_default_recipe_and_loads():
    with safe_open(SUNDISC_EMBEDDING, "pt") as f:
        assert f.metadata()["diffusion_core_train_embedding"] == str(asdict(EmbeddingTrainConfig()))
    model = DiffusionModel()
    assert model.load_textual_inversion(SUNDISC_EMBEDDING) == SUNDISC_EMBEDDING.stem == EmbeddingTrainConfig().token
    assert torch.equal(model.text_encoder.token_embedding.weight[-1:], load_file(SUNDISC_EMBEDDING)["emb_params"])


@pytest.mark.parametrize("module, name", [("train_embedding", "sundisc.safetensors"), ("train_lora", "star_lora.safetensors")])
def test_an_existing_file_is_never_overwritten(tmp_path, module, name):
    import importlib
    (tmp_path / name).write_bytes(b"mine")
    with pytest.raises(SystemExit) as refused:
        importlib.import_module(f"diffusion_core.toy.{module}").main(["--out", str(tmp_path)])
    assert refused.value.code == 2 and (tmp_path / name).read_bytes() == b"mine"
