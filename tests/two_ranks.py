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
  full state dict loaded into a plain copy.
"""

from __future__ import annotations

import json
import sys

import torch
from torch import nn


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
    if rank == 0:
        copy = make_student(teacher.denoiser)
        with torch.no_grad():
            for p in copy.parameters():
                p.zero_()
        copy.load_state_dict(full_state)
        with torch.no_grad():
            copy_out = copy(x, t, class_labels=labels).sample
        Path = __import__("pathlib").Path
        Path(out).write_text(json.dumps({
            "world": world, "forwards": gathered, "wrap_classes": names, "sharded": type(params[0]).__name__,
            "direct_matches_root": bool(torch.allclose(direct, through_root, atol=1e-6)),
            "sharded_matches_plain": bool(torch.allclose(direct, reference, atol=1e-5)),
            "weights_gathered": weights_match, "ema_state_whole": ema_whole_ok, "ema_reloaded": ema_reload_ok,
            "state_keys_match": sorted(full_state) == sorted(plain_state),
            "copy_matches": bool(torch.allclose(copy_out, reference, atol=1e-5)),
        }))
    torch.distributed.barrier()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
