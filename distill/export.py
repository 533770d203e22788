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

A LoRA student is exported three ways (``FORMATS``): the pipeline with the LoRA fused into
its denoiser; ``lora/pytorch_lora_weights.safetensors``, diffusers' LoRA format for
``pipe.load_lora_weights`` on the teacher's own pipeline (peft keys, with the ``LoraConfig``
in the file's ``lora_adapter_metadata`` so an alpha other than the rank loads at its scale);
and ``kohya/distill_lora.safetensors``, the same weights under kohya / ComfyUI key names
(``lora_unet_<module>.lora_down.weight``, ``.lora_up.weight``, ``.alpha``).
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import yaml
from diffusers import DDIMScheduler, DiffusionPipeline, FlowMatchEulerDiscreteScheduler, LCMScheduler, SchedulerMixin

from distill import config as config_lib
from distill.schedules import FlowSchedule, schedule_from_config
from distill.students import ADAPTER_WEIGHTS, fuse, is_lora_checkpoint, load_student, lora_state_dict

_LCM_TIMESTEP_SCALING = 1.0e6  # c_skip = 0.25 / (t * 1e6)^2 + ...: below float32 resolution for t >= 1
FORMATS = ("pipeline", "lora", "kohya")
LORA_DIR, KOHYA_DIR, KOHYA_FILE = "lora", "kohya", "distill_lora.safetensors"


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


def _flow_timesteps(scheduler: FlowMatchEulerDiscreteScheduler, n: int) -> list[float]:
    scheduler.set_timesteps(n)
    return scheduler.timesteps.tolist()


def _flow_few_step_scheduler(config: dict, timesteps: list[int]) -> FlowMatchEulerDiscreteScheduler | None:
    """The flow scheduler whose ``set_timesteps(N)`` gives ``timesteps`` (to float32 rounding), or None.

    ``set_timesteps(N)`` always starts at sigma = 1 (t = T, pure noise, as the student's first step
    assumes) and, with shift s and shift_terminal, ends at sigma = shift_terminal; s bends the
    spacing in between (s = 1: evenly spaced). The last timestep fixes shift_terminal; with three
    or more steps the second fixes s (found by bisection on log s), the rest must then agree."""
    n, num_train = len(timesteps), config.get("num_train_timesteps", 1000)
    if timesteps[0] != num_train:
        return None

    def matches(scheduler) -> bool:
        return all(abs(a - b) <= _FLOW_TIMESTEP_TOLERANCE for a, b in zip(_flow_timesteps(scheduler, n), timesteps))

    terminal = timesteps[-1] / num_train if n > 1 else None
    if n <= 2:
        scheduler = _flow_scheduler(config, 1.0, terminal)
        return scheduler if matches(scheduler) else None

    def second(log_shift: float) -> float:  # the second timestep minus the student's
        return _flow_timesteps(_flow_scheduler(config, float(np.exp(log_shift)), terminal), n)[1] - timesteps[1]

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


def few_step_scheduler(teacher_scheduler_config: dict, timesteps: list[int]) -> SchedulerMixin:
    """A stock diffusers scheduler whose ``set_timesteps(len(timesteps))`` gives ``timesteps``
    and whose ``step`` is the student's update (x0, then fresh-noise re-noising).

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
        scheduler = _flow_few_step_scheduler(teacher_scheduler_config, list(timesteps))
        if scheduler is not None:
            return scheduler
        num_train = teacher_scheduler_config.get("num_train_timesteps", 1000)
        step = (num_train - timesteps[-1]) // (n - 1) if n > 1 else 0  # whole steps: shift 1 gives them exactly
        even = [num_train - i * step for i in range(n)]
        hint = (f"with {n} steps use e.g. {even} (evenly spaced in whole steps down to about the last), "
                "or a spacing one shift gives" if n > 1 else f"a single step is at {num_train}")
        raise ValueError(
            f"no stock FlowMatchEulerDiscreteScheduler reproduces the timesteps {list(timesteps)} from set_timesteps({n}): "
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


def export(run_dir: str | Path, out_dir: str | Path, checkpoint: str = "latest",
           formats: Sequence[str] | None = None) -> Path:
    """Write the run's student (EMA weights) to ``out_dir`` with a model card; returns ``out_dir``.

    ``formats`` (default: every one the student has): ``"pipeline"``, the teacher's pipeline
    with the student's denoiser (a LoRA fused in) and a few-step scheduler, in ``out_dir``;
    for a LoRA student also ``"lora"`` (``lora/``, for ``pipe.load_lora_weights`` on the
    teacher's pipeline) and ``"kohya"`` (``kohya/distill_lora.safetensors``). The LoRA
    formats need a LoRA student and a pipeline class with a diffusers LoRA loader; the
    default leaves them out where the pipeline has none. ``scheduler/`` is always written."""
    config, ckpt = load_run(run_dir, checkpoint)
    student_dir = ckpt / "student"
    run = config_lib.from_dict(config, str(Path(run_dir) / "config.yaml"))
    teacher_path, revision, timesteps = run.teacher.path, run.teacher.revision, run.student.timesteps
    # components saved as [null, null] (e.g. SD3 without T5) load only when passed as None again
    absent = {k: None for k, v in DiffusionPipeline.load_config(teacher_path, revision=revision).items()
              if not k.startswith("_") and isinstance(v, list) and len(v) == 2 and v[0] is None}
    pipe = DiffusionPipeline.from_pretrained(teacher_path, revision=revision, use_safetensors=True, **absent)
    lora = is_lora_checkpoint(student_dir)
    resolution = run.data.resolution  # trained at another size than the checkpoint's default
    teacher = _teacher_or_none(pipe, resolution)
    scheduler_config = teacher.scheduler_config if teacher else {**pipe.scheduler.config, "_class_name": type(pipe.scheduler).__name__}
    scheduler = few_step_scheduler(scheduler_config, timesteps)
    component = _denoiser_component(pipe, teacher, student_dir)
    formats = _formats(formats, lora, type(pipe), component)
    teacher_denoiser = pipe.components[component]
    denoiser_class = type(teacher_denoiser).__name__
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    student = load_student(teacher_denoiser, student_dir)
    lora_info = None
    if lora:
        state, lora_config = lora_state_dict(student)
        lora_info = {"rank": lora_config.r, "alpha": lora_config.lora_alpha}
        if "lora" in formats:
            save_diffusers_lora(type(pipe), component, state, lora_config, out_dir / LORA_DIR)
        if "kohya" in formats:
            save_kohya_lora(component, state, lora_config, out_dir / KOHYA_DIR / KOHYA_FILE)
        student = fuse(student)  # pipe's own denoiser, now with the LoRA merged
    if "pipeline" in formats:
        if resolution is not None and teacher is not None and hasattr(student.config, "sample_size"):
            # the pipelines' default height / width is sample_size x the VAE factor: make it the trained size
            student.register_to_config(sample_size=teacher.sample_shape[-1])
        pipe.register_modules(**{component: student, "scheduler": scheduler})
        pipe.save_pretrained(out_dir, safe_serialization=True)
    else:
        scheduler.save_pretrained(out_dir / "scheduler")

    metrics_path = Path(run_dir) / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else None
    (out_dir / "README.md").write_text(
        model_card(
            teacher=teacher_path,
            recipe=config,
            timesteps=timesteps,
            scheduler=type(scheduler).__name__,
            component=component,
            denoiser_class=denoiser_class,
            num_classes=teacher.num_classes if teacher else None,
            metrics=metrics,
            checkpoint=ckpt.name,
            text="prompt" in inspect.signature(type(pipe).__call__).parameters,
            label_call="class_labels" in inspect.signature(type(pipe).__call__).parameters,
            formats=formats,
            lora=lora_info,
            image_size=resolution,
        )
    )
    (out_dir / "distill_recipe.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return out_dir


def _formats(requested: Sequence[str] | None, lora: bool, pipeline_class: type, component: str) -> tuple[str, ...]:
    has_loader = hasattr(pipeline_class, "save_lora_weights")
    if requested is None:
        if not (lora and has_loader):
            return ("pipeline",)
        return FORMATS if component == "unet" else ("pipeline", "lora")  # kohya keys name UNet modules only
    requested = tuple(requested)
    unknown = [f for f in requested if f not in FORMATS]
    if unknown or not requested:
        raise ValueError(f"unknown export format(s) {unknown or requested}; choose from {list(FORMATS)}")
    wants_lora = [f for f in requested if f != "pipeline"]
    if wants_lora and not lora:
        raise ValueError(f"export formats {wants_lora} need a LoRA student, but this run trained every weight "
                         "(student.lora.rank = 0): export the pipeline")
    if wants_lora and not has_loader:
        raise ValueError(f"{pipeline_class.__name__} has no diffusers LoRA loader, so formats {wants_lora} do not "
                         "apply: export the pipeline (the LoRA fused in)")
    return requested


def _teacher_or_none(pipe, image_size: int | None = None):
    """The teacher adapter over ``pipe``, or None for a pipeline no adapter reads yet (its
    scheduler then comes from ``pipe.scheduler`` and it has no class labels)."""
    from distill.teachers import teacher_from_pipeline

    try:
        return teacher_from_pipeline(pipe, image_size=image_size)
    except ValueError:
        return None


def _denoiser_component(pipe, teacher, student_dir: Path) -> str:
    """The pipeline component the student replaces: the teacher adapter's denoiser; without
    an adapter, the component of the saved student's class (full) or the one that has every
    module the LoRA adapts."""
    modules = {name: m for name, m in pipe.components.items() if isinstance(m, torch.nn.Module)}
    if teacher is not None:
        found = [n for n, m in modules.items() if m is teacher.denoiser] or [
            n for n, m in modules.items() if type(m) is type(teacher.denoiser)]
    elif is_lora_checkpoint(student_dir):
        from safetensors import safe_open

        with safe_open(student_dir / ADAPTER_WEIGHTS, "pt") as f:
            targets = {key.split(".lora_")[0] for key in f.keys()}
        found = [n for n, m in modules.items() if targets <= {name for name, _ in m.named_modules()}]
    else:
        class_name = json.loads((student_dir / "config.json").read_text())["_class_name"]
        found = [n for n, m in modules.items() if type(m).__name__ == class_name]
    if len(found) != 1:
        raise ValueError(f"cannot tell which component of {type(pipe).__name__} the student replaces (candidates {found})")
    return found[0]


def save_diffusers_lora(pipeline_class: type, component: str, state: dict, lora_config, directory: Path) -> Path:
    """``pytorch_lora_weights.safetensors`` for ``pipeline_class.load_lora_weights``: the peft
    state dict under ``<component>.`` and the ``LoraConfig`` as the file's
    ``lora_adapter_metadata``. Without that metadata diffusers would assume alpha = rank.
    The keys stay peft's (``lora_A`` / ``lora_B``), as diffusers' own ``save_lora_adapter``
    writes them: ``convert_state_dict_to_diffusers`` renames only attention projections, and
    the loader converts a file only when its first key is not peft's, so a LoRA on
    attention and convolutions would come back half loaded."""
    parameters = inspect.signature(pipeline_class.save_lora_weights).parameters
    if f"{component}_lora_layers" not in parameters:
        raise ValueError(f"{pipeline_class.__name__}.save_lora_weights takes no {component}_lora_layers")
    pipeline_class.save_lora_weights(
        directory,
        **{f"{component}_lora_layers": state, f"{component}_lora_adapter_metadata": lora_config.to_dict()},
        safe_serialization=True,
    )
    return directory


def kohya_state_dict(component: str, state: dict, lora_config) -> dict:
    """The peft LoRA ``state`` of a UNet with kohya / ComfyUI key names:
    ``lora_unet_<module path with _>.lora_down.weight`` (A), ``.lora_up.weight`` (B) and
    ``.alpha``. diffusers' converter writes alpha = rank; the real alpha goes in instead, so
    loaders scale by alpha / rank as training did."""
    from diffusers.utils import convert_state_dict_to_kohya

    if component != "unet":
        raise ValueError(f"kohya LoRA keys name UNet modules (lora_unet_...); this denoiser is {component!r}")
    if lora_config.rank_pattern or lora_config.alpha_pattern or lora_config.use_rslora:
        raise ValueError("kohya export takes one rank and alpha for every module (no rank/alpha patterns, no rsLoRA)")
    kohya = convert_state_dict_to_kohya({f"{component}.{k}": v for k, v in state.items()})
    return {k: torch.tensor(float(lora_config.lora_alpha)) if k.endswith(".alpha") else v.contiguous() for k, v in kohya.items()}


def save_kohya_lora(component: str, state: dict, lora_config, path: Path) -> Path:
    """One safetensors file of ``kohya_state_dict`` (with kohya's rank / alpha metadata)."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(kohya_state_dict(component, state, lora_config), path,
              metadata={"format": "pt", "ss_network_dim": str(lora_config.r), "ss_network_alpha": str(lora_config.lora_alpha)})
    return path


def model_card(*, teacher, recipe, timesteps, scheduler, component, denoiser_class, num_classes, metrics, checkpoint,
               text=False, formats=("pipeline",), lora=None, image_size=None, label_call=False) -> str:
    n = len(timesteps)
    method = recipe["method"]
    score_rows = ""
    if metrics:
        score_rows = "\n## Measured scores\n\n| metric | value |\n|---|---|\n" + "".join(
            f"| {k} | {v:.4g} |\n" if isinstance(v, float) else f"| {k} | {v} |\n" for k, v in metrics.items()
        )
    if lora:
        model_row = (f"| model | LoRA of `{denoiser_class}` (rank {lora['rank']}, alpha {lora['alpha']})"
                     + (f", fused into `{component}/` (safetensors)" if "pipeline" in formats else "") + " |")
    else:
        model_row = f"| model | `{denoiser_class}` in `{component}/` (safetensors) |"
    files = ""
    if "lora" in formats:
        files += f"| LoRA (diffusers) | `{LORA_DIR}/pytorch_lora_weights.safetensors`, for `pipe.load_lora_weights` on the teacher |\n"
    if "kohya" in formats:
        files += f"| LoRA (kohya / ComfyUI) | `{KOHYA_DIR}/{KOHYA_FILE}` |\n"
    if text:
        sampling = _text_sampling(teacher, n, scheduler, formats)
    elif label_call:
        sampling = _label_pipeline_sampling(n, num_classes)
    else:
        sampling = _class_sampling(n, component, num_classes, formats)
    return f"""---
library_name: diffusers
tags: [distill, {method['name']}, few-step{', lora' if lora else ''}]
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
| guidance at sampling | none: the student is sampled without classifier-free guidance{' (`guidance_scale=0.0`)' if text else ''} |
{f"| image size | {image_size} x {image_size} (trained at this size: pass `height={image_size}, width={image_size}` with the LoRA) |" + chr(10) if image_size else ""}{model_row}
{files}{score_rows}
{sampling}
## Recipe

```yaml
{yaml.safe_dump(recipe, sort_keys=False)}```
"""


_FLOW_RNG_NOTE = """ Some pipelines (SD3's among them) call `scheduler.step` without the
generator, so that fresh noise comes from torch's global generator: seed it with
`torch.manual_seed(...)` too for repeatable images."""


def _text_sampling(teacher, n, scheduler, formats) -> str:
    section = ""
    if "pipeline" in formats:
        section += f"""## Sampling with stock diffusers

```python
import torch
from diffusers import DiffusionPipeline

pipe = DiffusionPipeline.from_pretrained("PATH_TO_THIS_DIRECTORY")
image = pipe("a photo of a cat", num_inference_steps={n}, guidance_scale=0.0,
             generator=torch.Generator().manual_seed(0)).images[0]
```

`guidance_scale=0.0` turns classifier-free guidance off: the student was distilled to sample
without it. A multi-step student re-noises each intermediate x0 with fresh noise from the
generator.{_FLOW_RNG_NOTE if scheduler == "FlowMatchEulerDiscreteScheduler" and n > 1 else ""}
"""
    if "lora" in formats:
        section += f"""
## The LoRA on the teacher's pipeline

```python
from diffusers import DiffusionPipeline, {scheduler}

pipe = DiffusionPipeline.from_pretrained("{teacher}")
pipe.load_lora_weights("PATH_TO_THIS_DIRECTORY/{LORA_DIR}")
pipe.scheduler = {scheduler}.from_pretrained("PATH_TO_THIS_DIRECTORY", subfolder="scheduler")
image = pipe("a photo of a cat", num_inference_steps={n}, guidance_scale=0.0).images[0]
```
"""
    if "kohya" in formats:
        section += f"""
`{KOHYA_DIR}/{KOHYA_FILE}` holds the same LoRA with kohya key names (ComfyUI, AUTOMATIC1111):
sample it with {n} step{'s' * (n > 1)} at the timesteps above, CFG 1 (no guidance).
"""
    return section


def _label_pipeline_sampling(n, num_classes) -> str:
    """A class-conditional pipeline whose own call takes labels (DiTPipeline): it decodes and
    drops a learned-variance half itself."""
    rng = ("" if n == 1 else "\nThis pipeline calls `scheduler.step` without the generator, so the re-noising of a "
           "multi-step\nstudent draws from torch's global generator: seed it with `torch.manual_seed(...)` too.")
    return f"""## Sampling with stock diffusers

```python
import torch
from diffusers import DiffusionPipeline

pipe = DiffusionPipeline.from_pretrained("PATH_TO_THIS_DIRECTORY")
images = pipe(class_labels=[0, 1, 2, 3], num_inference_steps={n}, guidance_scale=1.0,
              generator=torch.Generator().manual_seed(0)).images
```

`guidance_scale=1.0` turns classifier-free guidance off (the student was distilled to sample
without it); class labels are 0..{(num_classes or 1) - 1}.{rng}
"""


def _class_sampling(n, component, num_classes, formats) -> str:
    labels = "class_labels=labels" if num_classes else ""
    label_line = f"labels = torch.arange(16) % {num_classes}  # classes 0..{num_classes - 1}\n" if num_classes else ""
    return f"""## Sampling with stock diffusers

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
"""
