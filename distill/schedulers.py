"""Stock diffusers schedulers configured from a teacher's scheduler config: the few-step
scheduler an export ships, and the baseline solvers the teacher is sampled with.

The exported scheduler is a stock diffusers class configured so that the standard loop
(``scheduler.set_timesteps(N)``, then the model and ``scheduler.step`` per timestep)
reproduces the student's sampler exactly:

- ``LCMScheduler`` with ``original_inference_steps=N`` yields the evenly spaced timesteps
  ``[T-1, T-1-T/N, ...]`` (e.g. 999, 749, 499, 249) and re-noises each x0 with fresh noise
  from the caller's generator, as the student does; ``timestep_scaling`` is set so large
  that its consistency boundary scalings are c_skip = 0 and c_out = 1 in float32.
- ``DDIMScheduler`` with ``timestep_spacing="leading"`` and ``steps_offset=t`` gives a single
  step at any timestep ``t`` that returns x0 itself (the final alpha is one).
- Flow-matching teachers get ``FlowMatchEulerDiscreteScheduler`` with ``stochastic_sampling``,
  its shift and ``shift_terminal`` solved so that ``set_timesteps(N)`` gives the student's
  timesteps.
"""

from __future__ import annotations

import inspect
from functools import partial
from typing import Callable

import numpy as np
from diffusers import (DDIMScheduler, DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler, LCMScheduler,
                       SchedulerMixin)

from distill.schedules import FlowSchedule, schedule_from_config

_LCM_TIMESTEP_SCALING = 1.0e6  # c_skip = 0.25 / (t * 1e6)^2 + ...: below float32 resolution for t >= 1


def _accepted(cls: type, config: dict) -> dict:
    """The keys of a scheduler config that ``cls`` takes (the teacher's may be another class)."""
    names = inspect.signature(cls.__init__).parameters
    return {k: v for k, v in config.items() if k in names}


_FLOW_TIMESTEP_TOLERANCE = 1e-3  # float32 timesteps near 1000 are exact to about 6e-5: these are the integers


def _flow_scheduler(config: dict, shift: float, shift_terminal: float | None) -> FlowMatchEulerDiscreteScheduler:
    """FlowMatchEulerDiscreteScheduler on the teacher's config with a fixed (not resolution-dependent)
    ``shift``, an optional ``shift_terminal`` and stochastic sampling: ``step`` takes
    x0 = x_t - sigma * v and re-noises it to the next sigma with one fresh draw of noise
    (``randn_tensor`` from the caller's generator; drawn at the last step too, times sigma = 0)."""
    return FlowMatchEulerDiscreteScheduler.from_config(
        _accepted(FlowMatchEulerDiscreteScheduler, config), shift=shift, shift_terminal=shift_terminal,
        use_dynamic_shifting=False, invert_sigmas=False, use_karras_sigmas=False, use_exponential_sigmas=False,
        use_beta_sigmas=False, stochastic_sampling=True)


SetTimesteps = Callable[[SchedulerMixin, int], object]  # (scheduler, N): sets its timesteps as a pipeline does


def plain_set_timesteps(scheduler: SchedulerMixin, n: int) -> None:
    """How most pipelines set a scheduler's timesteps: ``scheduler.set_timesteps(N)``."""
    scheduler.set_timesteps(n)


def _timesteps(scheduler: SchedulerMixin, n: int, set_timesteps: SetTimesteps) -> list[float]:
    set_timesteps(scheduler, n)
    return scheduler.timesteps.tolist()


def _flow_few_step_scheduler(config: dict, timesteps: list[int], num_train: int,
                             set_timesteps: SetTimesteps) -> FlowMatchEulerDiscreteScheduler | None:
    """The flow scheduler whose timesteps, set by ``set_timesteps(scheduler, N)``, are ``timesteps``
    (to float32 rounding), or None.

    Set as a pipeline sets them (its own base sigmas, e.g. ``set_timesteps(N)``'s linspace(1, 1/T, N)
    or FLUX's linspace(1, 1/N, N)), they start at sigma = 1 (t = T, pure noise, as the student's
    first step assumes) and, with shift s and shift_terminal, end at sigma = shift_terminal; s
    bends the spacing in between (s = 1: the base sigmas). The last timestep fixes shift_terminal;
    with three or more steps the second fixes s (found by bisection on log s), the rest must then
    agree."""
    n = len(timesteps)
    if timesteps[0] != num_train:
        return None

    def matches(scheduler) -> bool:
        return all(abs(a - b) <= _FLOW_TIMESTEP_TOLERANCE for a, b in zip(_timesteps(scheduler, n, set_timesteps), timesteps))

    terminal = timesteps[-1] / num_train if n > 1 else None
    if n <= 2:
        scheduler = _flow_scheduler(config, 1.0, terminal)
        return scheduler if matches(scheduler) else None

    def second(log_shift: float) -> float:  # the second timestep minus the student's
        return _timesteps(_flow_scheduler(config, float(np.exp(log_shift)), terminal), n, set_timesteps)[1] - timesteps[1]

    grid = np.linspace(-8.0, 8.0, 65)  # shifts from 3e-4 to 3e3
    values = [second(g) for g in grid]
    for (lo, f_lo), (hi, f_hi) in zip(zip(grid, values), zip(grid[1:], values[1:])):
        if f_lo == 0 or f_lo * f_hi < 0:
            for _ in range(60):
                mid = (lo + hi) / 2
                f_mid = second(mid)
                lo, hi, f_lo = (mid, hi, f_mid) if f_lo * f_mid > 0 else (lo, mid, f_lo)
            scheduler = _flow_scheduler(config, float(np.exp((lo + hi) / 2)), terminal)
            return scheduler if matches(scheduler) else None
    return None


def few_step_scheduler(teacher_scheduler_config: dict, timesteps: list[int],
                       set_timesteps: SetTimesteps = plain_set_timesteps) -> SchedulerMixin:
    """A stock diffusers scheduler whose timesteps for ``len(timesteps)`` steps, set as the
    teacher's pipeline sets them (``set_timesteps(scheduler, N)``, the adapter's
    ``pipeline_set_timesteps``; default ``scheduler.set_timesteps(N)``), are ``timesteps``, and
    whose ``step`` is the student's update (x0, then fresh-noise re-noising).

    Flow-matching teachers (``FlowSchedule``) get a ``FlowMatchEulerDiscreteScheduler`` with
    ``stochastic_sampling``; its timesteps are floats equal to the student's integers up to
    float32 rounding. They start at T (pure noise) and end anywhere: evenly spaced down to the
    last one (e.g. 1000, 750, 500, 250), or spaced as a shift bends them."""
    n = len(timesteps)
    try:
        schedule = schedule_from_config(teacher_scheduler_config)
    except ValueError:  # no or an unknown _class_name: left to the DDPM-family schedulers below, as before
        schedule = None
    if isinstance(schedule, FlowSchedule):
        num_train = schedule.num_train_timesteps
        scheduler = _flow_few_step_scheduler(teacher_scheduler_config, list(timesteps), num_train, set_timesteps)
        if scheduler is not None:
            return scheduler
        step = (num_train - timesteps[-1]) // (n - 1) if n > 1 else 0  # whole steps: shift 1 gives them exactly
        even = [num_train - i * step for i in range(n)]
        hint = (f"with {n} steps use e.g. {even} (evenly spaced in whole steps down to about the last), "
                "or a spacing one shift gives" if n > 1 else f"a single step is at {num_train}")
        raise ValueError(
            f"no stock FlowMatchEulerDiscreteScheduler reproduces the timesteps {list(timesteps)} from the pipeline's "
            f"set_timesteps({n}): "
            f"a flow student's first timestep is {num_train} (pure noise); {hint}"
        )
    # each x0 is clipped / thresholded as the teacher's scheduler does it (schedules.clip_x0)
    clip = schedule.clip_sample_range if schedule is not None else None
    common = dict(clip_sample=clip is not None, clip_sample_range=clip or 1.0,
                  thresholding=schedule is not None and schedule.thresholding is not None)
    lcm = LCMScheduler.from_config(
        _accepted(LCMScheduler, teacher_scheduler_config),
        original_inference_steps=n,
        timestep_scaling=_LCM_TIMESTEP_SCALING,
        **common,
    )
    if _timesteps(lcm, n, set_timesteps) == list(timesteps):
        return lcm
    if schedule is not None and n > 1 and timesteps[0] + 1 < schedule.num_train_timesteps:
        truncated = _truncated_lcm(schedule, teacher_scheduler_config, timesteps[0] + 1, n, common)
        if _timesteps(truncated, n, set_timesteps) == list(timesteps):
            return truncated
    if n == 1:
        ddim = DDIMScheduler.from_config(
            _accepted(DDIMScheduler, teacher_scheduler_config), timestep_spacing="leading", steps_offset=int(timesteps[0]), set_alpha_to_one=True, **common)
        if _timesteps(ddim, 1, set_timesteps) == list(timesteps):
            return ddim
    first = (timesteps[0] + 1) // n * n  # the nearest T' below the first timestep that n divides
    below = [first - 1 - i * (first // n) for i in range(n)]
    raise ValueError(
        f"no stock diffusers scheduler reproduces the timesteps {list(timesteps)} from set_timesteps({n}); "
        f"with {n} steps use {_timesteps(lcm, n, set_timesteps)} or one that starts lower, such as {below} (LCMScheduler: "
        f"T'/{n} apart down from T' - 1, for any T' that {n} divides), or a single step at any timestep"
    )


def evenly_spaced_timesteps(num_train_timesteps: int, n: int) -> list[list[int]]:
    """Every list of ``n`` > 1 timesteps a DDPM-family export reproduces (``few_step_scheduler``'s
    LCMScheduler, truncated where it starts below T - 1): ``T' - 1 - i * T' / n`` for each ``T'``
    up to T that ``n`` divides, whose last timestep is at least 1."""
    return [[t_prime - 1 - i * (t_prime // n) for i in range(n)] for t_prime in range(2 * n, num_train_timesteps + 1, n)]


def _truncated_lcm(schedule, config: dict, num_train: int, n: int, common: dict) -> LCMScheduler:
    """An ``LCMScheduler`` over the first ``num_train`` timesteps of the teacher's schedule (its
    betas up to there as ``trained_betas``, so alphas_cumprod[t] is the teacher's for every t it
    visits): ``set_timesteps(n)`` then starts below the teacher's last timestep, at
    ``num_train - 1``, and steps ``num_train / n`` apart, e.g. 499, 374, 249, 124 for 500 and 4.
    A multi-step student can start there: on a linear schedule the epsilon -> x0 conversion at
    t = 999 multiplies errors by sigma / alpha ~ 157, at t = 499 by ~3.4."""
    alphas_cumprod = schedule.alphas_cumprod[:num_train]
    betas = 1 - alphas_cumprod / np.concatenate([[1.0], alphas_cumprod[:-1].numpy()])
    lcm = LCMScheduler.from_config(
        _accepted(LCMScheduler, config), num_train_timesteps=num_train, trained_betas=betas.tolist(),
        rescale_betas_zero_snr=False, original_inference_steps=n, timestep_scaling=_LCM_TIMESTEP_SCALING, **common)
    lcm.set_timesteps(n)
    return lcm


def baseline_solvers(flow_shift: float | None = None) -> dict[str, Callable]:
    """The baseline solvers by name, configured from a teacher's scheduler config. On a
    flow-matching schedule (``flow_shift``: the teacher's shift at its image size, which for a
    resolution-dependent one is not the config's) "ddim" is its deterministic analogue, the
    flow Euler step, and DPM-Solver++ runs on flow sigmas with that shift."""
    if flow_shift is not None:
        def dpmsolver(config):
            return DPMSolverMultistepScheduler.from_config(
                config, algorithm_type="dpmsolver++", use_flow_sigmas=True, prediction_type="flow_prediction",
                flow_shift=flow_shift, use_dynamic_shifting=False)

        return {"ddim": FlowMatchEulerDiscreteScheduler.from_config, "dpmsolver++": dpmsolver}
    return {
        "ddim": partial(DDIMScheduler.from_config, timestep_spacing="trailing"),
        "dpmsolver++": partial(DPMSolverMultistepScheduler.from_config, algorithm_type="dpmsolver++"),
    }


SOLVER_NAMES = {"ddim": "DDIM", "dpmsolver++": "DPM-Solver++"}


def solver_label(solver: str, flow: bool) -> str:
    """How tables name a baseline solver ("ddim" on a flow schedule is the flow Euler step)."""
    return "Euler" if solver == "ddim" and flow else SOLVER_NAMES[solver]
