"""Gradient penalties for the discriminator: exact R1/R2 and APT's approximated R1."""

from __future__ import annotations

import torch

Logs = dict[str, torch.Tensor]


def _gradient_penalty(
    logits: torch.Tensor, inputs: torch.Tensor, name: str
) -> torch.Tensor:
    if not inputs.requires_grad:
        raise ValueError(
            f"{name}: inputs must require grad (call .requires_grad_(True) on them before "
            "the discriminator forward pass)"
        )
    if not logits.requires_grad:
        raise ValueError(f"{name}: logits do not depend on inputs (no autograd graph)")
    # create_graph so the penalty itself can be backpropagated into the discriminator.
    (grad,) = torch.autograd.grad(logits.sum(), inputs, create_graph=True)
    grad = grad.to(torch.promote_types(grad.dtype, torch.float32))
    return grad.pow(2).flatten(1).sum(dim=1).mean()


def r1_penalty(
    real_logits: torch.Tensor, real_inputs: torch.Tensor
) -> tuple[torch.Tensor, Logs]:
    """Exact R1 penalty (Mescheder et al. 2018, eq. 9), without the gamma/2 factor.

    Args:
        real_logits: D(real_inputs), [B] or [B, K] (summed over K before differentiating).
        real_inputs: real samples, [B, ...]; must require grad.

    Returns ``mean_b ||grad_x D(x_b)||^2`` (float32 or wider). The caller multiplies by gamma/2.
    Logs: ``r1_penalty``.
    """
    penalty = _gradient_penalty(real_logits, real_inputs, "r1_penalty")
    return penalty, {"r1_penalty": penalty.detach()}


def r2_penalty(
    fake_logits: torch.Tensor, fake_inputs: torch.Tensor
) -> tuple[torch.Tensor, Logs]:
    """Exact R2 penalty (R3GAN, Huang et al. 2024, eq. 4): R1 evaluated on fake samples.

    Args:
        fake_logits: D(fake_inputs), [B] or [B, K].
        fake_inputs: generated samples, [B, ...]; must require grad (detach them from
            the generator first).

    Returns ``mean_b ||grad_x D(x_b)||^2`` (float32 or wider), without gamma/2.
    Logs: ``r2_penalty``.
    """
    penalty = _gradient_penalty(fake_logits, fake_inputs, "r2_penalty")
    return penalty, {"r2_penalty": penalty.detach()}


def approximated_r1_penalty(
    real_logits: torch.Tensor,
    perturbed_logits: torch.Tensor,
    sigma: float | torch.Tensor,
) -> tuple[torch.Tensor, Logs]:
    """Approximated R1 of APT (Lin et al. 2025), ``L_aR1 = ||D(x) - D(N(x, sigma^2 I))||^2``.

    Args:
        real_logits: D(x) on real inputs, [B] or [B, K].
        perturbed_logits: D(x + sigma * n) on the same inputs perturbed by the caller
            with n ~ N(0, I), same shape.
        sigma: perturbation std, a positive float, a 0-d tensor or a per-sample [B] tensor.

    Returns ``mean_b ||D(x_b) - D(x_b + sigma n_b)||^2 / sigma^2`` (float32 or wider, squared
    distance summed over K). The division by sigma^2 puts it on the scale of exact R1:
    for small sigma and a single logit, ``E_n ||D(x + sigma n) - D(x)||^2 ≈
    sigma^2 ||grad D(x)||^2``, so the same gamma/2 factor applies. Gradient flows
    through both logits, as in APT. Logs: ``approx_r1_penalty`` (normalised) and
    ``approx_r1_raw`` (unnormalised).
    """
    if real_logits.shape != perturbed_logits.shape:
        raise ValueError(
            f"approximated_r1_penalty: real_logits {tuple(real_logits.shape)} and "
            f"perturbed_logits {tuple(perturbed_logits.shape)} differ in shape"
        )
    if not isinstance(sigma, torch.Tensor) and not sigma > 0:
        raise ValueError(f"approximated_r1_penalty: sigma must be positive, got {sigma}")
    # At least float32: the two logits nearly cancel for small sigma, so half precision
    # would drown the difference in rounding error.
    dtype = torch.promote_types(real_logits.dtype, torch.float32)
    diff = (real_logits.to(dtype) - perturbed_logits.to(dtype)).reshape(real_logits.shape[0], -1)
    per_sample = diff.pow(2).sum(dim=1)
    sigma_t = torch.as_tensor(sigma, dtype=dtype, device=per_sample.device)
    if sigma_t.ndim not in (0, 1) or (sigma_t.ndim == 1 and sigma_t.shape != per_sample.shape):
        raise ValueError(
            f"approximated_r1_penalty: sigma must be a scalar or of shape [B]="
            f"{tuple(per_sample.shape)}, got {tuple(sigma_t.shape)}"
        )
    penalty = (per_sample / sigma_t**2).mean()
    logs: Logs = {
        "approx_r1_penalty": penalty.detach(),
        "approx_r1_raw": per_sample.detach().mean(),
    }
    return penalty, logs


REGULARISERS = ("approximated", "exact", "r2")


def discriminator_penalty(
    kind: str,
    *,
    real_logits: torch.Tensor,
    fake_logits: torch.Tensor,
    perturbed_logits: torch.Tensor | None = None,
    real_inputs: torch.Tensor | None = None,
    fake_inputs: torch.Tensor | None = None,
    sigma: float = 0.0,
) -> tuple[torch.Tensor, Logs]:
    """The discriminator regulariser ``kind`` (one of ``REGULARISERS``) from what the caller
    computed for it: ``approximated`` needs ``perturbed_logits`` and ``sigma``, ``exact`` the
    ``real_inputs`` that required grad, ``r2`` the ``fake_inputs`` that required grad."""
    if kind == "approximated":
        return approximated_r1_penalty(real_logits, perturbed_logits, sigma)
    if kind == "exact":
        return r1_penalty(real_logits, real_inputs)
    if kind == "r2":
        return r2_penalty(fake_logits, fake_inputs)
    raise ValueError(f"unknown discriminator regulariser {kind!r}; valid: {REGULARISERS}")
