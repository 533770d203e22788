"""Single-file checkpoints in the original SD / SDXL key layout: written from our mapping, read
back offline by diffusers' own ``from_single_file`` (weights from the file only, configs from a
directory with no weights), tensor for tensor and sample for sample; the mapping against
diffusers' per-component converters; and the names real-size checkpoints are recognised by."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from conftest import _clip_special, _sd_scheduler, write_tiny_clip_tokenizer
from diffusers import DiffusionPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
from diffusers.loaders.single_file_utils import (
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    convert_open_clip_checkpoint,
    infer_diffusers_model_type,
)
from safetensors import safe_open
from safetensors.torch import load_file

from distill.schedulers import few_step_scheduler
from distill.teachers.single_file import save_single_file, single_file_state_dict, unet_to_ldm

PROMPTS = ["a red cube", "two cats"]


def _text_encoder(vocab, hidden, *, projection=False, activation="quick_gelu"):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(vocab_size=len(vocab), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                            num_attention_heads=2, max_position_embeddings=16, projection_dim=hidden, hidden_act=activation,
                            **_clip_special(vocab))
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


def _vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(block_out_channels=(8, 16), in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=4,
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         sample_size=16, scaling_factor=0.5)


def build_sd2(path: Path) -> Path:
    """Tiny SD 2.x-v: an OpenCLIP-like text encoder (gelu), a linear-projection UNet with two
    layers per block (so input_blocks.2.1 exists, as in the real one), v-prediction."""
    torch.manual_seed(0)
    tokenizer, vocab = write_tiny_clip_tokenizer(path / "_tokenizer_files")
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=4, norm_num_groups=8, use_linear_projection=True)
    pipe = StableDiffusionPipeline(vae=_vae(), text_encoder=_text_encoder(vocab, 16, activation="gelu"), tokenizer=tokenizer,
                                   unet=unet, scheduler=_sd_scheduler("DDIMScheduler", "v_prediction"), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(path, safe_serialization=True)
    return path


def build_sdxl_distinct_widths(path: Path) -> Path:
    """Tiny SDXL whose two text encoders differ in width (16 and 24) as CLIP-L (768) and bigG
    (1280) do: from_single_file tells them apart by that width (see the last test)."""
    torch.manual_seed(0)
    tokenizer, vocab = write_tiny_clip_tokenizer(path / "_tokenizer_files")
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=40, attention_head_dim=4, norm_num_groups=8, use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=4, projection_class_embeddings_input_dim=6 * 4 + 24)
    pipe = StableDiffusionXLPipeline(vae=_vae(), text_encoder=_text_encoder(vocab, 16),
                                     text_encoder_2=_text_encoder(vocab, 24, projection=True, activation="gelu"),
                                     tokenizer=tokenizer, tokenizer_2=tokenizer, unet=unet,
                                     scheduler=_sd_scheduler("EulerDiscreteScheduler"), force_zeros_for_empty_prompt=True)
    pipe.save_pretrained(path, safe_serialization=True)
    return path


def _student_export(teacher: Path, out: Path) -> Path:
    """What an export looks like: the teacher's pipeline with a changed UNet (a stand-in for
    the student) and a two-step scheduler (timesteps 999, 499), saved in diffusers format."""
    pipe = DiffusionPipeline.from_pretrained(teacher)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in pipe.unet.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    pipe.scheduler = few_step_scheduler({**pipe.scheduler.config, "_class_name": type(pipe.scheduler).__name__}, [999, 499])
    pipe.save_pretrained(out, safe_serialization=True)
    return out


def _configs_only(directory: Path, out: Path) -> Path:
    """The configs and tokenizer files of a diffusers directory, no weights (what
    from_single_file fetches from the Hub as ``config``)."""
    for file in directory.rglob("*"):
        if file.is_file() and file.suffix in (".json", ".txt"):
            (out / file.relative_to(directory)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(file, out / file.relative_to(directory))
    assert not list(out.rglob("*.safetensors"))
    return out


def _images(pipe):
    return pipe(PROMPTS, num_inference_steps=2, guidance_scale=0.0, output_type="pt", generator=torch.Generator().manual_seed(7)).images


def _assert_same_weights(loaded, original, names):
    for name in names:
        a, b = getattr(loaded, name).state_dict(), getattr(original, name).state_dict()
        assert a.keys() == b.keys(), name
        assert all(torch.equal(a[k], b[k]) for k in b), name


@pytest.mark.parametrize("builder, pipeline_class, text_prefix, components", [
    ("tiny_sd", StableDiffusionPipeline, "cond_stage_model.transformer.text_model.", ["unet", "vae", "text_encoder"]),
    ("sd2", StableDiffusionPipeline, "cond_stage_model.model.", ["unet", "vae", "text_encoder"]),
    ("sdxl", StableDiffusionXLPipeline, "conditioner.embedders.1.model.", ["unet", "vae", "text_encoder", "text_encoder_2"]),
])
def test_from_single_file_loads_the_pipeline_back(builder, pipeline_class, text_prefix, components, tmp_path, request, one_thread):
    teacher = {"sd2": lambda: build_sd2(tmp_path / "teacher"),
               "sdxl": lambda: build_sdxl_distinct_widths(tmp_path / "teacher")}.get(builder, lambda: request.getfixturevalue(builder))()
    export_dir = _student_export(teacher, tmp_path / "export")
    original = DiffusionPipeline.from_pretrained(export_dir)
    file = save_single_file(original, tmp_path / "student.safetensors")
    keys = set(load_file(file))
    assert any(k.startswith("model.diffusion_model.") for k in keys) and any(k.startswith("first_stage_model.") for k in keys)
    assert any(k.startswith(text_prefix) for k in keys)
    assert ("v_pred" in keys) == (builder == "sd2")
    with safe_open(file, "pt") as f:
        assert f.metadata()["distill.prediction_type"] == original.scheduler.config.prediction_type

    loaded = pipeline_class.from_single_file(str(file), config=str(_configs_only(export_dir, tmp_path / "configs")),
                                             local_files_only=True)
    _assert_same_weights(loaded, original, components)
    assert type(loaded.scheduler) is type(original.scheduler)
    assert torch.equal(_images(loaded), _images(original))


@pytest.mark.parametrize("fixture", ["tiny_sd", "tiny_sdxl"])
def test_mapping_round_trips_through_diffusers_converters(fixture, request, one_thread):
    pipe = DiffusionPipeline.from_pretrained(request.getfixturevalue(fixture))
    state = single_file_state_dict(pipe)
    expected_keys = sum(len(getattr(pipe, n).state_dict()) for n in ("unet", "vae", "text_encoder", "text_encoder_2")
                        if getattr(pipe, n, None) is not None)
    stacked = 4 * pipe.text_encoder_2.config.num_hidden_layers if fixture == "tiny_sdxl" else 0  # q, k, v -> in_proj
    assert len(state) == expected_keys - stacked  # nothing dropped or added
    checks = [(pipe.unet, convert_ldm_unet_checkpoint(state, dict(pipe.unet.config))),
              (pipe.vae, convert_ldm_vae_checkpoint(state, dict(pipe.vae.config))),
              (pipe.text_encoder, {k.removeprefix("text_model."): v for k, v in convert_ldm_clip_checkpoint(state).items()})]
    if fixture == "tiny_sdxl":
        checks.append((pipe.text_encoder_2, convert_open_clip_checkpoint(pipe.text_encoder_2, state, "conditioner.embedders.1.model.")))
    for module, converted in checks:
        reference = module.state_dict()
        assert converted.keys() == reference.keys(), type(module).__name__
        assert all(torch.equal(converted[k], reference[k]) for k in reference)
    # a few names as the original code has them
    if fixture == "tiny_sd":  # CrossAttnDown, Down / Up, CrossAttnUp, one layer per block
        for key in ("model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight",
                    "model.diffusion_model.input_blocks.2.0.op.weight", "model.diffusion_model.input_blocks.3.0.in_layers.2.weight",
                    "model.diffusion_model.output_blocks.1.1.conv.weight",  # upsampler after resnets only
                    "model.diffusion_model.output_blocks.2.0.skip_connection.weight", "model.diffusion_model.out.2.bias",
                    "first_stage_model.decoder.up.1.upsample.conv.weight", "first_stage_model.encoder.down.0.downsample.conv.weight",
                    "cond_stage_model.transformer.text_model.final_layer_norm.weight"):
            assert key in state, key
        assert state["first_stage_model.encoder.mid.attn_1.q.weight"].shape == (16, 16, 1, 1)
    else:
        assert "model.diffusion_model.label_emb.0.0.weight" in state and "model.diffusion_model.output_blocks.1.2.conv.weight" in state
        assert state["conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight"].shape == (48, 16)
        projection = pipe.text_encoder_2.text_projection.weight
        assert torch.equal(state["conditioner.embedders.1.model.text_projection"], projection.T)


def test_float16_file_and_unknown_modules_refused_not_dropped(tiny_sd, tmp_path, one_thread):
    pipe = DiffusionPipeline.from_pretrained(tiny_sd)
    half = load_file(save_single_file(pipe, tmp_path / "half.safetensors", dtype=torch.float16))
    assert {v.dtype for v in half.values()} == {torch.float16} and half.keys() == single_file_state_dict(pipe).keys()
    unet = pipe.unet
    state = {**unet.state_dict(), "time_embedding.cond_proj.weight": torch.zeros(3, 3)}  # an LCM-style guidance input
    with pytest.raises(ValueError, match="no original-layout name.*cond_proj"):
        unet_to_ldm(state, dict(unet.config))


REAL_UNETS = {  # the published checkpoints' UNet configs (the shapes that matter for the layout and detection)
    "v1": dict(cross_attention_dim=768, attention_head_dim=8, block_out_channels=(320, 640, 1280, 1280),
               down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",), up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3),
    "v2": dict(cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True,
               block_out_channels=(320, 640, 1280, 1280), down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
               up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3),
    "xl_base": dict(cross_attention_dim=2048, attention_head_dim=(5, 10, 20), use_linear_projection=True,
                    block_out_channels=(320, 640, 1280), transformer_layers_per_block=(1, 2, 10),
                    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), addition_embed_type="text_time",
                    addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816),
}
REAL_TEXT = {"clip_l": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
             "open_clip_h": dict(hidden_size=1024, num_hidden_layers=23, num_attention_heads=16, intermediate_size=4096, hidden_act="gelu"),
             "open_clip_g": dict(hidden_size=1280, num_hidden_layers=32, num_attention_heads=20, intermediate_size=5120,
                                 hidden_act="gelu", projection_dim=1280)}


@pytest.mark.parametrize("model_type", ["v1", "v2", "xl_base"])
def test_real_size_layout_is_what_from_single_file_detects(model_type, one_thread):
    """Real-size UNets and text encoders on the meta device (shapes, no weights): the written
    names are the ones diffusers' model detection keys on, and its converter maps them back."""
    from accelerate import init_empty_weights
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from distill.teachers.single_file import SD1_TEXT, SD2_TEXT, SDXL_TEXT, SDXL_TEXT_2, UNET_PREFIX, clip_to_ldm, open_clip_to_ldm

    text = lambda cls, name: cls(CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, **REAL_TEXT[name]))
    with init_empty_weights():
        unet = UNet2DConditionModel(sample_size=64 if model_type != "xl_base" else 128, layers_per_block=2, **REAL_UNETS[model_type])
        state = {UNET_PREFIX + k: v for k, v in unet_to_ldm(unet.state_dict(), dict(unet.config)).items()}
        if model_type == "v1":
            state.update({SD1_TEXT + k: v for k, v in clip_to_ldm(text(CLIPTextModel, "clip_l").state_dict()).items()})
        elif model_type == "v2":
            state.update({SD2_TEXT + k: v for k, v in open_clip_to_ldm(text(CLIPTextModel, "open_clip_h").state_dict()).items()})
        else:
            state.update({SDXL_TEXT + k: v for k, v in clip_to_ldm(text(CLIPTextModel, "clip_l").state_dict()).items()})
            state.update({SDXL_TEXT_2 + k: v for k, v in
                          open_clip_to_ldm(text(CLIPTextModelWithProjection, "open_clip_g").state_dict()).items()})
    assert infer_diffusers_model_type(state) == model_type
    if model_type == "v1":  # the key the v1 default is named by
        assert "model.diffusion_model.output_blocks.11.0.skip_connection.weight" in state
    converted = convert_ldm_unet_checkpoint(state, dict(unet.config))
    reference = unet.state_dict()
    assert converted.keys() == reference.keys() and all(converted[k].shape == reference[k].shape for k in reference)


def test_equal_width_text_encoders_are_why_the_sdxl_test_builds_its_own(tiny_sdxl, tmp_path, one_thread):
    """The shared tiny SDXL's two text encoders are both 16 wide. from_single_file picks the
    converter for text_encoder_2 by the width of the embedders.0 position embedding, so at
    equal widths it reads CLIP-L's weights into it and leaves its projection unloaded."""
    pipe = DiffusionPipeline.from_pretrained(tiny_sdxl)
    file = save_single_file(pipe, tmp_path / "sdxl.safetensors")
    loaded = StableDiffusionXLPipeline.from_single_file(str(file), config=str(tiny_sdxl), local_files_only=True)
    second, first = loaded.text_encoder_2.state_dict(), pipe.text_encoder.state_dict()
    assert torch.equal(second["text_model.embeddings.token_embedding.weight"], first["embeddings.token_embedding.weight"])
    assert second["text_projection.weight"].device.type == "meta"  # never loaded
