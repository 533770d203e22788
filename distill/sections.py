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
from typing import Any, Optional

from distill.errors import SettingError


def setting(default: Any, help: str) -> Any:
    """A dataclass field with ``default`` (copied per instance when mutable) and its help."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help})
    if dataclasses.is_dataclass(default):
        return field(default_factory=lambda: copy.deepcopy(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


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
    """The local directory `path` names, or None when it reads as a hub id (org/name)."""
    p = Path(path).expanduser()
    if p.exists():
        return p
    # org/name; a dot in the name is fine (stable-diffusion-xl-base-1.0), a file extension is not
    file_like = p.suffix.lower() in (".txt", ".yaml", ".yml", ".json", ".jsonl", ".csv", ".parquet", ".safetensors", ".bin")
    looks_like_hub_id = path.count("/") == 1 and not path.startswith((".", "/", "~")) and not file_like
    return None if looks_like_hub_id else p


def check_model_dir(key: str, path: str, what: str) -> None:
    """A local ``path`` (not a hub id) must be a model directory with a config.json."""
    local = local_or_hub(path)
    if local is not None and not (local / "config.json").is_file():
        fail(key, f"{local.resolve()} has no config.json (give a {what} directory or a hub id)")


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
