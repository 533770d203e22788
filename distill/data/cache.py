"""``cached_dataset`` encodes a dataset once into safetensors shards (VAE latents, text
embeddings) so long runs skip the frozen encoders; ``CachedDataset`` reads it back."""

from __future__ import annotations

import bisect
import hashlib
import json
import os
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from distill.atomic import atomic_file
from distill.data.order import collate

_CACHE_FORMAT = 1  # bump when the layout changes, so old caches are not misread


def cache_path(dataset, *, cache_dir: str | Path, key: str) -> Path:
    """The directory that caches ``dataset`` (its ``identity``) encoded by the encoder that
    ``key`` names (the caller hashes the teacher's weights / paths into it)."""
    digest = hashlib.sha256(f"{_CACHE_FORMAT}|{key}|{dataset.identity}".encode()).hexdigest()[:24]
    return Path(os.path.expanduser(str(cache_dir))) / f"encoded-{digest}"


def _shard_metadata(path: Path) -> dict[str, str] | None:
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as handle:
            return handle.metadata() or {}
    except Exception:  # absent or unreadable: not a finished shard
        return None


def _cache_complete(directory: Path) -> bool:
    try:
        manifest = json.loads((directory / "manifest.json").read_text())
    except (OSError, ValueError):
        return False
    return manifest.get("format") == _CACHE_FORMAT and all((directory / s["file"]).is_file() for s in manifest["shards"])


def _encode_range(dataset, encode: Callable[[dict], dict[str, Tensor]], start: int, stop: int,
                  batch_size: int) -> tuple[dict[str, Tensor], list[str] | None]:
    """``encode`` items ``[start, stop)`` in batches: (tensors ``[stop - start, ...]`` on CPU,
    their prompts or None)."""
    parts: dict[str, list[Tensor]] = {}
    prompts: list[str] = []
    with torch.no_grad():
        for first in range(start, stop, batch_size):
            batch = collate(dataset, torch.arange(first, min(first + batch_size, stop)))
            size = min(first + batch_size, stop) - first
            encoded = encode(batch)
            if not encoded:
                raise ValueError("encode returned no tensors to cache")
            for name, value in encoded.items():
                if name == "prompt" or not isinstance(value, Tensor) or value.shape[:1] != (size,):
                    raise ValueError(f"encode must return batch-first tensors of {size} rows under names other than "
                                     f"'prompt'; got {name!r}: {getattr(value, 'shape', type(value).__name__)}")
                parts.setdefault(name, []).append(value.detach().cpu())
            prompts += batch.get("prompt", [])
    tensors = {name: torch.cat(values).contiguous() for name, values in parts.items()}
    return tensors, (prompts if prompts else None)


def cached_dataset(dataset, encode: Callable[[dict], dict[str, Tensor]], *, cache_dir: str | Path, key: str,
                   batch_size: int = 64, shard_size: int = 1024) -> "CachedDataset":
    """``dataset`` encoded once and read back from ``cache_dir``.

    ``encode(batch) -> {name: Tensor [B, ...]}`` gets ``collate``d batches of ``batch_size``
    items (``"image"`` [B, 3, R, R], ``"prompt"`` list of B str) and returns e.g. ``"latent"``
    and ``"cond.<key>"`` tensors; they are stored under the names it gives, on CPU, run under
    ``torch.no_grad``. The cache is a directory (``cache_path``) of safetensors shards of
    ``shard_size`` items, each renamed into place when whole, and a ``manifest.json`` written
    last: a build that was interrupted has no manifest, so it is rebuilt rather than read
    (its finished shards are kept; temporary files are ignored). A complete cache is reused
    without calling ``encode``. Items: ``{name: Tensor [...], "prompt": str}``."""
    from safetensors.torch import save_file

    directory = cache_path(dataset, cache_dir=cache_dir, key=key)
    if _cache_complete(directory):
        return CachedDataset(directory)
    directory.mkdir(parents=True, exist_ok=True)
    shards = []
    for number, start in enumerate(range(0, len(dataset), shard_size)):
        stop = min(start + shard_size, len(dataset))
        path = directory / f"shard-{number:05d}.safetensors"
        metadata = _shard_metadata(path)
        if metadata is None or (metadata.get("start"), metadata.get("stop")) != (str(start), str(stop)):
            tensors, prompts = _encode_range(dataset, encode, start, stop, batch_size)
            metadata = {"start": str(start), "stop": str(stop)}
            if prompts is not None:
                metadata["prompts"] = json.dumps(prompts)
            with atomic_file(path) as file:
                save_file(tensors, str(file), metadata=metadata)
        shards.append({"file": path.name, "start": start, "stop": stop})
    manifest = {"format": _CACHE_FORMAT, "key": key, "identity": dataset.identity, "num_items": len(dataset),
                "shards": shards}
    with atomic_file(directory / "manifest.json") as file:
        file.write_text(json.dumps(manifest, indent=1))
    return CachedDataset(directory)


class CachedDataset(torch.utils.data.Dataset):
    """A complete encoding cache (see ``cached_dataset``) as a map-style dataset: items
    ``{"latent": [C, h, w], "cond.<key>": [...], ..., "prompt": str}``, the tensors read from
    memory-mapped shards on demand so caches larger than memory work."""

    def __init__(self, directory: str | Path):
        from safetensors import safe_open

        self.directory = Path(directory)
        manifest = json.loads((self.directory / "manifest.json").read_text())
        self.key, self._identity, self._num_items = manifest["key"], manifest["identity"], manifest["num_items"]
        self._shards = manifest["shards"]
        self._starts = [shard["start"] for shard in self._shards]
        prompts: list[str] = []
        for shard in self._shards:
            with safe_open(str(self.directory / shard["file"]), "pt") as handle:
                prompts += json.loads((handle.metadata() or {}).get("prompts", "[]"))
        self.prompts = prompts if len(prompts) == self._num_items else None
        self._handles: dict[int, object] = {}

    @property
    def identity(self) -> str:
        return self._identity

    def __len__(self) -> int:
        return self._num_items

    def __getitem__(self, index: int) -> dict:
        from safetensors import safe_open

        index = int(index)
        if not 0 <= index < self._num_items:
            raise IndexError(f"index {index} out of range for a cache of {self._num_items} items")
        number = bisect.bisect_right(self._starts, index) - 1
        if number not in self._handles:
            self._handles[number] = safe_open(str(self.directory / self._shards[number]["file"]), "pt")
        handle, row = self._handles[number], index - self._starts[number]
        item: dict = {name: handle.get_slice(name)[row] for name in handle.keys()}
        if self.prompts is not None:
            item["prompt"] = self.prompts[index]
        return item

    def __getstate__(self) -> dict:
        # open shard handles do not pickle (DataLoader workers); each process reopens its own
        return {**self.__dict__, "_handles": {}}
