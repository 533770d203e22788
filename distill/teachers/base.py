"""The teacher-adapter protocol: everything the algorithms, the export, the evaluation and
the config checks may ask of a model family.

Losses, methods, students and the trainer talk to a diffusers checkpoint only through
this protocol; which family it is (pixel UNet, SD, SDXL, DiT, ...) stays inside the adapter.
A *conditioning* is a dict of batch-first tensors that the adapter alone interprets.

A training batch is a dict: ``"image"`` [B, C, H, W] in [-1, 1] (real images, when the data
has them), ``"class_label"`` [B] (class-conditional data), ``"prompt"`` (a list of B strings,
text data), and, when the data comes from the on-disk cache, ``"latent"`` (the encoded
images, x0) and ``"cond.<key>"`` tensors (the conditioning ``condition`` would compute).

The *family facts* (how the family's stock pipeline is laid out and called: which component
holds the denoiser, how it sets timesteps and feeds its scheduler, what its call needs to
sample as the student does) are answered once, by ``TeacherBase``'s defaults, and overridden
by the adapters that differ. Facts that the config checks read before any weights load are
class attributes or static methods (``component``, ``lora_target_modules``,
``pipeline_set_timesteps``, ``reads``); the rest may depend on the loaded checkpoint.
"""

from __future__ import annotations

from typing import Callable, ClassVar, Protocol

import torch
from torch import Tensor, nn

from distill.schedulers import baseline_solvers, solver_label
from distill.schedules import FlowSchedule


class Teacher(Protocol):
    denoiser: nn.Module  # frozen teacher network; students and fake scores start as copies of it
    schedule: object  # distill.schedules.DDPMSchedule | FlowSchedule
    prediction_type: str  # epsilon | v_prediction | sample | flow, from the scheduler config
    scheduler_config: dict  # the checkpoint's own scheduler config
    sample_shape: tuple[int, ...]  # (C, H, W) of x0 in the space the denoiser works in
    num_classes: int | None  # class-conditional checkpoints: real classes (without the null class)
    image_size: tuple[int, int]  # (H, W) of the images it generates (decode's output)
    head_condition_dim: int | None  # width of head_condition's vectors (text: pooled embedding); None for labels / none
    # how guidance reaches the network (distill.denoiser.Denoiser mixes it, nowhere else): "cfg"
    # (classifier-free: cond and null_condition batched), "embedded" (the scale is a network input;
    # such an adapter also has with_guidance(cond, scale) -> cond, which adds it), or None (none possible)
    guidance: str | None
    null_first: bool  # "cfg": the pipeline's batch order, (null, cond) if True else (cond, null)

    # family facts (TeacherBase has the defaults) ------------------------------------------------
    family: ClassVar[str]  # how error messages name the family and its checkpoints
    component: ClassVar[str]  # the pipeline component that holds the denoiser (and a LoRA of it)
    kohya_prefix: ClassVar[str | None]  # key prefix of a kohya / ComfyUI LoRA file; None: no kohya export
    lora_target_modules: ClassVar[tuple[str, ...]]  # the default LoRA targets (peft suffixes)
    step_uses_generator: ClassVar[bool]  # the pipeline passes its generator to scheduler.step (else: global RNG)
    mu: float | None  # the resolution-dependent shift the pipeline passes to set_timesteps; None: none

    @classmethod
    def reads(cls, index: dict) -> bool: ...  # whether its components (model_index.json) are this family's

    @classmethod
    def absent_components(cls, index: dict) -> dict[str, None]: ...  # saved as null: pass as None to load

    @staticmethod
    def pipeline_set_timesteps(scheduler, num_steps: int, device=None, mu: float | None = None) -> Tensor: ...

    def set_timesteps(self, scheduler, num_steps: int, device=None) -> Tensor: ...  # as the pipeline, at this size

    def initial_sample(self, scheduler, noise: Tensor) -> Tensor: ...  # x_T as the pipeline makes it from noise

    def model_input(self, scheduler, x_t: Tensor, t: Tensor) -> Tensor: ...  # what the pipeline feeds the network

    def step_noise(self, shape, *, generator, dtype, device) -> Tensor: ...  # noise as the pipeline's step draws it

    def pipeline_kwargs(self) -> dict: ...  # the pipeline call's kwargs that sample as the student samples

    def register_sample_size(self, denoiser: nn.Module) -> None: ...  # make the trained size the pipeline's default

    def baseline_solvers(self) -> dict[str, Callable]: ...  # name -> scheduler builder from a scheduler config

    def solver_label(self, solver: str) -> str: ...

    # the network and its data ----------------------------------------------------------------
    def to(self, device) -> "Teacher": ...  # move every frozen part (denoiser, VAE, text encoders); returns self

    def condition(self, batch: dict) -> dict[str, Tensor]: ...

    def null_condition(self, cond: dict[str, Tensor]) -> dict[str, Tensor]: ...

    def head_condition(self, cond: dict[str, Tensor]) -> Tensor | None: ...

    def encode_images(self, images: Tensor) -> Tensor: ...

    def decode(self, x0: Tensor, clamp: bool = True) -> Tensor: ...  # images in [0, 1]; clamp=False keeps values outside

    def output(self, denoiser: nn.Module, x_t: Tensor, t: Tensor, cond: dict[str, Tensor]) -> Tensor: ...  # raw, unguided

    def bottleneck(self, denoiser: nn.Module) -> nn.Module: ...

    def bottleneck_channels(self) -> int: ...

    def feature_modules(self, denoiser: nn.Module) -> list[nn.Module]: ...  # outputs: [B, C_i, H_i, W_i] (first of a tuple)

    def feature_channels(self) -> list[int]: ...


COND_PREFIX = "cond."


def cached_condition(batch: dict) -> dict[str, Tensor] | None:
    """The conditioning stored in a cached batch (its ``cond.<key>`` entries), or None."""
    cond = {key[len(COND_PREFIX):]: value for key, value in batch.items() if key.startswith(COND_PREFIX)}
    return cond or None


def present(index: dict, name: str) -> bool:
    """Whether model_index.json has component ``name`` (a dropped one is missing or saved as [null, null])."""
    return bool(index.get(name)) and index[name][0] is not None


def component_class(index: dict, name: str) -> str | None:
    """The class name model_index.json gives component ``name`` (None when absent)."""
    return index[name][1] if present(index, name) else None


# the default LoRA targets of UNet families: attention, feed-forward and the ResNet convolutions
UNET_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1",
                     "conv2", "conv_shortcut", "time_emb_proj")


class TeacherBase:
    """The family facts' defaults: a DDPM-family pipeline whose call multiplies the initial
    noise by ``init_noise_sigma``, scales each model input, sets timesteps with
    ``scheduler.set_timesteps(N)`` and passes its generator to ``scheduler.step``
    (StableDiffusionPipeline's loop). An adapter overrides what its pipeline does otherwise."""

    family: ClassVar[str] = ""
    component: ClassVar[str]
    kohya_prefix: ClassVar[str | None] = None
    lora_target_modules: ClassVar[tuple[str, ...]]
    step_uses_generator: ClassVar[bool] = True
    scales_initial_noise: ClassVar[bool] = True  # latents = noise * scheduler.init_noise_sigma
    scales_model_input: ClassVar[bool] = True  # scheduler.scale_model_input(latents, t) before the network
    mu: float | None = None

    @classmethod
    def reads(cls, index: dict) -> bool:
        raise NotImplementedError

    @classmethod
    def absent_components(cls, index: dict) -> dict[str, None]:
        """Components ``save_pretrained`` wrote as [null, null] (e.g. SD3 without T5, SD without
        its safety checker): ``from_pretrained`` loads the directory only when they are passed
        as None again."""
        return {k: None for k, v in index.items() if not k.startswith("_") and isinstance(v, list) and len(v) == 2
                and v[0] is None}

    @staticmethod
    def pipeline_set_timesteps(scheduler, num_steps: int, device=None, mu: float | None = None) -> Tensor:
        """Set ``scheduler``'s timesteps for ``num_steps`` as the family's pipeline does and return
        them: here ``scheduler.set_timesteps(N)``. ``mu``: the adapter's resolution-dependent
        shift, for pipelines that pass one (FLUX); the export and the config checks call this on
        the class, with the exported scheduler, which shifts statically."""
        scheduler.set_timesteps(num_steps, device=device)
        return scheduler.timesteps

    def set_timesteps(self, scheduler, num_steps: int, device=None) -> Tensor:
        """``pipeline_set_timesteps`` at this adapter's image size (its ``mu``)."""
        return self.pipeline_set_timesteps(scheduler, num_steps, device, mu=self.mu)

    def initial_sample(self, scheduler, noise: Tensor) -> Tensor:
        """The pipeline's first latents from unit Gaussian ``noise`` [B, C, H, W]."""
        return noise * scheduler.init_noise_sigma if self.scales_initial_noise else noise

    def model_input(self, scheduler, x_t: Tensor, t: Tensor) -> Tensor:
        """What the pipeline hands the network for latents ``x_t`` at scheduler timestep ``t``."""
        return scheduler.scale_model_input(x_t, t) if self.scales_model_input else x_t

    def step_noise(self, shape, *, generator: torch.Generator | None, dtype: torch.dtype, device) -> Tensor:
        """Fresh noise of ``shape`` [B, C, H, W] drawn as the pipeline's stochastic
        ``scheduler.step`` draws it (``randn_tensor`` of the latents' shape): what the student's
        sampler re-noises with, so that an export reproduces its samples draw for draw."""
        return torch.randn(shape, generator=generator, dtype=dtype, device=device)

    def pipeline_kwargs(self) -> dict:
        """What ``pipe(prompt_or_labels, num_inference_steps=N, **kwargs)`` needs to sample as the
        student samples (no classifier-free guidance, or the embedded scale it was trained at;
        the trained size where the pipeline cannot take it from the denoiser's config): what
        the model card prints and the conformance tests call."""
        return {}

    def register_sample_size(self, denoiser: nn.Module) -> None:
        """Make this adapter's image size the default of the pipeline that ``denoiser`` goes into
        (the pipelines read ``sample_size`` from the denoiser's config)."""
        denoiser.register_to_config(sample_size=self.sample_shape[-1])

    def baseline_solvers(self) -> dict[str, Callable]:
        """The stock solvers the teacher is compared under (``distill.schedulers.baseline_solvers``):
        flow solvers at this adapter's shift for a flow-matching schedule."""
        return baseline_solvers(self.schedule.shift if isinstance(self.schedule, FlowSchedule) else None)

    def solver_label(self, solver: str) -> str:
        return solver_label(solver, flow=isinstance(self.schedule, FlowSchedule))
