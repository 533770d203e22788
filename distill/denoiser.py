"""The denoiser D(x_t, t, cond): a network read through a teacher adapter, with guidance.

Methods speak the papers' language with it: DMD2's real score is
``mu_real = Denoiser(teacher, teacher.denoiser, guidance_scale)``, its fake score
``mu_fake = Denoiser(teacher, fake_score)``, the generator ``G = Denoiser(teacher, student)``.
A ``Denoiser`` is a light view (no weights of its own): build one wherever a network is
called, e.g. around the prepared (DDP-wrapped) student of one loss call.

Guidance is mixed here and nowhere else. An adapter declares its kind (``adapter.guidance``):

- ``"cfg"``: classifier-free guidance (Ho & Salimans 2022, eq. 6), the conditional and null
  outputs from one batched call in the adapter's pipeline order (``adapter.null_first``;
  the order matters to bit-level parity with the pipelines), mixed
  ``null + scale * (cond - null)``; scale 1 calls the network once, unguided;
- ``"embedded"``: the scale is an input of the network (e.g. FLUX.1-dev's guidance
  embedding): ``adapter.with_guidance(cond, scale)`` puts it into the conditioning and the
  network runs once, at every scale (1 included);
- ``None``: no guidance is possible (an unconditional network): the scale is ignored.

A scale of None is the network's own: unguided for "cfg", the scale the conditioning carries
or else the adapter's default for "embedded" (FLUX.1-dev's 3.5: students and fake scores,
which DMD2 initialises at the teacher, run at it).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from distill.teachers.base import Teacher

GUIDANCE_KINDS = ("cfg", "embedded", None)


def cat_conditions(conds: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """Concatenate conditionings along the batch dimension (every value is batch-first)."""
    return {key: torch.cat([c[key] for c in conds]) for key in conds[0]}


class Denoiser:
    """``network`` called through ``adapter`` with ``guidance_scale``.

    ``prediction_type``: how ``x0`` reads the network's output (epsilon, v_prediction,
    sample, flow); None takes the adapter's, the checkpoint's own."""

    def __init__(self, adapter: "Teacher", network: nn.Module, guidance_scale: float | None = None,
                 prediction_type: str | None = None):
        if adapter.guidance not in GUIDANCE_KINDS:
            raise ValueError(f"unknown guidance kind {adapter.guidance!r} of {type(adapter).__name__}; "
                             f"expected one of {GUIDANCE_KINDS}")
        self.adapter, self.network, self.guidance_scale = adapter, network, guidance_scale
        self.prediction_type = prediction_type or adapter.prediction_type

    def output(self, x_t: Tensor, t: Tensor, cond: dict[str, Tensor]) -> Tensor:
        """The guided raw output [B, C, H, W], float32, in ``prediction_type``; x_t [B, C, H, W],
        t [B] (or one timestep for the batch)."""
        adapter, network, scale = self.adapter, self.network, self.guidance_scale
        if adapter.guidance == "embedded":
            return adapter.output(network, x_t, t, cond if scale is None else adapter.with_guidance(cond, scale))
        if adapter.guidance is None or scale is None or scale == 1.0:
            return adapter.output(network, x_t, t, cond)
        null = adapter.null_condition(cond)
        both = cat_conditions([null, cond] if adapter.null_first else [cond, null])
        t = t.reshape(-1)
        first, second = adapter.output(network, torch.cat([x_t, x_t]), torch.cat([t, t]) if t.numel() > 1 else t,
                                       both).chunk(2)
        out_null, out_cond = (first, second) if adapter.null_first else (second, first)
        return out_null + scale * (out_cond - out_null)

    def x0(self, x_t: Tensor, t: Tensor, cond: dict[str, Tensor]) -> Tensor:
        """The x0 estimate [B, C, H, W], float32, from the guided output."""
        return self.adapter.schedule.to_x0(self.output(x_t, t, cond), x_t.float(), t, self.prediction_type)
