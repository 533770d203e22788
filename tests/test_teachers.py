"""The pixel-UNet teacher adapter against stock diffusers: loading, x0 estimates, guidance."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import DDPMScheduler, UNet2DModel

from conftest import build_tiny_teacher
from distill.denoiser import Denoiser, cat_conditions
from distill.teachers import PixelUNetTeacher, load_teacher

TIMESTEPS = torch.tensor([1, 20, 250, 500, 999])


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny UNets run in milliseconds on one thread; with the cores busy (a training job beside
    the tests) a multi-threaded forward waits on its own workers for about a second."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def teacher(tiny_teacher):
    return load_teacher(str(tiny_teacher))


@pytest.fixture(scope="module")
def v_teacher(tmp_path_factory):
    return load_teacher(str(build_tiny_teacher(tmp_path_factory.mktemp("tiny") / "v-teacher", prediction_type="v_prediction")))


@pytest.fixture(scope="module")
def uncond_teacher(tiny_uncond_teacher):
    return load_teacher(str(tiny_uncond_teacher))


def _batch(teacher, n=len(TIMESTEPS)):
    x_t = _randn(n, *teacher.sample_shape, seed=1)
    labels = torch.arange(n) % 10
    return x_t, TIMESTEPS[:n], {"class_labels": labels}


def _reference_x0(teacher, model_output, x_t, t):
    """pred_original_sample of diffusers' own DDPMScheduler.step, one sample at a time."""
    scheduler = DDPMScheduler.from_config({**teacher.scheduler_config, "clip_sample": False, "thresholding": False})
    generator = torch.Generator().manual_seed(0)
    return torch.cat([
        scheduler.step(model_output[i : i + 1], int(t[i]), x_t[i : i + 1], generator=generator).pred_original_sample
        for i in range(len(t))
    ])


def assert_x0_close(teacher, actual, expected, t, atol=1e-5):
    """x0 estimates equal up to float32 noise in the model output: the conversion divides by
    alpha_t (~0.006 at t=999), so compare alpha_t * x0, i.e. the error in model-output units."""
    alpha, _ = teacher.schedule.alpha_sigma(t, ndim=actual.ndim)
    torch.testing.assert_close(alpha * actual, alpha * expected, atol=atol, rtol=0)


def test_load_teacher_properties(teacher):
    assert isinstance(teacher, PixelUNetTeacher)
    assert isinstance(teacher.denoiser, UNet2DModel)
    assert teacher.num_classes == 10
    assert teacher.null_class == 10
    assert teacher.sample_shape == (1, 8, 8)
    assert teacher.prediction_type == "epsilon"
    assert teacher.scheduler_config["num_train_timesteps"] == 1000
    params = list(teacher.denoiser.parameters())
    assert params and all(not p.requires_grad for p in params)
    assert not teacher.denoiser.training


def test_v_prediction_teacher_properties(v_teacher):
    assert v_teacher.prediction_type == "v_prediction"
    assert v_teacher.scheduler_config["prediction_type"] == "v_prediction"


@torch.no_grad()
def test_output_matches_calling_the_unet(teacher):
    x_t, t, cond = _batch(teacher)
    out = teacher.output(teacher.denoiser, x_t, t, cond)
    assert out.shape == x_t.shape
    torch.testing.assert_close(out, teacher.denoiser(x_t, t, class_labels=cond["class_labels"]).sample)
    # a single timestep broadcasts over the batch
    single = teacher.output(teacher.denoiser, x_t, torch.tensor([250]), cond)
    torch.testing.assert_close(single, teacher.output(teacher.denoiser, x_t, torch.full((len(t),), 250), cond))


@torch.no_grad()
@pytest.mark.parametrize("which", ["teacher", "v_teacher"])
def test_x0_matches_ddpm_scheduler_step(which, request):
    teacher = request.getfixturevalue(which)
    x_t, t, cond = _batch(teacher)
    x0 = Denoiser(teacher, teacher.denoiser).x0(x_t, t, cond)
    reference = _reference_x0(teacher, teacher.output(teacher.denoiser, x_t, t, cond), x_t, t)
    assert x0.shape == x_t.shape
    torch.testing.assert_close(x0, reference, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_epsilon_and_v_teachers_differ(teacher, v_teacher):
    # same weights (same seed) but different parameterisation: the x0 estimates must differ
    x_t, t, cond = _batch(teacher)
    assert not torch.allclose(Denoiser(teacher, teacher.denoiser).x0(x_t, t, cond), Denoiser(v_teacher, v_teacher.denoiser).x0(x_t, t, cond))


@torch.no_grad()
def test_guidance_scale_one_is_unguided(teacher):
    x_t, t, cond = _batch(teacher)
    plain = Denoiser(teacher, teacher.denoiser).x0(x_t, t, cond)
    torch.testing.assert_close(Denoiser(teacher, teacher.denoiser, 1.0).x0(x_t, t, cond), plain)


@torch.no_grad()
@pytest.mark.parametrize("which", ["teacher", "v_teacher"])
def test_guidance_matches_hand_computed_cfg(which, request):
    teacher = request.getfixturevalue(which)
    x_t, t, cond = _batch(teacher)
    null = teacher.null_condition(cond)
    assert torch.equal(null["class_labels"], torch.full_like(cond["class_labels"], 10))
    out_cond = teacher.output(teacher.denoiser, x_t, t, cond)
    out_null = teacher.output(teacher.denoiser, x_t, t, null)
    assert not torch.allclose(out_cond, out_null)  # the class embedding matters
    expected = teacher.schedule.to_x0(out_null + 3 * (out_cond - out_null), x_t, t, teacher.prediction_type)
    guided = Denoiser(teacher, teacher.denoiser, 3.0).x0(x_t, t, cond)
    # x0 batches conditional and null inputs in one call, so the outputs differ by float noise
    assert_x0_close(teacher, guided, expected, t)
    assert not torch.allclose(guided, Denoiser(teacher, teacher.denoiser).x0(x_t, t, cond))


@torch.no_grad()
def test_guidance_with_a_single_timestep(teacher):
    x_t, _, cond = _batch(teacher)
    t = torch.tensor([400])
    out_cond = teacher.output(teacher.denoiser, x_t, t, cond)
    out_null = teacher.output(teacher.denoiser, x_t, t, teacher.null_condition(cond))
    expected = teacher.schedule.to_x0(out_null + 2 * (out_cond - out_null), x_t, t, teacher.prediction_type)
    assert_x0_close(teacher, Denoiser(teacher, teacher.denoiser, 2.0).x0(x_t, t, cond), expected, t)


def test_conditioning_helpers(teacher):
    batch = {"image": torch.zeros(3, 1, 8, 8), "class_label": torch.tensor([1, 2, 3], dtype=torch.int32)}
    cond = teacher.condition(batch)
    assert set(cond) == {"class_labels"}
    assert cond["class_labels"].dtype == torch.int64
    assert cond["class_labels"].tolist() == [1, 2, 3]
    assert torch.equal(teacher.head_condition(cond), cond["class_labels"])
    both = cat_conditions([cond, teacher.null_condition(cond)])
    assert both["class_labels"].tolist() == [1, 2, 3, 10, 10, 10]


def test_encode_decode(teacher):
    images = torch.tensor([-1.0, 0.0, 1.0, 3.0]).reshape(1, 1, 2, 2)
    assert torch.equal(teacher.encode_images(images), images)
    assert teacher.decode(images).flatten().tolist() == [0.0, 0.5, 1.0, 1.0]


def test_bottleneck(teacher):
    assert teacher.bottleneck(teacher.denoiser) is teacher.denoiser.mid_block
    assert teacher.bottleneck_channels() == 16


@torch.no_grad()
def test_unconditional_teacher(uncond_teacher):
    teacher = uncond_teacher
    assert teacher.num_classes is None
    assert teacher.null_class is None
    assert teacher.sample_shape == (1, 8, 8)
    batch = {"image": torch.zeros(2, 1, 8, 8), "class_label": torch.tensor([3, 4])}
    assert teacher.condition(batch) == {}
    assert teacher.null_condition({}) == {}
    assert teacher.head_condition({}) is None
    x_t = _randn(3, 1, 8, 8, seed=2)
    t = TIMESTEPS[:3]
    plain = Denoiser(teacher, teacher.denoiser).x0(x_t, t, {})
    torch.testing.assert_close(Denoiser(teacher, teacher.denoiser, 3.0).x0(x_t, t, {}), plain)
    reference = _reference_x0(teacher, teacher.output(teacher.denoiser, x_t, t, {}), x_t, t)
    torch.testing.assert_close(plain, reference, atol=1e-5, rtol=1e-5)


def test_load_teacher_missing_dir():
    with pytest.raises(FileNotFoundError) as excinfo:
        load_teacher("/no/such/dir")
    assert "/no/such/dir" in str(excinfo.value)


def test_load_teacher_unsupported_pipeline(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps(
        {"_class_name": "FooPipeline", "_diffusers_version": "0.42.1", "transformer": ["diffusers", "SomeTransformer"]}
    ))
    with pytest.raises(ValueError) as excinfo:
        load_teacher(str(tmp_path))
    assert not isinstance(excinfo.value, FileNotFoundError)
    assert "FooPipeline" in str(excinfo.value)
    assert "transformer" in str(excinfo.value)
