"""The files and directories a recipe names, checked before any weights load.

A path-valued field says what it names in its metadata (``setting(..., path=KIND)``), and
``check_path`` checks any such value by its kind:

- ``pipeline``: a diffusers pipeline (a local directory with model_index.json, or a hub id);
- ``model``: a transformers / diffusers / hub-mixin model (config.json, or a hub id);
- ``data``: a data file or directory (or an HF datasets hub id);
- ``checkpoint``: a run's checkpoint to resume (``latest``: the newest complete one in
  ``output_dir``), checked as ``distill.checkpoints`` checks one;
- ``output``: a directory the run writes (it may not exist yet, but no file stands in its way).

A value reads as local (``distill.sections.local_or_hub``) when it is relative without or
with several ``/``, starts with ``./``, ``../``, ``/`` or ``~``, names a file, or its first part
is a local directory; then it must exist and hold what its kind needs. Otherwise it is a
hub id (``org/name``): offline (``HF_HUB_OFFLINE=1``) it must be in the local Hugging Face
cache, and the error says where that was looked for; online the Hub answers at load time.

A local model this repository generates rather than ships (``GENERATED``) that is missing
gets the command that makes it.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path

from distill import checkpoints
from distill.sections import fail, local_or_hub

# what a kind needs inside a local directory (and, for a hub id, the file looked up in the cache)
MARKERS = {"pipeline": "model_index.json", "model": "config.json"}
KIND_NAMES = {"pipeline": "a diffusers pipeline directory (model_index.json)", "model": "a model directory (config.json)",
              "data": "a data file or directory", "checkpoint": "a checkpoint directory", "output": "an output directory"}
# local models the repository's scripts generate (not committed), and the command that makes each
GENERATED = {"models/dinov2-random-digits": "python scripts/make_random_dinov2.py"}


def check_path(key: str, value: str, kind: str, *, section=None, revision: str | None = None) -> None:
    """Check ``value`` of ``key`` as a path of ``kind`` (see the module docstring); ``section``:
    the field's section (``checkpoint`` reads its ``output_dir``); ``revision``: a hub revision."""
    if kind == "output":
        return _check_output(key, value)
    if kind == "checkpoint":
        return _check_resume(key, value, section.output_dir)
    local = local_or_hub(value)
    if local is None and _made_by(Path(value)):
        local = Path(value)  # one of ours, not yet made: not a hub id
    if local is None:
        return _check_cached(key, value, kind, revision)
    if not local.exists():
        fail(key, f"{local.resolve()} does not exist{_made_by(local) or _near(local)} "
                  f"(give {KIND_NAMES[kind]} or a hub id)")
    if kind == "data" and _is_empty(local):
        fail(key, f"{local.resolve()} is empty{'' if local.is_file() else ' (a directory with no files)'}: no data to train on")
    marker = MARKERS.get(kind)
    if marker is not None and not (local / marker).is_file():
        what = "is a file, not a directory" if local.is_file() else f"has no {marker}"
        fail(key, f"{local.resolve()} {what} (give {KIND_NAMES[kind]} or a hub id)")


def _is_empty(local: Path) -> bool:
    """A file of nothing but white space, or a directory without a file in it."""
    if local.is_file():
        with open(local, "rb") as f:
            return not f.read(1 << 16).strip() and local.stat().st_size <= 1 << 16
    return not any(p.is_file() for p in local.rglob("*"))


def _made_by(local: Path) -> str:
    resolved = local.resolve()
    for name, command in GENERATED.items():
        if resolved.parts[-len(Path(name).parts):] == Path(name).parts:
            return f": it is generated, not shipped; make it with `{command}` (from the repository root)"
    return ""


def _near(local: Path) -> str:
    """A hint for a misspelt name: the closest existing sibling, if one is close."""
    parent = local.parent
    if not parent.is_dir():
        return ""
    close = difflib.get_close_matches(local.name, [p.name for p in parent.iterdir()], n=1, cutoff=0.75)
    return f" (did you mean {parent / close[0]}?)" if close else ""


def _check_output(key: str, value: str) -> None:
    """Nothing may stand where the directory goes: no file at it or at any of its parents."""
    path = Path(value).expanduser()
    for candidate in (path, *path.parents):
        if candidate.exists():
            if not candidate.is_dir():
                where = "is an existing file" if candidate == path else f"is inside {candidate.resolve()}, a file"
                fail(key, f"{path.resolve()} {where}; give a directory")
            if not os.access(candidate, os.W_OK | os.X_OK):
                fail(key, f"{path.resolve()}: {candidate.resolve()} is not writable")
            return


def _check_resume(key: str, value: str, output_dir: str) -> None:
    if value == "latest":
        newest, skipped = checkpoints.newest_complete(output_dir)
        if newest is None:
            root = (Path(output_dir) / checkpoints.CHECKPOINTS).resolve()
            why = ("; ".join(checkpoints.describe_skipped(skipped)) if skipped
                   else f"no {checkpoints.CHECKPOINT_PREFIX}<step>/ directories")
            fail(key, f"'latest', but there is no complete checkpoint in {root} to resume ({why}); start a new run "
                      "with resume=null")
        return
    found = checkpoints.problems(value, training_state=True)
    if found:
        fail(key, f"{Path(value).resolve()} {'; '.join(found)} (give 'latest' or a checkpoint directory, "
                  f"<output_dir>/{checkpoints.CHECKPOINTS}/{checkpoints.CHECKPOINT_PREFIX}<step>)")


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _check_cached(key: str, repo_id: str, kind: str, revision: str | None) -> None:
    """Offline, a hub id must be in the local cache (online the Hub answers when it loads)."""
    if not _offline():
        return
    from huggingface_hub import constants, try_to_load_from_cache
    from huggingface_hub.file_download import repo_folder_name

    if kind == "data":
        hub = Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo_id, repo_type="dataset")
        from datasets import config as datasets_config

        processed = Path(datasets_config.HF_DATASETS_CACHE) / repo_id.replace("/", "___")
        if hub.is_dir() or processed.is_dir():
            return
        fail(key, f"{repo_id!r} is not a local file or directory, and as a hub dataset it is not in the local cache "
                  f"(HF_HUB_OFFLINE=1; looked in {hub} and {processed}); download it once with network, or give a "
                  "local path")
    marker = MARKERS[kind]
    cached = try_to_load_from_cache(repo_id, marker, revision=revision)
    if isinstance(cached, str):
        return
    where = Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo_id, repo_type="model")
    fail(key, f"{repo_id!r} is not a local directory, and as a hub id its {marker} is not in the local cache "
              f"(HF_HUB_OFFLINE=1; looked in {where}{f' at revision {revision}' if revision else ''}); download it "
              "once with network (huggingface-cli download), or give a local directory")
