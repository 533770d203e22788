"""The Stable Diffusion / SDXL teacher adapters against stock diffusers: loading, the
"sample" prediction type's x0, prompt encoding and guidance, the VAE, features for
discriminators, dtypes. What every adapter passes (x0 per prediction type, sampling equal to
the stock pipelines', exports) is tests/test_conformance.py's."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler, DiffusionPipeline, UNet2DConditionModel

from distill.denoiser import Denoiser
from distill.discriminators.backbones import denoiser_features
from distill.teachers import (StableDiffusionTeacher, StableDiffusionXLTeacher, adapter_class, cached_condition, load_teacher,
                              teacher_from_pipeline)

PROMPTS = ["a red cat", "a blue dog walking in the long grass"]  # the second is truncated at 16 tokens
TIMESTEPS = torch.tensor([1, 250, 600, 999])


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run in milliseconds on one thread; with the cores busy a multi-threaded
    forward waits on its own workers."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def teachers(tiny_sd, tiny_sd_v, tiny_sdxl):
    """name -> (checkpoint path, teacher loaded through load_teacher)."""
    paths = {"sd": tiny_sd, "sd_v": tiny_sd_v, "sdxl": tiny_sdxl}
    return {name: (path, load_teacher(str(path))) for name, path in paths.items()}


def _x_t(teacher, n, seed=1):
    return _randn(n, *teacher.sample_shape, seed=seed)


@pytest.mark.parametrize("name, cls, prediction_type, pooled_dim", [
    ("sd", StableDiffusionTeacher, "epsilon", lambda t: t.text_encoders[0].config.hidden_size),
    ("sd_v", StableDiffusionTeacher, "v_prediction", lambda t: t.text_encoders[0].config.hidden_size),
    ("sdxl", StableDiffusionXLTeacher, "epsilon", lambda t: t.text_encoders[1].config.projection_dim),
])
def test_load_teacher_picks_the_adapter(teachers, name, cls, prediction_type, pooled_dim):
    _, teacher = teachers[name]
    assert type(teacher) is cls
    assert isinstance(teacher.denoiser, UNet2DConditionModel)
    assert teacher.prediction_type == teacher.scheduler_config["prediction_type"] == prediction_type
    assert teacher.scheduler_config["_class_name"] == {"sd": "PNDMScheduler", "sd_v": "DDIMScheduler",
                                                       "sdxl": "EulerDiscreteScheduler"}[name]
    assert teacher.sample_shape == (4, 8, 8)
    assert teacher.num_classes is None
    assert teacher.head_condition_dim == pooled_dim(teacher) == 16
    assert len(teacher.text_encoders) == (2 if name == "sdxl" else 1)
    for module in (teacher.denoiser, teacher.vae, *teacher.text_encoders):
        assert not module.training
        assert not any(p.requires_grad for p in module.parameters())


def test_adapter_class_needs_a_text_encoder_and_vae():
    sdxl = {"_class_name": "StableDiffusionXLPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"],
            "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"]}
    assert adapter_class(sdxl, "x") is StableDiffusionXLTeacher
    assert adapter_class({**sdxl, "text_encoder_2": [None, None]}, "x") is StableDiffusionTeacher
    with pytest.raises(ValueError, match="SDXL"):  # the refiner: text_encoder_2 only
        adapter_class({**sdxl, "text_encoder": [None, None]}, "refiner")
    with pytest.raises(ValueError, match="no teacher adapter"):  # DeepFloyd IF: a pixel UNet2DConditionModel
        adapter_class({k: v for k, v in sdxl.items() if k != "vae"}, "if")


def _assert_x0_matches_ddim(teacher):
    scheduler = DDIMScheduler.from_config(teacher.scheduler_config)
    scheduler.set_timesteps(10)
    cond = teacher.condition({"prompt": PROMPTS[:1]})
    x_t = _x_t(teacher, 1)
    for t in TIMESTEPS:
        t = t.reshape(1)
        output = teacher.output(teacher.denoiser, x_t, t, cond)
        expected = scheduler.step(output, int(t), x_t).pred_original_sample
        torch.testing.assert_close(Denoiser(teacher, teacher.denoiser).x0(x_t, t, cond), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["sd", "sdxl"])
def test_guidance_is_cfg_of_separate_calls(teachers, name):
    """One batched call gives eq. 6 of Ho & Salimans over separate conditional and null calls,
    per sample timestep."""
    _, teacher = teachers[name]
    cond = teacher.condition({"prompt": PROMPTS})
    x_t, t = _x_t(teacher, 2), TIMESTEPS[1:3]
    out_cond = teacher.output(teacher.denoiser, x_t, t, cond)
    out_null = teacher.output(teacher.denoiser, x_t, t, teacher.null_condition(cond))
    assert (out_cond - out_null).abs().max() > 1e-3  # the prompt matters, so the test can fail
    guided = Denoiser(teacher, teacher.denoiser, 3.0).output(x_t, t, cond)
    torch.testing.assert_close(guided, out_null + 3.0 * (out_cond - out_null), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(Denoiser(teacher, teacher.denoiser, 1.0).output(x_t, t, cond), out_cond)


def test_sd_condition_and_null_condition(teachers):
    _, teacher = teachers["sd"]
    cond = teacher.condition({"prompt": PROMPTS})
    assert {k: tuple(v.shape) for k, v in cond.items()} == {"encoder_hidden_states": (2, 16, 16), "pooled": (2, 16)}
    assert not torch.allclose(cond["pooled"][0], cond["pooled"][1])
    null = teacher.null_condition(cond)
    assert {k: v.shape for k, v in null.items()} == {k: v.shape for k, v in cond.items()}
    empty = teacher.condition({"prompt": ["", ""]})  # SD's negative prompt is the encoded ""
    for key in cond:
        torch.testing.assert_close(null[key], empty[key])
    head = teacher.head_condition(cond)
    assert head.shape == (2, teacher.head_condition_dim) and head.dtype == torch.float32
    torch.testing.assert_close(head, cond["pooled"])


def test_sdxl_condition_and_null_condition(teachers):
    _, teacher = teachers["sdxl"]
    cond = teacher.condition({"prompt": PROMPTS})
    assert {k: tuple(v.shape) for k, v in cond.items()} == {
        "encoder_hidden_states": (2, 16, 32), "text_embeds": (2, 16), "time_ids": (2, 6)}
    assert cond["time_ids"].tolist() == [[16, 16, 0, 0, 16, 16]] * 2  # (original size, crop, target size)
    null = teacher.null_condition(cond)
    assert {k: v.shape for k, v in null.items()} == {k: v.shape for k, v in cond.items()}
    # force_zeros_for_empty_prompt: zero text embeddings, the same time ids
    assert not null["encoder_hidden_states"].any() and not null["text_embeds"].any()
    torch.testing.assert_close(null["time_ids"], cond["time_ids"])
    assert cond["encoder_hidden_states"].abs().sum() > 0
    head = teacher.head_condition(cond)
    assert head.shape == (2, 16)
    torch.testing.assert_close(head, cond["text_embeds"])


@pytest.mark.parametrize("name", ["sd", "sdxl"])
def test_cached_condition_skips_the_text_encoders(teachers, name, monkeypatch):
    _, teacher = teachers[name]
    cond = teacher.condition({"prompt": PROMPTS})

    def refuse(*args, **kwargs):
        raise AssertionError("a cached batch must not run the text encoder")

    for encoder in teacher.text_encoders:
        monkeypatch.setattr(encoder, "forward", refuse)
    batch = {"prompt": PROMPTS, **{f"cond.{k}": v + 1 for k, v in cond.items()}}
    cached = teacher.condition(batch)
    assert cached.keys() == cond.keys()
    for key in cond:
        torch.testing.assert_close(cached[key], cond[key] + 1)
    with pytest.raises(AssertionError, match="cached batch"):
        teacher.condition({"prompt": PROMPTS})
    assert cached_condition({"prompt": PROMPTS}) is None


def test_encode_and_decode(teachers):
    _, teacher = teachers["sd"]
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(3)) * 2 - 1
    x0 = teacher.encode_images(images)
    assert x0.shape == (2, 4, 8, 8) and x0.dtype == torch.float32
    expected = teacher.vae.encode(images).latent_dist.mean * 0.5  # scaling_factor of the tiny VAE
    torch.testing.assert_close(x0, expected)

    x0 = x0.clone().requires_grad_(True)
    decoded = teacher.decode(x0)
    assert decoded.shape == images.shape and decoded.dtype == torch.float32
    assert decoded.min() >= 0 and decoded.max() <= 1 and decoded.std() > 0
    torch.testing.assert_close(decoded, (teacher.vae.decode(x0 / 0.5).sample / 2 + 0.5).clamp(0, 1))
    decoded.sum().backward()  # a discriminator on decoded images trains the student through decode
    assert x0.grad is not None and x0.grad.abs().sum() > 0


def test_vae_shift_factor_is_honoured(tiny_sd):
    teacher = StableDiffusionTeacher.from_pretrained(str(tiny_sd))
    images = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(4)) * 2 - 1
    plain = teacher.encode_images(images)
    teacher.vae.register_to_config(shift_factor=0.25)
    shifted = teacher.encode_images(images)
    torch.testing.assert_close(shifted, plain - 0.25 * 0.5)
    # decode inverts the shift: the same VAE latent as the unshifted x0
    torch.testing.assert_close(teacher.decode(shifted), (teacher.vae.decode(plain / 0.5).sample / 2 + 0.5).clamp(0, 1))


@pytest.mark.parametrize("name", ["sd", "sdxl"])
def test_feature_channels_match_the_hooked_outputs(teachers, name):
    _, teacher = teachers[name]
    cond = teacher.condition({"prompt": PROMPTS})
    x_t, t = _x_t(teacher, 2), TIMESTEPS[:2]
    output, features = denoiser_features(teacher, teacher.denoiser, x_t, t, cond)
    assert output.shape == x_t.shape
    assert [f.shape[1] for f in features] == teacher.feature_channels() == [16, 32, 32]
    assert all(f.dim() == 4 and f.shape[0] == 2 for f in features)
    assert teacher.feature_modules(teacher.denoiser)[-1] is teacher.bottleneck(teacher.denoiser)
    assert features[-1].shape[1] == teacher.bottleneck_channels()


@pytest.mark.parametrize("name", ["sd", "sdxl"])
def test_from_pipeline_equals_from_pretrained(teachers, name):
    path, teacher = teachers[name]
    from_pipe = teacher_from_pipeline(DiffusionPipeline.from_pretrained(path))
    assert type(from_pipe) is type(teacher)
    assert from_pipe.scheduler_config["_class_name"] == teacher.scheduler_config["_class_name"]
    cond = from_pipe.condition({"prompt": PROMPTS})
    x_t, t = _x_t(teacher, 2), TIMESTEPS[1:3]
    torch.testing.assert_close(Denoiser(from_pipe, from_pipe.denoiser, 3.0).x0(x_t, t, cond),
                               Denoiser(teacher, teacher.denoiser, 3.0).x0(x_t, t, teacher.condition({"prompt": PROMPTS})),
                               atol=0, rtol=0)


def test_bfloat16_teacher(teachers, tiny_sd):
    _, full = teachers["sd"]
    teacher = StableDiffusionTeacher.from_pretrained(str(tiny_sd), dtype=torch.bfloat16)
    for module in (teacher.denoiser, teacher.vae, *teacher.text_encoders):
        assert all(p.dtype == torch.bfloat16 for p in module.parameters())
    cond = teacher.condition({"prompt": PROMPTS})
    x_t, t = _x_t(teacher, 2), TIMESTEPS[1:3]
    x0 = Denoiser(teacher, teacher.denoiser, 3.0).x0(x_t, t, cond)
    assert x0.dtype == torch.float32
    reference = Denoiser(full, full.denoiser, 3.0).x0(x_t, t, full.condition({"prompt": PROMPTS}))
    assert (x0 - reference).norm() / reference.norm() < 0.05  # bfloat16 rounding (about 0.01 here), not a different model
    # a float32 trainable copy of the denoiser runs on the bfloat16 teacher's conditioning
    student = full.denoiser
    assert Denoiser(teacher, student).x0(x_t, t, cond).dtype == torch.float32
    assert teacher.encode_images(torch.zeros(1, 3, 16, 16)).dtype == torch.float32


def test_float16_keeps_an_upcast_vae_in_float32(tiny_sd):
    teacher = StableDiffusionTeacher.from_pretrained(str(tiny_sd), dtype=torch.float16)
    assert teacher.vae.config.force_upcast
    assert next(teacher.vae.parameters()).dtype == torch.float32
    assert next(teacher.denoiser.parameters()).dtype == torch.float16
    assert teacher.text_encoders[0].dtype == torch.float16


def test_image_size_sets_latent_shape_and_sdxl_time_ids(tiny_sdxl, tiny_teacher):
    teacher = load_teacher(str(tiny_sdxl), image_size=8)  # native 16 px
    assert teacher.sample_shape == (4, 4, 4) and teacher.image_size == (8, 8)
    cond = teacher.condition({"prompt": ["a cat"]})
    assert cond["time_ids"].tolist() == [[8.0, 8.0, 0.0, 0.0, 8.0, 8.0]]
    x = torch.randn(1, *teacher.sample_shape)
    assert teacher.decode(x).shape == (1, 3, 8, 8)
    with pytest.raises(ValueError, match="not a multiple"):
        load_teacher(str(tiny_sdxl), image_size=7)
    with pytest.raises(ValueError, match="works at 8x8, not 16"):
        load_teacher(str(tiny_teacher), image_size=16)


def test_x0_for_a_sample_prediction_checkpoint_matches_diffusers(tmp_path):
    """The fourth prediction type: a checkpoint that predicts x0 itself ("sample")."""
    from conftest import build_tiny_sd

    teacher = load_teacher(str(build_tiny_sd(tmp_path / "sd-sample", prediction_type="sample")))
    assert teacher.prediction_type == "sample"
    _assert_x0_matches_ddim(teacher)
    x_t, t, cond = _x_t(teacher, 1), TIMESTEPS[:1], teacher.condition({"prompt": PROMPTS[:1]})
    torch.testing.assert_close(Denoiser(teacher, teacher.denoiser).x0(x_t, t, cond), teacher.output(teacher.denoiser, x_t, t, cond))
