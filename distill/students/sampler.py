"""The student's few-step sampler (DMD2, Yin et al. 2024, §4.5): the first step denoises
pure Gaussian noise as if it were x_t at ``timesteps[0]``; each later step re-noises the
previous x0 estimate to the next timestep with fresh noise and denoises again. The random
draws follow diffusers' ``LCMScheduler`` loop (initial noise, then one draw per re-noising
from the same generator), so an export reproduces these samples in stock diffusers.

To *sample* (here and in ``distill.sampling``) is to go from given noise to x0 in the
denoiser's space; ``distill.sampling.draw_student`` draws decoded images from a seed."""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

X0Fn = Callable[[Tensor, Tensor], Tensor]  # (x_t [B, ...], t [B]) -> x0 [B, ...]
NoiseFn = Callable[..., Tensor]  # (shape, *, generator, dtype, device) -> Gaussian noise of that shape


class FewStepSampler:
    """Sampling and backward simulation over fixed, descending ``timesteps``. ``noise``: how a
    re-noising draws its noise (a teacher adapter's ``step_noise``: as its pipeline's
    ``scheduler.step`` draws it; default ``torch.randn`` of the latents' shape)."""

    def __init__(self, timesteps: list[int], schedule, noise: NoiseFn = torch.randn):
        self.timesteps = list(timesteps)
        self.schedule = schedule
        self.noise = noise

    def __len__(self) -> int:
        return len(self.timesteps)

    def timestep(self, index: int, x: Tensor) -> Tensor:
        """``timesteps[index]`` as a [B] tensor for the batch ``x``."""
        return torch.full((x.shape[0],), self.timesteps[index], dtype=torch.long, device=x.device)

    def renoise(self, x0: Tensor, index: int, generator: torch.Generator | None) -> Tensor:
        """x_t at ``timesteps[index]`` from x0 and a fresh draw of noise."""
        noise = self.noise(x0.shape, generator=generator, dtype=x0.dtype, device=generator.device if generator else None)
        return self.schedule.add_noise(x0, noise.to(x0.device), self.timestep(index, x0))

    def simulate(self, x0_fn: X0Fn, noise: Tensor, steps: int, generator: torch.Generator | None) -> Tensor:
        """Run the first ``steps`` steps without gradient; return the input of step ``steps``
        (``noise`` itself when ``steps == 0``): the backward simulation of DMD2 §4.5. Each x0 is
        treated as the checkpoint's scheduler treats it (``schedule.clip_x0``) before re-noising,
        as the exported scheduler does."""
        x_t = noise
        with torch.no_grad():
            for i in range(steps):
                x0 = self.schedule.clip_x0(x0_fn(x_t, self.timestep(i, x_t)))
                x_t = self.renoise(x0, i + 1, generator)
        return x_t

    @torch.no_grad()
    def sample(self, x0_fn: X0Fn, noise: Tensor, generator: torch.Generator | None, num_steps: int | None = None) -> Tensor:
        """x0 after ``num_steps`` (default: all) student steps from ``noise`` [B, C, H, W], clipped
        as the checkpoint's scheduler clips it (``schedule.clip_x0``)."""
        steps = len(self.timesteps) if num_steps is None else num_steps
        x_t = self.simulate(x0_fn, noise, steps - 1, generator)
        return self.schedule.clip_x0(x0_fn(x_t, self.timestep(steps - 1, x_t)))
