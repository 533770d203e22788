"""Scale: the student step agreed across ranks, sharded state gathered (FSDP2 on two CPU
processes), data read ahead by workers without breaking resume, per-phase times, the memory
switches (offload, 8-bit AdamW, compile, gradient checkpointing of the transformer families)
and the shipped Accelerate launch configs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, tiny_overrides

from distill import train
from distill.data import EpochSampler, StepBatches, agreed, collate, step_generator
from distill.runs import find_checkpoint

RECIPE_1STEP = str(REPO / "recipes" / "digits-dmd2-1step.yaml")
ACCELERATE_CONFIGS = REPO / "configs" / "accelerate"


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# --------------------------------------------------------------------------------- the student step k
def _k(generator: torch.Generator, shape=(2, 1, 8, 8), steps: int = 4) -> int:
    torch.randn(shape, generator=generator)
    return int(torch.randint(0, steps, (1,), generator=generator))


def test_the_student_step_is_rank_zeros_on_every_rank_and_unchanged_in_one_process():
    draw = lambda g: _k(g)  # noqa: E731  (student_x0's first draws: noise, then k)
    for step in range(40):
        local = {rank: _k(step_generator(5, step, rank)) for rank in range(3)}
        agreed_k = {rank: agreed(step_generator(5, step, rank), draw, local[rank]) for rank in range(3)}
        assert agreed_k == {0: local[0], 1: local[0], 2: local[0]}  # rank 0's own draw, on every rank
    # without the agreement, ranks would disagree (what deadlocks FSDP): the test can fail
    assert any(len({_k(step_generator(5, step, r)) for r in range(3)}) > 1 for step in range(40))
    assert agreed(torch.Generator().manual_seed(0), draw, 7) == 7  # a plain generator: the caller's own draw


def test_student_x0_runs_as_many_forwards_on_every_rank(tiny_teacher):
    from distill.methods.common import student_x0
    from distill.students import FewStepSampler, make_student
    from distill.teachers import load_teacher

    teacher = load_teacher(str(tiny_teacher))
    sampler = FewStepSampler([999, 749, 499, 249], teacher.schedule)
    student, calls = make_student(teacher.denoiser), []
    student.register_forward_pre_hook(lambda m, a: calls.append(1))
    counts = {}
    for rank in (0, 1):
        for index in range(12):
            calls.clear()
            batch = {"class_label": torch.arange(2) + rank}
            student_x0(teacher, sampler, student, batch, teacher.condition(batch), step_generator(3, index, rank), grad=False,
                       backward_simulation=True)
            counts[rank, index] = len(calls)
    assert all(counts[0, i] == counts[1, i] for i in range(12))
    assert len({counts[0, i] for i in range(12)}) > 1  # k varies over steps: simulation ran 0..3 steps


@pytest.fixture(scope="module")
def two_ranks(tiny_teacher, tmp_path_factory) -> dict:
    """What ``tests/two_ranks.py`` found, run once for the tests below: two CPU processes under
    torchrun (gloo)."""
    work = tmp_path_factory.mktemp("two_ranks")
    out = work / "two_ranks.json"
    # torchrun: accelerate launch --cpu starts one process per --num_processes without a process group
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(REPO / "tests" / "two_ranks.py"), str(tiny_teacher), str(out)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "ACCELERATE_USE_CPU": "1"}
    result = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.slow
def test_two_processes_agree_on_forwards_and_fsdp2_gathers_what_is_sharded(two_ranks):
    """Two CPU processes (gloo): the per-rank forward counts of backward simulation, and FSDP2's
    shards read whole by the paths checkpoints, EMA and samples take."""
    found = two_ranks
    assert found["world"] == 2
    rank0, rank1 = found["forwards"]
    assert rank0 == rank1 and len(set(rank0)) > 1
    assert found["sharded"] == "DTensor"
    assert "UNet2DModel" in found["wrap_classes"]  # the denoiser is an FSDP unit of its own
    for key in ("direct_matches_root", "sharded_matches_plain", "weights_gathered", "ema_state_whole", "ema_reloaded",
                "state_keys_match", "copy_matches"):
        assert found[key], key


@pytest.mark.slow
def test_lora_roles_train_on_one_fsdp2_sharded_base_as_on_an_unsharded_one(two_ranks):
    """A LoRA student and a LoRA fake score on the teacher's one network, sharded once with
    FSDP2 across two CPU processes (Accelerate's fsdp2_prepare_model, as the trainer applies
    it), against an unsharded twin trained in one process on both ranks' rows."""
    found = two_ranks["lora"]
    assert found["adapter_type"] == "DTensor"
    assert {"FSDPUNet2DModel", "FSDPResnetBlock2D"} <= set(found["units"])  # the base and its blocks, one unit each
    assert found["frozen_local_fraction"] == pytest.approx(0.5, abs=0.01)  # each rank holds half the frozen teacher
    for key in ("teacher_diff", "student_diff", "eval_diff", "loaded_diff"):  # (max |difference|, allclose 1e-5)
        assert found[key][1] and found[key][0] < 1e-5, (key, found[key])
    # generator phase: the student's 52 adapter tensors all got a gradient and moved; the frozen fake score none
    assert found["generator"][1:] == [52, 0] and found["fake_grads_in_generator_phase"] == 0
    assert found["generator_changed"] == {"student": [52, 52], "fake": [0, 54]}
    # critic phase: the student's adapter (trainable, no gradient) is left alone; the fake score's moved
    # (53 of its 54 tensors: the head's bias is unused by CriticLike)
    assert found["critic"][1:] == [53, 1] and found["critic_changed"] == {"student": [0, 52], "fake": [53, 54]}
    for phase in ("generator", "critic"):  # the clipped gradient norm is the twin's
        assert found[phase][0] == pytest.approx(found[f"twin_{phase}"][0], rel=1e-5)
    assert found["same_on_ranks"] and found["base_unchanged"]
    assert found["twin_diff"] < 1e-4  # every adapter tensor after both AdamW steps (lr 1e-2), gathered, vs the twin's
    assert found["files_diff"][0] and found["files_diff"][1] < 1e-5  # student/ files: the twin student's adapter
    assert found["accelerate_reloaded"] and found["optimizer_reloaded"] and found["ema_whole"]


def test_a_sharded_student_is_saved_from_its_gathered_state(tiny_teacher, tmp_path, monkeypatch):
    """Where the student is sharded the checkpoint's student comes from the gathered state
    dict (``accelerator.get_state_dict``), not from the local module: a gathered state that
    differs from the local one (+1 here) is what lands in student/."""
    from safetensors.torch import load_file

    from distill import parallel

    gathered = []

    def full_state_dict(accelerator, model):
        state = {k: v + 1 for k, v in accelerator.unwrap_model(model).state_dict().items()}
        gathered.append(state)
        return state

    monkeypatch.setattr(parallel, "is_sharded", lambda accelerator: True)
    monkeypatch.setattr(parallel, "full_state_dict", full_state_dict)
    run = tmp_path / "run"
    train.main([RECIPE_1STEP, *tiny_overrides(tiny_teacher, None, run, **{"train.max_steps": 1, "train.sample_every": 0,
                                                                          "train.ema_decay": 0})])
    saved = load_file(find_checkpoint(run) / "student" / "diffusion_pytorch_model.safetensors")
    assert gathered and saved.keys() == gathered[-1].keys()
    assert all(torch.equal(saved[k], gathered[-1][k]) for k in saved)


# --------------------------------------------------------------------------------- which plugin shards what
def _launch(kind: str, **fsdp):
    """A stand-in for an Accelerator launched with ``kind`` (what ``distill.parallel`` reads of one)."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    if kind.startswith("zero"):
        plugin = SimpleNamespace(deepspeed_config={"zero_optimization": {"stage": int(kind[-1])}})
        return SimpleNamespace(distributed_type=DistributedType.DEEPSPEED, is_fsdp2=False, state=SimpleNamespace(deepspeed_plugin=plugin))
    if kind == "ddp":
        return SimpleNamespace(distributed_type=DistributedType.MULTI_GPU, is_fsdp2=False, state=SimpleNamespace())
    plugin = SimpleNamespace(fsdp_version=fsdp.get("version", 2), cpu_ram_efficient_loading=fsdp.get("ram_efficient", False))
    return SimpleNamespace(distributed_type=DistributedType.FSDP, is_fsdp2=plugin.fsdp_version == 2,
                           state=SimpleNamespace(fsdp_plugin=plugin))


def test_check_roles_lets_lora_roles_train_under_fsdp2_ddp_and_zero2_and_refuses_what_cannot(one_thread):
    from distill.parallel import check_roles

    for kind in ("ddp", "zero2", "fsdp2"):
        check_roles(_launch(kind), lora_roles=True, ema=True)
    with pytest.raises(ValueError, match="under DeepSpeed ZeRO-3: ZeRO-3 would partition the adapters away.*fsdp2.yaml"):
        check_roles(_launch("zero3"), lora_roles=True, ema=False)
    with pytest.raises(ValueError, match="LoRA roles under FSDP1.*fsdp_version: 2"):
        check_roles(_launch("fsdp", version=1), lora_roles=True, ema=False)
    with pytest.raises(ValueError, match="fsdp_cpu_ram_efficient_loading: true.*set it to false"):
        check_roles(_launch("fsdp2", ram_efficient=True), lora_roles=True, ema=False)
    check_roles(_launch("fsdp2", ram_efficient=True), lora_roles=False, ema=False)  # full copies: Accelerate's as ever
    check_roles(_launch("zero3"), lora_roles=False, ema=False)
    with pytest.raises(ValueError, match="train.ema_decay > 0 under DeepSpeed ZeRO-3"):
        check_roles(_launch("zero3"), lora_roles=False, ema=True)


def test_the_shared_base_is_sharded_only_under_fsdp2_with_a_lora_role_and_roles_are_left_to_it(tiny_teacher, one_thread):
    """Which networks each role combination shards, and what a role's own prepare call must
    leave to the shared base (its adapter: Accelerate's ignored_modules)."""
    from types import SimpleNamespace

    from distill.methods.dmd2 import Critic
    from distill.parallel import fsdp2_units, role_views, shards_shared_base, wrap_classes
    from distill.students import lora_config, make_roles
    from distill.teachers import load_teacher

    teacher = load_teacher(str(tiny_teacher))
    config = lora_config(rank=2, alpha=None, target_modules=["conv1"])
    _, lora_student, lora_fake = make_roles(teacher.denoiser, student_lora=config, fake_score_lora=config)
    _, full_student, full_fake = make_roles(load_teacher(str(tiny_teacher)).denoiser, student_lora=None, fake_score_lora=None)
    combos = {"both LoRA": (lora_student, lora_fake), "LoRA student": (lora_student, full_fake),
              "LoRA fake score": (full_student, lora_fake), "LoRA student, no fake score": (lora_student, None),
              "full copies": (full_student, full_fake)}
    for name, roles in combos.items():
        lora = name != "full copies"
        assert shards_shared_base(_launch("fsdp2"), list(roles)) is lora, name
        for kind in ("ddp", "zero2", "zero3"):
            assert not shards_shared_base(_launch(kind), list(roles)), (name, kind)
    critic_lora, critic_full = Critic(lora_fake, teacher), Critic(full_fake, teacher)
    assert role_views(critic_lora) == [lora_fake] and role_views(lora_student) == [lora_student]
    assert role_views(critic_full) == [] and role_views(full_student) == []
    plugin = SimpleNamespace(ignored_modules=None, auto_wrap_policy=None, transformer_cls_names_to_wrap=None)
    with fsdp2_units(plugin, critic_lora):
        assert plugin.ignored_modules == [lora_fake] and plugin.transformer_cls_names_to_wrap == []
    assert plugin.ignored_modules is None  # the plugin as it was
    with fsdp2_units(plugin, critic_full):
        assert plugin.ignored_modules is None and plugin.transformer_cls_names_to_wrap == ["UNet2DModel"]
    teacher.denoiser._no_split_modules = ["ResnetBlock2D"]  # a network's own blocks are units of its own prepare call
    assert wrap_classes(teacher.denoiser) == ["ResnetBlock2D"]


def test_a_lora_student_on_a_sharded_base_is_filled_drawn_and_saved_on_every_process(tiny_teacher, tmp_path, monkeypatch):
    """The trainer's path for a shared base that ``shard_shared_base`` shards (here a no-op:
    Accelerate runs no FSDP on a CPU): the eval adapter is injected before sharding and handed
    over with the roles, samples and checkpoints go through it (EMA weights), and student/
    holds the student's adapter files."""
    from safetensors.torch import load_file

    from distill import parallel, runs
    from distill.students import ADAPTER_WEIGHTS

    sharded = []
    monkeypatch.setattr(parallel, "shards_shared_base", lambda accelerator, roles: True)
    monkeypatch.setattr(parallel, "shard_shared_base", lambda accelerator, base, roles: sharded.append(
        [(r.adapter, r.base is base) for r in roles]))
    run = tmp_path / "run"
    train.main([RECIPE_1STEP, *tiny_overrides(tiny_teacher, None, run, **{
        "train.max_steps": 2, "train.sample_every": 2, "train.ema_decay": 0.5, "student.lora.rank": 2,
        "method.fake_score_lora.rank": 2})])
    assert sharded == [[("student", True), ("fake_score", True), ("student_eval", True)]]
    checkpoint = find_checkpoint(run)
    saved = load_file(checkpoint / "student" / ADAPTER_WEIGHTS)
    assert saved and all(".lora_A." in k or ".lora_B." in k for k in saved)
    assert runs.samples_path(run, 2).is_file()


def test_a_full_student_beside_a_lora_fake_score_on_a_sharded_base_is_saved_from_its_gathered_state(
        tiny_teacher, tmp_path, monkeypatch):
    """A full student with a LoRA fake score: the base is sharded for the fake score, so the
    checkpoint's student is built from the student's config (not copied from the sharded
    base) and filled with the gathered state (+1 here, as a gather would differ from the
    local module)."""
    from safetensors.torch import load_file

    from distill import parallel

    gathered = []

    def full_state_dict(accelerator, model):
        gathered.append({k: v + 1 for k, v in accelerator.unwrap_model(model).state_dict().items()})
        return gathered[-1]

    monkeypatch.setattr(parallel, "is_sharded", lambda accelerator: True)
    monkeypatch.setattr(parallel, "full_state_dict", full_state_dict)
    monkeypatch.setattr(parallel, "shards_shared_base", lambda accelerator, roles: True)
    monkeypatch.setattr(parallel, "shard_shared_base", lambda accelerator, base, roles: None)
    run = tmp_path / "run"
    train.main([RECIPE_1STEP, *tiny_overrides(tiny_teacher, None, run, **{
        "train.max_steps": 1, "train.sample_every": 0, "train.ema_decay": 0, "method.fake_score_lora.rank": 2})])
    saved = load_file(find_checkpoint(run) / "student" / "diffusion_pytorch_model.safetensors")
    assert saved.keys() == gathered[-1].keys() and all(torch.equal(saved[k], gathered[-1][k]) for k in saved)


# --------------------------------------------------------------------------------- data, times
def test_step_batches_read_ahead_by_workers_are_the_step_pure_batches():
    from distill.data import DigitsDataset

    dataset = DigitsDataset("train")
    order = EpochSampler(len(dataset), 8, seed=3)
    ahead = StepBatches(dataset, order, start=170, num_workers=2)
    for number in range(170, 190):  # across an epoch boundary (179 batches per epoch)
        batch, expected = ahead.get(number), collate(dataset, order.batch(number))
        assert torch.equal(batch["image"], expected["image"]) and torch.equal(batch["class_label"], expected["class_label"])
    with pytest.raises(RuntimeError, match="micro-batch 5 asked for, but 190 is next"):
        ahead.get(5)


@pytest.mark.slow
def test_a_resumed_run_with_workers_logs_the_losses_of_one_without(tiny_teacher, tmp_path):
    # the first leg stops by a smaller max_steps, which would re-shape a decay over max_steps: constant lr here
    common = {"student.timesteps": "[999,749,499,249]", "train.sample_every": 0, "train.max_steps": 4,
              "optim.student.decay": "constant"}
    full = tmp_path / "full"
    train.main([RECIPE_1STEP, *tiny_overrides(tiny_teacher, None, full, **common)])
    split = tmp_path / "split"
    args = tiny_overrides(tiny_teacher, None, split, **common, **{"train.checkpoint_every": 2, "data.num_workers": 2})
    train.main([RECIPE_1STEP, *args, "train.max_steps=2"])
    train.main([RECIPE_1STEP, *args, "resume=latest"])
    a, b = _rows(full / "losses.jsonl"), _rows(split / "losses.jsonl")
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for ra, rb in zip(a, b):
        for key in ra:
            assert rb[key] == pytest.approx(ra[key], rel=1e-4, abs=1e-6), (ra["step"], key)
    times = _rows(split / "times.jsonl")
    assert [r["step"] for r in times] == [1, 2, 3, 4]  # the resumed run dropped nothing and repeated nothing
    for row in times:
        for phase in ("data", "critic", "generator", "optimizer", "ema", "log", "step"):
            assert row[f"time/{phase}_s"] >= 0
        assert row["time/step_s"] >= row["time/critic_s"] + row["time/generator_s"]
        assert row["time/samples_per_s"] == pytest.approx(4 / row["time/step_s"])


def test_phase_times_exclude_the_phases_inside_them():
    import time

    from distill.timing import PhaseTimer

    timer = PhaseTimer("cpu")
    for _ in range(2):
        with timer.phase("critic"):
            time.sleep(0.02)
            with timer.phase("data"):
                time.sleep(0.03)
        timer.step_done()
    times = timer.read()
    assert times["time/data_s"] == pytest.approx(0.03, abs=0.015)
    assert times["time/critic_s"] == pytest.approx(0.02, abs=0.015)
    assert timer.read() == {}


# --------------------------------------------------------------------------------- memory switches
def test_offload_hooks_the_encoders_or_everything(tiny_sd):
    from distill.offload import Offload
    from distill.teachers import load_teacher

    teacher = load_teacher(str(tiny_sd))
    encoders = Offload(teacher, "encoders", "cpu")
    assert {id(m) for m in encoders.modules} == {id(teacher.vae), id(teacher.text_encoders[0])}
    assert all(hasattr(m, "_hf_hook") for m in encoders.modules) and not hasattr(teacher.denoiser, "_hf_hook")
    encoders.release()
    everything = Offload(load_teacher(str(tiny_sd)), "all", "cpu")
    assert len(everything.modules) == 3
    assert Offload(teacher, "none", "cpu").modules == []


def test_offload_all_with_lora_roles_and_8bit_adam_without_bitsandbytes_fail_before_weights_load(tiny_teacher, tmp_path):
    from importlib.util import find_spec

    from distill import config as config_lib
    from distill.config import ConfigError

    base = tiny_overrides(tiny_teacher, None, tmp_path / "run")
    with pytest.raises(ConfigError, match="teacher.offload: 'all' moves the teacher's denoiser"):
        config_lib.load(RECIPE_1STEP, [*base, "teacher.offload=all", "student.lora.rank=4"])
    config_lib.load(RECIPE_1STEP, [*base, "teacher.offload=all"])  # full copies: fine
    if find_spec("bitsandbytes") is None:
        with pytest.raises(ConfigError, match=r"optim.critic.name: adamw8bit needs bitsandbytes.*distill\[gpu\]"):
            config_lib.load(RECIPE_1STEP, [*base, "optim.critic.name=adamw8bit"])
    with pytest.raises(ConfigError, match="data.num_workers: must not be negative"):
        config_lib.load(RECIPE_1STEP, [*base, "data.num_workers=-1"])


def test_train_compile_compiles_the_teacher_and_the_full_copies(tiny_teacher, tmp_path, monkeypatch):
    """``train.compile`` wires ``nn.Module.compile`` onto each denoiser (recorded here, not run:
    compiling even the tiny test UNet takes minutes on 2 CPU cores and runs slower there)."""
    compiled = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, *a, **k: compiled.append(self))
    from distill.trainer import DistillTrainer

    original = DistillTrainer.train
    seen = {}

    def train_and_look(self):
        seen["teacher"], seen["student"] = self.teacher.denoiser, self.accelerator.unwrap_model(self.student)
        seen["fake"] = self.accelerator.unwrap_model(self.critic).denoiser
        return original(self)

    monkeypatch.setattr(DistillTrainer, "train", train_and_look)
    run = tmp_path / "run"
    train.main([RECIPE_1STEP, *tiny_overrides(tiny_teacher, None, run, **{"train.compile": "true", "train.max_steps": 1,
                                                                          "train.sample_every": 0})])
    assert {id(m) for m in compiled} == {id(seen["teacher"]), id(seen["student"]), id(seen["fake"])}


def _transformers():
    from diffusers import DiTTransformer2DModel, FluxTransformer2DModel, PixArtTransformer2DModel, SD3Transformer2DModel

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([10, 500])
    text = torch.randn(2, 5, 32, generator=g)
    models = {
        "dit": (DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                      num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=10),
                lambda m, x: m(x, timestep=t, class_labels=torch.tensor([1, 2])).sample),
        "pixart": (PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                            num_layers=2, sample_size=8, patch_size=2, cross_attention_dim=16,
                                            caption_channels=32),
                   lambda m, x: m(x, encoder_hidden_states=text, timestep=t,
                                  added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample),
        "sd3": (SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
                                      num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16,
                                      pooled_projection_dim=32, out_channels=4),
                lambda m, x: m(hidden_states=x, timestep=t, encoder_hidden_states=text,
                               pooled_projections=torch.ones(2, 32)).sample),
        "flux": (FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
                                        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16,
                                        guidance_embeds=False, axes_dims_rope=(4, 4, 8)),
                 lambda m, x: m(hidden_states=x.reshape(2, 4, 4, 2, 4, 2).permute(0, 2, 4, 1, 3, 5).reshape(2, 16, 16),
                                timestep=t.float() / 1000, pooled_projections=torch.ones(2, 16), encoder_hidden_states=text,
                                txt_ids=torch.zeros(5, 3), img_ids=torch.zeros(16, 3)).sample),
    }
    return models, x


@pytest.mark.parametrize("family", ["dit", "pixart", "sd3", "flux"])
@pytest.mark.parametrize("lora", [False, True])
def test_gradient_checkpointing_of_the_transformer_families(family, lora, monkeypatch, one_thread):
    """Each family's blocks are recomputed under ``enable_gradient_checkpointing`` (full copies
    and LoRA roles), with the gradients of the run without it."""
    import torch.utils.checkpoint as checkpoint_module

    from distill.students import enable_gradient_checkpointing, lora_config, make_student

    torch.manual_seed(0)
    models, x = _transformers()
    base, call = models[family]
    for module in base.modules():  # DiT's random label dropout (the DiT adapter turns it off too)
        if hasattr(module, "dropout_prob"):
            module.dropout_prob = 0.0
    targets = ["to_q", "to_k", "to_v", "to_out.0"]
    network = make_student(base, lora_config(rank=2, alpha=None, target_modules=targets) if lora else None)
    if lora:
        with torch.no_grad():
            for p in network.parameters():
                p.add_(0.01)  # B = 0 at init: give the adapter a gradient path of its own

    def grads() -> list[torch.Tensor]:
        network.zero_grad(set_to_none=True)
        call(network, x).float().square().mean().backward()
        return [p.grad.clone() for p in network.parameters() if p.grad is not None]

    plain = grads()
    recomputed = []
    original = checkpoint_module.checkpoint
    monkeypatch.setattr(checkpoint_module, "checkpoint", lambda *a, **k: recomputed.append(1) or original(*a, **k))
    enable_gradient_checkpointing(network)
    checkpointed = grads()
    assert len(recomputed) >= 2  # every block went through the checkpoint function
    assert len(plain) == len(checkpointed) > 0
    assert all(torch.allclose(a, b, atol=1e-6, rtol=1e-4) for a, b in zip(plain, checkpointed))


# --------------------------------------------------------------------------------- launch configs
@pytest.mark.parametrize("name, kind", [("ddp", "MULTI_GPU"), ("fsdp2", "FSDP"), ("deepspeed-zero2", "DEEPSPEED"),
                                        ("deepspeed-zero3", "DEEPSPEED")])
def test_the_accelerate_configs_parse(name, kind):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(ACCELERATE_CONFIGS / f"{name}.yaml"))
    assert config.distributed_type.value == kind
    assert str(getattr(config.mixed_precision, "value", config.mixed_precision)) == "no"  # the recipe's decides
    assert config.num_machines == 1 and not config.use_cpu
    if name == "fsdp2":
        fsdp = config.fsdp_config
        assert fsdp["fsdp_version"] == 2 and fsdp["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
        assert fsdp["fsdp_state_dict_type"] == "SHARDED_STATE_DICT"
    if name.startswith("deepspeed"):
        stage = config.deepspeed_config["zero_stage"]
        assert stage == int(name[-1])
        if stage == 3:
            assert config.deepspeed_config["zero3_save_16bit_model"] is True  # get_state_dict gathers for checkpoints


# --------------------------------------------------------------------------------- on a GPU (scripts/gpu_check.sh)
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_approximated_r1_under_half_precision_autocast_is_the_float32_penalty(dtype):
    """APT's approximated R1 divides two nearly equal logits' difference by sigma^2 (sigma = 0.01):
    ``regulariser_context`` runs that forward in float32 under any autocast, so the penalty is
    the float32 one; left to autocast, half precision rounds the difference away."""
    from distill.methods.common import regularised_inputs, regularised_penalty, regulariser_context

    torch.manual_seed(0)
    disc = torch.nn.Sequential(torch.nn.Conv2d(4, 32, 3, padding=1), torch.nn.SiLU(), torch.nn.AdaptiveAvgPool2d(1),
                               torch.nn.Flatten(), torch.nn.Linear(32, 1)).cuda()
    real, fake = torch.randn(8, 4, 32, 32, device="cuda"), torch.randn(8, 4, 32, 32, device="cuda")

    def penalty(autocast_dtype, context: bool) -> float:
        inputs = regularised_inputs("approximated", fake, real, 0.01, torch.Generator("cuda").manual_seed(1))
        with torch.autocast("cuda", dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            with regulariser_context("approximated", "cuda") if context else torch.enable_grad():
                logits = disc(torch.cat(inputs)).squeeze(1)
        return regularised_penalty("approximated", logits, inputs, 0.01, torch.Generator("cuda").manual_seed(2))[0].item()

    reference = penalty(None, True)
    assert reference > 0
    assert penalty(dtype, True) == pytest.approx(reference, rel=1e-4)
    assert penalty(dtype, False) != pytest.approx(reference, rel=0.05)  # what the context prevents
