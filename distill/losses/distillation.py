"""ADD's score-distillation loss (Sauer et al. 2023, eq. 4 and §3.2)."""

from __future__ import annotations

import torch

Logs = dict[str, torch.Tensor]

DISTILL_WEIGHTINGS = ("exponential", "sds", "constant")


def distillation_weight(kind: str, alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """c(t) of ADD's distillation loss for x_t = alpha_t x0 + sigma_t eps, per sample [B].

    ``exponential``: c(t) = alpha_t (ADD §3.2, "higher noise levels contribute less"). ADD writes
    the forward process as x_s = alpha_s x0 + sigma_s eps (§3.1), so its alpha_t is the signal
    coefficient, diffusers' sqrt(alphas_cumprod[t]) (0.279 at t = 500 on the linear schedule),
    not alphas_cumprod[t]; it falls roughly exponentially in t;
    ``sds``: c(t) = alpha_t sigma_t, the x0 form of score distillation sampling with
    DreamFusion's w(t) = sigma_t² (its gradient w(t)(eps_hat - eps) equals
    w(t) alpha_t / sigma_t (x0 - x0_hat)); ``constant``: c(t) = 1.
    """
    if kind == "exponential":
        return alpha
    if kind == "sds":
        return alpha * sigma
    if kind == "constant":
        return torch.ones_like(alpha)
    raise ValueError(f"unknown distillation weighting {kind!r}; valid: {DISTILL_WEIGHTINGS}")


def score_distillation_loss(x0_student: torch.Tensor, x0_teacher: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, Logs]:
    """ADD eq. 4: ``mean_b c(t_b) · mean(|x0_student_b - sg(x0_teacher_b)|²)``, where
    ``x0_teacher`` is the teacher's x0 estimate of the student's sample re-noised to t.

    x0_student: [B, ...] with grad; x0_teacher: [B, ...] (detached here); weight: [B].
    Logs: ``distill_loss``, ``distill_mse`` (unweighted).
    """
    mse = (x0_student.float() - x0_teacher.detach().float()).pow(2).flatten(1).mean(dim=1)
    loss = (weight.float() * mse).mean()
    return loss, {"distill_loss": loss.detach(), "distill_mse": mse.detach().mean()}
