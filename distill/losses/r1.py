"""Gradient penalties for the discriminator: exact R1 / R2 and APT's approximated R1.

One convention for every head. A discriminator here returns K logits per sample ([B, K]:
one per token, position or layer; [B] is K = 1), and every penalty estimates the same
quantity, the mean over the K logits of each logit's own squared input gradient,

    R(x) = (1 / K) sum_k ||grad_x D_k(x)||^2,

which for K = 1 is the R1 of Mescheder et al. (2018, eq. 9). With the mean, a weight
(gamma / 2) means the same for a single-logit head and a head of hundreds of tokens, and the
same for the exact and the approximated penalty, so a weight found with one carries over.

- exact R1 / R2 differentiate once through a random-sign projection of the logits:
  E_v ||grad_x sum_k v_k D_k||^2 = sum_k ||grad_x D_k||^2 for independent signs v_k = +-1
  (the cross terms average out), so ||grad_x sum_k v_k D_k||^2 / K is an unbiased estimate
  of R(x) at the cost of one backward pass instead of K. With K = 1 it is exact.
- approximated R1 (APT, Lin et al. 2025) needs no second backward: for n ~ N(0, I) and
  small sigma, E_n (D_k(x + sigma n) - D_k(x))^2 = sigma^2 ||grad_x D_k(x)||^2 + O(sigma^3),
  so mean_k (D_k(x) - D_k(x + sigma n))^2 / sigma^2 estimates R(x). It is exact for a linear D.
"""

from __future__ import annotations

import torch

Logs = dict[str, torch.Tensor]


def _per_logit(logits: torch.Tensor) -> torch.Tensor:
    """Logits as [B, K] (a [B] tensor is K = 1)."""
    return logits.reshape(logits.shape[0], -1)


def projection_signs(logits: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Independent random signs (+1 / -1) shaped like ``logits``, drawn on the CPU generator:
    the projection ``r1_penalty`` / ``r2_penalty`` need for heads with several logits."""
    signs = torch.randint(0, 2, tuple(logits.shape), generator=generator, dtype=torch.int8) * 2 - 1
    return signs.to(logits.device, torch.float32)


def _gradient_penalty(logits: torch.Tensor, inputs: torch.Tensor, signs: torch.Tensor | None, name: str) -> torch.Tensor:
    if not inputs.requires_grad:
        raise ValueError(
            f"{name}: inputs must require grad (call .requires_grad_(True) on them before "
            "the discriminator forward pass)"
        )
    if not logits.requires_grad:
        raise ValueError(f"{name}: logits do not depend on inputs (no autograd graph)")
    flat = _per_logit(logits).float()
    k = flat.shape[1]
    if k > 1 and signs is None:
        raise ValueError(f"{name}: logits of {k} entries per sample need the random signs of projection_signs "
                         "(the penalty is the mean over the entries of each one's squared gradient)")
    projected = flat.sum() if signs is None else (flat * _per_logit(signs).to(flat)).sum()
    # create_graph so the penalty itself can be backpropagated into the discriminator.
    (grad,) = torch.autograd.grad(projected, inputs, create_graph=True)
    grad = grad.to(torch.promote_types(grad.dtype, torch.float32))
    return grad.pow(2).flatten(1).sum(dim=1).mean() / k


def r1_penalty(real_logits: torch.Tensor, real_inputs: torch.Tensor,
               signs: torch.Tensor | None = None) -> tuple[torch.Tensor, Logs]:
    """Exact R1 (Mescheder et al. 2018, eq. 9) without the gamma / 2 factor, in the module's
    convention: ``mean_b (1/K) sum_k ||grad_x D_k(x_b)||^2``, estimated without bias through the
    random-sign projection ``signs`` (``projection_signs(real_logits)``; not needed for K = 1).

    real_logits: D(real_inputs), [B] or [B, K]; real_inputs: [B, ...], requiring grad.
    Returns a float32 (or wider) scalar. Logs: ``r1_penalty``.
    """
    penalty = _gradient_penalty(real_logits, real_inputs, signs, "r1_penalty")
    return penalty, {"r1_penalty": penalty.detach()}


def r2_penalty(fake_logits: torch.Tensor, fake_inputs: torch.Tensor,
               signs: torch.Tensor | None = None) -> tuple[torch.Tensor, Logs]:
    """Exact R2 (R3GAN, Huang et al. 2024, eq. 4): R1 evaluated on generated samples, in the
    same convention as ``r1_penalty``. fake_inputs must require grad (detach them from the
    generator first). Logs: ``r2_penalty``."""
    penalty = _gradient_penalty(fake_logits, fake_inputs, signs, "r2_penalty")
    return penalty, {"r2_penalty": penalty.detach()}


def approximated_r1_penalty(
    real_logits: torch.Tensor,
    perturbed_logits: torch.Tensor,
    sigma: float | torch.Tensor,
) -> tuple[torch.Tensor, Logs]:
    """Approximated R1 of APT (Lin et al. 2025), ``||D(x) - D(x + sigma n)||^2``, in the module's
    convention: ``mean_b mean_k (D_k(x_b) - D_k(x_b + sigma n_b))^2 / sigma^2``, whose expectation
    over n is ``(1/K) sum_k ||grad_x D_k(x)||^2`` as sigma -> 0 (exactly, for a linear D), the
    quantity ``r1_penalty`` estimates: the same gamma / 2 applies to both.

    real_logits: D(x), [B] or [B, K]; perturbed_logits: D(x + sigma n) with n ~ N(0, I) drawn by
    the caller, same shape; sigma: a positive float, a 0-d tensor or a per-sample [B] tensor.
    Computed in float32 (or wider): the two logits nearly cancel, so compute them in float32
    too (``methods.common.regulariser_precision`` does under mixed precision). Gradient flows
    through both logits, as in APT. Logs: ``approx_r1_penalty`` and ``approx_r1_raw`` (the mean
    squared difference before dividing by sigma^2).
    """
    if real_logits.shape != perturbed_logits.shape:
        raise ValueError(
            f"approximated_r1_penalty: real_logits {tuple(real_logits.shape)} and "
            f"perturbed_logits {tuple(perturbed_logits.shape)} differ in shape"
        )
    if not isinstance(sigma, torch.Tensor) and not sigma > 0:
        raise ValueError(f"approximated_r1_penalty: sigma must be positive, got {sigma}")
    dtype = torch.promote_types(real_logits.dtype, torch.float32)
    diff = _per_logit(real_logits.to(dtype) - perturbed_logits.to(dtype))
    per_sample = diff.pow(2).mean(dim=1)
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
    signs: torch.Tensor | None = None,
) -> tuple[torch.Tensor, Logs]:
    """The discriminator regulariser ``kind`` (one of ``REGULARISERS``) from what the caller
    computed for it: ``approximated`` needs ``perturbed_logits`` and ``sigma``, ``exact`` the
    ``real_inputs`` that required grad, ``r2`` the ``fake_inputs`` that required grad (both with
    ``signs`` for multi-logit heads)."""
    if kind == "approximated":
        return approximated_r1_penalty(real_logits, perturbed_logits, sigma)
    if kind == "exact":
        return r1_penalty(real_logits, real_inputs, signs)
    if kind == "r2":
        return r2_penalty(fake_logits, fake_inputs, signs)
    raise ValueError(f"unknown discriminator regulariser {kind!r}; valid: {REGULARISERS}")
