"""The model card (README.md) of an export: what was distilled, how, its scores, and the
stock-diffusers code that samples it."""

from __future__ import annotations

import yaml

from distill.export.lora import KOHYA_DIR, KOHYA_FILE, LORA_DIR


def model_card(*, teacher, recipe, timesteps, scheduler, component, denoiser_class, num_classes, metrics, checkpoint,
               text=False, formats=("pipeline",), lora=None, image_size=None, label_call=False, extracted=None) -> str:
    n = len(timesteps)
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
    if "single-file" in formats:
        files += ("| single file (AUTOMATIC1111 / ComfyUI) | `distill_student.safetensors`, the original checkpoint layout; "
                  f"sample it with {n} step{'s' * (n > 1)}, CFG 1 |\n")
    extracted_section = _extracted_section(extracted) if extracted else ""
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
| method | {method['name']}, guidance of the real score {recipe['teacher']['guidance_scale']}, {gan} |
| steps | {n} |
| timesteps | {timesteps} |
| scheduler | `{scheduler}` (in `scheduler/`; `set_timesteps({n})` gives exactly these timesteps) |
| guidance at sampling | none: the student is sampled without classifier-free guidance{' (`guidance_scale=0.0`)' if text else ''} |
{f"| image size | {image_size} x {image_size} (trained at this size: pass `height={image_size}, width={image_size}` with the LoRA) |" + chr(10) if image_size else ""}{model_row}
{files}{score_rows}{extracted_section}
{sampling}
## Recipe

```yaml
{yaml.safe_dump(recipe, sort_keys=False)}```
"""


def _extracted_section(extracted: dict) -> str:
    """The extracted LoRA: its files, how well it fits the student's weights, and how far its
    images are from the full student's."""
    fit, distance = extracted["fit"], extracted["distance"]
    rows = "".join(f"| file | `{f}` |\n" for f in extracted["files"])
    rows += (f"| weight fit | relative error {fit['lora_relative_error']:.4g} over {fit['lora_layers']} layers "
             f"(energy kept {fit['lora_energy_kept']:.4g}; worst layer `{fit['lora_worst_layer']}`, "
             f"{fit['lora_worst_layer_error']:.4g}) |\n")
    if fit["lora_not_expressed"]:
        rows += f"| not in the LoRA | {len(fit['lora_not_expressed'])} changed parameter(s) that are no Linear / Conv2d weight |\n"
    if distance:
        rows += (f"| distance to the full student | mean abs {distance['mean_abs_diff']:.4g}, max abs "
                 f"{distance['max_abs_diff']:.4g}, PSNR {distance['psnr_db']:.2f} dB ({distance['num_images']} images, "
                 "same seeds, pixels in [0, 1]) |\n")
    return (f"\n## LoRA extracted from the full student (rank {extracted['rank']})\n\nThe difference of the student's "
            "weights from the teacher's, cut to its best rank-r approximation (truncated SVD), alpha = rank; load "
            "it onto the teacher's pipeline and sample it as the student.\n\n| | |\n|---|---|\n" + rows)


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
