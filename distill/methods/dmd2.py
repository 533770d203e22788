"""DMD2 (Yin et al. 2024, "Improved Distribution Matching Distillation for Fast Image Synthesis").

Generator phase: distribution matching (DMD, Yin et al. 2023, eq. 7) between the frozen
teacher with guidance (real score) and an online fake score, plus an optional GAN term
from a head on the fake score's bottleneck. Critic phase: the fake score's denoising loss
on student samples, the head's discriminator loss on noised real and student samples, and
an optional R1 (exact, or approximated as in APT, Lin et al. 2025). The trainer runs
``critic_updates`` critic phases per generator phase (two time-scale update rule).

In the papers' terms: the real score mu_real is the frozen teacher with guidance, the fake
score mu_fake the online fake-score network (both ``Denoiser``s), G the student.

Every random draw comes from the ``generator`` argument, so a step is reproducible.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from distill.denoiser import Denoiser, cat_conditions
from distill.discriminators import Heads, can_stop_early, capture
from distill.losses import denoising_loss, discriminator_adversarial_loss, dmd_loss, generator_adversarial_loss
from distill.methods.base import METHOD_NAME_HELP, AdversarialMethodConfig, GanConfig
from distill.methods.common import (AdversarialMethod, randn_like, real_x0, regularised_inputs, regulariser_context,
                                    student_x0)
from distill.sections import LoraConfig, check_not_negative, fail, setting
from distill.students import lora_config


@dataclass
class DMD2GanConfig(GanConfig):
    """DMD2's GAN term: a head on the fake score's bottleneck by default (backbone fake_score)."""

    critic_weight: float = setting(1.0, "weight of the discriminator's GAN loss in the critic loss")


@dataclass
class DMD2Config(AdversarialMethodConfig):
    """``method.name: dmd2``."""

    paper_gan_loss = "non_saturating"

    name: str = setting("dmd2", METHOD_NAME_HELP)
    critic_updates: int = setting(
        5, "critic updates (fake score and GAN head) per student update: DMD2's two time-scale update rule")
    gan: DMD2GanConfig = setting(DMD2GanConfig(), "the GAN term (a head on the fake score's bottleneck, or a "
                                                  "discriminator of its own) and its discriminator")
    dmd_weight: float = setting(1.0, "weight of the distribution-matching loss in the generator loss")
    renoise_floor: bool = setting(
        True, "multi-step students: match step k's samples (distribution matching and the fake score's training) "
        "only at timesteps at or above step k + 1's, the noise level the sampler re-noises them to: only their "
        "re-noised distribution reaches the next step. The last step's samples are matched over [t_min, t_max]. "
        "false: every step over [t_min, t_max], as DMD2's code does (on the digits teacher its 4-step student then "
        "swung between FD 3 and 20 where this one held 1.2-1.7)")
    fake_score_lora: LoraConfig = setting(
        LoraConfig(), "train the fake score as a LoRA (rank > 0); with a LoRA student too, teacher, student and "
        "fake score share one frozen base"
    )

    def check(self, *, num_steps: int, backward_simulation: bool) -> None:
        super().check(num_steps=num_steps, backward_simulation=backward_simulation)
        check_not_negative({"method.dmd_weight": self.dmd_weight})
        d = self.gan.discriminator
        if d.backbone != "fake_score" and self.gan.weight == 0:
            fail("method.gan.discriminator.backbone",
                 f"a {d.backbone} discriminator serves DMD2's GAN term, but method.gan.weight is 0")
        if d.augment:
            fail("method.gan.discriminator.augment", "augmentation is implemented for ADD only")
        self.fake_score_lora.check("method.fake_score_lora")

    def needs_real_images(self, *, num_steps: int, backward_simulation: bool) -> bool:
        return self.gan.weight > 0 or (num_steps > 1 and not backward_simulation)

    def build(self, *, teacher, sampler, guidance_scale: float, backward_simulation: bool) -> "DMD2":
        g, lora = self.gan, self.fake_score_lora
        return DMD2(**self.adversarial_settings(), teacher=teacher, sampler=sampler, guidance_scale=guidance_scale,
                    dmd_weight=self.dmd_weight, critic_gan_weight=g.critic_weight, backward_simulation=backward_simulation,
                    renoise_floor=self.renoise_floor,
                    fake_score_lora=lora_config(rank=lora.rank, alpha=lora.alpha, target_modules=lora.target_modules))


class Critic(nn.Module):
    """The fake score network, plus the GAN discriminator: ``Heads`` on the fake score's
    bottleneck feature map, or a separate ``Discriminator`` (frozen DINOv2 or teacher
    features with the same heads) that reads clean samples ``disc = (x0, t, noise, cond)``.

    One forward returns both, so DDP sees a single forward per backward.
    """

    def __init__(self, denoiser: nn.Module, teacher, head: nn.Module | None = None,
                 discriminator: nn.Module | None = None):
        super().__init__()
        self.denoiser = denoiser
        self.head = head
        self.discriminator = discriminator
        self._teacher = teacher  # adapter: how to call the denoiser and find its bottleneck

    def forward(self, x_t: Tensor | None, t: Tensor | None, cond: dict[str, Tensor], with_logits: bool = False,
                disc: tuple | None = None):
        """(model output [B, C, H, W] of ``x_t``, or None when ``x_t`` is None; logits [B', K] or None).

        ``with_logits``: the discriminator's logits. A separate discriminator reads ``disc =
        (x0, t, noise, cond)``, clean samples. Heads on the bottleneck read every input the fake
        score sees: ``x_t`` (its forward reaches the bottleneck anyway), then ``disc = (x_t, t,
        cond)`` when given, in that order; ``disc``'s forward ends at the bottleneck (see
        ``can_stop_early``), since only the logits are wanted of it."""
        if not with_logits:
            return self._teacher.output(self.denoiser, x_t, t, cond), None
        if self.discriminator is not None:
            output = self._teacher.output(self.denoiser, x_t, t, cond) if x_t is not None else None
            return output, self.discriminator(*disc)
        if self.head is None:
            raise ValueError("this critic has no GAN head (method.gan.weight is 0)")
        bottleneck = [self._teacher.bottleneck(self.denoiser)]
        output, features = None, []
        if x_t is not None:
            output, features = capture(bottleneck, lambda: self._teacher.output(self.denoiser, x_t, t, cond), stop=False)
        if disc is not None:
            d_x, d_t, d_cond = disc
            _, disc_features = capture(bottleneck, lambda: self._teacher.output(self.denoiser, d_x, d_t, d_cond),
                                       stop=can_stop_early(self.denoiser))
            features = features + disc_features
        conds = ([cond] if x_t is not None else []) + ([disc[2]] if disc is not None else [])
        return output, self.head([torch.cat(features)], self._teacher.head_condition(cat_conditions(conds)))


class DMD2(AdversarialMethod):
    with_fake_score = True

    def __init__(self, *, dmd_weight: float, critic_gan_weight: float, backward_simulation: bool,
                 renoise_floor: bool, fake_score_lora=None, **adversarial):
        """``adversarial``: ``AdversarialMethod``'s settings; ``fake_score_lora``: the fake
        score's peft ``LoraConfig`` (None: a full copy of the teacher's network)."""
        super().__init__(**adversarial)
        self.dmd_weight, self.critic_gan_weight = dmd_weight, critic_gan_weight
        self.backward_simulation, self.renoise_floor = backward_simulation, renoise_floor
        self.fake_score_lora = fake_score_lora
        self.separate_discriminator = self.discriminator_backbone != "fake_score"

    @property
    def uses_gan(self) -> bool:
        return self.gan_weight > 0

    def build_critic(self, *, fake_score: nn.Module, device) -> Critic:
        """The fake score with the GAN discriminator: heads on its bottleneck, or a
        discriminator of its own (none without the GAN term)."""
        discriminator = head = None
        if self.uses_gan and self.separate_discriminator:
            discriminator = self._discriminator(device)
        elif self.uses_gan:
            head = Heads("maps", [self.teacher.bottleneck_channels()], width=self.head_width,
                         num_classes=self.teacher.num_classes, cond_dim=self.teacher.head_condition_dim)
        return Critic(fake_score, self.teacher, head, discriminator)

    # ------------------------------------------------------------------------------------
    def _real_x0(self, batch: dict, device) -> Tensor:
        return real_x0(self.teacher, batch).to(device)

    def student_x0(self, student: nn.Module, batch: dict, cond: dict, generator: torch.Generator,
                   grad: bool) -> tuple[Tensor, int]:
        return student_x0(self.teacher, self.sampler, student, batch, cond, generator, grad=grad,
                          backward_simulation=self.backward_simulation)

    def _floored(self, k: int) -> bool:
        """Whether step ``k``'s samples are matched from step k + 1's timestep up (``renoise_floor``;
        never the last step's)."""
        return self.renoise_floor and k + 1 < len(self.sampler)

    def _step_timesteps(self, n: int, k: int, generator: torch.Generator, device) -> Tensor:
        """Timesteps at which step ``k``'s samples are re-noised for distribution matching and the
        fake score: [t_min, t_max], or from step k + 1's timestep up where ``_floored(k)``."""
        if not self._floored(k):
            return self._timesteps(n, generator, device)
        t_min = min(max(self.t_min, self.sampler.timesteps[k + 1]), self.t_max)
        return self.schedule.sample_timesteps(n, generator=generator, t_min=t_min, t_max=self.t_max, device=device)

    def _logits(self, critic: Critic, x0: Tensor, t: Tensor, noise: Tensor, cond: dict) -> Tensor:
        """The discriminator's logits on x0 (noised to t with ``noise`` where it reads noisy inputs)."""
        if self.separate_discriminator:
            return critic(None, None, cond, with_logits=True, disc=(x0, t, noise, cond))[1]
        return critic(None, None, cond, with_logits=True, disc=(self.schedule.add_noise(x0, noise, t), t, cond))[1]

    # ------------------------------------------------------------------------------------
    def generator_loss(self, student: nn.Module, critic: Critic, batch: dict, generator: torch.Generator, device) -> tuple[Tensor, dict]:
        """Generator phase. ``student`` trains (a prepared module); ``critic`` is frozen."""
        cond, batch = self._on_device(batch, device)
        x0_student, k = self.student_x0(student, batch, cond, generator, grad=True)

        t = self._step_timesteps(len(x0_student), k, generator, device)
        noise = randn_like(x0_student, generator)
        mu_fake = Denoiser(self.teacher, critic.denoiser)
        with torch.no_grad():
            x_t = self.schedule.add_noise(x0_student.detach(), noise, t)
            x0_real = self.mu_real.x0(x_t, t, cond)
            x0_fake = mu_fake.x0(x_t, t, cond)
        loss_dmd, logs = dmd_loss(x0_student, x0_real, x0_fake)
        terms = {"dmd": self.dmd_weight * loss_dmd}

        if self.uses_gan:
            t_gan = self._gan_timesteps(len(x0_student), generator, device)
            logits_fake = self._logits(critic, x0_student, t_gan, randn_like(x0_student, generator), cond)
            logits_real = None
            if self.gan_loss == "relativistic":
                with torch.no_grad():
                    x0 = self._real_x0(batch, device)
                    logits_real = self._logits(critic, x0, t_gan, randn_like(x0, generator), cond)
            loss_gan, gan_logs = generator_adversarial_loss(logits_fake, logits_real, kind=self.gan_loss)
            terms["gan"] = self.gan_weight * loss_gan
            logs.update(gan_logs)
        return self._generator_result(x0_student, terms, logs)

    def critic_loss(self, student: nn.Module, critic: nn.Module, batch: dict, generator: torch.Generator, device) -> tuple[Tensor, dict]:
        """Critic phase. ``critic`` trains (a prepared module); ``student`` only samples."""
        cond, batch = self._on_device(batch, device)
        x0_student, k = self.student_x0(student, batch, cond, generator, grad=False)
        n = len(x0_student)
        t = self._step_timesteps(n, k, generator, device)
        noise = randn_like(x0_student, generator)
        x_t = self.schedule.add_noise(x0_student, noise, t)
        # the fake score's target, in its prediction type: the teacher's (mu_fake's default)
        target = self.schedule.target(x0_student, noise, t, self.teacher.prediction_type)
        if not self.uses_gan:
            output, _ = critic(x_t, t, cond)
            loss, logs = denoising_loss(output, target)
            logs["critic_loss"] = loss.detach()
            return loss, logs

        x0_real = self._real_x0(batch, device)
        t_real = self._gan_timesteps(n, generator, device)
        noise_real = randn_like(x0_real, generator)
        # student samples reach the discriminator at the fake score's timesteps t, or at their own
        # when the GAN's range differs (method.gan.t_min / t_max)
        # (so also when the re-noise floor raised the fake score's: reals must meet fakes at the same levels)
        t_fake = self._gan_timesteps(n, generator, device) if self.separate_gan_timesteps or self._floored(k) else t
        # the discriminator's inputs: noised samples through the fake score's bottleneck, or
        # clean samples (with their noise and timesteps) through a separate discriminator
        if self.separate_discriminator:
            fake, real = x0_student, x0_real
        else:
            fake = x_t if t_fake is t else self.schedule.add_noise(x0_student, noise, t_fake)
            real = self.schedule.add_noise(x0_real, noise_real, t_real)
        inputs = regularised_inputs(self.r1_kind, fake, real, self.r1_sigma, generator)
        times = torch.cat([t_fake, t_real, t_real][: len(inputs)])
        all_conds = cat_conditions([cond] * len(inputs)) if cond else {}
        with regulariser_context(self.r1_kind, device):
            if self.separate_discriminator:
                disc = (torch.cat(inputs), times, torch.cat([noise, noise_real, noise_real][: len(inputs)]), all_conds)
                output, logits = critic(x_t, t, cond, with_logits=True, disc=disc)
            elif t_fake is t:  # the fake score's own forward on x_t gives the fake logits too
                rest = (torch.cat(inputs[1:]), times[n:], cat_conditions([cond] * (len(inputs) - 1)) if cond else {})
                output, logits = critic(inputs[0], t, cond, with_logits=True, disc=rest)  # R2: the leaf it differentiates at
            else:  # x_t for the denoising loss, then the discriminator's inputs
                output, logits = critic(x_t, t, cond, with_logits=True, disc=(torch.cat(inputs), times, all_conds))
                logits = logits[n:]
        loss, logs = denoising_loss(output[:n], target)
        logits_fake, logits_real = logits[:n], logits[n : 2 * n]
        loss_d, d_logs = discriminator_adversarial_loss(logits_real, logits_fake, kind=self.gan_loss)
        loss = loss + self.critic_gan_weight * loss_d
        logs.update(d_logs)
        return self._critic_result(loss, logs, logits, inputs, generator)
