"""Line plots of a run's scores against step (``scores.png`` beside ``scores.jsonl``), drawn
with PIL alone: matplotlib is not among the dependencies, and a panel of axes, a polyline and
its extreme values is all a training curve needs."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

WIDTH, PANEL_HEIGHT = 480, 180  # pixels of one panel
MARGIN_LEFT, MARGIN_RIGHT, MARGIN_TOP, MARGIN_BOTTOM = 64, 16, 22, 26
LINE = (31, 119, 180)  # the curves' colour; nothing else in the picture is drawn in it
AXES, GRID, TEXT = (0, 0, 0), (225, 225, 225), (40, 40, 40)


def plot_against_step(rows: Sequence[dict], keys: Sequence[str], path: str | Path) -> Path | None:
    """One panel per key of ``keys`` (top to bottom) of ``row[key]`` against ``row["step"]``
    over ``rows`` (e.g. ``fd_classifier`` and ``recall_classifier`` from ``scores.jsonl``),
    each with its own y range, written as a PNG of WIDTH x (PANEL_HEIGHT x panels). Keys
    that no row has are left out; returns None (and writes nothing) when none is left."""
    from PIL import Image, ImageDraw, ImageFont

    keys = [key for key in keys if any(key in row for row in rows)]
    if not keys:
        return None
    image = Image.new("RGB", (WIDTH, PANEL_HEIGHT * len(keys)), "white")
    draw, font = ImageDraw.Draw(image), ImageFont.load_default()
    for panel, key in enumerate(keys):
        points = [(row["step"], float(row[key])) for row in rows if row.get(key) is not None]
        _panel(draw, font, key, points, top=panel * PANEL_HEIGHT)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


def _panel(draw, font, title: str, points: list[tuple[int, float]], *, top: int) -> None:
    left, right = MARGIN_LEFT, WIDTH - MARGIN_RIGHT
    upper, lower = top + MARGIN_TOP, top + PANEL_HEIGHT - MARGIN_BOTTOM
    draw.text((left, top + 4), f"{title} against step", fill=TEXT, font=font)
    draw.line([(left, upper), (left, lower), (right, lower)], fill=AXES)
    steps, values = [s for s, _ in points], [v for _, v in points]
    s_lo, s_hi = min(steps), max(steps)
    v_lo, v_hi = min(values), max(values)
    if v_hi == v_lo:  # a flat curve sits mid-panel
        v_lo, v_hi = v_lo - 0.5 * (abs(v_lo) or 1), v_hi + 0.5 * (abs(v_hi) or 1)
    x = lambda s: left + (right - left) * ((s - s_lo) / (s_hi - s_lo) if s_hi > s_lo else 0.5)
    y = lambda v: lower - (lower - upper) * (v - v_lo) / (v_hi - v_lo)
    for value in (v_lo, v_hi):
        draw.line([(left + 1, y(value)), (right, y(value))], fill=GRID)
        draw.text((4, y(value) - 6), f"{value:.4g}", fill=TEXT, font=font)
    for step in sorted({s_lo, s_hi}):
        draw.text((x(step) - 8, lower + 6), str(step), fill=TEXT, font=font)
    xy = [(x(s), y(v)) for s, v in points]
    if len(xy) > 1:
        draw.line(xy, fill=LINE, width=2)
    for px, py in xy:
        draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=LINE)
