"""The few-step generator: the teacher's denoiser run at N fixed timesteps (``sampler``),
trained as a full copy or as a LoRA of the frozen teacher (``roles``), saved and loaded
(``files``).

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

from distill.students.files import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, fuse, is_lora_checkpoint, load_student,
                                    lora_state_dict, save_lora_files, save_student)
from distill.students.roles import (FAKE_SCORE, STUDENT, LoraRole, enable_gradient_checkpointing, eval_copy, lora_config,
                                    make_roles, make_student, set_trainable, trainable_parameters)
from distill.students.sampler import FewStepSampler, X0Fn

__all__ = ["ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "FAKE_SCORE", "STUDENT", "FewStepSampler", "LoraRole", "X0Fn",
           "enable_gradient_checkpointing", "eval_copy", "fuse", "is_lora_checkpoint", "load_student", "lora_config",
           "lora_state_dict", "make_roles", "make_student", "save_lora_files", "save_student", "set_trainable", "trainable_parameters"]
