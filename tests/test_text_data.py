"""Text-to-image data: prompt and captioned-image datasets, their collation, the factory, the
image reference set and the on-disk encoding cache. Every data file is written in tmp_path."""

from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest
import torch
from PIL import Image

from distill.data import (
    CachedDataset,
    DigitsDataset,
    ImageCaptionDataset,
    PromptDataset,
    cache_path,
    cached_dataset,
    collate,
    image_reference_set,
    make_dataset,
    preprocess_image,
)

datasets = pytest.importorskip("datasets")

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


@pytest.fixture(autouse=True)
def _hf_cache(tmp_path, monkeypatch):
    # load_dataset converts local files to Arrow under its cache; keep that out of the home directory
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))


def _solid(width: int, height: int, colour) -> Image.Image:
    return Image.fromarray(np.full((height, width, 3), colour, np.uint8))


def _halves(width: int, height: int, first, second, *, vertical: bool) -> Image.Image:
    """Left/right halves (or top/bottom when ``vertical``) in two colours."""
    pixels = np.zeros((height, width, 3), np.uint8)
    if vertical:
        pixels[: height // 2], pixels[height // 2 :] = first, second
    else:
        pixels[:, : width // 2], pixels[:, width // 2 :] = first, second
    return Image.fromarray(pixels)


def _colour(value) -> torch.Tensor:
    """An RGB 0..255 colour as the [-1, 1] value of a preprocessed pixel, shape [3, 1, 1]."""
    return (torch.tensor(value, dtype=torch.float32) / 127.5 - 1.0)[:, None, None]


# images of an imagefolder: file -> (image, caption, expected 4x4 item as a [3, 4, 4] tensor)
def _folder_images():
    black_white = torch.cat([_colour((0, 0, 0)).expand(3, 4, 2), _colour((255, 255, 255)).expand(3, 4, 2)], dim=2)
    return {
        "wide.png": (_halves(12, 4, (0, 0, 0), (255, 255, 255), vertical=False), "black left, white right", black_white),
        "red.png": (_solid(6, 10, RED), "a red rectangle", _colour(RED).expand(3, 4, 4)),
        "blue.png": (_solid(8, 8, BLUE), "a blue square", _colour(BLUE).expand(3, 4, 4)),
    }


@pytest.fixture
def image_folder(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    with open(folder / "metadata.jsonl", "w") as f:
        for name, (image, caption, _) in _folder_images().items():
            image.save(folder / name)
            f.write(json.dumps({"file_name": name, "text": caption}) + "\n")
    return folder


def _check_items(dataset, caption_key="prompt"):
    expected = {caption: target for _, caption, target in _folder_images().values()}
    seen = set()
    for i in range(len(dataset)):
        item = dataset[i]
        assert set(item) == {"image", "prompt"}
        assert item["image"].shape == (3, 4, 4) and item["image"].dtype == torch.float32
        assert float(item["image"].min()) >= -1.0 and float(item["image"].max()) <= 1.0
        assert item["prompt"] in expected
        torch.testing.assert_close(item["image"], expected[item["prompt"]], atol=0, rtol=0)
        seen.add(item["prompt"])
    assert seen == set(expected)


# --- prompts -------------------------------------------------------------------------------------


def test_prompts_from_txt_skip_blank_lines_and_strip(tmp_path):
    file = tmp_path / "prompts.txt"
    file.write_text("  a cat on a mat \n\n\t\nan astronaut riding a horse\n   \nlast line without newline")
    dataset = PromptDataset(str(file))
    assert len(dataset) == 3
    assert [dataset[i]["prompt"] for i in range(3)] == [
        "a cat on a mat", "an astronaut riding a horse", "last line without newline"]
    assert dataset[0] == {"prompt": "a cat on a mat"}
    before = dataset.identity
    assert before == PromptDataset(str(file)).identity  # deterministic
    file.write_text("a cat on a mat\nan astronaut riding a horse\na different third prompt\n")
    assert PromptDataset(str(file)).identity != before  # same path and count, new content


def test_prompts_from_save_to_disk(tmp_path):
    saved = tmp_path / "saved"
    datasets.Dataset.from_dict({"text": ["one", "two", "three", "four"], "id": [1, 2, 3, 4]}).save_to_disk(str(saved))
    dataset = PromptDataset(str(saved))
    assert [dataset[i]["prompt"] for i in range(len(dataset))] == ["one", "two", "three", "four"]

    splits = tmp_path / "splits"
    datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"text": ["t1", "t2"]}),
        "validation": datasets.Dataset.from_dict({"text": ["v1"]}),
    }).save_to_disk(str(splits))
    assert PromptDataset(str(splits), split="validation").prompts == ["v1"]
    assert PromptDataset(str(splits)).prompts == ["t1", "t2"]
    with pytest.raises(ValueError, match=r"'test'.*\['train', 'validation'\]"):
        PromptDataset(str(splits), split="test")


def test_prompts_from_parquet_custom_column(tmp_path):
    file = tmp_path / "prompts.parquet"
    table = datasets.Dataset.from_dict({"caption": ["red fox", "blue whale", "green tea"], "score": [1.0, 2.0, 3.0]})
    table.to_parquet(str(file))
    dataset = PromptDataset(str(file), column="caption")
    assert dataset.prompts == ["red fox", "blue whale", "green tea"]
    assert "caption" in dataset.identity and str(file) in dataset.identity

    # a directory of parquet files reads the same way
    folder = tmp_path / "pq"
    folder.mkdir()
    os.replace(file, folder / "train-00000.parquet")
    assert PromptDataset(str(folder), column="caption").prompts == ["red fox", "blue whale", "green tea"]


def test_missing_column_names_it_and_the_columns_present(tmp_path):
    file = tmp_path / "prompts.parquet"
    datasets.Dataset.from_dict({"caption": ["a"], "score": [1.0]}).to_parquet(str(file))
    with pytest.raises(ValueError) as error:
        PromptDataset(str(file))  # default column "text"
    message = str(error.value)
    assert "'text'" in message and "['caption', 'score']" in message and str(file) in message


def test_prompts_bad_sources(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        PromptDataset(str(tmp_path / "missing.txt"))
    with pytest.raises(FileNotFoundError, match="nowhere"):
        PromptDataset(str(tmp_path / "nowhere"))
    (tmp_path / "blank.txt").write_text("\n  \n")
    with pytest.raises(ValueError, match="no prompts"):
        PromptDataset(str(tmp_path / "blank.txt"))
    (tmp_path / "prompts.tsv").write_text("a\tb\n")
    with pytest.raises(ValueError, match="'.tsv'"):
        PromptDataset(str(tmp_path / "prompts.tsv"))
    file = tmp_path / "numbers.parquet"
    datasets.Dataset.from_dict({"text": [1, 2]}).to_parquet(str(file))
    with pytest.raises(ValueError, match="row 0.*int"):
        PromptDataset(str(file))


@pytest.mark.skipif(os.environ.get("HF_HUB_OFFLINE") != "1", reason="would reach for the network")
def test_unknown_hub_id_error_names_it():
    with pytest.raises(FileNotFoundError, match="no-such-owner/no-such-prompts"):
        PromptDataset("no-such-owner/no-such-prompts")


# --- captioned images ----------------------------------------------------------------------------


def test_centre_crop_wide_and_tall_exact():
    black, white = _colour((0, 0, 0)), _colour((255, 255, 255))
    # 12x4 already has its short side at 4: no resampling, the crop keeps columns 4..7
    wide = preprocess_image(_halves(12, 4, (0, 0, 0), (255, 255, 255), vertical=False), 4)
    assert wide.shape == (3, 4, 4) and wide.dtype == torch.float32
    torch.testing.assert_close(wide[:, :, :2], black.expand(3, 4, 2), atol=0, rtol=0)
    torch.testing.assert_close(wide[:, :, 2:], white.expand(3, 4, 2), atol=0, rtol=0)
    # 4x12 tall: rows 4..7, top half black
    tall = preprocess_image(_halves(4, 12, (0, 0, 0), (255, 255, 255), vertical=True), 4)
    torch.testing.assert_close(tall[:, :2], black.expand(3, 2, 4), atol=0, rtol=0)
    torch.testing.assert_close(tall[:, 2:], white.expand(3, 2, 4), atol=0, rtol=0)


def test_resize_short_side_then_centre_crop():
    # 64x32 -> 16x8 (bicubic, a 4x reduction: each output pixel reads +-8 input pixels), crop columns 4..11.
    # Output columns 4, 5 (inputs 16..23) and 10, 11 (40..47) lie wholly inside one half: exact colours
    image = preprocess_image(_halves(64, 32, RED, BLUE, vertical=False), 8)
    assert image.shape == (3, 8, 8)
    torch.testing.assert_close(image[:, :, :2], _colour(RED).expand(3, 8, 2), atol=0, rtol=0)
    torch.testing.assert_close(image[:, :, 6:], _colour(BLUE).expand(3, 8, 2), atol=0, rtol=0)
    # the red/blue edge sits at the centre: bicubic mixes the two colours in columns 3 and 4
    for column in (3, 4):
        assert -1.0 < float(image[0, 4, column]) < 1.0 and -1.0 < float(image[2, 4, column]) < 1.0
    assert float(image[0, 4, 3]) > float(image[0, 4, 4]) and float(image[2, 4, 3]) < float(image[2, 4, 4])
    # grey and RGBA images come out RGB; alpha is composited over white (half-transparent green
    # is light green), not dropped (which showed whatever colour transparent pixels hid)
    assert preprocess_image(Image.new("L", (5, 5), 255), 5).shape == (3, 5, 5)
    rgba = preprocess_image(Image.new("RGBA", (6, 6), (0, 255, 0, 128)), 3)
    torch.testing.assert_close(rgba, _colour((127, 255, 127)).expand(3, 3, 3), atol=0, rtol=0)


def test_image_folder_items(image_folder):
    dataset = ImageCaptionDataset(str(image_folder), resolution=4)
    assert len(dataset) == 3
    _check_items(dataset)
    assert "|4|" in dataset.identity and "|3|" in dataset.identity
    assert ImageCaptionDataset(str(image_folder), resolution=2).identity != dataset.identity


def test_image_caption_errors(image_folder):
    with pytest.raises(ValueError, match=r"'caption'.*\['image', 'text'\]"):
        ImageCaptionDataset(str(image_folder), caption_column="caption", resolution=4)
    with pytest.raises(ValueError, match="resolution"):
        ImageCaptionDataset(str(image_folder), resolution=0)


def _images_and_captions():
    images = [image for image, _, _ in _folder_images().values()]
    return images, [caption for _, caption, _ in _folder_images().values()]


def test_parquet_images_file_and_directory(tmp_path):
    images, captions = _images_and_captions()
    features = datasets.Features({"picture": datasets.Image(), "caption": datasets.Value("string")})
    folder = tmp_path / "pq"
    folder.mkdir()
    file = folder / "train-00000.parquet"
    datasets.Dataset.from_dict({"picture": images, "caption": captions}, features=features).to_parquet(str(file))
    for source in (file, folder):
        _check_items(ImageCaptionDataset(str(source), image_column="picture", caption_column="caption", resolution=4))


def test_undecoded_images(tmp_path):
    """Images as {"bytes", "path"} dicts: a parquet written without datasets' feature metadata,
    and a saved dataset whose Image feature does not decode."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    images, captions = _images_and_captions()
    encoded = []
    for image in images:
        image.save(tmp_path / "scratch.png")
        encoded.append({"bytes": (tmp_path / "scratch.png").read_bytes(), "path": None})
    pq.write_table(pa.table({"image": encoded, "text": captions}), str(tmp_path / "raw.parquet"))
    raw = datasets.load_dataset("parquet", data_files=str(tmp_path / "raw.parquet"), split="train")
    assert raw[0]["image"].keys() == {"bytes", "path"}  # what datasets hands over without feature metadata
    _check_items(ImageCaptionDataset(str(tmp_path / "raw.parquet"), resolution=4))

    features = datasets.Features({"image": datasets.Image(decode=False), "text": datasets.Value("string")})
    table = datasets.Dataset.from_dict({"image": images, "text": captions}).cast(features)
    table.save_to_disk(str(tmp_path / "saved"))
    assert isinstance(datasets.load_from_disk(str(tmp_path / "saved"))[0]["image"], dict)
    _check_items(ImageCaptionDataset(str(tmp_path / "saved"), resolution=4))


# --- collate -------------------------------------------------------------------------------------


def test_collate_tensors_and_strings():
    items = [{"image": torch.full((3, 2, 2), float(i)), "prompt": f"prompt {i}", "class_label": i} for i in range(5)]
    batch = collate(items, torch.tensor([4, 0, 2]))
    assert set(batch) == {"image", "prompt", "class_label"}
    assert batch["image"].shape == (3, 3, 2, 2)
    assert batch["image"][:, 0, 0, 0].tolist() == [4.0, 0.0, 2.0]
    assert batch["prompt"] == ["prompt 4", "prompt 0", "prompt 2"]
    assert isinstance(batch["prompt"], list)
    assert batch["class_label"].tolist() == [4, 0, 2] and batch["class_label"].dtype == torch.int64


def test_collate_image_folder(image_folder):
    dataset = ImageCaptionDataset(str(image_folder), resolution=4)
    batch = collate(dataset, torch.tensor([2, 0]))
    assert batch["image"].shape == (2, 3, 4, 4)
    assert batch["prompt"] == [dataset[2]["prompt"], dataset[0]["prompt"]]


# --- encoding cache ------------------------------------------------------------------------------


class CountingEncoder:
    """A stand-in for the teacher's encoders: a "latent" from the images (one linear map, so a
    gradient would be recorded if encode ran with grad on) and a "cond." tensor from the prompts."""

    def __init__(self, fail_on_call: int | None = None):
        self.calls, self.batch_sizes, self.grad_enabled, self.fail_on_call = 0, [], [], fail_on_call
        torch.manual_seed(0)
        self.linear = torch.nn.Linear(3, 2)

    def __call__(self, batch):
        self.calls += 1
        if self.fail_on_call == self.calls:
            raise RuntimeError("interrupted")
        self.grad_enabled.append(torch.is_grad_enabled())
        self.batch_sizes.append(len(batch["prompt"]))
        out = {"cond.encoder_hidden_states": torch.tensor([[len(p), p.count(" ")] for p in batch["prompt"]],
                                                          dtype=torch.bfloat16)[:, None, :].repeat(1, 3, 1)}
        if "image" in batch:
            out["latent"] = self.linear(batch["image"].permute(0, 2, 3, 1)).permute(0, 3, 1, 2)  # [B, 2, R, R]
        return out


def _expected(dataset, i):
    encoder = CountingEncoder()
    with torch.no_grad():
        return {k: v[0] for k, v in encoder(collate(dataset, torch.tensor([i]))).items()}


def _assert_cached_items(cached, dataset):
    assert len(cached) == len(dataset)
    for i in range(len(dataset)):
        item, expected = cached[i], _expected(dataset, i)
        assert set(item) == set(expected) | {"prompt"}
        assert item["prompt"] == dataset[i]["prompt"]
        for key, value in expected.items():
            assert item[key].dtype == value.dtype and item[key].device.type == "cpu"
            torch.testing.assert_close(item[key], value)


def test_cache_encodes_once_and_returns_encoder_outputs(image_folder, tmp_path):
    dataset = ImageCaptionDataset(str(image_folder), resolution=4)
    encoder = CountingEncoder()
    cached = cached_dataset(dataset, encoder, cache_dir=str(tmp_path / "cache"), key="teacher-a", batch_size=2)
    assert encoder.calls == 2 and encoder.batch_sizes == [2, 1]  # 3 items in batches of 2
    assert encoder.grad_enabled == [False, False]
    assert isinstance(cached, CachedDataset)
    _assert_cached_items(cached, dataset)
    assert cached[0]["latent"].shape == (2, 4, 4) and cached[0]["cond.encoder_hidden_states"].shape == (3, 2)
    assert not cached[0]["latent"].requires_grad

    manifest = cache_path(dataset, cache_dir=str(tmp_path / "cache"), key="teacher-a") / "manifest.json"
    written = manifest.stat()
    again = cached_dataset(ImageCaptionDataset(str(image_folder), resolution=4), encoder,
                           cache_dir=str(tmp_path / "cache"), key="teacher-a", batch_size=2)
    assert encoder.calls == 2  # reused, not re-encoded
    assert manifest.stat().st_ino == written.st_ino  # a complete cache is read, not rewritten
    _assert_cached_items(again, dataset)
    batch = collate(again, torch.tensor([2, 1]))
    assert batch["latent"].shape == (2, 2, 4, 4) and batch["prompt"] == [dataset[2]["prompt"], dataset[1]["prompt"]]
    with pytest.raises(IndexError):
        again[3]


def test_cache_key_and_resolution_rebuild(image_folder, tmp_path):
    cache = tmp_path / "cache"
    encoder = CountingEncoder()
    dataset = ImageCaptionDataset(str(image_folder), resolution=4)
    cached_dataset(dataset, encoder, cache_dir=str(cache), key="teacher-a", batch_size=4)
    assert encoder.calls == 1
    cached_dataset(dataset, encoder, cache_dir=str(cache), key="teacher-b", batch_size=4)
    assert encoder.calls == 2
    smaller = ImageCaptionDataset(str(image_folder), resolution=2)
    rebuilt = cached_dataset(smaller, encoder, cache_dir=str(cache), key="teacher-a", batch_size=4)
    assert encoder.calls == 3 and rebuilt[0]["latent"].shape == (2, 2, 2)
    assert len({p.name for p in cache.iterdir()}) == 3
    assert cache_path(dataset, cache_dir=str(cache), key="teacher-a") != cache_path(smaller, cache_dir=str(cache), key="teacher-a")


def test_cache_dir_expands_user(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    file = tmp_path / "p.txt"
    file.write_text("a\nb\n")
    cached_dataset(PromptDataset(str(file)), CountingEncoder(), cache_dir="~/encoded", key="k")
    assert (tmp_path / "encoded").is_dir() and not (tmp_path / "~").exists()


def test_cache_ignores_leftover_partial_build(image_folder, tmp_path):
    dataset = ImageCaptionDataset(str(image_folder), resolution=4)
    directory = cache_path(dataset, cache_dir=str(tmp_path / "cache"), key="k")
    directory.mkdir(parents=True)
    (directory / "shard-00000.safetensors.tmp-12345").write_bytes(b"half a shard")
    encoder = CountingEncoder()
    cached = cached_dataset(dataset, encoder, cache_dir=str(tmp_path / "cache"), key="k", batch_size=8)
    assert encoder.calls == 1
    _assert_cached_items(cached, dataset)
    assert (directory / "manifest.json").is_file()


def test_cache_interrupted_build_is_not_complete(tmp_path):
    file = tmp_path / "prompts.txt"
    file.write_text("\n".join(f"prompt number {i}" for i in range(5)))
    dataset = PromptDataset(str(file))
    broken = CountingEncoder(fail_on_call=2)
    with pytest.raises(RuntimeError, match="interrupted"):
        cached_dataset(dataset, broken, cache_dir=str(tmp_path / "cache"), key="k", batch_size=2, shard_size=2)
    directory = cache_path(dataset, cache_dir=str(tmp_path / "cache"), key="k")
    assert (directory / "shard-00000.safetensors").is_file()  # the finished shard
    assert not (directory / "manifest.json").exists()
    assert not list(directory.glob("*.tmp-*"))

    encoder = CountingEncoder()
    cached = cached_dataset(dataset, encoder, cache_dir=str(tmp_path / "cache"), key="k", batch_size=2, shard_size=2)
    assert encoder.calls == 2 and encoder.batch_sizes == [2, 1]  # shards 1 and 2; shard 0 kept
    _assert_cached_items(cached, dataset)  # prompt-only data: no "latent", items span three shards
    assert "latent" not in cached[0]

    # a shard file that is corrupt (not written by us) is rebuilt, not read
    (directory / "manifest.json").unlink()
    (directory / "shard-00001.safetensors").write_bytes(b"garbage")
    encoder = CountingEncoder()
    _assert_cached_items(cached_dataset(dataset, encoder, cache_dir=str(tmp_path / "cache"), key="k", batch_size=2,
                                        shard_size=2), dataset)
    assert encoder.calls == 1


def test_cache_rejects_bad_encoder_output(tmp_path):
    file = tmp_path / "p.txt"
    file.write_text("a\nb\nc\n")
    with pytest.raises(ValueError, match="'latent'"):
        cached_dataset(PromptDataset(str(file)), lambda batch: {"latent": torch.zeros(1, 2)}, cache_dir=str(tmp_path), key="k")
    with pytest.raises(ValueError, match="no tensors"):
        cached_dataset(PromptDataset(str(file)), lambda batch: {}, cache_dir=str(tmp_path), key="k")


# --- factory and reference set -------------------------------------------------------------------


def test_make_dataset_dispatch(image_folder, tmp_path):
    common = dict(split="train", prompt_column="text", image_column="image")
    digits = make_dataset(dataset="digits", path=None, resolution=None, **common)
    assert isinstance(digits, DigitsDataset) and len(digits) == 1437
    file = tmp_path / "p.txt"
    file.write_text("x\ny\n")
    prompts = make_dataset(dataset="prompts", path=str(file), resolution=None, **common)
    assert isinstance(prompts, PromptDataset) and prompts.prompts == ["x", "y"]
    images = make_dataset(dataset="image_captions", path=str(image_folder), resolution=4, **common)
    assert isinstance(images, ImageCaptionDataset) and images.resolution == 4
    _check_items(images)
    with pytest.raises(ValueError, match="'caption'"):  # prompt_column names the caption column
        make_dataset(dataset="image_captions", path=str(image_folder), resolution=4, split="train",
                     prompt_column="caption", image_column="image")

def test_make_dataset_errors(image_folder):
    common = dict(split="train", prompt_column="text", image_column="image")
    with pytest.raises(ValueError, match="digits.*path"):
        make_dataset(dataset="digits", path=str(image_folder), resolution=None, **common)
    with pytest.raises(ValueError, match="'prompts' needs a path"):
        make_dataset(dataset="prompts", path=None, resolution=None, **common)
    with pytest.raises(ValueError, match="needs a resolution"):
        make_dataset(dataset="image_captions", path=str(image_folder), resolution=None, **common)
    with pytest.raises(ValueError, match="'cifar'"):
        make_dataset(dataset="cifar", path=None, resolution=None, **common)


def test_image_reference_set(image_folder):
    dataset = ImageCaptionDataset(str(image_folder), resolution=4)
    key, images, labels = image_reference_set(dataset)
    assert images.shape == (3, 3, 4, 4) and images.dtype == torch.float32 and labels is None
    assert float(images.min()) == 0.0 and float(images.max()) == 1.0
    torch.testing.assert_close(images, torch.stack([(dataset[i]["image"] + 1) / 2 for i in range(3)]))
    assert re.fullmatch(r"[A-Za-z0-9._-]+", key) and "4px" in key
    assert image_reference_set(dataset)[0] == key  # stable

    small_key, small, _ = image_reference_set(ImageCaptionDataset(str(image_folder), resolution=2))
    assert small.shape == (3, 3, 2, 2) and small_key != key
    subset_key, subset, _ = image_reference_set(dataset, num=2)
    assert subset.shape == (2, 3, 4, 4) and subset_key not in (key, small_key)
    assert torch.equal(image_reference_set(dataset, num=2)[1], subset)  # the same subset every time
    with pytest.raises(TypeError, match="ImageCaptionDataset"):
        image_reference_set(DigitsDataset("test"))


def test_image_reference_key_names_the_data(image_folder, tmp_path):
    # a folder of the same name, resolution and size but other images must not share cached features
    other = tmp_path / "elsewhere" / image_folder.name
    other.mkdir(parents=True)
    for name in _folder_images():
        _solid(8, 8, GREEN).save(other / name)
    (other / "metadata.jsonl").write_text((image_folder / "metadata.jsonl").read_text())
    key = image_reference_set(ImageCaptionDataset(str(image_folder), resolution=4))[0]
    other_key, images, _ = image_reference_set(ImageCaptionDataset(str(other), resolution=4))
    assert other_key != key and float(images[:, 1].min()) == 1.0
