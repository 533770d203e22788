"""CLIP image embeddings for CMMD (Jayasumana et al. 2024): images [N, C, H, W] in [0, 1] ->
L2-normalised embeddings [N, D].

The preprocessing follows the paper's reference code (google-research ``cmmd``): centre
crop to a square, bicubic antialiased resize to the vision tower's input size, CLIP's
mean / std normalisation, then the projected image embedding, normalised to unit length.
The paper's model is CLIP ViT-L/14 at 336 px (``openai/clip-vit-large-patch14-336``, 768-d).

``ClipImageFeatures`` has the feature extractors' interface (``distill.features``):
``forward(images) -> [N, D]`` and ``identity`` (keys the reference-feature cache), so
``distill.features.extract`` and ``distill.evaluate.reference_features`` take it as they are.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distill.features import weights_identity

CMMD_CLIP = "openai/clip-vit-large-patch14-336"  # the paper's embedding model


def clip_inputs(images: Tensor, size: int, mean: tuple, std: tuple) -> Tensor:
    """[N, C, H, W] in [0, 1] -> CLIP pixel values [N, 3, size, size]: grey repeated to RGB,
    the centred square crop, resized (bicubic, antialiased) and normalised."""
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    h, w = images.shape[-2:]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    images = images[..., top : top + side, left : left + side].float()
    if side != size:
        images = F.interpolate(images, size=(size, size), mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
    mean = torch.tensor(mean, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(std, device=images.device).view(1, 3, 1, 1)
    return (images - mean) / std


class ClipImageFeatures(nn.Module):
    """Unit-length CLIP image embeddings (the vision tower's pooled output through the visual
    projection) of a transformers ``CLIPModel`` or ``CLIPVisionModelWithProjection``."""

    def __init__(self, name_or_path: str = CMMD_CLIP):
        super().__init__()
        from transformers import AutoConfig, CLIPImageProcessor, CLIPModel, CLIPVisionModelWithProjection

        try:
            config = AutoConfig.from_pretrained(name_or_path)
            cls = CLIPVisionModelWithProjection if config.model_type == "clip_vision_model" else CLIPModel
            self.model = cls.from_pretrained(name_or_path, use_safetensors=True).eval().requires_grad_(False)
        except OSError as err:
            raise FileNotFoundError(f"could not load CLIP from {name_or_path!r} (local directory or hub id): {err}") from err
        vision_config = getattr(self.model.config, "vision_config", self.model.config)
        self.size = vision_config.image_size
        try:
            processor = CLIPImageProcessor.from_pretrained(name_or_path)
            self.mean, self.std = tuple(processor.image_mean), tuple(processor.image_std)
        except (OSError, ValueError):  # no preprocessor_config.json: OpenAI's statistics, which every CLIP uses
            from transformers.utils.constants import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

            self.mean, self.std = tuple(OPENAI_CLIP_MEAN), tuple(OPENAI_CLIP_STD)
        self.identity = f"clip:{weights_identity(name_or_path)}:{self.size}"

    def forward(self, images: Tensor) -> Tensor:
        pixels = clip_inputs(images, self.size, self.mean, self.std).to(next(self.model.parameters()).device)
        # vision tower + projection, not get_image_features: its return type changed in transformers 5
        pooled = self.model.vision_model(pixel_values=pixels).pooler_output
        return F.normalize(self.model.visual_projection(pooled), dim=-1)
