"""A LoRA extracted from a fully trained student, and how close it comes to the student.

For every Linear / Conv2d layer whose weight the student changed, ΔW = W_student − W_teacher
(a convolution's [out, in, kh, kw] read as [out, in·kh·kw]) is cut to its best rank-r
approximation in Frobenius norm, the truncated SVD (Eckart–Young):

    ΔW ≈ B A,   B = U_r diag(√s_r)  [out, r],   A = diag(√s_r) V_rᵀ  [r, in·kh·kw],

with alpha = r, so the LoRA's update B A · alpha / r is B A itself. A layer with fewer than r
singular values gets them all and zero rows / columns up to r, so every layer has one rank
and one alpha, as kohya files need. The weights come out in peft's key layout
(``<module>.lora_A.weight`` / ``.lora_B.weight``, as ``distill.students.lora_state_dict``
gives them) with a ``LoraConfig``, so ``distill.export.save_diffusers_lora`` (for
``pipe.load_lora_weights``) and ``kohya_state_dict`` write it unchanged.

A LoRA carries only Linear / Conv2d weights. Anything else the student changed (biases, norm
weights, embeddings, layers left out of ``target_modules``) is not in it: ``extract_lora``
warns with the names and ``lora_fit`` reports each one's relative change, next to the
per-layer and overall relative error ‖ΔW − BA‖_F / ‖ΔW‖_F and energy kept. What that costs
in images is ``pipeline_image_distance``: full student against teacher + LoRA from the same
seeds.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterator, Sequence

import torch
from torch import Tensor, nn

from distill.students import lora_config as make_lora_config

if TYPE_CHECKING:
    from peft import LoraConfig


@dataclass(frozen=True)
class LayerFit:
    """One layer: ‖ΔW − BA‖_F / ‖ΔW‖_F, the energy kept 1 − that² (for the truncated SVD,
    Σ_{i≤r} s_i² / Σ s_i²) and ‖ΔW‖_F."""

    relative_error: float
    energy_kept: float
    delta_norm: float


@dataclass
class LoraFit:
    """How well a LoRA on the teacher reproduces a student's weights.

    ``layers``: a ``LayerFit`` per LoRA module. ``relative_error``: over all of them,
    √(Σ ‖ΔW − BA‖²) / √(Σ ‖ΔW‖²); ``energy_kept`` = 1 − relative_error². ``not_expressed``:
    each parameter the student changed that the LoRA does not carry, with its relative change
    ‖Δp‖ / ‖p_teacher‖ (inf where the teacher's is zero)."""

    layers: dict[str, LayerFit]
    relative_error: float
    energy_kept: float
    rank: int
    not_expressed: dict[str, float] = field(default_factory=dict)

    def summary(self) -> dict:
        """Flat numbers for a model card or metrics.json."""
        worst = max(self.layers, key=lambda k: self.layers[k].relative_error)
        return {"lora_rank": self.rank, "lora_layers": len(self.layers), "lora_relative_error": self.relative_error,
                "lora_energy_kept": self.energy_kept, "lora_worst_layer": worst,
                "lora_worst_layer_error": self.layers[worst].relative_error,
                "lora_not_expressed": sorted(self.not_expressed)}


def extract_lora(teacher_network: nn.Module, student_network: nn.Module, *, rank: int,
                 target_modules: Sequence[str] | str | None = None) -> tuple[LoraConfig, dict[str, Tensor]]:
    """(peft ``LoraConfig``, peft state dict) of the rank-``rank`` LoRA on ``teacher_network``
    closest to ``student_network`` (same architecture) in every layer it covers.

    ``target_modules``: peft's matching (names or name suffixes, or one regex); the layers
    covered are the targeted Linear / Conv2d layers whose weight changed. Default: every
    changed Linear / Conv2d layer. The config's ``target_modules`` lists exactly the covered
    modules. The SVD runs in float32 on the weights' device; the LoRA weights are float32."""
    if rank < 1:
        raise ValueError(f"the LoRA rank must be at least 1, got {rank}")
    state: dict[str, Tensor] = {}
    covered = set()
    for name, delta, shape in _weight_deltas(teacher_network, student_network, target_modules):  # one layer in memory at a time
        covered.add(name)
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        k = min(rank, len(s))
        root = s[:k].sqrt()
        up = delta.new_zeros(delta.shape[0], rank)
        down = delta.new_zeros(rank, delta.shape[1])
        up[:, :k] = u[:, :k] * root
        down[:k] = root[:, None] * vh[:k]
        if len(shape) == 4:  # peft's Conv2d LoRA: A is a conv with the layer's kernel, B a 1x1 conv
            down, up = down.view(rank, *shape[1:]), up.view(shape[0], rank, 1, 1)
        state[f"{name}.lora_A.weight"] = down.contiguous()
        state[f"{name}.lora_B.weight"] = up.contiguous()
    if not covered:
        raise ValueError("the student's Linear / Conv2d weights equal the teacher's in every targeted layer: nothing to extract")
    missing = _not_expressed(teacher_network, student_network, covered)
    if missing:
        warnings.warn(f"the extracted LoRA cannot carry {len(missing)} changed parameter(s) of the student (only Linear / "
                      f"Conv2d weights go into a LoRA): {', '.join(sorted(missing)[:10])}"
                      + (", ..." if len(missing) > 10 else ""), stacklevel=2)
    return make_lora_config(rank=rank, alpha=None, target_modules=sorted(covered)), state


def lora_fit(teacher_network: nn.Module, student_network: nn.Module, state: dict[str, Tensor], lora_config) -> LoraFit:
    """How closely teacher + the LoRA ``state`` (peft keys, scale alpha / r) reproduces the
    student's weights, layer by layer; and what the student changed that the LoRA lacks."""
    if lora_config.rank_pattern or lora_config.alpha_pattern or lora_config.use_rslora or lora_config.use_dora:
        raise ValueError("lora_fit takes one rank and alpha for every module (no patterns, rsLoRA or DoRA)")
    scale = lora_config.lora_alpha / lora_config.r
    modules = sorted({key.rsplit(".lora_", 1)[0] for key in state})
    layers, error_sq, delta_sq = {}, 0.0, 0.0
    for name, delta, _ in _weight_deltas(teacher_network, student_network, modules, exact=True, changed_only=False):
        up, down = state[f"{name}.lora_B.weight"], state[f"{name}.lora_A.weight"]
        product = (up.flatten(1).float() @ down.flatten(1).float()).to(delta.device) * scale
        err, norm = float((delta - product).norm()), float(delta.norm())
        relative = err / norm if norm > 0 else (0.0 if err == 0 else math.inf)
        layers[name] = LayerFit(relative_error=relative, energy_kept=1 - relative**2, delta_norm=norm)
        error_sq, delta_sq = error_sq + err**2, delta_sq + norm**2
    if set(layers) != set(modules):
        raise ValueError(f"the LoRA names modules that are no Linear / Conv2d layer of the network: {sorted(set(modules) - set(layers))[:5]}")
    overall = math.sqrt(error_sq / delta_sq) if delta_sq > 0 else 0.0
    return LoraFit(layers=layers, relative_error=overall, energy_kept=1 - overall**2, rank=lora_config.r,
                   not_expressed=_not_expressed(teacher_network, student_network, set(modules)))


# ------------------------------------------------------------------------------------------ images
def image_distance(images: Tensor, reference: Tensor) -> dict[str, float]:
    """Distance of images [N, C, H, W] in [0, 1] from ``reference`` (same shape): mean and
    max absolute pixel difference, and PSNR in dB at peak 1, 10 log10(1 / MSE) over all
    pixels (inf for identical images)."""
    if images.shape != reference.shape:
        raise ValueError(f"image_distance needs two image sets of one shape, got {tuple(images.shape)} and {tuple(reference.shape)}")
    diff = images.double() - reference.double()
    mse = float(diff.square().mean())
    return {"mean_abs_diff": float(diff.abs().mean()), "max_abs_diff": float(diff.abs().max()),
            "psnr_db": 10 * math.log10(1 / mse) if mse > 0 else math.inf}


@torch.no_grad()
def pipeline_images(pipe, seeds: Sequence[int], **call) -> Tensor:
    """Images [len(seeds) * B, 3, H, W] in [0, 1] of a stock diffusers pipeline, one call per
    seed with ``generator=torch.Generator(pipe.device).manual_seed(seed)`` (the initial noise
    and any re-noising come from it) and ``output_type="pt"``; ``call``: the rest of the
    call, e.g. ``prompt=[...], num_inference_steps=N, guidance_scale=0.0``."""
    out = []
    for seed in seeds:
        generator = torch.Generator(pipe.device).manual_seed(seed)
        out.append(pipe(**call, generator=generator, output_type="pt").images.float().cpu())
    return torch.cat(out)


def pipeline_image_distance(pipe, reference_pipe, *, seeds: Sequence[int] = (0, 1, 2, 3), **call) -> dict[str, float]:
    """``image_distance`` of ``pipe``'s images from ``reference_pipe``'s, both drawn from the
    same seeds and call (``pipeline_images``): e.g. teacher + extracted LoRA against the full
    student, both with the student's few-step scheduler."""
    return image_distance(pipeline_images(pipe, seeds, **call), pipeline_images(reference_pipe, seeds, **call))


# ------------------------------------------------------------------------------------------ weights
def _lora_layer(module: nn.Module) -> bool:
    """Layers a peft LoRA reproduces exactly: Linear, and Conv2d without groups or dilation."""
    if isinstance(module, nn.Linear):
        return True
    return isinstance(module, nn.Conv2d) and module.groups == 1 and module.dilation == (1, 1)


def _check_pair(teacher: nn.Module, student: nn.Module) -> None:
    if getattr(teacher, "peft_config", None) or getattr(student, "peft_config", None):
        raise ValueError("extract a LoRA from plain networks: this one carries peft adapters (fuse or remove them first)")
    t_shapes = {k: p.shape for k, p in teacher.named_parameters()}
    s_shapes = {k: p.shape for k, p in student.named_parameters()}
    if t_shapes != s_shapes:
        differ = sorted(set(t_shapes) ^ set(s_shapes)) or [k for k in t_shapes if t_shapes[k] != s_shapes[k]]
        raise ValueError(f"teacher and student are not one architecture: parameters differ at {differ[:5]}")


def _weight_deltas(teacher: nn.Module, student: nn.Module, targets, *, exact: bool = False,
                   changed_only: bool = True) -> Iterator[tuple[str, Tensor, torch.Size]]:
    """(module name, ΔW as a float32 matrix [out, in·kh·kw], the weight's shape) of each of the
    LoRA-able layers that ``targets`` names (None: all of them; ``exact``: module names
    as they are, else peft's matching), by default only those whose weight changed."""
    _check_pair(teacher, student)
    teacher_modules = dict(teacher.named_modules())
    if targets is None or exact:
        wanted = None if targets is None else set(targets)
        match = lambda name: wanted is None or name in wanted
    else:
        from peft import LoraConfig
        from peft.tuners.tuners_utils import check_target_module_exists

        config = LoraConfig(r=1, target_modules=targets if isinstance(targets, str) else list(targets))
        match = lambda name: bool(check_target_module_exists(config, name))
    for name, module in student.named_modules():
        if not name or not _lora_layer(module) or not match(name):
            continue
        w_student = module.weight.detach()
        w_teacher = teacher_modules[name].weight.detach().to(w_student.device)
        if changed_only and torch.equal(w_student.float(), w_teacher.float()):
            continue
        yield name, (w_student.float() - w_teacher.float()).flatten(1), w_student.shape


def _not_expressed(teacher: nn.Module, student: nn.Module, covered: set[str]) -> dict[str, float]:
    """{parameter name: ‖Δp‖ / ‖p_teacher‖} of every parameter the student changed outside
    the weights of the ``covered`` modules."""
    covered_weights = {f"{name}.weight" for name in covered}
    teacher_params = dict(teacher.named_parameters())
    out = {}
    for name, p_student in student.named_parameters():
        if name in covered_weights:
            continue
        p_student = p_student.detach().float()
        p_teacher = teacher_params[name].detach().to(p_student.device).float()
        if torch.equal(p_student, p_teacher):
            continue
        base = float(p_teacher.norm())
        change = float((p_student - p_teacher).norm())
        out[name] = change / base if base > 0 else math.inf
    return out
