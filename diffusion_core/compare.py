"""Find the first module where two implementations of one network part.

Run the same inputs through ours and the reference with a forward hook on every pair of corresponding
modules, and measure each module's output against the reference's, in the order our network runs them.
The first module past the tolerance is where the implementations part: if its input still agreed, the
module itself computes differently; if its input already differed, the cause lies in the code that feeds
it (a function between modules, such as the timestep's sinusoidal embedding).

Which module corresponds to which comes from the checkpoint key maps (a parameter's module is the module
that holds it), so this file holds no second table of names.
"""
from __future__ import annotations

import csv
import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from .checkpoints.keymaps import unet_module_pairs, vae_module_pairs
from .checkpoints.text_keys import LAYER_ACTIVATION, text_key_map
from .models.text_encoder import TextEncoder
from .models.unet import UNetModel
from .models.vae import VAE

# Max relative error (max |ours - reference| / max |reference|) a module may show, by the compared dtype.
# fp32 is the project's bar for whole networks; fp16 / bf16 keep ~3 / ~2 significant digits per operation.
TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}
STORED_BYTES = 2 ** 31  # reference activations held at once; past this the comparison runs in windows


@dataclass
class Row:
    """One module call: its names on both sides, its output's shape and how far ours is from the reference."""

    ours: str
    reference: str
    shape: tuple[int, ...]
    max_abs: float  # max |ours - reference| over the output
    max_rel: float  # max_abs / max |reference|
    input_rel: float | None  # the same for the module's first input (None for the networks' outputs)


@dataclass
class Comparison:
    """Every compared module call in our execution order, then the networks' outputs."""

    rows: list[Row]
    tolerance: float
    # Calls made on one side only, e.g. nn.MultiheadAttention's out_proj, whose weights it applies without calling
    # the module. Not compared, and not a parting by themselves: a skipped computation shows in the next rows.
    only_ours: list[str] = field(default_factory=list)
    only_reference: list[str] = field(default_factory=list)

    @property
    def first_parted(self) -> Row | None:
        """The first row whose output (or input) is past the tolerance."""
        return next((r for r in self.rows if _parted(r, self.tolerance)), None)

    @property
    def passed(self) -> bool:
        return self.first_parted is None

    def verdict(self) -> str:
        row = self.first_parted
        if row is not None:
            input_parted = row.input_rel is not None and not row.input_rel <= self.tolerance
            where = ("its input already differed, so the cause lies in the code that feeds it" if input_parted else
                     "its input agreed, so the module itself computes differently")
            input_rel = "" if row.input_rel is None else f", input {row.input_rel:.2e}"
            return (f"PARTS at {row.ours} (reference: {row.reference}): max relative error {row.max_rel:.2e}"
                    f"{input_rel}, tolerance {self.tolerance:.0e}; {where}")
        worst = max(self.rows, key=lambda r: r.max_rel)
        detail = "every one bit for bit" if worst.max_rel == 0 else f"worst {worst.max_rel:.2e} at {worst.ours}"
        return f"EQUAL: {len(self.rows)} module outputs within {self.tolerance:.0e} ({detail})"

    def table(self, worst: int = 10) -> str:
        """The first rows, the worst rows, the first parted row with its neighbours, and the verdict."""
        n = len(self.rows)
        shown = set(range(min(3, n))) | set(sorted(range(n), key=lambda i: -self.rows[i].max_rel)[:worst])
        if (first := self.first_parted) is not None:
            i = self.rows.index(first)
            shown |= set(range(max(0, i - 2), min(n, i + 3)))
        lines = [f"{'#':>5}  {'ours':<48} {'reference':<52} {'shape':<20} {'max abs':>9} {'max rel':>9} "
                 f"{'input rel':>9}"]
        previous = -1
        for i in sorted(shown):
            if i != previous + 1:
                lines.append(f"{'...':>5}")
            r = self.rows[i]
            mark = " <- first past tolerance" if r is first else ""
            input_rel = "" if r.input_rel is None else f"{r.input_rel:.2e}"
            lines.append(f"{i:>5}  {r.ours:<48} {r.reference:<52} {str(r.shape):<20} {r.max_abs:>9.2e} "
                         f"{r.max_rel:>9.2e} {input_rel:>9}{mark}")
            previous = i
        for side, calls in (("ours", self.only_ours), ("the reference", self.only_reference)):
            if calls:
                more = ", ..." if len(calls) > 3 else ""
                lines.append(f"not compared, called in {side} only: {len(calls)} ({', '.join(calls[:3])}{more})")
        return "\n".join(lines + [self.verdict()])

    def csv_rows(self) -> list[list[Any]]:
        """A header, then every row in execution order with whether it is past the tolerance."""
        return [["index", "ours", "reference", "shape", "max_abs", "max_rel", "input_rel", "parted"]] + [
            [i, r.ours, r.reference, "x".join(map(str, r.shape)), f"{r.max_abs:.6e}", f"{r.max_rel:.6e}",
             "" if r.input_rel is None else f"{r.input_rel:.6e}", int(_parted(r, self.tolerance))]
            for i, r in enumerate(self.rows)]

    def write_csv(self, path: str | Path) -> Path:
        path = Path(path)
        with path.open("w", newline="") as f:
            csv.writer(f).writerows(self.csv_rows())
        return path


def _parted(row: Row, tolerance: float) -> bool:
    return not row.max_rel <= tolerance or (row.input_rel is not None and not row.input_rel <= tolerance)


# ---- which module corresponds to which ----------------------------------------------------------------------

def _expand(by_ours: dict[str, str], ours: nn.Module, reference: nn.Module) -> dict[str, str]:
    """Every module of ours whose longest mapped prefix renames to a module the reference has.

    Inside a mapped module the names agree on both sides (a transformer block's `attn1.to_q`), as in the key maps.
    Containers that are never called (a ModuleList) have no output to compare.
    """
    theirs = {name for name, m in reference.named_modules() if not isinstance(m, (nn.ModuleList, nn.ModuleDict))}
    mapping = {}
    for name, _ in ours.named_modules():
        prefix = name
        while prefix and prefix not in by_ours:
            prefix = prefix.rsplit(".", 1)[0] if "." in prefix else ""
        if prefix and (renamed := by_ours[prefix] + name[len(prefix):]) in theirs:
            mapping[name] = renamed
    return mapping


def unet_module_map(ours: UNetModel, reference: nn.Module) -> dict[str, str]:
    """Our UNet module -> the diffusers UNet2DConditionModel module computing the same thing."""
    return _expand({o: d for d, o in unet_module_pairs(ours.config)}, ours, reference)


def vae_module_map(ours: VAE, reference: nn.Module) -> dict[str, str]:
    """Our VAE module -> the diffusers AutoencoderKL module computing the same thing."""
    return _expand({o: d for d, o in vae_module_pairs(ours.config)}, ours, reference)


def text_module_map(ours: TextEncoder, reference: nn.Module) -> dict[str, str]:
    """Our (open_clip-named) text tower module -> the transformers CLIPTextModel module computing the same thing.

    A parameter's module is the one holding it. Our fused [q; k; v] projection is one parameter of the attention
    module, theirs three parameters of q_proj, k_proj and v_proj: their parent, the attention module, is the match.
    """
    prefix = _prefix(reference)
    by_ours = {}
    for ours_key, their_keys in text_key_map(ours.config).items():
        if "." not in ours_key:  # parameters of the root (positions, projection): compared through the outputs
            continue
        modules = {key.rsplit(".", 1)[0] for key in their_keys}
        theirs = modules.pop() if len(modules) == 1 else modules.pop().rsplit(".", 1)[0]
        by_ours[ours_key.rsplit(".", 1)[0]] = prefix + theirs
    for i in range(ours.config.layers):  # the MLP's activation holds no weights, so the key map cannot name it
        by_ours[f"transformer.resblocks.{i}.{LAYER_ACTIVATION[0]}"] = f"{prefix}encoder.layers.{i}.{LAYER_ACTIVATION[1]}"
    return _expand(by_ours, ours, reference)


# ---- running both sides -------------------------------------------------------------------------------------

def _first_tensor(values: Any) -> torch.Tensor | None:
    """The first tensor of a module's inputs or outputs (attention modules return (output, weights))."""
    if isinstance(values, torch.Tensor):
        return values
    if isinstance(values, dict):
        values = list(values.values())
    if isinstance(values, (tuple, list)):
        return next((t for v in values if (t := _first_tensor(v)) is not None), None)
    return None


def _aligned(ours: torch.Tensor, reference: torch.Tensor, reference_is_linear: bool) -> torch.Tensor | None:
    """Ours in the reference's layout: diffusers' VAE attention works on (B, H·W, C) tokens, ours on (B, C, H, W)."""
    if ours.shape == reference.shape:
        return ours
    if ours.ndim == 4 and ours.numel() == reference.numel():
        flat = ours.flatten(2)  # (B, C, H·W)
        return flat.transpose(1, 2) if reference_is_linear else flat.reshape(reference.shape)
    return None


def _difference(ours: torch.Tensor, reference: torch.Tensor, reference_is_linear: bool) -> tuple[float, float]:
    """(max |ours - reference|, that over max |reference|); infinite when the shapes cannot be matched."""
    ours = _aligned(ours, reference, reference_is_linear)
    if ours is None:
        return math.inf, math.inf
    error = (ours.double() - reference.double()).abs().max().item()
    scale = reference.double().abs().max().item()
    return error, error / max(scale, 1e-12)


class _Recorder:
    """Forward hooks that pass each call of the named modules to `on_call(name, k, input, output)`, k counting
    that module's calls (a module can run more than once)."""

    def __init__(self, model: nn.Module, names: set[str], on_call: Callable[[str, int, Any, Any], None]):
        self.calls: dict[str, int] = defaultdict(int)
        self.handles = []
        for name, module in model.named_modules():
            if name in names:
                self.handles.append(module.register_forward_hook(self._hook(name, on_call), with_kwargs=True))

    def _hook(self, name: str, on_call: Callable):
        def hook(module, args, kwargs, output):
            k = self.calls[name]
            self.calls[name] += 1
            on_call(name, k, _first_tensor((args, kwargs)), _first_tensor(output))
        return hook

    def __enter__(self) -> _Recorder:
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()


Runner = Callable[[nn.Module], dict[str, torch.Tensor]]


@dataclass
class _Window:
    """Reference activations of calls start, start + 1, ... until `stored_bytes` is reached (then `end`)."""

    start: int
    stored_bytes: int
    stored: dict[tuple[str, int], tuple[torch.Tensor | None, torch.Tensor]] = field(default_factory=dict)
    calls: list[tuple[str, int]] = field(default_factory=list)  # every reference call, in order
    size: int = 0
    end: int | None = None  # the first call not stored; None when the window reached the last call

    def keep(self, name: str, k: int, x: torch.Tensor | None, y: torch.Tensor | None) -> None:
        index = len(self.calls)
        self.calls.append((name, k))
        if index < self.start or self.end is not None or y is None:
            return
        self.stored[(name, k)] = (None if x is None else x.detach().clone(), y.detach().clone())
        self.size += sum(t.numel() * t.element_size() for t in (x, y) if t is not None)
        if self.size > self.stored_bytes:
            self.end = index + 1


@torch.no_grad()
def compare(ours: nn.Module, reference: nn.Module, module_map: dict[str, str], run_ours: Runner,
            run_reference: Runner, tolerance: float | None = None, stored_bytes: int = STORED_BYTES) -> Comparison:
    """Compare every mapped module call of `ours` with the reference's, then the networks' outputs.

    Args:
        module_map: our module name -> the reference's, e.g. `unet_module_map(ours, reference)`.
        run_ours, run_reference: run one network on the shared inputs and return its outputs by name
            (the same names on both sides); each may run several times, so they must be deterministic.
        tolerance: max relative error per module; None = TOLERANCE of the coarser dtype of the two outputs.
        stored_bytes: reference activations kept at once. Past it the comparison runs in windows of calls,
            running both networks once per window, so that a full SDXL UNet compares on a 24 GiB machine.
    """
    rows, outputs, our_calls, reference_calls = _module_rows(ours, reference, module_map, run_ours, run_reference,
                                                              stored_bytes)
    our_outputs, reference_outputs = outputs
    if set(our_outputs) != set(reference_outputs):
        raise ValueError(f"run_ours returned outputs {sorted(our_outputs)}, run_reference {sorted(reference_outputs)}")
    for label, y_ref in reference_outputs.items():
        rows.append(Row(label, label, tuple(y_ref.shape), *_difference(our_outputs[label], y_ref, False), None))
    if tolerance is None:
        dtypes = [t.dtype for t in (*our_outputs.values(), *reference_outputs.values()) if t.is_floating_point()]
        tolerance = max(TOLERANCE.get(d, TOLERANCE[torch.float32]) for d in dtypes)
    ours_ran = {(module_map[name], k): f"{name}#{k}" for name, k in our_calls}
    return Comparison(rows, tolerance, only_ours=[v for k, v in ours_ran.items() if k not in set(reference_calls)],
                      only_reference=[f"{n}#{k}" for n, k in reference_calls if (n, k) not in ours_ran])


def _module_rows(ours: nn.Module, reference: nn.Module, module_map: dict[str, str], run_ours: Runner,
                 run_reference: Runner, stored_bytes: int) -> tuple[list[Row], tuple[dict, dict], list, list]:
    """Rows for the mapped calls, in our execution order, window by window; the first pass's outputs; and the
    calls each side made, as (name, k-th call)."""
    linear = {name for name, m in reference.named_modules() if isinstance(m, nn.Linear)}
    rows: dict[int, Row] = {}  # by our call's position in execution order
    window, outputs = _Window(0, stored_bytes), None
    while True:
        with _Recorder(reference, set(module_map.values()), window.keep):
            reference_outputs = run_reference(reference)
        our_calls = []

        def check(name: str, k: int, x: torch.Tensor | None, y: torch.Tensor | None) -> None:
            position, key = len(our_calls), (module_map[name], k)
            our_calls.append((name, k))
            if key in window.stored and y is not None:
                x_ref, y_ref = window.stored.pop(key)
                is_linear = key[0] in linear
                input_rel = None if x is None or x_ref is None else _difference(x, x_ref, is_linear)[1]
                rows[position] = Row(name, key[0], tuple(y_ref.shape), *_difference(y, y_ref, is_linear), input_rel)

        with _Recorder(ours, set(module_map), check):
            our_outputs = run_ours(ours)
        outputs = outputs or (our_outputs, reference_outputs)
        if window.end is None:
            return [rows[i] for i in sorted(rows)], outputs, our_calls, window.calls
        window = _Window(window.end, stored_bytes)


# ---- one call per network -----------------------------------------------------------------------------------

def compare_unet(ours: UNetModel, reference: nn.Module, sample: torch.Tensor, timestep: float | torch.Tensor,
                 context: torch.Tensor, text_embeds: torch.Tensor | None = None, time_ids: torch.Tensor | None = None,
                 **options: Any) -> Comparison:
    """Our UNet against diffusers' UNet2DConditionModel on one (x_t, t, context); SDXL adds pooled text and time ids.

    Each network gets the inputs in its own dtype, so ours in fp16 compares against the reference in fp32.

    Args:
        options: `tolerance`, `stored_bytes` of `compare`.
    """
    def inputs(unet: nn.Module) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        dtype = _dtype(unet)
        added = {} if text_embeds is None else {"text_embeds": text_embeds.to(dtype), "time_ids": time_ids.to(dtype)}
        return sample.to(dtype), context.to(dtype), added

    def run_ours(unet: nn.Module) -> dict[str, torch.Tensor]:
        x, c, added = inputs(unet)
        return {"output": unet(x, timestep, c, **added)}

    def run_reference(unet: nn.Module) -> dict[str, torch.Tensor]:
        x, c, added = inputs(unet)
        kwargs = {"added_cond_kwargs": added} if added else {}
        return {"output": unet(x, timestep, encoder_hidden_states=c, **kwargs).sample}

    return compare(ours, reference, unet_module_map(ours, reference), run_ours, run_reference, **options)


def compare_vae(ours: VAE, reference: nn.Module, image: torch.Tensor, latent: torch.Tensor,
                **options: Any) -> Comparison:
    """Our VAE against diffusers' AutoencoderKL: the encoder's mean for `image`, the decoder's image for `latent`."""
    def run_ours(vae: nn.Module) -> dict[str, torch.Tensor]:
        dtype = _dtype(vae)
        return {"latent mean": vae.encode(image.to(dtype)).mean, "decoded": vae.decode(latent.to(dtype))}

    def run_reference(vae: nn.Module) -> dict[str, torch.Tensor]:
        dtype = _dtype(vae)
        return {"latent mean": vae.encode(image.to(dtype)).latent_dist.mean,
                "decoded": vae.decode(latent.to(dtype)).sample}

    return compare(ours, reference, vae_module_map(ours, reference), run_ours, run_reference, **options)


def _dtype(module: nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype


def compare_text(ours: TextEncoder, reference: nn.Module, prompts: list[str], tokenizer: Any = None,
                 **options: Any) -> Comparison:
    """One CLIP tower against transformers' CLIPTextModel(WithProjection), read as diffusers reads it.

    The reference's context is the hidden state after the blocks our tower runs (SD2: 23 of 24), final-normed
    unless the tower skips it (SDXL); the pooled embedding is CLIPTextModelWithProjection's `text_embeds`.
    With `tokenizer` (transformers' CLIPTokenizer) the token ids are compared too.
    """
    c = ours.config
    tokens = ours.tokenize(prompts)
    blocks_run = c.layers + c.layer_index + 1

    def run_ours(tower: TextEncoder) -> dict[str, torch.Tensor]:
        context, pooled = tower.encode(tokens)
        return {"context": context, **({} if pooled is None else {"text_projection": pooled})}

    def run_reference(model: nn.Module) -> dict[str, torch.Tensor]:
        out = model(input_ids=tokens.to(model.device), output_hidden_states=True)
        context = out.hidden_states[blocks_run]
        if c.final_norm:  # the functional form: the module's hook fires once, for the model's own final norm
            norm = model.get_submodule(_prefix(model) + "final_layer_norm")
            context = nn.functional.layer_norm(context, norm.normalized_shape, norm.weight, norm.bias, norm.eps)
        return {"context": context, **({} if c.projection_dim is None else {"text_projection": out.text_embeds})}

    comparison = compare(ours, reference, text_module_map(ours, reference), run_ours, run_reference, **options)
    if tokenizer is not None:
        ids = tokenizer(prompts, padding="max_length", max_length=c.context_length, truncation=True,
                        return_tensors="pt").input_ids
        comparison.rows.insert(0, Row("tokenize", type(tokenizer).__name__, tuple(ids.shape),
                                      *_difference(tokens.double(), ids.double(), False), None))
    return comparison


def _prefix(model: nn.Module) -> str:
    """transformers 5 keeps CLIPTextModel flat but nests it as `text_model.` inside CLIPTextModelWithProjection."""
    return "text_model." if hasattr(model, "text_model") else ""


# ---- a whole checkpoint -------------------------------------------------------------------------------------

@torch.no_grad()
def compare_checkpoint(path: str | Path, original_config: str | Path | None = None,
                       prompt: str = "a photograph of an astronaut riding a horse", timestep: float = 500.0,
                       seed: int = 0, size: int = 512, device: str | torch.device = "cpu",
                       dtype: torch.dtype = torch.float32, tolerance: float | None = None,
                       stored_bytes: int = STORED_BYTES) -> dict[str, Comparison]:
    """Load one checkpoint with our loader and with diffusers', and compare each network module by module.

    One network at a time, each side's copy freed before the next, so that memory holds two UNets at most.

    Args:
        prompt: what the text towers read; timestep, seed, size: the UNet's t, the inputs' draws, the image side.
    """
    from .checkpoints.loader import load_components
    from .reference import clip_tokenizer, load_reference

    ours = load_components(path, original_config, device=device, dtype=dtype)
    config, options = ours.config, dict(tolerance=tolerance, stored_bytes=stored_bytes)
    gen = torch.Generator().manual_seed(seed)
    draw = lambda *shape: torch.randn(shape, generator=gen).to(device, dtype)  # noqa: E731
    towers = {"text_encoder": ours.text_encoder} if config.text_2 is None else {
        "text_encoder": ours.text_encoder.clip_l, "text_encoder_2": ours.text_encoder.clip_g}
    results = {}
    for name, tower in towers.items():
        if tower is None:  # the refiner's missing ViT-L
            continue
        reference = getattr(load_reference(path, config, dtype, device, networks=(name,)), name)
        results[name] = compare_text(tower, reference, [prompt], clip_tokenizer(tower.config.pad_token_id), **options)
        del reference
    ours.text_encoder = towers = None

    reference = load_reference(path, config, dtype, device, networks=("vae",)).vae
    image = (torch.rand(1, 3, size, size, generator=gen) * 2 - 1).to(device, dtype)
    results["vae"] = compare_vae(ours.vae, reference, image, draw(1, 4, size // 8, size // 8), **options)
    ours.vae = reference = None

    reference = load_reference(path, config, dtype, device, networks=("unet",)).unet
    unet = config.unet
    added = {}
    if unet.adm_in_channels is not None:  # SDXL: pooled text, then (original size, crop, target size or aesthetics)
        last = [size, size] if config.family == "sdxl" else [6.0]
        added = dict(text_embeds=draw(1, config.text_2.projection_dim),
                     time_ids=torch.tensor([[size, size, 0, 0, *last]], device=device, dtype=dtype))
    results["unet"] = compare_unet(ours.unet, reference, draw(1, unet.in_channels, size // 8, size // 8), timestep,
                                   draw(1, 77, unet.context_dim), **added, **options)
    return results


@torch.no_grad()
def compare_images(path: str | Path, original_config: str | Path | None = None,
                   prompt: str = "a photograph of an astronaut riding a horse", seed: int = 0, size: int = 512,
                   steps: int = 20, sampler: str | None = None, device: str | torch.device = "cpu",
                   dtype: torch.dtype = torch.float32) -> float:
    """The largest pixel difference, in 1/255 steps, between our text-to-image and diffusers' pipeline's
    for one seed (the bar is 1 in fp32). Ours runs first and is freed before diffusers' loads."""
    import numpy as np

    from .generation import GenerationConfig
    from .pipeline import DiffusionModel
    from .reference import load_reference, scheduler_class

    model = DiffusionModel.from_pretrained(path, original_config, device=device, dtype=dtype)
    config = model.config
    if config.unet.in_channels != 4 or config.family == "sdxl_refiner":
        raise ValueError(f"--pipeline compares text-to-image; {config.name} is an inpainting or refiner checkpoint, "
                         f"compare its networks without --pipeline")
    ours = np.asarray(model.generate(GenerationConfig(prompt, width=size, height=size, num_inference_steps=steps,
                                                      seed=seed, sampler=sampler)).image, dtype=np.int16)
    del model
    pipeline = load_reference(path, config, dtype, device)
    if sampler is not None:
        pipeline.scheduler = scheduler_class(sampler).from_config(pipeline.scheduler.config)
    theirs = pipeline(prompt, height=size, width=size, num_inference_steps=steps, output_type="pil",
                      generator=torch.Generator("cpu").manual_seed(seed)).images[0]
    return float(np.abs(ours - np.asarray(theirs, dtype=np.int16)).max())
