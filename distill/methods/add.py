"""ADD (Sauer et al. 2023, "Adversarial Diffusion Distillation") and LADD (Sauer et al. 2024,
"Fast High-Resolution Image Synthesis with Latent Adversarial Diffusion Distillation").

Generator phase (ADD eq. 5): the adversarial loss of the student's samples under a
discriminator (frozen backbone + trainable heads), plus ``distill_weight`` times the score
distillation loss (eq. 4): the distance between the student's x0 and the teacher's x0
estimate of it re-noised to a random t, weighted by c(t). LADD is this with the teacher's
own features as the discriminator backbone and no distillation term (``distill_weight=0``).
Critic phase: the discriminator's loss on real images against student samples, plus an
optional regulariser: approximated R1 (APT), exact R1 or R2 (R3GAN).

Every random draw comes from the ``generator`` argument, so a step is reproducible.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from distill.denoiser import cat_conditions
from distill.discriminators.backbones import Discriminator, translate_and_cutout
from distill.losses import (
    discriminator_adversarial_loss,
    distillation_weight,
    generator_adversarial_loss,
    score_distillation_loss,
)
from distill.methods.base import METHOD_NAME_HELP, AdversarialMethodConfig, DiscriminatorConfig, GanConfig
from distill.methods.common import (AdversarialMethod, randn_like, real_x0, regularised_inputs, regulariser_context,
                                    student_x0)
from distill.sections import check_not_negative, fail, setting


@dataclass
class ADDConfig(AdversarialMethodConfig):
    """``method.name: add``: a DINOv2 discriminator and score distillation, as the ADD paper."""

    paper_gan_loss = "hinge"

    name: str = setting("add", METHOD_NAME_HELP)
    critic_updates: int = setting(1, "discriminator updates per student update")
    gan: GanConfig = setting(GanConfig(weight=1.0, discriminator=DiscriminatorConfig(backbone="dinov2")),
                             "the adversarial term and its discriminator (dinov2 or teacher features)")
    distill_weight: float = setting(2.5, "weight (lambda) of the score-distillation loss (0: none, as LADD)")
    distill_weighting: Literal["exponential", "sds", "constant"] = setting(
        "exponential", "c(t) of the score-distillation loss: alpha_t, alpha_t*sigma_t (SDS) or 1"
    )

    def check(self, *, num_steps: int, backward_simulation: bool) -> None:
        super().check(num_steps=num_steps, backward_simulation=backward_simulation)
        if self.gan.discriminator.backbone == "fake_score":
            fail("method.gan.discriminator.backbone", "ADD has no fake score network: choose dinov2 or teacher")
        if self.gan.weight == 0:
            fail("method.gan.weight", "ADD's adversarial term needs method.gan.weight > 0")
        check_not_negative({"method.distill_weight": self.distill_weight})

    def needs_real_images(self, *, num_steps: int, backward_simulation: bool) -> bool:
        return True  # the discriminator's positives, and the inputs of the student's later steps

    def build(self, *, teacher, sampler, guidance_scale: float, backward_simulation: bool) -> "ADD":
        return ADD(**self.adversarial_settings(), teacher=teacher, sampler=sampler, guidance_scale=guidance_scale,
                   distill_weight=self.distill_weight, distill_weighting=self.distill_weighting,
                   augment=self.gan.discriminator.augment)


@dataclass
class LADDConfig(ADDConfig):
    """``method.name: ladd``: ADD with the frozen teacher's own features as the discriminator
    backbone and no distillation term (LADD, Sauer et al. 2024)."""

    name: str = setting("ladd", METHOD_NAME_HELP)
    gan: GanConfig = setting(GanConfig(weight=1.0, discriminator=DiscriminatorConfig(backbone="teacher")),
                             "the adversarial term and its discriminator (the teacher's features, or dinov2)")
    distill_weight: float = setting(0.0, "weight (lambda) of ADD's score-distillation loss (LADD: 0, none)")


class ADD(AdversarialMethod):
    """ADD's and LADD's losses; the critic is a ``Discriminator`` (no fake score)."""

    def __init__(self, *, distill_weight: float, distill_weighting: str, augment: bool, **adversarial):
        """``adversarial``: ``AdversarialMethod``'s settings."""
        super().__init__(**adversarial)
        self.distill_weight, self.distill_weighting = distill_weight, distill_weighting
        self.augment = augment

    def build_critic(self, *, fake_score: None, device) -> Discriminator:
        return self._discriminator(device)

    def _augment(self, x0: Tensor, generator: torch.Generator) -> Tensor:
        return translate_and_cutout(x0, generator) if self.augment else x0

    def _x0(self, student: nn.Module, batch: dict, cond: dict, generator: torch.Generator, grad: bool) -> Tensor:
        return student_x0(self.teacher, self.sampler, student, batch, cond, generator, grad=grad, backward_simulation=False)[0]

    # ------------------------------------------------------------------------------------
    def generator_loss(self, student: nn.Module, critic: Discriminator, batch: dict, generator: torch.Generator, device) -> tuple[Tensor, dict]:
        """Generator phase. ``student`` trains (a prepared module); ``critic`` is frozen."""
        cond, batch = self._on_device(batch, device)
        x0_student = self._x0(student, batch, cond, generator, grad=True)
        n = len(x0_student)

        t = self._gan_timesteps(n, generator, device)
        noise = randn_like(x0_student, generator)
        logits_fake = critic(self._augment(x0_student, generator), t, noise, cond)
        logits_real = None
        if self.gan_loss == "relativistic":
            with torch.no_grad():
                x0_real = self._augment(real_x0(self.teacher, batch), generator)
                logits_real = critic(x0_real, t, randn_like(x0_real, generator), cond)
        loss_gan, logs = generator_adversarial_loss(logits_fake, logits_real, kind=self.gan_loss)
        terms = {"gan": self.gan_weight * loss_gan}

        if self.distill_weight > 0:
            t_d = self._timesteps(n, generator, device)
            with torch.no_grad():
                x_t = self.schedule.add_noise(x0_student.detach(), randn_like(x0_student, generator), t_d)
                x0_teacher = self.mu_real.x0(x_t, t_d, cond)
            alpha, sigma = self.schedule.alpha_sigma(t_d, ndim=1)
            weight = distillation_weight(self.distill_weighting, alpha.to(device), sigma.to(device))
            loss_distill, distill_logs = score_distillation_loss(x0_student, x0_teacher, weight)
            terms["distill"] = self.distill_weight * loss_distill
            logs.update(distill_logs)
        return self._generator_result(x0_student, terms, logs)

    def critic_loss(self, student: nn.Module, critic: nn.Module, batch: dict, generator: torch.Generator, device) -> tuple[Tensor, dict]:
        """Critic phase: real images against student samples, in one discriminator forward."""
        cond, batch = self._on_device(batch, device)
        x0_fake = self._augment(self._x0(student, batch, cond, generator, grad=False), generator)
        x0_real = self._augment(real_x0(self.teacher, batch), generator)
        n = len(x0_fake)
        t = self._gan_timesteps(2 * n, generator, device)
        noise = randn_like(torch.cat([x0_fake, x0_real]), generator)
        inputs = regularised_inputs(self.r1_kind, x0_fake, x0_real, self.r1_sigma, generator)
        if len(inputs) == 3:  # APT's perturbed real inputs keep the real inputs' timesteps and noise
            t, noise = torch.cat([t, t[n:]]), torch.cat([noise, noise[n:]])
        with regulariser_context(self.r1_kind, device):
            logits = critic(torch.cat(inputs), t, noise, cat_conditions([cond] * len(inputs)) if cond else {})
        loss, logs = discriminator_adversarial_loss(logits[n : 2 * n], logits[:n], kind=self.gan_loss)
        return self._critic_result(loss, logs, logits, inputs, generator)
