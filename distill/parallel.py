"""The trainer's few words with Accelerate's distributed plugins (DDP, FSDP2, DeepSpeed).

What trains is sharded (FSDP2, DeepSpeed ZeRO-3) or replicated with sharded gradients and
optimizer state (ZeRO-1/2). A full teacher is never prepared: every rank holds all of it
(replicated), in ``teacher.dtype``, and ``teacher.offload`` keeps parts of it in CPU memory.

LoRA roles (``distill.students.LoraRole``) are adapters injected into the teacher's own
network, so teacher, LoRA student and LoRA fake score share one base. Under DDP and ZeRO-1/2
the base stays replicated and each role's prepared module is its adapter. Under FSDP2 the
shared base is sharded once (``shard_shared_base``: Accelerate's own ``fsdp2_prepare_model``,
with the launch config's mesh, mixed precision, reshard and offload settings, per block as
``wrap_classes`` picks them), frozen teacher weights and adapters alike, before any role is
prepared; each role is then prepared on its own with its adapter's parameters (already
shards of the base's units) left to the base (``fsdp2_units`` names them Accelerate's
``ignored_modules``), so its optimizer and Accelerate's checkpoint hold the adapter's shards
and nothing is sharded twice. A role's adapter without a gradient in a phase (the fake
score's in the generator phase) is simply not reduce-scattered: FSDP2 skips parameters without
a gradient, and every rank runs the same graph. DeepSpeed ZeRO-3 would partition the
adapters away from the layers that read them (``check_roles`` refuses it).

- ``prepare_trained``: one ``accelerator.prepare`` call per trained network, as FSDP2 (which
  shards the one model of a call) and DeepSpeed (one engine per model) need; under FSDP2 the
  network's own class and its blocks (diffusers' ``_no_split_modules``) become FSDP units, so
  a frozen critic's denoiser can be called on its own (DMD2's fake score in the generator phase);
- ``backward`` / ``step``: through the network's own DeepSpeed engine (Accelerate's
  ``backward`` knows only the first engine), else Accelerate's;
- ``full_state_dict`` / ``full_tensors``: the gathered weights of a sharded network, a
  collective every rank must join; ``is_sharded`` says when one is needed;
- ``EMA``: diffusers' ``EMAModel`` over sharded parameters, whose checkpoint holds the full
  (gathered) weights, so a checkpoint does not depend on the number of processes.

The FSDP2 paths are checked on CPU only, by two processes over gloo calling the same
Accelerate and torch functions (``tests/two_ranks.py``): Accelerate itself does not run FSDP
on CPU processes.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from diffusers.training_utils import EMAModel
from torch import nn

from distill.students import LoraRole


def uses_deepspeed(accelerator: Accelerator) -> bool:
    return accelerator.distributed_type == DistributedType.DEEPSPEED


def zero_stage(accelerator: Accelerator) -> int | None:
    if not uses_deepspeed(accelerator):
        return None
    return int(accelerator.state.deepspeed_plugin.deepspeed_config.get("zero_optimization", {}).get("stage", 0))


def is_sharded(accelerator: Accelerator) -> bool:
    """Whether trained weights are split across processes (FSDP, DeepSpeed ZeRO-3): reading
    them whole is a collective."""
    return accelerator.distributed_type == DistributedType.FSDP or zero_stage(accelerator) == 3


def check_roles(accelerator: Accelerator, *, lora_roles: bool, ema: bool) -> None:
    """Refuse what a plugin cannot train correctly, before anything is prepared."""
    if lora_roles and zero_stage(accelerator) == 3:
        raise ValueError(
            "LoRA roles (student.lora.rank / method.fake_score_lora.rank > 0) under DeepSpeed ZeRO-3: ZeRO-3 would "
            "partition the adapters away from the frozen teacher layers that read them. Launch with "
            "configs/accelerate/fsdp2.yaml (shards the shared base), deepspeed-zero2.yaml or ddp.yaml")
    if lora_roles and accelerator.distributed_type == DistributedType.FSDP:
        plugin = accelerator.state.fsdp_plugin
        if plugin.fsdp_version != 2:
            raise ValueError("LoRA roles under FSDP1: the shared base is sharded with FSDP2 only; "
                             "set fsdp_version: 2 (configs/accelerate/fsdp2.yaml)")
        if plugin.cpu_ram_efficient_loading:
            raise ValueError("LoRA roles with fsdp_cpu_ram_efficient_loading: true: Accelerate would move each "
                             "role's adapter (the shared base's own tensors) to the meta device; set it to false "
                             "(configs/accelerate/fsdp2.yaml)")
    if ema and zero_stage(accelerator) == 3:
        raise ValueError("train.ema_decay > 0 under DeepSpeed ZeRO-3: ZeRO-3 partitions the weights EMA reads; "
                         "use FSDP2 (configs/accelerate/fsdp2.yaml), ZeRO-2, or train.ema_decay=0")


def shards_shared_base(accelerator: Accelerator, roles: list[nn.Module]) -> bool:
    """Whether the teacher's network, which ``roles`` (LoRA roles, if any) share, is sharded:
    under FSDP2 with at least one LoRA role. Otherwise the teacher is replicated."""
    return accelerator.is_fsdp2 and any(isinstance(r, LoraRole) for r in roles)


def role_views(model: nn.Module) -> list[LoraRole]:
    """The LoRA roles inside ``model`` (itself, or a critic's fake score): views whose
    parameters are the shared base's, so preparing ``model`` must leave them to the base."""
    return [m for m in model.modules() if isinstance(m, LoraRole)]


@contextmanager
def fsdp2_units(plugin, model: nn.Module):
    """Accelerate's FSDP2 plugin set for ``model`` inside the block: ``wrap_classes(model)`` as
    the transformer classes to wrap, and ``model``'s LoRA role views (``role_views``) as
    ``ignored_modules``, their tensors being shards of the shared base already; afterwards
    the plugin as it was."""
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    views = role_views(model)
    ignored = plugin.ignored_modules
    plugin.auto_wrap_policy = transformer_auto_wrap_policy
    plugin.transformer_cls_names_to_wrap = wrap_classes(model)
    if views:
        plugin.ignored_modules = views
    try:
        yield plugin
    finally:
        plugin.ignored_modules = ignored


def shard_shared_base(accelerator, base: nn.Module, roles: list[LoraRole]) -> None:
    """Shard the teacher's network ``base`` (frozen weights and every adapter injected into it)
    once, in place, with Accelerate's ``fsdp2_prepare_model`` and the launch config's FSDP2
    settings: the network and its blocks (``wrap_classes``) are FSDP units. Then each of
    ``roles`` (views of ``base``) registers its adapter's shards, so optimizers built
    afterwards hold them. Its root unit reshards after every forward: weights change outside
    a backward (EMA copied into an eval adapter), and a call must all-gather them anew."""
    from accelerate.utils import fsdp2_prepare_model

    with fsdp2_units(accelerator.state.fsdp_plugin, base):
        fsdp2_prepare_model(accelerator, base)
    base.set_reshard_after_forward(True, recurse=False)
    for role in roles:
        role.bind()


def wrap_classes(model: nn.Module) -> list[str]:
    """FSDP2 units of ``model``: every diffusers / transformers network in it (its class
    name) and the blocks each names in ``_no_split_modules`` (``model``'s own too), where
    they occur. ``model`` itself is always the root unit, so its class is not named."""
    present = {type(m).__name__ for m in model.modules()}
    names: list[str] = []
    for module in model.modules():
        if isinstance(module, LoraRole) or not hasattr(module, "_no_split_modules"):  # diffusers' and transformers' models
            continue  # have it; a role only borrows its base's (the base is sharded on its own, by shard_shared_base)
        own = [] if module is model else [type(module).__name__]
        for name in [*own, *(module._no_split_modules or [])]:
            if name in present and name not in names:
                names.append(name)
    return names


def prepare_trained(accelerator: Accelerator, model: nn.Module, optimizer, schedule, *, micro_batch_size: int,
                    max_grad_norm: float):
    """``accelerator.prepare`` of one trained network with its optimizer and schedule. Under
    DeepSpeed the engine is told the micro-batch (no DataLoader is prepared to tell it) and
    clips at the recipe's ``train.max_grad_norm`` (it clips inside its own step). Under FSDP2
    its units are ``fsdp2_units``'s: a LoRA role's adapter, already sharded with the shared
    base (``shard_shared_base``, called first), is left to the base."""
    if uses_deepspeed(accelerator):
        config = accelerator.state.deepspeed_plugin.deepspeed_config
        config["train_micro_batch_size_per_gpu"] = micro_batch_size
        config["gradient_clipping"] = max_grad_norm
    if accelerator.is_fsdp2:
        with fsdp2_units(accelerator.state.fsdp_plugin, model):
            return accelerator.prepare(model, optimizer, schedule)
    return accelerator.prepare(model, optimizer, schedule)


def backward(accelerator: Accelerator, model, loss: torch.Tensor, *, last_micro_batch: bool) -> None:
    if uses_deepspeed(accelerator):
        model.set_gradient_accumulation_boundary(last_micro_batch)
        model.backward(loss)
    else:
        accelerator.backward(loss)


def deepspeed_step(model) -> torch.Tensor:
    """The engine's update (clipping, optimizer, learning rate, zero grad) and its gradient norm."""
    model.step()
    norm = model.get_global_grad_norm()
    return torch.as_tensor(float("nan") if norm is None else norm, dtype=torch.float32)


def full_state_dict(accelerator: Accelerator, model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole state dict of a prepared network (gathered where sharded: every rank must
    call it; the main process gets the tensors)."""
    return accelerator.get_state_dict(model)


def full_tensors(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each tensor whole: a DTensor (FSDP2 shard) gathered, a plain tensor as it is. A
    collective when any is a DTensor: every rank must call it."""
    from torch.distributed.tensor import DTensor

    return [t.full_tensor() if isinstance(t, DTensor) else t for t in tensors]


class EMA(EMAModel):
    """``EMAModel`` whose ``state_dict`` holds whole tensors when the parameters are FSDP2
    shards (gathered: every rank calls it while Accelerate saves) and whose
    ``load_state_dict`` shards them again like the parameters; without shards it is
    ``EMAModel``'s."""

    def state_dict(self) -> dict:
        state = super().state_dict()
        state["shadow_params"] = [t.detach().cpu() for t in full_tensors(state["shadow_params"])]
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        from torch.distributed.tensor import DTensor, distribute_tensor

        like = list(self.shadow_params)
        super().load_state_dict(state_dict)
        self.shadow_params = [
            distribute_tensor(loaded.to(old.device, old.dtype), old.device_mesh, old.placements)
            if isinstance(old, DTensor) else loaded.to(old.device, old.dtype)
            for old, loaded in zip(like, self.shadow_params)
        ]

    def whole(self) -> list[torch.Tensor]:
        """The EMA weights, whole (a collective where sharded)."""
        return full_tensors(list(self.shadow_params))
