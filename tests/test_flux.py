"""The FLUX.1 teacher adapter against stock diffusers, on tiny dev-shaped (guidance embedding,
dynamic shift) and schnell-shaped (no embedding, static shift) pipelines: packing, prompt
encoding, the pipeline's mu-shifted timesteps, x0, sampling equal to ``FluxPipeline``'s (embedded
guidance, none, true CFG), features as maps, dtypes, image sizes, the LoRA file FluxPipeline
loads; what the rest of the toolkit does with the adapter's answers (``sample_teacher``, the
few-step export under the pipeline's call, the model card); and the shipped recipe end to end.
What every adapter passes is tests/test_conformance.py's (FLUX.1-dev and -schnell shaped entries)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler, FluxPipeline
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from tiny_flux import build_tiny_flux

from distill.denoiser import Denoiser
from distill.discriminators.backbones import denoiser_features
from distill.teachers import load_teacher, teacher_from_pipeline
from distill.teachers.flux import (FluxSchnellTeacher, FluxTeacher, latent_image_ids, pack_latents,
                                   unpack_latents)

PROMPTS = ["a red cat", "a blue dog walking in the long grass"]  # the second is truncated at 16 CLIP tokens
SIZE = 16  # pixels: 8x8 latents, 4x4 = 16 tokens (not the pipeline's default 128 latents)
T5_TOKENS = {"dev": 512, "schnell": 256}


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny transformers: threads cost more than they give


@pytest.fixture(scope="module")
def flux_paths(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {"dev": build_tiny_flux(root / "flux-dev"), "schnell": build_tiny_flux(root / "flux-schnell", guidance_embeds=False)}


@pytest.fixture(scope="module")
def teachers(flux_paths):
    return {name: load_teacher(str(path), image_size=SIZE) for name, path in flux_paths.items()}


def _pipeline(path: Path, **kwargs) -> FluxPipeline:
    pipe = DiffusionPipeline.from_pretrained(path, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _sample(teacher, num_steps: int, noise, cond, guidance_scale):
    """The stock scheduler loop written out, with the timesteps set by the adapter, as the pipeline sets them."""
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(teacher.scheduler_config)
    teacher.set_timesteps(scheduler, num_steps)
    real = Denoiser(teacher, teacher.denoiser, guidance_scale)
    x = noise
    for t in scheduler.timesteps:
        out = real.output(x, t.expand(x.shape[0]), cond)
        x = scheduler.step(out, t, x).prev_sample
    return x


def test_packing_is_the_pipelines():
    latents = _randn(2, 4, 6, 10)
    tokens = pack_latents(latents)
    torch.testing.assert_close(tokens, FluxPipeline._pack_latents(latents, 2, 4, 6, 10), atol=0, rtol=0)
    assert tokens.shape == (2, 15, 16)
    torch.testing.assert_close(tokens[:, 1 * 5 + 3, 2 * 4 + 1 * 2 + 0], latents[:, 2, 2 * 1 + 1, 2 * 3 + 0])  # (c, dy, dx)
    torch.testing.assert_close(unpack_latents(tokens, 6, 10), latents, atol=0, rtol=0)
    torch.testing.assert_close(unpack_latents(tokens, 6, 10), FluxPipeline._unpack_latents(tokens, 12, 20, 2), atol=0, rtol=0)
    torch.testing.assert_close(latent_image_ids(6, 10, "cpu", torch.float32),
                               FluxPipeline._prepare_latent_image_ids(2, 3, 5, "cpu", torch.float32), atol=0, rtol=0)


def test_load_teacher_picks_the_variant(flux_paths, teachers):
    assert type(teachers["dev"]) is FluxTeacher and teachers["dev"].guidance == "embedded"
    assert type(teachers["schnell"]) is FluxSchnellTeacher and teachers["schnell"].guidance == "cfg"
    for name, path in flux_paths.items():
        assert type(teacher_from_pipeline(_pipeline(path), image_size=SIZE)) is type(teachers[name])
    with pytest.raises(ValueError, match="guidance_embeds=False"):
        pipe = _pipeline(flux_paths["dev"])
        FluxSchnellTeacher(transformer=pipe.transformer, vae=pipe.vae, tokenizers=[pipe.tokenizer, pipe.tokenizer_2],
                           text_encoders=[pipe.text_encoder, pipe.text_encoder_2], scheduler_config=dict(teachers["dev"].scheduler_config))


@pytest.mark.parametrize("name", ["dev", "schnell"])
def test_condition_is_the_pipelines_encode_prompt(teachers, flux_paths, name):
    teacher = teachers[name]
    assert teacher.prediction_type == "flow" and teacher.num_classes is None
    assert teacher.sample_shape == (4, 8, 8) and teacher.image_size == (SIZE, SIZE) and teacher.head_condition_dim == 16
    for module in teacher._frozen():
        assert not module.training and not any(p.requires_grad for p in module.parameters())

    cond = teacher.condition({"prompt": PROMPTS})
    assert {k: tuple(v.shape) for k, v in cond.items()} == {"encoder_hidden_states": (2, T5_TOKENS[name], 32),
                                                            "pooled_projections": (2, 16)}
    pipe = _pipeline(flux_paths[name])
    with torch.no_grad():  # as the pipeline's __call__ runs it (with autograd on, T5's kernels differ by 2e-5)
        embeds, pooled, text_ids = pipe.encode_prompt(PROMPTS, max_sequence_length=T5_TOKENS[name])
        negative, negative_pooled, _ = pipe.encode_prompt("", max_sequence_length=T5_TOKENS[name])
    torch.testing.assert_close(cond["encoder_hidden_states"], embeds, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cond["pooled_projections"], pooled, atol=1e-5, rtol=1e-5)
    assert not text_ids.any() and text_ids.shape == (T5_TOKENS[name], 3)  # what output passes as txt_ids
    null = teacher.null_condition(cond)  # the pipeline's true-CFG negative prompt ""
    assert null["encoder_hidden_states"].shape == cond["encoder_hidden_states"].shape
    torch.testing.assert_close(null["encoder_hidden_states"], negative.expand(2, -1, -1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(null["pooled_projections"], negative_pooled.expand(2, -1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(teacher.head_condition(cond), pooled, atol=1e-5, rtol=1e-5)
    assert not torch.equal(cond["pooled_projections"][0], cond["pooled_projections"][1])


def test_cached_condition_is_read_as_given(teachers):
    teacher = teachers["dev"]
    cond = teacher.condition({"prompt": PROMPTS})
    batch = {"prompt": ["something else", "entirely"], **{f"cond.{k}": v.clone() for k, v in cond.items()}}
    cached = teacher.condition(batch)
    assert set(cached) == set(cond)
    for key in cond:
        assert cached[key] is batch[f"cond.{key}"]
    x_t, t = _randn(2, *teacher.sample_shape, seed=1), torch.tensor([300.0, 700.0])
    torch.testing.assert_close(teacher.output(teacher.denoiser, x_t, t, cached), teacher.output(teacher.denoiser, x_t, t, cond),
                               atol=0, rtol=0)


def test_shift_follows_the_image_size(teachers, flux_paths):
    """mu from the image sequence length (calculate_shift on the scheduler config); the training
    shift is e^mu for dev, the static 1.0 for schnell; the default size is the pipeline's."""
    dev, schnell = teachers["dev"], teachers["schnell"]
    assert dev.image_seq_len == 16 and dev.mu == pytest.approx(calculate_shift(16, 256, 4096, 0.5, 1.15))
    assert dev.schedule.shift == pytest.approx(math.exp(dev.mu)) and dev.schedule.shift != 3.0  # not the config's shift
    assert schnell.schedule.shift == 1.0
    default = FluxTeacher.from_pipeline(_pipeline(flux_paths["dev"]))
    assert default.sample_shape == (4, 128, 128) and default.image_size == (256, 256)
    assert default.image_seq_len == 4096 and default.mu == pytest.approx(1.15) and default.schedule.shift == pytest.approx(math.exp(1.15))
    larger = load_teacher(str(flux_paths["dev"]), image_size=24)
    assert larger.sample_shape == (4, 12, 12) and larger.image_size == (24, 24) and larger.mu > dev.mu
    with pytest.raises(ValueError, match="multiple of the VAE's downsampling factor 2 times the patch size 2"):
        load_teacher(str(flux_paths["dev"]), image_size=18)

    # training timesteps are distributed as the scheduler's dynamically shifted sigmas
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(dev.scheduler_config)
    u = torch.rand(1000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    t = dev.schedule.sample_timesteps(1000, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(t.double(), scheduler.time_shift(dev.mu, 1.0, u) * 1000, atol=1e-3, rtol=0)


@pytest.mark.parametrize("name", ["dev", "schnell"])
def test_set_timesteps_is_the_pipelines(teachers, flux_paths, name):
    """The adapter's timesteps for N steps are the ones the pipeline runs (explicit sigmas
    linspace(1, 1/N, N) and mu), not a plain set_timesteps(N) (linspace down to 1/1000)."""
    teacher = teachers[name]
    pipe = _pipeline(flux_paths[name])
    seen = []
    pipe(PROMPTS[:1], num_inference_steps=3, height=SIZE, width=SIZE, output_type="latent", max_sequence_length=T5_TOKENS[name],
         callback_on_step_end=lambda p, i, t, kwargs: seen.append(float(t)) or {})
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(teacher.scheduler_config)
    ours = teacher.set_timesteps(scheduler, 3)
    assert ours.tolist() == pytest.approx(seen, abs=1e-4) and ours[0] == 1000
    sigmas = np.linspace(1, 1 / 3, 3)
    expected = np.exp(teacher.mu) * sigmas / (1 + (np.exp(teacher.mu) - 1) * sigmas) if name == "dev" else sigmas
    assert ours.tolist() == pytest.approx((1000 * expected).tolist(), abs=1e-3)


@pytest.mark.parametrize("name, size, guidance, true_cfg", [  # at 16 px (and unguided): tests/test_conformance.py
    ("dev", 24, 2.0, 1.0),  # another scale, another size (another mu)
    ("schnell", 24, 2.5, 2.5),  # true CFG with the empty negative prompt
])
def test_sampling_equals_the_stock_pipeline(flux_paths, name, size, guidance, true_cfg):
    """The teacher under FlowMatchEulerDiscreteScheduler, its timesteps set as the pipeline sets
    them, reproduces FluxPipeline's latents (which come back packed: unpacked to compare)."""
    teacher = load_teacher(str(flux_paths[name]), image_size=size)
    noise = _randn(2, *teacher.sample_shape, seed=2)
    cond = teacher.condition({"prompt": PROMPTS})
    ours = _sample(teacher, 2, noise, cond, guidance)
    extra = dict(negative_prompt="", true_cfg_scale=true_cfg) if true_cfg > 1 else {}
    c, h, w = teacher.sample_shape
    packed = _pipeline(flux_paths[name])(PROMPTS, num_inference_steps=2, guidance_scale=3.5 if guidance is None else guidance,
                                         latents=FluxPipeline._pack_latents(noise.clone(), 2, c, h, w), height=size,
                                         width=size, output_type="latent", max_sequence_length=T5_TOKENS[name], **extra).images
    theirs = FluxPipeline._unpack_latents(packed, size, size, teacher.vae_scale_factor)
    assert (ours - noise).abs().max() > 0.1
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", ["dev", "schnell"])
def test_pipeline_kwargs_sample_like_the_default_output(flux_paths, name):
    """``pipe(prompts, **teacher.pipeline_kwargs())`` (what a model card would print) runs the
    adapter's default: its size, embedded scale (dev) and T5 length."""
    teacher = load_teacher(str(flux_paths[name]), image_size=24)
    kwargs = teacher.pipeline_kwargs()
    assert kwargs == {"height": 24, "width": 24, "max_sequence_length": T5_TOKENS[name],
                      **({"guidance_scale": 3.5} if name == "dev" else {})}
    noise = _randn(2, *teacher.sample_shape, seed=10)
    ours = _sample(teacher, 2, noise, teacher.condition({"prompt": PROMPTS}), None)
    packed = _pipeline(flux_paths[name])(PROMPTS, num_inference_steps=2, output_type="latent",
                                         latents=pack_latents(noise), **kwargs).images
    torch.testing.assert_close(pack_latents(ours), packed, atol=1e-4, rtol=0)


def test_embedded_guidance(teachers):
    """dev: the scale rides in the conditioning; no null-prompt batch. schnell: none to embed."""
    dev, schnell = teachers["dev"], teachers["schnell"]
    cond = dev.condition({"prompt": PROMPTS})
    x_t, t = _randn(2, *dev.sample_shape, seed=3), torch.tensor([400.0, 800.0])
    guided = dev.with_guidance(cond, 5.0)
    assert guided["guidance"].tolist() == [5.0, 5.0] and guided["guidance"].dtype == torch.float32 and "guidance" not in cond
    assert torch.equal(dev.null_condition(guided)["guidance"], guided["guidance"])
    default = dev.output(dev.denoiser, x_t, t, cond)
    torch.testing.assert_close(default, Denoiser(dev, dev.denoiser, 3.5).output(x_t, t, cond), atol=0, rtol=0)
    torch.testing.assert_close(dev.output(dev.denoiser, x_t, t, guided), Denoiser(dev, dev.denoiser, 5.0).output(x_t, t, cond),
                               atol=0, rtol=0)
    assert (dev.output(dev.denoiser, x_t, t, guided) - default).abs().max() > 1e-3
    torch.testing.assert_close(Denoiser(dev, dev.denoiser).x0(x_t, t, cond), dev.schedule.to_x0(default, x_t, t), atol=0, rtol=0)

    cond = schnell.condition({"prompt": PROMPTS})
    with pytest.raises(ValueError, match="no guidance embedding"):
        schnell.with_guidance(cond, 3.5)
    plain = schnell.output(schnell.denoiser, x_t, t, cond)
    torch.testing.assert_close(Denoiser(schnell, schnell.denoiser, 1.0).output(x_t, t, cond), plain, atol=0, rtol=0)
    null = schnell.output(schnell.denoiser, x_t, t, schnell.null_condition(cond))
    torch.testing.assert_close(Denoiser(schnell, schnell.denoiser, 3.0).output(x_t, t, cond), null + 3.0 * (plain - null),
                               atol=1e-5, rtol=1e-5)


def test_from_pipeline_equals_from_pretrained(teachers, flux_paths):
    teacher = teachers["dev"]
    from_pipe = FluxTeacher.from_pipeline(_pipeline(flux_paths["dev"]), image_size=SIZE)
    x_t, t = _randn(2, *teacher.sample_shape, seed=4), torch.tensor([250.0, 900.0])
    torch.testing.assert_close(Denoiser(from_pipe, from_pipe.denoiser, 2.0).x0(x_t, t, from_pipe.condition({"prompt": PROMPTS})),
                               Denoiser(teacher, teacher.denoiser, 2.0).x0(x_t, t, teacher.condition({"prompt": PROMPTS})),
                               atol=0, rtol=0)


def test_features_are_image_token_maps(flux_paths):
    """Features see the image tokens [B, 36, 32] of double- and single-stream blocks (the
    second of their (text, image) outputs; 36 = (12/2)^2, no text tokens) as maps [B, 32, 6, 6];
    DMD2's bottleneck hook sees the middle block's. A changed block output changes its feature."""
    teacher = load_teacher(str(flux_paths["dev"]), image_size=24)
    cond = teacher.condition({"prompt": PROMPTS})
    x_t, t = _randn(2, *teacher.sample_shape, seed=5), torch.tensor([300.0, 800.0])
    blocks = [*teacher.denoiser.transformer_blocks, *teacher.denoiser.single_transformer_blocks]
    raw = {}
    handles = [block.register_forward_hook(lambda m, a, out, i=i: raw.__setitem__(i, out)) for i, block in enumerate(blocks)]
    output, features = denoiser_features(teacher, teacher.denoiser, x_t, t, cond)
    for handle in handles:
        handle.remove()
    torch.testing.assert_close(output, teacher.output(teacher.denoiser, x_t, t, cond), atol=0, rtol=0)
    assert teacher.feature_channels() == [32] * 4 and len(features) == 4
    for i, feature in enumerate(features):
        tokens = raw[i][1]
        assert tokens.shape == (2, 36, 32) and raw[i][0].shape == (2, 512, 32)  # image stream; the text stream apart
        assert feature.shape == (2, 32, 6, 6)
        torch.testing.assert_close(feature[:, :, 2, 5], tokens[:, 2 * 6 + 5])  # row-major tokens

    doubled = blocks[2].register_forward_hook(lambda m, a, out: (out[0], 2 * out[1]))  # the first single-stream block
    _, changed = denoiser_features(teacher, teacher.denoiser, x_t, t, cond, layers=[2])
    doubled.remove()
    torch.testing.assert_close(changed[0], 2 * features[2])

    captured = {}
    hook = teacher.bottleneck(teacher.denoiser).register_forward_hook(lambda m, a, out: captured.__setitem__("f", out))
    teacher.output(teacher.denoiser, x_t, t, cond)
    hook.remove()
    assert captured["f"].shape == (2, teacher.bottleneck_channels(), 6, 6)
    torch.testing.assert_close(captured["f"], features[1])  # the middle of four blocks is the second


def test_frozen_parts_take_the_dtype(flux_paths, teachers):
    teacher = FluxTeacher.from_pretrained(str(flux_paths["dev"]), dtype=torch.bfloat16, image_size=SIZE)
    for module in teacher._frozen():
        assert {p.dtype for p in module.parameters()} == {torch.bfloat16}
    cond = teacher.condition({"prompt": PROMPTS})
    assert {v.dtype for v in cond.values()} == {torch.bfloat16}
    x_t, t = _randn(2, *teacher.sample_shape, seed=6), torch.tensor([200.0, 600.0])
    out = teacher.output(teacher.denoiser, x_t, t, cond)
    reference = teachers["dev"].output(teachers["dev"].denoiser, x_t, t, teachers["dev"].condition({"prompt": PROMPTS}))
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert (out - reference).abs().max() < 0.05 * reference.abs().max()


def test_encode_and_decode_are_the_pipelines(teachers):
    """x0 = (latent - shift_factor) * scaling_factor; decode inverts it as the pipeline decodes
    (latents / scaling_factor + shift_factor), differentiably."""
    teacher = teachers["dev"]
    images = _randn(2, 3, SIZE, SIZE, seed=7).clamp(-1, 1)
    x0 = teacher.encode_images(images)
    latents = teacher.vae.encode(images).latent_dist.mode()
    torch.testing.assert_close(x0, (latents - 0.1) * 0.5)
    x0 = x0.detach().requires_grad_(True)
    decoded = teacher.decode(x0, clamp=False)
    expected = teacher.vae.decode(x0.detach() / 0.5 + 0.1).sample / 2 + 0.5
    torch.testing.assert_close(decoded, expected)
    torch.testing.assert_close(teacher.decode(x0), expected.clamp(0, 1))
    decoded.sum().backward()
    assert x0.grad is not None and x0.grad.abs().sum() > 0


def test_lora_file_loads_in_flux_pipeline(teachers, flux_paths, tmp_path):
    """export.save_diffusers_lora's file for FluxPipeline (component "transformer") loads with
    ``pipe.load_lora_weights`` and gives the student's output."""
    from distill.export.lora import save_diffusers_lora
    from distill.students import lora_config, lora_state_dict, make_student

    pipe = _pipeline(flux_paths["dev"])
    teacher = FluxTeacher.from_pipeline(pipe, image_size=SIZE)
    config = lora_config(rank=4, alpha=2, target_modules=["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj",
                                                          "add_v_proj", "to_add_out", "proj_mlp", "proj_out"])
    student = make_student(teacher.denoiser, config)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.1 * torch.randn_like(p))
    cond = teacher.condition({"prompt": PROMPTS})
    x_t, t = _randn(2, *teacher.sample_shape, seed=8), torch.tensor([500.0, 1000.0])
    with torch.no_grad():
        expected = teacher.output(student, x_t, t, cond)
    state, saved_config = lora_state_dict(student)
    save_diffusers_lora(FluxPipeline, "transformer", state, saved_config, tmp_path / "lora")

    fresh = _pipeline(flux_paths["dev"])
    fresh.load_lora_weights(tmp_path / "lora")
    loaded = FluxTeacher.from_pipeline(fresh, image_size=SIZE)
    with torch.no_grad():
        got = loaded.output(loaded.denoiser, x_t, t, cond)
        bare = teacher.output(_pipeline(flux_paths["dev"]).transformer, x_t, t, cond)
    assert (expected - bare).abs().max() > 1e-3
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


# --- what the rest of the toolkit does with the adapter's answers --------------------------------------------


@pytest.mark.parametrize("name", ["dev", "schnell"])
def test_sample_teacher_reproduces_the_pipeline(teachers, name):
    """sample_teacher sets the timesteps through the adapter (dev: sigmas and mu; schnell: the
    pipeline's sigmas, not linspace(1, 0.001))."""
    from distill.sampling import sample_teacher

    teacher = teachers[name]
    noise = _randn(2, *teacher.sample_shape, seed=9)
    cond = teacher.condition({"prompt": PROMPTS})
    ours = sample_teacher(teacher, FlowMatchEulerDiscreteScheduler, 2, noise, cond, guidance_scale=3.5 if name == "dev" else 1.0)
    torch.testing.assert_close(ours, _sample(teacher, 2, noise, cond, 3.5 if name == "dev" else None), atol=1e-5, rtol=0)


def test_even_few_step_schedules_export_to_flux_pipeline(teachers):
    """The exported scheduler under FluxPipeline's call (explicit sigmas, mu) gives the student's
    timesteps when they are evenly spaced down from 1000 (the recipe's 1000, 750, 500, 250)."""
    from distill.schedulers import few_step_scheduler

    teacher = teachers["dev"]
    for timesteps in ([1000], [1000, 500], [1000, 750, 500, 250]):
        scheduler = few_step_scheduler(teacher.scheduler_config, timesteps)
        assert teacher.set_timesteps(scheduler, len(timesteps)).tolist() == pytest.approx(timesteps, abs=1e-3)


def test_shifted_few_step_schedules_export_to_flux_pipeline(teachers):
    """[1000, 900, 750, 500] is FluxPipeline's 4-step grid under shift 3: solved under the
    pipeline's call (the adapter class's pipeline_set_timesteps, as the export and the config
    check solve it), not under a plain set_timesteps(4), which gives 1000, 881, 722, 500 there."""
    from distill.schedulers import few_step_scheduler

    teacher, timesteps = teachers["dev"], [1000, 900, 750, 500]
    scheduler = few_step_scheduler(teacher.scheduler_config, timesteps, set_timesteps=FluxTeacher.pipeline_set_timesteps)
    assert teacher.set_timesteps(scheduler, 4).tolist() == pytest.approx(timesteps, abs=1e-3)
    assert scheduler.config.shift == pytest.approx(3.0, rel=1e-5) and scheduler.config.shift_terminal == pytest.approx(0.5)
    plain = few_step_scheduler(teacher.scheduler_config, timesteps)
    assert teacher.set_timesteps(plain, 4).tolist() != pytest.approx(timesteps, abs=1)


# --- the recipe end to end -------------------------------------------------------------------------------------

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "flux-dmd2-4step-lora.yaml"


def test_recipe_validates(shipped_hub_models):  # the hub teacher as if downloaded once
    from distill import config as config_lib

    config = config_lib.load(str(RECIPE), ["data.path=."])
    assert config.teacher.guidance_scale == 3.5 and config.student.timesteps == [1000, 750, 500, 250]
    assert config.method.gan.weight == 0.03 and config.method.critic_updates == 4 and config.data.resolution == 512


@pytest.fixture(scope="module")
def exported_run(flux_paths, text_data, tmp_path_factory):
    """Two steps of the shipped recipe on the tiny dev pipeline (LoRA roles, GAN head on the
    fake score's middle block, captioned images), then ``distill export``: (run, export dir)."""
    from conftest import latent_recipe_overrides

    from distill import train
    from distill.export import export

    root = tmp_path_factory.mktemp("flux-run")
    lora = {"student.lora.rank": 4, "student.lora.alpha": 2, "method.fake_score_lora.rank": 4, "train.ema_decay": 0,
            "method.gan.discriminator.head_width": 8}
    train.main([str(RECIPE), *latent_recipe_overrides(str(RECIPE), flux_paths["dev"], text_data, root / "run", **lora)])
    return root / "run", export(root / "run", root / "export")


@pytest.mark.slow
def test_recipe_trains_exports_and_the_lora_loads_on_the_teacher(exported_run, flux_paths):
    """The run logs finite losses and trains the LoRA; the fused export and the teacher with the
    exported LoRA run the student's 4 timesteps in FluxPipeline and sample what the student
    samples: its re-noising drawn in FluxPipeline's packed shape (the adapter's step_noise) from
    a generator seeded as the pipeline's global RNG."""
    import json

    from conftest import student_images_as_the_pipeline_draws
    from safetensors.torch import load_file

    run, out = exported_run
    rows = [json.loads(line) for line in (run / "losses.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all("generator/gan_g_loss" in row for row in rows)
    assert all(math.isfinite(v) for row in rows for v in row.values() if isinstance(v, float))
    student_dir = sorted((run / "checkpoints").glob("step-*"))[-1] / "student"
    adapter = load_file(student_dir / "adapter_model.safetensors")
    lora_b = [k for k in adapter if "lora_B" in k]
    assert any("single_transformer_blocks" in k and ".proj_mlp." in k for k in lora_b)
    assert any(adapter[k].abs().max() > 0 for k in lora_b)  # B starts at 0: the adapter trained

    fused = _pipeline(out)
    assert type(fused.scheduler) is FlowMatchEulerDiscreteScheduler and fused.scheduler.config.stochastic_sampling
    teacher = _pipeline(flux_paths["dev"])
    teacher.load_lora_weights(out / "lora")
    teacher.scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(out, subfolder="scheduler")
    images = []
    for pipe in (fused, teacher):
        seen = []
        torch.manual_seed(3)  # the pipeline's scheduler.step re-noises from the global RNG (it passes no generator)
        images.append(pipe(PROMPTS, num_inference_steps=4, height=SIZE, width=SIZE, output_type="np",
                           generator=torch.Generator().manual_seed(3),
                           callback_on_step_end=lambda p, i, t, kwargs: seen.append(float(t)) or {}).images)
        assert seen == pytest.approx([1000, 750, 500, 250], abs=1e-3)
    assert images[0].shape == (2, SIZE, SIZE, 3) and np.isfinite(images[0]).all() and images[0].std() > 1e-3
    np.testing.assert_allclose(images[1], images[0], atol=1e-4, rtol=0)
    student, _ = student_images_as_the_pipeline_draws(run, PROMPTS, seed=3)
    torch.testing.assert_close(torch.from_numpy(images[0]).permute(0, 3, 1, 2), student, atol=1e-4, rtol=0)


@pytest.mark.slow
def test_model_card_samples_at_the_trained_guidance_and_size(exported_run):
    card = (exported_run[1] / "README.md").read_text()
    assert "guidance_scale=0.0" not in card and "guidance_scale=3.5" in card
    assert f"height={SIZE}, width={SIZE}" in card.split("## Sampling with stock diffusers")[1]
