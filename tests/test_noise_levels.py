"""Timestep settings given as noise levels ({sigma: s} / {logsnr: l}): resolved at load to the
teacher's timestep of nearest log-SNR, on any schedule, with errors that name the key."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from distill import config as config_lib
from distill.config import ConfigError
from distill.schedulers import few_step_scheduler
from distill.schedules import FlowSchedule, log_snr, nearest_timestep, schedule_from_config
from conftest import cache_hub_repo
from test_config import load_error, write_recipe


def _sigma(schedule, t: int) -> float:
    alpha, sigma = schedule.alpha_sigma(t, ndim=1, dtype=torch.float64)
    return (sigma / alpha).item()


@pytest.fixture(scope="module")
def cosine_teacher(tiny_teacher, tmp_path_factory) -> Path:
    """The tiny teacher with a cosine, v-prediction scheduler config (weights unchanged: only
    the schedule matters to the loader)."""
    path = tmp_path_factory.mktemp("cosine") / "teacher"
    shutil.copytree(tiny_teacher, path)
    file = path / "scheduler" / "scheduler_config.json"
    config = json.loads(file.read_text())
    config.update(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction")
    file.write_text(json.dumps(config))
    return path


def _schedule(teacher: Path):
    return schedule_from_config(json.loads((teacher / "scheduler" / "scheduler_config.json").read_text()))


def test_nearest_timestep_lands_on_the_level_on_each_schedule(tiny_teacher, cosine_teacher):
    linear, cosine = _schedule(tiny_teacher), _schedule(cosine_teacher)
    level = _sigma(linear, 500)  # 3.443 on the linear schedule
    assert nearest_timestep(linear, -2 * math.log(level)) == 500
    t = nearest_timestep(cosine, -2 * math.log(level))
    assert 800 < t < 840  # the cosine schedule keeps more signal at each t: the same noise comes later
    assert _sigma(cosine, t) <= level * 1.01 and _sigma(cosine, t + 1) >= level * 0.99
    flow = FlowSchedule(1000)
    assert nearest_timestep(flow, 0.0) == 500  # sigma 1: x_t = x0 / 2 + eps / 2
    assert nearest_timestep(flow, -2 * math.log(3.0)) == 750  # sigma_t / alpha_t = 0.75 / 0.25


def test_log_snr_is_decreasing_with_flow_endpoints_infinite():
    levels = log_snr(FlowSchedule(1000))
    assert levels.shape == (1001,)
    assert levels[0] == math.inf and levels[-1] == -math.inf
    assert bool((levels[1:] < levels[:-1]).all())


def test_recipe_noise_levels_resolve_per_teacher(tiny_teacher, cosine_teacher, tmp_path):
    linear = _schedule(tiny_teacher)
    recipe = {"student": {"timesteps": [{"sigma": 3.445}]},
              "method": {"t_max": {"sigma": 3.445}, "gan": {"t_max": {"logsnr": -2 * math.log(_sigma(linear, 300))}}}}
    on_linear = config_lib.load(write_recipe(tmp_path, recipe, tiny_teacher, "a.yaml"))
    assert on_linear.student.timesteps == [500]
    assert (on_linear.method.t_max, on_linear.method.gan.t_max) == (500, 300)
    on_cosine = config_lib.load(write_recipe(tmp_path, recipe, cosine_teacher, "b.yaml"))
    cosine = _schedule(cosine_teacher)
    assert on_cosine.student.timesteps == [on_cosine.method.t_max] and 800 < on_cosine.method.t_max < 840
    assert abs(_sigma(cosine, on_cosine.method.gan.t_max) / _sigma(linear, 300) - 1) < 0.01
    assert on_cosine.method.t_min == 20  # an integer stays the teacher's own timestep


def test_resolved_config_dumps_as_integers_and_reads_back(cosine_teacher, tmp_path):
    config = config_lib.load(write_recipe(tmp_path, {"method": {"t_max": {"sigma": 1.0}}}, cosine_teacher))
    config_lib.dump(config, tmp_path / "config.yaml")
    written = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert written["method"]["t_max"] == config.method.t_max and isinstance(config.method.t_max, int)
    assert config_lib.from_dict(written, "config.yaml") == config


def test_override_gives_a_noise_level(tiny_teacher, tmp_path):
    config = config_lib.load(write_recipe(tmp_path, {}, tiny_teacher), ["method.t_max={sigma: 1.24}"])
    assert config.method.t_max == 300


def test_multi_step_levels_become_timesteps_an_export_reproduces(tiny_teacher, cosine_teacher, tmp_path):
    recipe = {"student": {"timesteps": [{"sigma": 2.03}, {"sigma": 0.72}]}}
    assert config_lib.load(write_recipe(tmp_path, recipe, tiny_teacher, "a.yaml")).student.timesteps == [399, 199]
    ts = config_lib.load(write_recipe(tmp_path, recipe, cosine_teacher, "b.yaml")).student.timesteps
    cosine = _schedule(cosine_teacher)
    nearest = [nearest_timestep(cosine, -2 * math.log(s)) for s in (2.03, 0.72)]
    assert ts != nearest and ts[0] - ts[1] == ts[1] + 1  # evenly spaced: T' - 1, T'/2 - 1
    levels = log_snr(cosine)
    targets = torch.tensor([-2 * math.log(s) for s in (2.03, 0.72)], dtype=torch.float64)

    def misfit(first: int) -> float:  # the evenly spaced pair from T' = first + 1
        return ((levels[[first, (first + 1) // 2 - 1]] - targets) ** 2).sum().item()

    assert misfit(ts[0]) < min(misfit(ts[0] - 2), misfit(ts[0] + 2))  # least squares among its neighbours
    config = json.loads((cosine_teacher / "scheduler" / "scheduler_config.json").read_text())
    scheduler = few_step_scheduler(config, ts)
    scheduler.set_timesteps(2)
    assert scheduler.timesteps.tolist() == ts


@pytest.mark.parametrize("value, key, message", [
    ({"sigma": -1.0}, "method.t_max", "sigma must be positive"),
    ({"snr": 2.0}, "method.t_max", "expected int or a noise level ({sigma: s} or {logsnr: l})"),
    ({"sigma": 1.0, "logsnr": 0.0}, "method.t_max", "expected int or a noise level"),
])
def test_bad_noise_level_names_key_and_file(value, key, message, tiny_teacher, tmp_path):
    path = write_recipe(tmp_path, {"method": {"t_max": value}}, tiny_teacher)
    error = load_error(path)
    assert error.startswith(f"{path}: {key}: ") and message in error


def test_levels_beyond_the_schedule_land_on_its_ends(tiny_teacher, tmp_path):
    config = config_lib.load(write_recipe(tmp_path, {"method": {"t_min": {"logsnr": 30.0}, "t_max": {"sigma": 1.0e6}}},
                                          tiny_teacher))
    assert (config.method.t_min, config.method.t_max) == (0, 999)  # the linear schedule's sigma spans 0.01 .. 157
    path = write_recipe(tmp_path, {"student": {"timesteps": [{"logsnr": 30.0}]}}, tiny_teacher, "b.yaml")
    assert "student.timesteps: timesteps must be at least 1" in load_error(path)  # t = 0 is the clean image


def test_noise_level_on_a_hub_teacher_reads_its_scheduler_config(cosine_teacher, hub_cache, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    files = {name: (cosine_teacher / name).read_text() for name in ("model_index.json", "unet/config.json")}
    scheduler = {"scheduler/scheduler_config.json": (cosine_teacher / "scheduler" / "scheduler_config.json").read_text()}
    cache_hub_repo(hub_cache, "org/cosine-teacher", {**files, **scheduler})
    cache_hub_repo(hub_cache, "org/no-scheduler", files)
    recipe = {"student": {"timesteps": [{"sigma": 3.445}]}, "eval": {"classifier": None, "features": []}}
    config = config_lib.load(write_recipe(tmp_path, {**recipe, "teacher": {"path": "org/cosine-teacher"}}, name="a.yaml"))
    assert 800 < config.student.timesteps[0] < 840
    path = write_recipe(tmp_path, {**recipe, "teacher": {"path": "org/no-scheduler"}}, name="b.yaml")
    error = load_error(path)
    assert error.startswith(f"{path}: student.timesteps[0]: ") and "could not be read from the hub" in error
