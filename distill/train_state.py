"""The training loop's own resumable state: the step, the wall clock, and the count of
updates skipped for a non-finite loss or gradient (the guard that stops a diverged run)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from distill.errors import NonFiniteError


class TrainState:
    """The loop's own resumable state; registered with Accelerate's checkpointing."""

    def __init__(self):
        self.step = 0
        self.elapsed_seconds = 0.0
        self.skipped_updates = 0  # updates skipped for a non-finite loss or gradient, over the run
        self.nonfinite_streak = 0  # student steps in a row with a skipped update

    def state_dict(self) -> dict:
        return {"step": self.step, "elapsed_seconds": self.elapsed_seconds, "skipped_updates": self.skipped_updates,
                "nonfinite_streak": self.nonfinite_streak}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        self.elapsed_seconds = float(state["elapsed_seconds"])
        # checkpoints written before the non-finite guard have neither count
        self.skipped_updates = int(state.get("skipped_updates", 0))
        self.nonfinite_streak = int(state.get("nonfinite_streak", 0))

    def count_nonfinite(self, step: int, skipped: int, logs: dict, *, max_steps: int, checkpoints: Path,
                        report: Callable[[str], None]) -> None:
        """Count the skipped updates of student step ``step`` (0-based) into ``logs``
        (``train/skipped_updates``), ``report`` a step with one, and stop after ``max_steps``
        steps in a row with one, naming the step and its losses (the weights never took the bad
        update, so the last checkpoint in ``checkpoints`` is as good as it was)."""
        self.skipped_updates += skipped
        self.nonfinite_streak = self.nonfinite_streak + 1 if skipped else 0
        logs["train/skipped_updates"] = torch.tensor(float(self.skipped_updates))
        if not skipped:
            return
        losses = ", ".join(f"{k}={float(v):.4g}" for k, v in sorted(logs.items()) if k.endswith("_loss") or "grad_norm" in k)
        report(f"step {step + 1}: {skipped} update(s) skipped, a loss or gradient was not finite ({losses})")
        if self.nonfinite_streak >= max_steps:
            raise NonFiniteError(
                f"stopped at step {step + 1}: {self.nonfinite_streak} student steps in a row had a non-finite loss or gradient "
                f"(train.max_nonfinite_steps={max_steps}); last losses: {losses}. No bad update reached the weights; the "
                f"last checkpoint in {checkpoints} loads and resumes. Lower the learning rates or train.max_grad_norm, or "
                "look for NaNs in the data")
