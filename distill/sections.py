"""The building blocks of recipe sections, shared by the schema (``distill.config``) and the
methods' own sections (``distill.methods``): ``setting`` declares a field with its default
and help (the only place a default lives), ``fail`` is how a section's check reports a bad
value (the loader adds the recipe file), ``local_or_hub`` tells a local path from a hub id,
and ``LoraConfig`` is the one section several parts of a recipe use."""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from distill.errors import SettingError


class NoiseLevel:
    """Annotation of a timestep setting that may name a noise level instead of an integer: a
    one-key mapping, ``{sigma: s}`` (EDM's sigma = sigma_t / alpha_t, the noise's scale against
    the signal's: 0 clean, large pure noise) or ``{logsnr: l}`` (log(alpha_t^2 / sigma_t^2)).
    The recipe loader resolves it to the teacher's timestep of nearest log-SNR
    (``distill.config.noise_levels``), so one recipe means the same noise on a linear, cosine,
    scaled-linear or flow-matching schedule; the code past the loader sees integers only.
    The loaded value is a plain dict (as YAML dumps and reads it)."""

    UNITS = ("sigma", "logsnr")


Timestep = Union[int, NoiseLevel]  # a teacher timestep, or a noise level resolved to one at load


def setting(default: Any, help: str, **checks: Any) -> Any:
    """A dataclass field with ``default`` (copied per instance when mutable) and its help.

    ``checks`` declare what ``distill.config.fields`` checks of every such field, before any
    weights load: ``minimum`` / ``maximum`` (a range), ``check`` (a function of key and
    value that fails a bad one), ``at_most`` (a function of the whole
    config giving ``(bound, what it is)`` or None where it is not known before loading),
    ``path`` (the kind of file or directory the value names, see ``distill.config.paths``),
    ``used`` (a function of the field's section: whether the path is read at all, e.g. a
    DINOv2 only when a dinov2 backbone is chosen) and ``revision`` (the sibling field holding
    the path's hub revision)."""
    metadata = {"help": help, **checks}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata)
    if dataclasses.is_dataclass(default):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def fail(key: str, message: str) -> None:
    """Report a bad value of ``key`` (its full dotted name in the recipe)."""
    raise SettingError(key, message)


def check_positive(values: dict[str, float]) -> None:
    for key, value in values.items():
        if value <= 0:
            fail(key, f"must be positive, got {value}")


def check_not_negative(values: dict[str, float]) -> None:
    for key, value in values.items():
        if value < 0:
            fail(key, f"must not be negative, got {value}")


def local_or_hub(path: str) -> Path | None:
    """The local path `path` names, or None when it reads as a hub id (org/name).

    Local: anything that exists, and whatever does not read as ``org/name``: relative with no
    or several ``/``, ``./``, ``../``, absolute, ``~``, a file name (``.txt``, ...), or an
    ``org/name`` whose ``org`` is a local directory (``models/digits-teachr``: a misspelt
    local model, not a hub id)."""
    p = Path(path).expanduser()
    if p.exists():
        return p
    # org/name; a dot in the name is fine (stable-diffusion-xl-base-1.0), a file extension is not
    file_like = p.suffix.lower() in (".txt", ".yaml", ".yml", ".json", ".jsonl", ".csv", ".parquet", ".safetensors", ".bin")
    looks_like_hub_id = (path.count("/") == 1 and not path.startswith((".", "/", "~")) and not file_like
                         and not p.parent.is_dir())
    return None if looks_like_hub_id else p


@dataclass
class LoraConfig:
    rank: int = setting(0, "LoRA rank (0: train every weight, no LoRA)")
    alpha: Optional[float] = setting(None, "LoRA alpha (scale alpha / rank); null = rank, a scale of 1")
    target_modules: Optional[list[str]] = setting(
        None,
        "module names (suffixes, as peft matches them) that get LoRA adapters; null = the teacher adapter's default "
        "(UNets: attention, feed-forward and ResNet convolutions; transformers: attention and feed-forward), written "
        "into the run's config.yaml",
    )

    def check(self, key: str) -> None:
        """``key``: where this section sits in the recipe (e.g. ``student.lora``)."""
        if self.rank < 0:
            fail(f"{key}.rank", f"must be 0 (no LoRA) or positive, got {self.rank}")
        if self.alpha is not None and self.alpha <= 0:
            fail(f"{key}.alpha", f"must be positive, got {self.alpha}")
        if self.rank > 0 and self.target_modules is not None and not self.target_modules:
            fail(f"{key}.target_modules", "a LoRA needs at least one target module")
