"""Trainable discriminator heads over frozen or shared features.

``TokenHead`` and ``MapHead`` are ADD-style per-layer heads (StyleGAN-T, Sauer et al. 2023):
spectrally normalised 1D convolutions over a ViT's tokens, or 2D convolutions over a UNet's
feature maps, giving one logit per token or position; ``Heads`` holds one per backbone
layer. Every discriminator backbone uses them: DINOv2's tokens, the teacher's feature maps
(LADD) and DMD2's fake-score bottleneck.
All condition by projection (Miyato & Koyama 2018): ``<embed(y), h>`` is added to the
logits, where ``y`` is a class index [B] (long) or a pooled conditioning vector [B, D].
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.utils.parametrizations import spectral_norm


def _condition_embedding(width: int, num_classes: int | None, cond_dim: int | None) -> nn.Module | None:
    if num_classes is not None:
        return nn.Embedding(num_classes + 1, width)  # + the null class
    if cond_dim is not None:
        return nn.Linear(cond_dim, width)
    return None


class _ConvHead(nn.Module):
    """conv(1x1) -> LeakyReLU -> conv(k) -> LeakyReLU -> conv(1x1) to one logit per position,
    every convolution spectrally normalised, plus the projection term per position."""

    def __init__(self, conv: type, channels: int, width: int, kernel: int, num_classes, cond_dim):
        super().__init__()
        self.body = nn.Sequential(
            spectral_norm(conv(channels, width, 1)), nn.LeakyReLU(0.2),
            spectral_norm(conv(width, width, kernel, padding=kernel // 2)), nn.LeakyReLU(0.2),
        )
        self.out = spectral_norm(conv(width, 1, 1))
        self.embed = _condition_embedding(width, num_classes, cond_dim)

    def forward(self, features: Tensor, cond: Tensor | None = None) -> Tensor:
        h = self.body(features.float())
        logits = self.out(h).flatten(1)  # [B, positions]
        if self.embed is not None and cond is not None:
            e = self.embed(cond).view(h.shape[0], h.shape[1], *([1] * (h.dim() - 2)))
            logits = logits + (e * h).sum(dim=1).flatten(1) / h.shape[1] ** 0.5
        return logits


class TokenHead(_ConvHead):
    """Per-token logits [B, N] from ViT tokens [B, N, C] (1D convolutions over the tokens)."""

    def __init__(self, channels: int, *, width: int, kernel: int = 9, num_classes: int | None = None, cond_dim: int | None = None):
        super().__init__(nn.Conv1d, channels, width, kernel, num_classes, cond_dim)

    def forward(self, features: Tensor, cond: Tensor | None = None) -> Tensor:
        return super().forward(features.transpose(1, 2), cond)


class MapHead(_ConvHead):
    """Per-position logits [B, H*W] from feature maps [B, C, H, W] (2D convolutions)."""

    def __init__(self, channels: int, *, width: int, kernel: int = 3, num_classes: int | None = None, cond_dim: int | None = None):
        super().__init__(nn.Conv2d, channels, width, kernel, num_classes, cond_dim)


class Heads(nn.Module):
    """One head per backbone layer; logits of all layers concatenated: [B, sum of positions]."""

    def __init__(self, kind: str, channels: list[int], *, width: int, num_classes: int | None = None, cond_dim: int | None = None):
        super().__init__()
        head = {"tokens": TokenHead, "maps": MapHead}[kind]
        self.heads = nn.ModuleList(head(c, width=width, num_classes=num_classes, cond_dim=cond_dim) for c in channels)

    def forward(self, features: list[Tensor], cond: Tensor | None = None) -> Tensor:
        if len(features) != len(self.heads):
            raise ValueError(f"{len(self.heads)} heads got features of {len(features)} layers")
        return torch.cat([head(f, cond) for head, f in zip(self.heads, features)], dim=1)
