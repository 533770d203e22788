"""The trainer's few words with Accelerate's distributed plugins (DDP, FSDP2, DeepSpeed).

What trains is sharded (FSDP2, DeepSpeed ZeRO-3) or replicated with sharded gradients and
optimizer state (ZeRO-1/2); the frozen teacher is never prepared: every rank holds all of it
(replicated), in ``teacher.dtype``, and ``teacher.offload`` keeps parts of it in CPU memory.
A LoRA role trains a few megabytes of adapter on that replicated base, so sharding it buys
nothing, and FSDP2 / ZeRO-3 would replace the adapter's parameters by shards the base's
layers never read: LoRA roles train under DDP or ZeRO-1/2 (``check_roles``).

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
"""

from __future__ import annotations

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from diffusers.training_utils import EMAModel
from torch import nn


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
    if lora_roles and is_sharded(accelerator):
        raise ValueError(
            "LoRA roles (student.lora.rank / method.fake_score_lora.rank > 0) train adapters on the frozen, "
            "replicated teacher: FSDP and DeepSpeed ZeRO-3 would shard the adapters away from the layers that "
            "use them. Launch with configs/accelerate/ddp.yaml or deepspeed-zero2.yaml")
    if ema and zero_stage(accelerator) == 3:
        raise ValueError("train.ema_decay > 0 under DeepSpeed ZeRO-3: ZeRO-3 partitions the weights EMA reads; "
                         "use FSDP2 (configs/accelerate/fsdp2.yaml), ZeRO-2, or train.ema_decay=0")


def wrap_classes(model: nn.Module) -> list[str]:
    """FSDP2 units of ``model``: every diffusers / transformers network in it (its class
    name) and the blocks it names in ``_no_split_modules``, where they occur."""
    present = {type(m).__name__ for m in model.modules()}
    names: list[str] = []
    for module in model.modules():
        if module is model or not hasattr(module, "_no_split_modules"):  # diffusers' and transformers' models have it
            continue
        for name in [type(module).__name__, *(module._no_split_modules or [])]:
            if name in present and name not in names:
                names.append(name)
    return names


def prepare_trained(accelerator: Accelerator, model: nn.Module, optimizer, schedule, *, micro_batch_size: int,
                    max_grad_norm: float):
    """``accelerator.prepare`` of one trained network with its optimizer and schedule. Under
    DeepSpeed the engine is told the micro-batch (no DataLoader is prepared to tell it) and
    clips at the recipe's ``train.max_grad_norm`` (it clips inside its own step)."""
    if uses_deepspeed(accelerator):
        config = accelerator.state.deepspeed_plugin.deepspeed_config
        config["train_micro_batch_size_per_gpu"] = micro_batch_size
        config["gradient_clipping"] = max_grad_norm
    if accelerator.is_fsdp2:
        from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

        plugin = accelerator.state.fsdp_plugin
        plugin.auto_wrap_policy = transformer_auto_wrap_policy
        plugin.transformer_cls_names_to_wrap = wrap_classes(model)
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
