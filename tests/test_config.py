"""Recipe schema: defaults, key/type/combination checks, overrides, dump/load, the shipped
recipes, and that recipe errors surface before any weights load."""

from __future__ import annotations

import dataclasses
import re
import os
from pathlib import Path

import pytest
import yaml

from conftest import REPO
from distill import config as config_lib
from distill.config import Config, ConfigError

RECIPES = sorted((REPO / "recipes").glob("*.yaml"))
DIGITS_RECIPES = [r for r in RECIPES if r.name.startswith("digits-")]  # the text recipes: tests/test_text_recipes.py


@pytest.fixture
def tiny(tiny_teacher, tiny_classifier, tiny_dinov2) -> list[str]:
    """Overrides pointing a recipe at the tiny fixtures instead of models/ (the DINOv2 one
    only matters to recipes with the dinov2 backbone)."""
    return [f"teacher.path={tiny_teacher}", f"eval.classifier={tiny_classifier}", f"method.gan.discriminator.dinov2={tiny_dinov2}"]


def write_recipe(tmp_path: Path, data, tiny_teacher: Path | None = None, name: str = "recipe.yaml") -> Path:
    """A recipe file; dict recipes get the tiny teacher and no classifier unless they set them."""
    if isinstance(data, dict) and tiny_teacher is not None:
        data = dict(data)
        data.setdefault("teacher", {})
        data["teacher"] = {"path": str(tiny_teacher), **data["teacher"]}
        data.setdefault("eval", {"classifier": None, "features": []})
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def load_error(path: Path, overrides: list[str] = ()) -> str:
    with pytest.raises(ConfigError) as excinfo:
        config_lib.load(path, list(overrides))
    return str(excinfo.value)


# --- defaults -----------------------------------------------------------------------------


def test_defaults_with_tiny_models(tiny, tiny_teacher, tiny_classifier):
    config = config_lib.load(None, tiny)
    assert isinstance(config, Config)
    assert config.teacher.path == str(tiny_teacher)
    assert config.eval.classifier == str(tiny_classifier)
    assert config.student.timesteps == [500]
    assert config.method.name == "dmd2"
    assert config.method.gan.r1.kind == "none"
    assert config.optim.student.lr == 1e-5
    assert config.optim.critic.lr == 1e-4
    assert config.optim.student.betas == [0.0, 0.999]
    assert config.data.batch_size == 64
    assert config.train.max_minutes is None
    assert config.resume is None


def test_defaults_do_not_share_mutable_state():
    a, b = Config(), Config()
    a.student.timesteps.append(1)
    a.optim.critic.betas[0] = 0.5
    assert b.student.timesteps == [500]
    assert b.optim.critic.betas == [0.0, 0.999]


def test_eval_classifier_null_is_accepted(tiny_teacher, tmp_path):
    config = config_lib.load(write_recipe(tmp_path, {}, tiny_teacher))
    assert config.eval.classifier is None and config.eval.features == []


@pytest.mark.parametrize(
    "eval_section, key, message",
    [
        ({"features": ["fid"]}, "eval.features", "unknown feature space 'fid'; choose from classifier, dinov2, inception"),
        ({"features": ["classifier"], "classifier": None}, "eval.features", "needs eval.classifier"),
        ({"features": ["dinov2", "dinov2"]}, "eval.features", "lists a feature space twice"),
        ({"features": [], "every": 10}, "eval.every", "needs at least one feature space"),
        ({"features": ["dinov2"], "dinov2": "./no/such/dinov2"}, "eval.dinov2", "no/such/dinov2 does not exist|has no config.json"),
        ({"features": ["dinov2"], "every_num_samples": 3}, "eval.every_num_samples", "need more samples"),
        ({"features": [], "kid_subsets": 0}, "eval.kid_subsets", "must be positive"),
    ],
)
def test_eval_settings_are_checked_before_weights_load(tiny_teacher, tmp_path, eval_section, key, message, shipped_hub_models):
    error = load_error(write_recipe(tmp_path, {"eval": {"classifier": None, **eval_section}}, tiny_teacher))
    assert f"{key}:" in error and re.search(message, error), error


def test_distill_eval_settings_accept_only_eval_and_data_keys(hub_cache):
    from conftest import cache_hub_repo

    with pytest.raises(ConfigError, match=r"distill eval x: train.max_steps: only eval\.\* and data\.\* settings apply"):
        config_lib.load_eval(["train.max_steps=3"], source="distill eval x")
    with pytest.raises(ConfigError, match=r"x: eval.dinov2: 'org/name' .* not in the local cache .*looked in .*models--org--name"):
        config_lib.load_eval(["eval.features=[dinov2]", "eval.dinov2=org/name"], source="x")
    cache_hub_repo(hub_cache, "org/name", {"config.json": "{}"})
    assert config_lib.load_eval(["eval.features=[dinov2]", "eval.dinov2=org/name"], source="x").eval.features == ["dinov2"]


# --- errors name the recipe file and the key ----------------------------------------------


BAD_RECIPES = {
    "unknown-top-level": ({"lerning_rate": 1e-4}, "lerning_rate"),
    "unknown-nested": ({"method": {"dmd_wieght": 0.1}}, "method.dmd_wieght"),
    "unknown-deeply-nested": ({"method": {"gan": {"r1": {"kind": "exact", "gamma": 1}}}}, "method.gan.r1.gamma"),
    "str-for-int": ({"data": {"batch_size": "big"}}, "data.batch_size"),
    "int-for-list": ({"student": {"timesteps": 500}}, "student.timesteps"),
    "bool-for-int": ({"data": {"batch_size": True}}, "data.batch_size"),
    "bool-for-int-top": ({"seed": False}, "seed"),
    "str-for-float": ({"optim": {"student": {"lr": "fast"}}}, "optim.student.lr"),
    "float-in-int-list": ({"student": {"timesteps": [999.5]}}, "student.timesteps"),
    "scalar-for-section": ({"method": "dmd2"}, "method"),
    "bad-literal": ({"method": {"gan": {"loss": "wasserstein"}}}, "method.gan.loss"),
    "bad-literal-precision": ({"train": {"mixed_precision": "fp8"}}, "train.mixed_precision"),
    "exact-r1-without-gan": ({"method": {"gan": {"r1": {"kind": "exact"}, "weight": 0}}}, "method.gan.r1.kind"),
    "ascending-timesteps": ({"student": {"timesteps": [249, 999]}}, "student.timesteps"),
    "repeated-timesteps": ({"student": {"timesteps": [999, 999]}}, "student.timesteps"),
    "zero-timestep": ({"student": {"timesteps": [999, 0]}}, "student.timesteps"),
    "empty-timesteps": ({"student": {"timesteps": []}}, "student.timesteps"),
    "timestep-too-large": ({"student": {"timesteps": [1000]}}, "student.timesteps"),
    "unreproducible-timesteps": ({"student": {"timesteps": [999, 500]}}, "student.timesteps"),
    "ema-decay-one": ({"train": {"ema_decay": 1.0}}, "train.ema_decay"),
    "negative-gan-weight": ({"method": {"gan": {"weight": -0.5}}}, "method.gan.weight"),
    "zero-gan-grad-ratio": ({"method": {"gan": {"weight": 0.1, "max_grad_ratio": 0}}}, "method.gan.max_grad_ratio"),
    "zero-batch": ({"data": {"batch_size": 0}}, "data.batch_size"),
    "bad-betas": ({"optim": {"critic": {"betas": [0.5]}}}, "optim.critic.betas"),
    "t-min-above-t-max": ({"method": {"t_min": 500, "t_max": 400}}, "method.t_min"),
    "t-max-too-large": ({"method": {"t_max": 1000}}, "method.t_max"),
    "missing-resume": ({"resume": "/no/such/ckpt"}, "resume"),
}


@pytest.mark.parametrize("name", sorted(BAD_RECIPES))
def test_bad_recipe_names_file_and_key(name, tiny_teacher, tmp_path):
    data, key = BAD_RECIPES[name]
    path = write_recipe(tmp_path, data, tiny_teacher)
    message = load_error(path)
    assert str(path) in message
    assert f"{key}:" in message or f"{key}[" in message, message


def test_exact_r1_error_explains_gan_weight(tiny_teacher, tmp_path):
    message = load_error(write_recipe(tmp_path, {"method": {"gan": {"r1": {"kind": "exact"}, "weight": 0}}}, tiny_teacher))
    assert "method.gan.weight" in message
    # the same regulariser is fine once the GAN head is on
    config = config_lib.load(write_recipe(tmp_path, {"method": {"gan": {"r1": {"kind": "exact"}, "weight": 0.1}}}, tiny_teacher,
                                          "ok.yaml"))
    assert config.method.gan.r1.kind == "exact" and config.method.gan.weight == 0.1


def test_unreproducible_timesteps_suggests_stock_ones(tiny_teacher, tmp_path):
    message = load_error(write_recipe(tmp_path, {"student": {"timesteps": [999, 500]}}, tiny_teacher))
    assert "[999, 500]" in message
    assert "[999, 499]" in message  # what LCMScheduler gives for 2 steps


def test_wrong_type_error_says_what_was_expected(tiny_teacher, tmp_path):
    message = load_error(write_recipe(tmp_path, {"data": {"batch_size": "big"}}, tiny_teacher))
    assert "expected int" in message and "'big'" in message
    message = load_error(write_recipe(tmp_path, {"method": {"gan": {"loss": "wasserstein"}}}, tiny_teacher, "b.yaml"))
    assert "'hinge'" in message and "'wasserstein'" in message


def test_unknown_key_lists_valid_keys(tiny_teacher, tmp_path):
    message = load_error(write_recipe(tmp_path, {"method": {"dmd_wieght": 0.1}}, tiny_teacher))
    assert "dmd_weight" in message.split("method.dmd_wieght", 1)[1]


def test_missing_teacher_dir_names_key_and_resolved_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = write_recipe(tmp_path, {"teacher": {"path": "./no/such/dir"}, "eval": {"classifier": None}})
    message = load_error(path)
    assert str(path) in message
    assert "teacher.path" in message
    assert str((tmp_path / "no" / "such" / "dir").resolve()) in message


def test_teacher_dir_without_model_index(tmp_path):
    (tmp_path / "empty").mkdir()
    path = write_recipe(tmp_path, {"teacher": {"path": str(tmp_path / "empty")}, "eval": {"classifier": None}})
    message = load_error(path)
    assert "teacher.path" in message and "model_index.json" in message


def test_classifier_dir_without_config(tiny_teacher, tmp_path):
    (tmp_path / "clf").mkdir()
    message = load_error(write_recipe(tmp_path, {"eval": {"classifier": str(tmp_path / "clf")}}, tiny_teacher))
    assert "eval.classifier" in message and "config.json" in message


def test_missing_resume_names_resolved_path(tiny_teacher, tmp_path):
    message = load_error(write_recipe(tmp_path, {"resume": "/no/such/ckpt"}, tiny_teacher))
    assert "resume" in message and "/no/such/ckpt" in message


def test_resume_latest_and_a_checkpoint_dir_accepted(tiny_teacher, tmp_path):
    from conftest import fake_checkpoint

    run = tmp_path / "run"
    checkpoint = fake_checkpoint(run, 2)
    recipe = {"resume": "latest", "output_dir": str(run)}
    assert config_lib.load(write_recipe(tmp_path, recipe, tiny_teacher)).resume == "latest"
    config = config_lib.load(write_recipe(tmp_path, {"resume": str(checkpoint)}, tiny_teacher, "r.yaml"))
    assert config.resume == str(checkpoint)


def test_missing_recipe_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    message = load_error(missing)
    assert str(missing) in message and "not found" in message


def test_recipe_that_is_a_list(tmp_path):
    path = write_recipe(tmp_path, "- teacher\n- student\n")
    message = load_error(path)
    assert str(path) in message and "mapping" in message and "list" in message


def test_recipe_that_is_not_yaml(tmp_path):
    path = write_recipe(tmp_path, "teacher: {path: [unclosed\n")
    message = load_error(path)
    assert str(path) in message and "YAML" in message


def test_empty_recipe_is_an_error(tiny, tmp_path):
    path = write_recipe(tmp_path, "# only a comment\n")
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}: the recipe is empty"):
        config_lib.load(path, tiny)


# --- overrides ----------------------------------------------------------------------------


def test_override_float_written_as_exponent(tiny):
    config = config_lib.load(None, [*tiny, "optim.student.lr=3e-5"])
    assert isinstance(config.optim.student.lr, float)
    assert config.optim.student.lr == 3e-5
    assert config.optim.critic.lr == 1e-4


def test_override_int_widened_to_float(tiny):
    config = config_lib.load(None, [*tiny, "method.gan.weight=2"])
    assert config.method.gan.weight == 2.0 and isinstance(config.method.gan.weight, float)


def test_override_list_of_ints(tiny):
    config = config_lib.load(None, [*tiny, "student.timesteps=[999,749,499,249]"])
    assert config.student.timesteps == [999, 749, 499, 249]
    assert all(type(t) is int for t in config.student.timesteps)


def test_override_null(tiny, tiny_teacher, tmp_path):
    path = write_recipe(tmp_path, {"train": {"max_minutes": 11}}, tiny_teacher)
    assert config_lib.load(path).train.max_minutes == 11.0
    assert config_lib.load(path, ["train.max_minutes=null"]).train.max_minutes is None
    assert config_lib.load(path, ["train.max_minutes="]).train.max_minutes is None


def test_override_beats_recipe(tiny_teacher, tmp_path):
    path = write_recipe(tmp_path, {"data": {"batch_size": 8}, "seed": 3}, tiny_teacher)
    config = config_lib.load(path, ["data.batch_size=16"])
    assert config.data.batch_size == 16 and config.seed == 3


def test_override_nested_r1(tiny):
    config = config_lib.load(None, [*tiny, "method.gan.weight=0.1", "method.gan.r1.kind=approximated",
                                    "method.gan.r1.sigma=0.05"])
    assert config.method.gan.r1.kind == "approximated" and config.method.gan.r1.sigma == 0.05
    assert config.method.gan.r1.weight == 1.0e-3  # the schema's default, untouched by the other keys


def test_override_without_equals(tiny):
    with pytest.raises(ConfigError) as excinfo:
        config_lib.load(None, [*tiny, "train.max_steps"])
    assert "train.max_steps" in str(excinfo.value)
    assert "section.key=value" in str(excinfo.value)


def test_override_unknown_key(tiny, tiny_teacher, tmp_path):
    path = write_recipe(tmp_path, {}, tiny_teacher)
    message = load_error(path, ["method.dmd_wieght=1"])
    assert "method.dmd_wieght" in message and str(path) in message
    with pytest.raises(ConfigError, match="lerning_rate"):
        config_lib.load(None, [*tiny, "lerning_rate=1"])


def test_override_wrong_type(tiny):
    with pytest.raises(ConfigError, match=r"train\.max_steps"):
        config_lib.load(None, [*tiny, "train.max_steps=lots"])


def test_override_through_a_scalar(tiny):
    with pytest.raises(ConfigError, match="seed"):
        config_lib.load(None, [*tiny, "seed.value=1"])


@pytest.mark.parametrize("override", ["optim.student.lr=nan", "optim.student.lr=.inf", "method.gan.weight=.nan"])
def test_non_finite_numbers_rejected(tiny, override):
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=re.escape(key) + ".*finite"):
        config_lib.load(None, [*tiny, override])


# --- merging, dump/load -----------------------------------------------------------------


def test_nested_defaults_merge(tiny_teacher, tmp_path):
    path = write_recipe(tmp_path, {"optim": {"critic": {"betas": [0.5, 0.9]}}}, tiny_teacher)
    config = config_lib.load(path)
    assert config.optim.critic.betas == [0.5, 0.9]
    assert config.optim.critic.lr == 1e-4  # the critic's own default, not the generic 1e-5
    assert config.optim.critic.weight_decay == 0.0
    assert config.optim.student == config_lib.OptimizerConfig(lr=1e-5)
    assert config.optim.student.betas == [0.0, 0.999]


def test_dump_then_load_round_trips(tiny, tmp_path):
    from conftest import fake_checkpoint

    fake_checkpoint(tmp_path / "run", 1)
    config = config_lib.load(None, [f"output_dir={tmp_path / 'run'}",
        *tiny, "student.timesteps=[999,749,499,249]", "method.gan.weight=0.1", "method.gan.r1.kind=exact",
        "optim.critic.betas=[0.5,0.9]", "train.max_minutes=7.5", "optim.student.lr=3e-5", "resume=latest",
    ])
    out = tmp_path / "config.yaml"
    config_lib.dump(config, out)
    again = config_lib.load(out)
    assert again == config
    assert dataclasses.asdict(again) == dataclasses.asdict(config)
    assert again.optim.student.lr == 3e-5 and again.train.max_minutes == 7.5


def test_describe_covers_every_leaf_key():
    rows = {key: (help, default) for key, help, default in config_lib.describe()}
    assert rows["method.gan.r1.kind"][1] == "none"
    assert rows["optim.student.lr"][1] == 1e-5
    assert rows["student.timesteps"][1] == [500]
    assert all(help for help, _ in rows.values())
    assert "teacher" not in rows  # sections are not leaves
    assert len(rows) == 92  # with the default method's (dmd2) section; each method's own: describe_methods
    methods = {name: {key: default for key, _, default in rows} for name, rows in config_lib.describe_methods().items()}
    assert list(methods) == ["dmd2", "add", "ladd"]
    assert methods["add"]["method.distill_weight"] == 2.5 and methods["ladd"]["method.distill_weight"] == 0.0
    assert methods["ladd"]["method.gan.discriminator.backbone"] == "teacher"
    assert "method.dmd_weight" not in methods["add"] and "method.gan.critic_weight" not in methods["add"]
    assert "method.distill_weight" not in methods["dmd2"]


def test_describe_reports_the_real_defaults():
    rows = {key: default for key, _, default in config_lib.describe()}
    assert rows["optim.critic.lr"] == Config().optim.critic.lr == 1e-4


# --- the shipped recipes --------------------------------------------------------------------


def test_there_are_recipes():
    assert len(RECIPES) >= 1


@pytest.mark.parametrize("recipe", DIGITS_RECIPES, ids=lambda p: p.name)
def test_recipe_validates(recipe, tiny, tiny_teacher):
    config = config_lib.load(recipe, tiny)
    assert config.teacher.path == str(tiny_teacher)
    raw = yaml.safe_load(recipe.read_text())
    timesteps = raw.get("student", {}).get("timesteps", [500])
    if any(isinstance(t, dict) for t in timesteps):  # noise levels: the recipe says what they are on the linear teacher
        stated = re.search(r"\(t = ([\d, ]+) on the linear digits teacher\)", recipe.read_text())
        timesteps = [int(t) for t in stated.group(1).split(",")]
    assert config.student.timesteps == timesteps
    for indent, section in (("  ", config.method), ("    ", config.method.gan)):  # method.x and method.gan.x lines
        for key, t in re.findall(rf"^{indent}(t_min|t_max): {{.*}}\s*# t = (\d+) on the linear digits teacher",
                                 recipe.read_text(), re.M):
            assert getattr(section, key) == int(t), key


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_recipe_has_comment_header(recipe):
    lines = recipe.read_text().splitlines()
    assert lines and lines[0].startswith("#")
    header = []
    for line in lines:
        if not line.startswith("#"):
            break
        header.append(line)
    text = "\n".join(header).lower()
    assert "launch" in text
    assert "hardware" in text


# --- errors before weights, and the CLI ----------------------------------------------------


def test_train_fails_on_config_before_loading_weights(tiny_teacher, tmp_path, monkeypatch):
    import distill.teachers
    import distill.train
    import distill.trainer  # imported before the patch, so that it binds the real loader again afterwards

    def no_weights(*args, **kwargs):
        raise AssertionError("weights loaded")

    monkeypatch.setattr(distill.teachers, "load_teacher", no_weights)
    monkeypatch.setattr(distill.trainer, "load_teacher", no_weights)
    path = write_recipe(tmp_path, {"method": {"dmd_wieght": 0.1}, "output_dir": str(tmp_path / "run")}, tiny_teacher)
    with pytest.raises(ConfigError) as excinfo:
        distill.train.main([str(path)])
    assert "method.dmd_wieght" in str(excinfo.value)
    assert not (tmp_path / "run").exists()


def test_train_main_without_arguments_prints_usage(capsys):
    import distill.train

    assert distill.train.main([]) is None
    assert "accelerate launch" in capsys.readouterr().out


def test_cli_validate_ok(tiny, capsys):
    from distill.cli import main

    recipe = str(RECIPES[0])
    main(["validate", recipe, *tiny])
    out = capsys.readouterr().out
    assert out.strip() == f"{recipe}: ok"


def test_cli_validate_print(tiny, capsys):
    from distill.cli import main

    main(["validate", str(RECIPES[0]), *tiny, "--print"])
    out = capsys.readouterr().out
    assert out.rstrip().endswith(": ok")
    printed = yaml.safe_load(out.rsplit("\n", 2)[0])
    assert printed["teacher"]["path"] == tiny[0].split("=", 1)[1]
    assert printed["student"]["timesteps"] == [500]


def test_cli_validate_bad_key(tiny, capsys):
    from distill.cli import main

    with pytest.raises(SystemExit) as excinfo:
        main(["validate", str(RECIPES[0]), *tiny, "method.dmd_wieght=1"])
    assert "method.dmd_wieght" in str(excinfo.value)
    assert str(excinfo.value).startswith(f"distill: {RECIPES[0]}: method.dmd_wieght: unknown key")
    assert "ok" not in capsys.readouterr().out


def test_cli_validate_keys_lists_every_method(capsys):
    from distill.cli import main

    main(["validate", "--keys"])
    out = capsys.readouterr().out
    assert "optim.student.lr = 1e-05" in out
    for name in ("dmd2", "add", "ladd"):
        assert f"method.name = {name!r}:" in out
    assert out.split("method.name = 'add':")[1].split("method.name = 'ladd':")[0].count("method.distill_weight = 2.5") == 1


def test_cli_validate_missing_recipe(tmp_path):
    from distill.cli import main

    with pytest.raises(SystemExit) as excinfo:
        main(["validate", str(tmp_path / "missing.yaml")])
    assert "missing.yaml" in str(excinfo.value)


def test_hub_ids_with_dots_are_not_mistaken_for_missing_local_paths(tmp_path):
    assert config_lib.local_or_hub("stabilityai/stable-diffusion-xl-base-1.0") is None
    assert config_lib.local_or_hub("org/prompts.txt") is not None  # a file: a local path that does not exist
    assert config_lib.local_or_hub(str(tmp_path)) == tmp_path


def test_bare_no_in_yaml_reads_as_the_literal_no(tmp_path, tiny):
    config = config_lib.load(None, [*tiny, "train.mixed_precision=no"])
    assert config.train.mixed_precision == "no"
    with pytest.raises(ConfigError, match="train.mixed_precision"):
        config_lib.load(None, [*tiny, "train.mixed_precision=yes"])


# --- every shipped recipe, and recipes of the shape before the method registry ----------------


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_every_shipped_recipe_validates(recipe, tiny, tmp_path, shipped_hub_models):
    """Digits recipes on the tiny models; the others as shipped (hub teachers), given a data path."""
    raw = yaml.safe_load(recipe.read_text())
    overrides = list(tiny) if recipe.name.startswith("digits-") else []
    if raw.get("data", {}).get("dataset") in ("prompts", "image_captions"):
        overrides.append(f"data.path={tmp_path}")
    config = config_lib.load(recipe, overrides)
    assert config.method.name == raw["method"]["name"]
    assert config.method.gan.loss is not None  # resolved to the method paper's loss


OLD_LADD = {  # digits-ladd-1step.yaml as it was written before the method registry
    "method": {"name": "add", "gan_loss": "hinge", "gan_weight": 1.0, "distill_weight": 0.0, "fake_score_updates": 1,
               "discriminator": {"backbone": "teacher"}, "r1": {"kind": "approximated", "weight": 1.0e-3}},
}


def test_an_old_shape_recipe_says_how_to_write_it_now(tiny_teacher, tmp_path):
    path = write_recipe(tmp_path, OLD_LADD, tiny_teacher)
    message = load_error(path)
    first = message.split(": this key moved: ")[0]
    assert first.startswith(f"{path}: method.") and "(see README); this recipe also has " in message
    for old, new in (("method.gan_loss", "method.gan.loss"), ("method.gan_weight", "method.gan.weight"),
                     ("method.fake_score_updates", "method.critic_updates"),
                     ("method.discriminator.backbone", "method.gan.discriminator.backbone"),
                     ("method.r1.kind", "method.gan.r1.kind"), ("method.r1.weight", "method.gan.r1.weight")):
        assert f"{old}: this key moved: write {new} (see README)" in message or f"{old} (now {new})" in message
    assert "write method.name: ladd" in message


@pytest.mark.parametrize("override, new", [
    ("method.gan_weight=0.1", "method.gan.weight"), ("method.critic_gan_weight=0.01", "method.gan.critic_weight"),
    ("method.fake_score_updates=2", "method.critic_updates"), ("method.r1.kind=exact", "method.gan.r1.kind"),
    ("method.discriminator.backbone=dinov2", "method.gan.discriminator.backbone"), ("method.gan_loss=hinge", "method.gan.loss"),
])
def test_an_old_shape_override_says_how_to_write_it_now(override, new, tiny_teacher, tmp_path):
    path = write_recipe(tmp_path, {}, tiny_teacher)
    old = override.split("=")[0]
    assert load_error(path, [override]) == f"{path}: override {old}: this key moved: write {new} (see README)"


def test_a_run_directory_of_the_old_shape_says_how_to_read_it(tmp_path):
    with pytest.raises(ConfigError, match=r"config.yaml: method.gan_weight: this key moved: write method.gan.weight"):
        config_lib.from_dict({"method": {"name": "dmd2", "gan_weight": 0.0}}, str(tmp_path / "config.yaml"))
