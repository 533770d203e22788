"""The text-to-image recipes end to end on tiny pipelines: each shipped SD / SDXL recipe,
pointed at a tiny pipeline saved by the test and at data the test writes, trains a few
steps through the real entry point, exports, loads in stock diffusers and generates what
the student generates."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from conftest import REPO, tiny_overrides

from distill import config as config_lib
from distill import train

RECIPES = {name: str(REPO / "recipes" / f"{name}.yaml") for name in
           ("sd15-dmd2-1step", "sd15-dmd2-4step-lora", "sd21-vpred-dmd2-4step", "sdxl-add-1step", "sdxl-dmd2-4step-lora")}
PROMPTS = ["a red cat", "a blue dog", "a green tree", "the sea at night", "two birds", "a small house"]


@pytest.fixture(scope="module")
def text_data(tmp_path_factory):
    """A prompts file and an imagefolder of 8 coloured 20x24 images with captions."""
    from PIL import Image

    root = tmp_path_factory.mktemp("text-data")
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    images = root / "images"
    images.mkdir()
    rows = []
    generator = np.random.default_rng(0)
    for i in range(8):
        pixels = (generator.random((20, 24, 3)) * 255).astype(np.uint8)
        Image.fromarray(pixels).save(images / f"{i}.png")
        rows.append({"file_name": f"{i}.png", "text": PROMPTS[i % len(PROMPTS)]})
    (images / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return root


def _overrides(name: str, teacher, data, run, **extra) -> list[str]:
    images = yaml.safe_load(open(RECIPES[name]))["data"]["dataset"] == "image_captions"
    values = {
        "data.path": str(data / ("images" if images else "prompts.txt")),
        "data.resolution": 16 if images else "null",
        "teacher.dtype": "float32",  # CPU
        "train.mixed_precision": "no",
        "train.gradient_checkpointing": "false",
        "optim.student.warmup_steps": 0,
        "optim.critic.warmup_steps": 0,
        "eval.features": "[]",
        "eval.clip": "null",
        **extra,
    }
    return tiny_overrides(teacher, None, run, **values)


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
    extra = {"train.ema_decay": 0, "method.discriminator.dinov2": str(tiny_dinov2), "method.discriminator.head_width": 8}
    train.main([RECIPES[name], *_overrides(name, teacher, text_data, run, **extra)])
    rows = [json.loads(line) for line in (run / "losses.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(np.isfinite(row["generator/generator_loss"]) for row in rows)
    config = config_lib.load(str(run / "config.yaml"))
    steps = len(config.student.timesteps)

    out = export(run, tmp_path / "export")
    card = (out / "README.md").read_text()
    assert f"num_inference_steps={steps}" in card and "guidance_scale=0" in card

    target, _ = run_target(run, batch_size=4, prompts=PROMPTS[:3])
    student_images, prompts = target.generate(3, 5)
    assert prompts == PROMPTS[:3]
    exported = _pipeline_images(out, steps, PROMPTS[:3], seed=5)
    torch.testing.assert_close(torch.from_numpy(exported).permute(0, 3, 1, 2), student_images, atol=1e-4, rtol=0)
