"""Text-to-image data read through Hugging Face ``datasets``: prompts (``PromptDataset``,
data-free distribution matching) and captioned images (``ImageCaptionDataset``, real images
for GAN terms and ADD)."""

from __future__ import annotations

import functools
import hashlib
import io
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from distill.data.items import BadItem, bad_item_error, check_caption, check_size, to_rgb

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

    RGB (``distill.data.items.to_rgb``: 16-bit scaled, alpha over white); the short side
    resized to R (bicubic), then the centre R x R crop. Sizes and crop
    offsets follow torchvision's ``Resize(R)`` + ``CenterCrop(R)``, the preprocessing of the
    diffusers training scripts, so latents match what those pipelines saw."""
    from PIL import Image

    image = to_rgb(image)
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


def _caption_or_none(value):
    """The caption (the first of several), or what stands in its place for ``check_caption``."""
    if isinstance(value, (list, tuple)) and value and isinstance(value[0], str):
        return value[0]
    return value


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
    file(s) or a directory of them, a ``save_to_disk`` directory, or a hub id.

    Bad items (``distill.data.items``): ``on_bad_item="error"`` stops at the first one read;
    ``"skip"`` reads every item once here and leaves the bad ones out (``skipped``: row ->
    reason). ``min_image_size``: the smallest short side taken (None: ``resolution``)."""

    def __init__(self, path: str, *, split: str = "train", image_column: str = "image", caption_column: str = "text",
                 resolution: int, on_bad_item: str = "error", min_image_size: int | None = None):
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
        self.on_bad_item = on_bad_item
        self.min_image_size = resolution if min_image_size is None else min_image_size
        self.skipped: dict[int, str] = {}
        self._rows = list(range(len(table)))  # item -> row: all of them, less the bad ones when skipping
        if on_bad_item == "skip":
            for row in range(len(table)):
                try:
                    self._read(row)
                except BadItem as err:
                    self.skipped[row] = str(err)
            self._rows = [row for row in self._rows if row not in self.skipped]
            if not self._rows:
                raise ValueError(f"{self.path}: every one of its {len(table)} rows is bad; the first: row "
                                 f"{next(iter(self.skipped))}: {next(iter(self.skipped.values()))}")
            self._identity += f"|skipped:{sorted(self.skipped)}"

    @property
    def identity(self) -> str:
        """Names this data (source, split, columns, resolution, size, content) for on-disk caches."""
        return self._identity

    def __len__(self) -> int:
        return len(self._rows)

    @functools.cached_property
    def prompts(self) -> list[str]:
        """Every caption, in order, without decoding an image (evaluation prompts; read once)."""
        captions = self.table[self.caption_column]
        return [_caption(captions[row], self.path, row) for row in self._rows]

    def _read(self, row: int) -> dict:
        """Row ``row`` as an item, or ``BadItem`` saying why it cannot be one."""
        try:
            values = self.table[row]  # datasets decodes an Image feature here
            caption = check_caption(_caption_or_none(values[self.caption_column]))
            image = _to_pil(values[self.image_column], self._base_dir)
            check_size(image, self.min_image_size)
            return {"image": preprocess_image(image, self.resolution), "prompt": caption}
        except BadItem:
            raise
        except (OSError, ValueError, TypeError, SyntaxError) as err:  # PIL: unreadable, truncated, not an image
            raise BadItem(f"its image cannot be read ({type(err).__name__}: {err})") from err

    def __getitem__(self, index: int) -> dict:
        row = self._rows[int(index)]
        try:
            return self._read(row)
        except BadItem as err:
            raise bad_item_error(self.path, row, str(err)) from None
