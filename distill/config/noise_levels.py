"""Timestep settings given as noise levels, resolved against the teacher's noise schedule.

An integer timestep means a different noise level on every schedule: t = 500 leaves
alpha-bar 0.078 on the linear DDPM schedule and 0.39 on the cosine one. A recipe meant for
more than one teacher gives ``{sigma: s}`` or ``{logsnr: l}`` instead (``distill.sections.
NoiseLevel``); ``resolve`` turns each into the teacher's timestep of nearest log-SNR, after the
keys and types are checked and before the checks that compare timesteps, so the rest of the
code, the run's ``config.yaml`` and the export see integers.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

from distill.config.checks import teacher_scheduler_config
from distill.config.schema import Config
from distill.sections import fail, local_or_hub


def _levels(config: Config) -> list[tuple[Any, str, int | None, str]]:
    """Where ``config`` still holds a noise level (a mapping; only a NoiseLevel field loads as
    one): ``(section, field name, list index or None, key)``, in order."""
    found: list[tuple[Any, str, int | None, str]] = []

    def walk(section: Any, prefix: str) -> None:
        for f in dataclasses.fields(section):
            value, key = getattr(section, f.name), f"{prefix}{f.name}"
            if dataclasses.is_dataclass(value):
                walk(value, f"{key}.")
            elif isinstance(value, dict):
                found.append((section, f.name, None, key))
            elif isinstance(value, list):
                found.extend((section, f.name, i, f"{key}[{i}]") for i, v in enumerate(value) if isinstance(v, dict))

    walk(config, "")
    return found


def level_log_snr(key: str, level: dict) -> float:
    """The log-SNR a checked ``{sigma: s}`` / ``{logsnr: l}`` mapping names."""
    (unit, value), = level.items()
    if unit == "logsnr":
        return value
    if value <= 0:
        fail(key, f"sigma must be positive (0 is the clean image), got {value}")
    return -2 * math.log(value)


def resolve(config: Config) -> None:
    """Replace every noise level in ``config`` by the teacher's nearest timestep, in place.
    Reads only the teacher's scheduler config (from its directory, or the hub's one small
    file), never its weights."""
    levels = _levels(config)
    if not levels:
        return
    from distill.schedules import nearest_timestep, schedule_from_config

    first_key = levels[0][3]
    try:
        schedule = schedule_from_config(_scheduler_config(first_key, config.teacher.path, config.teacher.revision))
    except ValueError as err:
        fail(first_key, f"a noise level needs the teacher's noise schedule, and its scheduler config does not give one: {err}")
    student = config.student.timesteps
    if len(student) > 1 and all(isinstance(v, dict) for v in student):
        config.student.timesteps = _student_timesteps(schedule, student)
    for section, name, index, key in _levels(config):  # what the student's list left
        value = getattr(section, name)
        if index is None:
            setattr(section, name, nearest_timestep(schedule, level_log_snr(key, value)))
        else:
            value[index] = nearest_timestep(schedule, level_log_snr(key, value[index]))


def _student_timesteps(schedule, levels: list[dict]) -> list:
    """A multi-step student's noise levels on a DDPM-family schedule: the evenly spaced list an
    export's stock scheduler reproduces (``distill.schedulers.evenly_spaced_timesteps``) whose
    log-SNRs are nearest the levels' (least squares). One level each to the nearest timestep
    would rarely be evenly spaced off the schedule the recipe was written for. On a flow
    schedule, whose export fits a shift instead, each level goes to its nearest timestep."""
    import torch

    from distill.schedulers import evenly_spaced_timesteps
    from distill.schedules import DDPMSchedule, log_snr

    if not isinstance(schedule, DDPMSchedule):
        return levels
    keys = [f"student.timesteps[{i}]" for i in range(len(levels))]
    targets = torch.tensor([level_log_snr(key, level) for key, level in zip(keys, levels)], dtype=torch.float64)
    snr = log_snr(schedule)
    candidates = evenly_spaced_timesteps(schedule.num_train_timesteps, len(levels))
    if not candidates:
        return levels  # too few training timesteps for these steps: the checks after say so
    return min(candidates, key=lambda ts: ((snr[ts] - targets) ** 2).sum().item())


def _scheduler_config(key: str, path: str, revision: str | None) -> dict:
    """The teacher's ``scheduler/scheduler_config.json``: from its directory, else the hub's file."""
    name = "scheduler/scheduler_config.json"
    local = local_or_hub(path)
    if local is not None:
        config = teacher_scheduler_config(path, revision)
        if config is None:
            fail(key, f"a noise level is resolved against the teacher's noise schedule, and {local / name} does not exist")
        return config
    from huggingface_hub import hf_hub_download

    try:
        return json.loads(Path(hf_hub_download(path, name, revision=revision)).read_text())
    except Exception as err:  # offline, unknown repo, no such file: all say the same to the user
        fail(key, f"a noise level is resolved against the teacher's noise schedule, and {name} of {path!r} could not "
             f"be read from the hub ({type(err).__name__}: {err}); give an integer timestep, or a local teacher")
