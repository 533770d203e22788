"""Noise-schedule maths, read from a diffusers scheduler config.

Every schedule here is written in the general Gaussian form ``x_t = alpha_t * x0 + sigma_t * eps``:

* ``DDPMSchedule``: alpha_t = sqrt(alphas_cumprod[t]), sigma_t = sqrt(1 - alphas_cumprod[t])
  (Ho et al. 2020, eq. 4), integer timesteps ``0 .. num_train_timesteps - 1``.
* ``FlowSchedule``: rectified flow (Lipman et al. 2023; Esser et al. 2024 / SD3), sigma = t / num_train_timesteps,
  alpha = 1 - sigma, float timesteps; the model predicts the velocity ``eps - x0``.

Conversions between prediction types (x0, epsilon, v, flow velocity) are shared, so a distillation loss can
regress on whatever the teacher or the student predicts.
"""

from __future__ import annotations

import inspect

import torch
from torch import Tensor

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "flow")


def _timesteps_1d(t: Tensor | float | int) -> Tensor:
    t = torch.as_tensor(t)
    if t.ndim > 1:
        raise ValueError(f"timesteps must be a number or a 1-D tensor, got shape {tuple(t.shape)}")
    return t.reshape(-1)


class _Schedule:
    """Shared conversions; subclasses supply ``_alpha_sigma64`` and ``sample_timesteps``."""

    num_train_timesteps: int
    prediction_type: str
    valid_prediction_types: tuple[str, ...]

    def _alpha_sigma64(self, t: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def alpha_sigma(
        self, t: Tensor | float | int, ndim: int = 4, dtype: torch.dtype = torch.float32
    ) -> tuple[Tensor, Tensor]:
        """``(alpha_t, sigma_t)`` for timesteps ``t`` ([B], or a number -> B = 1), each shaped [B, 1, ..., 1] with
        ``ndim`` dims, on ``t``'s device. Computed in float64 on the CPU (also avoids float64 on MPS), then cast."""
        t = _timesteps_1d(t)
        alpha, sigma = self._alpha_sigma64(t.detach().cpu())
        shape = (-1,) + (1,) * (ndim - 1)
        return alpha.reshape(shape).to(t.device, dtype), sigma.reshape(shape).to(t.device, dtype)

    def _coeffs(self, x: Tensor, t: Tensor | float | int) -> tuple[Tensor, Tensor]:
        alpha, sigma = self.alpha_sigma(t, ndim=x.ndim, dtype=x.dtype)
        return alpha.to(x.device), sigma.to(x.device)

    def _check(self, prediction_type: str | None) -> str:
        prediction_type = prediction_type or self.prediction_type
        if prediction_type not in self.valid_prediction_types:
            raise ValueError(
                f"prediction_type {prediction_type!r} is not valid for {type(self).__name__}; "
                f"use one of {self.valid_prediction_types}"
            )
        return prediction_type

    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor | float | int) -> Tensor:
        """Forward process ``x_t = alpha_t * x0 + sigma_t * noise``; x0, noise [B, ...], t [B] -> [B, ...]."""
        alpha, sigma = self._coeffs(x0, t)
        return alpha * x0 + sigma * noise

    def to_x0(
        self, model_output: Tensor, x_t: Tensor, t: Tensor | float | int, prediction_type: str | None = None
    ) -> Tensor:
        """x0 estimate [B, ...] from a model output in ``prediction_type`` (None: the schedule's own).

        epsilon: x0 = (x_t - sigma * eps) / alpha (Ho et al. 2020, eq. 15); v_prediction: x0 = alpha * x_t - sigma * v
        (Salimans & Ho 2022, needs alpha^2 + sigma^2 = 1); flow: x0 = x_t - sigma * v with v = eps - x0."""
        kind = self._check(prediction_type)
        alpha, sigma = self._coeffs(x_t, t)
        if kind == "epsilon":
            return (x_t - sigma * model_output) / alpha
        if kind == "sample":
            return model_output
        if kind == "v_prediction":
            return alpha * x_t - sigma * model_output
        return x_t - sigma * model_output  # flow

    def target(self, x0: Tensor, noise: Tensor, t: Tensor | float | int, prediction_type: str | None = None) -> Tensor:
        """Denoising regression target [B, ...] for clean ``x0`` noised with ``noise`` at ``t``: epsilon -> noise,
        sample -> x0, v_prediction -> alpha * noise - sigma * x0 (diffusers ``get_velocity``), flow -> noise - x0."""
        kind = self._check(prediction_type)
        if kind == "epsilon":
            return noise
        if kind == "sample":
            return x0
        if kind == "flow":
            return noise - x0
        alpha, sigma = self._coeffs(x0, t)
        return alpha * noise - sigma * x0


class DDPMSchedule(_Schedule):
    """Discrete variance-preserving schedule: alpha_t^2 = alphas_cumprod[t], sigma_t^2 = 1 - alphas_cumprod[t].

    Timesteps are integers: float timesteps are truncated (``t.long()``) and clamped to [0, T - 1].
    ``clip_sample_range`` / ``thresholding``: what the checkpoint's scheduler does to each x0
    estimate while sampling (``clip_x0``)."""

    valid_prediction_types = ("epsilon", "v_prediction", "sample")

    def __init__(self, alphas_cumprod: Tensor, prediction_type: str = "epsilon", *,
                 clip_sample_range: float | None = None, thresholding: tuple[float, float] | None = None):
        self.alphas_cumprod = torch.as_tensor(alphas_cumprod).detach().to("cpu", torch.float64)
        self.num_train_timesteps = len(self.alphas_cumprod)
        self.prediction_type = prediction_type
        self._check(prediction_type)
        self.clip_sample_range = clip_sample_range
        self.thresholding = thresholding  # (dynamic_thresholding_ratio, sample_max_value)

    def clip_x0(self, x0: Tensor) -> Tensor:
        """An x0 estimate [B, ...] as the checkpoint's DDPM-family scheduler treats it while
        sampling: dynamic thresholding (Saharia et al. 2022, §2.3: per sample, s = the ratio's
        quantile of |x0|, at least 1 and at most sample_max_value; clamp to [-s, s], divide by s)
        when its config sets ``thresholding``, else clamped to ``clip_sample_range`` when it sets
        ``clip_sample`` (DDPMScheduler's default), else unchanged."""
        if self.thresholding is not None:
            ratio, max_value = self.thresholding
            flat = x0.float().flatten(1)
            s = torch.quantile(flat.abs(), ratio, dim=1).clamp(1.0, max_value).view(-1, *([1] * (x0.ndim - 1)))
            return (torch.maximum(torch.minimum(x0.float(), s), -s) / s).to(x0.dtype)
        if self.clip_sample_range is not None:
            return x0.clamp(-self.clip_sample_range, self.clip_sample_range)
        return x0

    def clipped_fraction(self, x0: Tensor) -> Tensor | None:
        """Of an x0 that ``clip_x0`` returned, the fraction of its values that the clip moved
        (a 0-dim float tensor): those on the clip's bound, ``clip_sample_range``, or 1 after
        thresholding's division by s (a value it did not clamp ends strictly inside). None
        when this scheduler does not clip."""
        if self.thresholding is not None:
            bound = 1.0
        elif self.clip_sample_range is not None:
            bound = self.clip_sample_range
        else:
            return None
        return (x0.detach().abs() >= bound).float().mean()

    @property
    def last_timestep(self) -> int:
        """The largest timestep a student may use: T - 1 (the integers 0 .. T - 1)."""
        return self.num_train_timesteps - 1

    def _alpha_sigma64(self, t: Tensor) -> tuple[Tensor, Tensor]:
        acp = self.alphas_cumprod[t.long().clamp(0, self.num_train_timesteps - 1)]
        return acp.sqrt(), (1 - acp).sqrt()

    def sample_timesteps(self, batch_size: int, generator: torch.Generator | None = None, t_min: int | None = None,
                         t_max: int | None = None, device: torch.device | str | None = None) -> Tensor:
        """[batch_size] int64 timesteps uniform on the integers [t_min, t_max] (defaults 0 and T - 1), inclusive."""
        low = 0 if t_min is None else int(t_min)
        high = self.num_train_timesteps - 1 if t_max is None else int(t_max)
        return torch.randint(low, high + 1, (batch_size,), generator=generator).to(device)


class FlowSchedule(_Schedule):
    """Rectified flow (diffusers ``FlowMatchEulerDiscreteScheduler``): sigma = t / T, x_t = (1 - sigma) x0 + sigma eps.

    ``shift`` only warps which timesteps are sampled; diffusers timesteps already carry the shifted sigma.
    ``use_dynamic_shifting`` is stored but not applied (the shift then depends on the image resolution)."""

    valid_prediction_types = ("flow", "epsilon", "sample")

    def __init__(self, num_train_timesteps: int = 1000, shift: float = 1.0, use_dynamic_shifting: bool = False):
        self.num_train_timesteps = int(num_train_timesteps)
        self.shift = float(shift)
        self.use_dynamic_shifting = bool(use_dynamic_shifting)
        self.prediction_type = "flow"

    @property
    def last_timestep(self) -> int:
        """The largest timestep a student may use: T (sigma = 1, pure noise, where a flow student starts)."""
        return self.num_train_timesteps

    def _alpha_sigma64(self, t: Tensor) -> tuple[Tensor, Tensor]:
        sigma = t.to(torch.float64) / self.num_train_timesteps
        return 1 - sigma, sigma

    def clip_x0(self, x0: Tensor) -> Tensor:
        """Flow-matching schedulers leave x0 estimates as they are."""
        return x0

    def clipped_fraction(self, x0: Tensor) -> None:
        """None: flow-matching schedulers do not clip (``clip_x0``)."""
        return None

    def sample_timesteps(self, batch_size: int, generator: torch.Generator | None = None, t_min: float | None = None,
                         t_max: float | None = None, device: torch.device | str | None = None) -> Tensor:
        """[batch_size] float32 timesteps t = sigma * T, sigma = shift * u / (1 + (shift - 1) * u), u ~ U(0, 1)
        (SD3's timestep shift, Esser et al. 2024). With t_min / t_max, u is drawn uniformly between the inverse-shifted
        bounds, which gives exactly the shifted distribution truncated to [t_min, t_max]."""
        s = self.shift

        def unshift(t_bound: float) -> float:  # inverse of the shift map, in sigma units
            sigma = t_bound / self.num_train_timesteps
            return sigma / (s - (s - 1) * sigma)

        u_lo = 0.0 if t_min is None else unshift(t_min)
        u_hi = 1.0 if t_max is None else unshift(t_max)
        u = u_lo + (u_hi - u_lo) * torch.rand(batch_size, generator=generator, dtype=torch.float64)
        t = s * u / (1 + (s - 1) * u) * self.num_train_timesteps
        lo = 0.0 if t_min is None else float(t_min)
        hi = float(self.num_train_timesteps) if t_max is None else float(t_max)
        return t.clamp(lo, hi).to(torch.float32).to(device)  # clamp only absorbs float rounding


def log_snr(schedule: DDPMSchedule | FlowSchedule) -> Tensor:
    """[last_timestep + 1] float64 log-SNR, log(alpha_t^2 / sigma_t^2), of each integer timestep
    0 .. ``schedule.last_timestep`` (decreasing; +inf at a flow schedule's t = 0, -inf at a
    zero-terminal-SNR or flow schedule's last timestep)."""
    alpha, sigma = schedule._alpha_sigma64(torch.arange(schedule.last_timestep + 1))
    return 2 * (alpha.log() - sigma.log())


def nearest_timestep(schedule: DDPMSchedule | FlowSchedule, logsnr: float) -> int:
    """The integer timestep whose log-SNR is nearest ``logsnr``: how a noise level given as a
    number (not a timestep) lands on this schedule. A level noisier than the schedule's last
    timestep lands there (the teacher's own pure-noise end: a recipe's ``{sigma: 130}`` on a
    scaled-linear schedule, whose last timestep has sigma 14.6), one cleaner than t = 0 at 0."""
    return int((log_snr(schedule) - logsnr).abs().argmin())


def schedule_from_config(config: dict) -> DDPMSchedule | FlowSchedule:
    """Schedule for a diffusers ``scheduler_config.json`` dict (with ``_class_name``).

    Flow-matching classes (and configs with ``use_flow_sigmas``) give a ``FlowSchedule``. Any other diffusers
    scheduler that has ``alphas_cumprod`` gives a ``DDPMSchedule`` whose alphas_cumprod come from ``DDPMScheduler``
    built on the same config: the training-time forward process (zero-SNR keeps alphas_cumprod[-1] = 0, where
    Euler-type samplers substitute 2**-24). Beta schedules DDPMScheduler lacks (Heun's "exp") fall back to the
    named class's own alphas_cumprod."""
    import diffusers

    name = config.get("_class_name")
    if name is None:  # scheduler.config lacks it; save_config / to_json_string add it
        raise ValueError("config has no '_class_name'; pass the scheduler_config.json dict")
    cls = getattr(diffusers, name, None) if isinstance(name, str) else None
    if not (inspect.isclass(cls) and issubclass(cls, diffusers.SchedulerMixin)):
        raise ValueError(f"unknown scheduler class {name!r}: expected a diffusers DDPM-family or FlowMatch scheduler")
    own = cls.from_config(config)
    resolved = own.config  # the config with the class's own defaults filled in
    flow_shift = resolved.get("shift") if "FlowMatch" in name else (
        resolved.get("flow_shift") if resolved.get("use_flow_sigmas") else None)  # DPM-Solver / UniPC on flow sigmas
    if flow_shift is not None:
        return FlowSchedule(resolved.num_train_timesteps, flow_shift, resolved.get("use_dynamic_shifting", False))
    if not hasattr(own, "alphas_cumprod"):
        raise ValueError(f"scheduler class {name!r} has no alphas_cumprod and is not a flow-matching scheduler")
    ddpm_keys = inspect.signature(diffusers.DDPMScheduler.__init__).parameters
    try:
        ddpm = diffusers.DDPMScheduler.from_config({k: v for k, v in config.items() if k in ddpm_keys})
        alphas_cumprod = ddpm.alphas_cumprod
    except NotImplementedError:
        alphas_cumprod = own.alphas_cumprod
    # what the class does to each x0 while sampling, its own defaults filled in (DDPM / DDIM clip unless told not to)
    thresholding = ((resolved.dynamic_thresholding_ratio, resolved.sample_max_value)
                    if resolved.get("thresholding") else None)
    clip = resolved.clip_sample_range if resolved.get("clip_sample") else None
    return DDPMSchedule(alphas_cumprod, resolved.get("prediction_type") or "epsilon", clip_sample_range=clip,
                        thresholding=thresholding)
