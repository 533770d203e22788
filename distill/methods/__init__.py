"""Distillation methods: how losses compose into a generator phase and a critic phase."""

from distill.methods.add import ADD
from distill.methods.dmd2 import DMD2, Critic

__all__ = ["ADD", "DMD2", "Critic"]
