"""Exports load in stock diffusers and reproduce distill's own sampler."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from conftest import REPO, tiny_overrides
from diffusers import DDPMScheduler, DiffusionPipeline

from distill import train
from distill.export import export
from distill.schedulers import few_step_scheduler
from distill.students import FewStepSampler
from distill.teachers import load_teacher
from distill.runs import find_checkpoint
from distill.sampling import draw_student

RECIPE = str(REPO / "recipes" / "digits-dmd2-1step.yaml")


def _train(teacher, out, timesteps, classifier=None):
    overrides = tiny_overrides(teacher, classifier, out, **{"student.timesteps": timesteps, "train.max_steps": 1, "train.sample_every": 0})
    train.main([RECIPE, *overrides])
    return out


def _diffusers_loop(export_dir, num, seed, labels):
    """What the model card tells users to run, with stock diffusers only."""
    pipe = DiffusionPipeline.from_pretrained(export_dir)
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn((num, 1, 8, 8), generator=generator)
    pipe.scheduler.set_timesteps(_steps(export_dir))
    with torch.no_grad():
        for t in pipe.scheduler.timesteps:
            out = pipe.unet(x, t, class_labels=labels).sample
            x = pipe.scheduler.step(out, t, x, generator=generator).prev_sample
    return (x / 2 + 0.5).clamp(0, 1), pipe


def _steps(export_dir):
    import yaml

    return len(yaml.safe_load((export_dir / "distill_recipe.yaml").read_text())["student"]["timesteps"])


@pytest.mark.parametrize("timesteps,scheduler", [("[500]", "DDIMScheduler"), ("[999,749,499,249]", "LCMScheduler"),
                                                 ("[499,374,249,124]", "LCMScheduler")])
def test_export_reproduces_the_student(tiny_teacher, tiny_classifier, tmp_path, timesteps, scheduler):
    run = _train(tiny_teacher, tmp_path / "run", timesteps, tiny_classifier)
    out = export(run, tmp_path / "export")
    labels = torch.arange(12) % 10
    theirs, pipe = _diffusers_loop(out, 12, seed=7, labels=labels)
    assert type(pipe.scheduler).__name__ == scheduler
    assert pipe.scheduler.timesteps.tolist() == eval(timesteps)

    teacher = load_teacher(str(tiny_teacher))
    student = type(teacher.denoiser).from_pretrained(find_checkpoint(run) / "student")
    ours, our_labels = draw_student(teacher, student, FewStepSampler(eval(timesteps), teacher.schedule), 12, 7, 12, "cpu")
    assert torch.equal(our_labels, labels)
    assert (ours - theirs).abs().max() < 1e-4
    card = (out / "README.md").read_text()
    assert scheduler in card and f"timesteps | {eval(timesteps)}" in card and "| fd_classifier |" in card


def test_unconditional_export_runs_as_ddpm_pipeline(tiny_uncond_teacher, tmp_path):
    run = _train(tiny_uncond_teacher, tmp_path / "run", "[999,749,499,249]")
    out = export(run, tmp_path / "export")
    pipe = DiffusionPipeline.from_pretrained(out)
    assert type(pipe).__name__ == "DDPMPipeline"
    images = pipe(batch_size=3, num_inference_steps=4, generator=torch.Generator().manual_seed(5), output_type="np").images

    teacher = load_teacher(str(tiny_uncond_teacher))
    student = type(teacher.denoiser).from_pretrained(find_checkpoint(run) / "student")
    ours, _ = draw_student(teacher, student, FewStepSampler([999, 749, 499, 249], teacher.schedule), 3, 5, 3, "cpu")
    assert abs(torch.from_numpy(images).permute(0, 3, 1, 2) - ours).max() < 1e-4


def test_scheduler_choice_rejects_unreproducible_timesteps(tiny_teacher):
    config = load_teacher(str(tiny_teacher)).scheduler_config
    assert few_step_scheduler(config, [999, 499]).timesteps.tolist() == [999, 499]
    with pytest.raises(ValueError, match=r"\[999, 749, 499, 249\]"):
        few_step_scheduler(config, [999, 700, 400, 100])
    with pytest.raises(ValueError, match=r"such as \[499, 249\]"):
        few_step_scheduler(config, [500, 250])
    # a multi-step student may start below the last timestep: an LCMScheduler over the first T' timesteps
    truncated = few_step_scheduler(config, [499, 249])
    assert truncated.timesteps.tolist() == [499, 249] and truncated.config.num_train_timesteps == 500
    full = DDPMScheduler.from_config(config)
    torch.testing.assert_close(truncated.alphas_cumprod, full.alphas_cumprod[:500], rtol=1e-6, atol=1e-7)


def test_example_program_imports_diffusers_not_distill(tiny_teacher, tiny_classifier, tmp_path):
    run = _train(tiny_teacher, tmp_path / "run", "[999,749,499,249]", tiny_classifier)
    out = export(run, tmp_path / "export")
    grid = tmp_path / "grid.png"
    example = REPO / "examples" / "sample_from_export.py"
    code = (
        "import runpy, sys\n"
        f"sys.argv = ['example', {str(out)!r}, '--steps', '4', '--out', {str(grid)!r}]\n"
        f"runpy.run_path({str(example)!r}, run_name='__main__')\n"
        "assert not [m for m in sys.modules if m.split('.')[0] == 'distill'], 'the example imported distill'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                            env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert result.returncode == 0, result.stderr[-2000:]
    from PIL import Image

    assert Image.open(grid).size[0] > 8


def test_cli_sample_of_an_export_equals_the_students_own_samples(tiny_teacher, tmp_path):
    import numpy as np
    from PIL import Image

    from distill.cli import main as cli
    from distill.grids import save_grid

    run = _train(tiny_teacher, tmp_path / "run", "[999,749,499,249]")
    out = export(run, tmp_path / "export")
    cli(["sample", str(out), "--out", str(tmp_path / "cli.png"), "--num", "6", "--seed", "7"])

    teacher = load_teacher(str(tiny_teacher))
    student = type(teacher.denoiser).from_pretrained(find_checkpoint(run) / "student")
    ours, _ = draw_student(teacher, student, FewStepSampler([999, 749, 499, 249], teacher.schedule), 6, 7, 6, "cpu")
    save_grid(ours, tmp_path / "ours.png")
    a = np.asarray(Image.open(tmp_path / "cli.png"), dtype=np.int16)
    b = np.asarray(Image.open(tmp_path / "ours.png"), dtype=np.int16)
    assert a.shape == b.shape == ((2 * 9 - 1) * 4, (3 * 9 - 1) * 4)  # 6 images: 2 rows of 3
    assert np.abs(a - b).max() <= 1  # equal up to uint8 rounding
