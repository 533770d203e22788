"""``teacher.offload``: frozen teacher parts that rest in CPU memory and visit the accelerator
only while they run (Accelerate's ``cpu_offload_with_hook``, the hook diffusers'
``enable_model_cpu_offload`` uses; diffusers' VAE calls it from ``encode`` / ``decode`` too).

- ``encoders``: the text encoders and the VAE (every frozen module of the teacher adapter
  but its denoiser): on the device for the encoding of a batch, the decoding of samples, or a
  decoded-image discriminator's step, and back in CPU memory after it;
- ``all``: the teacher's denoiser too (full students only: a LoRA role's base is the
  teacher's denoiser, which the student needs on the device).

The trainer calls ``release()`` after each batch's encoding and after each backward pass
(a discriminator on the teacher's features needs its weights in the backward pass too).
"""

from __future__ import annotations

from torch import nn

OFFLOAD_CHOICES = ("none", "encoders", "all")


def teacher_modules(teacher) -> tuple[nn.Module, list[nn.Module]]:
    """(the denoiser, the other frozen modules) of a teacher adapter: its attributes that are
    modules or lists of modules (text encoders, VAE), whatever the family."""
    others: list[nn.Module] = []
    for name, value in vars(teacher).items():
        candidates = value if isinstance(value, (list, tuple)) else [value]
        for module in candidates:
            if isinstance(module, nn.Module) and module is not teacher.denoiser and all(module is not m for m in others):
                others.append(module)
    return teacher.denoiser, others


class Offload:
    """The offload hooks of one teacher (``mode`` one of ``OFFLOAD_CHOICES``) on ``device``."""

    def __init__(self, teacher, mode: str, device):
        from accelerate import cpu_offload_with_hook

        if mode not in OFFLOAD_CHOICES:
            raise ValueError(f"teacher.offload must be one of {OFFLOAD_CHOICES}, got {mode!r}")
        denoiser, encoders = teacher_modules(teacher)
        modules = [] if mode == "none" else encoders + ([denoiser] if mode == "all" else [])
        self.modules = modules
        self.hooks = [cpu_offload_with_hook(module, device)[1] for module in modules]

    def release(self) -> None:
        """Every offloaded module back to CPU memory (a no-op for those already there)."""
        for hook in self.hooks:
            hook.offload()
