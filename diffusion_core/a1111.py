"""AUTOMATIC1111's names for things: its sampler and schedule names, and the `parameters` infotext its PNGs carry.

Other SD tools (A1111, ComfyUI's loaders, civitai) read an image's settings from one PNG text chunk,
"parameters", in A1111's format: the prompt, a "Negative prompt:" line, then one line of `Key: value` pairs
(`processing.create_infotext` in stable-diffusion-webui). We write that line for every image and read it back
as A1111's `parse_generation_parameters` does, so both sides of its API speak the same text.
"""
from __future__ import annotations

import json
import re
from importlib import metadata
from typing import TYPE_CHECKING, Any

from .schedulers import SamplerType, supports_karras_sigmas

if TYPE_CHECKING:
    from .generation import GeneratedImage

# A1111's name of each of our samplers (its k-diffusion and timestep samplers that compute the same update)
SAMPLER_NAMES = {SamplerType.EULER_A: "Euler a", SamplerType.EULER: "Euler", SamplerType.DDIM: "DDIM",
                 SamplerType.PNDM: "PLMS", SamplerType.DPMPP_2M: "DPM++ 2M", SamplerType.UNIPC: "UniPC",
                 SamplerType.DDPM: "DDPM"}
SAMPLER_ALIASES = {"Euler a": ["k_euler_a", "k_euler_ancestral"], "Euler": ["k_euler"], "DDIM": [],
                   "PLMS": [], "DPM++ 2M": ["k_dpmpp_2m"], "UniPC": [], "DDPM": []}
# A1111's schedule types (its `scheduler` field) that we have: "Automatic" is the sampler's own σs
SCHEDULES = {"automatic": "Automatic", "karras": "Karras"}


def sampler_name(sampler: str) -> str:
    """Our sampler name -> A1111's ("euler_a" -> "Euler a")."""
    return SAMPLER_NAMES[SamplerType(sampler)]


def schedule_label(use_karras_sigmas: bool | None) -> str:
    return SCHEDULES["karras" if use_karras_sigmas else "automatic"]


def parse_sampler(name: str, schedule: str | None = None) -> tuple[str, bool | None]:
    """A1111's sampler_name and scheduler -> (our sampler, use_karras_sigmas); a ValueError lists the valid names.

    A1111 before 1.9 folded the schedule into the name ("DPM++ 2M Karras"); it still accepts that, so do we.
    """
    schedule = (schedule or "automatic").lower()
    for label in SCHEDULES.values():
        if name.endswith(" " + label):
            name, schedule = name[:-len(label) - 1], label.lower()
    by_name = {a1111.lower(): ours for ours, a1111 in SAMPLER_NAMES.items()}
    by_name.update({alias: ours for ours, a1111 in SAMPLER_NAMES.items() for alias in SAMPLER_ALIASES[a1111]})
    sampler = by_name.get(name.lower())
    if sampler is None:
        raise ValueError(f"sampler_name: unknown sampler {name!r}; choose one of {list(SAMPLER_NAMES.values())} "
                         f"(with scheduler 'Karras' for {karras_sampler_names()})")
    if schedule not in SCHEDULES:
        raise ValueError(f"scheduler: unknown schedule type {schedule!r}; choose one of {list(SCHEDULES.values())}")
    if schedule == "karras" and not supports_karras_sigmas(sampler):
        raise ValueError(f"scheduler: {SAMPLER_NAMES[sampler]} has no Karras schedule here; it applies to "
                         f"{karras_sampler_names()}")
    return sampler.value, True if schedule == "karras" else None


def karras_sampler_names() -> list[str]:
    return [a1111 for ours, a1111 in SAMPLER_NAMES.items() if supports_karras_sigmas(ours)]


def short_hash(sha256: str) -> str:
    """A1111's "Model hash" and model titles: the first 10 hex digits of the file's sha256."""
    return sha256[:10]


def version() -> str:
    return f"diffusion-core {metadata.version('diffusion-core')}"


def infotext(result: GeneratedImage, model_hash: str | None = None, extra: dict[str, Any] | None = None) -> str:
    """A1111's infotext for an image: its keys, order and quoting (create_infotext). A LoRA appears as A1111
    users write it, `<lora:name:scale>` in the prompt, and in "Lora hashes" (name: the first 12 hex digits of its
    sha256); an embedding the prompts use in "TI hashes". `extra` adds the keys of a request's own options."""
    c = result.config
    tags = "".join(f" <lora:{lora['name']}:{lora['scale']:g}>" for lora in result.loras)
    negative = f"\nNegative prompt: {c.negative_prompt}" if c.negative_prompt else ""
    lora_hashes = ", ".join(f"{_hash_name(lora['name'])}: {lora['sha256'][:12]}" for lora in result.loras)
    ti_hashes = ", ".join(f"{_hash_name(e['token'])}: {e['sha256'][:12]}" for e in result.embeddings)
    values = {"Steps": c.num_inference_steps, "Sampler": sampler_name(c.sampler),
              "Schedule type": schedule_label(c.use_karras_sigmas), "CFG scale": c.guidance_scale, "Seed": c.seed,
              "Size": f"{c.width}x{c.height}", "Model hash": model_hash and short_hash(model_hash),
              "Model": result.model, "Denoising strength": result.strength,
              "Clip skip": c.clip_skip + 1 if c.clip_skip else None, **(extra or {}),
              "TI hashes": ti_hashes or None, "Lora hashes": lora_hashes or None, "Version": version()}
    pairs = ", ".join(f"{key}: {quote(value)}" for key, value in values.items() if value is not None)
    return f"{c.prompt}{tags}{negative}\n{pairs}"


def quote(value: Any) -> str:
    """A1111's infotext_utils.quote: a value holding a comma, colon or newline is written as a JSON string."""
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ",:\n") else text


# A1111's infotext_utils.re_param: `Key: value` up to the next comma, or a quoted JSON string
_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
_SIZE = re.compile(r"^(\d+)x(\d+)$")


def parse_infotext(text: str) -> dict[str, str]:
    """An infotext as A1111's parse_generation_parameters reads it: "Prompt", "Negative prompt", then each
    `Key: value` as a string ("Size: 512x768" -> "Size-1": "512", "Size-2": "768")."""
    *lines, last = text.strip().split("\n")
    if len(_PARAM.findall(last)) < 3:  # no parameters line: it is all prompt
        lines, last = [*lines, last], ""
    prompt: list[str] = []
    negative: list[str] = []
    in_negative = False  # from the "Negative prompt:" line on, every line is the negative prompt
    for line in map(str.strip, lines):
        if line.startswith("Negative prompt:"):
            in_negative, line = True, line[len("Negative prompt:"):].strip()
        (negative if in_negative else prompt).append(line)
    parsed = {"Prompt": "\n".join(prompt), "Negative prompt": "\n".join(negative)}
    for key, value in _PARAM.findall(last):
        if value[:1] == '"' and value[-1:] == '"':
            value = json.loads(value)
        size = _SIZE.match(value)
        if size:
            parsed[f"{key}-1"], parsed[f"{key}-2"] = size.groups()
        else:
            parsed[key] = value
    return parsed


def _hash_name(name: str) -> str:
    """A1111 drops ":" and "," from a name in "Lora hashes" / "TI hashes", whose entries they separate."""
    return name.replace(":", "").replace(",", "")
