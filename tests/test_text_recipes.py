"""The text-to-image recipes end to end on tiny pipelines: each shipped SD / SDXL recipe,
pointed at a tiny pipeline saved by the test and at data the test writes, trains a few
steps through the real entry point, exports, loads in stock diffusers and generates what
the student generates. The LoRA recipes' LoRA exports (diffusers and kohya) are checked by
tests/test_conformance.py, which trains them on the tiny SD and SDXL pipelines."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import REPO, TEXT_PROMPTS, latent_recipe_overrides

from distill import config as config_lib
from distill import train

RECIPES = {name: str(REPO / "recipes" / f"{name}.yaml") for name in
           ("sd15-dmd2-1step", "sd15-dmd2-4step-lora", "sd21-vpred-dmd2-4step", "sdxl-add-1step", "sdxl-dmd2-4step-lora")}
PROMPTS = TEXT_PROMPTS


def _overrides(name: str, teacher, data, run, **extra) -> list[str]:
    return latent_recipe_overrides(RECIPES[name], teacher, data, run, **extra)


def _pipeline_images(export_dir, steps: int, prompts: list[str], seed: int) -> np.ndarray:
    """What a user gets from stock diffusers: the exported pipeline, no guidance."""
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(export_dir)
    generator = torch.Generator().manual_seed(seed)
    return pipe(prompts, num_inference_steps=steps, guidance_scale=0.0, generator=generator, output_type="np").images


@pytest.mark.parametrize("name, teacher_fixture", [
    ("sd15-dmd2-1step", "tiny_sd"),
    ("sd21-vpred-dmd2-4step", "tiny_sd_v"),
    ("sdxl-add-1step", "tiny_sdxl"),
])
def test_full_student_recipe_trains_exports_and_samples_in_stock_diffusers(name, teacher_fixture, text_data, tiny_dinov2, tmp_path,
                                                                          request):
    from distill.evaluate import run_target
    from distill.export import export

    teacher = request.getfixturevalue(teacher_fixture)
    run = tmp_path / "run"
    extra = {"train.ema_decay": 0, "method.gan.discriminator.dinov2": str(tiny_dinov2), "method.gan.discriminator.head_width": 8}
    train.main([RECIPES[name], *_overrides(name, teacher, text_data, run, **extra)])
    rows = [json.loads(line) for line in (run / "losses.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(np.isfinite(row["generator/generator_loss"]) for row in rows)
    config = config_lib.load(str(run / "config.yaml"))
    steps = len(config.student.timesteps)

    out = export(run, tmp_path / "export")
    card = (out / "README.md").read_text()
    assert f"num_inference_steps={steps}" in card and "guidance_scale=0" in card

    target, _ = run_target(run, batch_size=4, prompts=PROMPTS[:3])
    student_images, prompts = target.draw(3, 5)
    assert prompts == PROMPTS[:3]
    exported = _pipeline_images(out, steps, PROMPTS[:3], seed=5)
    torch.testing.assert_close(torch.from_numpy(exported).permute(0, 3, 1, 2), student_images, atol=1e-4, rtol=0)


def test_cached_latents_and_embeddings_train_exactly_like_encoding_every_step(tiny_sd, text_data, tmp_path, monkeypatch):
    name = "sd21-vpred-dmd2-4step"  # image captions: both latents and prompt embeddings are cached
    plain, cached = tmp_path / "plain", tmp_path / "cached"
    train.main([RECIPES[name], *_overrides(name, tiny_sd, text_data, plain)])
    cache = tmp_path / "cache"
    train.main([RECIPES[name], *_overrides(name, tiny_sd, text_data, cached, **{"data.cache_dir": str(cache)})])
    rows = lambda run: [json.loads(line) for line in (run / "losses.jsonl").read_text().splitlines()]
    for a, b in zip(rows(plain), rows(cached), strict=True):
        for key in ("generator/generator_loss", "critic/critic_loss", "critic/gan_d_loss"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key
    assert len(list(cache.glob("*/manifest.json"))) == 1

    # a second run finds the cache complete and encodes nothing (the adapter's one encoding of
    # the empty prompt at construction aside)
    from distill.teachers import StableDiffusionTeacher

    calls = {"encode_images": 0, "_encode": 0}

    def counting(method):
        original = getattr(StableDiffusionTeacher, method)

        def wrapped(self, *args, **kwargs):
            calls[method] += 1
            return original(self, *args, **kwargs)
        return wrapped

    for method in calls:
        monkeypatch.setattr(StableDiffusionTeacher, method, counting(method))
    train.main([RECIPES[name], *_overrides(name, tiny_sd, text_data, tmp_path / "again",
                                           **{"data.cache_dir": str(cache), "train.sample_every": 0})])
    assert calls == {"encode_images": 0, "_encode": 1}


def test_scores_text_students_against_the_captioned_images_and_their_prompts(tiny_sd, tiny_dinov2, tiny_clip, text_data, tmp_path):
    name = "sd21-vpred-dmd2-4step"
    run = tmp_path / "run"
    metrics = train.main([RECIPES[name], *_overrides(name, tiny_sd, text_data, run, **{
        "eval.features": "[dinov2]", "eval.dinov2": str(tiny_dinov2), "eval.clip": str(tiny_clip), "eval.num_samples": 12,
        "eval.kid_subset_size": 4})])
    assert metrics["num_samples"] == 12
    assert metrics["fd_dinov2"] > 0 and 0 <= metrics["precision_dinov2"] <= 1
    assert 0 <= metrics["clip_score"] <= 100
    assert json.loads((run / "metrics.json").read_text())["clip_score"] == metrics["clip_score"]


def test_cli_eval_and_sample_on_a_text_run_and_its_export(tiny_sd, tiny_dinov2, tiny_clip, text_data, tmp_path, capsys):
    from distill.cli import main

    name = "sd15-dmd2-1step"
    run = tmp_path / "run"
    train.main([RECIPES[name], *_overrides(name, tiny_sd, text_data, run)])
    main(["eval", str(run), "--num", "6", "--clip", str(tiny_clip), "--no-speed", "--batch-size", "3"])
    rows = json.loads((run / "eval" / "metrics.json").read_text())
    assert 0 <= rows[0]["clip_score"] <= 100 and rows[0]["num_samples"] == 6
    assert "CLIP score" in (run / "eval" / "metrics.md").read_text()

    main(["export", str(run), str(tmp_path / "export")])
    prompts = tmp_path / "eval-prompts.txt"
    prompts.write_text("one prompt\nanother\n")
    main(["eval", str(tmp_path / "export"), "--num", "4", "--features", "[dinov2]", "--dinov2", str(tiny_dinov2),
          "--reference", str(text_data / "images"), "--prompts", str(prompts), "--clip", str(tiny_clip), "--no-speed",
          "--out", str(tmp_path / "export-eval"), "--cache-dir", str(tmp_path / "ref-cache")])
    row = json.loads((tmp_path / "export-eval" / "metrics.json").read_text())[0]
    assert row["fd_dinov2"] > 0 and "clip_score" in row
    main(["sample", str(tmp_path / "export"), "--num", "4", "--prompts", str(prompts), "--out", str(tmp_path / "grid.png")])
    assert (tmp_path / "grid.png").is_file()
