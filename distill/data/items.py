"""Bad items of a captioned-image dataset, and what becomes of them (``data.on_bad_item``).

An item is bad when its image cannot be read (not an image, truncated), it has no caption
(an empty string is one: the unconditional prompt), or its image is smaller than the minimum side (``data.min_image_size``,
null: the training resolution; such an image would be upscaled). Images of any mode are
converted, not refused: greyscale to RGB, 16-bit to 8-bit by scaling (not clipping), an alpha
channel composited over white.

``error`` (the default) stops at the first bad item read, naming its row and source; ``skip``
reads every item once when the dataset is built (one decoding pass) and leaves the bad ones
out. Which items are left out is a function of the data alone, so a resumed run reads what
the uninterrupted one read; the dataset's ``skipped`` (index -> reason) is the report.
"""

from __future__ import annotations

import numpy as np

ON_BAD_ITEM = ("error", "skip")


class BadItem(ValueError):
    """An item that cannot be trained on; the message says why."""


def to_rgb(image):
    """A PIL image of any mode as 8-bit RGB: 16- and 32-bit integer images scaled to 0..255,
    an alpha channel (RGBA, LA, a palette with transparency) composited over white."""
    from PIL import Image

    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        pixels = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or pixels.max(initial=0) > 255 else 255.0
        image = Image.fromarray(np.clip(pixels / top * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
    elif image.mode == "F":
        image = Image.fromarray((np.clip(np.asarray(image), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8), mode="L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def check_size(image, minimum: int) -> None:
    width, height = image.size
    if min(width, height) < minimum:
        raise BadItem(f"its image is {width}x{height}, smaller than {minimum} on its short side (it would be upscaled; "
                      "data.min_image_size=0 allows that)")


def check_caption(caption) -> str:
    """A caption is a string; an empty one is the unconditional prompt, a missing one (None) is bad."""
    if not isinstance(caption, str):
        raise BadItem(f"it has no caption ({caption!r})")
    return caption


def bad_item_error(source: str, index: int, reason: str) -> ValueError:
    return ValueError(f"{source}: row {index} cannot be trained on: {reason}. Fix or remove it, or set "
                      "data.on_bad_item=skip to leave such items out (counted in the run's data_report.json)")
