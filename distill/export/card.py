"""The model card (README.md) of an export: what was distilled, how, its scores, and the
stock-diffusers code that samples it."""

from __future__ import annotations

import yaml

from distill.export.lora import KOHYA_DIR, KOHYA_FILE, LORA_DIR


def model_card(*, teacher, recipe, timesteps, scheduler, component, denoiser_class, num_classes, metrics, checkpoint,
               text=False, formats=("pipeline",), lora=None, image_size=None, label_call=False, call_kwargs=None,
               embedded_guidance=False, global_rng=False) -> str:
    """``call_kwargs``: what the pipeline's call needs to sample as the student (the teacher
    adapter's ``pipeline_kwargs``); ``embedded_guidance``: the student runs at an embedded
    guidance scale (its ``guidance_scale`` there) rather than without CFG; ``global_rng``: the
    pipeline re-noises from torch's global generator (its ``scheduler.step`` gets none)."""
    n = len(timesteps)
    call = _call_arguments(n, call_kwargs or {})
    rng_note = _GLOBAL_RNG_NOTE if global_rng and n > 1 else ""
    method = recipe["method"]
    gan = f", GAN weight {method['gan']['weight']}" if "gan" in method else ""
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
    if embedded_guidance:
        guidance = (f"the embedded scale it was trained at, `guidance_scale={(call_kwargs or {}).get('guidance_scale')}` "
                    "(a network input: no classifier-free batch)")
    else:
        guidance = "none: the student is sampled without classifier-free guidance" + (
            f" (`guidance_scale={call_kwargs['guidance_scale']}`)" if call_kwargs and "guidance_scale" in call_kwargs else "")
    if text:
        sampling = _text_sampling(teacher, n, scheduler, formats, call, embedded_guidance, rng_note)
    elif label_call:
        sampling = _label_pipeline_sampling(num_classes, call, rng_note)
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
| method | {method['name']}, guidance of the real score {recipe['teacher']['guidance_scale']}, {gan} |
| steps | {n} |
| timesteps | {timesteps} |
| scheduler | `{scheduler}` (in `scheduler/`; the pipeline's `num_inference_steps={n}` gives exactly these timesteps) |
| guidance at sampling | {guidance} |
{f"| image size | {image_size} x {image_size} (trained at this size: pass `height={image_size}, width={image_size}` with the LoRA) |" + chr(10) if image_size else ""}{model_row}
{files}{score_rows}
{sampling}
## Recipe

```yaml
{yaml.safe_dump(recipe, sort_keys=False)}```
"""


_GLOBAL_RNG_NOTE = """
This pipeline calls `scheduler.step` without the generator, so the re-noising of a multi-step
student draws from torch's global generator: seed it with `torch.manual_seed(...)` too for
repeatable images."""


def _call_arguments(n: int, call_kwargs: dict) -> str:
    """``num_inference_steps=N, key=value, ...`` of a pipeline call."""
    return ", ".join([f"num_inference_steps={n}", *(f"{k}={v!r}" for k, v in call_kwargs.items())])


def _text_sampling(teacher, n, scheduler, formats, call, embedded_guidance, rng_note) -> str:
    why = ("`guidance_scale` is the embedded guidance the student was distilled at" if embedded_guidance else
           "classifier-free guidance is off: the student was distilled to sample without it")
    section = ""
    if "pipeline" in formats:
        section += f"""## Sampling with stock diffusers

```python
import torch
from diffusers import DiffusionPipeline

pipe = DiffusionPipeline.from_pretrained("PATH_TO_THIS_DIRECTORY")
image = pipe("a photo of a cat", {call},
             generator=torch.Generator().manual_seed(0)).images[0]
```

Here {why}. A multi-step student re-noises each intermediate x0 with fresh noise from the
generator.{rng_note}
"""
    if "lora" in formats:
        section += f"""
## The LoRA on the teacher's pipeline

```python
from diffusers import DiffusionPipeline, {scheduler}

pipe = DiffusionPipeline.from_pretrained("{teacher}")
pipe.load_lora_weights("PATH_TO_THIS_DIRECTORY/{LORA_DIR}")
pipe.scheduler = {scheduler}.from_pretrained("PATH_TO_THIS_DIRECTORY", subfolder="scheduler")
image = pipe("a photo of a cat", {call}).images[0]
```
"""
    if "kohya" in formats:
        section += f"""
`{KOHYA_DIR}/{KOHYA_FILE}` holds the same LoRA with kohya key names (ComfyUI, AUTOMATIC1111):
sample it with {n} step{'s' * (n > 1)} at the timesteps above, CFG 1 (no guidance).
"""
    return section


def _label_pipeline_sampling(num_classes, call, rng_note) -> str:
    """A class-conditional pipeline whose own call takes labels (e.g. DiTPipeline): it decodes
    and drops a learned-variance half itself."""
    return f"""## Sampling with stock diffusers

```python
import torch
from diffusers import DiffusionPipeline

pipe = DiffusionPipeline.from_pretrained("PATH_TO_THIS_DIRECTORY")
images = pipe(class_labels=[0, 1, 2, 3], {call},
              generator=torch.Generator().manual_seed(0)).images
```

Classifier-free guidance is off (the student was distilled to sample without it); class
labels are 0..{(num_classes or 1) - 1}.{rng_note}
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
