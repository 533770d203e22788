"""Issue 14: the exports users ask for, through ``distill export``: a LoRA extracted from a
fully trained student (``--format lora-extract --rank N``) whose card reports the distance of
its images to the full student's, and an SD single-file checkpoint that diffusers'
``from_single_file`` loads back offline and samples as the exported pipeline does."""

from __future__ import annotations

import re

import pytest
import torch
from conftest import REPO, TEXT_PROMPTS, latent_recipe_overrides, tiny_overrides

from distill import cli, train

DIGITS = str(REPO / "recipes" / "digits-dmd2-1step.yaml")
SD15 = str(REPO / "recipes" / "sd15-dmd2-1step.yaml")


@pytest.fixture(scope="module")
def digits_run(tiny_teacher, tmp_path_factory):
    run = tmp_path_factory.mktemp("exports") / "run"
    train.main([DIGITS, *tiny_overrides(tiny_teacher, None, run, **{"train.max_steps": 2, "train.sample_every": 0,
                                                                      "train.log_with": "[]", "optim.student.lr": 1e-2})])
    return run


def _card_distance(card: str) -> dict[str, float]:
    row = re.search(r"\| distance to the full student \| mean abs (\S+), max abs (\S+), PSNR (\S+) dB \((\d+) images", card)
    assert row, card
    return {"mean_abs_diff": float(row[1]), "max_abs_diff": float(row[2]), "psnr_db": float(row[3]), "num_images": int(row[4])}


def _fit_error(card: str) -> float:
    return float(re.search(r"\| weight fit \| relative error (\S+) over", card)[1])


def test_lora_extract_writes_the_lora_and_reports_its_images_distance_to_the_student(digits_run, tiny_teacher, tmp_path, capsys):
    from distill.evaluate import run_target
    from distill.export.extracted import DISTANCE_SEEDS
    from distill.lora_extract import image_distance
    from distill.runs import load_run
    from distill.sampling import draw_student
    from distill.students import FewStepSampler, fuse, load_student
    from distill.teachers import load_teacher

    cards = {}
    for rank in (1, 16):
        out = tmp_path / f"rank{rank}"
        cli.main(["export", str(digits_run), str(out), "--format", "pipeline", "lora-extract", "--rank", str(rank)])
        cards[rank] = (out / "README.md").read_text()
        assert (out / "lora" / "adapter_model.safetensors").is_file() and (out / "unet").is_dir()
    assert f"exported {digits_run} -> {out}" in capsys.readouterr().out
    assert "## LoRA extracted from the full student (rank 16)" in cards[16]
    # full rank (16 covers every layer of the tiny UNet) carries the weights; rank 1 does not
    assert _fit_error(cards[16]) < 1e-4 < 0.05 < _fit_error(cards[1])

    # the card's distance is teacher + the written LoRA against the full student, same seeds
    teacher = load_teacher(str(tiny_teacher))
    extracted = fuse(load_student(teacher.denoiser, tmp_path / "rank1" / "lora"))
    timesteps = load_run(digits_run).config.student.timesteps
    ours, _ = draw_student(teacher, extracted, FewStepSampler(timesteps, teacher.schedule, teacher.step_noise), DISTANCE_SEEDS, 0,
                           DISTANCE_SEEDS, "cpu")
    target, _ = run_target(digits_run, batch_size=DISTANCE_SEEDS)
    full, _ = target.draw(DISTANCE_SEEDS, 0)
    expected = image_distance(ours, full)
    reported = _card_distance(cards[1])
    assert reported["num_images"] == DISTANCE_SEEDS and expected["mean_abs_diff"] > 0
    for key in ("mean_abs_diff", "max_abs_diff", "psnr_db"):
        assert reported[key] == pytest.approx(expected[key], rel=1e-3)
    assert _card_distance(cards[16])["mean_abs_diff"] < reported["mean_abs_diff"]


def test_export_errors_name_the_format_and_what_to_do(digits_run, tmp_path, capsys):
    cases = [
        (["--format", "lora-extract"], "export format lora-extract needs the LoRA's rank, at least 1 (--rank N), got None"),
        (["--format", "single-file"], "DDPMPipeline has no ['vae', 'text_encoder']: a single-file checkpoint holds an SD"),
        (["--format", "kohya"], "need a LoRA student, but this run trained every weight (student.lora.rank = 0): export "
                                "the pipeline, or a LoRA extracted from it (lora-extract --rank N)"),
    ]
    for args, message in cases:
        with pytest.raises(SystemExit) as exit:
            cli.main(["export", str(digits_run), str(tmp_path / "out"), *args])
        assert str(exit.value).startswith("distill: ") and message in str(exit.value)
    assert not (tmp_path / "out").exists()  # refused before anything is written


def test_sd_single_file_loads_back_with_from_single_file_and_samples_the_same(tiny_sd, text_data, tmp_path, one_thread):
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file

    run = tmp_path / "run"
    train.main([SD15, *latent_recipe_overrides(SD15, tiny_sd, text_data, run, **{"train.max_steps": 1, "train.sample_every": 0,
                                                                                   "train.log_with": "[]", "train.ema_decay": 0})])
    out = tmp_path / "export"
    cli.main(["export", str(run), str(out), "--format", "pipeline", "single-file", "lora-extract", "--rank", "2"])
    file = out / "distill_student.safetensors"
    assert any(k.startswith("model.diffusion_model.") for k in load_file(file))
    assert "distill_student.safetensors" in (out / "README.md").read_text()

    exported = StableDiffusionPipeline.from_pretrained(out)
    loaded = StableDiffusionPipeline.from_single_file(str(file), config=str(out), local_files_only=True)
    loaded.scheduler = exported.scheduler  # a single file holds no scheduler: the UI's choice
    call = dict(prompt=TEXT_PROMPTS[:2], num_inference_steps=1, guidance_scale=0.0, output_type="pt")
    images = [pipe(**call, generator=torch.Generator().manual_seed(3)).images for pipe in (loaded, exported)]
    assert torch.equal(images[0], images[1])
    # the extracted LoRA in diffusers' format and kohya's, and its distance, measured with the run's prompts
    assert (out / "lora" / "pytorch_lora_weights.safetensors").is_file() and (out / "kohya" / "distill_lora.safetensors").is_file()
    assert _card_distance((out / "README.md").read_text())["psnr_db"] > 0
