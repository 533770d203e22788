"""End-to-end runs through the real entry points on tiny models: parameters move, first
losses are pinned, checkpoints load, resume repeats the uninterrupted run, and the
multi-process launch works."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, tiny_overrides

from distill import train
from distill.checkpoints import CHECKPOINT_INFO
from distill.runs import find_checkpoint

RECIPE_1STEP = str(REPO / "recipes" / "digits-dmd2-1step.yaml")
RECIPE_4STEP = str(REPO / "recipes" / "digits-dmd2-4step.yaml")


def _losses(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "losses.jsonl").read_text().splitlines()]


def _weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(path)


def test_short_run_moves_parameters_and_pins_losses(tiny_teacher, tiny_classifier, tmp_path):
    run = tmp_path / "run"
    # the pinned numerics are plain DMD2 over the full re-noising range (the default adds the GAN term at t_max 500)
    plain = {"train.ema_decay": 0, "method.t_max": 980, "method.gan.weight": 0, "method.gan.t_max": "null"}
    metrics = train.main([RECIPE_1STEP, *tiny_overrides(tiny_teacher, tiny_classifier, run, **plain)])

    teacher = _weights(tiny_teacher / "unet" / "diffusion_pytorch_model.safetensors")
    student = _weights(find_checkpoint(run) / "student" / "diffusion_pytorch_model.safetensors")
    assert teacher.keys() == student.keys()
    moved = [k for k in teacher if not torch.equal(teacher[k], student[k])]
    assert len(moved) > len(teacher) // 2, "the student's weights should have changed"

    rows = _losses(run)
    assert [r["step"] for r in rows] == [1, 2]
    first = rows[0]
    # Pinned from a reference run of this exact configuration (seeded, CPU, float32).
    assert first["critic/denoising_loss"] == pytest.approx(PINNED["critic/denoising_loss"], rel=1e-3)
    assert first["generator/dmd_loss"] == pytest.approx(PINNED["generator/dmd_loss"], rel=1e-2, abs=1e-9)
    assert rows[1]["critic/denoising_loss"] == pytest.approx(PINNED["step2/critic/denoising_loss"], rel=1e-3)

    assert (run / "config.yaml").is_file() and (run / "samples" / "step-000002.png").is_file()
    assert metrics["steps"] == 1 and metrics["timesteps"] == [500] and metrics["num_samples"] == 40
    assert json.loads((run / "metrics.json").read_text())["fd_classifier"] == pytest.approx(metrics["fd_classifier"])
    assert any((run / "logs").rglob("events.out.tfevents.*"))


PINNED = {  # torch 2.13 CPU, diffusers 0.42; tiny teacher of conftest after torch.manual_seed(0); the student's x0 clipped (aff992f)
    "critic/denoising_loss": 0.9814046025276184,
    "generator/dmd_loss": 0.0002674110000953078,
    "step2/critic/denoising_loss": 0.8293393850326538,
}


def test_resume_repeats_the_uninterrupted_run(tiny_teacher, tmp_path):
    # the first leg stops by a smaller max_steps, which would re-shape a decay over max_steps: constant lr here
    common = {"student.timesteps": "[999,749,499,249]", "method.gan.weight": 0.1, "method.gan.r1.kind": "approximated",
              "optim.student.decay": "constant"}
    full = tmp_path / "full"
    train.main([RECIPE_1STEP, *tiny_overrides(tiny_teacher, None, full, **common, **{"train.max_steps": 4, "train.sample_every": 0})])

    split = tmp_path / "split"
    args = tiny_overrides(tiny_teacher, None, split, **common, **{"train.checkpoint_every": 2, "train.sample_every": 0})
    train.main([RECIPE_1STEP, *args, "train.max_steps=2"])
    # a checkpoint that was being written when the run died must be ignored
    (split / "checkpoints" / ".partial-step-000003").mkdir()
    train.main([RECIPE_1STEP, *args, "train.max_steps=4", "resume=latest"])

    a, b = _losses(full), _losses(split)
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for ra, rb in zip(a, b):
        for key in ra:
            assert rb[key] == pytest.approx(ra[key], rel=1e-4, abs=1e-6), (ra["step"], key)
    ema_a = _weights(find_checkpoint(full) / "student" / "diffusion_pytorch_model.safetensors")
    ema_b = _weights(find_checkpoint(split) / "student" / "diffusion_pytorch_model.safetensors")
    assert all(torch.allclose(ema_a[k], ema_b[k], atol=1e-5) for k in ema_a)


def test_gan_with_exact_r1_and_accumulation_trains_the_head(tiny_teacher, tmp_path):
    run = tmp_path / "run"
    extra = {"method.gan.weight": 0.5, "method.gan.r1.kind": "exact", "method.gan.loss": "hinge",
             "train.gradient_accumulation_steps": 2, "train.max_steps": 1, "train.sample_every": 0}
    train.main([RECIPE_1STEP, *tiny_overrides(tiny_teacher, None, run, **extra)])
    first = _losses(run)[0]
    assert first["critic/r1_penalty"] > 0
    state = _weights(find_checkpoint(run) / "model_1.safetensors")  # the critic: fake score + head
    torch.manual_seed(0)
    from distill.discriminators import Heads

    fresh = Heads("maps", [16], width=64, num_classes=10).state_dict()
    head = {k.removeprefix("head."): v for k, v in state.items() if k.startswith("head.")}
    assert head.keys() == fresh.keys()
    weight = "heads.0.out.parametrizations.weight.original"
    assert not torch.equal(head[weight], fresh[weight])


def test_learning_rates_decay_over_their_own_updates(tiny_teacher, tmp_path):
    """A linear decay to half the rate at train.max_steps: the student's rate after each of its 4 updates, and
    the critic's over its 2 x 4 updates (critic_updates 2), logged as the run trains."""
    run = tmp_path / "decay"
    extra = {"train.max_steps": 4, "train.sample_every": 0, "train.checkpoint_every": 4, "method.critic_updates": 2,
             "optim.student.decay": "linear", "optim.student.decay_to": 0.5, "optim.critic.decay": "cosine",
             "optim.critic.decay_to": 0.0}
    train.main([RECIPE_1STEP, *tiny_overrides(tiny_teacher, None, run, **extra)])
    rows = _losses(run)
    assert [r["lr/student"] for r in rows] == pytest.approx([1e-4 * f for f in (0.875, 0.75, 0.625, 0.5)])
    cosine = [0.5 * (1 + math.cos(math.pi * 2 * k / 8)) for k in (1, 2, 3, 4)]
    assert [r["lr/critic"] for r in rows] == pytest.approx([2e-4 * f for f in cosine], abs=1e-12)


def test_ema_without_warmup_holds_its_decay_from_the_start(tiny_teacher, tmp_path):
    """3 updates, EMA 0.9: with diffusers' warm-up the decay is min(0.9, (1 + t) / (10 + t)) (0, 0.18, 0.25), without
    it 0.9 after the first update: its average (0.81 w1 + 0.09 w2 + 0.1 w3) stays by the first update's weights w1,
    the warmed-up one (0.05 w1 + 0.2 w2 + 0.75 w3) does not."""
    students = {}
    for name, steps, decay, warmup in (("first", 1, 0, "true"), ("true", 3, 0.9, "true"), ("false", 3, 0.9, "false")):
        run = tmp_path / f"ema-{name}"
        extra = {"train.max_steps": steps, "train.sample_every": 0, "train.checkpoint_every": steps,
                 "train.ema_decay": decay, "train.ema_warmup": warmup}
        train.main([RECIPE_1STEP, *tiny_overrides(tiny_teacher, None, run, **extra)])
        students[name] = _weights(find_checkpoint(run) / "student" / "diffusion_pytorch_model.safetensors")
    first = students.pop("first")
    away = {w: sum((s[k] - first[k]).abs().sum().item() for k in first) for w, s in students.items()}
    assert away["false"] < 0.5 * away["true"]


def test_warmup_then_constant_rate():
    from distill.config.schema import OptimizerConfig
    from distill.trainer import lr_factor

    factor = lr_factor(OptimizerConfig(warmup_steps=4), 100)
    assert [factor(i) for i in (0, 1, 3, 4, 99, 500)] == [0.25, 0.5, 1.0, 1.0, 1.0, 1.0]
    cosine = lr_factor(OptimizerConfig(warmup_steps=10, decay="cosine", decay_to=0.1), 110)
    assert [round(cosine(i), 6) for i in (9, 10, 60, 110, 200)] == [1.0, 1.0, 0.55, 0.1, 0.1]


def test_find_checkpoint_says_where_it_looked(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "checkpoints")):
        find_checkpoint(tmp_path)


def test_find_checkpoint_reads_a_bare_name_inside_the_run(tmp_path, monkeypatch):
    from safetensors.torch import save_file

    for name in ("step-000001", "step-000002"):
        (tmp_path / "run" / "checkpoints" / name / "student").mkdir(parents=True)
        save_file({"w": torch.zeros(2)}, tmp_path / "run" / "checkpoints" / name / "student" / "m.safetensors")
    monkeypatch.chdir(tmp_path)  # the name is not a directory here, only inside the run
    assert find_checkpoint("run", "step-000001") == Path("run/checkpoints/step-000001")
    with pytest.raises(FileNotFoundError, match=r"step-000009: does not exist \(nor is there a checkpoint 'step-000009' "
                                                r"at .*run/checkpoints/step-000009\)"):
        find_checkpoint("run", "step-000009")


def test_find_checkpoint_latest_names_the_kept_best(tmp_path):
    from safetensors.torch import save_file

    for name in ("step-000001", "step-000002", "best"):
        (tmp_path / "checkpoints" / name / "student").mkdir(parents=True)
        save_file({"w": torch.zeros(2)}, tmp_path / "checkpoints" / name / "student" / "m.safetensors")
        if name != "best":  # what a resumable checkpoint adds: Accelerate's state and the file manifest
            save_file({"w": torch.zeros(2)}, tmp_path / "checkpoints" / name / "model.safetensors")
            (tmp_path / "checkpoints" / name / CHECKPOINT_INFO).write_text(json.dumps({"files": {}}))
    best = tmp_path / "checkpoints" / "best" / "scores.json"
    best.write_text(json.dumps({"step": 1, "fd_classifier": 1.234567, "recall_classifier": 0.9}))
    said = []
    assert find_checkpoint(tmp_path, report=said.append) == tmp_path / "checkpoints" / "step-000002"
    assert said == ["using step-000002, the latest; this run also keeps checkpoints/best (step 1, fd_classifier 1.235): "
                    "pass --checkpoint best for it"]
    said.clear()
    find_checkpoint(tmp_path, "best", report=said.append)
    find_checkpoint(tmp_path, report=said.append, training_state=True)  # a resume: the latest, without the hint
    best.write_text(json.dumps({"step": 2, "fd_classifier": 1.0}))  # the best is the latest: nothing to say
    find_checkpoint(tmp_path, report=said.append)
    best.write_text("{not json")  # damaged: the latest still loads, without the hint
    assert find_checkpoint(tmp_path, report=said.append) == tmp_path / "checkpoints" / "step-000002"
    assert said == []


@pytest.mark.slow
def test_two_process_launch(tiny_teacher, tmp_path):
    run = tmp_path / "ddp"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--cpu",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "-m", "distill.train", RECIPE_4STEP,
               *tiny_overrides(tiny_teacher, None, run, **{"train.sample_every": 0, "method.gan.weight": 0.1,
                                                           "optim.student.warmup_steps": 4})]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = _losses(run)
    assert [r["step"] for r in rows] == [1, 2]
    # Accelerate steps a schedule once per process each update: the warm-up still counts updates, not processes
    assert [r["lr/student"] for r in rows] == pytest.approx([5e-5 * 2 / 4, 5e-5 * 3 / 4])
    assert (find_checkpoint(run) / "student" / "diffusion_pytorch_model.safetensors").is_file()


def test_bf16_mixed_precision_step(tiny_teacher, tmp_path):
    run = tmp_path / "bf16"
    extra = {"train.mixed_precision": "bf16", "train.max_steps": 1, "train.sample_every": 0, "method.gan.weight": 0.1}
    train.main([RECIPE_1STEP, *tiny_overrides(tiny_teacher, None, run, **extra)])
    first = _losses(run)[0]
    assert all(torch.isfinite(torch.tensor(v)) for v in first.values())
    assert 0 < first["critic/denoising_loss"] < 10
    student = _weights(find_checkpoint(run) / "student" / "diffusion_pytorch_model.safetensors")
    assert all(v.dtype == torch.float32 for v in student.values())  # master weights stay fp32


def test_new_run_refuses_an_existing_run_directory(tiny_teacher, tmp_path, monkeypatch):
    run = tmp_path / "run"
    (run / "checkpoints" / "step-000001").mkdir(parents=True)
    monkeypatch.setattr("distill.trainer.load_teacher", lambda *a, **k: pytest.fail("weights loaded"))
    from distill.config import ConfigError

    with pytest.raises(ConfigError, match=r"output_dir: .* already holds a run; continue it with resume=latest"):
        train.main([RECIPE_1STEP, *tiny_overrides(tiny_teacher, None, run)])


@pytest.mark.slow
def test_killed_run_resumes_from_its_last_good_checkpoint(tiny_teacher, tmp_path):
    """SIGKILL a training process after a checkpoint; resume=latest then logs the same
    losses as an uninterrupted run, step for step."""
    import signal
    import time

    extra = {"train.max_steps": 10, "train.checkpoint_every": 2, "train.sample_every": 0, "train.keep_checkpoints": 3}
    killed = tmp_path / "killed"
    args = tiny_overrides(tiny_teacher, None, killed, **extra)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    process = subprocess.Popen([sys.executable, "-m", "distill.train", RECIPE_1STEP, *args], cwd=tmp_path, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (killed / "checkpoints" / "step-000004").is_dir() and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL, "the run ended before it could be killed"
    assert len(_losses(killed)) < 10
    survivor = find_checkpoint(killed)
    assert int(survivor.name.removeprefix("step-")) >= 4
    train.main([RECIPE_1STEP, *args, "resume=latest"])

    full = tmp_path / "full"
    train.main([RECIPE_1STEP, *tiny_overrides(tiny_teacher, None, full, **extra)])
    a, b = _losses(full), _losses(killed)
    assert [r["step"] for r in b] == list(range(1, 11))
    for ra, rb in zip(a, b):
        for key in ra:
            assert rb[key] == pytest.approx(ra[key], rel=1e-4, abs=1e-6), (ra["step"], key)


def _nan_generator_loss_at(monkeypatch, bad_steps: set[int]):
    """Make DMD2's generator loss NaN at the given (1-based) student steps."""
    from distill.methods import DMD2

    original, calls = DMD2.generator_loss, []

    def generator_loss(self, *args, **kwargs):
        calls.append(1)
        loss, logs = original(self, *args, **kwargs)
        return (loss * float("nan"), logs) if len(calls) in bad_steps else (loss, logs)

    monkeypatch.setattr(DMD2, "generator_loss", generator_loss)


def test_a_nonfinite_update_is_skipped_and_counted(tiny_teacher, tmp_path, monkeypatch):
    _nan_generator_loss_at(monkeypatch, {2})
    run = tmp_path / "run"
    extra = {"train.max_steps": 3, "train.sample_every": 0, "train.ema_decay": 0, "train.checkpoint_every": 1,
             "train.keep_checkpoints": 3}
    train.main([RECIPE_1STEP, *tiny_overrides(tiny_teacher, None, run, **extra)])
    rows = _losses(run)
    assert [r["train/skipped_updates"] for r in rows] == [0, 1, 1]
    assert math.isnan(rows[1]["generator/grad_norm"])
    step1, step2, step3 = (_weights(run / "checkpoints" / f"step-00000{i}" / "student" / "diffusion_pytorch_model.safetensors")
                           for i in (1, 2, 3))
    assert all(torch.equal(step1[k], step2[k]) for k in step1)  # the NaN update moved nothing
    assert any(not torch.equal(step2[k], step3[k]) for k in step2)  # and the next one trained again
    assert all(torch.isfinite(v).all() for v in step3.values())


def test_a_run_of_nonfinite_steps_stops_with_the_step_named_and_the_checkpoint_intact(tiny_teacher, tmp_path, monkeypatch):
    _nan_generator_loss_at(monkeypatch, {3, 4, 5})
    run = tmp_path / "run"
    extra = {"train.max_steps": 6, "train.sample_every": 0, "train.checkpoint_every": 2, "train.max_nonfinite_steps": 2}
    from distill.errors import NonFiniteError

    with pytest.raises(NonFiniteError, match=r"stopped at step 4: 2 student steps in a row .* generator/grad_norm=nan"):
        train.main([RECIPE_1STEP, *tiny_overrides(tiny_teacher, None, run, **extra)])
    survivor = find_checkpoint(run)
    assert survivor.name == "step-000002"
    assert all(torch.isfinite(v).all() for v in _weights(survivor / "student" / "diffusion_pytorch_model.safetensors").values())
    monkeypatch.undo()
    train.main([RECIPE_1STEP, *tiny_overrides(tiny_teacher, None, run, **extra), "resume=latest"])
    assert [r["step"] for r in _losses(run)] == [1, 2, 3, 4, 5, 6]
