"""Where a training step's time goes, without stalling the accelerator to find out.

``PhaseTimer.phase(name)`` marks a span of the loop (``critic``, ``generator``, ``data``,
``ema``, ...). On CUDA a mark is a recorded CUDA event, so the GPU's own clock times each
span and the host never waits; ``read()`` synchronises once, when the loop logs, and returns
each phase's seconds per student step since the last read. On the CPU a mark is
``time.perf_counter()``. Phases nest; a phase's time excludes the phases inside it (the
``data`` of a critic update is not also counted as ``critic``).
"""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager

import torch


class PhaseTimer:
    def __init__(self, device):
        self.cuda = torch.device(device).type == "cuda"
        self._spans: list[list] = []  # [name, start mark, end mark, parent index or None]
        self._open: list[int] = []
        self._steps = 0

    def _mark(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def _seconds(self, start, end) -> float:
        return start.elapsed_time(end) / 1000 if self.cuda else end - start

    @contextmanager
    def phase(self, name: str):
        span = [name, self._mark(), None, self._open[-1] if self._open else None]
        self._spans.append(span)
        self._open.append(len(self._spans) - 1)
        try:
            yield
        finally:
            self._open.pop()
            span[2] = self._mark()

    def step_done(self) -> None:
        """One student step ended (``read`` averages over the steps since the last read)."""
        self._steps += 1

    def read(self) -> dict[str, float]:
        """Seconds per student step of each phase (exclusive of the phases inside it) since the
        last read, keyed ``time/<name>_s``; one synchronisation on CUDA."""
        if self.cuda:
            torch.cuda.synchronize()
        durations = [self._seconds(start, end) for _, start, end, _ in self._spans]
        exclusive = list(durations)
        for (_, _, _, parent), duration in zip(self._spans, durations):
            if parent is not None:
                exclusive[parent] -= duration
        totals: dict[str, float] = defaultdict(float)
        for (name, _, _, _), seconds in zip(self._spans, exclusive):
            totals[name] += seconds
        steps = max(self._steps, 1)
        self._spans, self._steps = [], 0
        return {f"time/{name}_s": seconds / steps for name, seconds in totals.items()}
