"""Image grids: sample grids during training, ``distill sample`` and ``distill eval``."""

from __future__ import annotations

import math
from pathlib import Path

import torch


def image_grid(images: torch.Tensor, columns: int | None = None) -> torch.Tensor:
    """[N, C, H, W] in [0, 1] -> one [C, rows*H, columns*W] grid (1-pixel gaps; ``columns``
    defaults to a square's)."""
    columns = columns or math.ceil(math.sqrt(len(images)))
    n, c, h, w = images.shape
    rows = math.ceil(n / columns)
    grid = torch.ones(c, rows * (h + 1) - 1, columns * (w + 1) - 1)
    for i, image in enumerate(images):
        r, col = divmod(i, columns)
        grid[:, r * (h + 1) : r * (h + 1) + h, col * (w + 1) : col * (w + 1) + w] = image
    return grid


def save_grid(images: torch.Tensor, path: str | Path, columns: int | None = None, scale: int = 4) -> None:
    """``image_grid`` of ``images`` [N, C, H, W] in [0, 1], each pixel ``scale`` x ``scale``, as a PNG."""
    from PIL import Image

    grid = image_grid(images.float().cpu(), columns)
    grid = torch.nn.functional.interpolate(grid[None], scale_factor=scale, mode="nearest")[0]
    array = (grid.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array[..., 0] if array.shape[2] == 1 else array).save(path)
