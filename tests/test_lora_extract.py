"""LoRA extraction from a full student: a perturbed copy of the tiny SD / SDXL UNet plays the
trained student. At full rank the LoRA on the stock teacher pipeline is the student; at a low
rank each layer's error is the SVD's optimal (Eckart–Young) residual; the diffusers and kohya
writers take the LoRA as it is; what a LoRA cannot carry is reported."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from diffusers import DiffusionPipeline
from safetensors import safe_open
from torch import nn

from distill.export.lora import kohya_state_dict, save_diffusers_lora, save_kohya_lora
from distill.schedulers import few_step_scheduler
from distill.teachers import StableDiffusionTeacher
from distill.lora_extract import extract_lora, image_distance, lora_fit, pipeline_image_distance, pipeline_images

PROMPTS = ["a red cube", "two cats"]
CALL = dict(prompt=PROMPTS, num_inference_steps=2, guidance_scale=0.0)


def _lora_layers(network: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in network.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}


def _perturbed(network: nn.Module, seed: int, names=None) -> nn.Module:
    """A copy of ``network`` with noise of a tenth of each weight's spread on every Linear /
    Conv2d weight (or on those ``names``): a full-rank ΔW per layer."""
    student = copy.deepcopy(network)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, module in _lora_layers(student).items():
            if names is None or name in names:
                module.weight.add_(0.1 * module.weight.std() * torch.randn(module.weight.shape, generator=g))
    return student


def _full_rank(network: nn.Module) -> int:
    return max(min(m.weight.shape[0], m.weight[0].numel()) for m in _lora_layers(network).values())


def _pipes(path, student_unet):
    """(teacher pipeline, student pipeline) with one few-step scheduler (timesteps 999, 499)."""
    teacher = DiffusionPipeline.from_pretrained(path)
    teacher.scheduler = few_step_scheduler({**teacher.scheduler.config, "_class_name": type(teacher.scheduler).__name__}, [999, 499])
    student = DiffusionPipeline.from_pretrained(path, unet=student_unet)
    student.scheduler = teacher.scheduler
    return teacher, student


def _latents(pipe, seed=3):
    return pipe(**CALL, output_type="latent", generator=torch.Generator().manual_seed(seed)).images


@pytest.mark.parametrize("teacher_fixture", ["tiny_sd", "tiny_sdxl"])
def test_full_rank_lora_on_the_stock_teacher_is_the_student(teacher_fixture, tmp_path, request, one_thread):
    path = request.getfixturevalue(teacher_fixture)
    teacher_pipe = DiffusionPipeline.from_pretrained(path)
    student_unet = _perturbed(teacher_pipe.unet, seed=0)
    rank = _full_rank(teacher_pipe.unet)
    config, state = extract_lora(teacher_pipe.unet, student_unet, rank=rank)
    layers = _lora_layers(teacher_pipe.unet)
    assert set(config.target_modules) == set(layers) and config.r == config.lora_alpha == rank
    assert set(state) == {f"{n}.lora_{x}.weight" for n in layers for x in "AB"}
    fit = lora_fit(teacher_pipe.unet, student_unet, state, config)
    assert fit.relative_error < 1e-5 and fit.energy_kept > 1 - 1e-9 and fit.not_expressed == {}

    teacher, student = _pipes(path, student_unet)
    expected = _latents(student)
    assert (_latents(teacher) - expected).abs().max() > 1e-2  # the perturbation matters
    save_diffusers_lora(type(teacher), "unet", state, config, tmp_path / "lora")
    teacher.load_lora_weights(tmp_path / "lora")
    assert (_latents(teacher) - expected).abs().max() < 1e-4  # the adapter's own forward
    distance = pipeline_image_distance(teacher, student, seeds=(0, 1), **CALL)
    assert distance["max_abs_diff"] < 1e-4 and distance["psnr_db"] > 80
    teacher.fuse_lora()
    assert (_latents(teacher) - expected).abs().max() < 1e-4  # merged into the weights


def test_low_rank_error_is_the_eckart_young_residual(tiny_sd, one_thread):
    teacher = DiffusionPipeline.from_pretrained(tiny_sd).unet
    student = _perturbed(teacher, seed=1)
    rank = 6
    config, state = extract_lora(teacher, student, rank=rank)
    fit = lora_fit(teacher, student, state, config)
    tail_sq = total_sq = 0.0
    for name, module in _lora_layers(teacher).items():
        delta = (_lora_layers(student)[name].weight - module.weight).detach().double().flatten(1)
        s = torch.linalg.svdvals(delta)
        tail, total = float(s[rank:].square().sum()), float(s.square().sum())
        tail_sq, total_sq = tail_sq + tail, total_sq + total
        assert fit.layers[name].relative_error == pytest.approx(math.sqrt(tail / total), rel=1e-3, abs=1e-5), name
        assert fit.layers[name].energy_kept == pytest.approx(float(s[:rank].square().sum()) / total, rel=1e-5, abs=1e-6)
        down, up = state[f"{name}.lora_A.weight"], state[f"{name}.lora_B.weight"]
        assert down.shape == (rank, *module.weight.shape[1:]) and up.shape[:2] == (module.weight.shape[0], rank)
    assert fit.relative_error == pytest.approx(math.sqrt(tail_sq / total_sq), rel=1e-3)
    assert 0.05 < fit.relative_error < 1  # a real truncation
    # conv_out has 4 output channels, so 4 singular values: exact, the rest zero padding
    assert fit.layers["conv_out"].relative_error < 1e-5
    assert state["conv_out.lora_B.weight"][:, 4:].abs().max() == 0 and state["conv_out.lora_A.weight"][4:].abs().max() == 0
    # truncating further can only lose: rank 2 is worse in every layer that had more than 2 singular values
    fit2 = lora_fit(teacher, student, *reversed(extract_lora(teacher, student, rank=2)))
    assert all(fit2.layers[n].relative_error >= fit.layers[n].relative_error - 1e-6 for n in fit.layers)
    assert fit2.relative_error > fit.relative_error
    summary = fit.summary()
    assert summary["lora_rank"] == rank and summary["lora_layers"] == len(fit.layers) and summary["lora_not_expressed"] == []


def test_kohya_file_has_kohya_names_rank_and_alpha(tiny_sd, tmp_path, one_thread):
    teacher_pipe = DiffusionPipeline.from_pretrained(tiny_sd)
    student_unet = _perturbed(teacher_pipe.unet, seed=2)
    rank = _full_rank(teacher_pipe.unet)
    config, state = extract_lora(teacher_pipe.unet, student_unet, rank=rank)
    kohya = kohya_state_dict(StableDiffusionTeacher.kohya_prefix, state, config)
    modules = _lora_layers(teacher_pipe.unet)
    assert len(kohya) == 3 * len(modules)
    for peft_name, kohya_name in [("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
                                   "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"),
                                  ("down_blocks.0.resnets.0.conv1", "lora_unet_down_blocks_0_resnets_0_conv1"),
                                  ("mid_block.resnets.0.time_emb_proj", "lora_unet_mid_block_resnets_0_time_emb_proj")]:
        assert torch.equal(kohya[f"{kohya_name}.lora_down.weight"], state[f"{peft_name}.lora_A.weight"])
        assert torch.equal(kohya[f"{kohya_name}.lora_up.weight"], state[f"{peft_name}.lora_B.weight"])
        assert kohya[f"{kohya_name}.lora_down.weight"].shape[0] == rank and float(kohya[f"{kohya_name}.alpha"]) == rank
    file = save_kohya_lora(StableDiffusionTeacher.kohya_prefix, state, config, tmp_path / "kohya" / "extracted.safetensors")
    with safe_open(file, "pt") as f:
        assert f.metadata()["ss_network_dim"] == str(rank) and f.metadata()["ss_network_alpha"] == str(rank)

    # diffusers reads the kohya names back onto every layer, and the teacher samples as the student
    teacher, student = _pipes(tiny_sd, student_unet)
    teacher.load_lora_weights(tmp_path / "kohya", weight_name="extracted.safetensors")
    loaded = {n.rsplit(".", 1)[0] for n, _ in teacher.unet.named_modules() if n.endswith(".lora_A")}
    assert loaded == set(modules)
    assert (_latents(teacher) - _latents(student)).abs().max() < 1e-4


def test_what_a_lora_cannot_carry_is_reported(tiny_sd, tmp_path, one_thread):
    teacher_pipe = DiffusionPipeline.from_pretrained(tiny_sd)
    queries = {n for n in _lora_layers(teacher_pipe.unet) if n.endswith(("to_q", "to_v"))}
    student_unet = _perturbed(teacher_pipe.unet, seed=3, names=queries | {"conv_out"})
    with torch.no_grad():
        student_unet.conv_in.bias.add_(0.5)
        student_unet.down_blocks[0].resnets[0].norm1.weight.mul_(1.5)
    with pytest.warns(UserWarning, match="cannot carry 3 changed parameter") as record:
        config, state = extract_lora(teacher_pipe.unet, student_unet, rank=64, target_modules=["to_q", "to_v"])
    message = str(record[0].message)
    assert "conv_in.bias" in message and "down_blocks.0.resnets.0.norm1.weight" in message and "conv_out.weight" in message
    assert set(config.target_modules) == queries  # the targeted layers that changed, by their full names
    fit = lora_fit(teacher_pipe.unet, student_unet, state, config)
    assert fit.relative_error < 1e-5
    teacher_bias = teacher_pipe.unet.conv_in.bias.detach()
    assert set(fit.not_expressed) == {"conv_in.bias", "down_blocks.0.resnets.0.norm1.weight", "conv_out.weight"}
    assert fit.not_expressed["conv_in.bias"] == pytest.approx(0.5 * math.sqrt(teacher_bias.numel()) / float(teacher_bias.norm()), rel=1e-4)
    assert fit.not_expressed["down_blocks.0.resnets.0.norm1.weight"] == pytest.approx(0.5, rel=1e-5)
    assert fit.summary()["lora_not_expressed"] == sorted(fit.not_expressed)

    # the images show it: teacher + LoRA is not the student
    teacher, student = _pipes(tiny_sd, student_unet)
    save_diffusers_lora(type(teacher), "unet", state, config, tmp_path / "lora")
    teacher.load_lora_weights(tmp_path / "lora")
    distance = pipeline_image_distance(teacher, student, seeds=(0,), **CALL)
    assert distance["mean_abs_diff"] > 1e-3 and math.isfinite(distance["psnr_db"])


def test_extraction_refuses_what_it_cannot_do(tiny_sd, one_thread):
    teacher = DiffusionPipeline.from_pretrained(tiny_sd).unet
    with pytest.raises(ValueError, match="nothing to extract"):
        extract_lora(teacher, copy.deepcopy(teacher), rank=4)
    with pytest.raises(ValueError, match="at least 1"):
        extract_lora(teacher, _perturbed(teacher, seed=4), rank=0)
    with pytest.raises(ValueError, match="not one architecture"):
        extract_lora(teacher, nn.Linear(2, 2), rank=4)
    config, state = extract_lora(teacher, _perturbed(teacher, seed=4, names={"conv_in"}), rank=4)
    with pytest.raises(ValueError, match="no Linear / Conv2d layer"):
        lora_fit(teacher, teacher, {**state, "nowhere.lora_A.weight": state["conv_in.lora_A.weight"]}, config)


def test_image_distance_known_values(tiny_sd, one_thread):
    zeros = torch.zeros(2, 3, 4, 4)
    grey = torch.full((2, 3, 4, 4), 0.1)
    assert image_distance(grey, zeros) == pytest.approx({"mean_abs_diff": 0.1, "max_abs_diff": 0.1, "psnr_db": 20.0})
    assert image_distance(zeros, zeros)["psnr_db"] == math.inf
    with pytest.raises(ValueError, match="one shape"):
        image_distance(zeros, zeros[:1])
    pipe = DiffusionPipeline.from_pretrained(tiny_sd)
    a, b = pipeline_images(pipe, (5, 6), **CALL), pipeline_images(pipe, (5, 6), **CALL)
    assert a.shape == (4, 3, 16, 16) and torch.equal(a, b) and 0 <= a.min() and a.max() <= 1  # fixed seeds: fixed images
