"""Discriminators: frozen feature backbones with small trainable heads."""

from distill.discriminators.backbones import (Discriminator, Dinov2Backbone, can_stop_early, capture, denoiser_features,
                                              translate_and_cutout)
from distill.discriminators.heads import Heads, MapHead, TokenHead

__all__ = ["Dinov2Backbone", "Discriminator", "Heads", "MapHead", "TokenHead", "can_stop_early", "capture",
           "denoiser_features", "translate_and_cutout"]
