"""Adapter for diffusers pixel-space ``UNet2DModel`` checkpoints (DDPMPipeline layout).

Unconditional or class-conditional. A class-conditional checkpoint reserves its last class
embedding (index ``num_class_embeds - 1``) as the null class that classifier-free guidance
uses; the digits teacher is trained with labels dropped to it.
"""

from __future__ import annotations

import torch
from diffusers import DDPMScheduler, UNet2DModel
from torch import Tensor, nn

from distill.schedules import schedule_from_config
from distill.teachers.base import UNET_LORA_TARGETS, TeacherBase, component_class


class PixelUNetTeacher(TeacherBase):
    family = "pixel-space UNet2DModel pipelines (DDPMPipeline)"
    component, kohya_prefix, lora_target_modules = "unet", "lora_unet", UNET_LORA_TARGETS
    # DDPMPipeline feeds the scheduler's step the raw noise and latents
    scales_initial_noise = scales_model_input = False

    @classmethod
    def reads(cls, index: dict) -> bool:
        return component_class(index, "unet") == "UNet2DModel"

    def __init__(self, unet: UNet2DModel, scheduler_config: dict, image_size: int | None = None):
        self.denoiser = unet.requires_grad_(False).eval()
        self.scheduler_config = dict(scheduler_config)
        self.schedule = schedule_from_config(self.scheduler_config)
        self.prediction_type = self.schedule.prediction_type
        num_embeds = unet.config.num_class_embeds
        self.num_classes = num_embeds - 1 if num_embeds else None
        self.null_class = num_embeds - 1 if num_embeds else None
        size = unet.config.sample_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        self.sample_shape = (unet.config.in_channels, *size)
        if image_size is not None and (image_size, image_size) != size:
            raise ValueError(f"this pixel UNet works at {size[0]}x{size[1]}, not {image_size}")
        self.image_size = size
        self.head_condition_dim = None
        # classifier-free guidance with the null class; DDPMPipeline has no guidance, so no order to follow
        self.guidance, self.null_first = ("cfg" if self.num_classes else None), False

    def to(self, device) -> "PixelUNetTeacher":
        self.denoiser.to(device)
        return self

    @classmethod
    def from_pipeline(cls, pipe, image_size: int | None = None) -> "PixelUNetTeacher":
        """The adapter over an already loaded pipeline's ``unet`` and ``scheduler``."""
        return cls(pipe.unet, {**pipe.scheduler.config, "_class_name": type(pipe.scheduler).__name__}, image_size)

    @classmethod
    def from_pretrained(cls, path: str, revision: str | None = None, dtype: torch.dtype = torch.float32,
                        image_size: int | None = None) -> "PixelUNetTeacher":
        unet = UNet2DModel.from_pretrained(path, subfolder="unet", revision=revision, use_safetensors=True, torch_dtype=dtype)
        scheduler_config = DDPMScheduler.load_config(  # the raw dict, whatever its class
            path, subfolder="scheduler", revision=revision)
        return cls(unet, scheduler_config, image_size)

    # conditioning ---------------------------------------------------------------------
    def condition(self, batch: dict) -> dict[str, Tensor]:
        if self.num_classes is None:
            return {}
        return {"class_labels": batch["class_label"].long()}

    def null_condition(self, cond: dict[str, Tensor]) -> dict[str, Tensor]:
        if self.num_classes is None:
            return cond
        return {"class_labels": torch.full_like(cond["class_labels"], self.null_class)}

    def head_condition(self, cond: dict[str, Tensor]) -> Tensor | None:
        return cond.get("class_labels")

    # data space -------------------------------------------------------------------------
    def encode_images(self, images: Tensor) -> Tensor:
        """Images in [-1, 1] -> x0 (pixel space: unchanged)."""
        return images

    def decode(self, x0: Tensor, clamp: bool = True) -> Tensor:
        """x0 -> images in [0, 1] (as diffusers' pipelines output them); ``clamp=False`` keeps
        values outside [0, 1], e.g. to count them."""
        images = x0 / 2 + 0.5
        return images.clamp(0, 1) if clamp else images

    # the network --------------------------------------------------------------------------
    def output(self, denoiser: nn.Module, x_t: Tensor, t: Tensor, cond: dict[str, Tensor]) -> Tensor:
        """Raw model output [B, C, H, W], float32, in the checkpoint's prediction type. The input
        is cast to the denoiser's dtype (a half-precision teacher, a float32 trainable copy)."""
        t = t.expand(x_t.shape[0]) if t.dim() == 1 and t.numel() == 1 else t
        return denoiser(x_t.to(denoiser.dtype), t, class_labels=cond.get("class_labels")).sample.float()

    def bottleneck(self, denoiser: nn.Module) -> nn.Module:
        return denoiser.mid_block

    def bottleneck_channels(self) -> int:
        return self.denoiser.config.block_out_channels[-1]

    def feature_modules(self, denoiser: nn.Module) -> list[nn.Module]:
        """Modules whose outputs are the denoiser's features for a discriminator (LADD): each
        down block's output, then the bottleneck."""
        return [*denoiser.down_blocks, denoiser.mid_block]

    def feature_channels(self) -> list[int]:
        channels = list(self.denoiser.config.block_out_channels)
        return [*channels, channels[-1]]
