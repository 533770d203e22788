"""Issue 14, "runs that do not recover": a damaged newest checkpoint is passed over for the
newest complete one (said so, and why), a torn last log line is dropped with a warning, and
the logs a resume rewrites are replaced whole or not at all."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from conftest import REPO, fake_checkpoint, tiny_overrides

from distill import checkpoints, runs, train

RECIPE = str(REPO / "recipes" / "digits-dmd2-1step.yaml")
EXTRA = {"train.max_steps": 4, "train.checkpoint_every": 2, "train.keep_checkpoints": 3, "train.sample_every": 0,
         "method.gan.weight": 0.1}


def _losses(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "losses.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def finished_run(tiny_teacher, tmp_path_factory) -> Path:
    """An uninterrupted 4-step run with checkpoints at steps 2 and 4."""
    run = tmp_path_factory.mktemp("recovery") / "full"
    train.main([RECIPE, *tiny_overrides(tiny_teacher, None, run, **EXTRA)])
    return run


def _damaged_copy(finished_run: Path, tmp_path: Path, damage) -> Path:
    run = tmp_path / "damaged"
    shutil.copytree(finished_run, run)
    damage(run / "checkpoints" / "step-000004")
    return run


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


@pytest.mark.parametrize("damage, why", [
    (lambda c: _truncate(c / "model.safetensors"), "model.safetensors is truncated"),
    (lambda c: (c / "random_states_0.pkl").write_bytes(b""), "random_states_0.pkl is empty"),
    (lambda c: _truncate(c / "student" / "diffusion_pytorch_model.safetensors"), "student/diffusion_pytorch_model.safetensors"),
])
def test_a_damaged_latest_checkpoint_resumes_from_the_previous_one_with_the_uninterrupted_losses(
        damage, why, finished_run, tiny_teacher, tmp_path, capsys):
    run = _damaged_copy(finished_run, tmp_path, damage)
    with open(run / "losses.jsonl", "a") as f:
        f.write('{"step": 5, "generator/dmd_lo')  # and the kill tore the log's last line
    capsys.readouterr()
    train.main([RECIPE, *tiny_overrides(tiny_teacher, None, run, **EXTRA), "resume=latest"])
    out = capsys.readouterr()
    said = out.out + out.err
    assert f"skipped damaged checkpoint {run / 'checkpoints' / 'step-000004'}: " in said and why in said
    assert f"resumed from {run / 'checkpoints' / 'step-000002'} at step 2" in said
    assert "losses.jsonl: dropped its last line, cut off mid-write" in said
    assert (run / "checkpoints" / ".set-aside-step-000004").is_dir()  # kept for a look, out of the way of pruning
    assert checkpoints.problems(run / "checkpoints" / "step-000004") == []  # written again, whole

    a, b = _losses(finished_run), _losses(run)
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for ra, rb in zip(a, b):
        for key in ra:
            assert rb[key] == pytest.approx(ra[key], rel=1e-4, abs=1e-6), (ra["step"], key)


def test_export_and_eval_pass_over_a_damaged_latest_checkpoint_too(tmp_path, capsys):
    good, bad = fake_checkpoint(tmp_path, 2), fake_checkpoint(tmp_path, 4)
    _truncate(bad / "student" / "diffusion_pytorch_model.safetensors")
    assert runs.find_checkpoint(tmp_path) == good
    said = capsys.readouterr().err
    assert said.startswith(f"distill: skipped damaged checkpoint {bad}: ")
    assert "student/diffusion_pytorch_model.safetensors is truncated" in said
    with pytest.raises(FileNotFoundError, match=r"step-000004: student/diffusion_pytorch_model.safetensors is truncated"):
        runs.find_checkpoint(tmp_path, str(bad))  # named explicitly: no quiet substitute


def test_what_makes_a_checkpoint_incomplete(tmp_path):
    checkpoint = fake_checkpoint(tmp_path, 1)
    assert checkpoints.problems(checkpoint) == []
    (checkpoint / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    (checkpoint / "custom_checkpoint_0.pkl").unlink()
    found = checkpoints.problems(checkpoint)
    assert "custom_checkpoint_0.pkl is missing" in found
    assert "model.safetensors has an unreadable safetensors header" in found
    older = fake_checkpoint(tmp_path / "old", 1)
    info = json.loads((older / "distill.json").read_text())
    del info["files"]  # written before distill.json listed its files: the formats alone are checked
    (older / "distill.json").write_text(json.dumps(info))
    assert checkpoints.problems(older) == []
    torch.save({"x": torch.zeros(1000)}, older / "optimizer.bin")
    _truncate(older / "optimizer.bin", 0.9)
    assert checkpoints.problems(older)[0].startswith("optimizer.bin is not a readable torch.save archive")
    best = tmp_path / "best"
    shutil.copytree(checkpoint / "student", best / "student")
    assert checkpoints.problems(best)[0].startswith("holds no training state")  # a student alone: not resumable
    assert checkpoints.problems(best, training_state=False) == []


def test_a_torn_line_before_the_last_is_an_error_naming_the_file(tmp_path):
    log = tmp_path / "losses.jsonl"
    log.write_text('{"step": 1}\n{"step": 2, "lo\n{"step": 3}\n')
    with pytest.raises(ValueError, match=rf"{log}: line 2 is not JSON"):
        runs.read_rows(log)


def test_the_logs_a_resume_rewrites_are_replaced_whole_or_not_at_all(tmp_path, monkeypatch):
    log = tmp_path / "losses.jsonl"
    original = "".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in range(1, 6))
    log.write_text(original)

    def killed(*args):
        raise KeyboardInterrupt  # the process dies between writing the new log and renaming it

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        runs.forget_steps_after(tmp_path, 3)
    assert log.read_text() == original and [p.name for p in tmp_path.iterdir()] == ["losses.jsonl"]
    monkeypatch.undo()
    runs.forget_steps_after(tmp_path, 3)
    assert log.read_text() == "".join(original.splitlines(keepends=True)[:3])
