"""The few-step generator: the teacher's denoiser run at N fixed timesteps, trained as a full
copy or as a LoRA of the frozen teacher.

Sampling (DMD2, Yin et al. 2024, §4.5): the first step denoises pure Gaussian noise as if it
were x_t at ``timesteps[0]``; each later step re-noises the previous x0 estimate to the next
timestep with fresh noise and denoises again. The random draws follow diffusers'
``LCMScheduler`` loop (initial noise, then one draw per re-noising from the same
generator), so an export reproduces these samples in stock diffusers.

LoRA roles. A LoRA student (and DMD2's LoRA fake score) is a peft adapter injected into the
teacher's own denoiser, so one frozen base network serves as teacher, student and fake
score with no copies. The base rests with every adapter off: the teacher, and any code that
holds ``teacher.denoiser``, sees the original network. A ``LoraRole`` is a view of the base
whose forward turns on its one adapter for that call. A role owns only its adapter's
weights: its ``parameters()``, ``requires_grad_``, ``state_dict`` (what accelerate
checkpoints), optimizers, EMA and DDP see that adapter and nothing of the base or of the
other roles' adapters. A full copy (rank 0) is an ordinary module that owns every weight.
"""

from __future__ import annotations

import copy
import sys
import warnings
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

import torch
from torch import Tensor, nn

if TYPE_CHECKING:  # peft (and the transformers it imports) loads on first use: seconds saved for full students
    from peft import LoraConfig
    from peft.tuners.tuners_utils import BaseTunerLayer

X0Fn = Callable[[Tensor, Tensor], Tensor]  # (x_t [B, ...], t [B]) -> x0 [B, ...]

STUDENT, FAKE_SCORE = "student", "fake_score"  # adapter names of the two trainable roles
ADAPTER_WEIGHTS, ADAPTER_CONFIG = "adapter_model.safetensors", "adapter_config.json"  # peft's file names


class FewStepSampler:
    """Sampling and backward simulation over fixed, descending ``timesteps``."""

    def __init__(self, timesteps: list[int], schedule):
        self.timesteps = list(timesteps)
        self.schedule = schedule

    def __len__(self) -> int:
        return len(self.timesteps)

    def timestep(self, index: int, x: Tensor) -> Tensor:
        """``timesteps[index]`` as a [B] tensor for the batch ``x``."""
        return torch.full((x.shape[0],), self.timesteps[index], dtype=torch.long, device=x.device)

    def renoise(self, x0: Tensor, index: int, generator: torch.Generator | None) -> Tensor:
        """x_t at ``timesteps[index]`` from x0 and a fresh draw of noise."""
        noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype, device=generator.device if generator else None)
        return self.schedule.add_noise(x0, noise.to(x0.device), self.timestep(index, x0))

    def simulate(self, x0_fn: X0Fn, noise: Tensor, steps: int, generator: torch.Generator | None) -> Tensor:
        """Run the first ``steps`` steps without gradient; return the input of step ``steps``
        (``noise`` itself when ``steps == 0``): the backward simulation of DMD2 §4.5. Each x0 is
        treated as the checkpoint's scheduler treats it (``schedule.clip_x0``) before re-noising,
        as the exported scheduler does."""
        x_t = noise
        with torch.no_grad():
            for i in range(steps):
                x0 = self.schedule.clip_x0(x0_fn(x_t, self.timestep(i, x_t)))
                x_t = self.renoise(x0, i + 1, generator)
        return x_t

    @torch.no_grad()
    def sample(self, x0_fn: X0Fn, noise: Tensor, generator: torch.Generator | None, num_steps: int | None = None) -> Tensor:
        """x0 after ``num_steps`` (default: all) student steps from ``noise`` [B, C, H, W], clipped
        as the checkpoint's scheduler clips it (``schedule.clip_x0``)."""
        steps = len(self.timesteps) if num_steps is None else num_steps
        x_t = self.simulate(x0_fn, noise, steps - 1, generator)
        return self.schedule.clip_x0(x0_fn(x_t, self.timestep(steps - 1, x_t)))


# ------------------------------------------------------------------------------------------ roles
def lora_config(*, rank: int, alpha: float | None, target_modules: Sequence[str]) -> LoraConfig | None:
    """The peft ``LoraConfig`` of a LoRA role, or None for rank 0 (train every weight).
    ``alpha`` None means alpha = rank (scale 1); LoRA's update is B @ A * alpha / rank."""
    from peft import LoraConfig

    if rank == 0:
        return None
    return LoraConfig(r=rank, lora_alpha=rank if alpha is None else alpha, target_modules=list(target_modules),
                      lora_dropout=0.0)


def make_student(teacher_denoiser: nn.Module, lora: LoraConfig | None = None, *, adapter: str = STUDENT) -> nn.Module:
    """A trainable student (or fake score) initialised at the teacher (the DMD2 initialisation).

    ``lora`` None: a full float32 copy of the teacher's denoiser without any adapters it may
    carry. Otherwise the adapter ``adapter`` is injected into ``teacher_denoiser`` itself
    (B = 0, so the role starts equal to the teacher) and a ``LoraRole`` over it is returned;
    the teacher's output is unchanged, its adapters resting off."""
    if lora is None:
        student = copy.deepcopy(teacher_denoiser)
        if getattr(student, "peft_config", None):  # a copy of a shared base: the bare network, not the other roles' adapters
            _remove_lora_layers(student)
        return student.float().requires_grad_(True).train()
    _add_adapter(teacher_denoiser, lora, adapter)
    return LoraRole(teacher_denoiser, adapter).requires_grad_(True).train()


def make_roles(teacher_denoiser: nn.Module, *, student_lora: LoraConfig | None, fake_score_lora: LoraConfig | None,
               with_fake_score: bool = True) -> tuple[nn.Module, nn.Module, nn.Module | None]:
    """(teacher denoiser, student, fake score or None) over one teacher network.

    The teacher's role is ``teacher_denoiser`` itself: LoRA roles inject their adapters into
    it and leave them off. With both LoRA configs the three roles share its weights and
    nothing is copied; a role whose config is None is a full copy (made before any
    adapter is injected, so it copies the bare network)."""
    fake_score = make_student(teacher_denoiser) if with_fake_score and fake_score_lora is None else None
    student = make_student(teacher_denoiser, student_lora, adapter=STUDENT)
    if with_fake_score and fake_score_lora is not None:
        fake_score = make_student(teacher_denoiser, fake_score_lora, adapter=FAKE_SCORE)
    return teacher_denoiser, student, fake_score


class LoraRole(nn.Module):
    """One adapter of a shared peft-injected base, seen as a network of its own.

    ``forward`` runs the base with this adapter on (and every other adapter off) for that
    call only. Attributes the module does not have (``config``, ``dtype``, ``mid_block``,
    ``down_blocks``, ...) are the base's, so teacher adapters' ``output``, ``bottleneck`` and
    forward hooks work on a role as on the network. The only registered parameters are the
    adapter's, the same tensors the base's LoRA layers use (keys: peft's state-dict keys with
    ``.`` written ``__``); the base is not a submodule, so ``parameters()``, ``requires_grad_``,
    ``state_dict`` / ``load_state_dict``, ``.to()``, optimizers, EMA and DDP touch only this
    adapter. Save with ``save_student``; ``copy.deepcopy`` copies the whole base (prefer
    ``eval_copy``). Turn on gradient checkpointing with ``enable_gradient_checkpointing``,
    which recomputes each block under the adapter it ran with (diffusers' default would
    recompute it after the call, with the adapters off).
    """

    def __init__(self, base: nn.Module, adapter: str):
        super().__init__()
        if adapter not in getattr(base, "peft_config", {}):
            raise ValueError(f"the network has no adapter {adapter!r} (it has {sorted(getattr(base, 'peft_config', {}))})")
        self.__dict__["base"] = base  # not a submodule: its weights are the teacher's
        self.adapter = adapter
        self.weights = nn.ParameterDict({key.replace(".", "__"): p for key, p in _adapter_parameters(base, adapter)})

    def forward(self, *args, **kwargs):
        with _adapters_on(self.base, self.adapter):
            return self.base(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            base = self.__dict__.get("base")
            if base is None:
                raise
            return getattr(base, name)

    def save_pretrained(self, *args, **kwargs):
        raise TypeError("a LoRA role is saved with distill.students.save_student (peft adapter files), "
                        "not with the base network's save_pretrained")

    def __repr__(self) -> str:
        numel = sum(p.numel() for p in self.parameters())
        return f"LoraRole(adapter={self.adapter!r}, base={type(self.base).__name__}, {len(self.weights)} tensors, {numel:,} parameters)"


def trainable_parameters(module: nn.Module) -> list[nn.Parameter]:
    """The weights ``module`` trains: a LoRA role's adapter; all of a full copy; a ``Critic``'s
    fake-score role plus its heads. Role views own only their adapter, so this is
    ``module.parameters()``: written out because a shared base must never reach an optimizer."""
    return list(module.parameters())


def set_trainable(module: nn.Module, flag: bool) -> nn.Module:
    """Set ``requires_grad`` of exactly ``trainable_parameters(module)`` (other roles' adapters
    on the same base keep theirs); returns ``module``."""
    for p in trainable_parameters(module):
        p.requires_grad_(flag)
    return module


def eval_copy(student: nn.Module) -> nn.Module:
    """A frozen copy of the student to sample from or save (e.g. holding EMA weights).

    A full student is deep-copied. A LoRA role gets a sibling adapter ``<adapter>_eval`` on
    the same base (made on the first call, overwritten with the student's current weights on
    each call), so the copy costs one adapter, not a network; its parameters come in the
    student's order, so ``ema.copy_to(copy.parameters())`` fills it."""
    if not isinstance(student, LoraRole):
        return copy.deepcopy(student).eval().requires_grad_(False)
    name = f"{student.adapter}_eval"
    if name not in student.base.peft_config:
        _add_adapter(student.base, student.base.peft_config[student.adapter], name)
    frozen = LoraRole(student.base, name).requires_grad_(False).eval()
    if list(frozen.weights) != list(student.weights):
        raise RuntimeError(f"adapter {name!r} does not mirror {student.adapter!r}")
    with torch.no_grad():
        for key, p in student.weights.items():
            frozen.weights[key].copy_(p)
    return frozen


# ------------------------------------------------------------------------------------------ files
def is_lora_checkpoint(directory: str | Path) -> bool:
    """Whether a saved student is a LoRA (peft adapter files) rather than a full network."""
    return (Path(directory) / ADAPTER_CONFIG).is_file()


def lora_state_dict(student: LoraRole) -> tuple[dict[str, Tensor], LoraConfig]:
    """The role's adapter as peft saves it (keys ``<module>.lora_A.weight`` / ``.lora_B.weight``
    without the adapter name) and its ``LoraConfig``."""
    from peft import get_peft_model_state_dict

    state = get_peft_model_state_dict(student.base, adapter_name=student.adapter)
    return {k: v.detach().contiguous() for k, v in state.items()}, student.base.peft_config[student.adapter]


def save_student(student: nn.Module, directory: str | Path) -> None:
    """A full student: diffusers ``save_pretrained`` (config.json + safetensors). A LoRA role:
    peft's adapter format, ``adapter_model.safetensors`` (its adapter only) and
    ``adapter_config.json`` (the ``LoraConfig``), loadable onto the teacher's network."""
    from safetensors.torch import save_file

    directory = Path(directory)
    if not isinstance(student, LoraRole):
        student.save_pretrained(directory, safe_serialization=True)
        return
    directory.mkdir(parents=True, exist_ok=True)
    state, config = lora_state_dict(student)
    save_file({k: v.cpu() for k, v in state.items()}, directory / ADAPTER_WEIGHTS, metadata={"format": "pt"})
    config.save_pretrained(str(directory))


def load_student(base: nn.Module | type, directory: str | Path, *, adapter: str = STUDENT) -> nn.Module:
    """A saved student, frozen and in eval mode, ready to sample from.

    Full checkpoint: ``from_pretrained`` of ``base``'s class (``base`` may be the class or the
    teacher's network). LoRA checkpoint: ``base`` must be the teacher's network (its weights
    are the LoRA's base); the adapter is injected into it as ``adapter`` and a ``LoraRole``
    returned, so the teacher and the student share one network (``fuse`` makes a plain
    network of it, for export)."""
    from peft import LoraConfig, set_peft_model_state_dict
    from safetensors.torch import load_file

    directory = Path(directory)
    if not is_lora_checkpoint(directory):
        cls = base if isinstance(base, type) else type(base)
        return cls.from_pretrained(directory, use_safetensors=True).eval().requires_grad_(False)
    if isinstance(base, type):
        raise TypeError(f"{directory} holds a LoRA: pass the teacher's network (its base), not the class {base.__name__}")
    _add_adapter(base, LoraConfig.from_pretrained(str(directory)), adapter)
    state = load_file(directory / ADAPTER_WEIGHTS)
    result = set_peft_model_state_dict(base, state, adapter_name=adapter)
    missing = [k for k in result.missing_keys if f".{adapter}." in k]
    if result.unexpected_keys or missing:
        raise ValueError(f"{directory}: the LoRA does not fit the network: unexpected {result.unexpected_keys[:5]}, "
                         f"missing {missing[:5]}")
    return LoraRole(base, adapter).requires_grad_(False).eval()


def fuse(student: nn.Module) -> nn.Module:
    """The student as one plain network. A LoRA role's adapter is merged into its base's
    weights (W + B A alpha / rank) and every peft layer removed, in place: the base is the
    teacher no more. A full student comes back as it is."""
    if not isinstance(student, LoraRole):
        return student
    base = student.base
    for layer in _lora_layers(base):
        layer.merge(adapter_names=[student.adapter])  # layers without this adapter skip it
    _remove_lora_layers(base)
    return base


# ------------------------------------------------------------------------------------------ peft plumbing
def _lora_layers(base: nn.Module) -> list[BaseTunerLayer]:
    if "peft" not in sys.modules:  # no adapter can exist yet, and full students need not pay for the import
        return []
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in base.modules() if isinstance(m, BaseTunerLayer)]


def _adapter_parameters(base: nn.Module, adapter: str) -> Iterator[tuple[str, nn.Parameter]]:
    """(peft state-dict key, parameter) of one adapter, found through the tuner layers."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, layer in base.named_modules():
        if not isinstance(layer, BaseTunerLayer):
            continue
        for attr in layer.adapter_layer_names:
            container = getattr(layer, attr)
            if adapter not in container:
                continue
            item = container[adapter]
            if isinstance(item, nn.Parameter):
                yield f"{name}.{attr}", item
            else:
                for key, p in item.named_parameters():
                    yield f"{name}.{attr}.{key}", p


def _add_adapter(base: nn.Module, config: LoraConfig, adapter: str) -> None:
    """Inject ``adapter`` into ``base`` with peft; afterwards every adapter is off and every
    parameter the base had keeps its ``requires_grad`` (peft's injection and
    ``set_adapter`` would freeze or unfreeze them). The new adapter's weights are float32
    and train."""
    from peft import inject_adapter_in_model
    from peft.tuners.tuners_utils import cast_adapter_dtype

    if adapter in getattr(base, "peft_config", {}):
        raise ValueError(f"the network already has an adapter named {adapter!r}")
    before = {id(p): p.requires_grad for p in base.parameters()}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")  # a second adapter, by design
        inject_adapter_in_model(copy.deepcopy(config), base, adapter_name=adapter)
    cast_adapter_dtype(base, adapter)  # float32 weights on a float16 / bfloat16 base: trainable copies stay float32
    for p in base.parameters():
        p.requires_grad_(before.get(id(p), True))
    for layer in _lora_layers(base):
        _set_state(layer, [adapter], disabled=True)


def _set_state(layer: BaseTunerLayer, active: list[str], disabled: bool) -> None:
    # peft's set_adapter / enable_adapters also flip requires_grad of adapter weights; a role
    # switch must not change which weights train, so set the two fields its forward reads
    layer._active_adapter = active
    layer._disable_adapters = disabled


_ACTIVE = "_distill_active_adapter"  # base.__dict__ key: the adapter on right now (None: all off)


@contextmanager
def _adapters_on(network: nn.Module, adapter: str | None):
    """Inside the block only ``adapter`` is on in ``network``'s LoRA layers (None: every
    adapter off); afterwards the previous state."""
    layers = _lora_layers(network)
    saved = [(layer.active_adapter, layer.disable_adapters) for layer in layers]
    previous = network.__dict__.get(_ACTIVE)
    for layer in layers:
        _set_state(layer, [adapter] if adapter else layer.active_adapters, disabled=adapter is None)
    network.__dict__[_ACTIVE] = adapter
    try:
        yield
    finally:
        for layer, (active, disabled) in zip(layers, saved):
            _set_state(layer, active, disabled)
        network.__dict__[_ACTIVE] = previous


def enable_gradient_checkpointing(network: nn.Module) -> None:
    """Activation checkpointing of a student or fake score (a diffusers model, or a role).

    On a LoRA role it is set on the shared base (so the teacher's calls, under no_grad, pass
    through unchanged). Checkpointed blocks are recomputed during backward, after the role's
    call has returned with the adapters off; the checkpoint function therefore recomputes
    each block with the adapter that was on in its forward, so a backward through student
    and fake score alike (DMD2's GAN term) sees each block as it ran."""
    from functools import partial

    base = network.base if isinstance(network, LoraRole) else network
    base.enable_gradient_checkpointing(gradient_checkpointing_func=partial(_checkpoint, base))


def _checkpoint(base: nn.Module, module: nn.Module, *args, **kwargs):
    from torch.utils.checkpoint import checkpoint

    adapter = base.__dict__.get(_ACTIVE)  # the role running now; its backward comes after the call
    return checkpoint(module.__call__, *args, use_reentrant=False,
                      context_fn=lambda: (nullcontext(), _adapters_on(module, adapter)), **kwargs)


def _remove_lora_layers(network: nn.Module) -> None:
    """Replace every peft layer by the layer it wraps (merged weights, if merged) and forget
    the adapters' configs."""
    from diffusers.utils import recurse_remove_peft_layers

    recurse_remove_peft_layers(network)
    network.__dict__.pop("peft_config", None)
