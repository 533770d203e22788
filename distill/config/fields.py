"""The checks a field declares beside itself, in its metadata (``distill.sections.setting``):
one walk over every section of a config checks them all, before any weights load.

- ``minimum`` / ``maximum``: the value's range;
- ``check``: a function of (key, value) that fails a bad one (e.g. a tracker not installed);
- ``at_most``: a function of the whole config that gives ``(bound, what the bound is)`` where
  it is known before anything loads (``data.batch_size`` against the dataset's size), else None;
- ``path``: the kind of file or directory the value names (``distill.config.paths``), checked
  when ``used(section)`` says it is read at all.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from distill.config.paths import check_path
from distill.sections import fail


def check_fields(section: Any, prefix: str = "", root: Any = None) -> None:
    """Check every field of ``section`` (a config or one of its sections, at ``prefix``) and
    of the sections inside it by the checks their metadata declares."""
    root = section if root is None else root
    for f in dataclasses.fields(section):
        value, key, meta = getattr(section, f.name), f"{prefix}{f.name}", f.metadata
        if dataclasses.is_dataclass(value):
            check_fields(value, f"{key}.", root)
            continue
        if value is None:
            continue
        if "minimum" in meta and value < meta["minimum"]:
            fail(key, f"must be at least {meta['minimum']}, got {value}")
        if "maximum" in meta and value > meta["maximum"]:
            fail(key, f"must be at most {meta['maximum']}, got {value}")
        if "check" in meta:
            meta["check"](key, value)
        if "at_most" in meta:
            bound = meta["at_most"](root)
            if bound is not None and value > bound[0]:
                fail(key, f"{value} is more than {bound[1]} ({bound[0]})")
        if "path" in meta and meta.get("used", lambda _: True)(section):
            revision = getattr(section, meta["revision"]) if "revision" in meta else None
            check_path(key, value, meta["path"], section=section, revision=revision)


def dataset_size(config: Any) -> tuple[int, str] | None:
    """The number of training items, where it is known before anything loads: the built-in
    digits' training split, a prompts .txt file's non-blank lines, or the class labels of a
    class-conditional teacher (its class count from its config files, times the repeats)."""
    d = config.data
    if d.dataset == "digits":
        from distill.data.digits import DIGITS_TRAIN_SIZE

        return DIGITS_TRAIN_SIZE, "the digits' training split"
    if d.dataset == "prompts" and d.path is not None and Path(d.path).expanduser().suffix.lower() == ".txt":
        file = Path(d.path).expanduser()
        if file.is_file():
            count = sum(1 for line in file.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip())
            return count, f"the prompts in {d.path}"
    if d.dataset == "classes":
        from distill.data.classes import CLASS_REPEATS
        from distill.teachers import class_count

        count = class_count(config.teacher.path, config.teacher.revision)
        if count is not None:
            return count * CLASS_REPEATS, f"the teacher's {count} classes x {CLASS_REPEATS}"
    return None
