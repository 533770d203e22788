"""Discriminator backbones: frozen feature extractors the heads read, and the discriminator
that joins them.

- ``dinov2``: transformers' ``Dinov2Model`` on decoded images (ADD, Sauer et al. 2023): the
  hidden states of several layers, as tokens [B, 1 + N, C];
- ``teacher``: the frozen teacher's own denoiser features on noised inputs at sampled
  timesteps (LADD, Sauer et al. 2024): the outputs of the adapter's ``feature_modules``;
- ``fake_score``: the same features of DMD2's online fake-score network (it trains, so it is
  not frozen; DMD2's critic owns it).

A backbone is not a registered submodule of the discriminator: its weights are not
trained, not checkpointed with the heads and not wrapped by DDP; gradients still flow
through it to the discriminator's input (the student's sample).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distill.discriminators.heads import Heads
from distill.features import dinov2_inputs, load_dinov2


def evenly_spaced_layers(num_layers: int, count: int = 4) -> list[int]:
    """``count`` hidden-state indices spread over a ``num_layers``-deep ViT, ending at the last
    (ADD reads four of DINOv2 ViT-S's twelve layers, evenly spaced)."""
    count = min(count, num_layers)
    return [round(num_layers * (i + 1) / count) for i in range(count)]


class Dinov2Backbone:
    """Frozen DINOv2 features of decoded images in [0, 1]: the hidden states of ``layers``."""

    kind = "tokens"

    def __init__(self, name_or_path: str, layers: list[int] | None = None, device="cpu"):
        self.model, self.size, self.mean, self.std = load_dinov2(name_or_path)
        self.model.to(device)
        depth = self.model.config.num_hidden_layers
        self.layers = list(layers) if layers else evenly_spaced_layers(depth)
        if not all(1 <= i <= depth for i in self.layers):
            raise ValueError(f"DINOv2 layers must be in 1..{depth}, got {self.layers}")
        self.channels = [self.model.config.hidden_size] * len(self.layers)

    def __call__(self, images: Tensor) -> list[Tensor]:
        out = self.model(pixel_values=dinov2_inputs(images, self.size, self.mean, self.std), output_hidden_states=True)
        return [out.hidden_states[i] for i in self.layers]


class _Captured(Exception):
    """Raised by a capturing hook once every module asked for has run: the forward ends there."""


def can_stop_early(denoiser: nn.Module) -> bool:
    """Whether a forward of ``denoiser`` may end part-way, at the last module whose output is
    wanted. Not when something must see every forward run to its end: FSDP units or DeepSpeed
    ZeRO-3 partitions (they gather and release weights in module hooks), activation-checkpointed
    blocks (the hook would fire inside the checkpoint) or a compiled call. Those run the whole
    network; the features are the same, only the compute is not saved. Under FSDP2 (torch 2.13) a
    root forward that raises part-way leaves ``iter_forward_root`` set, so the next root forward
    skips its stream waits until a backward's final callback clears it; recovering would take
    ``reset_iter_state``, which drops in-flight gradients."""
    for module in denoiser.modules():
        if any(c.__name__ in ("FullyShardedDataParallel", "FSDPModule") for c in type(module).__mro__):
            return False
        if getattr(module, "gradient_checkpointing", False) or getattr(module, "_compiled_call_impl", None) is not None:
            return False
    return not any(hasattr(p, "ds_id") for p in denoiser.parameters())


def capture(modules: list[nn.Module], call, *, stop: bool) -> tuple[Tensor | None, list[Tensor]]:
    """(``call()``'s output, the outputs of ``modules`` during it (the first of a tuple), in
    their order). With ``stop`` the call ends as soon as all of them have run and its output is
    None: what comes after (a UNet's decoder, a transformer's later blocks) is neither computed
    nor kept for backward, and gradients through the captured outputs are those of the whole
    forward. DMD2 (Yin et al. 2024) classifies on the fake score's bottleneck the same way."""
    captured: dict[int, Tensor] = {}

    def keep(i, out):
        captured[i] = out[0] if isinstance(out, tuple) else out
        if stop and len(captured) == len(modules):
            raise _Captured

    hooks = [module.register_forward_hook(lambda m, args, out, i=i: keep(i, out)) for i, module in enumerate(modules)]
    output = None
    try:
        output = call()
    except _Captured:
        pass
    finally:
        for hook in hooks:
            hook.remove()
    return output, [captured[i] for i in range(len(modules))]


def denoiser_features(teacher, denoiser: nn.Module, x_t: Tensor, t: Tensor, cond: dict[str, Tensor],
                      layers: list[int] | None = None, *, output: bool = True) -> tuple[Tensor | None, list[Tensor]]:
    """(model output, features [B, C_i, H_i, W_i] of the adapter's ``feature_modules``) from one
    forward of ``denoiser``. ``output=False``: the features only (the output is None), from a
    forward that ends at the last chosen module where ``can_stop_early`` allows."""
    modules = teacher.feature_modules(denoiser)
    chosen = [modules[i] for i in (layers if layers else range(len(modules)))]
    result, features = capture(chosen, lambda: teacher.output(denoiser, x_t, t, cond),
                               stop=not output and can_stop_early(denoiser))
    return (result if output else None), features


def translate_and_cutout(images: Tensor, generator: torch.Generator) -> Tensor:
    """Differentiable augmentation (DiffAugment, Zhao et al. 2020) of [B, C, H, W]: a random
    translation by up to 1/8 of the size (zero padded) and a random cutout of half the
    size, per sample. Applied alike to real and generated inputs, so the discriminator
    cannot tell them apart by it."""
    b, _, h, w = images.shape
    shift = torch.randint(-(h // 8), h // 8 + 1, (b, 2), generator=generator)
    centre = torch.stack([torch.randint(0, h, (b,), generator=generator), torch.randint(0, w, (b,), generator=generator)], 1)
    ys, xs = torch.arange(h).view(1, h, 1), torch.arange(w).view(1, 1, w)
    src_y, src_x = ys - shift[:, 0].view(b, 1, 1), xs - shift[:, 1].view(b, 1, 1)
    inside = (src_y >= 0) & (src_y < h) & (src_x >= 0) & (src_x < w)
    grid = torch.stack([(src_x.expand(b, h, w) * 2 + 1) / w - 1, (src_y.expand(b, h, w) * 2 + 1) / h - 1], dim=-1)
    moved = F.grid_sample(images, grid.to(images), mode="nearest", padding_mode="zeros", align_corners=False)
    cut = ((ys - centre[:, 0].view(b, 1, 1)).abs() < h // 4 + 1) & ((xs - centre[:, 1].view(b, 1, 1)).abs() < w // 4 + 1)
    keep = (inside & ~cut).unsqueeze(1).to(images)
    return moved * keep


class Discriminator(nn.Module):
    """Frozen backbone features -> trainable ``Heads`` -> logits [B, K].

    ``forward(x0, t, noise, cond)``: the ``dinov2`` backbone looks at the decoded clean
    sample (``t`` and ``noise`` unused); the ``teacher`` backbone at ``x0`` noised to ``t``
    with ``noise``, through the frozen teacher's denoiser.
    """

    def __init__(self, *, backbone: str, teacher, dinov2: str | None = None, layers: list[int] | None = None,
                 width: int, device="cpu"):
        super().__init__()
        if backbone not in ("dinov2", "teacher"):
            raise ValueError(f"a standalone discriminator's backbone is dinov2 or teacher, not {backbone!r}")
        self.backbone = backbone
        self._teacher = teacher  # the adapter: decoding, noising, feature modules (not a submodule)
        if backbone == "dinov2":
            self._dinov2 = Dinov2Backbone(dinov2, layers, device)
            channels, kind, self.layers = self._dinov2.channels, "tokens", self._dinov2.layers
        else:
            all_channels = teacher.feature_channels()
            self.layers = list(layers) if layers else list(range(len(all_channels)))
            if not all(0 <= i < len(all_channels) for i in self.layers):
                raise ValueError(f"teacher feature layers must be in 0..{len(all_channels) - 1}, got {self.layers}")
            channels, kind = [all_channels[i] for i in self.layers], "maps"
        self.heads = Heads(kind, channels, width=width, num_classes=teacher.num_classes, cond_dim=teacher.head_condition_dim)

    def forward(self, x0: Tensor, t: Tensor, noise: Tensor, cond: dict[str, Tensor]) -> Tensor:
        teacher = self._teacher
        if self.backbone == "dinov2":
            features = self._dinov2(teacher.decode(x0))
        else:
            x_t = teacher.schedule.add_noise(x0, noise, t)
            _, features = denoiser_features(teacher, teacher.denoiser, x_t, t, cond, self.layers, output=False)
        return self.heads(features, teacher.head_condition(cond))
