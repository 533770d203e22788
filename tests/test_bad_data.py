"""Issue 14, bad data: an unreadable or truncated image, an image without a caption, an
image smaller than the training resolution and an empty prompts file each get a clear error,
or (``data.on_bad_item: skip``) a counted skip; greyscale, 16-bit and RGBA images are
converted correctly."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, latent_recipe_overrides
from PIL import Image

from distill import config as config_lib
from distill.data import ImageCaptionDataset
from distill.data.items import to_rgb

GOOD, BAD = "good", "bad"


@pytest.fixture(scope="module")
def messy_images(tmp_path_factory) -> Path:
    """An imagefolder whose rows are, in order: RGB, RGBA (half transparent), greyscale,
    16-bit greyscale, a truncated PNG, a text file named .png, a 4x4 image, an image with no
    caption, and RGB again."""
    root = tmp_path_factory.mktemp("messy") / "images"
    root.mkdir()
    rng = np.random.default_rng(0)
    rgba = np.zeros((20, 20, 4), np.uint8)
    rgba[:, :10] = (255, 0, 0, 255)  # left half opaque red, right half fully transparent (black beneath)
    files = {
        "0-rgb.png": Image.fromarray((rng.random((20, 24, 3)) * 255).astype(np.uint8)),
        "1-rgba.png": Image.fromarray(rgba, mode="RGBA"),
        "2-grey.png": Image.fromarray(np.full((20, 20), 64, np.uint8), mode="L"),
        "3-grey16.png": Image.fromarray(np.full((20, 20), 65535, np.uint16)),
        "6-small.png": Image.fromarray(np.zeros((4, 4, 3), np.uint8)),
        "7-nocaption.png": Image.fromarray(np.zeros((20, 20, 3), np.uint8)),
        "8-rgb.png": Image.fromarray((rng.random((24, 20, 3)) * 255).astype(np.uint8)),
    }
    for name, image in files.items():
        image.save(root / name)
    whole = (root / "0-rgb.png").read_bytes()
    (root / "4-truncated.png").write_bytes(whole[: len(whole) // 2])
    (root / "5-not-an-image.png").write_text("this is not a PNG")
    rows = [{"file_name": name, "text": None if "nocaption" in name else f"caption {name}"}
            for name in sorted([*files, "4-truncated.png", "5-not-an-image.png"])]
    (root / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return root


def test_a_bad_item_stops_training_with_its_row_and_the_fix(messy_images):
    dataset = ImageCaptionDataset(str(messy_images), resolution=16)
    assert len(dataset) == 9  # nothing read yet: "error" costs no pass over the data
    for row, why in ((4, "its image cannot be read"), (5, "its image cannot be read"), (6, "is 4x4, smaller than 16"),
                     (7, r"it has no caption \(None\)")):
        with pytest.raises(ValueError, match=rf"{messy_images}: row {row} cannot be trained on: .*{why}.*data.on_bad_item=skip"):
            dataset[row]


def test_skip_leaves_out_exactly_the_bad_items_and_says_why(messy_images):
    dataset = ImageCaptionDataset(str(messy_images), resolution=16, on_bad_item="skip")
    assert sorted(dataset.skipped) == [4, 5, 6, 7]
    assert "truncated" in dataset.skipped[4] and "cannot be read" in dataset.skipped[5]
    assert "smaller than 16" in dataset.skipped[6] and "no caption" in dataset.skipped[7]
    assert len(dataset) == 5 and dataset.prompts == [f"caption {n}" for n in
                                                     ("0-rgb.png", "1-rgba.png", "2-grey.png", "3-grey16.png", "8-rgb.png")]
    again = ImageCaptionDataset(str(messy_images), resolution=16, on_bad_item="skip")
    assert again.skipped == dataset.skipped and again.identity == dataset.identity  # a function of the data alone
    assert torch.equal(dataset[4]["image"], again[4]["image"])
    assert ImageCaptionDataset(str(messy_images), resolution=16).identity != dataset.identity  # caches tell them apart


def test_small_images_are_taken_when_the_minimum_allows_it(messy_images):
    dataset = ImageCaptionDataset(str(messy_images), resolution=16, on_bad_item="skip", min_image_size=0)
    assert sorted(dataset.skipped) == [4, 5, 7]
    assert dataset[5]["image"].shape == (3, 16, 16)  # the 4x4 one, upscaled


def test_greyscale_16_bit_and_rgba_images_are_converted_not_clipped(messy_images):
    dataset = ImageCaptionDataset(str(messy_images), resolution=16)
    rgba, grey, grey16 = dataset[1]["image"], dataset[2]["image"], dataset[3]["image"]
    assert rgba.shape == grey.shape == grey16.shape == (3, 16, 16)
    red = torch.tensor([1.0, -1.0, -1.0]).view(3, 1)
    torch.testing.assert_close(rgba[:, :, 2], red.expand(3, 16))  # opaque red stays red
    torch.testing.assert_close(rgba[:, :, -2], torch.ones(3, 16))  # transparent is white, not the black beneath
    torch.testing.assert_close(grey, torch.full((3, 16, 16), 64 / 127.5 - 1))
    torch.testing.assert_close(grey16, torch.ones(3, 16, 16))  # 65535 is white
    half = to_rgb(Image.fromarray(np.full((2, 2), 32896, np.uint16)))
    assert half.mode == "RGB" and np.asarray(half)[0, 0].tolist() == [128, 128, 128]  # scaled, where convert("RGB") gives 255


def test_an_empty_prompts_file_is_named_before_anything_loads(tmp_path, tiny_sd):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n\n")
    with pytest.raises(config_lib.ConfigError, match=rf"data.path: {prompts} is empty: no data to train on"):
        config_lib.load(str(REPO / "recipes" / "sd15-dmd2-1step.yaml"),
                        [f"teacher.path={tiny_sd}", f"data.path={prompts}", "eval.clip=null", "eval.features=[]"])


@pytest.mark.slow
def test_a_run_that_skips_counts_them_in_the_log_losses_and_data_report(messy_images, tiny_sd, tmp_path, capsys):
    from distill import train

    recipe = str(REPO / "recipes" / "sd15-dmd2-4step-lora.yaml")
    run = tmp_path / "run"
    overrides = latent_recipe_overrides(recipe, tiny_sd, messy_images.parent, run, **{"data.path": str(messy_images),
                                        "data.on_bad_item": "skip", "train.sample_every": 0, "train.max_steps": 1})
    train.main([recipe, *overrides])
    assert f"data: skipped 4 bad item(s) of 9, see {run / 'data_report.json'}; the first: row 4: its image" in capsys.readouterr().out
    report = json.loads((run / "data_report.json").read_text())
    assert report["skipped"] == 4 and report["kept"] == 5 and [r["row"] for r in report["rows"]] == [4, 5, 6, 7]
    rows = [json.loads(line) for line in (run / "losses.jsonl").read_text().splitlines()]
    assert [r["data/skipped_items"] for r in rows] == [4.0]
