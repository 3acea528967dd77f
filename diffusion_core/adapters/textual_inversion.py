"""Textual inversion: a new word for a concept, learnt as its input embedding while the model stays frozen.
Gal et al. 2022 (arXiv:2208.01618) show a few images of a concept, add a pseudo-word S* to the text encoder's
vocabulary, and optimise only S*'s embedding vector v* (or n vectors, read as n tokens) with the usual denoising
loss, every weight frozen; writing S* in a prompt then places v* in the input sequence where a word's embedding
would be. A file therefore holds nothing but vectors of the text encoder's width, and formats differ only in
where: AUTOMATIC1111's .pt is a torch.save'd dict whose `string_to_param` maps "*" to an (n, width) tensor (beside
`name`, `step`, `string_to_token`, ...), its .safetensors holds `emb_params` (n, width), diffusers' .bin /
.safetensors hold {token: (width,) or (n, width)}, and SDXL files hold one set per tower, `clip_l` (n, 768) and
`clip_g` (n, 1280). A1111 names the word after the file's stem, diffusers after the key. Here the vectors are
appended to each tower's `token_embedding` (TextEncoder.add_token), and the word matches in any case and only
as a whole word (text_encoder.token_pattern).
"""
from __future__ import annotations

import pickle
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..models.text_encoder import DualTextEncoder, TextEncoder

A1111_PT_KEY = "string_to_param"  # {"*": (n, width)}
A1111_SAFETENSORS_KEY = "emb_params"  # the token is the file's stem; diffusers would register "emb_params"
SDXL_TOWERS = ("clip_l", "clip_g")  # DualTextEncoder's attributes, named as SDXL files name their vectors
TORCH_SUFFIXES = (".pt", ".bin", ".pth")


def load_textual_inversion(text_encoder: TextEncoder | DualTextEncoder, path: str | Path,
                           token: str | None = None) -> str:
    """Add a textual-inversion file's word to the text encoder(s); all or nothing: a refused file changes nothing.

    A single set of vectors goes to the tower of its width (SDXL: clip_l or clip_g); an SDXL file's `clip_l`
    and `clip_g` sets go to their own towers (the refiner, which has bigG only, takes `clip_g`).

    Args:
        text_encoder: a DiffusionModel's text encoder.
        path: an A1111 .pt / .safetensors, a diffusers .bin / .safetensors or an SDXL clip_l + clip_g file.
        token: the word prompts use; default the file's stem (A1111, SDXL files) or its one key (diffusers).
    Returns: the token as stored (single spaces); prompts match it in any case.
    """
    path = Path(path)
    vectors, key = embedding_vectors(read_embedding_file(path), path)
    token = token if token is not None else key if key is not None else path.stem
    plan = towers_for(text_encoder, vectors, path)
    words = [tower.check_new_token(token, tower_vectors) for tower, tower_vectors in plan.items()]  # all checks first
    for tower, tower_vectors in plan.items():
        tower.add_token(token, tower_vectors)
    return words[0]


def read_embedding_file(path: Path) -> dict:
    """The file's contents: safetensors, or torch.load with weights_only=True (tensors and plain data, never code)."""
    if path.suffix == ".safetensors":
        return load_file(path, device="cpu")
    if path.suffix not in TORCH_SUFFIXES:
        raise ValueError(f"{path}: textual inversion files are .safetensors or torch.save'd {'/'.join(TORCH_SUFFIXES)},"
                         f" got {path.suffix!r}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise ValueError(f"{path} holds pickled objects beyond tensors and plain data, which are never unpickled "
                         f"here (torch.load weights_only=True): {str(error).splitlines()[0]}; re-save its "
                         f"tensors as a dict, e.g. with safetensors") from None


def embedding_vectors(state: object, path: Path) -> tuple[dict[str | None, torch.Tensor], str | None]:
    """The file's (n, width) vectors, keyed by SDXL tower (None: one set for any tower), and the token its key names
    (diffusers; None for A1111 and SDXL files, which go by the stem)."""
    if not isinstance(state, dict):
        raise unknown_layout(path, type(state).__name__)
    if isinstance(state.get(A1111_PT_KEY), dict):  # A1111 .pt
        params = state[A1111_PT_KEY]
        if len(params) != 1:
            raise ValueError(f"{path}: an A1111 embedding has one term in {A1111_PT_KEY!r}, this one has "
                             f"{sorted(map(str, params))}")
        return {None: as_vectors(next(iter(params.values())), path)}, None
    if set(state) == {A1111_SAFETENSORS_KEY}:
        return {None: as_vectors(state[A1111_SAFETENSORS_KEY], path)}, None
    if set(state) == set(SDXL_TOWERS):
        return {tower: as_vectors(state[tower], path) for tower in SDXL_TOWERS}, None
    if len(state) == 1 and isinstance(next(iter(state.values())), torch.Tensor):  # diffusers
        key, tensor = next(iter(state.items()))
        return {None: as_vectors(tensor, path)}, str(key)
    raise unknown_layout(path, f"keys {sorted(map(str, state))}")


def unknown_layout(path: Path, found: str) -> ValueError:
    """The error for a file of no known layout, naming what it holds and what is known."""
    return ValueError(f"{path}: no known textual inversion layout; found {found}. Known: A1111's .pt "
                      f"({A1111_PT_KEY!r}: {{'*': vectors}}), A1111's .safetensors ({A1111_SAFETENSORS_KEY!r}), "
                      f"SDXL's {' and '.join(SDXL_TOWERS)}, diffusers' one {{token: vectors}}")


def as_vectors(tensor: object, path: Path) -> torch.Tensor:
    """A floating (width,) or (n, width) tensor as (n, width), n >= 1."""
    if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point() or tensor.ndim not in (1, 2) \
            or 0 in tensor.shape:
        shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
        raise ValueError(f"{path}: embedding vectors must be a float tensor of shape (width,) or (n_vectors, width), "
                         f"got {shape}")
    return tensor.detach().reshape(-1, tensor.shape[-1])


def towers_for(text_encoder: TextEncoder | DualTextEncoder, vectors: dict[str | None, torch.Tensor],
               path: Path) -> dict[TextEncoder, torch.Tensor]:
    """Which text tower takes which vectors: an SDXL file's by name, one set by its width."""
    towers = {"text": text_encoder} if isinstance(text_encoder, TextEncoder) else {
        name: getattr(text_encoder, name) for name in SDXL_TOWERS if getattr(text_encoder, name) is not None}
    widths = ", ".join(f"{name} {tower.config.width}" for name, tower in towers.items())
    if None not in vectors:  # SDXL's clip_l + clip_g
        if not isinstance(text_encoder, DualTextEncoder):
            raise ValueError(f"{path} is an SDXL embedding ({' + '.join(SDXL_TOWERS)}); this model's text encoder is "
                             f"one CLIP of width {text_encoder.config.width}: load it into an SDXL model")
        for name, tower in towers.items():
            if vectors[name].shape[1] != tower.config.width:
                raise ValueError(f"{path}: its {name} vectors are {vectors[name].shape[1]} wide, but this model's "
                                 f"{name} tower is {tower.config.width} wide")
        return {tower: vectors[name] for name, tower in towers.items()}
    width = vectors[None].shape[1]
    fitting = [tower for tower in towers.values() if tower.config.width == width]
    if len(fitting) != 1:
        raise ValueError(f"{path}: vectors {width} wide fit {'no' if not fitting else 'more than one'} text tower of "
                         f"this model (widths: {widths})")
    return {fitting[0]: vectors[None]}
