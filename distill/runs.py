"""A training run's directory: its layout, and every read and write of it.

Run directory::

    config.yaml           the resolved recipe
    losses.jsonl          one line of losses per logged step (main process)
    times.jsonl           the same steps' seconds per phase and samples per second (main process)
    logs/                 TensorBoard: losses, learning rates, sample grids
    samples/step-N.png    sample grids of the EMA student (fixed noise and labels)
    checkpoints/step-N/   accelerate state (models, optimizers, EMA, RNG, step) + student/
    checkpoints/best/     student/ with the best score seen by the evaluations during
                          training, and scores.json (its step and scores)
    scores.jsonl          one line of scores per evaluation during training (eval.every)
    metrics.json          final scores

Checkpoints and ``best`` are written to a ``.partial-`` directory and renamed
(``distill.atomic``), so the newest complete checkpoint always loads.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import yaml

from distill.atomic import atomic_directory
from distill.config import Config, from_dict
from distill.errors import ConfigError

CONFIG, LOSSES, SCORES, METRICS = "config.yaml", "losses.jsonl", "scores.jsonl", "metrics.json"
TIMES = "times.jsonl"  # beside losses.jsonl: times differ between runs that log the same losses
CHECKPOINTS, CHECKPOINT_PREFIX, BEST = "checkpoints", "step-", "best"
STUDENT = "student"  # the student's weights inside a checkpoint (diffusers or peft format)
CHECKPOINT_INFO = "distill.json"  # a checkpoint's step, timesteps and teacher
BEST_SCORES = "scores.json"  # inside checkpoints/best: its step and scores


@dataclass
class Run:
    """A finished (or running) run: its config, the mapping its config.yaml holds, and the
    checkpoint directory chosen."""

    config: Config
    recipe: dict
    checkpoint: Path


def is_run(path: str | Path) -> bool:
    return (Path(path) / CONFIG).is_file()


def load_run(run_dir: str | Path, checkpoint: str = "latest") -> Run:
    """The run's resolved config (read through the schema) and its checkpoint ``checkpoint``
    ('latest', 'best' or a directory)."""
    run_dir = Path(run_dir)
    if not is_run(run_dir):
        raise FileNotFoundError(f"{run_dir.resolve()} is not a distill run directory (no {CONFIG})")
    recipe = yaml.safe_load((run_dir / CONFIG).read_text())
    return Run(from_dict(recipe, str(run_dir / CONFIG)), recipe, find_checkpoint(run_dir, checkpoint))


def check_new_run(config: Config, source: str) -> None:
    """A new run must not write into another run's directory (it would mix their logs)."""
    if config.resume is None and _checkpoints(config.output_dir):
        raise ConfigError(f"{source}: output_dir: {Path(config.output_dir).resolve()} already holds a run; "
                          "continue it with resume=latest or choose another output_dir")


# ------------------------------------------------------------------------------ checkpoints
def checkpoint_path(output_dir: str | Path, step: int) -> Path:
    return Path(output_dir) / CHECKPOINTS / f"{CHECKPOINT_PREFIX}{step:06d}"


def _checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first (partial ones are named ``.partial-step-N``)."""
    root = Path(output_dir) / CHECKPOINTS
    found = [p for p in root.glob(f"{CHECKPOINT_PREFIX}*") if p.is_dir() and p.name[len(CHECKPOINT_PREFIX):].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))


def find_checkpoint(output_dir: str | Path, which: str = "latest") -> Path:
    """The newest complete checkpoint of a run (``which='latest'``), the best one kept by
    the evaluations during training (``'best'``), or the directory given."""
    if which == BEST:
        best = Path(output_dir) / CHECKPOINTS / BEST
        if not (best / STUDENT).is_dir():
            raise FileNotFoundError(f"no best checkpoint at {best.resolve()} (it is kept when eval.every > 0)")
        return best
    if which != "latest":
        path = Path(which)
        if not (path / STUDENT).is_dir():
            raise FileNotFoundError(f"{path.resolve()} is not a distill checkpoint (no {STUDENT}/ inside)")
        return path
    found = _checkpoints(output_dir)
    if not found:
        root = Path(output_dir) / CHECKPOINTS
        raise FileNotFoundError(f"no checkpoint in {root.resolve()} (looked for {CHECKPOINT_PREFIX}<step>/ directories)")
    return found[-1]


def prune_checkpoints(output_dir: str | Path, keep: int) -> None:
    """Remove all but the newest ``keep`` checkpoints."""
    for old in _checkpoints(output_dir)[:-keep]:
        shutil.rmtree(old)


def samples_path(output_dir: str | Path, step: int) -> Path:
    """The sample grid written at ``step``."""
    return Path(output_dir) / "samples" / f"step-{step:06d}.png"


def write_checkpoint_info(checkpoint: Path, *, step: int, timesteps: list, teacher: str) -> None:
    (checkpoint / CHECKPOINT_INFO).write_text(json.dumps({"step": step, "timesteps": timesteps, "teacher": teacher}))


# ------------------------------------------------------------------------------ logs
def append_row(path: str | Path, row: dict) -> None:
    """One JSON line (losses.jsonl, scores.jsonl)."""
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def forget_steps_after(output_dir: str | Path, step: int) -> None:
    """A resumed run at ``step``: drop what the lost steps logged, and a best checkpoint
    chosen among them (the resumed run chooses again)."""
    output_dir = Path(output_dir)
    for log in (LOSSES, SCORES, TIMES):
        path = output_dir / log
        if path.is_file():
            rows = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= step]
            path.write_text("".join(row + "\n" for row in rows))
    best = best_scores(output_dir)
    if best is not None and best["step"] > step:
        shutil.rmtree(output_dir / CHECKPOINTS / BEST)


# ------------------------------------------------------------------------------ scores
def best_scores(output_dir: str | Path) -> dict | None:
    """The step and scores of ``checkpoints/best``, or None."""
    path = Path(output_dir) / CHECKPOINTS / BEST / BEST_SCORES
    return json.loads(path.read_text()) if path.is_file() else None


def keep_if_best(output_dir: str | Path, *, step: int, scores: dict, metric: str,
                 save_student: Callable[[Path], None]) -> bool:
    """Make the student of ``step`` the run's best checkpoint if its ``metric`` (lower is
    better) beats the kept one's: ``save_student(directory)`` writes it. Returns whether it did."""
    previous = best_scores(output_dir)
    if previous is not None and previous[metric] <= scores[metric]:
        return False
    with atomic_directory(Path(output_dir) / CHECKPOINTS / BEST) as staging:
        save_student(staging / STUDENT)
        (staging / BEST_SCORES).write_text(json.dumps({"step": step, **scores}, indent=2) + "\n")
    return True


def write_metrics(output_dir: str | Path, metrics: dict) -> None:
    (Path(output_dir) / METRICS).write_text(json.dumps(metrics, indent=2) + "\n")


def read_metrics(run_dir: str | Path) -> dict | None:
    path = Path(run_dir) / METRICS
    return json.loads(path.read_text()) if path.is_file() else None
