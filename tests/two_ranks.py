"""Two CPU processes (``ACCELERATE_USE_CPU=1 torchrun --standalone --nproc_per_node 2 tests/two_ranks.py TEACHER OUT``)
check what multi-process training needs of ``distill``, and rank 0 writes what they found to
OUT (JSON) for ``tests/test_scale.py``:

- ``forwards``: per micro-batch, the number of student forwards each rank ran in
  ``student_x0`` (backward simulation) with its own step generator: the ranks must agree,
  since under FSDP every forward is a collective;
- ``fsdp``: FSDP2 (``fully_shard`` over gloo, as Accelerate's FSDP2 preparation applies it
  with ``distill.parallel.wrap_classes``) of a critic-shaped module around the teacher's
  UNet: a direct call of the inner denoiser after the root's forward (DMD2's frozen fake score
  in the generator phase), the gathered weights, EMA over shards and its checkpoint, and the
  full state dict loaded into a plain copy;
- ``lora``: a LoRA student and a LoRA fake score on the teacher's one network, that network
  sharded once by ``distill.parallel.shard_shared_base`` (Accelerate's ``fsdp2_prepare_model``
  with an FSDP2 plugin, as the trainer has it) and each role prepared the same way inside
  ``fsdp2_units``, checked against an unsharded twin that trains on both ranks' data in this
  process: the teacher's output (adapters off), one generator-phase step (the fake score's
  adapter frozen, no gradient) and one critic-phase step (the student's adapter without a
  gradient), what each changed, the gathered adapters on both ranks, Accelerate's sharded
  checkpoint of a role and its optimizer saved and loaded, the EMA's gathered state and the
  checkpoint's ``student/`` files (gathered, written by rank 0, loaded onto a plain teacher).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from torch import nn


TARGETS = ["conv1", "conv2", "time_emb_proj", "to_q", "to_v"]  # in the resnet units and in the root's mid-block attention


class FSDP2Launch:
    """What Accelerate's ``fsdp2_prepare_model`` and its FSDP checkpoint functions read of an
    ``Accelerator`` launched with the FSDP2 plugin (Accelerate falls back from FSDP on CPU
    processes, so the test hands them this)."""

    is_fsdp2 = True
    mixed_precision = "no"
    torch_device_mesh = None

    def __init__(self, plugin, rank: int, world: int):
        from types import SimpleNamespace

        self.state = SimpleNamespace(fsdp_plugin=plugin)
        self.process_index, self.num_processes, self.is_main_process = rank, world, rank == 0
        self.device = torch.device("cpu")

    def wait_for_everyone(self):
        torch.distributed.barrier()


class CriticLike(nn.Module):
    """A network with a head beside it, as DMD2's ``Critic`` holds the fake score."""

    def __init__(self, denoiser: nn.Module):
        super().__init__()
        self.denoiser = denoiser
        self.head = nn.Linear(1, 1)

    def forward(self, x, t, labels):
        return self.denoiser(x, t, class_labels=labels).sample + self.head.weight.sum() * 0


def main(teacher_path: str, out: str) -> None:
    from accelerate import PartialState
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from distill.data import step_generator
    from distill.methods.common import student_x0
    from distill.parallel import EMA, full_tensors, wrap_classes
    from distill.students import FewStepSampler, make_student
    from distill.teachers import load_teacher

    state = PartialState(cpu=True)
    rank, world = state.process_index, state.num_processes
    teacher = load_teacher(teacher_path)
    sampler = FewStepSampler([999, 749, 499, 249], teacher.schedule)
    calls = []
    student = make_student(teacher.denoiser)
    student.register_forward_pre_hook(lambda m, a: calls.append(1))
    forwards = []
    for index in range(16):
        calls.clear()
        batch = {"class_label": torch.arange(2) + rank, "image": torch.zeros(2, 1, 8, 8)}
        cond = teacher.condition(batch)
        student_x0(teacher, sampler, student, batch, cond, step_generator(3, index, rank), grad=False,
                   backward_simulation=True)
        forwards.append(len(calls))
    gathered = [None] * world
    torch.distributed.all_gather_object(gathered, forwards)

    # FSDP2, as distill.parallel.prepare_trained has Accelerate apply it
    torch.manual_seed(0)
    original = make_student(teacher.denoiser)
    plain_state = {k: v.clone() for k, v in original.state_dict().items()}
    critic = CriticLike(make_student(teacher.denoiser))
    critic.denoiser.load_state_dict(plain_state)
    names = wrap_classes(critic)
    mesh = init_device_mesh("cpu", (world,))
    for module in reversed(list(critic.modules())[1:]):
        if type(module).__name__ in names:
            fully_shard(module, mesh=mesh)
    fully_shard(critic, mesh=mesh)
    x, t, labels = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([10, 500]), torch.tensor([1, 2])
    with torch.no_grad():
        through_root = critic(x, t, labels)
        direct = critic.denoiser(x, t, class_labels=labels).sample
        reference = original(x, t, class_labels=labels).sample
    critic.reshard()  # the root keeps its weights whole after a forward until told (FSDP2's default for roots)
    params = list(critic.denoiser.parameters())
    whole = [w.clone() for w in full_tensors(params)]
    weights_match = all(torch.equal(w, plain_state[k]) for (k, _), w in zip(critic.denoiser.named_parameters(), whole))
    # what accelerator.get_state_dict reads under FSDP2: the whole state on the main process (before the
    # EMA check below moves the weights)
    full_state = get_model_state_dict(critic.denoiser, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    ema = EMA(params, decay=0.5)
    with torch.no_grad():
        for p in params:
            p.add_(1.0)
    ema.step(params)
    saved = ema.state_dict()  # gathered: whole tensors
    ema_whole_ok = all(s.shape == w.shape and torch.allclose(s, w + 1.0) for s, w in zip(saved["shadow_params"], whole))
    fresh = EMA(params, decay=0.5)
    fresh.load_state_dict(saved)
    reloaded = full_tensors(list(fresh.shadow_params))
    ema_reload_ok = all(torch.allclose(a, b) for a, b in zip(reloaded, saved["shadow_params"]))
    lora = lora_shared_base(teacher_path, str(Path(out).parent / "lora"), rank, world)
    if rank == 0:
        copy = make_student(teacher.denoiser)
        with torch.no_grad():
            for p in copy.parameters():
                p.zero_()
        copy.load_state_dict(full_state)
        with torch.no_grad():
            copy_out = copy(x, t, class_labels=labels).sample
        Path(out).write_text(json.dumps({"lora": lora,
            "world": world, "forwards": gathered, "wrap_classes": names, "sharded": type(params[0]).__name__,
            "direct_matches_root": bool(torch.allclose(direct, through_root, atol=1e-6)),
            "sharded_matches_plain": bool(torch.allclose(direct, reference, atol=1e-5)),
            "weights_gathered": weights_match, "ema_state_whole": ema_whole_ok, "ema_reloaded": ema_reload_ok,
            "state_keys_match": sorted(full_state) == sorted(plain_state),
            "copy_matches": bool(torch.allclose(copy_out, reference, atol=1e-5)),
        }))
    torch.distributed.barrier()


def lora_shared_base(teacher_path: str, work: str, rank: int, world: int) -> dict:
    """The ``lora`` checks (see the module docstring); rank 0's findings, with values."""
    from pathlib import Path

    from accelerate.utils import FullyShardedDataParallelPlugin, fsdp2_prepare_model
    from accelerate.utils.fsdp_utils import load_fsdp_model, load_fsdp_optimizer, save_fsdp_model, save_fsdp_optimizer
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.tensor import DTensor

    from distill import parallel
    from distill.students import (eval_copy, load_student, lora_config, lora_state_dict, make_roles, save_lora_files,
                                  set_trainable, trainable_parameters)
    from distill.teachers import load_teacher

    config = lora_config(rank=2, alpha=None, target_modules=TARGETS)
    fake_config = lora_config(rank=1, alpha=None, target_modules=TARGETS)  # lora_A [1, in]: rank 1's shard of it is empty

    def build():
        teacher = load_teacher(teacher_path)
        _, student, fake = make_roles(teacher.denoiser, student_lora=config, fake_score_lora=fake_config)
        g = torch.Generator().manual_seed(4)
        with torch.no_grad():  # B = 0 at injection: small random adapters give A a gradient too
            for p in [*student.parameters(), *fake.parameters()]:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
        return teacher, student, fake, eval_copy(student)

    teacher, student, fake, eval_role = build()
    twin_teacher, twin_student, twin_fake, twin_eval = build()  # unsharded, trained on both ranks' rows
    base = teacher.denoiser
    base._no_split_modules = ["ResnetBlock2D"]  # the tiny UNet names none; SDXL's UNet names ResnetBlock2D among its blocks
    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, reshard_after_forward=True, auto_wrap_policy="transformer_based_wrap",
                                            state_dict_type="SHARDED_STATE_DICT", cpu_ram_efficient_loading=False)
    launch = FSDP2Launch(plugin, rank, world)
    critic, twin_critic = CriticLike(fake), CriticLike(twin_fake)
    twin_critic.head.load_state_dict(critic.head.state_dict())
    parallel.shard_shared_base(launch, base, [student, fake, eval_role])
    for model in (student, critic):  # what prepare_trained has accelerator.prepare do, one call each
        with parallel.fsdp2_units(plugin, model):
            fsdp2_prepare_model(launch, model)
    units = sorted({type(m).__name__ for m in base.modules() if hasattr(m, "reshard")})
    frozen_keys = [k for k, _ in twin_teacher.denoiser.named_parameters() if "lora_" not in k]
    local = sum(p.to_local().numel() for n, p in base.named_parameters() if "lora_" not in n)
    whole = sum(twin_teacher.denoiser.get_parameter(k).numel() for k in frozen_keys)

    g = torch.Generator().manual_seed(7)
    x, t, labels = torch.randn(4, 1, 8, 8, generator=g), torch.tensor([10, 300, 600, 900]), torch.tensor([1, 2, 3, 4])
    rows = slice(2 * rank, 2 * rank + 2)  # this rank's half of the batch the twin sees whole

    def close(a, b, atol=1e-5):
        return float((a - b).abs().max()), bool(torch.allclose(a, b, atol=atol))

    with torch.no_grad():
        teacher_diff = close(base(x, t, class_labels=labels).sample, twin_teacher.denoiser(x, t, class_labels=labels).sample)
        student_diff = close(student(x, t, class_labels=labels).sample, twin_student(x, t, class_labels=labels).sample)

    def snapshot():
        return {"student": [w.clone() for w in parallel.full_tensors(trainable_parameters(student))],
                "fake": [w.clone() for w in parallel.full_tensors(trainable_parameters(critic))]}

    before = snapshot()
    make_optimizer = lambda params: torch.optim.AdamW(params, lr=1e-2, fused=True)  # noqa: E731  (the trainer's)
    opt_s, opt_c = make_optimizer(trainable_parameters(student)), make_optimizer(trainable_parameters(critic))
    twin_opt_s, twin_opt_c = make_optimizer(trainable_parameters(twin_student)), make_optimizer(trainable_parameters(twin_critic))

    def update(model, optimizer, loss):  # the trainer's _update: backward, clip (torch's, as Accelerate's under FSDP2), step
        loss.backward()
        parameters = [p for p in trainable_parameters(model) if p.grad is not None]
        without = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
        norm = parallel.full_tensors([torch.nn.utils.clip_grad_norm_(parameters, 1.0)])[0]
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(norm), len(parameters), len(without)

    # generator phase: the critic frozen (its adapter gets no gradient), the student trains through it
    set_trainable(critic, False), set_trainable(twin_critic, False)
    generator = update(student, opt_s, critic(student(x[rows], t[rows], class_labels=labels[rows]).sample, t[rows], labels[rows]).mean())
    twin_generator = update(twin_student, twin_opt_s, twin_critic(twin_student(x, t, class_labels=labels).sample, t, labels).mean())
    fake_grads = sum(p.grad is not None for p in trainable_parameters(critic))  # none reduce-scattered, none left
    after_generator = snapshot()
    # critic phase: the student under no_grad (its adapter, still trainable, gets no gradient), the critic trains
    set_trainable(critic, True), set_trainable(twin_critic, True)
    with torch.no_grad():
        x0, twin_x0 = student(x[rows], t[rows], class_labels=labels[rows]).sample, twin_student(x, t, class_labels=labels).sample
    critic_step = update(critic, opt_c, critic(x0, t[rows], labels[rows]).square().mean())
    twin_critic_step = update(twin_critic, twin_opt_c, twin_critic(twin_x0, t, labels).square().mean())
    after_critic = snapshot()

    def changed(a, b):
        return sum(not torch.equal(u, v) for u, v in zip(a, b))

    gathered = [None] * world
    torch.distributed.all_gather_object(gathered, after_critic)
    same_on_ranks = all(torch.equal(u, v) for role in ("student", "fake") for u, v in zip(gathered[0][role], gathered[1][role]))
    twin_weights = {"student": list(trainable_parameters(twin_student)), "fake": list(trainable_parameters(twin_critic))}
    twin_diff = max(float((u - v).abs().max()) for role in ("student", "fake") for u, v in zip(after_critic[role], twin_weights[role]))
    base_state = get_model_state_dict(base, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    # Accelerate's checkpoint of a role (SHARDED_STATE_DICT through DCP) and its optimizer, loaded into moved weights
    directory = Path(work) / "accelerate"
    save_fsdp_model(plugin, launch, student, directory, 0)
    save_fsdp_optimizer(plugin, launch, opt_s, student, directory, 0)
    saved_optimizer = [s["exp_avg"].full_tensor().clone() for s in opt_s.state.values()]
    with torch.no_grad():
        for p in trainable_parameters(student):
            p.add_(1.0)
        for state in opt_s.state.values():
            state["exp_avg"].zero_()
    load_fsdp_model(plugin, launch, student, directory, 0)
    load_fsdp_optimizer(plugin, launch, opt_s, student, directory, 0)
    reloaded = all(torch.equal(u, v) for u, v in zip(parallel.full_tensors(trainable_parameters(student)), after_critic["student"]))
    optimizer_reloaded = all(torch.equal(s["exp_avg"].full_tensor(), w) for s, w in zip(opt_s.state.values(), saved_optimizer))
    # EMA over the shards: its checkpoint holds whole tensors
    ema = parallel.EMA(trainable_parameters(student), decay=0.5)
    ema_state = ema.state_dict()["shadow_params"]
    ema_whole = all(not isinstance(s, DTensor) and torch.equal(s, w) for s, w in zip(ema_state, after_critic["student"]))
    # the checkpoint's student/: the eval adapter filled with the student's shards, sampled on every rank, gathered and written by rank 0
    eval_role = eval_copy(student)
    twin_eval = eval_copy(twin_student)
    with torch.no_grad():
        eval_diff = close(eval_role(x, t, class_labels=labels).sample, twin_eval(x, t, class_labels=labels).sample)
    files = Path(work) / "student"
    state, config = lora_state_dict(eval_role)  # every rank joins the gather, as the trainer's checkpoint does
    if rank == 0:
        save_lora_files(state, config, files)
    torch.distributed.barrier()
    found = {}
    if rank == 0:
        plain = load_teacher(teacher_path).denoiser
        loaded = load_student(plain, files)
        with torch.no_grad():
            found["loaded_diff"] = close(loaded(x, t, class_labels=labels).sample, twin_student(x, t, class_labels=labels).sample)
        written, twin_state = lora_state_dict(loaded)[0], lora_state_dict(twin_student)[0]
        found["files_diff"] = [sorted(written) == sorted(twin_state),
                               max(float((written[k] - twin_state[k]).abs().max()) for k in twin_state)]
        found.update({
            "units": units, "frozen_local_fraction": local / whole, "adapter_type": type(next(iter(student.weights.values()))).__name__,
            "teacher_diff": teacher_diff, "student_diff": student_diff, "eval_diff": eval_diff,
            "generator": generator, "twin_generator": twin_generator, "critic": critic_step, "twin_critic": twin_critic_step,
            "fake_grads_in_generator_phase": fake_grads,
            "generator_changed": {role: [changed(before[role], after_generator[role]), len(before[role])] for role in before},
            "critic_changed": {role: [changed(after_generator[role], after_critic[role]), len(before[role])] for role in before},
            "same_on_ranks": same_on_ranks, "twin_diff": twin_diff,
            "base_unchanged": sorted(base_state) == sorted(k for k, _ in base.named_parameters()) and all(
                torch.equal(base_state[k], twin_teacher.denoiser.get_parameter(k)) for k in frozen_keys),
            "accelerate_reloaded": reloaded, "optimizer_reloaded": optimizer_reloaded, "ema_whole": ema_whole,
        })
    return found


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
