"""Sampling and drawing, shared by training (sample grids, scores during training) and
evaluation (``distill eval``, ``distill sample``, the benchmarks).

Two words, one meaning each:

- to **sample** is to run a sampler from given noise to x0, in the denoiser's space: the
  student's ``FewStepSampler.sample``, or the teacher under a stock diffusers scheduler
  (``sample_teacher``);
- to **draw** is to make ``num`` images in [0, 1] from a seed, with what they are
  conditioned on: class labels (balanced), prompts, or None. ``draw`` draws the noise and
  the conditioning, calls a sample function and decodes; ``draw_student`` draws from a
  student. ``distill sample`` (the command) draws a grid.
"""

from __future__ import annotations

import inspect
from typing import Callable

import torch
from torch import Tensor, nn

from distill.denoiser import Denoiser
from distill.students import FewStepSampler

# (noise [B, C, H, W], cond, generator) -> x0 [B, C, H, W]
SampleFn = Callable[[Tensor, dict, torch.Generator], Tensor]


def balanced_labels(num: int, num_classes: int | None) -> Tensor | None:
    """0, 1, ..., num_classes-1, 0, 1, ... so every class is equally represented."""
    return None if num_classes is None else torch.arange(num) % num_classes


@torch.no_grad()
def draw(teacher, sample: SampleFn, num: int, seed: int, batch_size: int, device,
         prompts: list[str] | None = None, clamp: bool = True) -> tuple[Tensor, "Tensor | list[str] | None"]:
    """Images [num, C, H, W] in [0, 1] and what they were conditioned on, in batches:
    ``prompts`` (cycled to ``num``) for a text-conditioned teacher, else balanced class labels
    (or None, unconditional). The initial noise and every later draw come from one CPU
    generator seeded with ``seed``, in the order diffusers' loops draw them. ``clamp=False``
    keeps the values outside [0, 1] that the sampler produced (``Scorer`` counts them, then
    clamps as the pipelines do)."""
    generator = torch.Generator().manual_seed(seed)
    if prompts is not None:
        if not prompts:
            raise ValueError("draw: prompts is an empty list")
        labels = [prompts[i % len(prompts)] for i in range(num)]
    else:
        labels = balanced_labels(num, teacher.num_classes)
    chunks = []
    for start in range(0, num, batch_size):
        n = min(batch_size, num - start)
        if isinstance(labels, list):
            cond = teacher.condition({"prompt": labels[start : start + n]})
        else:
            cond = teacher.condition({"class_label": labels[start : start + n]}) if labels is not None else {}
        cond = {k: v.to(device) for k, v in cond.items()}
        noise = torch.randn((n, *teacher.sample_shape), generator=generator).to(device)
        chunks.append(teacher.decode(sample(noise, cond, generator), clamp=clamp).float().cpu())
    return torch.cat(chunks), labels


def draw_student(teacher, student: nn.Module, sampler: FewStepSampler, num: int, seed: int, batch_size: int, device,
                 prompts: list[str] | None = None, clamp: bool = True) -> tuple[Tensor, "Tensor | list[str] | None"]:
    """``draw`` from the student's few-step sampler (unguided, as it samples after export)."""
    G = Denoiser(teacher, student)

    def sample(noise, cond, generator):
        return sampler.sample(lambda x_t, t: G.x0(x_t, t, cond), noise, generator)

    return draw(teacher, sample, num, seed, batch_size, device, prompts, clamp)


@torch.no_grad()
def sample_teacher(teacher, scheduler_class, num_steps: int, noise: Tensor, cond: dict,
                   guidance_scale: float | None = None, generator: torch.Generator | None = None) -> Tensor:
    """The teacher sampled with a stock diffusers scheduler (e.g. DDIMScheduler,
    DPMSolverMultistepScheduler), built from the teacher's own scheduler config and run as
    the teacher's pipeline runs it (the adapter's ``set_timesteps``, ``initial_sample`` and
    ``model_input``), its output guided by ``guidance_scale`` (None: the network's own): the
    baseline a distilled student has to beat. Returns x0 [B, C, H, W]."""
    scheduler = scheduler_class.from_config(teacher.scheduler_config)
    teacher.set_timesteps(scheduler, num_steps)
    real = Denoiser(teacher, teacher.denoiser, guidance_scale)
    x = teacher.initial_sample(scheduler, noise)
    # the generator goes to steps that take one, as the pipelines pass it (PNDM's takes none)
    extra = {"generator": generator} if "generator" in inspect.signature(scheduler.step).parameters else {}
    for t in scheduler.timesteps:
        out = real.output(teacher.model_input(scheduler, x, t), t.expand(x.shape[0]).to(x.device), cond)
        x = scheduler.step(out, t, x, **extra).prev_sample
    return x
