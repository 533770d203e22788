"""Trainable roles over the teacher's network: a full float32 copy (rank 0), or a LoRA role,
a peft adapter injected into the teacher's own network and seen through ``LoraRole``; and
the peft plumbing that switches adapters per call (see ``distill.students``)."""

from __future__ import annotations

import copy
import sys
import warnings
from contextlib import contextmanager, nullcontext
from typing import TYPE_CHECKING, Iterator, Sequence

import torch
from torch import nn

if TYPE_CHECKING:  # peft (and the transformers it imports) loads on first use: seconds saved for full students
    from peft import LoraConfig
    from peft.tuners.tuners_utils import BaseTunerLayer

STUDENT, FAKE_SCORE = "student", "fake_score"  # adapter names of the two trainable roles


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
        self.bind()

    def bind(self) -> LoraRole:
        """Register the adapter's tensors as the base holds them now: after the base was sharded
        (FSDP2 replaces each parameter by a sharded one), the role owns the shards."""
        self.weights = nn.ParameterDict({key.replace(".", "__"): p for key, p in _adapter_parameters(self.base, self.adapter)})
        return self

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
