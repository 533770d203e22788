"""ADD / LADD: score distillation against hand values, the discriminator heads and backbones
(gradients reach the heads and the sample, never the frozen backbone), augmentation, the
regularisers with every backbone, and the ADD and LADD recipes trained through the real
trainer on tiny models."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import REPO, tiny_overrides

from distill import config as config_lib
from distill.discriminators import Discriminator, Heads, MapHead, TokenHead, translate_and_cutout
from distill.discriminators.backbones import evenly_spaced_layers
from distill.losses import distillation_weight, score_distillation_loss
from distill.teachers import load_teacher
from distill.trainer import DistillTrainer

RECIPES = {name: str(REPO / "recipes" / f"digits-{name}-1step.yaml") for name in ("add", "ladd", "dmd2-dinov2", "dmd2")}
# a DMD2 recipe without DMD2-only keys (the default sets method.gan.critic_weight): method.name=add switches it
PLAIN_DMD2 = str(REPO / "recipes" / "digits-dmd2-4step.yaml")


# ---------------------------------------------------------------------------- losses


def test_add_exponential_weighting_is_the_signal_coefficient_alpha_t():
    """ADD §3.1 writes the forward process x_s = alpha_s x0 + sigma_s eps, so its c(t) = alpha_t
    (exponential weighting, §3.2) is diffusers' sqrt(alphas_cumprod[t]), not alphas_cumprod[t]:
    0.2789 at t = 500 on the linear schedule (beta 1e-4 .. 0.02 over 1000 steps), not 0.0778."""
    from diffusers import DDPMScheduler

    from distill.losses import distillation_weight
    from distill.schedules import schedule_from_config

    config = dict(DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear").config, _class_name="DDPMScheduler")
    alpha, sigma = schedule_from_config(config).alpha_sigma(torch.tensor([500]), ndim=1)
    assert float(distillation_weight("exponential", alpha, sigma)) == pytest.approx(0.27892, abs=1e-5)
    assert float(distillation_weight("sds", alpha, sigma)) == pytest.approx(0.27892 * 0.96031, abs=1e-5)
    assert float(distillation_weight("constant", alpha, sigma)) == 1.0


def test_score_distillation_loss_by_hand():
    x0_student = torch.tensor([[1.0, 2.0], [0.0, 0.0]], requires_grad=True)
    x0_teacher = torch.tensor([[0.0, 0.0], [1.0, 1.0]], requires_grad=True)
    weight = torch.tensor([0.5, 2.0])
    loss, logs = score_distillation_loss(x0_student, x0_teacher, weight)
    # per-sample mse: (1 + 4) / 2 = 2.5 and (1 + 1) / 2 = 1; weighted mean: (0.5 * 2.5 + 2 * 1) / 2
    assert loss.item() == pytest.approx(1.625)
    assert float(logs["distill_mse"]) == pytest.approx(1.75)
    loss.backward()
    assert x0_teacher.grad is None  # the teacher's estimate is a target (stop-gradient)
    assert torch.allclose(x0_student.grad, torch.tensor([[0.25, 0.5], [-1.0, -1.0]]))


def test_distillation_weightings():
    alpha, sigma = torch.tensor([0.8, 0.6]), torch.tensor([0.6, 0.8])
    assert torch.allclose(distillation_weight("exponential", alpha, sigma), alpha)
    assert torch.allclose(distillation_weight("sds", alpha, sigma), torch.tensor([0.48, 0.48]))
    assert torch.equal(distillation_weight("constant", alpha, sigma), torch.ones(2))
    with pytest.raises(ValueError, match="unknown distillation weighting 'snr'"):
        distillation_weight("snr", alpha, sigma)


# ---------------------------------------------------------------------------- heads and backbones


def test_heads_give_one_logit_per_position_and_condition_by_projection():
    torch.manual_seed(0)
    tokens, maps = torch.randn(3, 5, 16), torch.randn(3, 8, 4, 4)
    token_head, map_head = TokenHead(16, width=8, num_classes=10), MapHead(8, width=8, num_classes=10)
    assert token_head(tokens).shape == (3, 5) and map_head(maps).shape == (3, 16)
    labels = torch.tensor([1, 2, 3])
    assert not torch.allclose(token_head(tokens, labels), token_head(tokens))
    assert not torch.allclose(token_head(tokens, labels), token_head(tokens, labels + 1))
    assert all(hasattr(m, "parametrizations") for m in token_head.modules() if isinstance(m, torch.nn.Conv1d))
    heads = Heads("maps", [8, 8], width=8)
    assert heads([maps, maps]).shape == (3, 32)
    with pytest.raises(ValueError, match="2 heads got features of 1 layers"):
        heads([maps])


def test_evenly_spaced_layers():
    assert evenly_spaced_layers(12) == [3, 6, 9, 12]
    assert evenly_spaced_layers(2) == [1, 2]


@pytest.mark.parametrize("backbone", ["dinov2", "teacher"])
def test_gradients_reach_heads_and_sample_but_not_the_frozen_backbone(backbone, tiny_teacher, tiny_dinov2):
    teacher = load_teacher(str(tiny_teacher))
    disc = Discriminator(backbone=backbone, teacher=teacher, dinov2=str(tiny_dinov2), width=8)
    frozen = disc._dinov2.model if backbone == "dinov2" else teacher.denoiser
    assert not any(name.startswith(("_dinov2", "_teacher")) for name in disc.state_dict())  # heads only
    assert all(not p.requires_grad for p in frozen.parameters())
    before = [p.clone() for p in frozen.parameters()]

    g = torch.Generator().manual_seed(0)
    x0 = (torch.rand(4, 1, 8, 8, generator=g) * 2 - 1).requires_grad_(True)
    t, noise = torch.full((4,), 400), torch.randn(4, 1, 8, 8, generator=g)
    logits = disc(x0, t, noise, {"class_labels": torch.tensor([0, 1, 2, 3])})
    assert logits.shape[0] == 4 and logits.dim() == 2
    optimizer = torch.optim.SGD(disc.parameters(), lr=0.1)
    logits.mean().backward()
    assert x0.grad is not None and x0.grad.abs().sum() > 0  # the student would get a gradient
    assert all(p.grad is not None for p in disc.heads.parameters())
    assert all(p.grad is None for p in frozen.parameters())
    optimizer.step()
    assert all(torch.equal(a, b) for a, b in zip(before, frozen.parameters()))


def test_translate_and_cutout_is_random_per_sample_differentiable_and_reproducible():
    x = torch.ones(4, 1, 8, 8, requires_grad=True)
    a = translate_and_cutout(x, torch.Generator().manual_seed(0))
    b = translate_and_cutout(x, torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and a.shape == x.shape
    assert ((a == 0).flatten(1).sum(1) >= 9).all()  # every sample lost at least the cutout's 3x3
    assert not torch.equal(a[0], a[1]) or not torch.equal(a[2], a[3])
    a.sum().backward()
    assert set(x.grad.unique().tolist()) <= {0.0, 1.0}  # each output pixel copies one input pixel or is zeroed


def test_approximated_and_exact_r1_estimate_the_same_mean_per_logit_penalty(tiny_teacher):
    """On a real multi-logit discriminator (per-position heads over the teacher's features) both
    penalties estimate mean_k |grad_x D_k|^2, computed here exactly with one backward per logit."""
    from distill.losses import approximated_r1_penalty, projection_signs, r1_penalty

    teacher = load_teacher(str(tiny_teacher))
    torch.manual_seed(0)
    disc = Discriminator(backbone="teacher", teacher=teacher, width=8)
    g = torch.Generator().manual_seed(1)
    x0 = (torch.rand(2, 1, 8, 8, generator=g) * 2 - 1).requires_grad_(True)
    t, noise, cond = torch.full((2,), 300), torch.randn(2, 1, 8, 8, generator=g), {"class_labels": torch.tensor([4, 7])}
    logits = disc(x0, t, noise, cond)
    k = logits.shape[1]
    assert k > 10  # a head of many logits: the case where conventions differ by up to K
    per_logit = [torch.autograd.grad(logits[:, j].sum(), x0, retain_graph=True)[0].pow(2).flatten(1).sum(1) for j in range(k)]
    expected = float(torch.stack(per_logit).mean(0).mean())
    summed = float(torch.autograd.grad(logits.sum(), x0, retain_graph=True)[0].pow(2).flatten(1).sum(1).mean())
    assert summed > 3 * expected  # the old convention, |grad sum_k D_k|^2, is another quantity

    draws = [r1_penalty(logits, x0, projection_signs(logits, g))[0].item() for _ in range(200)]
    assert sum(draws) / len(draws) == pytest.approx(expected, rel=0.1)

    replicas, sigma = 512, 1e-2
    with torch.no_grad():
        big = lambda v: v.repeat_interleave(replicas, dim=0)
        x, cond_big = big(x0.detach()), {"class_labels": big(cond["class_labels"])}
        perturbed = x + sigma * torch.randn(x.shape, generator=g)
        estimate, _ = approximated_r1_penalty(disc(x, big(t), big(noise), cond_big), disc(perturbed, big(t), big(noise), cond_big), sigma)
    assert float(estimate) == pytest.approx(expected, rel=0.2)


def test_approximated_r1_in_bfloat16_is_within_ten_percent_of_float32(tiny_teacher):
    """Under bf16 autocast, sigma = 0.01 is a unit or two of precision: the regulariser's
    forward runs in float32 (regulariser_context), so the penalty keeps its fp32 value."""
    from distill.losses import approximated_r1_penalty
    from distill.methods.common import regularised_inputs, regulariser_context

    teacher = load_teacher(str(tiny_teacher))
    torch.manual_seed(0)
    disc = Discriminator(backbone="teacher", teacher=teacher, width=8)
    g = torch.Generator().manual_seed(3)
    n = 256
    real = torch.rand(n, 1, 8, 8, generator=g) * 2 - 1
    t, noise = torch.full((n,), 300), torch.randn(n, 1, 8, 8, generator=g)
    cond = {"class_labels": torch.arange(n) % 10}

    def penalty(autocast: bool, precise: bool) -> float:
        inputs = regularised_inputs("approximated", real[:0], real, 0.01, torch.Generator().manual_seed(4))[1:]
        context = regulariser_context("approximated", "cpu") if precise else torch.autocast("cpu", enabled=False)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast), context:
            logits = disc(torch.cat(inputs), torch.cat([t, t]), torch.cat([noise, noise]), {"class_labels": torch.cat([cond["class_labels"]] * 2)})
        return float(approximated_r1_penalty(logits[:n], logits[n:], 0.01)[0])

    fp32 = penalty(autocast=False, precise=False)
    assert penalty(autocast=True, precise=True) == pytest.approx(fp32, rel=0.1)

    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # what the context prevents
        inputs = [real, real + 0.01 * torch.randn(real.shape, generator=torch.Generator().manual_seed(4))]
        logits = disc(torch.cat(inputs), torch.cat([t, t]), torch.cat([noise, noise]), {"class_labels": torch.cat([cond["class_labels"]] * 2)})
    naive = float(approximated_r1_penalty(logits[:n], logits[n:], 0.01)[0])
    assert abs(naive - fp32) > 0.1 * fp32


# ---------------------------------------------------------------------------- recipes and config


@pytest.mark.parametrize(
    "name, r1", [("add", "approximated"), ("add", "exact"), ("add", "r2"), ("ladd", "approximated"), ("ladd", "exact"),
                 ("ladd", "r2"), ("dmd2-dinov2", "approximated"), ("dmd2-dinov2", "exact"), ("dmd2-dinov2", "r2")],
)
def test_recipe_trains_heads_and_student_never_the_backbone(name, r1, tiny_teacher, tiny_dinov2, tmp_path):
    overrides = tiny_overrides(tiny_teacher, None, tmp_path / "run", **{
        "method.gan.discriminator.dinov2": str(tiny_dinov2), "method.gan.discriminator.head_width": 8,
        "method.gan.r1.kind": r1, "train.sample_every": 0, "train.ema_decay": 0})
    trainer = DistillTrainer(config_lib.load(RECIPES[name], overrides))
    trainer.setup()
    critic = trainer.accelerator.unwrap_model(trainer.critic)
    critic = critic.discriminator if name == "dmd2-dinov2" else critic  # DMD2's critic also holds the fake score
    student = trainer.accelerator.unwrap_model(trainer.student)
    backbone = trainer.teacher.denoiser if name == "ladd" else critic._dinov2.model
    snapshot = lambda module: [p.detach().clone() for p in module.parameters()]
    heads, frozen, weights = snapshot(critic.heads), snapshot(backbone), snapshot(student)
    trainer.train()

    changed = lambda before, module: any(not torch.equal(a, b) for a, b in zip(before, module.parameters()))
    assert changed(heads, critic.heads) and changed(weights, student)
    assert not changed(frozen, backbone)
    rows = [json.loads(line) for line in (tmp_path / "run" / "losses.jsonl").read_text().splitlines()]
    penalty = {"approximated": "critic/approx_r1_penalty", "exact": "critic/r1_penalty", "r2": "critic/r2_penalty"}[r1]
    assert all(math.isfinite(row[penalty]) and row[penalty] >= 0 for row in rows)
    assert ("generator/distill_loss" in rows[0]) == (name == "add")  # LADD has no distillation term
    assert ("generator/dmd_loss" in rows[0]) == (name == "dmd2-dinov2")


@pytest.mark.parametrize("r1, gan_t_max", [("none", 300), ("approximated", 300), ("exact", 300), ("r2", 300),
                                           ("approximated", "null"), ("r2", "null")])
def test_dmd2_fake_score_heads_are_the_shared_heads_and_train_with_each_regulariser(r1, gan_t_max, tiny_teacher, tmp_path):
    """With the GAN's own timestep range (the recipe's t_max 300) and with the fake score's
    (null: the fake logits come from the fake score's own forward on x_t, R2's leaf included)."""
    overrides = tiny_overrides(tiny_teacher, None, tmp_path / "run", **{
        "method.gan.weight": 0.5, "method.gan.discriminator.head_width": 8, "method.gan.r1.kind": r1,
        "method.gan.t_max": gan_t_max, "train.sample_every": 0, "train.ema_decay": 0})
    trainer = DistillTrainer(config_lib.load(RECIPES["dmd2"], overrides))
    trainer.setup()
    critic = trainer.accelerator.unwrap_model(trainer.critic)
    assert isinstance(critic.head, Heads) and critic.discriminator is None
    assert len(critic.head.heads) == 1 and isinstance(critic.head.heads[0], MapHead)
    snapshot = lambda module: [p.detach().clone() for p in module.parameters()]
    head, fake_score, teacher = snapshot(critic.head), snapshot(critic.denoiser), snapshot(trainer.teacher.denoiser)
    trainer.train()

    changed = lambda before, module: any(not torch.equal(a, b) for a, b in zip(before, module.parameters()))
    assert changed(head, critic.head) and changed(fake_score, critic.denoiser)
    assert not changed(teacher, trainer.teacher.denoiser)
    rows = [json.loads(line) for line in (tmp_path / "run" / "losses.jsonl").read_text().splitlines()]
    assert all(math.isfinite(row["critic/critic_loss"]) for row in rows)
    if r1 != "none":
        penalty = {"approximated": "critic/approx_r1_penalty", "exact": "critic/r1_penalty", "r2": "critic/r2_penalty"}[r1]
        assert all(row[penalty] > 0 for row in rows)


def test_gan_loss_defaults_to_each_papers_loss(tiny_teacher):
    base = [f"teacher.path={tiny_teacher}", "eval.features=[]", "eval.every=0", "eval.classifier=null"]
    assert config_lib.load(RECIPES["dmd2"], base).method.gan.loss == "non_saturating"
    add = ["method.name=add", "method.gan.weight=1", "method.gan.discriminator.backbone=teacher", "method.gan.loss=null"]
    assert config_lib.load(PLAIN_DMD2, base + add).method.gan.loss == "hinge"
    assert config_lib.load(PLAIN_DMD2, base + add[:-1] + ["method.gan.loss=relativistic"]).method.gan.loss == "relativistic"


@pytest.mark.parametrize(
    "overrides, key, message",
    [
        (["method.name=add", "method.gan.weight=1"], "method.gan.discriminator.backbone", "ADD has no fake score network"),
        (["method.name=add", "method.gan.discriminator.backbone=teacher", "method.gan.weight=0"], "method.gan.weight", "needs method.gan.weight > 0"),
        (["method.gan.discriminator.augment=true", "method.gan.weight=1"], "method.gan.discriminator.augment", "ADD only"),
        (["method.gan.discriminator.backbone=teacher", "method.gan.weight=0"], "method.gan.discriminator.backbone", "but method.gan.weight is 0"),
        (["method.name=add", "method.gan.weight=1", "method.gan.discriminator.backbone=dinov2",
          "method.gan.discriminator.dinov2=./no/dinov2"], "method.gan.discriminator.dinov2", "does not exist"),
        (["method.name=add", "method.gan.discriminator.backbone=teacher", "method.distill_weighting=snr"],
         "method.distill_weighting", "snr"),
        (["method.distill_weight=1"], "method.distill_weight", "unknown key; method (dmd2) takes"),  # ADD's own key
    ],
)
def test_add_settings_are_checked_before_weights_load(overrides, key, message, tiny_teacher, tmp_path):
    with pytest.raises(config_lib.ConfigError) as excinfo:
        config_lib.load(PLAIN_DMD2, [
            f"teacher.path={tiny_teacher}", "eval.features=[]", "eval.every=0", "eval.classifier=null",
            # start from a valid DMD2 setting, then apply the case's overrides
            "method.name=dmd2", "method.gan.discriminator.backbone=fake_score", "method.gan.r1.kind=none",
            "method.gan.discriminator.dinov2=org/name", *overrides])
    assert f"{key}:" in str(excinfo.value) and message in str(excinfo.value)


def test_discriminator_penalty_dispatches_to_each_regulariser():
    from distill.losses import approximated_r1_penalty, discriminator_penalty, r1_penalty, r2_penalty

    x = torch.randn(3, 4, requires_grad=True)
    y = torch.randn(3, 4, requires_grad=True)
    d = lambda v: (v ** 2).sum(1)
    real, fake, perturbed = d(x), d(y), d(x + 0.01)
    kwargs = dict(real_logits=real, fake_logits=fake, perturbed_logits=perturbed, real_inputs=x, fake_inputs=y, sigma=0.01)
    assert torch.equal(discriminator_penalty("approximated", **kwargs)[0], approximated_r1_penalty(real, perturbed, 0.01)[0])
    assert torch.allclose(discriminator_penalty("exact", **kwargs)[0], r1_penalty(real, x)[0])
    assert torch.allclose(discriminator_penalty("r2", **kwargs)[0], r2_penalty(fake, y)[0])
    assert torch.allclose(r1_penalty(real, x)[0], (4 * x.detach() ** 2).sum(1).mean())  # |2x|^2
    with pytest.raises(ValueError, match="unknown discriminator regulariser 'r3'"):
        discriminator_penalty("r3", **kwargs)


@pytest.mark.slow
def test_ladd_two_process_launch(tiny_teacher, tmp_path):
    """The discriminator's heads under DDP, its frozen backbone outside it."""
    import os
    import subprocess
    import sys

    run = tmp_path / "ddp"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--cpu",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "distill.train",
               RECIPES["ladd"], *tiny_overrides(tiny_teacher, None, run, **{"train.sample_every": 0, "method.gan.discriminator.head_width": 8})]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in (run / "losses.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(math.isfinite(r["critic/gan_d_loss"]) for r in rows)
