"""The DiT and PixArt teacher adapters against stock diffusers: sampling equals PixArt-Sigma's
(DiTPipeline's and PixArt-alpha's: tests/test_conformance.py), epsilon channels of
learned-sigma outputs, x0, guidance, null / head conditions, token features as maps, loading
from a pipeline, image size."""

from __future__ import annotations

import json
import string

import pytest
import torch
from diffusers import (DDIMScheduler, DiffusionPipeline, DiTPipeline, DiTTransformer2DModel, DPMSolverMultistepScheduler,
                       PixArtAlphaPipeline, PixArtSigmaPipeline, PixArtTransformer2DModel)
from transformers import T5Config, T5EncoderModel, T5Tokenizer

from conftest import _tiny_vae
from distill.denoiser import Denoiser
from distill.discriminators.backbones import denoiser_features
from distill.sampling import sample_teacher
from distill.teachers.transformer import DiTTeacher, PixArtTeacher

PROMPTS = ["A red cat", "a blue dog walking in the long grass"]
TIMESTEPS = torch.tensor([1, 250, 600, 999])


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny transformers: threads cost more than they give


def _tiny_dit(num_classes: int = 1000, num_layers: int = 2) -> DiTTransformer2DModel:
    # DiTPipeline writes the null class as the literal 1000: the tiny model keeps 1000 classes
    # (a 1001 x 16 embedding) so that the stock pipeline can guide it
    return DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=num_layers,
                                 sample_size=8, patch_size=2, num_embeds_ada_norm=num_classes)


def _tiny_t5():
    """A character-level T5 tokenizer (Unigram over single characters, written here) and a
    one-layer T5 encoder with d_model 16."""
    chars = sorted(set(string.ascii_lowercase + string.digits + ",.!?'-"))
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)] + [(c, -3.0) for c in chars]
    tokenizer = T5Tokenizer(vocab=vocab, extra_ids=0)
    config = T5Config(d_model=16, d_ff=32, d_kv=8, num_layers=1, num_heads=2, vocab_size=len(vocab),
                      pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    return tokenizer, T5EncoderModel(config)


def _tiny_pixart(use_additional_conditions=None, head_dim=8) -> PixArtTransformer2DModel:
    return PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=head_dim, in_channels=4, out_channels=8, num_layers=2,
                                    sample_size=8, patch_size=2, cross_attention_dim=2 * head_dim, caption_channels=16,
                                    use_additional_conditions=use_additional_conditions)


def build_tiny_dit(path):
    """A DiTPipeline (1000 classes + the null class, learned sigma, 8x8x4 latents, DDIM) saved to ``path``."""
    torch.manual_seed(0)
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=False)
    DiTPipeline(transformer=_tiny_dit(), vae=_tiny_vae(), scheduler=scheduler).save_pretrained(path, safe_serialization=True)
    return path


def build_tiny_pixart(path, pipeline_class=PixArtAlphaPipeline):
    """A PixArt-alpha (or -Sigma) pipeline with a character T5 and a DPM-Solver config, as
    PixArt-alpha ships, saved to ``path``."""
    torch.manual_seed(0)
    tokenizer, text_encoder = _tiny_t5()
    pipeline_class(tokenizer=tokenizer, text_encoder=text_encoder, vae=_tiny_vae(), transformer=_tiny_pixart(),
                   scheduler=DPMSolverMultistepScheduler(num_train_timesteps=1000, beta_schedule="linear")
                   ).save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="module")
def tiny_dit(tmp_path_factory):
    return build_tiny_dit(tmp_path_factory.mktemp("tiny") / "dit")


@pytest.fixture(scope="module")
def tiny_pixart(tmp_path_factory):
    """name -> path: the same tiny components saved as a PixArt-alpha and a PixArt-Sigma pipeline
    (they differ in the default prompt length)."""
    root = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    tokenizer, text_encoder = _tiny_t5()
    components = dict(tokenizer=tokenizer, text_encoder=text_encoder, vae=_tiny_vae(), transformer=_tiny_pixart(),
                      scheduler=DPMSolverMultistepScheduler(num_train_timesteps=1000, beta_schedule="linear"))
    paths = {"alpha": root / "pixart-alpha", "sigma": root / "pixart-sigma"}
    PixArtAlphaPipeline(**components).save_pretrained(paths["alpha"], safe_serialization=True)
    PixArtSigmaPipeline(**components).save_pretrained(paths["sigma"], safe_serialization=True)
    return paths


@pytest.fixture(scope="module")
def teachers(tiny_dit, tiny_pixart):
    return {"dit": DiTTeacher.from_pretrained(str(tiny_dit)), "alpha": PixArtTeacher.from_pretrained(str(tiny_pixart["alpha"])),
            "sigma": PixArtTeacher.from_pretrained(str(tiny_pixart["sigma"]))}


def _cond(teacher, n=2):
    if teacher.num_classes is not None:
        return teacher.condition({"class_label": torch.tensor([3, 7, 1, 0][:n])})
    return teacher.condition({"prompt": PROMPTS[:n]})


def test_loading(teachers, tiny_dit):
    dit, alpha, sigma = teachers["dit"], teachers["alpha"], teachers["sigma"]
    assert type(dit.denoiser) is DiTTransformer2DModel and type(alpha.denoiser) is PixArtTransformer2DModel
    assert dit.scheduler_config["_class_name"] == "DDIMScheduler"
    assert alpha.scheduler_config["_class_name"] == "DPMSolverMultistepScheduler"
    for teacher in teachers.values():
        assert teacher.prediction_type == "epsilon"
        assert teacher.sample_shape == (4, 8, 8) and teacher.image_size == (16, 16)
        assert teacher.feature_channels() == [16, 16] and teacher.bottleneck_channels() == 16
        for module in teacher._frozen():
            assert not module.training and not any(p.requires_grad for p in module.parameters())
    assert (dit.num_classes, dit.null_class, dit.head_condition_dim) == (1000, 1000, None)
    assert (alpha.num_classes, alpha.head_condition_dim) == (None, 16)
    assert (alpha.max_sequence_length, sigma.max_sequence_length) == (120, 300)
    assert not alpha.use_additional_conditions
    # checkpoints that name the legacy Transformer2DModel (facebook/DiT-XL-2-256) load as DiT
    index = json.loads((tiny_dit / "model_index.json").read_text())
    index["transformer"] = ["diffusers", "Transformer2DModel"]
    (tiny_dit / "model_index.json").write_text(json.dumps(index))
    try:
        assert type(DiTTeacher.from_pretrained(str(tiny_dit)).denoiser) is DiTTransformer2DModel
    finally:
        index["transformer"] = ["diffusers", "DiTTransformer2DModel"]
        (tiny_dit / "model_index.json").write_text(json.dumps(index))


@pytest.mark.parametrize("name, pipeline_class", [("sigma", PixArtSigmaPipeline)])  # alpha: tests/test_conformance.py
def test_pixart_sampling_equals_the_stock_pipeline(teachers, tiny_pixart, name, pipeline_class):
    """DDIM with the teacher reproduces the PixArt pipelines: prompt encoding (lower-cased,
    default length, mask), the encoded "" as negative prompt, guidance, epsilon half kept."""
    teacher, path = teachers[name], tiny_pixart[name]
    noise = _randn(2, *teacher.sample_shape, seed=2)
    ours = sample_teacher(teacher, DDIMScheduler, 2, noise, teacher.condition({"prompt": PROMPTS}), guidance_scale=3.0)
    pipe = pipeline_class.from_pretrained(path, scheduler=DDIMScheduler.from_pretrained(path, subfolder="scheduler"))
    pipe.set_progress_bar_config(disable=True)
    # clean_caption needs bs4 and ftfy; binning needs a real checkpoint size
    theirs = pipe(PROMPTS, num_inference_steps=2, guidance_scale=3.0, latents=noise.clone(), output_type="latent", height=16,
                  width=16, clean_caption=False, use_resolution_binning=False).images
    assert (ours - noise).abs().max() > 0.1
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", ["dit", "alpha"])
def test_output_is_the_epsilon_half_and_x0_matches_ddim(teachers, name):
    teacher = teachers[name]
    # PixArt ships a DPM-Solver config: DDIM built from it would clip x0 to [-1, 1] (its default)
    scheduler = DDIMScheduler.from_config(teacher.scheduler_config, clip_sample=False)
    scheduler.set_timesteps(10)
    cond = _cond(teacher, 1)
    x_t = _randn(1, *teacher.sample_shape, seed=1)
    kwargs = teacher._transformer_kwargs(cond, torch.float32)
    for t in TIMESTEPS:
        t = t.reshape(1)
        output = teacher.output(teacher.denoiser, x_t, t, cond)
        full = teacher.denoiser(x_t, timestep=t, **kwargs).sample
        assert full.shape == (1, 8, 8, 8) and output.shape == (1, 4, 8, 8)
        torch.testing.assert_close(output, full[:, :4])
        expected = scheduler.step(output, int(t), x_t).pred_original_sample
        torch.testing.assert_close(Denoiser(teacher, teacher.denoiser).x0(x_t, t, cond), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["dit", "alpha"])
def test_guidance_is_cfg_of_separate_calls(teachers, name):
    teacher = teachers[name]
    cond = _cond(teacher)
    x_t, t = _randn(2, *teacher.sample_shape, seed=1), TIMESTEPS[1:3]
    out_cond = teacher.output(teacher.denoiser, x_t, t, cond)
    out_null = teacher.output(teacher.denoiser, x_t, t, teacher.null_condition(cond))
    assert (out_cond - out_null).abs().max() > 1e-3  # the condition matters, so the test can fail
    guided = Denoiser(teacher, teacher.denoiser, 3.0).output(x_t, t, cond)
    torch.testing.assert_close(guided, out_null + 3.0 * (out_cond - out_null), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(Denoiser(teacher, teacher.denoiser, 1.0).output(x_t, t, cond), out_cond)


def test_dit_null_class_head_condition_and_no_label_dropout(tiny_dit):
    torch.manual_seed(0)
    pipe = DiTPipeline(transformer=_tiny_dit(num_classes=10, num_layers=1), vae=_tiny_vae(),
                       scheduler=DDIMScheduler(beta_schedule="linear"))
    teacher = DiTTeacher.from_pipeline(pipe)
    assert (teacher.num_classes, teacher.null_class) == (10, 10)
    cond = teacher.condition({"class_label": torch.tensor([0, 9, 4])})
    assert cond["class_labels"].dtype == torch.int64
    assert teacher.null_condition(cond)["class_labels"].tolist() == [10, 10, 10]
    assert teacher.head_condition(cond).tolist() == [0, 9, 4]
    # a trainable copy in train mode sees the labels it is given: no random label dropout
    x_t, t = _randn(3, 4, 8, 8, seed=1), TIMESTEPS[:3]
    reference = teacher.output(teacher.denoiser, x_t, t, cond)
    teacher.denoiser.train()
    for seed in range(5):
        torch.manual_seed(seed)
        torch.testing.assert_close(teacher.output(teacher.denoiser, x_t, t, cond), reference)


def test_pixart_condition_null_and_head_condition(teachers):
    teacher = teachers["alpha"]
    cond = teacher.condition({"prompt": PROMPTS})
    assert {k: tuple(v.shape) for k, v in cond.items()} == {"encoder_hidden_states": (2, 120, 16),
                                                           "encoder_attention_mask": (2, 120)}
    # characters + "▁" per word + </s>: "a red cat" -> 3 words, 7 characters, 1 eos
    assert cond["encoder_attention_mask"].sum(1).tolist() == [11, len(PROMPTS[1]) + 1 + 1]
    lower = teacher.condition({"prompt": [p.lower() for p in PROMPTS]})
    torch.testing.assert_close(cond["encoder_hidden_states"], lower["encoder_hidden_states"])  # the pipelines lower-case
    null = teacher.null_condition(cond)
    empty = teacher.condition({"prompt": ["", ""]})
    assert null.keys() == cond.keys() and null["encoder_attention_mask"].sum(1).tolist() == [1, 1]  # </s> only
    for key in cond:
        torch.testing.assert_close(null[key], empty[key])
    head = teacher.head_condition(cond)
    assert head.shape == (2, teacher.head_condition_dim) and head.dtype == torch.float32
    torch.testing.assert_close(head[0], cond["encoder_hidden_states"][0, :11].mean(0))
    assert (head[0] - cond["encoder_hidden_states"][0].mean(0)).abs().max() > 1e-3  # padding is left out


def test_pixart_additional_conditions(tiny_pixart):
    """PixArt-alpha 1024 embeds (H, W) and H / W with the timestep: passed where the
    transformer uses them, following the image size."""
    base = DiffusionPipeline.from_pretrained(tiny_pixart["alpha"])
    torch.manual_seed(0)
    transformer = _tiny_pixart(use_additional_conditions=True, head_dim=12)  # size embeddings take a third of the width
    teacher = PixArtTeacher(transformer=transformer, vae=base.vae, tokenizer=base.tokenizer, text_encoder=base.text_encoder,
                            scheduler_config=dict(base.scheduler.config, _class_name="DDIMScheduler"), max_sequence_length=120)
    cond = teacher.condition({"prompt": PROMPTS})
    assert cond["resolution"].tolist() == [[16.0, 16.0]] * 2 and cond["aspect_ratio"].tolist() == [[1.0]] * 2
    torch.testing.assert_close(teacher.null_condition(cond)["resolution"], cond["resolution"])
    x_t, t = _randn(2, 4, 8, 8, seed=1), TIMESTEPS[1:3]
    output = teacher.output(teacher.denoiser, x_t, t, cond)
    other = teacher.output(teacher.denoiser, x_t, t, {**cond, "resolution": cond["resolution"] * 4})
    assert (output - other).abs().max() > 1e-4  # the transformer reads them
    small = PixArtTeacher(transformer=transformer, vae=base.vae, tokenizer=base.tokenizer, text_encoder=base.text_encoder,
                          scheduler_config=teacher.scheduler_config, max_sequence_length=120, image_size=8)
    assert small.condition({"prompt": PROMPTS[:1]})["resolution"].tolist() == [[8.0, 8.0]]


@pytest.mark.parametrize("name", ["dit", "alpha"])
def test_features_are_block_tokens_as_maps(teachers, name):
    teacher = teachers[name]
    denoiser, cond = teacher.denoiser, _cond(teacher)
    x_t, t = _randn(2, *teacher.sample_shape, seed=1), TIMESTEPS[:2]
    tokens = []
    handles = [block.register_forward_hook(lambda m, a, out: tokens.append(out)) for block in denoiser.transformer_blocks]
    plain = teacher.output(denoiser, x_t, t, cond)
    for handle in handles:
        handle.remove()
    output, features = denoiser_features(teacher, denoiser, x_t, t, cond)
    torch.testing.assert_close(output, plain, atol=0, rtol=0)  # the hooks change nothing downstream
    assert [tuple(f.shape) for f in features] == [(2, 16, 4, 4)] * 2 and teacher.feature_channels() == [16, 16]
    for feature, token in zip(features, tokens):
        assert token.shape == (2, 16, 16)
        torch.testing.assert_close(feature[:, :, 1, 2], token[:, 1 * 4 + 2])  # patch (row 1, column 2)
    captured = []
    handle = teacher.bottleneck(denoiser).register_forward_hook(lambda m, a, out: captured.append(out))
    teacher.output(denoiser, x_t, t, cond)
    handle.remove()
    torch.testing.assert_close(captured[0], features[1])  # the middle of two blocks
    assert not denoiser._forward_pre_hooks and not any(block._forward_hooks for block in denoiser.transformer_blocks)


@pytest.mark.parametrize("name", ["dit", "alpha"])
def test_from_pipeline_equals_from_pretrained(teachers, tiny_dit, tiny_pixart, name):
    teacher = teachers[name]
    path = tiny_dit if name == "dit" else tiny_pixart[name]
    from_pipe = type(teacher).from_pipeline(DiffusionPipeline.from_pretrained(path))
    assert from_pipe.scheduler_config["_class_name"] == teacher.scheduler_config["_class_name"]
    assert getattr(from_pipe, "max_sequence_length", None) == getattr(teacher, "max_sequence_length", None)
    x_t, t = _randn(2, *teacher.sample_shape, seed=1), TIMESTEPS[1:3]
    torch.testing.assert_close(Denoiser(from_pipe, from_pipe.denoiser, 3.0).x0(x_t, t, _cond(from_pipe)),
                               Denoiser(teacher, teacher.denoiser, 3.0).x0(x_t, t, _cond(teacher)), atol=0, rtol=0)


@pytest.mark.parametrize("name", ["dit", "alpha"])
def test_image_size_sets_latent_shape(tiny_dit, tiny_pixart, name):
    cls, path = (DiTTeacher, tiny_dit) if name == "dit" else (PixArtTeacher, tiny_pixart[name])
    teacher = cls.from_pretrained(str(path), image_size=24)  # native 16 px
    assert teacher.sample_shape == (4, 12, 12) and teacher.image_size == (24, 24)
    x_t = _randn(1, *teacher.sample_shape, seed=1)
    cond = _cond(teacher, 1)
    assert Denoiser(teacher, teacher.denoiser, 3.0).x0(x_t, TIMESTEPS[1:2], cond).shape == (1, 4, 12, 12)
    _, features = denoiser_features(teacher, teacher.denoiser, x_t, TIMESTEPS[1:2], cond)
    assert features[0].shape == (1, 16, 6, 6)
    assert teacher.decode(x_t).shape == (1, 3, 24, 24)
    with pytest.raises(ValueError, match="not a multiple"):
        cls.from_pretrained(str(path), image_size=18)  # latents 9 x 9: not whole patches


def test_load_teacher_picks_the_adapter_from_model_index(tiny_dit, tiny_pixart):
    from distill.teachers import load_teacher

    assert type(load_teacher(str(tiny_dit))) is DiTTeacher
    assert all(type(load_teacher(str(path))) is PixArtTeacher for path in tiny_pixart.values())
