"""Issue 14: every shipped digits recipe runs from a fresh clone with the command in its
header. Each recipe's ``# Launch:`` chain (the first command and its ``then`` lines; ``or``
lines are alternatives) runs as a user would type it, in a fresh copy of what a clone holds
(the committed recipes, models and scripts: no generated models, no runs/), for 2 steps of
small batches: in this process (``distill.cli.main``, the script run as ``__main__``), so the
seven recipes cost their training, not seven imports of torch; the last test runs the real
command line in a subprocess."""

from __future__ import annotations

import json
import os
import runpy
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO

DIGITS_RECIPES = sorted((REPO / "recipes").glob("digits-*.yaml"))
SHORT = {  # a 2-step run of any digits recipe on CPU: small batches, scoring on 20 samples
    "train.max_steps": 2, "train.max_minutes": "null", "train.checkpoint_every": 2, "train.sample_every": 2,
    "train.num_grid_samples": 4, "data.batch_size": 8, "eval.every": 2, "eval.every_num_samples": 20,
    "eval.num_samples": 20, "eval.batch_size": 20, "eval.kid_subsets": 2, "eval.kid_subset_size": 10,
}
EVAL_FLAGS = ["--num", "20", "--batch-size", "20", "--no-speed"]


def launch_commands(recipe: Path) -> list[str]:
    """The ``# Launch:`` chain of a recipe's header: the first command, then each ``then``."""
    header = [line for line in recipe.read_text().splitlines() if line.startswith("#")]
    start = next(i for i, line in enumerate(header) if line.startswith("# Launch:"))
    commands = [header[start].removeprefix("# Launch:")]
    for line in header[start + 1:]:
        body = line.removeprefix("#").strip()
        if body[:1].isupper() and ":" in body.split()[0]:  # the next header field (Hardware: ...)
            break
        if body.startswith("then "):
            commands.append(body.removeprefix("then "))
    return [command.split(" # ")[0].strip() for command in commands]


def fresh_clone(root: Path) -> Path:
    """The recipes, models and scripts a clone of this repository holds (git's tracked files)."""
    tracked = subprocess.run(["git", "ls-files", "recipes", "models", "scripts"], cwd=REPO, capture_output=True,
                             text=True, check=True).stdout.split()
    for name in tracked:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, root / name)
    return root


def run_here(command: str, cache: Path) -> None:
    """Run a header command in this process, in the current directory (the clone): ``python
    script.py ...`` as a script, ``distill ...`` through ``distill.cli.main``, training for 2
    steps (``SHORT``) and scoring on 20 samples."""
    from distill.cli import main

    words = shlex.split(command)
    if words[0] == "python":
        argv = sys.argv
        try:
            sys.argv = words[1:]
            runpy.run_path(words[1], run_name="__main__")
        finally:
            sys.argv = argv
        return
    assert words[0] == "distill", command
    if words[1] == "train":
        words += [*(f"{k}={v}" for k, v in SHORT.items()), f"eval.cache_dir={cache}"]
    elif words[1] == "eval":
        words += [*EVAL_FLAGS, "--cache-dir", str(cache)]
    main(words[1:])


def test_the_launch_chains_are_read_from_the_headers():
    assert launch_commands(REPO / "recipes" / "digits-add-1step.yaml") == [
        "python scripts/make_random_dinov2.py", "distill train recipes/digits-add-1step.yaml"]
    assert launch_commands(REPO / "recipes" / "digits-dmd2-1step-long.yaml") == [
        "distill train recipes/digits-dmd2-1step-long.yaml", "distill eval runs/digits-dmd2-1step-long --checkpoint best"]


@pytest.mark.slow
@pytest.mark.parametrize("recipe", DIGITS_RECIPES, ids=lambda p: p.stem)
def test_a_shipped_recipe_runs_from_a_fresh_clone_with_its_header_command(recipe, tmp_path, monkeypatch, one_thread):
    clone = fresh_clone(tmp_path / "clone")
    assert not (clone / "models" / "dinov2-random-digits").exists() and not (clone / "runs").exists()
    monkeypatch.chdir(clone)
    for command in launch_commands(recipe):
        run_here(command, tmp_path / "cache")
    output_dir = clone / yaml.safe_load(recipe.read_text())["output_dir"]
    rows = [json.loads(line) for line in (output_dir / "losses.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows][-1] == 2
    assert "fd_classifier" in json.loads((output_dir / "metrics.json").read_text())


def test_without_its_setup_command_a_recipe_names_the_command_and_the_key(tmp_path):
    clone = fresh_clone(tmp_path / "clone")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-m", "distill", "train", "recipes/digits-add-1step.yaml"], cwd=clone, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip() == (
        f"distill: recipes/digits-add-1step.yaml: method.gan.discriminator.dinov2: {clone / 'models/dinov2-random-digits'} "
        "does not exist: it is generated, not shipped; make it with `python scripts/make_random_dinov2.py` (from the "
        "repository root) (give a model directory (config.json) or a hub id)")
