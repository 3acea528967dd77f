"""LoRA and its LyCORIS relatives, merged into the weights: W' = W + s·ΔW for each file of strength s.

Every format stores a weight update ΔW in fewer numbers than W; each has one small function below whose
docstring is its formula. LoRA (Hu et al. 2021) stores a low-rank product, LoCon the same for convolutions
(optionally with a Tucker core), LoHa a Hadamard product of two low-rank products (Hyeon-Woo et al. 2022),
LoKr a Kronecker product (LyCORIS, Yeh et al. 2023), and DoRA (Liu et al. 2024) rescales the merged weight to
a learnt magnitude. ΔW is computed in fp32 from the original weights, summed over the loaded files and cast
back once, so `unload` restores the original weights bit for bit. Where each file's names point is in
lora_names.py; what A1111, ComfyUI and diffusers do differently is in docs/customising.md.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import safe_open

from ..checkpoints.loader import open_weights
from ..models.text_encoder import text_towers
from .lora_names import Target, model_targets, network

if TYPE_CHECKING:
    from ..pipeline import DiffusionModel

# What follows a module's name in each format, and what it means. diffusers' older files are renamed into
# kohya's spelling first (see _canonical).
FORMATS = {  # format -> (suffixes it needs, suffixes it may have)
    "lora": (("lora_down.weight", "lora_up.weight"), ("lora_mid.weight", "alpha", "dora_scale")),
    "loha": (("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"), ("hada_t1", "hada_t2", "alpha", "dora_scale")),
    "lokr": ((), ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2", "alpha",
                  "dora_scale")),
    "full": (("diff",), ()),
}
SUFFIXES = sorted({s for needed, optional in FORMATS.values() for s in needed + optional}, key=len, reverse=True)
# PEFT's and diffusers' names for LoRA's two factors (and PEFT's DoRA magnitude, one per output) -> kohya's
RENAMED_SUFFIXES = {"lora_A.weight": "lora_down.weight", "lora_B.weight": "lora_up.weight",
                    "lora.down.weight": "lora_down.weight", "lora.up.weight": "lora_up.weight",
                    "lora_magnitude_vector": "dora_scale"}


# ---- ΔW, one function per format -------------------------------------------------------------------------

def tucker(core: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
    """Tucker rebuild of a conv weight: W[o, i, h, w] = Σ_{a,b} core[a, b, h, w]·wa[a, o]·wb[b, i]."""
    return torch.einsum("abhw,ao,bi->oihw", core, wa.flatten(1), wb.flatten(1))


def lora_delta(up: torch.Tensor, down: torch.Tensor, scale: float, mid: torch.Tensor | None = None) -> torch.Tensor:
    """LoRA (Hu et al. 2021, eq. 3): ΔW = (α/r)·up·down; LoCon's Tucker form ΔW = (α/r)·mid ×₁ upᵀ ×₂ down."""
    up, down = up.flatten(1), down.flatten(1)  # (out, r), (r, in·kh·kw)
    return scale * (up @ down if mid is None else tucker(mid, up.T, down))


def loha_delta(w1a: torch.Tensor, w1b: torch.Tensor, w2a: torch.Tensor, w2b: torch.Tensor, scale: float,
               t1: torch.Tensor | None = None, t2: torch.Tensor | None = None) -> torch.Tensor:
    """LoHa (Hyeon-Woo et al. 2022): ΔW = (α/r)·(w1a·w1b) ⊙ (w2a·w2b), each factor Tucker-rebuilt when it has a core."""
    def factor(wa: torch.Tensor, wb: torch.Tensor, core: torch.Tensor | None) -> torch.Tensor:
        return wa.flatten(1) @ wb.flatten(1) if core is None else tucker(core, wa, wb)

    return scale * factor(w1a, w1b, t1) * factor(w2a, w2b, t2)


def lokr_delta(w1: torch.Tensor, w2: torch.Tensor, scale: float) -> torch.Tensor:
    """LoKr (Yeh et al. 2023, §3.3): ΔW = scale·(w1 ⊗ w2), the Kronecker product; w1 is (a, c), w2 (b, d[, kh, kw])."""
    w1 = w1.reshape(*w1.shape, *[1] * (w2.dim() - w1.dim()))
    return scale * torch.kron(w1, w2.contiguous())  # torch.kron needs a contiguous right factor


def dora_delta(weight: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """DoRA (Liu et al. 2024, eq. 5): W' = m·(W + ΔW)/‖W + ΔW‖, returned as W' − W so that strength s gives W + s·(W' − W).

    The norm runs over each output row when m holds one value per output (LyCORIS' default), otherwise over each
    input column (the paper's ‖·‖_c); A1111 and ComfyUI apply the strength the same way.
    """
    merged = weight + delta
    if magnitude.shape[0] == weight.shape[0] and magnitude.numel() == weight.shape[0]:
        norm = merged.flatten(1).norm(dim=1).reshape(-1, *[1] * (merged.dim() - 1))
    else:
        norm = merged.transpose(0, 1).flatten(1).norm(dim=1).reshape(1, -1, *[1] * (merged.dim() - 2))
    norm = norm + torch.finfo(merged.dtype).eps
    return magnitude.reshape(norm.shape) * merged / norm - weight


# ---- one module of a file ---------------------------------------------------------------------------------

@dataclass
class LoraModule:
    """The tensors a file holds for one module, and how to turn them into ΔW."""

    name: str  # the module's name in the file
    tensors: dict[str, torch.Tensor]  # suffix -> tensor
    alpha: float | None = None  # α from a PEFT / diffusers config, when the file holds no `.alpha`
    rslora: bool = False  # PEFT's rank-stabilised scale α/√r

    @property
    def format(self) -> str:
        t = self.tensors
        if any(s.startswith("lokr_") for s in t):
            return "lokr"
        return next((f for f, (needed, _) in FORMATS.items() if needed and all(s in t for s in needed)), "unknown")

    def unused_suffixes(self) -> list[str]:
        """Suffixes this module's format does not read; a LoKr also needs both of its halves."""
        needed, optional = FORMATS.get(self.format, ((), ()))
        unused = [s for s in self.tensors if s not in needed + optional]
        if self.format == "lokr":
            for half in ("lokr_w1", "lokr_w2"):
                if half not in self.tensors and not {f"{half}_a", f"{half}_b"} <= set(self.tensors):
                    unused.append(f"{half} (or {half}_a and {half}_b) missing")
        return unused

    def scale(self, rank: int) -> float:
        """α/r, with a missing or zero α meaning α = r (kohya's rule)."""
        alpha = self.tensors["alpha"].item() if "alpha" in self.tensors else self.alpha
        if not alpha:
            return 1.0
        return alpha / (math.sqrt(rank) if self.rslora else rank)

    def delta(self, weight: torch.Tensor) -> torch.Tensor:
        """ΔW (fp32, the shape of `weight`, the original fp32 weight or its row block) for strength 1."""
        t = {k: v.to(weight.device, torch.float32) for k, v in self.tensors.items()}
        fmt = self.format
        if fmt == "lora":
            delta = lora_delta(t["lora_up.weight"], t["lora_down.weight"], self.scale(t["lora_down.weight"].shape[0]),
                               t.get("lora_mid.weight"))
        elif fmt == "loha":
            delta = loha_delta(t["hada_w1_a"], t["hada_w1_b"], t["hada_w2_a"], t["hada_w2_b"],
                               self.scale(t["hada_w1_b"].shape[0]), t.get("hada_t1"), t.get("hada_t2"))
        elif fmt == "lokr":
            delta = lokr_delta(*self._lokr_halves(t), self._lokr_scale(t))
        else:
            delta = t["diff"]
        if delta.numel() != weight.numel():
            raise ValueError(f"{self.name}: its {fmt} update has shape {tuple(delta.shape)} ({delta.numel()} values), "
                             f"the weight it targets {tuple(weight.shape)}: a LoRA made for another model?")
        delta = delta.reshape(weight.shape)
        return dora_delta(weight, delta, t["dora_scale"]) if "dora_scale" in t else delta

    @staticmethod
    def _lokr_halves(t: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
        if "lokr_w2" in t:
            w2 = t["lokr_w2"]
        elif "lokr_t2" in t:
            w2 = tucker(t["lokr_t2"], t["lokr_w2_a"], t["lokr_w2_b"])
        else:  # a conv's w2_b is (r, in, kh, kw): the product keeps its kernel
            w2b = t["lokr_w2_b"]
            w2 = (t["lokr_w2_a"] @ w2b.flatten(1)).reshape(-1, *w2b.shape[1:])
        return w1, w2

    def _lokr_scale(self, t: dict[str, torch.Tensor]) -> float:
        """α/r when a half is factored (r = its rank), 1 when both are full matrices: A1111's and ComfyUI's rule."""
        factored = t.get("lokr_w1_b", t.get("lokr_w2_b"))
        return 1.0 if factored is None else self.scale(factored.shape[0])


def _canonical(key: str) -> str:
    """diffusers' older spellings in kohya's: `attn1.processor.to_q_lora.down.weight` -> `attn1.to_q.lora_down.weight`."""
    key = re.sub(r"\.processor\.(to_q|to_k|to_v|to_out)_lora\.", lambda m: f".{m[1]}.lora.", key)
    key = key.replace(".to_out.lora.", ".to_out.0.lora.").replace(".lora_linear_layer.", ".lora.")
    for old, new in RENAMED_SUFFIXES.items():
        if key.endswith("." + old):
            return key[: -len(old)] + new
    return key


def split_modules(state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, LoraModule], list[str]]:
    """Group a file's tensors by module: ({module name: LoraModule}, keys of no known format)."""
    modules, unknown = {}, []
    for key, tensor in state_dict.items():
        canonical = _canonical(key)
        suffix = next((s for s in SUFFIXES if canonical.endswith("." + s)), None)
        if suffix is None:
            unknown.append(key)
            continue
        name = canonical[: -len(suffix) - 1]
        modules.setdefault(name, LoraModule(name, {})).tensors[suffix] = tensor
    return modules, unknown


# ---- reading a file ---------------------------------------------------------------------------------------

def read_lora_file(path: Path) -> tuple[dict[str, LoraModule], list[str]]:
    """A LoRA file's modules (with α from a PEFT adapter_config.json or diffusers' metadata) and its unknown keys."""
    weights = open_weights(path)
    modules, unknown = split_modules({k: weights.read(k, None) for k in weights.shapes})
    for prefix, config in _peft_configs(path).items():
        for name, module in modules.items():
            if name.startswith(prefix):
                module.alpha = _pattern_value(config.get("alpha_pattern") or {}, name, config.get("lora_alpha"))
                module.rslora = bool(config.get("use_rslora"))
    return modules, unknown


def _peft_configs(path: Path) -> dict[str, dict]:
    """{module-name prefix: LoraConfig fields}: PEFT's adapter_config.json beside the file, or the configs diffusers
    writes into a .safetensors header under "lora_adapter_metadata" (keys such as "unet.lora_alpha")."""
    sidecar = path.with_name("adapter_config.json")
    if path.stem == "adapter_model" and sidecar.exists():
        return {"": json.loads(sidecar.read_text())}
    if path.suffix != ".safetensors":
        return {}
    with safe_open(path, "pt") as f:
        raw = (f.metadata() or {}).get("lora_adapter_metadata")
    configs: dict[str, dict] = {}
    for key, value in (json.loads(raw) if raw else {}).items():
        component, _, field_name = key.partition(".")
        configs.setdefault(component + ".", {})[field_name] = value
    return configs


def _pattern_value(patterns: dict[str, float], name: str, default: float | None) -> float | None:
    """PEFT's alpha_pattern: the value of the first pattern matching the end of the module's name."""
    return next((v for p, v in patterns.items() if re.match(rf"(.*\.)?({p})$", name)), default)


# ---- the loaded files and the original weights ------------------------------------------------------------

@dataclass(frozen=True)
class LoraReport:
    """What one file changed: the weights of each network (our names) and, with strict=False, what it skipped."""

    name: str
    path: str
    sha256: str  # of the file; A1111's infotext records its first 12 hex digits
    scale: float
    format: dict[str, int]  # format -> modules in it ("lora", "loha", "lokr", "full")
    changed: dict[str, list[str]]  # network -> weights changed
    skipped: list[str] = field(default_factory=list)  # file keys not applied

    def __str__(self) -> str:
        changed = ", ".join(f"{len(keys)} weights of {network}" for network, keys in self.changed.items())
        formats = ", ".join(f"{n} {f}" for f, n in self.format.items())
        skipped = f"; skipped {len(self.skipped)} keys" if self.skipped else ""
        return f"LoRA {self.name!r} at scale {self.scale:g} ({formats}): changed {changed}{skipped}"

    def record(self) -> dict[str, str | float]:
        """What an image's PNG records of this LoRA, enough to check that a redo uses the same file."""
        return {"name": self.name, "file": Path(self.path).name, "sha256": self.sha256, "scale": self.scale}


@dataclass
class _Loaded:
    scale: float
    modules: list[tuple[Target, LoraModule]]
    report: LoraReport


class LoraStack:
    """The LoRA files merged into a model's weights, and a copy of each original weight they changed."""

    def __init__(self, model: DiffusionModel):
        self.model = model
        self.loaded: dict[str, _Loaded] = {}
        self.originals: dict[tuple[str, str], torch.Tensor] = {}  # (network, parameter) -> the weight before LoRA

    @property
    def reports(self) -> list[LoraReport]:
        return [loaded.report for loaded in self.loaded.values()]

    def load(self, path: str | Path, scale: float = 1.0, name: str | None = None, strict: bool = True) -> LoraReport:
        path = Path(path)
        name = path.stem if name is None else name
        if not isinstance(scale, (int, float)) or not math.isfinite(scale):
            raise ValueError(f"LoRA scale must be a finite number, got {scale!r}")
        if name in self.loaded:
            raise ValueError(f"a LoRA named {name!r} is already loaded; unload_lora({name!r}) first, or pass name=")
        if not path.is_file():
            raise ValueError(f"LoRA file {path} does not exist")
        modules, unknown = read_lora_file(path)
        matched, skipped = self._match(path, modules, unknown, strict)
        for target, module in matched:  # computed once before anything changes, so a refused file changes nothing
            module.delta(self._original(target))
        report = self._report(name, path, float(scale), matched, skipped)
        self.loaded[name] = _Loaded(float(scale), matched, report)
        self._merge({(t.component, t.key) for t, _ in matched})
        return report

    def unload(self, name: str | None = None) -> None:
        if name is not None and name not in self.loaded:
            raise ValueError(f"no LoRA named {name!r} is loaded; loaded: {sorted(self.loaded) or 'none'}")
        names = list(self.loaded) if name is None else [name]
        weights = {(t.component, t.key) for n in names for t, _ in self.loaded[n].modules}
        for n in names:
            del self.loaded[n]
        self._merge(weights)

    def to(self, device: torch.device | str | None, dtype: torch.dtype | None) -> None:
        """Follow the model to another device or dtype (DiffusionModel.to)."""
        self.originals = {k: v.to(device=device, dtype=dtype) for k, v in self.originals.items()}

    def _match(self, path: Path, modules: dict[str, LoraModule], unknown: list[str],
               strict: bool) -> tuple[list[tuple[Target, LoraModule]], list[str]]:
        """Each module's target, or the keys that have none (an error unless strict=False)."""
        targets = model_targets(self.model.unet.config, self.model.text_encoder)
        matched, unmatched = [], list(unknown)
        for name, module in modules.items():
            bad = module.unused_suffixes()
            if name not in targets or module.format == "unknown" or bad:
                unmatched += [f"{name}.{s}" for s in (bad or module.tensors)]
            else:
                matched.append((targets[name], module))
        if unmatched and strict:
            raise ValueError(f"{path}: {len(unmatched)} keys match no weight of this model or no known format, so "
                             f"nothing was loaded: {unmatched[:8]}{' ...' if len(unmatched) > 8 else ''}. "
                             f"strict=False loads the rest and warns.")
        if not matched:
            raise ValueError(f"{path}: no key of it applies to this model (a LoRA for another model family?)")
        if unmatched:
            warnings.warn(f"{path}: {len(unmatched)} keys were not applied: {unmatched}", stacklevel=3)
        return matched, unmatched

    def _report(self, name: str, path: Path, scale: float, matched: list[tuple[Target, LoraModule]],
                skipped: list[str]) -> LoraReport:
        order = self._parameter_order()
        changed: dict[str, list[str]] = {}
        for target, _ in sorted(matched, key=lambda m: (m[0].component, order[m[0].component, m[0].key], m[0].part)):
            changed.setdefault(target.component, []).append(target.describe())
        formats: dict[str, int] = {}
        for _, module in matched:
            formats[module.format] = formats.get(module.format, 0) + 1
        return LoraReport(name, str(path), file_sha256(path), scale, formats, changed, skipped)

    def _parameter_order(self) -> dict[tuple[str, str], int]:
        """(network, parameter) -> its place in the network, so that reports read from input to output."""
        networks = {"unet": self.model.unet, **text_towers(self.model.text_encoder)}
        return {(c, key): i for c, network in networks.items() for i, (key, _) in enumerate(network.named_parameters())}

    def _original(self, target: Target) -> torch.Tensor:
        """The target's original weight in fp32 (its row block, transposed for open_clip's projection)."""
        stored = self.originals.get((target.component, target.key))
        weight = (target.parameter(self.model) if stored is None else stored).float()
        return target.view(weight)

    def _merge(self, weights: set[tuple[str, str]]) -> None:
        """W = cast(W₀ + Σ_files s·ΔW) for each weight named; a weight no file changes gets W₀ back, bit for bit."""
        by_weight: dict[tuple[str, str], list[tuple[float, Target, LoraModule]]] = {}
        for loaded in self.loaded.values():
            for target, module in loaded.modules:
                by_weight.setdefault((target.component, target.key), []).append((loaded.scale, target, module))
        with torch.no_grad():
            for component, key in weights:
                parameter = network(self.model, component).get_parameter(key)
                if (component, key) not in self.originals:
                    self.originals[(component, key)] = parameter.detach().clone()
                updates = by_weight.get((component, key), [])
                if not updates:
                    parameter.copy_(self.originals.pop((component, key)))
                    continue
                original = self.originals[(component, key)].float()
                merged = original.clone()
                for scale, target, module in updates:
                    target.view(merged).add_(scale * module.delta(target.view(original)))
                parameter.copy_(merged.to(parameter.dtype))


def file_sha256(path: Path) -> str:
    """A file's sha256 in hex, read in 16 MiB pieces (A1111's hashes are its first 12 digits)."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def path_sha256(path: Path) -> str:
    """A file's sha256; a folder's: the sha256 of its files' names and sha256s, in name order."""
    if path.is_file():
        return file_sha256(path)
    listing = "".join(f"{p.relative_to(path)}:{file_sha256(p)}\n" for p in sorted(path.rglob("*")) if p.is_file())
    return hashlib.sha256(listing.encode()).hexdigest()
