"""The transformer / flow-matching recipes end to end on tiny pipelines: each shipped DiT, PixArt
and SD3 recipe, pointed at a tiny pipeline of its family and at data the test writes (or none:
class labels), trains 2 steps through the real entry point, exports, loads in stock diffusers
and generates what the student generates (the SD3 LoRA recipe and its LoRA export:
tests/test_conformance.py). Also the ``classes`` dataset those recipes need."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import REPO, TEXT_PROMPTS, latent_recipe_overrides
from diffusers import (DiffusionPipeline, DiTPipeline,
                       FlowMatchEulerDiscreteScheduler, PixArtAlphaPipeline)
from safetensors.torch import load_file
from test_sd3 import build_tiny_sd3
from test_transformer_teachers import build_tiny_dit, build_tiny_pixart

from distill import config as config_lib
from distill import train
from distill.config import ConfigError
from distill.data import ClassLabelDataset, EpochSampler, collate, make_dataset

RECIPES = {name: str(REPO / "recipes" / f"{name}.yaml") for name in
           ("dit256-dmd2-1step", "pixart-dmd2-4step", "sd3-ladd-4step")}
PROMPTS = TEXT_PROMPTS


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny transformers: threads cost more than they give


# --- tiny pipelines and data ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_dit_pipeline(tmp_path_factory):
    return build_tiny_dit(tmp_path_factory.mktemp("tiny") / "dit")


@pytest.fixture(scope="module")
def tiny_pixart_pipeline(tmp_path_factory):
    return build_tiny_pixart(tmp_path_factory.mktemp("tiny") / "pixart")


@pytest.fixture(scope="module")
def tiny_sd3_pipeline(tmp_path_factory):
    return build_tiny_sd3(tmp_path_factory.mktemp("tiny") / "sd3")


def _overrides(name: str, teacher, data, run, **extra) -> list[str]:
    return latent_recipe_overrides(RECIPES[name], teacher, data, run, **{"train.ema_decay": 0, **extra})


def _train(name: str, teacher, data, run, **extra) -> list[dict]:
    """Train 2 steps; the logged rows, every value finite."""
    train.main([RECIPES[name], *_overrides(name, teacher, data, run, **extra)])
    rows = [json.loads(line) for line in (run / "losses.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all("generator/generator_loss" in row for row in rows)
    for row in rows:
        assert all(math.isfinite(v) for k, v in row.items() if isinstance(v, float)), row
    return rows


def _student_dir(run):
    return sorted((run / "checkpoints").glob("step-*"))[-1] / "student"


def _assert_full_student_changed(run, teacher_path):
    student = load_file(next(_student_dir(run).glob("*.safetensors")))
    teacher = load_file(next((teacher_path / "transformer").glob("*.safetensors")))
    assert student.keys() == teacher.keys()
    changed = [k for k in student if not torch.equal(student[k], teacher[k].to(student[k].dtype))]
    assert len(changed) > len(student) // 2, f"only {len(changed)} of {len(student)} tensors changed"


def _as_nchw(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2)


# --- the classes dataset -------------------------------------------------------------------------


def test_class_label_dataset_cycles_the_classes_and_batches_balanced():
    dataset = make_dataset(dataset="classes", path=None, split="train", prompt_column="text", image_column="image",
                           resolution=None, num_classes=7)
    assert isinstance(dataset, ClassLabelDataset) and len(dataset) == 700
    assert [int(dataset[i]["class_label"]) for i in (0, 1, 6, 7, 699)] == [0, 1, 6, 0, 6]
    assert dataset[3]["class_label"].dtype == torch.int64 and dataset[3].keys() == {"class_label"}
    with pytest.raises(IndexError):
        dataset[700]
    # one epoch of the seeded order holds every class equally often
    order = EpochSampler(len(dataset), 50, seed=3)
    labels = torch.cat([collate(dataset, order.batch(step))["class_label"] for step in range(order.batches_per_epoch)])
    assert labels.shape == (700,) and torch.bincount(labels).tolist() == [100] * 7
    assert labels[:50].tolist() != [i % 7 for i in range(50)]  # shuffled, not in item order
    assert ClassLabelDataset(7).identity != ClassLabelDataset(8).identity


def test_class_label_dataset_errors():
    common = dict(split="train", prompt_column="text", image_column="image", resolution=None)
    with pytest.raises(ValueError, match="classes reads no path"):
        make_dataset(dataset="classes", path="labels.txt", num_classes=10, **common)
    with pytest.raises(ValueError, match="not class-conditional"):
        make_dataset(dataset="classes", path=None, num_classes=None, **common)
    with pytest.raises(ValueError, match="positive int"):
        ClassLabelDataset(0)


@pytest.mark.parametrize("overrides, key, message", [
    (["data.path=labels.txt"], "data.path", "read no path"),
    (["data.cache_dir=/tmp/cache"], "data.cache_dir", "encoded by nothing"),
    (["method.gan.weight=0.01"], "data.dataset", "classes have no real images"),
    (["eval.features=[dinov2]"], "eval.features", "classes have no reference images"),
    (["eval.clip=openai/clip-vit-large-patch14"], "eval.clip", "class labels have none"),
])
def test_classes_config_validation(overrides, key, message):
    config_lib.load(RECIPES["dit256-dmd2-1step"])  # the shipped recipe itself is valid
    with pytest.raises(ConfigError, match=rf"{key}: .*{message}"):
        config_lib.load(RECIPES["dit256-dmd2-1step"], overrides)


def test_classes_have_no_real_images_for_ladd():
    with pytest.raises(ConfigError, match=r"data.dataset: classes have no real images, but method ladd"):
        config_lib.load(RECIPES["sd3-ladd-4step"], ["data.dataset=classes", "eval.clip=null"])


def test_classes_on_a_text_teacher_fails_at_setup(tiny_sd3_pipeline, tmp_path):
    with pytest.raises(ValueError, match="not class-conditional"):
        train.main([RECIPES["dit256-dmd2-1step"], *_overrides("dit256-dmd2-1step", tiny_sd3_pipeline, None, tmp_path / "run",
                                                                **{"student.timesteps": "[1000]"})])


# --- the recipes end to end ----------------------------------------------------------------------


def test_dit_recipe_trains_on_class_labels_exports_and_samples_in_stock_diffusers(tiny_dit_pipeline, tmp_path):
    from distill.evaluate import run_target
    from distill.export import export

    run = tmp_path / "run"
    _train("dit256-dmd2-1step", tiny_dit_pipeline, None, run)
    _assert_full_student_changed(run, tiny_dit_pipeline)
    out = export(run, tmp_path / "export")
    card = (out / "README.md").read_text()
    assert "pipe(class_labels=[0, 1, 2, 3], num_inference_steps=1, guidance_scale=1.0" in card
    assert "scheduler.step(output" not in card  # not the pixel UNet's manual loop

    target, _ = run_target(run, batch_size=4)
    student_images, labels = target.draw(3, 5)
    assert labels.tolist() == [0, 1, 2]
    pipe = DiffusionPipeline.from_pretrained(out)
    assert type(pipe) is DiTPipeline
    pipe.set_progress_bar_config(disable=True)
    # one step: DiTPipeline's scheduler.step draws no noise (it would come from the global RNG)
    exported = pipe(class_labels=labels.tolist(), num_inference_steps=1, guidance_scale=1.0,
                    generator=torch.Generator().manual_seed(5), output_type="np").images
    assert exported.shape == (3, 16, 16, 3)
    torch.testing.assert_close(_as_nchw(exported), student_images, atol=1e-4, rtol=0)

    from distill.cli import main  # the CLI on a class-label run: balanced labels, no prompts to look for

    main(["sample", str(run), "--num", "4", "--batch-size", "2", "--out", str(tmp_path / "grid.png")])
    assert (tmp_path / "grid.png").is_file()


def test_pixart_recipe_trains_on_prompts_exports_and_samples_in_stock_diffusers(tiny_pixart_pipeline, text_data, tmp_path):
    from distill.evaluate import run_target
    from distill.export import export

    run = tmp_path / "run"
    _train("pixart-dmd2-4step", tiny_pixart_pipeline, text_data, run)
    _assert_full_student_changed(run, tiny_pixart_pipeline)
    out = export(run, tmp_path / "export")

    prompts = PROMPTS[:2]
    target, _ = run_target(run, batch_size=2, prompts=prompts)
    student_images, _ = target.draw(2, 3)
    pipe = DiffusionPipeline.from_pretrained(out)
    assert type(pipe) is PixArtAlphaPipeline
    pipe.set_progress_bar_config(disable=True)
    # PixArt passes the generator to scheduler.step: all 4 steps, re-noising included, match.
    # clean_caption needs bs4 / ftfy; resolution binning needs a real checkpoint's sample size
    exported = pipe(prompts, num_inference_steps=4, guidance_scale=1.0, generator=torch.Generator().manual_seed(3),
                    output_type="np", height=16, width=16, clean_caption=False, use_resolution_binning=False).images
    torch.testing.assert_close(_as_nchw(exported), student_images, atol=1e-4, rtol=0)


def _sd3_images(pipe, prompts, steps: int, seed: int) -> np.ndarray:
    """SD3 draws the initial noise from ``generator`` but re-noises between steps from the
    global RNG (its scheduler.step gets no generator): seed both."""
    torch.manual_seed(seed)
    return pipe(prompts, num_inference_steps=steps, guidance_scale=1.0, generator=torch.Generator().manual_seed(seed),
                output_type="np", height=16, width=16).images


def _sd3_exports_sample_like_the_student(name: str, teacher, data, tmp_path, **extra) -> tuple:
    """Train ``name`` as shipped (4 steps) and with a 1-step override, export both. The 1-step
    export equals the student exactly (no re-noising, so no global-RNG draw matters); the
    4-step export gives finite images of the right size. Returns (4-step run, its export, its
    images)."""
    from distill.evaluate import run_target
    from distill.export import export

    prompts = PROMPTS[:2]
    one = tmp_path / "run-1step"
    _train(name, teacher, data, one, **{**extra, "student.timesteps": "[1000]"})
    pipe = DiffusionPipeline.from_pretrained(export(one, tmp_path / "export-1step"))
    pipe.set_progress_bar_config(disable=True)
    target, _ = run_target(one, batch_size=2, prompts=prompts)
    student_images, _ = target.draw(2, 3)
    torch.testing.assert_close(_as_nchw(_sd3_images(pipe, prompts, 1, seed=3)), student_images, atol=1e-4, rtol=0)

    run = tmp_path / "run"
    _train(name, teacher, data, run, **extra)
    out = export(run, tmp_path / "export")
    pipe = DiffusionPipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe.scheduler) is FlowMatchEulerDiscreteScheduler and pipe.scheduler.config.stochastic_sampling
    four = _sd3_images(pipe, prompts, 4, seed=3)
    assert four.shape == (2, 16, 16, 3) and np.isfinite(four).all() and four.std() > 1e-3
    return run, out, four


def test_sd3_ladd_recipe_trains_on_captioned_images_exports_and_samples(tiny_sd3_pipeline, text_data, tmp_path):
    run, _, _ = _sd3_exports_sample_like_the_student("sd3-ladd-4step", tiny_sd3_pipeline, text_data, tmp_path,
                                                     **{"method.gan.discriminator.head_width": 8})
    rows = [json.loads(line) for line in (run / "losses.jsonl").read_text().splitlines()]
    assert all("generator/distill_loss" not in row and "generator/gan_g_loss" in row for row in rows)  # adversarial only
    _assert_full_student_changed(run, tiny_sd3_pipeline)
