"""A training run's directory: its layout, and every read and write of it.

Run directory::

    config.yaml           the resolved recipe
    losses.jsonl          one line of losses per logged step (main process)
    times.jsonl           the same steps' seconds per phase and samples per second (main process)
    logs/                 TensorBoard: losses, learning rates, sample grids
    samples/step-N.png    sample grids of the EMA student (fixed noise and labels)
    checkpoints/step-N/   accelerate state (models, optimizers, EMA, RNG, step) + student/
    checkpoints/best/     student/ with the best score seen by the evaluations during
                          training, and scores.json (its step and scores); with
                          eval.rescore_top, the shortlisted student of the lowest mean FD
                          on fresh draws at the end (scores.json's "rescored")
    checkpoints/shortlist/step-N/   eval.rescore_top: student/ and scores.json of each of the
                          N lowest periodic scores so far
    scores.jsonl          one line of scores per evaluation during training (eval.every)
    scores.png            FD (and recall) against step, drawn from scores.jsonl
    data_report.json      the bad items data.on_bad_item=skip left out, each with why
    metrics.json          final scores

Checkpoints and ``best`` are written to a ``.partial-`` directory and renamed
(``distill.atomic``), and every read of one checks it first (``distill.checkpoints``): a
damaged newest checkpoint is passed over, said so, for the newest complete one. A torn last
line of a log (a kill mid-write) is dropped with a warning; logs rewritten on resume are
written whole or not at all.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import yaml

from distill import checkpoints
from distill.atomic import atomic_directory, atomic_file
from distill.checkpoints import (BEST, CHECKPOINT_INFO, CHECKPOINT_PREFIX, CHECKPOINTS, SET_ASIDE_PREFIX, STUDENT,
                                 checkpoint_path, describe_skipped, file_sizes, listed_checkpoints)
from distill.config import Config, from_dict
from distill.errors import ConfigError

CONFIG, LOSSES, SCORES, METRICS = "config.yaml", "losses.jsonl", "scores.jsonl", "metrics.json"
SCORES_PLOT = "scores.png"  # FD and recall against step, redrawn at each evaluation (distill.plots)
TIMES = "times.jsonl"  # beside losses.jsonl: times differ between runs that log the same losses
BEST_SCORES = "scores.json"  # inside checkpoints/best and each shortlist entry: its step and scores
SHORTLIST = "shortlist"  # inside checkpoints/: the eval.rescore_top lowest periodic scores, rescored at the end
DATA_REPORT = "data_report.json"  # the bad items data.on_bad_item=skip left out
__all__ = ["BEST", "BEST_SCORES", "CHECKPOINTS", "CHECKPOINT_INFO", "CHECKPOINT_PREFIX", "CONFIG", "DATA_REPORT", "LOSSES", "METRICS", "TIMES",
           "Run", "SCORES", "SCORES_PLOT", "STUDENT", "append_row", "best_scores", "check_new_run", "checkpoint_path", "find_checkpoint",
           "forget_steps_after", "is_run", "keep_if_best", "keep_if_shortlisted", "link_student", "make_best", "load_config", "load_run", "prune_checkpoints", "read_metrics", "read_rows",
           "report_skipped", "rescore_seeds", "samples_path", "shortlist", "shortlisted_student", "write_checkpoint_info", "write_metrics"]


def _stderr(message: str) -> None:
    print(f"distill: {message}", file=sys.stderr, flush=True)


@dataclass
class Run:
    """A finished (or running) run: its config, the mapping its config.yaml holds, and the
    checkpoint directory chosen."""

    config: Config
    recipe: dict
    checkpoint: Path


def is_run(path: str | Path) -> bool:
    return (Path(path) / CONFIG).is_file()


def load_config(run_dir: str | Path) -> tuple[Config, dict]:
    """The run's resolved config (read through the schema) and the mapping its config.yaml holds;
    no checkpoint is looked for."""
    run_dir = Path(run_dir)
    if not is_run(run_dir):
        raise FileNotFoundError(f"{run_dir.resolve()} is not a distill run directory (no {CONFIG})")
    recipe = yaml.safe_load((run_dir / CONFIG).read_text())
    return from_dict(recipe, str(run_dir / CONFIG)), recipe


def load_run(run_dir: str | Path, checkpoint: str = "latest") -> Run:
    """The run's resolved config and its checkpoint ``checkpoint`` ('latest', 'best' or a
    directory)."""
    return Run(*load_config(run_dir), find_checkpoint(run_dir, checkpoint))


def check_new_run(config: Config, source: str) -> None:
    """A new run must not write into another run's directory (it would mix their logs)."""
    if config.resume is None and listed_checkpoints(config.output_dir):
        raise ConfigError(f"{source}: output_dir: {Path(config.output_dir).resolve()} already holds a run; "
                          "continue it with resume=latest or choose another output_dir")


# ------------------------------------------------------------------------------ checkpoints
def find_checkpoint(output_dir: str | Path, which: str = "latest", *, training_state: bool = False,
                    report: Callable[[str], None] = _stderr) -> Path:
    """The newest complete checkpoint of a run (``which='latest'``; damaged newer ones are
    passed over and ``report``-ed), the best one kept by the evaluations during training
    (``'best'``), or the one named: a directory, or a checkpoint of this run by its name
    (``'step-001400'``), checked (``training_state``: that it also holds what a resume loads).
    For ``'latest'`` outside a resume, a run that keeps a best checkpoint of another step is
    ``report``-ed, so a user of eval, export or sample hears that it exists."""
    if which == BEST:
        best = Path(output_dir) / CHECKPOINTS / BEST
        if not (best / STUDENT).is_dir():
            raise FileNotFoundError(f"no best checkpoint at {best.resolve()} (it is kept when eval.every > 0)")
        which = str(best)
    if which != "latest":
        path = Path(which)
        in_run = Path(output_dir) / CHECKPOINTS / which
        if not path.exists() and in_run.exists():
            path = in_run
        found = checkpoints.problems(path, training_state=training_state)
        if found:
            also = "" if path == in_run or in_run.exists() else f" (nor is there a checkpoint {which!r} at {in_run.resolve()})"
            raise FileNotFoundError(f"{path.resolve()}: {'; '.join(found)}{also}")
        return path
    newest, skipped = checkpoints.newest_complete(output_dir)
    for line in describe_skipped(skipped):
        report(line)
    if newest is None:
        root = Path(output_dir) / CHECKPOINTS
        passed = f" ({len(skipped)} damaged, passed over)" if skipped else ""
        raise FileNotFoundError(f"no complete checkpoint in {root.resolve()}{passed} "
                                f"(looked for {CHECKPOINT_PREFIX}<step>/ directories)")
    try:  # only a hint: an unreadable best never stands in the way of the latest
        best = None if training_state else best_scores(output_dir)
    except (OSError, ValueError):
        best = None
    if isinstance(best, dict) and best.get("step") != checkpoints.checkpoint_step(newest):
        rescored = best.get("rescored")
        scored = rescored if isinstance(rescored, dict) else best  # eval.rescore_top: the fresh draws' mean
        scores = ", ".join(f"{k} {v:.4g}" for k, v in scored.items() if k.startswith("fd_") and isinstance(v, (int, float)))
        if scored is rescored and scores:
            scores += f" over {rescored.get('draws')} fresh draws"
        report(f"using {newest.name}, the latest; this run also keeps checkpoints/best (step {best.get('step')}"
               f"{', ' + scores if scores else ''}): pass --checkpoint best for it")
    return newest


def prune_checkpoints(output_dir: str | Path, keep: int) -> None:
    """Remove all but the newest ``keep`` checkpoints."""
    for old in listed_checkpoints(output_dir)[:-keep]:
        shutil.rmtree(old)


def samples_path(output_dir: str | Path, step: int) -> Path:
    """The sample grid written at ``step``."""
    return Path(output_dir) / "samples" / f"step-{step:06d}.png"


def write_checkpoint_info(checkpoint: Path, *, step: int, timesteps: list, teacher: str) -> None:
    """distill.json, written last: with the size of every file the checkpoint holds by then."""
    info = {"step": step, "timesteps": timesteps, "teacher": teacher, "files": file_sizes(checkpoint)}
    (checkpoint / CHECKPOINT_INFO).write_text(json.dumps(info))


# ------------------------------------------------------------------------------ logs
def append_row(path: str | Path, row: dict) -> None:
    """One JSON line (losses.jsonl, scores.jsonl)."""
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def _read_lines(path: Path, report: Callable[[str], None]) -> list[tuple[str, dict]]:
    lines = path.read_text().splitlines()
    rows = []
    for number, line in enumerate(lines, 1):
        try:
            rows.append((line, json.loads(line)))
        except json.JSONDecodeError as err:
            if number == len(lines):
                report(f"{path}: dropped its last line, cut off mid-write ({err.msg}): {line[:60]!r}")
                break
            raise ValueError(f"{path}: line {number} is not JSON ({err}); only a last line cut off by a kill "
                             "is dropped on its own") from None
    return rows


def read_rows(path: str | Path, report: Callable[[str], None] = _stderr) -> list[dict]:
    """The rows of a JSON-lines log. A torn last line (the run was killed while writing it) is
    dropped and ``report``-ed; a bad line before the last is an error naming file and line."""
    return [row for _, row in _read_lines(Path(path), report)]


def forget_steps_after(output_dir: str | Path, step: int, report: Callable[[str], None] = _stderr) -> None:
    """A resumed run at ``step``: drop what the lost steps logged (logs rewritten atomically),
    a best checkpoint chosen among them (the resumed run chooses again), and set aside newer
    checkpoints (damaged ones the resume passed over, or later ones when it resumed from an
    earlier checkpoint) as ``.set-aside-step-N``, so that pruning never keeps them in place of
    the ones the resumed run writes."""
    output_dir = Path(output_dir)
    for log in (LOSSES, SCORES, TIMES):
        path = output_dir / log
        if path.is_file():
            kept = [line for line, row in _read_lines(path, report) if row["step"] <= step]
            with atomic_file(path) as partial:
                partial.write_text("".join(line + "\n" for line in kept))
    best = best_scores(output_dir)
    if best is not None and best["step"] > step:
        shutil.rmtree(output_dir / CHECKPOINTS / BEST)
    for entry in shortlist(output_dir):
        if entry.step > step:
            shutil.rmtree(entry.path)
    for checkpoint in listed_checkpoints(output_dir):
        if checkpoints.checkpoint_step(checkpoint) > step:
            aside = checkpoint.with_name(SET_ASIDE_PREFIX + checkpoint.name)
            shutil.rmtree(aside, ignore_errors=True)
            checkpoint.rename(aside)
            report(f"set {checkpoint.name} aside as {aside}")


def report_skipped(output_dir: str | Path, dataset, *, report: Callable[[str], None] = _stderr,
                   main: bool = True) -> int | None:
    """The bad items a dataset left out (``data.on_bad_item: skip``): said, and written to
    ``data_report.json`` (each row and why; main process). Returns how many, or None for a
    dataset that skips nothing by design."""
    skipped = getattr(dataset, "skipped", None)
    if skipped is None or getattr(dataset, "on_bad_item", "skip") != "skip":
        return None
    if main:
        output_dir = Path(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        data = {"source": getattr(dataset, "path", None), "kept": len(dataset), "skipped": len(skipped),
                "rows": [{"row": row, "why": why} for row, why in sorted(skipped.items())]}
        with atomic_file(output_dir / DATA_REPORT) as partial:
            partial.write_text(json.dumps(data, indent=2) + "\n")
        first = f"; the first: row {min(skipped)}: {skipped[min(skipped)]}" if skipped else ""
        report(f"data: skipped {len(skipped)} bad item(s) of {len(skipped) + len(dataset)}, see "
               f"{output_dir / DATA_REPORT}{first}")
    return len(skipped)


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


@dataclass
class Shortlisted:
    """One student of ``checkpoints/shortlist``: its directory (``student/``, ``scores.json``)
    and its periodic scores."""

    path: Path
    scores: dict

    @property
    def step(self) -> int:
        return self.scores["step"]


def shortlist(output_dir: str | Path, metric: str | None = None) -> list[Shortlisted]:
    """The shortlisted students, lowest ``metric`` first (None: by step). Entries are renamed
    into place whole (``atomic_directory``); one whose scores.json does not parse is left out."""
    root = Path(output_dir) / CHECKPOINTS / SHORTLIST
    entries = []
    for path in sorted(root.glob(f"{CHECKPOINT_PREFIX}*")) if root.is_dir() else []:
        try:
            scores = json.loads((path / BEST_SCORES).read_text())
        except (OSError, ValueError):
            continue
        if (path / STUDENT).is_dir() and isinstance(scores, dict) and "step" in scores:
            entries.append(Shortlisted(path, scores))
    return sorted(entries, key=(lambda e: e.step) if metric is None else (lambda e: (e.scores[metric], e.step)))


def shortlisted_student(output_dir: str | Path, step: int) -> Path:
    """Where the shortlisted student of ``step`` lives (``checkpoints/shortlist/step-N/student``)."""
    return Path(output_dir) / CHECKPOINTS / SHORTLIST / f"{CHECKPOINT_PREFIX}{step:06d}" / STUDENT


def keep_if_shortlisted(output_dir: str | Path, *, step: int, scores: dict, metric: str, size: int,
                        save_student: Callable[[Path], None]) -> bool:
    """Keep the student of ``step`` in ``checkpoints/shortlist`` if its ``metric`` (lower is
    better) is among the ``size`` lowest kept, dropping the one it displaces. Returns whether it
    did."""
    entries = shortlist(output_dir, metric)
    if len(entries) >= size and entries[size - 1].scores[metric] <= scores[metric]:
        return False
    with atomic_directory(shortlisted_student(output_dir, step).parent) as staging:
        save_student(staging / STUDENT)
        (staging / BEST_SCORES).write_text(json.dumps({"step": step, **scores}, indent=2) + "\n")
    for displaced in shortlist(output_dir, metric)[size:]:
        shutil.rmtree(displaced.path)
    return True


def rescore_seeds(seed: int, draws: int) -> list[int]:
    """The seeds of ``eval.rescore_top``'s fresh draws for a run of ``seed``: apart from the
    periodic scores' (seed + 1) and from scripts/bench_quality.py's (1, one draw split in parts)."""
    return [seed + 1 + 1000 * (i + 1) for i in range(draws)]


def link_student(source: Path) -> Callable[[Path], None]:
    """A ``save_student`` that places the student already written in ``source`` (a kept
    ``student/``) by hard links, so one evaluation writes its weights once; a copy where the
    file system has no hard links. Kept students are never written in place, so the links
    stay equal."""
    def place(directory: Path) -> None:
        def link(src, dst):
            try:
                os.link(src, dst)
            except OSError:
                shutil.copy2(src, dst)
        shutil.copytree(source, directory, copy_function=link)
    return place


def make_best(output_dir: str | Path, entry: Shortlisted, rescored: dict) -> None:
    """Make a shortlisted student ``checkpoints/best``: its periodic scores and, under
    ``"rescored"``, the scores it was chosen by."""
    with atomic_directory(Path(output_dir) / CHECKPOINTS / BEST) as staging:
        link_student(entry.path / STUDENT)(staging / STUDENT)
        (staging / BEST_SCORES).write_text(json.dumps({**entry.scores, "rescored": rescored}, indent=2) + "\n")


def write_metrics(output_dir: str | Path, metrics: dict) -> None:
    (Path(output_dir) / METRICS).write_text(json.dumps(metrics, indent=2) + "\n")


def read_metrics(run_dir: str | Path) -> dict | None:
    path = Path(run_dir) / METRICS
    return json.loads(path.read_text()) if path.is_file() else None
