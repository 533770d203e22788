"""Shared fixtures: tiny models built after a seed, saved to temporary directories, and
loaded back through the real loaders. Nothing here touches the network."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def build_tiny_teacher(path: Path, num_class_embeds: int | None = 11, prediction_type: str = "epsilon") -> Path:
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
        num_class_embeds=num_class_embeds,
    )
    scheduler = DDPMScheduler(num_train_timesteps=1000, prediction_type=prediction_type)
    DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(path, safe_serialization=True)
    return path


def build_tiny_classifier(path: Path) -> Path:
    from distill.features import DigitsClassifier

    torch.manual_seed(0)
    DigitsClassifier(width=4).save_pretrained(path)
    return path


def build_tiny_dinov2(path: Path) -> Path:
    """A randomly initialised 2-layer DINOv2 (hidden 32, 28x28 inputs, 14x14 patches)."""
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    config = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=28, patch_size=14)
    Dinov2Model(config).save_pretrained(path)
    return path


def build_tiny_clip(path: Path) -> Path:
    """A randomly initialised CLIP (one layer per tower, 16x16 images) with a byte-level
    tokenizer whose vocabulary the test writes (single characters, no merges)."""
    import json

    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    path.mkdir(parents=True, exist_ok=True)
    chars = list(bytes_to_unicode().values())
    vocab = {token: i for i, token in enumerate(chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"])}
    (path / "vocab.json").write_text(json.dumps(vocab))
    (path / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(vocab_file=str(path / "vocab.json"), merges_file=str(path / "merges.txt"))
    images = CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    torch.manual_seed(0)
    special = {"bos_token_id": vocab["<|startoftext|>"], "eos_token_id": vocab["<|endoftext|>"], "pad_token_id": vocab["<|endoftext|>"]}
    config = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=32, **special),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=16, patch_size=8),
        projection_dim=8,
    )
    CLIPModel(config).save_pretrained(path)
    CLIPProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_dinov2(tmp_path_factory) -> Path:
    return build_tiny_dinov2(tmp_path_factory.mktemp("tiny") / "dinov2")


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory) -> Path:
    return build_tiny_clip(tmp_path_factory.mktemp("tiny") / "clip")


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory) -> Path:
    return build_tiny_teacher(tmp_path_factory.mktemp("tiny") / "teacher")


@pytest.fixture(scope="session")
def tiny_uncond_teacher(tmp_path_factory) -> Path:
    return build_tiny_teacher(tmp_path_factory.mktemp("tiny") / "uncond-teacher", num_class_embeds=None)


@pytest.fixture(scope="session")
def tiny_classifier(tmp_path_factory) -> Path:
    return build_tiny_classifier(tmp_path_factory.mktemp("tiny") / "classifier")


def tiny_overrides(teacher: Path, classifier: Path | None, output_dir: Path, **extra) -> list[str]:
    """Overrides that turn any digits recipe into a seconds-long run on the tiny models."""
    values = {
        "teacher.path": str(teacher),
        "eval.classifier": str(classifier) if classifier else "null",
        "eval.features": "[classifier]" if classifier else "[]",
        "eval.every": 0,
        "eval.num_samples": 40,
        "eval.every_num_samples": 20,
        "eval.kid_subset_size": 10,
        "eval.kid_subsets": 5,
        "eval.batch_size": 20,
        "output_dir": str(output_dir),
        "data.batch_size": 4,
        "train.max_steps": 2,
        "train.checkpoint_every": 1,
        "train.sample_every": 1,
        "train.num_grid_samples": 4,
        "train.log_every": 1,
        "train.max_minutes": "null",
        "method.fake_score_updates": 1,
    }
    values["eval.cache_dir"] = str(output_dir.parent / "reference-cache")
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Accelerate keeps process-wide state (mixed precision, ...); each in-process run
    of the trainer starts from a clean one, as a new `accelerate launch` would."""
    yield
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
