"""Student -> a diffusers pipeline directory that stock diffusers loads and samples.

The exported scheduler is a stock diffusers class configured so that the standard loop
(``scheduler.set_timesteps(N)``, then the model and ``scheduler.step`` per timestep)
reproduces the student's sampler exactly:

- ``LCMScheduler`` with ``original_inference_steps=N`` yields the evenly spaced timesteps
  ``[T-1, T-1-T/N, ...]`` (e.g. 999, 749, 499, 249) and re-noises each x0 with fresh noise
  from the caller's generator, as the student does; ``timestep_scaling`` is set so large
  that its consistency boundary scalings are c_skip = 0 and c_out = 1 in float32.
- ``DDIMScheduler`` with ``timestep_spacing="leading"`` and ``steps_offset=t`` gives a single
  step at any timestep ``t`` that returns x0 itself (the final alpha is one).
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import yaml
from diffusers import DDIMScheduler, DiffusionPipeline, LCMScheduler, SchedulerMixin

_LCM_TIMESTEP_SCALING = 1.0e6  # c_skip = 0.25 / (t * 1e6)^2 + ...: below float32 resolution for t >= 1


def _accepted(cls: type, config: dict) -> dict:
    """The keys of a scheduler config that ``cls`` takes (the teacher's may be another class)."""
    names = inspect.signature(cls.__init__).parameters
    return {k: v for k, v in config.items() if k in names}


def few_step_scheduler(teacher_scheduler_config: dict, timesteps: list[int]) -> SchedulerMixin:
    """A stock diffusers scheduler whose ``set_timesteps(len(timesteps))`` gives ``timesteps``
    and whose ``step`` is the student's update (x0, then fresh-noise re-noising)."""
    n = len(timesteps)
    common = dict(clip_sample=False, thresholding=False)
    lcm = LCMScheduler.from_config(
        _accepted(LCMScheduler, teacher_scheduler_config),
        original_inference_steps=n,
        timestep_scaling=_LCM_TIMESTEP_SCALING,
        **common,
    )
    lcm.set_timesteps(n)
    if lcm.timesteps.tolist() == list(timesteps):
        return lcm
    if n == 1:
        ddim = DDIMScheduler.from_config(
            _accepted(DDIMScheduler, teacher_scheduler_config), timestep_spacing="leading", steps_offset=int(timesteps[0]), set_alpha_to_one=True, **common)
        ddim.set_timesteps(1)
        if ddim.timesteps.tolist() == list(timesteps):
            return ddim
    raise ValueError(
        f"no stock diffusers scheduler reproduces the timesteps {list(timesteps)} from set_timesteps({n}); "
        f"with {n} steps use {lcm.timesteps.tolist()} (LCMScheduler), or a single step at any timestep"
    )


def load_run(run_dir: str | Path, checkpoint: str = "latest"):
    """(resolved config dict, checkpoint directory) of a training run."""
    from distill.trainer import find_checkpoint

    run_dir = Path(run_dir)
    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        raise FileNotFoundError(f"{run_dir.resolve()} is not a distill run directory (no config.yaml)")
    config = yaml.safe_load(config_path.read_text())
    return config, find_checkpoint(run_dir, checkpoint)


def export(run_dir: str | Path, out_dir: str | Path, checkpoint: str = "latest") -> Path:
    """Write the run's student (EMA weights) as a diffusers pipeline directory with a
    few-step scheduler and a model card; returns ``out_dir``."""
    from distill.teachers import teacher_from_pipeline

    config, ckpt = load_run(run_dir, checkpoint)
    teacher_path = config["teacher"]["path"]
    timesteps = config["student"]["timesteps"]
    pipe = DiffusionPipeline.from_pretrained(teacher_path, revision=config["teacher"].get("revision"), use_safetensors=True)
    teacher = teacher_from_pipeline(pipe)
    student_cls = type(teacher.denoiser)
    student = student_cls.from_pretrained(ckpt / "student", use_safetensors=True)
    scheduler = few_step_scheduler(teacher.scheduler_config, timesteps)
    component = next(name for name, module in pipe.components.items() if isinstance(module, student_cls))
    pipe.register_modules(**{component: student, "scheduler": scheduler})
    out_dir = Path(out_dir)
    pipe.save_pretrained(out_dir, safe_serialization=True)

    metrics_path = Path(run_dir) / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else None
    (out_dir / "README.md").write_text(
        model_card(
            teacher=teacher_path,
            recipe=config,
            timesteps=timesteps,
            scheduler=type(scheduler).__name__,
            component=component,
            denoiser_class=student_cls.__name__,
            num_classes=teacher.num_classes,
            metrics=metrics,
            checkpoint=ckpt.name,
        )
    )
    (out_dir / "distill_recipe.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return out_dir


def model_card(*, teacher, recipe, timesteps, scheduler, component, denoiser_class, num_classes, metrics, checkpoint) -> str:
    n = len(timesteps)
    method = recipe["method"]
    labels = "class_labels=labels" if num_classes else ""
    label_line = f"labels = torch.arange(16) % {num_classes}  # classes 0..{num_classes - 1}\n" if num_classes else ""
    score_rows = ""
    if metrics:
        score_rows = "\n## Measured scores\n\n| metric | value |\n|---|---|\n" + "".join(
            f"| {k} | {v:.4g} |\n" if isinstance(v, float) else f"| {k} | {v} |\n" for k, v in metrics.items()
        )
    return f"""---
library_name: diffusers
tags: [distill, {method['name']}, few-step]
---
# {n}-step student distilled from `{teacher}`

Distilled with distill by {method['name'].upper()} (recipe below, checkpoint `{checkpoint}`).

| | |
|---|---|
| teacher | `{teacher}` |
| method | {method['name']}, guidance of the real score {recipe['teacher']['guidance_scale']}, GAN weight {method['gan_weight']} |
| steps | {n} |
| timesteps | {timesteps} |
| scheduler | `{scheduler}` (in `scheduler/`; `set_timesteps({n})` gives exactly these timesteps) |
| guidance at sampling | none (the student is sampled without classifier-free guidance) |
| model | `{denoiser_class}` in `{component}/` (safetensors) |
{score_rows}
## Sampling with stock diffusers

```python
import torch
from diffusers import DiffusionPipeline

pipe = DiffusionPipeline.from_pretrained("PATH_TO_THIS_DIRECTORY")
model, scheduler = pipe.{component}, pipe.scheduler
generator = torch.Generator().manual_seed(0)
{label_line}x = torch.randn((16, model.config.in_channels, model.config.sample_size, model.config.sample_size), generator=generator)
scheduler.set_timesteps({n})
for t in scheduler.timesteps:
    output = model(x, t{', ' + labels if labels else ''}).sample
    x = scheduler.step(output, t, x, generator=generator).prev_sample
images = (x / 2 + 0.5).clamp(0, 1)
```

Use the same generator for the initial noise and for `scheduler.step`: a multi-step student
re-noises each intermediate x0 with fresh noise drawn from it.
{'' if num_classes else f"An unconditional student also runs as `pipe(num_inference_steps={n}, generator=generator)`."}

## Recipe

```yaml
{yaml.safe_dump(recipe, sort_keys=False)}```
"""
