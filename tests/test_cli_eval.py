"""Issue 14: ``distill eval`` scores CMMD beside FD (with a CLIP model; without one the key is
named) and writes the teacher | student grid from the same seeds and labels."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import REPO, tiny_overrides
from PIL import Image

from distill import cli, train

DIGITS = str(REPO / "recipes" / "digits-dmd2-1step.yaml")


@pytest.fixture(scope="module")
def digits_run(tiny_teacher, tiny_classifier, tmp_path_factory):
    run = tmp_path_factory.mktemp("eval") / "run"
    train.main([DIGITS, *tiny_overrides(tiny_teacher, tiny_classifier, run, **{"train.max_steps": 1, "train.sample_every": 0,
                                                                                 "train.log_with": "[]"})])
    return run


def test_eval_scores_cmmd_in_clip_embeddings_beside_fd(digits_run, tiny_clip, tmp_path, capsys):
    from distill.clip_features import ClipImageFeatures
    from distill.data import reference_set
    from distill.evaluate import run_target
    from distill.features import extract
    from distill.metrics import cmmd

    out = tmp_path / "eval"
    cli.main(["eval", str(digits_run), "--num", "20", "--cmmd", "--clip", str(tiny_clip), "--no-speed", "--compare-num", "0",
              "--cache-dir", str(tmp_path / "cache"), "--out", str(out)])
    row = json.loads((out / "metrics.json").read_text())[0]
    assert "fd_classifier" in row and " CMMD ↓ |" in (out / "metrics.md").read_text()

    features = ClipImageFeatures(str(tiny_clip))
    reference = extract(features, reference_set("digits")[1], 64)
    target, _ = run_target(digits_run, batch_size=500)
    images, _ = target.draw(20, 0, clamp=False)
    expected = cmmd(reference, extract(features, images.clamp(0, 1), 64))
    assert expected > 0 and row["cmmd"] == pytest.approx(expected, rel=1e-5)
    assert not (out / "teacher-vs-student.png").exists()  # --compare-num 0


def test_eval_over_draws_scores_each_draw_apart(digits_run, tiny_classifier, tmp_path):
    from distill.evaluate import Scorer, run_target

    out = tmp_path / "eval"
    cli.main(["eval", str(digits_run), "--num", "30", "--draws", "2", "--no-speed", "--compare-num", "0",
              "--cache-dir", str(tmp_path / "cache"), "--out", str(out)])
    row = json.loads((out / "metrics.json").read_text())[0]
    scorer = Scorer(feature_spaces=["classifier"], dataset="digits", classifier=str(tiny_classifier), dinov2="unused",
                    cache_dir=tmp_path / "cache", nearest_k=3, kid_subsets=5, kid_subset_size=10, batch_size=500)
    target, _ = run_target(digits_run, batch_size=500)
    images, labels = target.draw(60, 0, clamp=False)
    fds = [scorer(images[:30], labels[:30])["fd_classifier"], scorer(images[30:], labels[30:])["fd_classifier"]]
    assert row["num_samples"] == 30 and row["draws"] == 2
    assert row["fd_classifier"] == pytest.approx(sum(fds) / 2, rel=1e-5)
    assert row["fd_classifier_sd"] == pytest.approx(abs(fds[0] - fds[1]) / 2 ** 0.5, rel=1e-4)
    assert " FD sd |" in (out / "metrics.md").read_text()
    with pytest.raises(SystemExit, match="--draws 0; give 1 or more draws"):
        cli.main(["eval", str(digits_run), "--draws", "0", "--no-speed", "--out", str(out)])


def test_cmmd_without_a_clip_model_names_the_key(digits_run, tmp_path):
    with pytest.raises(SystemExit) as exit:
        cli.main(["eval", str(digits_run), "--cmmd", "--no-speed", "--out", str(tmp_path / "eval")])
    message = str(exit.value)
    assert message.startswith(f"distill: distill eval {digits_run}: eval.cmmd: CMMD embeds images with CLIP: set eval.clip")


def test_eval_of_a_student_writes_the_teacher_beside_the_student(digits_run, tiny_teacher, tmp_path, capsys):
    from distill.evaluate import run_target, teacher_target

    out = tmp_path / "eval"
    cli.main(["eval", str(digits_run), "--num", "20", "--no-speed", "--compare-num", "4", "--compare-steps", "3",
              "--cache-dir", str(tmp_path / "cache"), "--out", str(out)])
    assert "teacher, DPM-Solver++" in capsys.readouterr().out
    picture = torch.from_numpy(np.array(Image.open(out / "teacher-vs-student.png"))).float() / 255
    # 4 images of 8x8 in a 2x2 grid (1-pixel gaps) per half, a 3-pixel bar between, each pixel 4x4
    side = 2 * 8 + 1
    assert picture.shape == (side * 4, (2 * side + 3) * 4)
    left, bar, right = picture[:, : side * 4], picture[:, side * 4 : (side + 3) * 4], picture[:, (side + 3) * 4 :]
    assert torch.all(bar == 1) and (left - right).abs().mean() > 0.01  # two samplers, two pictures

    teacher = teacher_target(str(tiny_teacher), "dpmsolver++", 3, guidance_scale=1.0, batch_size=16)
    student, _ = run_target(digits_run, batch_size=16)
    for half, target in ((left, teacher), (right, student)):
        images, _ = target.draw(4, 0)
        first = images[0, 0].repeat_interleave(4, 0).repeat_interleave(4, 1)
        assert (half[:32, :32] - first).abs().max() <= 1 / 255 + 1e-6  # image 0 of the same seed, top left
