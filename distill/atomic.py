"""Writes that a reader (or a later run after a crash) sees whole or not at all.

``atomic_file(path)`` yields a per-process temporary name beside ``path`` (``<name>.tmp-<pid>``)
and renames it into place when the block finishes; concurrent writers never share a file
and an interrupted write leaves only its temporary, which readers never open.
``atomic_directory(path)`` does the same for a directory: it yields an empty
``.partial-<name>`` beside it and swaps it in for ``path`` when the block finishes (a
directory cannot be replaced in one rename: the old one is removed first, so a crash
between the two steps leaves no ``path`` but a complete ``.partial-<name>``).
"""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

PARTIAL_PREFIX = ".partial-"


def partial_directory(path: str | Path) -> Path:
    """Where ``atomic_directory(path)`` stages its contents (other processes of a run write
    their parts there too)."""
    path = Path(path)
    return path.with_name(f"{PARTIAL_PREFIX}{path.name}")


@contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yields a temporary file name; on success it becomes ``path`` (``os.replace``)."""
    path = Path(path)
    temporary = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


@contextmanager
def atomic_directory(path: str | Path) -> Iterator[Path]:
    """Yields an empty staging directory; on success it replaces ``path``. A failed block
    leaves the staging directory, which the next call clears."""
    path = Path(path)
    staging = partial_directory(path)
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    yield staging
    shutil.rmtree(path, ignore_errors=True)
    staging.rename(path)
