"""The method registry: the names it supplies, each method's own recipe section, and a method
without a critic that trains through the real trainer because the trainer names no method."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch
from conftest import REPO, tiny_overrides

from distill import config as config_lib
from distill import train
from distill.denoiser import Denoiser
from distill.methods import METHODS, ADDConfig, DMD2Config, LADDConfig, MethodConfig
from distill.methods.common import student_x0, to_device
from distill.runs import find_checkpoint
from distill.sections import check_positive, setting

RECIPE = str(REPO / "recipes" / "digits-dmd2-1step.yaml")


def test_the_registry_names_each_method_once():
    assert METHODS == {"dmd2": DMD2Config, "add": ADDConfig, "ladd": LADDConfig}
    assert all(section().name == name for name, section in METHODS.items())


def test_method_name_picks_the_section_and_its_defaults(tiny_teacher):
    base = [f"teacher.path={tiny_teacher}", "eval.features=[]", "eval.classifier=null"]
    ladd = config_lib.load(None, [*base, "method.name=ladd"]).method
    assert isinstance(ladd, LADDConfig)
    assert ladd.gan.discriminator.backbone == "teacher" and ladd.distill_weight == 0.0 and ladd.gan.loss == "hinge"
    add = config_lib.load(None, [*base, "method.name=add", "method.gan.discriminator.backbone=teacher"]).method
    assert type(add) is ADDConfig and add.distill_weight == 2.5 and not hasattr(add, "dmd_weight")
    assert not hasattr(config_lib.load(None, base).method, "distill_weight")


def test_an_unknown_method_lists_the_registered_names(tiny_teacher):
    with pytest.raises(config_lib.ConfigError, match=r"<defaults>: method.name: unknown method 'sid'; choose from dmd2, add, ladd"):
        config_lib.load(None, [f"teacher.path={tiny_teacher}", "method.name=sid"])


def test_a_key_of_another_method_names_the_method_whose_keys_apply(tiny_teacher):
    with pytest.raises(config_lib.ConfigError, match=r"method.dmd_weight: unknown key; method \(ladd\) takes name, critic_updates"):
        config_lib.load(None, [f"teacher.path={tiny_teacher}", "method.name=ladd", "method.dmd_weight=1"])


# ------------------------------------------------------------------------------ a method without a critic
@dataclass
class RegressionConfig(MethodConfig):
    """A toy method: the student's x0 regresses on the teacher's x0 of the same noisy input."""

    name: str = setting("regression", "the method")
    t: int = setting(500, "timestep of the student's and the teacher's input")

    def check(self, *, num_steps: int, backward_simulation: bool) -> None:
        check_positive({"method.t": self.t})

    def build(self, *, teacher, sampler, guidance_scale: float, backward_simulation: bool):
        return Regression(teacher, sampler, guidance_scale)


class Regression:
    critic_updates, with_fake_score, fake_score_lora = 0, False, None

    def __init__(self, teacher, sampler, guidance_scale):
        self.teacher, self.sampler = teacher, sampler
        self.mu_real = Denoiser(teacher, teacher.denoiser, guidance_scale)

    def build_critic(self, *, fake_score, device):
        return None

    def generator_loss(self, student, critic, batch, generator, device):
        assert critic is None
        cond = to_device(self.teacher.condition(batch), device)
        x0_student, _ = student_x0(self.teacher, self.sampler, student, to_device(batch, device), cond, generator,
                                   grad=True, backward_simulation=True)
        with torch.no_grad():
            x_t = self.teacher.schedule.add_noise(x0_student.detach(), torch.randn(x0_student.shape, generator=generator), 500)
            x0_teacher = self.mu_real.x0(x_t, torch.full((len(x_t),), 500), cond)
        loss = (x0_student - x0_teacher).square().mean()
        return loss, {"generator_loss": loss.detach()}

    def critic_loss(self, *args):
        raise AssertionError("a method without a critic has no critic phase")


def test_a_method_without_a_critic_trains_through_the_trainer(tiny_teacher, tmp_path, monkeypatch):
    monkeypatch.setitem(METHODS, "regression", RegressionConfig)
    run = tmp_path / "run"
    overrides = [o for o in tiny_overrides(tiny_teacher, None, run, **{"train.sample_every": 0}) if not o.startswith("method.")]
    with pytest.raises(config_lib.ConfigError, match="method.critic_updates: unknown key; method .regression."):
        train.main([RECIPE, *overrides, "method.name=regression"])  # the recipe's DMD2 keys are not this method's

    recipe = tmp_path / "regression.yaml"
    recipe.write_text("method:\n  name: regression\n  t: 500\n")
    train.main([str(recipe), *overrides])
    rows = [json.loads(line) for line in (run / "losses.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(not k.startswith(("critic/", "lr/critic")) for r in rows for k in r)
    assert rows[0]["generator/generator_loss"] > 0
    from safetensors.torch import load_file

    teacher = load_file(tiny_teacher / "unet" / "diffusion_pytorch_model.safetensors")
    student = load_file(find_checkpoint(run) / "student" / "diffusion_pytorch_model.safetensors")
    assert any(not torch.equal(teacher[k], student[k]) for k in teacher)
    assert not (find_checkpoint(run) / "model_1.safetensors").exists()  # no critic was checkpointed
    assert config_lib.load(run / "config.yaml", ["resume=latest"]).method == RegressionConfig()


@pytest.mark.parametrize("clip", [True, False])
def test_the_students_training_output_is_clipped_as_its_sampler_clips_it(tiny_teacher, clip):
    """The student trains on the x0 its sampler hands the user: clamped to the scheduler's
    clip_sample_range where the teacher's scheduler clips (the tiny teacher's DDPMScheduler
    does), unchanged where it does not; the gradient reaches the student through the pixels
    inside the range only."""
    from distill.students import FewStepSampler, make_roles
    from distill.teachers import load_teacher

    teacher = load_teacher(str(tiny_teacher))
    if not clip:
        teacher.schedule.clip_sample_range = None
    sampler = FewStepSampler([100], teacher.schedule)  # the random tiny teacher sends part of its pixels outside [-1, 1]
    student, _, _ = make_roles(teacher.denoiser, student_lora=None, fake_score_lora=None)
    student.requires_grad_(True)
    batch = {"class_label": torch.arange(8) % 10}
    cond = teacher.condition(batch)
    x0, k = student_x0(teacher, sampler, student, batch, cond, torch.Generator().manual_seed(0), grad=True,
                       backward_simulation=True)
    noise = torch.randn((8, *teacher.sample_shape), generator=torch.Generator().manual_seed(0))  # its first draw
    raw = Denoiser(teacher, student).x0(noise, sampler.timestep(0, noise), cond)
    assert k == 0 and 0.1 < float((raw.abs() > 1).float().mean()) < 0.99
    sampled = sampler.sample(lambda x_t, t: Denoiser(teacher, student).x0(x_t, t, cond), noise, None)
    torch.testing.assert_close(x0, sampled)
    torch.testing.assert_close(x0, raw.clamp(-1, 1) if clip else raw)
    params = list(student.parameters())
    through_x0 = torch.autograd.grad(x0.sum(), params)
    inside = (raw.abs() <= 1).float() if clip else torch.ones_like(raw)
    through_inside = torch.autograd.grad((raw * inside).sum(), params)
    for a, b in zip(through_x0, through_inside):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("clip", [True, False])
def test_the_generator_logs_the_fraction_of_its_output_the_clip_moved(tiny_teacher, clip):
    """generator/student_x0_clipped: the share of the student's raw x0 values outside the
    scheduler's clip range (what the sampler's clamp moves); not logged when the scheduler
    does not clip."""
    from distill.students import FewStepSampler, make_roles
    from distill.teachers import load_teacher

    teacher = load_teacher(str(tiny_teacher))
    if not clip:
        teacher.schedule.clip_sample_range = None
    sampler = FewStepSampler([100], teacher.schedule)
    section = config_lib.load(None, [f"teacher.path={tiny_teacher}", "eval.features=[]", "eval.classifier=null"]).method
    method = section.build(teacher=teacher, sampler=sampler, guidance_scale=1.0, backward_simulation=True)
    student, _, fake_score = make_roles(teacher.denoiser, student_lora=None, fake_score_lora=None)
    student.requires_grad_(True)
    critic = method.build_critic(fake_score=fake_score, device="cpu")
    batch = {"image": torch.rand(8, 1, 8, 8) * 2 - 1, "class_label": torch.arange(8) % 10}
    _, logs = method.generator_loss(student, critic, batch, torch.Generator().manual_seed(3), "cpu")
    cond = teacher.condition(batch)
    noise = torch.randn((8, *teacher.sample_shape), generator=torch.Generator().manual_seed(3))  # its first draw
    with torch.no_grad():
        raw = Denoiser(teacher, student).x0(noise, sampler.timestep(0, noise), cond)
    if clip:
        expected = float((raw.abs() > 1).float().mean())
        assert 0.1 < expected < 0.99 and float(logs["student_x0_clipped"]) == pytest.approx(expected)
        assert float(logs["student_x0_abs_max"]) == 1.0
    else:
        assert "student_x0_clipped" not in logs and float(logs["student_x0_abs_max"]) == pytest.approx(float(raw.abs().max()))


@pytest.mark.parametrize("backbone", ["fake_score", "teacher"])
def test_the_discriminator_sees_its_own_timestep_range(tiny_teacher, backbone):
    """method.gan.t_min / t_max: the GAN's real and fake inputs are re-noised in their own range,
    the fake score's denoising loss keeps the method's; null keeps the one shared draw."""
    from distill.methods.dmd2 import Critic
    from distill.students import FewStepSampler, make_roles
    from distill.teachers import load_teacher

    teacher = load_teacher(str(tiny_teacher))
    base = [f"teacher.path={tiny_teacher}", "eval.features=[]", "eval.classifier=null", "method.gan.weight=0.1",
            f"method.gan.discriminator.backbone={backbone}"]
    batch = {"image": torch.rand(16, 1, 8, 8) * 2 - 1, "class_label": torch.arange(16) % 10}

    def critic_times(overrides):
        section = config_lib.load(None, [*base, *overrides]).method
        method = section.build(teacher=teacher, sampler=FewStepSampler([500], teacher.schedule), guidance_scale=1.0,
                               backward_simulation=True)
        _, _, fake_score = make_roles(teacher.denoiser, student_lora=None, fake_score_lora=None)
        torch.manual_seed(0)
        critic = method.build_critic(fake_score=fake_score, device="cpu")
        seen = []
        forward = Critic.forward

        def record(self, x_t, t, cond, with_logits=False, disc=None):
            seen.append((t, disc[1] if disc else None))
            return forward(self, x_t, t, cond, with_logits, disc)

        Critic.forward = record
        try:
            method.critic_loss(teacher.denoiser, critic, batch, torch.Generator().manual_seed(1), "cpu")
        finally:
            Critic.forward = forward
        (t, disc_t), = seen
        return t, disc_t

    t, gan_t = critic_times(["method.gan.t_max=60"])  # x_t's timesteps, the discriminator's inputs'
    assert gan_t.max() <= 60 and len(gan_t) == 32 and len(t) == 16 and t.max() > 60
    t, disc_t = critic_times([])  # the shared range: student samples at the fake score's own timesteps
    if backbone == "fake_score":  # the heads read x_t's bottleneck from its own forward, then the reals'
        assert len(t) == 16 and len(disc_t) == 16 and disc_t.max() > 60
    else:
        assert torch.equal(disc_t[:16], t) and disc_t.max() > 60
    with pytest.raises(config_lib.ConfigError, match=r"method.gan.t_min: need 0 <= t_min < t_max, got 20 and 10"):
        config_lib.load(None, [*base, "method.gan.t_max=10"])


def test_renoise_floor_matches_each_step_from_the_next_steps_timestep_up(tiny_teacher):
    """method.renoise_floor: step k's samples reach the fake score (critic phase) and the
    distribution-matching loss (generator phase) only at timesteps >= step k + 1's; the last
    step's over [t_min, t_max]. Off, every step draws from [t_min, t_max]."""
    from distill.methods.dmd2 import Critic
    from distill.students import FewStepSampler, make_roles
    from distill.teachers import load_teacher

    teacher = load_teacher(str(tiny_teacher))
    steps = [499, 374, 249, 124]
    batch = {"image": torch.rand(16, 1, 8, 8) * 2 - 1, "class_label": torch.arange(16) % 10}

    def draws(floor: bool) -> dict[int, torch.Tensor]:
        """Step index k -> every timestep drawn for step k's samples, over 24 critic and 24 generator phases."""
        section = config_lib.load(None, [f"teacher.path={tiny_teacher}", "eval.features=[]", "eval.classifier=null",
                                         "method.t_max=500", f"method.renoise_floor={str(floor).lower()}"]).method
        method = section.build(teacher=teacher, sampler=FewStepSampler(steps, teacher.schedule), guidance_scale=1.0,
                               backward_simulation=True)
        _, student, fake_score = make_roles(teacher.denoiser, student_lora=None, fake_score_lora=None)
        critic = method.build_critic(fake_score=fake_score, device="cpu")
        drawn, trained_at = [], []
        draw = method._step_timesteps

        def record(n, k, generator, device):
            drawn.append((k, draw(n, k, generator, device)))
            return drawn[-1][1]

        method._step_timesteps = record
        forward = Critic.forward
        Critic.forward = lambda self, x_t, t, cond, with_logits=False, disc=None: (
            trained_at.append(t), forward(self, x_t, t, cond, with_logits, disc))[1]
        try:
            for seed in range(24):
                method.critic_loss(student, critic, batch, torch.Generator().manual_seed(seed), "cpu")
                method.generator_loss(student, critic, batch, torch.Generator().manual_seed(100 + seed), "cpu")
        finally:
            Critic.forward = forward
        assert {k for k, _ in drawn} == {0, 1, 2, 3}
        # the fake score trains at the critic phase's draws (the first of each pair)
        assert all(torch.equal(t, d) for (_, t), d in zip(drawn[::2], trained_at, strict=True))
        return {k: torch.cat([t for j, t in drawn if j == k]) for k in range(4)}

    floored = draws(True)
    for k, t in floored.items():
        low = steps[k + 1] if k + 1 < len(steps) else 20
        assert int(t.min()) >= low and int(t.max()) <= 500, (k, int(t.min()))
    assert int(floored[3].min()) < 124  # the last step: the whole range
    plain = draws(False)
    assert int(plain[0].min()) < 374 and all(int(t.min()) >= 20 and int(t.max()) <= 500 for t in plain.values())


def test_the_critics_heads_read_a_forward_stopped_at_the_bottleneck(tiny_teacher):
    """Critic(disc=...): the logits of inputs whose forward ends at the fake score's bottleneck
    equal those of a whole forward (the inputs given as x_t), and so do the gradients they send
    to the fake score's weights and the inputs; the decoder gets none. With gradient checkpointing
    on, the forward runs whole (the hook would fire inside a checkpoint) to the same values."""
    from distill.discriminators import can_stop_early
    from distill.methods.dmd2 import Critic
    from distill.students import FewStepSampler, enable_gradient_checkpointing, make_roles
    from distill.teachers import load_teacher

    teacher = load_teacher(str(tiny_teacher))
    section = config_lib.load(None, [f"teacher.path={tiny_teacher}", "eval.features=[]", "eval.classifier=null",
                                     "method.gan.weight=0.1"]).method

    method = section.build(teacher=teacher, sampler=FewStepSampler([500], teacher.schedule), guidance_scale=1.0,
                           backward_simulation=True)
    torch.manual_seed(0)
    _, _, fake_score = make_roles(teacher.denoiser, student_lora=None, fake_score_lora=None)
    critic = method.build_critic(fake_score=fake_score, device="cpu")
    assert isinstance(critic, Critic)
    critic.eval()  # the heads' spectral norms would take a power-iteration step in each training-mode forward
    x = torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    t, cond = torch.tensor([10, 100, 200, 300, 600, 900]), {"class_labels": torch.arange(6) % 10}

    def logits_and_grads(stopped: bool):
        inputs = x.clone().requires_grad_(True)
        critic.zero_grad(set_to_none=True)
        if stopped:
            output, logits = critic(None, None, cond, with_logits=True, disc=(inputs, t, cond))
            assert output is None
        else:
            output, logits = critic(inputs, t, cond, with_logits=True)
            assert output.shape == x.shape
        (logits * torch.linspace(-1, 2, logits.numel()).view(logits.shape)).sum().backward()
        grads = {n: p.grad.clone() for n, p in critic.named_parameters() if p.grad is not None}
        return logits.detach(), inputs.grad, grads

    whole, whole_dx, whole_grads = logits_and_grads(False)
    assert can_stop_early(critic.denoiser)
    stopped, stopped_dx, stopped_grads = logits_and_grads(True)
    torch.testing.assert_close(stopped, whole, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(stopped_dx, whole_dx, atol=1e-7, rtol=1e-4)
    assert stopped_grads.keys() == whole_grads.keys()
    assert any(n.startswith("head.") for n in stopped_grads) and any(".down_blocks." in n for n in stopped_grads)
    assert not any(".up_blocks." in n or ".conv_out." in n for n in stopped_grads)
    for name in stopped_grads:
        torch.testing.assert_close(stopped_grads[name], whole_grads[name], atol=1e-7, rtol=1e-4, msg=name)

    enable_gradient_checkpointing(critic.denoiser)
    assert not can_stop_early(critic.denoiser)
    ran = []
    hook = critic.denoiser.conv_out.register_forward_hook(lambda m, a, out: ran.append(True))
    checkpointed, _, _ = logits_and_grads(True)
    hook.remove()
    assert ran and torch.allclose(checkpointed, whole, atol=1e-6, rtol=1e-5)
