"""What DMD2 and ADD share: the student's sample at one of its steps, the regularised
discriminator step (which inputs a regulariser needs, and its penalty), and
``AdversarialMethod``, the settings and parts of a method with a critic and a GAN term."""

from __future__ import annotations

from contextlib import nullcontext
from typing import TYPE_CHECKING, Optional

import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from distill.data.order import agreed
from distill.denoiser import Denoiser
from distill.discriminators import Discriminator
from distill.losses import discriminator_penalty, projection_signs
from distill.students import FewStepSampler

if TYPE_CHECKING:
    from distill.teachers.base import Teacher


def to_device(batch: dict, device) -> dict:
    """A batch or conditioning with its tensors on ``device`` (prompts stay lists of strings)."""
    return {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}


def randn_like(like: Tensor, generator: torch.Generator) -> Tensor:
    """Gaussian noise shaped like ``like``, drawn on the CPU generator (reproducible on any device)."""
    return torch.randn(like.shape, generator=generator, dtype=like.dtype).to(like.device)


def real_x0(teacher: "Teacher", batch: dict) -> Tensor:
    """x0 of a batch's real images: the cached latents when the batch has them, else the
    images encoded by the teacher (a VAE for latent models, the identity in pixel space)."""
    return batch["latent"] if "latent" in batch else teacher.encode_images(batch["image"])


def student_x0(teacher: "Teacher", sampler: FewStepSampler, student: nn.Module, batch: dict, cond: dict,
               generator: torch.Generator, *, grad: bool, backward_simulation: bool) -> tuple[Tensor, int]:
    """(x0 of the student at one of its steps, chosen at random; that step's index k). The first step's input is
    pure noise, as in sampling; a later step's input comes from running the student's own
    earlier steps (backward simulation, DMD2 §4.5) or from a real image noised to that
    step's timestep (ADD §3.1). The step is the same on every rank (``distill.data.agreed``:
    the first draws of a step's generator are this function's).

    The x0 is what the student's sampler hands the user: clipped as the teacher's scheduler
    clips it (``schedule.clip_x0``; a pixel teacher's ``clip_sample``, nothing for latents),
    as the export's stock scheduler does. So the losses see the samples users get, and a
    pixel background can sit at the clip's edge (raw outputs below it) as real digits'
    exact black does, instead of spreading around it; the gradient reaches the student
    through the pixels inside the range."""
    device = next(iter(cond.values())).device if cond else batch["image"].device
    n = len(next(v for k, v in batch.items() if k in ("class_label", "prompt", "image", "latent") or k.startswith("cond.")))
    shape = (n, *teacher.sample_shape)
    noise = torch.randn(shape, generator=generator).to(device)
    k = int(torch.randint(0, len(sampler), (1,), generator=generator))
    # every rank runs k student steps: the draw of rank 0 (the first of its step), replayed on
    # each rank, so FSDP's per-forward collectives pair up; a single process draws what it drew
    k = agreed(generator, lambda g: (torch.randn(shape, generator=g),
                                     int(torch.randint(0, len(sampler), (1,), generator=g)))[1], k)
    G = Denoiser(teacher, student)
    x0_fn = lambda x_t, t: G.x0(x_t, t, cond)
    if backward_simulation or k == 0:
        x_t = sampler.simulate(x0_fn, noise, k, generator)
    else:
        x_t = teacher.schedule.add_noise(real_x0(teacher, batch).to(device), noise, sampler.timestep(k, noise))
    with nullcontext() if grad else torch.no_grad():
        return teacher.schedule.clip_x0(x0_fn(x_t, sampler.timestep(k, x_t))), k


def regularised_inputs(kind: str, fake: Tensor, real: Tensor, sigma: float, generator: torch.Generator) -> list[Tensor]:
    """The discriminator's inputs [fake, real] for regulariser ``kind``, plus, for APT's
    approximated R1, the real inputs perturbed by N(0, sigma^2). Exact R1 (R2) needs the
    gradient at the real (fake) inputs, so those come back detached and requiring grad;
    ``regularised_penalty`` differentiates with respect to them."""
    if kind == "exact":
        real = real.detach().requires_grad_(True)
    elif kind == "r2":
        fake = fake.detach().requires_grad_(True)
    if kind == "approximated":  # in float32: sigma * n would round away against a bfloat16 image
        fake, real = fake.float(), real.float()
        return [fake, real, real + sigma * randn_like(real, generator)]
    return [fake, real]


def regulariser_context(kind: str, device):
    """The context of a regularised discriminator forward. Exact R1 / R2 differentiate twice,
    and PyTorch's fused attention kernels have no double backward: attention runs in the math
    kernel. Approximated R1 divides the difference of two nearly equal logits by sigma^2
    (sigma = 0.01 is one to three units of bfloat16 / float16 precision): under mixed
    precision the forward runs in float32, autocast off (frozen half-precision backbones
    still compute in their own dtype)."""
    if kind in ("exact", "r2"):
        return sdpa_kernel(SDPBackend.MATH)
    if kind == "approximated":
        return torch.autocast(torch.device(device).type, enabled=False)
    return nullcontext()


def regularised_penalty(kind: str, logits: Tensor, inputs: list[Tensor], sigma: float,
                        generator: torch.Generator) -> tuple[Tensor, dict]:
    """The penalty of ``kind`` from the logits of ``torch.cat(inputs)`` (from
    ``regularised_inputs``): fake logits first, then real, then perturbed real. Exact R1 / R2
    draw their random-sign projection from ``generator`` (see ``distill.losses.r1``)."""
    n = len(inputs[0])
    signs = projection_signs(logits[:n], generator) if kind in ("exact", "r2") else None
    return discriminator_penalty(
        kind, real_logits=logits[n : 2 * n], fake_logits=logits[:n], perturbed_logits=logits[2 * n :],
        real_inputs=inputs[1], fake_inputs=inputs[0], sigma=sigma, signs=signs)


def generator_objective(x0_student: Tensor, terms: dict[str, Tensor],
                        max_gan_ratio: Optional[float] = None) -> tuple[Tensor, dict]:
    """The generator phase's loss to backpropagate, from its weighted ``terms`` (each a scalar
    function of the student's output ``x0_student`` [B, ...], e.g. ``{"dmd": ..., "gan": ...}``),
    and the gradient each term sends to that output.

    Each term's gradient at x0 is taken once (through the frozen critic, not the student);
    the returned ``sum(x0 * sg(sum of those gradients))`` has the same gradient at x0, so the
    student's backward runs once, as it would for the sum of the terms. Logs ``grad_<name>``,
    the mean per-sample L2 norm of each term's gradient at x0, and for a GAN term
    ``gan_grad_ratio`` = |grad_gan| / |grad of the other terms| (both batch norms): how hard the
    adversarial term pulls against distribution matching or distillation.

    ``max_gan_ratio`` caps that pull: where the ratio exceeds it, the GAN term's gradient is
    scaled down to ``max_gan_ratio`` times the others' (its direction kept), and
    ``gan_grad_scale`` logs the factor applied (1 where the cap did not bind). A critic that
    sharpens on a finite set of real images otherwise comes to outweigh the distribution
    matching it was meant to assist."""
    grads = {name: torch.autograd.grad(term, x0_student, retain_graph=True)[0].float() for name, term in terms.items()}
    logs = {f"grad_{name}": g.detach().flatten(1).norm(dim=1).mean() for name, g in grads.items()}
    if "gan" in grads and len(grads) > 1:
        others = sum(g for name, g in grads.items() if name != "gan")
        ratio = grads["gan"].norm() / others.norm().clamp_min(1e-30)
        logs["gan_grad_ratio"] = ratio
        if max_gan_ratio is not None:
            scale = (max_gan_ratio / ratio.clamp_min(1e-30)).clamp(max=1.0)
            grads["gan"] = grads["gan"] * scale
            logs["gan_grad_scale"] = scale
    total = sum(grads.values())
    return (x0_student.float() * total.detach()).sum(), logs


class AdversarialMethod:
    """A method with a critic phase and a GAN term: the real score ``mu_real`` (the frozen
    teacher, guided), student samples re-noised at timesteps in [t_min, t_max] (the
    discriminator's in [gan_t_min, gan_t_max]), the GAN loss and the discriminator's regulariser, and ``critic_updates`` critic updates per
    student update. Subclasses add their losses and their critic (``build_critic``)."""

    with_fake_score = False
    fake_score_lora = None

    def __init__(self, *, teacher: "Teacher", sampler: FewStepSampler, guidance_scale: float, critic_updates: int,
                 t_min: int, t_max: int, gan_t_min: int, gan_t_max: int, gan_weight: float, gan_loss: str,
                 gan_max_grad_ratio: Optional[float], r1_kind: str, r1_weight: float, r1_sigma: float,
                 discriminator_backbone: str, dinov2: str, layers: list[int], head_width: int):
        self.teacher, self.sampler, self.schedule = teacher, sampler, teacher.schedule
        self.mu_real = Denoiser(teacher, teacher.denoiser, guidance_scale)
        self.critic_updates = critic_updates
        self.t_min, self.t_max = t_min, t_max
        self.gan_t_min, self.gan_t_max = gan_t_min, gan_t_max
        # the discriminator's timesteps come from their own draws only when their range differs
        self.separate_gan_timesteps = (gan_t_min, gan_t_max) != (t_min, t_max)
        self.gan_weight, self.gan_loss, self.gan_max_grad_ratio = gan_weight, gan_loss, gan_max_grad_ratio
        self.r1_kind, self.r1_weight, self.r1_sigma = r1_kind, r1_weight, r1_sigma
        self.discriminator_backbone, self.dinov2, self.layers, self.head_width = discriminator_backbone, dinov2, layers, head_width

    def _timesteps(self, n: int, generator: torch.Generator, device) -> Tensor:
        return self.schedule.sample_timesteps(n, generator=generator, t_min=self.t_min, t_max=self.t_max, device=device)

    def _gan_timesteps(self, n: int, generator: torch.Generator, device) -> Tensor:
        """Timesteps at which the discriminator sees re-noised samples (method.gan.t_min / t_max)."""
        return self.schedule.sample_timesteps(n, generator=generator, t_min=self.gan_t_min, t_max=self.gan_t_max,
                                              device=device)

    def _discriminator(self, device) -> Discriminator:
        """A discriminator of its own: a frozen backbone (DINOv2 or the teacher) and trainable heads."""
        return Discriminator(backbone=self.discriminator_backbone, teacher=self.teacher, dinov2=self.dinov2,
                             layers=self.layers, width=self.head_width, device=device)

    def _on_device(self, batch: dict, device) -> tuple[dict, dict]:
        """(the batch's conditioning, the batch), on ``device``."""
        return to_device(self.teacher.condition(batch), device), to_device(batch, device)

    def _generator_result(self, x0_student: Tensor, terms: dict[str, Tensor], logs: dict) -> tuple[Tensor, dict]:
        """The generator phase's loss from its weighted ``terms`` (``generator_objective``), with its logs."""
        loss, grad_logs = generator_objective(x0_student, terms, self.gan_max_grad_ratio)
        logs.update(grad_logs)
        logs["generator_loss"] = sum(terms.values()).detach()
        logs["student_x0_abs_max"] = x0_student.detach().abs().amax()
        clipped = self.schedule.clipped_fraction(x0_student)
        if clipped is not None:
            logs["student_x0_clipped"] = clipped
        return loss, logs

    def _critic_result(self, loss: Tensor, logs: dict, logits: Tensor, inputs: list[Tensor],
                       generator: torch.Generator) -> tuple[Tensor, dict]:
        """The critic phase's loss plus the regulariser's weighted penalty (from the logits of
        ``regularised_inputs``), with its logs."""
        if self.r1_kind != "none":
            penalty, penalty_logs = regularised_penalty(self.r1_kind, logits, inputs, self.r1_sigma, generator)
            loss = loss + self.r1_weight * penalty
            logs.update(penalty_logs)
        logs["critic_loss"] = loss.detach()
        return loss, logs
