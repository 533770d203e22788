"""The checkpoints of a run directory: their names, and whether one is complete.

A checkpoint (``checkpoints/step-N/``) holds Accelerate's state (``model*.safetensors``,
``optimizer*.bin``, ``scheduler*.bin``, ``random_states_*.pkl``, ``custom_checkpoint_*.pkl``),
the student (``student/``) and ``distill.json`` (its step, timesteps, teacher, and the size of
every file written, so that a later reader can tell a whole checkpoint from a damaged one).
Checkpoints are renamed into place once written (``distill.atomic``), but a disk that fills
up, a copy cut short or a file truncated by hand still leaves damaged ones behind:
``problems`` names what is wrong with one without loading its tensors (safetensors headers
against file sizes, the zip directories of ``torch.save``'s files), and ``newest_complete``
picks the newest checkpoint without problems, with the ones it passed over and why.

Nothing here reads the recipe: the config checks (``resume``) and the run directory
(``distill.runs``) both use it.
"""

from __future__ import annotations

import json
import struct
import zipfile
from pathlib import Path

CHECKPOINTS, CHECKPOINT_PREFIX, BEST = "checkpoints", "step-", "best"
STUDENT = "student"  # the student's weights inside a checkpoint (diffusers or peft format)
CHECKPOINT_INFO = "distill.json"  # a checkpoint's step, timesteps, teacher and file sizes
SET_ASIDE_PREFIX = ".set-aside-"  # a checkpoint newer than the step a run resumed from, moved out of the way
_TORCH_SAVED = (".bin", ".pkl")  # accelerate's torch.save files: zip archives
_FULL_CHECK_BYTES = 16 << 20  # smaller zip archives get their CRCs checked too (random states, schedulers)


def checkpoint_path(output_dir: str | Path, step: int) -> Path:
    return Path(output_dir) / CHECKPOINTS / f"{CHECKPOINT_PREFIX}{step:06d}"


def checkpoint_step(path: Path) -> int | None:
    """The step of a ``step-N`` directory name, else None."""
    digits = path.name[len(CHECKPOINT_PREFIX):]
    return int(digits) if path.name.startswith(CHECKPOINT_PREFIX) and digits.isdigit() else None


def listed_checkpoints(output_dir: str | Path) -> list[Path]:
    """``step-N`` directories, oldest first, whole or not (partial ones are ``.partial-step-N``)."""
    root = Path(output_dir) / CHECKPOINTS
    found = [p for p in root.glob(f"{CHECKPOINT_PREFIX}*") if p.is_dir() and checkpoint_step(p) is not None]
    return sorted(found, key=checkpoint_step)


def file_sizes(checkpoint: Path) -> dict[str, int]:
    """Every file under ``checkpoint`` (relative name -> bytes): the manifest in distill.json."""
    return {str(p.relative_to(checkpoint)): p.stat().st_size for p in sorted(checkpoint.rglob("*"))
            if p.is_file() and p.name != CHECKPOINT_INFO}


def safetensors_problem(path: Path) -> str | None:
    """What is wrong with a safetensors file, from its header alone: the header must parse and
    the tensors it lists must end where the file ends."""
    size = path.stat().st_size
    if size < 8:
        return f"{path.name} is {size} bytes, too short for a safetensors header"
    with open(path, "rb") as f:
        (header_size,) = struct.unpack("<Q", f.read(8))
        if 8 + header_size > size:
            return f"{path.name} is truncated: its header alone needs {8 + header_size} bytes, the file has {size}"
        try:
            header = json.loads(f.read(header_size))
        except (UnicodeDecodeError, json.JSONDecodeError):
            return f"{path.name} has an unreadable safetensors header"
    ends = [entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"]
    expected = 8 + header_size + max(ends, default=0)
    if size != expected:
        return f"{path.name} is truncated: its header lists {expected} bytes of tensors and header, the file has {size}"
    return None


def torch_saved_problem(path: Path) -> str | None:
    """What is wrong with a ``torch.save`` file (a zip archive): empty, or its zip directory
    unreadable (a cut-off file loses the directory at its end); small ones also by CRC."""
    size = path.stat().st_size
    if size == 0:
        return f"{path.name} is empty"
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip() if size <= _FULL_CHECK_BYTES else None
    except (zipfile.BadZipFile, OSError, EOFError) as err:
        return f"{path.name} is not a readable torch.save archive ({err})"
    return f"{path.name} is damaged (member {bad} fails its CRC)" if bad else None


def problems(checkpoint: str | Path, *, training_state: bool = True) -> list[str]:
    """Why ``checkpoint`` cannot be loaded, each a phrase to follow its path (empty: it is
    complete). ``training_state``: it must
    also hold Accelerate's state (resume); without, only the student (export, eval, ``best``)."""
    checkpoint = Path(checkpoint)
    if not checkpoint.is_dir():
        return ["does not exist" if not checkpoint.exists() else "is not a directory"]
    student = checkpoint / STUDENT
    if not student.is_dir():
        return [f"is not a distill checkpoint (no {STUDENT}/ inside)"]
    found: list[str] = []
    info = checkpoint / CHECKPOINT_INFO
    manifest: dict[str, int] = {}
    if training_state:
        if not info.is_file():
            return [f"holds no training state (no {CHECKPOINT_INFO}): a best or exported student is not resumable"]
        try:
            manifest = json.loads(info.read_text()).get("files", {})
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            found.append(f"{CHECKPOINT_INFO} is unreadable ({err})")
        if not any(checkpoint.glob("model*.safetensors")):
            found.append("no model*.safetensors (Accelerate's model state)")
    for name, size in manifest.items():
        path = checkpoint / name
        if not path.is_file():
            found.append(f"{name} is missing")
        elif path.stat().st_size != size:
            found.append(f"{name} has {path.stat().st_size} bytes, {size} were written")
    if not any(student.glob("*.safetensors")):
        found.append(f"{STUDENT}/ holds no safetensors weights")
    for path in sorted(checkpoint.rglob("*")):
        if not path.is_file() or (not training_state and path.parent != student):
            continue
        if path.suffix == ".safetensors":
            problem = safetensors_problem(path)
        elif path.suffix in _TORCH_SAVED:
            problem = torch_saved_problem(path)
        else:
            continue
        if problem is not None:
            relative = path.relative_to(checkpoint).parent
            found.append(problem if relative == Path(".") else f"{relative}/{problem}")
    return list(dict.fromkeys(found))


def newest_complete(output_dir: str | Path) -> tuple[Path | None, list[tuple[Path, list[str]]]]:
    """The newest checkpoint without ``problems`` (None if there is none), and the newer ones
    passed over, each with its problems."""
    skipped = []
    for checkpoint in reversed(listed_checkpoints(output_dir)):
        found = problems(checkpoint)
        if not found:
            return checkpoint, skipped
        skipped.append((checkpoint, found))
    return None, skipped


def describe_skipped(skipped: list[tuple[Path, list[str]]]) -> list[str]:
    """One line per checkpoint passed over: which, and why."""
    return [f"skipped damaged checkpoint {path}: {'; '.join(found)}" for path, found in skipped]
