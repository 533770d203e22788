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
    # how guidance reaches the network (distill.denoiser.Denoiser mixes it, nowhere else): "cfg"
    # (classifier-free: cond and null_condition batched), "embedded" (the scale is a network input;
    # such an adapter also has with_guidance(cond, scale) -> cond, which adds it), or None (none possible)
    guidance: str | None
    null_first: bool  # "cfg": the pipeline's batch order, (null, cond) if True else (cond, null)

    def to(self, device) -> "Teacher": ...  # move every frozen part (denoiser, VAE, text encoders); returns self

    def condition(self, batch: dict) -> dict[str, Tensor]: ...

    def null_condition(self, cond: dict[str, Tensor]) -> dict[str, Tensor]: ...

    def head_condition(self, cond: dict[str, Tensor]) -> Tensor | None: ...

    def encode_images(self, images: Tensor) -> Tensor: ...

    def decode(self, x0: Tensor, clamp: bool = True) -> Tensor: ...  # images in [0, 1]; clamp=False keeps values outside

    def output(self, denoiser: nn.Module, x_t: Tensor, t: Tensor, cond: dict[str, Tensor]) -> Tensor: ...  # raw, unguided

    def bottleneck(self, denoiser: nn.Module) -> nn.Module: ...

    def bottleneck_channels(self) -> int: ...

    def feature_modules(self, denoiser: nn.Module) -> list[nn.Module]: ...  # outputs: [B, C_i, H_i, W_i] (first of a tuple)

    def feature_channels(self) -> list[int]: ...


COND_PREFIX = "cond."


def cached_condition(batch: dict) -> dict[str, Tensor] | None:
    """The conditioning stored in a cached batch (its ``cond.<key>`` entries), or None."""
    cond = {key[len(COND_PREFIX):]: value for key, value in batch.items() if key.startswith(COND_PREFIX)}
    return cond or None
