"""diffusers' own reading of a checkpoint, for `compare`: the reference side, loaded offline.

A diffusers folder loads with diffusers' `from_pretrained`. A single file loads with diffusers'
`from_single_file`, which converts the weights with diffusers' own key maps; it only needs the architecture
as a diffusers config folder, which it would fetch from the Hub. Here that folder is written from the
architecture our loader read from the weights, so nothing touches the network: a misread architecture
would show up as a load error or as parted modules, never as a silent agreement.

diffusers and transformers are an optional extra (`pip install diffusion-core[compare]`).
"""
from __future__ import annotations

import atexit
import functools
import gzip
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from open_clip.tokenizer import bytes_to_unicode, default_bpe

from .checkpoints.configs import ModelConfig
from .models.text_encoder import TextEncoderConfig

_SCHEDULER_CLASS = {"ddpm": "DDPMScheduler", "ddim": "DDIMScheduler", "pndm": "PNDMScheduler",
                    "euler": "EulerDiscreteScheduler", "euler_a": "EulerAncestralDiscreteScheduler",
                    "dpmpp_2m": "DPMSolverMultistepScheduler", "unipc": "UniPCMultistepScheduler"}


def require_diffusers() -> None:
    """A clear message instead of an ImportError deep inside `compare`."""
    try:
        import diffusers  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as error:
        raise ImportError(f"`compare` runs the checkpoint through diffusers as the reference, and {error.name} is "
                          f"not installed: pip install 'diffusion-core[compare]'") from None


def pipeline_class_name(config: ModelConfig) -> str:
    """The diffusers pipeline that reads a checkpoint of this architecture."""
    inpainting = config.unet.in_channels == 9
    if config.family == "sdxl_refiner":
        return "StableDiffusionXLImg2ImgPipeline"
    if config.family == "sdxl":
        return "StableDiffusionXLInpaintPipeline" if inpainting else "StableDiffusionXLPipeline"
    return "StableDiffusionInpaintPipeline" if inpainting else "StableDiffusionPipeline"


def scheduler_class(sampler: str) -> Any:
    """diffusers' scheduler class for one of our sampler names."""
    import diffusers
    return getattr(diffusers, _SCHEDULER_CLASS[sampler])


@functools.cache
def clip_vocab_dir() -> Path:
    """vocab.json and merges.txt of OpenAI's CLIP tokenizer, rebuilt from open_clip's bundled BPE file: byte
    characters, the same with '</w>', then one entry per merge, then <|startoftext|> and <|endoftext|>."""
    merges = gzip.open(default_bpe()).read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
    chars = list(bytes_to_unicode().values())
    vocab = chars + [c + "</w>" for c in chars] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    folder = Path(tempfile.mkdtemp(prefix="clip_tokenizer_"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    (folder / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return folder


def clip_tokenizer(pad_token_id: int) -> Any:
    """transformers' CLIPTokenizer with SD's pad token: <|endoftext|> (SD1, SDXL's ViT-L) or "!" (id 0)."""
    from transformers import CLIPTokenizer
    return CLIPTokenizer.from_pretrained(clip_vocab_dir(), pad_token="!" if pad_token_id == 0 else "<|endoftext|>",
                                         model_max_length=77)


def clip_text_config(text: TextEncoderConfig) -> dict[str, Any]:
    """transformers' CLIPTextConfig of a text tower as diffusers folders store it.

    SD folders hold only the blocks SD runs and read the last (SD2: 23 of ViT-H's 24, then the final norm);
    SDXL folders hold every block and read the penultimate one, without the final norm.
    """
    blocks = text.layers + text.layer_index + 1 if text.final_norm else text.layers
    return dict(vocab_size=text.vocab_size, hidden_size=text.width, intermediate_size=4 * text.width,
                num_hidden_layers=blocks, num_attention_heads=text.heads, max_position_embeddings=text.context_length,
                hidden_act=text.activation, layer_norm_eps=1e-5, projection_dim=text.projection_dim or text.width,
                bos_token_id=49406, eos_token_id=49407, pad_token_id=1)


def write_config_folder(config: ModelConfig, folder: Path) -> Path:
    """A diffusers model folder without weights: what `from_single_file(config=...)` would fetch from the Hub."""
    from transformers import CLIPTextConfig
    sampler = config.scheduler_name
    index: dict[str, Any] = {"_class_name": pipeline_class_name(config),
                             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
                             "scheduler": ["diffusers", _SCHEDULER_CLASS[sampler]]}
    if config.text_2 is None:
        towers = [("text_encoder", config.text, "CLIPTextModel")]
        index.update(safety_checker=[None, None], feature_extractor=[None, None], requires_safety_checker=False)
    else:  # the refiner's bigG sits in text_encoder_2, and its text_encoder is empty
        towers = [("text_encoder", config.text, "CLIPTextModel"),
                  ("text_encoder_2", config.text_2, "CLIPTextModelWithProjection")]
        index.update(force_zeros_for_empty_prompt=config.force_zeros_for_empty_prompt)
        if config.family == "sdxl_refiner":
            index.update(requires_aesthetics_score=True)
    for name, text, class_name in towers:
        tokenizer = name.replace("text_encoder", "tokenizer")
        if text is None:
            index.update({name: [None, None], tokenizer: [None, None]})
            continue
        index.update({name: ["transformers", class_name], tokenizer: ["transformers", "CLIPTokenizer"]})
        CLIPTextConfig(**clip_text_config(text), architectures=[class_name]).save_pretrained(folder / name)
        clip_tokenizer(text.pad_token_id).save_pretrained(folder / tokenizer)
    configs = {"unet": {"_class_name": "UNet2DConditionModel", **config.unet.to_diffusers(),
                        "sample_size": config.native_size // 8},
               "vae": {"_class_name": "AutoencoderKL", **config.vae.to_diffusers(), "sample_size": config.native_size},
               "scheduler": {"_class_name": _SCHEDULER_CLASS[sampler], **config.scheduler}}
    for name, values in configs.items():
        (folder / name).mkdir(parents=True, exist_ok=True)
        (folder / name / ("scheduler_config.json" if name == "scheduler" else "config.json")).write_text(
            json.dumps(values, indent=2))
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    return folder


NETWORKS = ("text_encoder", "text_encoder_2", "vae", "unet")


def load_reference(path: str | Path, config: ModelConfig, dtype: torch.dtype = torch.float32,
                   device: str | torch.device = "cpu", networks: tuple[str, ...] = NETWORKS) -> Any:
    """The checkpoint as diffusers' pipeline reads it (its own key maps, its own modules).

    Args:
        config: the architecture our loader read from the checkpoint (`m.config`), for single files only.
        networks: the networks to load; the others are None, so that one SDXL UNet loads without the rest.
    """
    require_diffusers()
    import diffusers
    import transformers
    loggers = (diffusers.utils.logging, transformers.utils.logging)
    verbosity = [log.get_verbosity() for log in loggers]
    for log in loggers:  # their notes on casting and loading bars are not ours to show
        log.set_verbosity_error()
        log.disable_progress_bar()
    try:
        skipped = {name: None for name in NETWORKS if name not in networks}
        if config.text_2 is None:
            skipped.pop("text_encoder_2", None)
        pipeline = _load_pipeline(diffusers, Path(path), config, dtype, skipped).to(device)
    finally:
        for log, level in zip(loggers, verbosity):
            log.set_verbosity(level)
            log.enable_progress_bar()
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def _load_pipeline(diffusers: Any, path: Path, config: ModelConfig, dtype: torch.dtype, skipped: dict) -> Any:
    if path.is_dir():
        return diffusers.DiffusionPipeline.from_pretrained(path, dtype=dtype, local_files_only=True, **skipped)
    cls = getattr(diffusers, pipeline_class_name(config))
    with tempfile.TemporaryDirectory(prefix="diffusers_config_") as folder:
        return cls.from_single_file(str(path), config=str(write_config_folder(config, Path(folder))),
                                    local_files_only=True, dtype=dtype, **skipped)
