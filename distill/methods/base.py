"""What a distillation method is to the rest of the toolkit: a recipe section and a
``Method`` object, found by name in ``METHODS``.

A method registers a recipe-section dataclass (``MethodConfig``): its fields carry defaults
and help, and ``check`` beside them validates values and combinations before any weights
load. ``method.name`` in a recipe picks the section class; the other ``method.*`` keys are
that class's fields. ``section.build(...)`` makes the ``Method`` the trainer runs: the roles
it needs (a fake score or not), its critic (or none) and how many critic updates each student
update takes, and its generator and critic losses. Neither the trainer nor the config loader
names a method.

The GAN settings that several methods share (``GanConfig``: weight, loss, discriminator,
regulariser) are sections here too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Literal, Optional, Protocol

from distill.sections import Timestep, check_not_negative, check_positive, fail, setting

if TYPE_CHECKING:
    import torch
    from peft import LoraConfig as PeftLoraConfig
    from torch import Tensor, nn

METHODS: dict[str, type["MethodConfig"]] = {}  # registered name -> recipe section class
DEFAULT_METHOD = "dmd2"  # what a recipe without method.name trains


def register(name: str, section: type["MethodConfig"]) -> type["MethodConfig"]:
    """Make ``method.name: <name>`` select ``section`` (whose ``name`` defaults to ``name``)."""
    if section().name != name:
        raise ValueError(f"{section.__name__}.name defaults to {section().name!r}, not {name!r}")
    METHODS[name] = section
    return section


class Method(Protocol):
    """What the trainer runs. Losses return ``(loss, logs)``; every random draw comes from
    ``generator``, so a step is reproducible. ``student`` / ``critic`` are the prepared
    (DDP-wrapped) module in the phase that trains it and the unwrapped one otherwise."""

    critic_updates: int  # critic updates per student update; 0: the method has no critic
    with_fake_score: bool  # whether the trainer makes a fake-score role (a trainable copy of the teacher)
    fake_score_lora: "PeftLoraConfig | None"  # that role as a LoRA of the teacher's network; None: a full copy

    def build_critic(self, *, fake_score: "nn.Module | None", device) -> "nn.Module | None": ...

    def generator_loss(self, student: "nn.Module", critic: "nn.Module | None", batch: dict,
                       generator: "torch.Generator", device) -> tuple["Tensor", dict]: ...

    def critic_loss(self, student: "nn.Module", critic: "nn.Module", batch: dict,
                    generator: "torch.Generator", device) -> tuple["Tensor", dict]: ...


METHOD_NAME_HELP = ("the distillation method, a registered name (distill validate --keys lists each one's keys); "
                    "the other method.* keys are that method's own")


@dataclass
class MethodConfig:
    """Every method's section has ``name`` (a subclass defaults it to its registered name)
    and adds its own fields."""

    name: str = setting(DEFAULT_METHOD, METHOD_NAME_HELP)

    def check(self, *, num_steps: int, backward_simulation: bool) -> None:
        """Values and combinations (``fail(key, message)``); ``num_steps``: the student's."""

    def needs_real_images(self, *, num_steps: int, backward_simulation: bool) -> bool:
        """Whether training reads real images (the data must have them)."""
        return False

    def timestep_settings(self) -> dict[str, float]:
        """The settings that name teacher timesteps, by key (checked against the teacher's range)."""
        return {}

    def resolve(self) -> None:
        """Fill settings left null with the method's own choice (written so into config.yaml)."""

    def build(self, *, teacher, sampler, guidance_scale: float, backward_simulation: bool) -> Method:
        raise NotImplementedError


@dataclass
class R1Config:
    kind: Literal["none", "approximated", "exact", "r2"] = setting(
        "none", "regulariser of the discriminator: none, approximated R1 (APT), exact R1 on real inputs, or R2 on generated "
        "inputs (R3GAN)"
    )
    weight: float = setting(
        1.0e-3, "weight (gamma / 2) of the regulariser in the critic loss. Every kind penalises the same quantity, the "
        "mean over the discriminator's logits of each logit's squared input gradient, so one weight means the same for "
        "every regulariser and every head (one logit or hundreds of tokens); see distill/losses/r1.py. 1e-3 changes "
        "DMD2 and ADD little on the digits teacher (docs/ablation.md); 1.0 silences DMD2's head on the fake score "
        "(logit gap under 0.002, docs/benchmarks.md)")
    sigma: float = setting(
        0.01, "std of the Gaussian perturbation of real inputs for approximated R1 (its penalty is the mean squared "
        "change of the logits divided by sigma^2)")

    def check(self) -> None:
        check_not_negative({"method.gan.r1.weight": self.weight})
        if self.kind == "approximated":
            check_positive({"method.gan.r1.sigma": self.sigma})


@dataclass
class DiscriminatorConfig:
    backbone: Literal["fake_score", "dinov2", "teacher"] = setting(
        "fake_score",
        "features the GAN heads read: fake_score (DMD2's fake-score bottleneck), dinov2 (a frozen DINOv2 on decoded "
        "samples, ADD) or teacher (the frozen teacher's denoiser features on noised samples, LADD)",
    )
    dinov2: str = setting("facebook/dinov2-small", "DINOv2 checkpoint (hub id or local dir) of the dinov2 backbone",
                          path="model", used=lambda d: d.backbone == "dinov2")
    layers: list[int] = setting(
        [], "backbone layers the heads read (dinov2: hidden-state indices, [] = 4 evenly spaced; teacher: feature "
        "module indices, [] = all)"
    )
    head_width: int = setting(64, "channels of each per-layer head")
    augment: bool = setting(False, "differentiable translation + cutout of real and generated inputs (DiffAugment), ADD only")

    def check(self) -> None:
        check_positive({"method.gan.discriminator.head_width": self.head_width})


@dataclass
class GanConfig:
    """The adversarial term: its weight in the generator loss, its loss, the discriminator and
    the discriminator's regulariser."""

    weight: float = setting(0.0, "weight of the generator's GAN loss (0 disables the GAN head and needs no real images)")
    loss: Optional[Literal["non_saturating", "hinge", "relativistic"]] = setting(
        None, "adversarial loss of the GAN term; null = the method paper's: non_saturating for dmd2, hinge for add and ladd"
    )
    discriminator: DiscriminatorConfig = setting(DiscriminatorConfig(), "the GAN discriminator: backbone and heads")
    r1: R1Config = setting(R1Config(), "discriminator regulariser")
    t_min: Optional[Timestep] = setting(
        None, "smallest timestep at which the discriminator sees real and generated samples re-noised (null: method.t_min)")
    t_max: Optional[Timestep] = setting(
        None, "largest timestep at which the discriminator sees real and generated samples re-noised (null: method.t_max). "
        "Where little signal is left (small images at high noise) it tells real from fake by noise: a lower t_max "
        "lets it judge what the samples look like")

    max_grad_ratio: Optional[float] = setting(
        None, "cap on the GAN term's pull: where the norm of its gradient at the student's output exceeds this times "
        "that of the other terms (distribution matching, distillation), it is scaled down to it, direction kept "
        "(null: no cap). The ratio is logged as generator/gan_grad_ratio; a critic sharpening on a small real set "
        "makes it climb past 1 late in a run")

    def check(self) -> None:
        check_not_negative({"method.gan.weight": self.weight})
        if self.max_grad_ratio is not None:
            check_positive({"method.gan.max_grad_ratio": self.max_grad_ratio})
        if self.r1.kind != "none" and self.weight == 0:
            fail("method.gan.r1.kind", f"{self.r1.kind!r} regularises the GAN discriminator, but method.gan.weight is 0")
        self.discriminator.check()
        self.r1.check()


@dataclass
class AdversarialMethodConfig(MethodConfig):
    """A method with a critic phase: ``critic_updates`` critic updates per student update,
    student samples re-noised at timesteps in [t_min, t_max], and a GAN term."""

    paper_gan_loss: ClassVar[str]  # method.gan.loss when the recipe leaves it null

    critic_updates: int = setting(1, "critic updates per student update")
    t_min: Timestep = setting(20, "smallest timestep at which student samples are re-noised for the losses and the GAN")
    t_max: Timestep = setting(
        980, "largest timestep at which student samples are re-noised for the losses and the GAN. This and every "
        "t_min / t_max may be a noise level, {sigma: s} or {logsnr: l}, as student.timesteps may")
    gan: GanConfig = setting(GanConfig(), "the GAN term and its discriminator")

    def check(self, *, num_steps: int, backward_simulation: bool) -> None:
        check_positive({"method.critic_updates": self.critic_updates})
        if not 0 <= self.t_min < self.t_max:
            fail("method.t_min", f"need 0 <= t_min < t_max, got {self.t_min} and {self.t_max}")
        gan_min, gan_max = self.gan_timestep_range()
        if not 0 <= gan_min < gan_max:
            fail("method.gan.t_min", f"need 0 <= t_min < t_max, got {gan_min} and {gan_max}")
        self.gan.check()

    def gan_timestep_range(self) -> tuple[int, int]:
        """The discriminator's re-noising timesteps: method.gan.t_min / t_max, null ones the method's."""
        g = self.gan
        return (self.t_min if g.t_min is None else g.t_min, self.t_max if g.t_max is None else g.t_max)

    def timestep_settings(self) -> dict[str, float]:
        return {"method.t_max": self.t_max, **({"method.gan.t_max": self.gan.t_max} if self.gan.t_max is not None else {})}

    def resolve(self) -> None:
        if self.gan.loss is None:
            self.gan.loss = self.paper_gan_loss

    def adversarial_settings(self) -> dict:
        """``distill.methods.common.AdversarialMethod``'s keyword arguments from this section."""
        g, d = self.gan, self.gan.discriminator
        gan_t_min, gan_t_max = self.gan_timestep_range()
        return dict(critic_updates=self.critic_updates, t_min=self.t_min, t_max=self.t_max, gan_t_min=gan_t_min,
                    gan_t_max=gan_t_max, gan_weight=g.weight, gan_loss=g.loss,
                    gan_max_grad_ratio=g.max_grad_ratio, r1_kind=g.r1.kind, r1_weight=g.r1.weight, r1_sigma=g.r1.sigma,
                    discriminator_backbone=d.backbone, dinov2=d.dinov2, layers=d.layers, head_width=d.head_width)
