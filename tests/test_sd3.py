"""The Stable Diffusion 3 teacher adapter against stock diffusers (prompt encoding with and
without T5, features as maps, flow baselines) and the few-step export for flow students
(``FlowMatchEulerDiscreteScheduler`` with stochastic sampling). Flow x0 and sampling equal to
``StableDiffusion3Pipeline``'s, with and without T5, are tests/test_conformance.py's."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import _clip_special, write_tiny_clip_tokenizer
from diffusers import (AutoencoderKL, DiffusionPipeline, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel,
                       StableDiffusion3Pipeline)

from distill.denoiser import Denoiser
from distill.discriminators.backbones import denoiser_features
from distill.schedulers import few_step_scheduler
from distill.students import FewStepSampler
from distill.teachers.sd3 import StableDiffusion3Teacher

PROMPTS = ["a red cat", "a blue dog walking in the long grass"]  # the second is truncated at 16 CLIP tokens
CLIP_TOKENS, T5_TOKENS = 16, 256  # the tiny CLIP tokenizer's length; the pipeline's max_sequence_length


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def build_tiny_sd3(path: Path) -> Path:
    """A tiny SD3 pipeline: 16x16 images, 8x8x4 latents (VAE scale 2, scaling 0.5, shift 0.1), a
    2-block MMDiT (patch 2, inner dim 16), two CLIP encoders with projection (hidden 16, pooled
    16 + 16 = 32), a 1-layer T5 (d_model 32) with a character Unigram tokenizer, shift 3."""
    from tokenizers import Tokenizer, models
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel, T5TokenizerFast

    torch.manual_seed(0)
    clip_tokenizer, vocab = write_tiny_clip_tokenizer(path / "_tokenizer_files")
    pieces = ["<pad>", "</s>", "<unk>", "\u2581"] + [chr(c) for c in range(33, 127)]  # ids 0, 1, 2 as T5's
    t5_tokenizer = T5TokenizerFast(tokenizer_object=Tokenizer(models.Unigram([(p, -1.0) for p in pieces], unk_id=2)),
                                   eos_token="</s>", pad_token="<pad>", unk_token="<unk>", extra_ids=0)

    def clip():
        return CLIPTextModelWithProjection(CLIPTextConfig(
            vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
            max_position_embeddings=16, projection_dim=16, **_clip_special(vocab)))

    t5 = T5EncoderModel(T5Config(vocab_size=len(pieces), d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4))
    transformer = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
                                        num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16,
                                        pooled_projection_dim=32, out_channels=4)
    vae = AutoencoderKL(block_out_channels=(8, 16), in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=4,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        sample_size=16, scaling_factor=0.5, shift_factor=0.1)
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
                                    text_encoder=clip(), tokenizer=clip_tokenizer, text_encoder_2=clip(),
                                    tokenizer_2=clip_tokenizer, text_encoder_3=t5, tokenizer_3=t5_tokenizer)
    pipe.save_pretrained(path, safe_serialization=True)
    return path


def build_tiny_sd3_without_t5(path: Path) -> Path:
    """``build_tiny_sd3``'s pipeline saved without T5 (text_encoder_3 and tokenizer_3 null)."""
    with_t5 = build_tiny_sd3(path.with_name(path.name + "-with-t5"))
    StableDiffusion3Pipeline.from_pretrained(with_t5, text_encoder_3=None, tokenizer_3=None).save_pretrained(
        path, safe_serialization=True)
    return path


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny transformers: threads cost more than they give


@pytest.fixture(scope="module")
def sd3_paths(tmp_path_factory) -> dict[str, Path]:
    """"t5": the tiny SD3 pipeline; "no_t5": the same saved without T5 (text_encoder_3 = null)."""
    root = tmp_path_factory.mktemp("tiny")
    return {"t5": build_tiny_sd3(root / "sd3"), "no_t5": build_tiny_sd3_without_t5(root / "sd3-no-t5")}


@pytest.fixture(scope="module")
def teachers(sd3_paths):
    return {name: StableDiffusion3Teacher.from_pretrained(str(path)) for name, path in sd3_paths.items()}


def _pipeline(path: Path) -> StableDiffusion3Pipeline:
    # a directory saved without T5 loads only when the caller drops T5 again
    no_t5 = DiffusionPipeline.load_config(path)["text_encoder_3"][0] is None
    pipe = StableDiffusion3Pipeline.from_pretrained(path, **(dict(text_encoder_3=None, tokenizer_3=None) if no_t5 else {}))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("name", ["t5", "no_t5"])
def test_condition_is_the_pipelines_encode_prompt(teachers, sd3_paths, name):
    teacher = teachers[name]
    assert teacher.prediction_type == "flow" and teacher.schedule.shift == 3.0
    assert teacher.scheduler_config["_class_name"] == "FlowMatchEulerDiscreteScheduler"
    assert teacher.sample_shape == (4, 8, 8) and teacher.image_size == (16, 16)
    assert teacher.head_condition_dim == 32 and teacher.num_classes is None
    assert (teacher.text_encoders[2] is None) == (name == "no_t5")
    for module in teacher._frozen():
        assert not module.training and not any(p.requires_grad for p in module.parameters())

    cond = teacher.condition({"prompt": PROMPTS})
    assert {k: tuple(v.shape) for k, v in cond.items()} == {
        "encoder_hidden_states": (2, CLIP_TOKENS + T5_TOKENS, 32), "pooled_projections": (2, 32)}
    embeds, negative, pooled, negative_pooled = _pipeline(sd3_paths[name]).encode_prompt(
        PROMPTS, None, None, do_classifier_free_guidance=True)
    # the encoders loaded twice hold the same weights but differ in the last float32 bits (up to 1e-5)
    torch.testing.assert_close(cond["encoder_hidden_states"], embeds, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cond["pooled_projections"], pooled, atol=1e-5, rtol=1e-5)
    null = teacher.null_condition(cond)  # the negative prompt "" of the pipeline
    torch.testing.assert_close(null["encoder_hidden_states"], negative, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(null["pooled_projections"], negative_pooled, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(teacher.head_condition(cond), pooled)
    t5_part = cond["encoder_hidden_states"][:, CLIP_TOKENS:]
    assert (t5_part.abs().sum() == 0) == (name == "no_t5")  # T5 dropped: its part is zeros
    assert not torch.equal(cond["pooled_projections"][0], cond["pooled_projections"][1])


def test_from_pipeline_equals_from_pretrained(teachers, sd3_paths):
    teacher = teachers["t5"]
    from_pipe = StableDiffusion3Teacher.from_pipeline(_pipeline(sd3_paths["t5"]))
    x_t, t = _randn(2, *teacher.sample_shape, seed=3), torch.tensor([250.0, 900.0])
    torch.testing.assert_close(Denoiser(from_pipe, from_pipe.denoiser, 3.0).x0(x_t, t, from_pipe.condition({"prompt": PROMPTS})),
                               Denoiser(teacher, teacher.denoiser, 3.0).x0(x_t, t, teacher.condition({"prompt": PROMPTS})),
                               atol=0, rtol=0)


def test_features_are_image_token_maps(teachers):
    """Features (and DMD2's bottleneck hook) see each chosen block's image tokens [B, 16, 16]
    (the second of its (text, image) output) as maps [B, 16, 4, 4]; the block's output flows on
    unchanged."""
    teacher = teachers["t5"]
    cond = teacher.condition({"prompt": PROMPTS})
    x_t, t = _randn(2, *teacher.sample_shape, seed=4), torch.tensor([300.0, 800.0])
    blocks = teacher.denoiser.transformer_blocks
    raw = {}
    handles = [block.register_forward_hook(lambda m, a, out, i=i: raw.__setitem__(i, out)) for i, block in enumerate(blocks)]
    output, features = denoiser_features(teacher, teacher.denoiser, x_t, t, cond)
    for handle in handles:
        handle.remove()
    torch.testing.assert_close(output, teacher.output(teacher.denoiser, x_t, t, cond), atol=0, rtol=0)
    assert teacher.feature_channels() == [16, 16] and len(features) == 2
    for i, feature in enumerate(features):
        tokens = raw[i][1]
        assert tokens.shape == (2, 16, 16)
        assert feature.shape == (2, 16, 4, 4)
        # map[:, :, row, col] is token row * 4 + col (PatchEmbed's row-major patches)
        torch.testing.assert_close(feature[:, :, 1, 3], tokens[:, 1 * 4 + 3])
    assert raw[1][0] is None  # the last block keeps only the image stream: the text stream is not a feature

    captured = {}
    hook = teacher.bottleneck(teacher.denoiser).register_forward_hook(lambda m, a, out: captured.__setitem__("f", out))
    teacher.output(teacher.denoiser, x_t, t, cond)
    hook.remove()
    assert captured["f"].shape == (2, teacher.bottleneck_channels(), 4, 4)
    torch.testing.assert_close(captured["f"], features[0])  # the middle of two blocks is the first


def _velocity(x, t):
    """A fake flow model: a smooth, timestep-dependent velocity [B, C, H, W]."""
    return torch.tanh(x) * (1 + t.float().view(-1, 1, 1, 1) / 1000) - 0.2


@pytest.mark.parametrize("timesteps", [[1000], [1000, 500], [1000, 800, 300]])
def test_flow_few_step_scheduler_reproduces_the_student(teachers, timesteps):
    """set_timesteps(N) of the exported scheduler gives the student's timesteps, and the stock
    loop (step with the same generator) gives FewStepSampler.sample: x0 = x_t - sigma v, then
    fresh noise to the next sigma."""
    teacher = teachers["t5"]
    scheduler = few_step_scheduler(teacher.scheduler_config, timesteps)
    assert type(scheduler) is FlowMatchEulerDiscreteScheduler and scheduler.config.stochastic_sampling
    scheduler.set_timesteps(len(timesteps))
    assert scheduler.timesteps.tolist() == pytest.approx(timesteps, abs=1e-3)

    sampler = FewStepSampler(timesteps, teacher.schedule)
    generator = torch.Generator().manual_seed(7)
    noise = torch.randn((2, *teacher.sample_shape), generator=generator)
    student = sampler.sample(lambda x, t: teacher.schedule.to_x0(_velocity(x, t), x, t), noise, generator)

    generator = torch.Generator().manual_seed(7)
    x = torch.randn((2, *teacher.sample_shape), generator=generator)
    for t in scheduler.timesteps:
        x = scheduler.step(_velocity(x, t.expand(2)), t, x, generator=generator).prev_sample
    torch.testing.assert_close(x, student, atol=1e-5, rtol=0)
    if len(timesteps) > 1:  # the re-noising matters: without the same draws the samples differ
        other = FewStepSampler(timesteps, teacher.schedule).sample(
            lambda x, t: teacher.schedule.to_x0(_velocity(x, t), x, t), noise, torch.Generator().manual_seed(8))
        assert (other - student).abs().max() > 1e-2


def test_flow_few_step_scheduler_names_timesteps_that_work(teachers):
    config = teachers["t5"].scheduler_config
    with pytest.raises(ValueError, match=r"first timestep is 1000.*\[1000, 500\]"):
        few_step_scheduler(config, [999, 500])
    with pytest.raises(ValueError, match=r"\[1000, 750, 500, 250\]"):
        few_step_scheduler(config, [1000, 900, 700, 250])


@pytest.mark.parametrize("solver", ["ddim", "dpmsolver++"])
def test_teacher_baselines_use_flow_solvers(sd3_paths, solver):
    from distill.evaluate import teacher_target

    target = teacher_target(str(sd3_paths["no_t5"]), solver, 2, guidance_scale=2.0, batch_size=2, prompts=["a cat", "a dog"])
    assert target.name == f"teacher, {'Euler' if solver == 'ddim' else 'DPM-Solver++'}, 2 steps"
    images, prompts = target.draw(2, 0)
    assert images.shape == (2, 3, 16, 16) and torch.isfinite(images).all() and prompts == ["a cat", "a dog"]
    again, _ = target.draw(2, 0)
    assert torch.equal(images, again)
