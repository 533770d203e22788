"""Adversarial (GAN) losses for the generator and discriminator (ADD, APT, R3GAN)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

Logs = dict[str, torch.Tensor]

ADVERSARIAL_LOSSES = ("non_saturating", "hinge", "relativistic")


def _check_kind(kind: str) -> None:
    if kind not in ADVERSARIAL_LOSSES:
        raise ValueError(
            f"unknown adversarial loss kind {kind!r}; valid kinds: {ADVERSARIAL_LOSSES}"
        )


def _check_pair(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> None:
    # Relativistic losses pair real and fake samples elementwise; a silent broadcast
    # ([B] against [B, 1]) would compare every real with every fake instead.
    if real_logits.shape != fake_logits.shape:
        raise ValueError(
            f"relativistic loss needs real and fake logits of the same shape, got "
            f"{tuple(real_logits.shape)} and {tuple(fake_logits.shape)}"
        )


def generator_adversarial_loss(
    fake_logits: torch.Tensor,
    real_logits: torch.Tensor | None = None,
    *,
    kind: str,
) -> tuple[torch.Tensor, Logs]:
    """Generator's adversarial loss.

    Args:
        fake_logits: discriminator logits on generated samples, [B] or [B, K]
            (several heads/tokens); the loss averages over all entries.
        real_logits: logits on real samples, same shape; required for ``relativistic``.
        kind: one of ``ADVERSARIAL_LOSSES``:
            ``non_saturating``: ``mean(softplus(-D(fake)))`` (Goodfellow et al. 2014);
            ``hinge``: ``-mean(D(fake))`` (Lim & Ye 2017, as in ADD);
            ``relativistic``: ``mean(softplus(-(D(fake) - D(real))))`` (RpGAN,
            R3GAN eq. 2, Huang et al. 2024).

    Logs: ``gan_g_loss``, ``logits_fake`` (mean).
    """
    _check_kind(kind)
    fake = fake_logits.float()
    if kind == "non_saturating":
        loss = F.softplus(-fake).mean()
    elif kind == "hinge":
        loss = -fake.mean()
    else:
        if real_logits is None:
            raise ValueError("relativistic generator loss requires real_logits")
        _check_pair(real_logits, fake_logits)
        loss = F.softplus(-(fake - real_logits.float())).mean()
    logs: Logs = {"gan_g_loss": loss.detach(), "logits_fake": fake.detach().mean()}
    return loss, logs


def discriminator_adversarial_loss(
    real_logits: torch.Tensor,
    fake_logits: torch.Tensor,
    *,
    kind: str,
) -> tuple[torch.Tensor, Logs]:
    """Discriminator's adversarial loss.

    Args:
        real_logits: logits on real samples, [B] or [B, K]; averaged over all entries.
        fake_logits: logits on generated samples, same layout.
        kind: one of ``ADVERSARIAL_LOSSES``:
            ``non_saturating``: ``mean(softplus(-D(real))) + mean(softplus(D(fake)))``;
            ``hinge``: ``mean(relu(1 - D(real))) + mean(relu(1 + D(fake)))``;
            ``relativistic``: ``mean(softplus(-(D(real) - D(fake))))`` (R3GAN eq. 2).

    Logs: ``gan_d_loss``, ``logits_real``, ``logits_fake`` (the means of D(real) and D(fake)),
    ``logit_gap`` (their difference), ``d_accuracy`` (the fraction of entries the discriminator
    gets right: D(real) > 0 and D(fake) < 0; for ``relativistic``, D(real) > D(fake) pairwise).
    """
    _check_kind(kind)
    real = real_logits.float()
    fake = fake_logits.float()
    if kind == "non_saturating":
        loss = F.softplus(-real).mean() + F.softplus(fake).mean()
    elif kind == "hinge":
        loss = F.relu(1.0 - real).mean() + F.relu(1.0 + fake).mean()
    else:
        _check_pair(real_logits, fake_logits)
        loss = F.softplus(-(real - fake)).mean()
    with torch.no_grad():
        if kind == "relativistic":
            accuracy = (real > fake).float().mean()
        else:
            accuracy = ((real > 0).float().mean() + (fake < 0).float().mean()) / 2
    logs: Logs = {
        "gan_d_loss": loss.detach(),
        "logits_real": real.detach().mean(),
        "logits_fake": fake.detach().mean(),
        "logit_gap": (real.detach().mean() - fake.detach().mean()),
        "d_accuracy": accuracy,
    }
    return loss, logs
