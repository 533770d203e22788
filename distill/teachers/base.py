"""The teacher-adapter protocol: everything the algorithms may ask of a model family.

Losses, methods, students and the trainer talk to a diffusers checkpoint only through
this protocol; which family it is (pixel UNet, SD, SDXL, DiT, ...) stays inside the adapter.
A *conditioning* is a dict of batch-first tensors that the adapter alone interprets.

A training batch is a dict: ``"image"`` [B, C, H, W] in [-1, 1] (real images, when the data
has them), ``"class_label"`` [B] (class-conditional data), ``"prompt"`` (a list of B strings,
text data), and, when the data comes from the on-disk cache, ``"latent"`` (the encoded
images, x0) and ``"cond.<key>"`` tensors (the conditioning ``condition`` would compute).
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor, nn


class Teacher(Protocol):
    denoiser: nn.Module  # frozen teacher network; students and fake scores start as copies of it
    schedule: object  # distill.schedules.DDPMSchedule | FlowSchedule
    prediction_type: str  # epsilon | v_prediction | sample | flow, from the scheduler config
    scheduler_config: dict  # the checkpoint's own scheduler config
    sample_shape: tuple[int, ...]  # (C, H, W) of x0 in the space the denoiser works in
    num_classes: int | None  # class-conditional checkpoints: real classes (without the null class)
    image_size: tuple[int, int]  # (H, W) of the images it generates (decode's output)
    head_condition_dim: int | None  # width of head_condition's vectors (text: pooled embedding); None for labels / none

    def to(self, device) -> "Teacher": ...  # move every frozen part (denoiser, VAE, text encoders); returns self

    def condition(self, batch: dict) -> dict[str, Tensor]: ...

    def null_condition(self, cond: dict[str, Tensor]) -> dict[str, Tensor]: ...

    def head_condition(self, cond: dict[str, Tensor]) -> Tensor | None: ...

    def encode_images(self, images: Tensor) -> Tensor: ...

    def decode(self, x0: Tensor, clamp: bool = True) -> Tensor: ...  # images in [0, 1]; clamp=False keeps values outside

    def output(self, denoiser: nn.Module, x_t: Tensor, t: Tensor, cond: dict[str, Tensor]) -> Tensor: ...

    def guided_output(self, denoiser: nn.Module, x_t: Tensor, t: Tensor, cond: dict[str, Tensor], guidance_scale: float) -> Tensor: ...

    def x0(self, denoiser: nn.Module, x_t: Tensor, t: Tensor, cond: dict[str, Tensor], guidance_scale: float = 1.0) -> Tensor: ...

    def bottleneck(self, denoiser: nn.Module) -> nn.Module: ...

    def bottleneck_channels(self) -> int: ...

    def feature_modules(self, denoiser: nn.Module) -> list[nn.Module]: ...  # outputs: [B, C_i, H_i, W_i] (first of a tuple)

    def feature_channels(self) -> list[int]: ...


def cat_conditions(conds: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """Concatenate conditionings along the batch dimension (every value is batch-first)."""
    return {key: torch.cat([c[key] for c in conds]) for key in conds[0]}


COND_PREFIX = "cond."


def cached_condition(batch: dict) -> dict[str, Tensor] | None:
    """The conditioning stored in a cached batch (its ``cond.<key>`` entries), or None."""
    cond = {key[len(COND_PREFIX):]: value for key, value in batch.items() if key.startswith(COND_PREFIX)}
    return cond or None


def real_x0(teacher: Teacher, batch: dict) -> Tensor:
    """x0 of a batch's real images: the cached latents when the batch has them, else the
    images encoded by the teacher (a VAE for latent models, the identity in pixel space)."""
    return batch["latent"] if "latent" in batch else teacher.encode_images(batch["image"])
