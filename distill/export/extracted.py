"""``lora-extract``: a LoRA taken from a fully trained student (``distill.lora_extract``), written
as the LoRA formats the teacher's pipeline loads, and what it costs in images.

The distance is measured where it matters to a user: the teacher's network plus the extracted
LoRA (merged, as ``pipe.fuse_lora`` would) against the full student, both drawn by the
student's few-step sampler from the same seeds and conditioning (``distill.sampling``)."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

from torch import nn

from distill.export.lora import KOHYA_DIR, KOHYA_FILE, LORA_DIR, save_diffusers_lora, save_kohya_lora
from distill.lora_extract import extract_lora, image_distance, lora_fit

DISTANCE_SEEDS = 8  # images drawn by each of the two for the distance; one seed, 0, as eval's grids


def export_extracted_lora(*, pipe, teacher, component: str, student: nn.Module, rank: int, timesteps: list[int],
                          out_dir: Path, prompts: list[str] | None = None) -> dict:
    """Extract the rank-``rank`` LoRA of ``student`` against ``pipe``'s ``component`` and write it:
    ``lora/`` in diffusers' format where the pipeline has a LoRA loader, else peft's adapter
    files (``adapter_model.safetensors`` + ``adapter_config.json``, for ``PeftModel`` or
    ``inject_adapter_in_model``); ``kohya/`` with a loader, for the families that have kohya
    names (the adapter's ``kohya_prefix``). Returns the card's numbers: the weight fit
    (``LoraFit.summary``) and the images' distance to the full student (``image_distance``:
    mean / max abs, PSNR)."""
    from peft import set_peft_model_state_dict

    from distill.sampling import draw_student
    from distill.students import FewStepSampler, fuse
    from distill.students.files import ADAPTER_WEIGHTS
    from distill.students.roles import STUDENT, LoraRole, _add_adapter

    base = pipe.components[component]
    with warnings.catch_warnings():  # what the LoRA cannot carry goes in the card (fit.not_expressed)
        warnings.simplefilter("ignore", UserWarning)
        lora_config, state = extract_lora(base, student, rank=rank)
    fit = lora_fit(base, student, state, lora_config)
    has_loader = hasattr(type(pipe), "save_lora_weights")
    written = []
    if has_loader:
        save_diffusers_lora(type(pipe), component, state, lora_config, out_dir / LORA_DIR)
        written.append(f"{LORA_DIR}/pytorch_lora_weights.safetensors")
        if teacher.kohya_prefix is not None:
            save_kohya_lora(teacher.kohya_prefix, state, lora_config, out_dir / KOHYA_DIR / KOHYA_FILE)
            written.append(f"{KOHYA_DIR}/{KOHYA_FILE}")
    else:
        from safetensors.torch import save_file

        (out_dir / LORA_DIR).mkdir(parents=True, exist_ok=True)
        save_file({k: v.cpu() for k, v in state.items()}, out_dir / LORA_DIR / ADAPTER_WEIGHTS, metadata={"format": "pt"})
        lora_config.save_pretrained(str(out_dir / LORA_DIR))
        written.append(f"{LORA_DIR}/{ADAPTER_WEIGHTS}")
    extracted = copy.deepcopy(base)
    _add_adapter(extracted, lora_config, STUDENT)
    set_peft_model_state_dict(extracted, state, adapter_name=STUDENT)
    extracted = fuse(LoraRole(extracted, STUDENT)).eval()
    sampler = FewStepSampler(timesteps, teacher.schedule, teacher.step_noise)
    ours, _ = draw_student(teacher, extracted, sampler, DISTANCE_SEEDS, 0, DISTANCE_SEEDS, "cpu", prompts)
    full, _ = draw_student(teacher, student, sampler, DISTANCE_SEEDS, 0, DISTANCE_SEEDS, "cpu", prompts)
    distance = {"num_images": DISTANCE_SEEDS, **image_distance(ours, full)}
    return {"rank": rank, "files": written, "fit": fit.summary(), "distance": distance}
