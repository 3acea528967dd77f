"""The checkpoints, LoRAs and embeddings a server may use, and the few models it keeps loaded.

A client names a model, never a path: every name is looked up in a listing of the configured directories,
so "../../etc/passwd" is simply a name that is not there. Loading goes through the library's own loaders
(.ckpt with torch.load(weights_only=True): a checkpoint never runs code). Loaded models are kept in a
least-recently-used cache of fixed size, since a UNet is gigabytes.
"""
from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..a1111 import short_hash
from ..adapters.lora import path_sha256
from ..pipeline import DiffusionModel

CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt")
LORA_SUFFIXES = (".safetensors", ".pt", ".ckpt")
EMBEDDING_SUFFIXES = (".safetensors", ".pt", ".bin")
BUNDLED = Path(__file__).resolve().parents[1] / "toy" / "weights" / "toy_shapes.safetensors"


class UnknownName(ValueError):
    """A name that is not in a listing; the message lists the valid names."""


class ModelLoadError(ValueError):
    """A listed checkpoint that could not be loaded (a broken or foreign file)."""


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint a client may ask for, as A1111's /sd-models lists it."""

    name: str             # its path inside the models directory ("sd15/v1-5.safetensors"), or the bundled name
    path: Path | None     # None: the bundled shapes model
    sha256: str

    @property
    def title(self) -> str:
        """A1111's title: "name [short hash]"; clients send it back as sd_model_checkpoint."""
        return f"{self.name} [{short_hash(self.sha256)}]"

    @property
    def model_name(self) -> str:
        """A1111's model_name (and the infotext's "Model"): the name without its extension."""
        return self.name.removesuffix(Path(self.name).suffix) if self.path and self.path.is_file() else self.name

    def listing(self) -> dict[str, Any]:
        """Its /sd-models entry; `filename` is relative to the models directory (no server paths leak)."""
        return {"title": self.title, "model_name": self.model_name, "hash": short_hash(self.sha256),
                "sha256": self.sha256, "filename": self.name, "config": None}


class ModelStore:
    """The checkpoints of `--checkpoint` / `--models-dir` (or the bundled model), loaded on demand into an LRU cache."""

    def __init__(self, checkpoint: Path | None = None, models_dir: Path | None = None, cache_size: int = 2,
                 device: str = "cpu", dtype: torch.dtype = torch.float32, lora_dir: Path | None = None,
                 embeddings_dir: Path | None = None):
        if checkpoint is not None and models_dir is not None:
            raise ValueError("give --checkpoint or --models-dir, not both")
        for flag, folder in (("--models-dir", models_dir), ("--lora-dir", lora_dir),
                             ("--embeddings-dir", embeddings_dir)):
            if folder is not None and not folder.is_dir():
                raise FileNotFoundError(f"{flag} {folder}: no such folder")
        if checkpoint is not None and not checkpoint.exists():
            raise FileNotFoundError(f"--checkpoint {checkpoint}: no such file or folder")
        if cache_size < 1:
            raise ValueError(f"the model cache holds at least 1 model, got {cache_size}")
        self.checkpoint, self.models_dir, self.cache_size = checkpoint, models_dir, cache_size
        self.device, self.dtype = device, dtype
        self.lora_dir, self.embeddings_dir = lora_dir, embeddings_dir
        self.loaded: OrderedDict[str, DiffusionModel] = OrderedDict()  # sha256 -> model, most recent last
        self.embedding_reports: dict[str, dict[str, dict]] = {}  # sha256 -> {"loaded": ..., "skipped": ...}
        self._hashes: dict[tuple[str, int, int], str] = {}  # (path, size, mtime) -> sha256, computed once

    # ---- listings: what a client may name

    def checkpoints(self) -> list[Checkpoint]:
        """Every checkpoint, rescanned on each call (A1111's refresh-checkpoints is implicit)."""
        if self.models_dir is None:
            path = self.checkpoint or BUNDLED
            name = path.name if self.checkpoint else "toy-shapes"
            return [Checkpoint(name, self.checkpoint, self._sha256(path))]
        found = [p for p in sorted(self.models_dir.rglob("*")) if _is_checkpoint(p)]
        folders = {p for p in found if p.is_dir()}
        found = [p for p in found if folders.isdisjoint(p.parents)]  # a diffusers folder's own files are its
        return [Checkpoint(p.relative_to(self.models_dir).as_posix(), p, self._sha256(p)) for p in found]

    def find(self, name: str) -> Checkpoint:
        """The checkpoint a client means by its title, name, model name or short hash."""
        listing = self.checkpoints()
        for checkpoint in listing:
            if name in (checkpoint.title, checkpoint.name, checkpoint.model_name, short_hash(checkpoint.sha256)):
                return checkpoint
        raise UnknownName(f"sd_model_checkpoint: no checkpoint {name!r}; the server has "
                          f"{[c.title for c in listing]}")

    def loras(self) -> dict[str, Path]:
        """name (the file's stem, as A1111 names them) -> file, for `<lora:name:weight>`."""
        return _files_by_stem(self.lora_dir, LORA_SUFFIXES)

    def find_lora(self, name: str) -> Path:
        loras = self.loras()
        if self.lora_dir is None:
            raise UnknownName(f"prompt: <lora:{name}:...> needs a server started with --lora-dir")
        if name not in loras:
            raise UnknownName(f"prompt: no LoRA {name!r} in the server's LoRA folder; it has {sorted(loras)}")
        return loras[name]

    def lora_sha256(self, path: Path) -> str:
        return self._sha256(path)

    # ---- loading (on the worker thread only)

    def load(self, checkpoint: Checkpoint) -> DiffusionModel:
        """The model of a checkpoint, from the cache or loaded (evicting the least recently used)."""
        if checkpoint.sha256 in self.loaded:
            self.loaded.move_to_end(checkpoint.sha256)
            return self.loaded[checkpoint.sha256]
        model = self.open(checkpoint)
        while len(self.loaded) >= self.cache_size:
            evicted, _ = self.loaded.popitem(last=False)
            self.embedding_reports.pop(evicted, None)
        self.loaded[checkpoint.sha256] = model
        return model

    def open(self, checkpoint: Checkpoint) -> DiffusionModel:
        """A checkpoint loaded afresh, with the embeddings of --embeddings-dir that fit it (no caching: Ray
        Serve's model multiplexing caches these)."""
        try:
            if checkpoint.path is None:
                model = DiffusionModel(device=self.device, dtype=self.dtype)
            else:
                model = DiffusionModel.from_pretrained(checkpoint.path, device=self.device, dtype=self.dtype)
        except Exception as error:  # noqa: BLE001  a broken file must not take the server down
            raise ModelLoadError(f"sd_model_checkpoint: {checkpoint.title} could not be loaded: "
                                 f"{type(error).__name__}: {error}") from error
        self.embedding_reports[checkpoint.sha256] = self._load_embeddings(model)
        return model

    def by_sha256(self, sha256: str) -> Checkpoint:
        return next(c for c in self.checkpoints() if c.sha256 == sha256)

    def _load_embeddings(self, model: DiffusionModel) -> dict[str, dict]:
        """Every embedding of --embeddings-dir that fits the model (A1111's /embeddings "loaded" and "skipped")."""
        report: dict[str, dict] = {"loaded": {}, "skipped": {}}
        for name, path in _files_by_stem(self.embeddings_dir, EMBEDDING_SUFFIXES).items():
            try:
                model.load_textual_inversion(path, token=name)
                report["loaded"][name] = {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None,
                                          "shape": None, "vectors": None}
            except ValueError as error:  # another family's embedding: listed as skipped, with why
                report["skipped"][name] = {"reason": str(error)}
        return report

    def _sha256(self, path: Path) -> str:
        stat = path.stat()
        key = (str(path), stat.st_size, stat.st_mtime_ns)
        if key not in self._hashes:
            self._hashes[key] = path_sha256(path)
        return self._hashes[key]


def _is_checkpoint(path: Path) -> bool:
    """A single-file checkpoint, or a diffusers folder (it has a model_index.json)."""
    if path.is_dir():
        return (path / "model_index.json").is_file()
    return path.suffix in CHECKPOINT_SUFFIXES and path.is_file()


def _files_by_stem(folder: Path | None, suffixes: tuple[str, ...]) -> dict[str, Path]:
    if folder is None:
        return {}
    return {p.stem: p for p in sorted(folder.rglob("*")) if p.suffix in suffixes and p.is_file()
            and os.access(p, os.R_OK)}
