"""Distribution matching (DMD, Yin et al. 2024) and the fake score's denoising loss."""

from __future__ import annotations

import torch

Logs = dict[str, torch.Tensor]


def _non_batch_dims(x: torch.Tensor) -> tuple[int, ...]:
    return tuple(range(1, x.ndim))


def dmd_loss(
    x0_student: torch.Tensor,
    x0_real: torch.Tensor,
    x0_fake: torch.Tensor,
) -> tuple[torch.Tensor, Logs]:
    """Distribution matching loss, DMD eq. 7 with the normalisation of §3.2 (as in DMD2's code).

    Args:
        x0_student: generator output, [B, ...]; the only input that receives gradient.
        x0_real: x0 prediction of the real (teacher, guided) score on the re-noised
            student sample, [B, ...].
        x0_fake: x0 prediction of the fake score on the same noisy sample, [B, ...].

    With ``w = mean_{non-batch}|x0_student - x0_real|`` (per sample) and
    ``grad = (x0_fake - x0_real) / w``, returns
    ``loss = 0.5 * mean((x0_student - sg(x0_student - grad))**2)`` (float32), so that
    ``d loss / d x0_student = grad / x0_student.numel()``, i.e. the KL gradient
    ``s_fake - s_real`` of eq. 7 expressed in x0 space.

    Logs: ``dmd_loss``, ``dmd_grad_norm`` (mean per-sample L2 norm of grad),
    ``dmd_weight`` (mean of w).
    """
    if not (x0_student.shape == x0_real.shape == x0_fake.shape):
        raise ValueError(
            "dmd_loss: shapes differ: "
            f"x0_student {tuple(x0_student.shape)}, x0_real {tuple(x0_real.shape)}, "
            f"x0_fake {tuple(x0_fake.shape)}"
        )
    student = x0_student.float()
    # The score predictions are targets only; gradient must reach the generator alone.
    real = x0_real.detach().float()
    fake = x0_fake.detach().float()
    dims = _non_batch_dims(student)

    with torch.no_grad():
        # Per-sample normaliser makes the step size invariant to how far the teacher's
        # x0 is from the sample (DMD §3.2), which is what keeps training stable.
        weight = (student - real).abs().mean(dim=dims, keepdim=True)
        grad = torch.nan_to_num((fake - real) / weight)
        target = student - grad

    loss = 0.5 * torch.mean((student - target) ** 2)

    logs: Logs = {
        "dmd_loss": loss.detach(),
        "dmd_grad_norm": grad.flatten(1).norm(dim=1).mean(),
        "dmd_weight": weight.mean(),
    }
    return loss, logs


def denoising_loss(prediction: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, Logs]:
    """Denoising objective of the fake score (DMD eq. 6 / DMD2's fake-score update).

    Args:
        prediction: the fake score's output (in its prediction type), [B, ...].
        target: its regression target, [B, ...]; detached here because the fake
            score's update must never move the generator that produced it.

    Returns the float32 mean squared error. Logs: ``denoising_loss``.
    """
    if prediction.shape != target.shape:
        raise ValueError(
            f"denoising_loss: prediction {tuple(prediction.shape)} and target "
            f"{tuple(target.shape)} differ in shape"
        )
    loss = ((prediction.float() - target.detach().float()) ** 2).mean()
    return loss, {"denoising_loss": loss.detach()}
