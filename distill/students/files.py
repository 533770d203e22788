"""A student on disk: diffusers' format for a full student, peft's adapter files for a LoRA
role; loading it back onto the teacher's network, and fusing a LoRA into it for export."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from torch import Tensor, nn

from distill.students.roles import STUDENT, LoraRole, _add_adapter, _lora_layers, _remove_lora_layers

if TYPE_CHECKING:
    from peft import LoraConfig

ADAPTER_WEIGHTS, ADAPTER_CONFIG = "adapter_model.safetensors", "adapter_config.json"  # peft's file names


def is_lora_checkpoint(directory: str | Path) -> bool:
    """Whether a saved student is a LoRA (peft adapter files) rather than a full network."""
    return (Path(directory) / ADAPTER_CONFIG).is_file()


def lora_state_dict(student: LoraRole) -> tuple[dict[str, Tensor], LoraConfig]:
    """The role's adapter as peft saves it (keys ``<module>.lora_A.weight`` / ``.lora_B.weight``
    without the adapter name) and its ``LoraConfig``. On a sharded base (FSDP2) the tensors
    are gathered whole: a collective every process must join."""
    from peft import get_peft_model_state_dict
    from torch.distributed.tensor import DTensor

    state = get_peft_model_state_dict(student.base, adapter_name=student.adapter)
    state = {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in state.items()}
    return {k: v.detach().contiguous() for k, v in state.items()}, student.base.peft_config[student.adapter]


def save_student(student: nn.Module, directory: str | Path) -> None:
    """A full student: diffusers ``save_pretrained`` (config.json + safetensors). A LoRA role:
    peft's adapter format, ``adapter_model.safetensors`` (its adapter only) and
    ``adapter_config.json`` (the ``LoraConfig``), loadable onto the teacher's network. A role
    on a sharded base is gathered by ``lora_state_dict`` (every process) and written by one
    with ``save_lora_files``, as the trainer's checkpoints do."""
    directory = Path(directory)
    if not isinstance(student, LoraRole):
        student.save_pretrained(directory, safe_serialization=True)
        return
    save_lora_files(*lora_state_dict(student), directory)


def save_lora_files(state: dict[str, Tensor], config: LoraConfig, directory: str | Path) -> None:
    """``lora_state_dict``'s (state, config) as peft's adapter files in ``directory``."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
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
