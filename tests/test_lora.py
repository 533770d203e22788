"""LoRA students: one frozen base shared by teacher, student and fake score; the peft
checkpoint format; and the LoRA exports (fused pipeline, diffusers LoRA, kohya keys)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import REPO
from diffusers import DiffusionPipeline, LCMScheduler, UNet2DConditionModel
from diffusers.training_utils import EMAModel
from safetensors.torch import load_file

from distill import config as config_lib
from distill.export import KOHYA_DIR, KOHYA_FILE, LORA_DIR, export
from distill.methods import Critic
from distill.schedules import schedule_from_config
from distill.teachers import StableDiffusionTeacher
from distill.students import (
    FewStepSampler,
    LoraRole,
    enable_gradient_checkpointing,
    eval_copy,
    is_lora_checkpoint,
    load_student,
    lora_config,
    lora_state_dict,
    make_roles,
    make_student,
    save_student,
    set_trainable,
    trainable_parameters,
)

RECIPE = str(REPO / "recipes" / "digits-dmd2-1step.yaml")
TARGETS = list(StableDiffusionTeacher.lora_target_modules)  # the adapter default: attention, feed-forward and resnet layers


def _unet(path) -> UNet2DConditionModel:
    return UNet2DConditionModel.from_pretrained(path, subfolder="unet").requires_grad_(False).eval()


def _inputs(seed=0, batch=2):
    """(x_t [B, 4, 8, 8], t [B], text embeddings [B, 5, 16]) for the tiny SD UNet."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 4, 8, 8, generator=g), torch.tensor([999, 400][:batch]), torch.randn(batch, 5, 16, generator=g)


def _out(model, inputs):
    x, t, text = inputs
    with torch.no_grad():
        return model(x, t, encoder_hidden_states=text).sample


def _adam_step(role, inputs, seed):
    """Two optimizer steps of ``role`` towards a random target (a stand-in for training)."""
    optimizer = torch.optim.Adam(trainable_parameters(role), lr=1e-2)
    x, t, text = inputs
    target = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))
    for _ in range(2):  # the first step moves only B (A's gradient is zero while B = 0)
        loss = (role(x, t, encoder_hidden_states=text).sample - target).square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def _perturb(role, seed):
    """Random adapter weights: every entry of A and B matters to the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in role.parameters():
            p.copy_(0.1 * torch.randn(p.shape, generator=g))


# ------------------------------------------------------------------------------------------ shared base
def test_three_roles_share_one_base_and_train_apart(tiny_sd):
    unet = _unet(tiny_sd)
    original = copy.deepcopy(unet)
    base_numel = sum(p.numel() for p in unet.parameters())
    teacher, student, fake = make_roles(unet, student_lora=lora_config(rank=4, alpha=None, target_modules=TARGETS),
                                        fake_score_lora=lora_config(rank=2, alpha=1.0, target_modules=["to_q", "to_v"]))
    assert teacher is unet and student.base is unet and fake.base is unet
    # no copy: the only new weights are the two adapters
    adapter_numel = sum(p.numel() for p in student.parameters()) + sum(p.numel() for p in fake.parameters())
    assert sum(p.numel() for p in unet.parameters()) == base_numel + adapter_numel
    storages = {p.untyped_storage().data_ptr() for m in (teacher, student, fake) for p in m.parameters()}
    assert len(storages) == len(list(unet.parameters()))
    assert 0 < adapter_numel < base_numel / 2

    s_params, f_params = trainable_parameters(student), trainable_parameters(fake)
    base_ids = {id(p) for n, p in unet.named_parameters() if "lora_" not in n}
    lora_ids = {id(p) for n, p in unet.named_parameters() if ".lora_A." in n or ".lora_B." in n}
    assert {id(p) for p in s_params} <= lora_ids and {id(p) for p in f_params} <= lora_ids
    assert not {id(p) for p in s_params} & {id(p) for p in f_params}
    assert not ({id(p) for p in s_params} | {id(p) for p in f_params}) & base_ids
    assert all(".lora_A." in k or ".lora_B." in k for k in lora_state_dict(student)[0])
    assert set(student.state_dict()) == {f"weights.{k.replace('.', '__')}" for k in lora_state_dict(student)[0]}

    inputs = _inputs()
    reference = _out(original, inputs)
    assert torch.equal(_out(teacher, inputs), reference)
    assert torch.equal(_out(student, inputs), reference)  # B = 0: each role starts at the teacher
    assert torch.equal(_out(fake, inputs), reference)

    _adam_step(student, inputs, seed=1)
    student_after = _out(student, inputs)
    assert (student_after - reference).abs().max() > 1e-3
    assert torch.equal(_out(teacher, inputs), reference)
    assert torch.equal(_out(fake, inputs), reference)
    assert all(p.grad is None for p in f_params)

    _adam_step(fake, inputs, seed=2)
    assert (_out(fake, inputs) - reference).abs().max() > 1e-3
    assert torch.equal(_out(student, inputs), student_after)
    assert torch.equal(_out(teacher, inputs), reference)

    # the teacher adapter's bottleneck hook works through a view, and sees that role's features
    features = {}
    hook = student.mid_block.register_forward_hook(lambda m, a, out: features.__setitem__(len(features), out))
    _out(student, inputs), _out(teacher, inputs)
    hook.remove()
    assert features[0].shape == features[1].shape and not torch.equal(features[0], features[1])
    assert student.config.block_out_channels == unet.config.block_out_channels and student.dtype == torch.float32


def test_trainable_flags_follow_roles_not_peft(tiny_sd):
    unet = _unet(tiny_sd)
    config = lora_config(rank=4, alpha=None, target_modules=TARGETS)
    _, student, fake = make_roles(unet, student_lora=config, fake_score_lora=config)
    critic = Critic(fake, None, torch.nn.Linear(3, 1))
    assert {id(p) for p in trainable_parameters(critic)} == {id(p) for p in fake.parameters()} | {id(p) for p in critic.head.parameters()}
    assert all(p.requires_grad for p in trainable_parameters(student) + trainable_parameters(critic))

    set_trainable(critic, False)  # the trainer's generator phase
    inputs = _inputs()
    for role in (student, fake, student):  # switching adapters must not touch requires_grad (peft's set_adapter would)
        _out(role, inputs)
        assert all(p.requires_grad for p in trainable_parameters(student))
        assert not any(p.requires_grad for p in trainable_parameters(critic))
    set_trainable(student, False)
    set_trainable(critic, True)  # the critic phase
    assert not any(p.requires_grad for p in trainable_parameters(student))
    assert all(p.requires_grad for p in fake.parameters())
    assert not any(p.requires_grad for n, p in unet.named_parameters() if "lora_" not in n)


def test_ema_and_eval_copy_touch_only_the_students_adapter(tiny_sd):
    unet = _unet(tiny_sd)
    original = copy.deepcopy(unet)
    config = lora_config(rank=4, alpha=None, target_modules=TARGETS)
    _, student, fake = make_roles(unet, student_lora=config, fake_score_lora=config)
    inputs = _inputs()
    ema = EMAModel(trainable_parameters(student), decay=0.5)
    for seed in (3, 4):  # diffusers' EMA copies at its first step and averages from the second
        _adam_step(student, inputs, seed=seed)
        ema.step(trainable_parameters(student))
    raw = _out(student, inputs)

    frozen = eval_copy(student)
    assert isinstance(frozen, LoraRole) and frozen.base is unet and not any(p.requires_grad for p in frozen.parameters())
    assert torch.equal(_out(frozen, inputs), raw)
    ema.copy_to(frozen.parameters())
    averaged = _out(frozen, inputs)
    assert (averaged - raw).abs().max() > 1e-4
    assert torch.equal(_out(student, inputs), raw)  # the training weights are untouched
    assert torch.equal(_out(unet, inputs), _out(original, inputs))
    assert torch.equal(_out(fake, inputs), _out(original, inputs))
    assert eval_copy(student).base is unet and torch.equal(_out(frozen, inputs), raw)  # refreshed, not a second adapter
    assert len(unet.peft_config) == 3


def test_gradient_checkpointing_recomputes_each_block_under_its_role(tiny_sd):
    config = lora_config(rank=4, alpha=None, target_modules=TARGETS)
    _, student, fake = make_roles(_unet(tiny_sd), student_lora=config, fake_score_lora=config)
    _perturb(student, seed=6)
    _perturb(fake, seed=7)
    set_trainable(fake, False)
    x, t, text = _inputs()

    def student_grads():
        """DMD2's GAN path: the generator's gradient flows through the frozen fake score."""
        x0 = student(x, t, encoder_hidden_states=text).sample
        fake(x0, t, encoder_hidden_states=text).sample.square().mean().backward()
        grads = [p.grad.clone() for p in student.parameters()]
        student.zero_grad(set_to_none=True)
        return grads

    plain = student_grads()
    enable_gradient_checkpointing(student)
    assert student.base.mid_block.gradient_checkpointing
    checkpointed = student_grads()
    assert all(torch.allclose(a, b, atol=1e-6, rtol=1e-4) for a, b in zip(plain, checkpointed))
    assert max(a.abs().max() for a in plain) > 1e-3


def test_full_roles_are_copies_without_adapters(tiny_sd):
    unet = _unet(tiny_sd)
    _, student, fake = make_roles(unet, student_lora=lora_config(rank=4, alpha=None, target_modules=TARGETS), fake_score_lora=None)
    assert isinstance(student, LoraRole) and type(fake) is UNet2DConditionModel
    assert not any("lora" in k for k in fake.state_dict()) and fake.state_dict().keys() == _unet(tiny_sd).state_dict().keys()
    assert not {p.untyped_storage().data_ptr() for p in fake.parameters()} & {p.untyped_storage().data_ptr() for p in unet.parameters()}
    assert all(p.requires_grad for p in fake.parameters())
    # a full copy made from a base that already carries an adapter drops it
    again = make_student(unet)
    assert not any("lora" in k for k in again.state_dict()) and torch.equal(_out(again, _inputs()), _out(fake, _inputs()))


def test_adapters_train_in_float32_on_a_half_precision_base(tiny_sd):
    unet = UNet2DConditionModel.from_pretrained(tiny_sd, subfolder="unet", torch_dtype=torch.bfloat16).requires_grad_(False)
    student = make_student(unet, lora_config(rank=4, alpha=None, target_modules=TARGETS))
    assert {p.dtype for p in student.parameters()} == {torch.float32} and unet.conv_in.weight.dtype == torch.bfloat16
    x, t, text = _inputs()
    student(x.bfloat16(), t, encoder_hidden_states=text.bfloat16()).sample.float().square().mean().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in student.parameters())
    assert make_student(unet).dtype == torch.float32  # a full copy trains in float32 too


# ------------------------------------------------------------------------------------------ checkpoints
def test_lora_checkpoint_round_trip(tiny_sd, tmp_path):
    student = make_student(_unet(tiny_sd), lora_config(rank=4, alpha=6.0, target_modules=TARGETS))
    _perturb(student, seed=4)
    save_student(student, tmp_path / "student")
    assert is_lora_checkpoint(tmp_path / "student")
    saved = load_file(tmp_path / "student" / "adapter_model.safetensors")
    from peft import get_peft_model_state_dict

    expected = get_peft_model_state_dict(student.base, adapter_name="student")
    assert saved.keys() == expected.keys() and all(torch.equal(saved[k], expected[k]) for k in saved)
    adapter_config = json.loads((tmp_path / "student" / "adapter_config.json").read_text())
    assert adapter_config["r"] == 4 and adapter_config["lora_alpha"] == 6.0

    loaded = load_student(_unet(tiny_sd), tmp_path / "student")
    inputs = _inputs()
    assert torch.equal(_out(loaded, inputs), _out(student, inputs))
    with pytest.raises(TypeError, match="holds a LoRA"):
        load_student(UNet2DConditionModel, tmp_path / "student")

    # accelerate's checkpoints hold the role's state_dict: it resumes onto a fresh base
    resumed = make_student(_unet(tiny_sd), lora_config(rank=4, alpha=6.0, target_modules=TARGETS))
    resumed.load_state_dict(student.state_dict())
    assert torch.equal(_out(resumed, inputs), _out(student, inputs))


def test_full_checkpoint_round_trip(tiny_sd, tmp_path):
    student = make_student(_unet(tiny_sd))
    with torch.no_grad():
        student.conv_in.weight.add_(0.1)
    save_student(student, tmp_path / "student")
    assert not is_lora_checkpoint(tmp_path / "student") and (tmp_path / "student" / "config.json").is_file()
    loaded = load_student(UNet2DConditionModel, tmp_path / "student")
    inputs = _inputs()
    assert torch.equal(_out(loaded, inputs), _out(student, inputs))
    assert not torch.equal(_out(loaded, inputs), _out(_unet(tiny_sd), inputs))


# ------------------------------------------------------------------------------------------ exports
def _run(teacher_path, tmp_path, *, rank, alpha, timesteps, seed=5):
    """A run directory as the trainer writes it (config.yaml, checkpoints/step-000001/student/)
    holding a student with random LoRA weights (or a full copy for rank 0); returns (run, student)."""
    run = tmp_path / "run"
    config = config_lib.load(RECIPE, [f"teacher.path={teacher_path}", f"output_dir={run}", f"student.timesteps={timesteps}",
                                      f"student.lora.rank={rank}", f"student.lora.alpha={alpha}", "eval.every=0",
                                      "eval.features=[]"])
    run.mkdir()
    config_lib.fill_teacher_defaults(config, StableDiffusionTeacher)  # as the trainer does
    config_lib.dump(config, run / "config.yaml")
    lora = config.student.lora
    student = make_student(_unet(teacher_path), lora_config(rank=lora.rank, alpha=lora.alpha, target_modules=lora.target_modules))
    if rank:
        _perturb(student, seed)
    save_student(student, run / "checkpoints" / "step-000001" / "student")
    return run, student


def _latents(pipe, prompt, steps, seed):
    return pipe(prompt, num_inference_steps=steps, guidance_scale=0.0, output_type="latent",
                generator=torch.Generator().manual_seed(seed)).images


@pytest.mark.parametrize("timesteps", [[999], [999, 499]])
def test_fused_pipeline_export_samples_the_lora_student(tiny_sd, tmp_path, timesteps):
    run, student = _run(tiny_sd, tmp_path, rank=4, alpha=8, timesteps=timesteps)
    out = export(run, tmp_path / "export")
    pipe = DiffusionPipeline.from_pretrained(out)
    assert type(pipe).__name__ == "StableDiffusionPipeline" and type(pipe.scheduler) is LCMScheduler
    assert not any("lora" in k for k in pipe.unet.state_dict())  # fused: a plain UNet
    prompts = ["a red cube", "two cats"]
    theirs = _latents(pipe, prompts, len(timesteps), seed=3)

    # the student's own few-step sampler from the same noise and generator
    text = pipe.encode_prompt(prompts, "cpu", 1, False)[0]
    schedule = schedule_from_config(dict(pipe.scheduler.config))
    x0_fn = lambda x_t, t: schedule.to_x0(student(x_t, t, encoder_hidden_states=text).sample, x_t, t, "epsilon")
    generator = torch.Generator().manual_seed(3)
    noise = torch.randn((2, 4, 8, 8), generator=generator)
    ours = FewStepSampler(timesteps, schedule).sample(x0_fn, noise, generator)
    assert theirs.shape == ours.shape == (2, 4, 8, 8)
    assert (theirs - ours).abs().max() < 1e-4
    teacher_pipe = DiffusionPipeline.from_pretrained(tiny_sd)
    teacher_pipe.scheduler = pipe.scheduler
    assert (_latents(teacher_pipe, prompts, len(timesteps), seed=3) - ours).abs().max() > 1e-2  # the LoRA matters

    card = (out / "README.md").read_text()
    assert f"num_inference_steps={len(timesteps)}, guidance_scale=0.0" in card and "LCMScheduler" in card
    assert f"timesteps | {timesteps}" in card and 'load_lora_weights("PATH_TO_THIS_DIRECTORY/lora")' in card
    assert "rank 4, alpha 8" in card


@pytest.mark.parametrize("teacher_fixture,rank,alpha", [("tiny_sd", 4, 8), ("tiny_sd", 4, None), ("tiny_sdxl", 4, 2)])
def test_diffusers_lora_on_the_teacher_equals_the_fused_export(teacher_fixture, rank, alpha, tmp_path, request):
    teacher_path = request.getfixturevalue(teacher_fixture)
    run, _ = _run(teacher_path, tmp_path, rank=rank, alpha="null" if alpha is None else alpha, timesteps=[999])
    out = export(run, tmp_path / "export")
    fused = _latents(DiffusionPipeline.from_pretrained(out), "a red cube", 1, seed=11)

    pipe = DiffusionPipeline.from_pretrained(teacher_path)
    pipe.scheduler = LCMScheduler.from_pretrained(out, subfolder="scheduler")
    plain = _latents(pipe, "a red cube", 1, seed=11)
    pipe.load_lora_weights(out / LORA_DIR)
    with_lora = _latents(pipe, "a red cube", 1, seed=11)
    assert (with_lora - fused).abs().max() < 1e-4
    assert (plain - fused).abs().max() > 1e-2


def test_kohya_file_has_kohya_keys_and_alpha(tiny_sd, tmp_path):
    run, student = _run(tiny_sd, tmp_path, rank=4, alpha=8, timesteps=[999])
    out = export(run, tmp_path / "export", formats=["kohya"])
    assert not (out / "model_index.json").exists() and not (out / LORA_DIR).exists() and (out / "scheduler").is_dir()
    kohya = load_file(out / KOHYA_DIR / KOHYA_FILE)
    peft_state, _ = lora_state_dict(student)
    module = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    peft_module = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    assert torch.equal(kohya[f"{module}.lora_down.weight"], peft_state[f"{peft_module}.lora_A.weight"])
    assert torch.equal(kohya[f"{module}.lora_up.weight"], peft_state[f"{peft_module}.lora_B.weight"])
    assert float(kohya[f"{module}.alpha"]) == 8.0
    for key in ("lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight", "lora_unet_mid_block_resnets_0_time_emb_proj.alpha",
                "lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_ff_net_0_proj.lora_up.weight",
                "lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_attn2_to_out_0.lora_down.weight"):
        assert key in kohya
    pairs = [k for k in kohya if k.endswith(".lora_down.weight")]
    assert len(pairs) == len([k for k in peft_state if k.endswith(".lora_A.weight")]) == len([k for k in kohya if k.endswith(".alpha")])
    assert len(kohya) == 3 * len(pairs)

    # diffusers reads kohya files too: the same LoRA comes back at the same scale
    pipe = DiffusionPipeline.from_pretrained(tiny_sd)
    pipe.scheduler = LCMScheduler.from_pretrained(out, subfolder="scheduler")
    pipe.load_lora_weights(out / KOHYA_DIR, weight_name=KOHYA_FILE)
    text = pipe.encode_prompt("a red cube", "cpu", 1, False)[0]
    inputs = _inputs(batch=1)
    with torch.no_grad():
        theirs = pipe.unet(inputs[0], inputs[1], encoder_hidden_states=text).sample
        ours = student(inputs[0], inputs[1], encoder_hidden_states=text).sample
    assert (theirs - ours).abs().max() < 1e-4


def test_lora_formats_need_a_lora_student(tiny_sd, tmp_path):
    run, _ = _run(tiny_sd, tmp_path, rank=0, alpha="null", timesteps=[999])
    with pytest.raises(ValueError, match="need a LoRA student"):
        export(run, tmp_path / "export", formats=["pipeline", "lora"])
    out = export(run, tmp_path / "export")  # default: the pipeline only
    assert (out / "model_index.json").is_file() and not (out / LORA_DIR).exists() and not (out / KOHYA_DIR).exists()
    card = (out / "README.md").read_text()
    assert "load_lora_weights" not in card and "guidance_scale=0.0" in card
