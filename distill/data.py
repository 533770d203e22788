"""Datasets and the deterministic order in which training reads them.

The built-in benchmark is scikit-learn's handwritten digits: 1,797 real 8x8 grey images in
10 classes, shipped inside scikit-learn, so it needs no network. A fixed 20% is held out
(the noise floor of the quality benchmark); teacher, classifier and distillation see only
the training split.

Class-conditional latent teachers (DiT) can train data-free on class labels alone
(``ClassLabelDataset``). Text-to-image teachers train on prompts (``PromptDataset``: data-free
distribution matching) or on captioned images (``ImageCaptionDataset``: real images for GAN
terms and ADD), read through Hugging Face ``datasets``. ``cached_dataset`` encodes either once
into safetensors shards (VAE latents, text embeddings) so long runs skip the frozen encoders.
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import io
import json
import os
import re
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from distill.atomic import atomic_file

DIGITS_NUM_CLASSES = 10
DIGITS_HOLDOUT = 360  # images held out of 1,797, chosen once by a fixed permutation
_DIGITS_SPLIT_SEED = 0


def load_digits(split: str) -> tuple[Tensor, Tensor]:
    """Digits as ``(images [N, 1, 8, 8] in [-1, 1], labels [N] int64)``.

    ``split`` is ``"train"`` (1,437 images), ``"test"`` (the 360 held out) or ``"all"``.
    """
    from sklearn.datasets import load_digits as sk_load_digits

    if split not in ("train", "test", "all"):
        raise ValueError(f"digits split must be 'train', 'test' or 'all', not {split!r}")
    raw = sk_load_digits()
    images = torch.tensor(raw.images, dtype=torch.float32)[:, None] / 8.0 - 1.0  # 0..16 -> [-1, 1]
    labels = torch.tensor(raw.target, dtype=torch.int64)
    if split == "all":
        return images, labels
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(_DIGITS_SPLIT_SEED))
    index = order[DIGITS_HOLDOUT:] if split == "train" else order[:DIGITS_HOLDOUT]
    return images[index], labels[index]


def reference_set(dataset: str) -> tuple[str, Tensor, Tensor | None]:
    """The real images that generated samples are scored against: ``(key, images [N, C, H, W]
    in [0, 1], labels [N] or None)``. ``key`` names the set in the reference-feature cache.
    For digits it is the training split, the distribution the teacher learnt."""
    if dataset != "digits":
        raise ValueError(f"no reference set for dataset {dataset!r}")
    images, labels = load_digits("train")
    return f"digits-train-{len(labels)}", (images + 1) / 2, labels


class DigitsDataset(torch.utils.data.Dataset):
    """Map-style view of one digits split; items are ``{"image": [1, 8, 8], "class_label": int}``."""

    num_classes = DIGITS_NUM_CLASSES

    def __init__(self, split: str = "train"):
        self.images, self.labels = load_digits(split)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        return {"image": self.images[index], "class_label": self.labels[index]}


def step_generator(seed: int, step: int, rank: int = 0, stream: int = 0) -> torch.Generator:
    """A CPU generator whose state depends only on ``(seed, step, rank, stream)``.

    Every random draw of a training step comes from one of these, so a resumed run draws
    exactly what the uninterrupted run drew at the same step, whatever happened before.
    """
    mixed = (seed * 1_000_003 + step) * 65_537 + rank * 257 + stream
    return torch.Generator().manual_seed(mixed % (2**63 - 1))


class EpochSampler:
    """Index batches that walk a fresh seeded permutation each epoch, sharded across ranks.

    ``batch(step)`` is a pure function of the step, so data order survives a resume.
    Global batch ``k`` of epoch ``e`` is positions ``[k*B*W, (k+1)*B*W)`` of permutation
    ``e``; rank ``r`` takes its ``r``-th slice of ``B``. Epochs drop their last partial batch.
    """

    def __init__(self, num_items: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        self.num_items, self.batch_size, self.seed = num_items, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.batches_per_epoch = num_items // (batch_size * world_size)
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"dataset of {num_items} items is smaller than one global batch "
                f"({batch_size} x {world_size} processes)"
            )

    def batch(self, step: int) -> Tensor:
        epoch, k = divmod(step, self.batches_per_epoch)
        order = torch.randperm(self.num_items, generator=torch.Generator().manual_seed(self.seed * 7919 + epoch))
        start = (k * self.world_size + self.rank) * self.batch_size
        return order[start : start + self.batch_size]


def collate(dataset, index: Tensor) -> dict[str, "Tensor | list[str]"]:
    """Stack the items ``dataset[i]`` for ``i`` in ``index`` into one batch dict.

    Tensors and numbers become one ``[B, ...]`` tensor; strings (prompts) stay a list of B str,
    the form text encoders take."""
    items = [dataset[int(i)] for i in index]
    return {
        key: [item[key] for item in items] if isinstance(items[0][key], str)
        else torch.stack([torch.as_tensor(item[key]) for item in items])
        for key in items[0]
    }


# ---------------------------------------------------------------------------- class labels only
CLASS_REPEATS = 100  # items per class in one epoch of ClassLabelDataset


class ClassLabelDataset(torch.utils.data.Dataset):
    """Class labels without images, for data-free distillation of a class-conditional teacher
    (DMD2 without its GAN term needs only what to condition on); items are
    ``{"class_label": int64 scalar}``.

    Item ``i`` is class ``i % num_classes``, and there are ``num_classes * repeats`` items, so
    every epoch of a seeded permutation (``EpochSampler``) is class-balanced and holds many
    global batches even for 10 classes; the order within it is the sampler's."""

    def __init__(self, num_classes: int, *, repeats: int = CLASS_REPEATS):
        if not isinstance(num_classes, int) or num_classes <= 0:
            raise ValueError(f"num_classes must be a positive int, not {num_classes!r}")
        if not isinstance(repeats, int) or repeats <= 0:
            raise ValueError(f"repeats must be a positive int, not {repeats!r}")
        self.num_classes, self.repeats = num_classes, repeats

    @property
    def identity(self) -> str:
        return f"classes|{self.num_classes}|{self.repeats}"

    def __len__(self) -> int:
        return self.num_classes * self.repeats

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} class labels")
        return {"class_label": torch.tensor(index % self.num_classes, dtype=torch.int64)}


# ---------------------------------------------------------------------------- text-to-image data
_TABLE_BUILDERS = {".parquet": "parquet", ".json": "json", ".jsonl": "json", ".csv": "csv"}


def _load_table(path: str, split: str):
    """One split of a Hugging Face ``datasets.Dataset`` from ``path``: a ``save_to_disk``
    directory, a data directory (imagefolder with metadata.jsonl/csv, parquet, json, csv), a
    parquet/json/csv file, or a hub id."""
    import datasets

    local = Path(path).expanduser()
    if local.is_dir():
        if (local / "dataset_dict.json").is_file() or (local / "state.json").is_file():
            table = datasets.load_from_disk(str(local))
            if isinstance(table, datasets.DatasetDict):
                if split not in table:
                    raise ValueError(f"{path}: no split {split!r} in this saved dataset; its splits: {sorted(table)}")
                table = table[split]
            return table
        # load_dataset picks the format from the files (imagefolder, parquet, json, csv) and the
        # splits from their layout (train/ test/ folders, train-*.parquet names)
        return datasets.load_dataset(str(local), split=split)
    if local.is_file():
        builder = _TABLE_BUILDERS.get(local.suffix.lower())
        if builder is None:
            raise ValueError(f"{path}: cannot read {local.suffix!r} files; "
                             f"expected a directory or one of {sorted(_TABLE_BUILDERS)}")
        # one file has no split layout of its own: it is whichever split was asked for
        return datasets.load_dataset(builder, data_files={split: [str(local)]}, split=split)
    if path.startswith(("/", ".", "~")) or local.suffix.lower() in (*_TABLE_BUILDERS, ".txt"):
        raise FileNotFoundError(f"no such file or directory: {path}")
    try:
        return datasets.load_dataset(path, split=split)
    except Exception as err:  # offline, unknown id, missing split, ...: say what was tried
        raise FileNotFoundError(
            f"{path!r} is not a local file or directory, and loading it as a Hugging Face hub dataset "
            f"(split {split!r}) failed: {err}"
        ) from err


def _where(path: str) -> str:
    """The absolute path of a local source (so the same data under two relative spellings is
    one cache entry), else the hub id as given."""
    local = Path(path).expanduser()
    return str(local.resolve()) if local.exists() else path


def _require_columns(table, path: str, split: str, columns: list[str]) -> None:
    for column in columns:
        if column not in table.column_names:
            raise ValueError(f"{path} (split {split!r}) has no column {column!r}; its columns: {table.column_names}")


class PromptDataset(torch.utils.data.Dataset):
    """Prompts for text-conditioned distillation; items are ``{"prompt": str}``.

    ``path``: a ``.txt`` file (one prompt per line; lines are stripped, blank ones skipped)
    or anything ``datasets`` reads (see ``_load_table``), prompts in ``column``."""

    def __init__(self, path: str, *, split: str = "train", column: str = "text"):
        self.path, self.split, self.column = str(path), split, column
        local = Path(self.path).expanduser()
        if local.suffix.lower() == ".txt":
            if not local.is_file():
                raise FileNotFoundError(f"no prompt file at {self.path}")
            text = local.read_text(encoding="utf-8")
            self.prompts = [line.strip() for line in text.splitlines() if line.strip()]
            # content, not modification time: an edited file must not reuse a stale cache
            source = hashlib.sha256(text.encode()).hexdigest()[:16]
        else:
            table = _load_table(self.path, split)
            _require_columns(table, self.path, split, [column])
            self.prompts = list(table[column])
            for row, prompt in enumerate(self.prompts):
                if not isinstance(prompt, str):
                    raise ValueError(f"{self.path}: row {row} of column {column!r} is "
                                     f"{type(prompt).__name__}, not a string")
            # datasets' fingerprint follows the data files (and their modification times)
            source = table._fingerprint
        if not self.prompts:
            raise ValueError(f"no prompts in {self.path} (split {split!r}, column {column!r})")
        self._identity = f"prompts|{_where(self.path)}|{split}|{column}|{len(self.prompts)}|{source}"

    @property
    def identity(self) -> str:
        """Names this data (source, split, column, size, content) for on-disk caches."""
        return self._identity

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, index: int) -> dict[str, str]:
        return {"prompt": self.prompts[index]}


def _to_pil(value, base_dir: Path | None):
    """A PIL image from what a ``datasets`` image column holds: a decoded PIL image, an
    undecoded ``{"bytes", "path"}`` dict (Image feature with decode=False, or a parquet file
    written without datasets' feature metadata), raw bytes, a file path or an HWC array."""
    from PIL import Image

    if isinstance(value, Image.Image):
        return value
    if isinstance(value, dict):
        if value.get("bytes") is not None:
            return Image.open(io.BytesIO(value["bytes"]))
        value = value.get("path")
    if isinstance(value, (bytes, bytearray)):
        return Image.open(io.BytesIO(value))
    if isinstance(value, str):
        file = Path(value).expanduser()
        if not file.is_absolute() and base_dir is not None:
            file = base_dir / file  # paths in a metadata file are relative to the data
        image = Image.open(file)
        image.load()  # reads the pixels and closes the file now, not at garbage collection
        return image
    if isinstance(value, np.ndarray):
        return Image.fromarray(value)
    raise TypeError(f"cannot read an image from a {type(value).__name__}")


def preprocess_image(image, resolution: int) -> Tensor:
    """A PIL image as a training image: float32 ``[3, R, R]`` in [-1, 1], ``R = resolution``.

    RGB; the short side resized to R (bicubic), then the centre R x R crop. Sizes and crop
    offsets follow torchvision's ``Resize(R)`` + ``CenterCrop(R)``, the preprocessing of the
    diffusers training scripts, so latents match what those pipelines saw."""
    from PIL import Image

    image = image.convert("RGB")
    width, height = image.size
    if width <= height:
        size = (resolution, int(resolution * height / width))
    else:
        size = (int(resolution * width / height), resolution)
    if size != image.size:
        image = image.resize(size, Image.Resampling.BICUBIC)
    left, top = int(round((size[0] - resolution) / 2)), int(round((size[1] - resolution) / 2))
    image = image.crop((left, top, left + resolution, top + resolution))
    pixels = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)  # [3, R, R] 0..255
    return pixels.float() / 127.5 - 1.0


def _caption(value, path: str, index: int) -> str:
    if isinstance(value, str):
        return value
    # several captions per image (COCO style): the first, so an item is the same every epoch
    if isinstance(value, (list, tuple)) and value and isinstance(value[0], str):
        return value[0]
    raise ValueError(f"{path}: the caption of row {index} is {value!r}, not a string")


class ImageCaptionDataset(torch.utils.data.Dataset):
    """Captioned images; items are ``{"image": float32 [3, R, R] in [-1, 1], "prompt": str}``
    with ``R = resolution`` (see ``preprocess_image``).

    ``path``: an imagefolder directory (images with a metadata.jsonl/csv of captions), parquet
    file(s) or a directory of them, a ``save_to_disk`` directory, or a hub id."""

    def __init__(self, path: str, *, split: str = "train", image_column: str = "image", caption_column: str = "text",
                 resolution: int):
        if not isinstance(resolution, int) or resolution <= 0:
            raise ValueError(f"resolution must be a positive int, not {resolution!r}")
        self.path, self.split, self.resolution = str(path), split, resolution
        self.image_column, self.caption_column = image_column, caption_column
        table = _load_table(self.path, split)
        _require_columns(table, self.path, split, [image_column, caption_column])
        if len(table) == 0:
            raise ValueError(f"no rows in {self.path} (split {split!r})")
        self._identity = (f"image_captions|{_where(self.path)}|{split}|{image_column}|{caption_column}|{resolution}|"
                          f"{len(table)}|{table._fingerprint}")
        self.table = table.select_columns([image_column, caption_column])  # decode nothing an item does not use
        local = Path(self.path).expanduser()
        self._base_dir = local if local.is_dir() else local.parent if local.is_file() else None

    @property
    def identity(self) -> str:
        """Names this data (source, split, columns, resolution, size, content) for on-disk caches."""
        return self._identity

    def __len__(self) -> int:
        return len(self.table)

    @functools.cached_property
    def prompts(self) -> list[str]:
        """Every caption, in order, without decoding an image (evaluation prompts; read once)."""
        return [_caption(value, self.path, i) for i, value in enumerate(self.table[self.caption_column])]

    def __getitem__(self, index: int) -> dict:
        row = self.table[int(index)]
        image = _to_pil(row[self.image_column], self._base_dir)
        return {"image": preprocess_image(image, self.resolution),
                "prompt": _caption(row[self.caption_column], self.path, int(index))}


def make_dataset(*, dataset: str, path: str | None, split: str, prompt_column: str, image_column: str,
                 resolution: int | None, num_classes: int | None = None) -> torch.utils.data.Dataset:
    """The training dataset named by ``dataset`` (the config's ``data.*`` values):
    ``digits`` -> DigitsDataset("train"), ``classes`` -> ClassLabelDataset(``num_classes``: the
    caller passes the teacher's), ``prompts`` -> PromptDataset, ``image_captions`` ->
    ImageCaptionDataset (``resolution`` required: the caller passes the teacher's image size
    when the config leaves it null)."""
    if dataset in ("digits", "classes") and path is not None:
        raise ValueError(f"{dataset} reads no path; got path {path!r}")
    if dataset == "digits":
        return DigitsDataset("train")
    if dataset == "classes":
        if num_classes is None:
            raise ValueError("dataset 'classes' needs num_classes: the teacher is not class-conditional")
        return ClassLabelDataset(num_classes)
    if dataset not in ("prompts", "image_captions"):
        raise ValueError(f"unknown dataset {dataset!r}; expected 'digits', 'classes', 'prompts' or 'image_captions'")
    if path is None:
        raise ValueError(f"dataset {dataset!r} needs a path (a file, directory or hub id)")
    if dataset == "prompts":
        return PromptDataset(path, split=split, column=prompt_column)
    if resolution is None:
        raise ValueError("dataset 'image_captions' needs a resolution (the side of the square training images)")
    return ImageCaptionDataset(path, split=split, image_column=image_column, caption_column=prompt_column,
                               resolution=resolution)


def image_reference_set(dataset: ImageCaptionDataset, num: int | None = None) -> tuple[str, Tensor, None]:
    """Real images of a captioned dataset to score students against, like ``reference_set``:
    ``(key, images [N, 3, R, R] in [0, 1], None)``.

    ``num`` caps N with a fixed seeded subset (a prefix would inherit whatever order the files
    have); None takes every image. ``key`` names the data, resolution and subset and is safe
    as part of a file name (the reference-feature cache uses it). Holds N*3*R*R floats."""
    if not isinstance(dataset, ImageCaptionDataset):
        raise TypeError(f"reference images need an ImageCaptionDataset, not a {type(dataset).__name__}")
    total = len(dataset)
    if num is None or num >= total:
        index = list(range(total))
    else:
        # sorted: rows read in storage order
        index = sorted(torch.randperm(total, generator=torch.Generator().manual_seed(0))[:num].tolist())
    images = torch.stack([(dataset[i]["image"] + 1) / 2 for i in index])
    selection = "all" if len(index) == total else f"seed0-{len(index)}"
    digest = hashlib.sha256(f"{dataset.identity}|{selection}".encode()).hexdigest()[:12]
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(dataset.path.rstrip("/\\")).name)[:40] or "data"
    return f"{name}-{dataset.resolution}px-{len(index)}-{digest}", images, None


# ---------------------------------------------------------------------------- encoding cache
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
