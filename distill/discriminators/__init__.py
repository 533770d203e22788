"""Discriminators: frozen feature backbones with small trainable heads."""

from distill.discriminators.heads import BottleneckHead

__all__ = ["BottleneckHead"]
