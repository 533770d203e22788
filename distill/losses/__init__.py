"""Loss functions for diffusion distillation (DMD2, ADD/APT).

Every loss is a pure function: tensors in, ``(loss, logs)`` out, where ``loss`` is a
scalar tensor carrying grad and ``logs`` maps names to detached scalar tensors.
"""

from distill.losses.adversarial import (
    ADVERSARIAL_LOSSES,
    discriminator_adversarial_loss,
    generator_adversarial_loss,
)
from distill.losses.distillation import DISTILL_WEIGHTINGS, distillation_weight, score_distillation_loss
from distill.losses.dmd import denoising_loss, dmd_loss
from distill.losses.r1 import REGULARISERS, approximated_r1_penalty, discriminator_penalty, projection_signs, r1_penalty, r2_penalty

__all__ = [
    "ADVERSARIAL_LOSSES",
    "DISTILL_WEIGHTINGS",
    "REGULARISERS",
    "approximated_r1_penalty",
    "denoising_loss",
    "discriminator_penalty",
    "discriminator_adversarial_loss",
    "distillation_weight",
    "dmd_loss",
    "generator_adversarial_loss",
    "projection_signs",
    "r1_penalty",
    "r2_penalty",
    "score_distillation_loss",
]
