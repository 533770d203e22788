"""Trainable discriminator heads over frozen or shared features."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class BottleneckHead(nn.Module):
    """A small conv head on a UNet bottleneck feature map [B, C, h, w] -> logits [B].

    The GAN classifier of DMD2 sits on the fake score network's bottleneck; with a
    condition it adds a projection term <embed(y), h> (Miyato & Koyama 2018), where ``y``
    is a class index [B] (long) or a pooled conditioning vector [B, D] (float).
    """

    def __init__(self, channels: int, num_classes: int | None = None, cond_dim: int | None = None):
        super().__init__()
        groups = next(g for g in (32, 16, 8, 4, 2, 1) if channels % g == 0)
        self.body = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1),
            nn.GroupNorm(groups, channels),
            nn.SiLU(),
            nn.Conv2d(channels, channels, 3, padding=1),
            nn.SiLU(),
        )
        self.out = nn.Linear(channels, 1)
        self.embed = None
        if num_classes is not None:
            self.embed = nn.Embedding(num_classes + 1, channels)  # + the null class
        elif cond_dim is not None:
            self.embed = nn.Linear(cond_dim, channels)

    def forward(self, features: Tensor, cond: Tensor | None = None) -> Tensor:
        h = self.body(features.float()).mean(dim=(2, 3))
        logits = self.out(h).squeeze(1)
        if self.embed is not None and cond is not None:
            logits = logits + (self.embed(cond) * h).sum(dim=1) / h.shape[1] ** 0.5
        return logits
