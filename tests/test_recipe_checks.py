"""Issue 14, "recipes that validate but should not": each recipe problem a new user ran into
is found before any weights load, named by key and recipe file, and ends the CLI and
``python -m distill.train`` with one line (no traceback)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO, cache_hub_repo, fake_checkpoint

from distill import config as config_lib
from distill.config import ConfigError

RECIPE = REPO / "recipes" / "digits-dmd2-1step.yaml"


@pytest.fixture
def no_weights(monkeypatch):
    """Every weight loader fails the test: the checks must come first."""
    import distill.teachers
    import distill.train  # noqa: F401
    import distill.trainer

    def loaded(*args, **kwargs):
        raise AssertionError("weights loaded")

    monkeypatch.setattr(distill.teachers, "load_teacher", loaded)
    monkeypatch.setattr(distill.trainer, "load_teacher", loaded)


def recipe(tmp_path: Path, text_or_data, name: str = "recipe.yaml") -> Path:
    path = tmp_path / name
    if isinstance(text_or_data, bytes):
        path.write_bytes(text_or_data)
    else:
        path.write_text(text_or_data if isinstance(text_or_data, str) else yaml.safe_dump(text_or_data))
    return path


def error(path: Path, overrides=()) -> str:
    from distill import train

    with pytest.raises(ConfigError) as excinfo:
        train.main([str(path), *overrides])
    return str(excinfo.value)


def tiny(tiny_teacher, tmp_path, **extra) -> dict:
    """A valid recipe on the tiny teacher, no scoring, into tmp_path/run."""
    data = {"teacher": {"path": str(tiny_teacher)}, "eval": {"classifier": None, "features": []},
            "output_dir": str(tmp_path / "run")}
    for key, value in extra.items():
        *sections, leaf = key.split(".")
        node = data
        for section in sections:
            node = node.setdefault(section, {})
        node[leaf] = value
    return data


# --- the file itself ----------------------------------------------------------------------


def test_an_empty_recipe_is_an_error(tmp_path, no_weights):
    path = recipe(tmp_path, "# nothing but a comment\n\n")
    assert re.match(rf"{re.escape(str(path))}: the recipe is empty .*distill validate --keys", error(path))


def test_a_section_given_twice_is_an_error(tmp_path, tiny_teacher, no_weights):
    path = recipe(tmp_path, f"teacher:\n  path: {tiny_teacher}\ntrain:\n  max_steps: 5\ntrain:\n  max_steps: 7\n")
    message = error(path)
    assert message.startswith(f"{path}: not valid YAML") and "'train' is given twice (first on line 3, again on line 5)" in message


def test_a_key_given_twice_inside_a_section_is_an_error(tmp_path, tiny_teacher):
    path = recipe(tmp_path, f"teacher:\n  path: {tiny_teacher}\n  path: other\n")
    assert "'path' is given twice" in str(pytest.raises(ConfigError, config_lib.load, path).value)


def test_a_recipe_that_is_not_utf8_names_the_file(tmp_path, no_weights):
    path = recipe(tmp_path, "teacher:\n  path: models/caf\xe9\n".encode("latin-1"))
    assert error(path) == f"{path}: not UTF-8 text (byte 0xe9 on line 2); save the recipe as UTF-8"


# --- paths: one check by kind, for every path-valued key ----------------------------------


def test_a_misspelt_local_teacher_is_named_with_its_key_before_loading(tmp_path, no_weights, monkeypatch):
    monkeypatch.chdir(REPO)  # where models/ is: models/digits-teachr reads as a local path, not a hub id
    path = recipe(tmp_path, {"teacher": {"path": "models/digits-teachr"}, "output_dir": str(tmp_path / "run")})
    message = error(path)
    assert message.startswith(f"{path}: teacher.path: {REPO / 'models' / 'digits-teachr'} does not exist")
    assert "did you mean models/digits-teacher?" in message


def test_a_missing_dinov2_names_its_key_and_the_command_that_makes_it(tmp_path, tiny_teacher, no_weights, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a fresh directory: no generated models/dinov2-random-digits here
    data = yaml.safe_load((REPO / "recipes" / "digits-add-1step.yaml").read_text())
    data["teacher"]["path"] = str(tiny_teacher)
    data["output_dir"] = str(tmp_path / "run")
    path = recipe(tmp_path, data)
    message = error(path, ["eval.classifier=null", "eval.features=[]", "eval.every=0"])
    assert message.startswith(f"{path}: method.gan.discriminator.dinov2: {tmp_path / 'models/dinov2-random-digits'} "
                              "does not exist: it is generated, not shipped; make it with "
                              "`python scripts/make_random_dinov2.py`")


def test_a_misspelt_classifier_is_found_before_training_not_at_scoring(tmp_path, tiny_teacher, tiny_classifier, no_weights):
    path = recipe(tmp_path, tiny(tiny_teacher, tmp_path, **{"eval.classifier": f"{tiny_classifier}-typo", "eval.features": ["classifier"]}))
    assert error(path).startswith(f"{path}: eval.classifier: {tiny_classifier}-typo does not exist")


def test_a_local_dir_of_the_wrong_kind_says_what_it_lacks(tmp_path, tiny_teacher, tiny_classifier):
    path = recipe(tmp_path, tiny(tiny_teacher, tmp_path, **{"method.gan.discriminator.backbone": "dinov2",
                                                            "method.gan.discriminator.dinov2": str(tiny_teacher)}))
    message = str(pytest.raises(ConfigError, config_lib.load, path).value)
    assert f"method.gan.discriminator.dinov2: {tiny_teacher} has no config.json" in message
    path = recipe(tmp_path, tiny(tiny_teacher, tmp_path, **{"teacher.path": str(tiny_classifier)}), "b.yaml")
    assert f"teacher.path: {tiny_classifier} has no model_index.json" in str(pytest.raises(ConfigError, config_lib.load, path).value)


def test_a_path_is_checked_only_where_it_is_read(tmp_path, tiny_teacher):
    """eval.dinov2 only with the dinov2 features, the discriminator's only with its backbone."""
    path = recipe(tmp_path, tiny(tiny_teacher, tmp_path, **{"eval.dinov2": "./missing", "method.gan.discriminator.dinov2": "./missing"}))
    assert config_lib.load(path).eval.dinov2 == "./missing"


def test_a_hub_id_offline_is_looked_up_in_the_local_cache(tmp_path, tiny_teacher, hub_cache):
    path = recipe(tmp_path, tiny(tiny_teacher, tmp_path, **{"eval.features": ["dinov2"], "eval.dinov2": "acme/dinov2-huge"}))
    message = str(pytest.raises(ConfigError, config_lib.load, path).value)
    assert message.startswith(f"{path}: eval.dinov2: 'acme/dinov2-huge' is not a local directory, and as a hub id its "
                              f"config.json is not in the local cache (HF_HUB_OFFLINE=1; looked in {hub_cache / 'models--acme--dinov2-huge'}")
    cache_hub_repo(hub_cache, "acme/dinov2-huge", {"config.json": "{}"})
    assert config_lib.load(path).eval.dinov2 == "acme/dinov2-huge"


def test_a_hub_teacher_offline_is_looked_up_at_its_revision(tmp_path, tiny_teacher, hub_cache):
    path = recipe(tmp_path, tiny(tiny_teacher, tmp_path, **{"teacher.path": "acme/teacher", "teacher.revision": "v2"}))
    cache_hub_repo(hub_cache, "acme/teacher", {"model_index.json": "{}"})  # main only
    assert "its model_index.json is not in the local cache" in str(pytest.raises(ConfigError, config_lib.load, path).value)
    assert "at revision v2" in str(pytest.raises(ConfigError, config_lib.load, path).value)


def test_a_missing_or_empty_data_path_is_named(tmp_path, tiny_teacher):
    empty = tmp_path / "prompts.txt"
    empty.write_text("\n  \n")
    for value, message in ((str(tmp_path / "nope.txt"), "does not exist"), (str(empty), "is empty")):
        path = recipe(tmp_path, tiny(tiny_teacher, tmp_path, **{"data.dataset": "prompts", "data.path": value}))
        assert f"data.path: {Path(value).resolve()} {message}" in str(pytest.raises(ConfigError, config_lib.load, path).value)


def test_output_dir_that_is_an_existing_file_is_an_error(tmp_path, tiny_teacher, no_weights):
    (tmp_path / "run").write_text("not a directory")
    path = recipe(tmp_path, tiny(tiny_teacher, tmp_path))
    assert error(path) == f"{path}: output_dir: {tmp_path / 'run'} is an existing file; give a directory"
    path = recipe(tmp_path, tiny(tiny_teacher, tmp_path, output_dir=str(tmp_path / "run" / "inner")), "b.yaml")
    assert f"output_dir: {tmp_path / 'run' / 'inner'} is inside {tmp_path / 'run'}, a file" in error(path)


def test_cache_dirs_are_output_paths_too(tmp_path, tiny_teacher):
    (tmp_path / "cache").write_text("")
    path = recipe(tmp_path, tiny(tiny_teacher, tmp_path, **{"eval.cache_dir": str(tmp_path / "cache")}))
    assert "eval.cache_dir: " in str(pytest.raises(ConfigError, config_lib.load, path).value)


def test_resume_of_a_directory_that_is_not_a_checkpoint(tmp_path, tiny_teacher, no_weights):
    (tmp_path / "somewhere").mkdir()
    path = recipe(tmp_path, tiny(tiny_teacher, tmp_path, resume=str(tmp_path / "somewhere")))
    assert error(path).startswith(f"{path}: resume: {tmp_path / 'somewhere'} is not a distill checkpoint (no student/ inside)")


def test_resume_latest_in_a_fresh_directory(tmp_path, tiny_teacher, no_weights):
    path = recipe(tmp_path, tiny(tiny_teacher, tmp_path, resume="latest"))
    assert error(path).startswith(f"{path}: resume: 'latest', but there is no complete checkpoint in "
                                  f"{tmp_path / 'run' / 'checkpoints'} to resume")


def test_resume_latest_with_only_damaged_checkpoints_says_why(tmp_path, tiny_teacher):
    checkpoint = fake_checkpoint(tmp_path / "run", 3)
    (checkpoint / "custom_checkpoint_0.pkl").write_bytes(b"")
    path = recipe(tmp_path, tiny(tiny_teacher, tmp_path, resume="latest"))
    message = str(pytest.raises(ConfigError, config_lib.load, path).value)
    assert f"skipped damaged checkpoint {checkpoint}: custom_checkpoint_0.pkl has 0 bytes, " in message
    assert "custom_checkpoint_0.pkl is empty" in message


# --- ranges beside their fields -----------------------------------------------------------


def test_a_negative_seed_is_named_before_torch_sees_it(tmp_path, tiny_teacher, no_weights):
    path = recipe(tmp_path, tiny(tiny_teacher, tmp_path, seed=-1))
    assert error(path) == f"{path}: seed: must be at least 0, got -1"


@pytest.mark.parametrize("dataset, size, what", [
    ("digits", 1437, "the digits' training split"),
    ("classes", 1000, "the teacher's 10 classes x 100"),
])
def test_a_batch_larger_than_the_dataset_is_found_before_the_teacher_loads(dataset, size, what, tmp_path, tiny_teacher, no_weights):
    path = recipe(tmp_path, tiny(tiny_teacher, tmp_path, **{"data.dataset": dataset, "data.batch_size": size + 1}))
    assert error(path) == f"{path}: data.batch_size: {size + 1} is more than {what} ({size})"
    assert config_lib.load(path, [f"data.batch_size={size}"]).data.batch_size == size


def test_a_batch_larger_than_a_prompts_file(tmp_path, tiny_teacher):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n\na dog\na tree\n")
    path = recipe(tmp_path, tiny(tiny_teacher, tmp_path, **{"data.dataset": "prompts", "data.path": str(prompts), "data.batch_size": 4}))
    assert f"data.batch_size: 4 is more than the prompts in {prompts} (3)" in str(pytest.raises(ConfigError, config_lib.load, path).value)


# --- the machine -------------------------------------------------------------------------


def test_fp16_on_a_cpu_is_an_error_not_fp32_in_silence(tmp_path, tiny_teacher, no_weights, capsys):
    from distill.cli import main

    path = recipe(tmp_path, tiny(tiny_teacher, tmp_path, **{"train.mixed_precision": "fp16"}))
    message = error(path)
    assert message.startswith(f"{path}: train.mixed_precision: fp16 cannot take effect on this machine (cpu)")
    assert "train.mixed_precision=bf16" in message
    with pytest.raises(SystemExit, match=re.escape(f"distill: {path}: train.mixed_precision: fp16")):
        main(["validate", str(path)])
    assert config_lib.load(path).train.mixed_precision == "fp16"  # the recipe itself is fine, elsewhere


# --- no tracebacks -------------------------------------------------------------------------


@pytest.mark.parametrize("entry", [["-m", "distill.train"], ["-m", "distill", "train"], ["-m", "distill", "validate"]])
def test_the_entry_points_end_with_one_line_naming_file_and_key(entry, tmp_path, tiny_teacher):
    path = recipe(tmp_path, tiny(tiny_teacher, tmp_path, seed=-1))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, *entry, str(path)], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 1
    assert result.stderr.strip() == f"distill: {path}: seed: must be at least 0, got -1"
