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


def side_by_side(left: torch.Tensor, right: torch.Tensor, columns: int | None = None, gap: int = 3) -> torch.Tensor:
    """Two image sets [N, C, H, W] in [0, 1] (e.g. the teacher's and the student's from the same
    seeds) as one [C, H', 2 W' + gap] picture: ``image_grid`` of each, ``left`` | ``right``, apart
    by a ``gap``-pixel white bar, so image i sits at the same place in both halves."""
    if left.shape != right.shape:
        raise ValueError(f"side_by_side needs two image sets of one shape, got {tuple(left.shape)} and {tuple(right.shape)}")
    a, b = image_grid(left.float().cpu(), columns), image_grid(right.float().cpu(), columns)
    return torch.cat([a, torch.ones(a.shape[0], a.shape[1], gap), b], dim=2)


def save_grid(images: torch.Tensor, path: str | Path, columns: int | None = None, scale: int = 4) -> None:
    """``image_grid`` of ``images`` [N, C, H, W] in [0, 1], each pixel ``scale`` x ``scale``, as a PNG."""
    save_picture(image_grid(images.float().cpu(), columns), path, scale)


def save_picture(grid: torch.Tensor, path: str | Path, scale: int = 4) -> None:
    """A picture [C, H, W] in [0, 1], each pixel ``scale`` x ``scale``, as a PNG."""
    from PIL import Image

    grid = torch.nn.functional.interpolate(grid[None], scale_factor=scale, mode="nearest")[0]
    array = (grid.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array[..., 0] if array.shape[2] == 1 else array).save(path)
