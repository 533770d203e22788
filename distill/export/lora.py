"""The LoRA export formats of a LoRA student: diffusers' ``pytorch_lora_weights.safetensors``
for ``pipe.load_lora_weights`` (peft keys, with the ``LoraConfig`` in the file's
``lora_adapter_metadata`` so an alpha other than the rank loads at its scale), and one
safetensors file under kohya / ComfyUI key names (``lora_unet_<module>.lora_down.weight``,
``.lora_up.weight``, ``.alpha``)."""

from __future__ import annotations

import inspect
from pathlib import Path

import torch

LORA_DIR, KOHYA_DIR, KOHYA_FILE = "lora", "kohya", "distill_lora.safetensors"


def save_diffusers_lora(pipeline_class: type, component: str, state: dict, lora_config, directory: Path) -> Path:
    """``pytorch_lora_weights.safetensors`` for ``pipeline_class.load_lora_weights``: the peft
    state dict under ``<component>.`` and the ``LoraConfig`` as the file's
    ``lora_adapter_metadata``. Without that metadata diffusers would assume alpha = rank.
    The keys stay peft's (``lora_A`` / ``lora_B``), as diffusers' own ``save_lora_adapter``
    writes them: ``convert_state_dict_to_diffusers`` renames only attention projections, and
    the loader converts a file only when its first key is not peft's, so a LoRA on
    attention and convolutions would come back half loaded."""
    parameters = inspect.signature(pipeline_class.save_lora_weights).parameters
    if f"{component}_lora_layers" not in parameters:
        raise ValueError(f"{pipeline_class.__name__}.save_lora_weights takes no {component}_lora_layers")
    pipeline_class.save_lora_weights(
        directory,
        **{f"{component}_lora_layers": state, f"{component}_lora_adapter_metadata": lora_config.to_dict()},
        safe_serialization=True,
    )
    return directory


def kohya_state_dict(prefix: str, state: dict, lora_config) -> dict:
    """The peft LoRA ``state`` of a denoiser with kohya / ComfyUI key names (``prefix``: the
    teacher adapter's ``kohya_prefix``): ``<prefix>_<module path with _>.lora_down.weight`` (A),
    ``.lora_up.weight`` (B) and ``.alpha``. diffusers' converter writes alpha = rank; the real
    alpha goes in instead, so loaders scale by alpha / rank as training did."""
    from diffusers.utils import convert_state_dict_to_kohya

    if lora_config.rank_pattern or lora_config.alpha_pattern or lora_config.use_rslora:
        raise ValueError("kohya export takes one rank and alpha for every module (no rank/alpha patterns, no rsLoRA)")
    # the converter names keys after the component they come under ("unet." -> "lora_unet_")
    kohya = convert_state_dict_to_kohya({f"{prefix.removeprefix('lora_')}.{k}": v for k, v in state.items()})
    if not all(k.startswith(f"{prefix}_") for k in kohya):
        raise ValueError(f"diffusers' kohya converter does not write {prefix}_ keys")
    return {k: torch.tensor(float(lora_config.lora_alpha)) if k.endswith(".alpha") else v.contiguous() for k, v in kohya.items()}


def save_kohya_lora(prefix: str, state: dict, lora_config, path: Path) -> Path:
    """One safetensors file of ``kohya_state_dict`` (with kohya's rank / alpha metadata)."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(kohya_state_dict(prefix, state, lora_config), path,
              metadata={"format": "pt", "ss_network_dim": str(lora_config.r), "ss_network_alpha": str(lora_config.lora_alpha)})
    return path
