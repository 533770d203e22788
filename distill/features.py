"""Feature spaces for sample-quality metrics: images [N, C, H, W] in [0, 1] -> features [N, D].

- ``classifier``: the penultimate layer of a local classifier (``DigitsClassifier`` for the
  built-in digits benchmark, where ImageNet features say little about 8x8 digits);
- ``dinov2``: DINOv2's CLS token, any checkpoint through transformers' ``Dinov2Model``
  (FD-DINOv2, Stein et al. 2023, use ViT-L/14: ``facebook/dinov2-large``);
- ``inception``: InceptionV3's 2048-d pool features, classic FID, through torchmetrics when
  torch-fidelity and its weights can be loaded (they cannot offline or on the CPU install).

Every extractor has ``identity``, a string naming its weights; with the dataset's name it
keys the on-disk cache of reference features (``distill.evaluate.reference_features``).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
import torch.nn.functional as F
from huggingface_hub import PyTorchModelHubMixin
from torch import Tensor, nn

FEATURE_SPACES = ("classifier", "dinov2", "inception")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class DigitsClassifier(nn.Module, PyTorchModelHubMixin):
    """CNN on 8x8 grey images in [0, 1]; ``features`` is its penultimate layer [B, 2*width]."""

    def __init__(self, num_classes: int = 10, width: int = 32):
        super().__init__()
        self.num_features = 2 * width
        self.body = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.GELU(),
            nn.Conv2d(width, width, 3, padding=1), nn.GELU(),
            nn.AvgPool2d(2),  # 8x8 -> 4x4
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.GELU(),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.GELU(),
        )
        self.classify = nn.Linear(2 * width, num_classes)

    def features(self, images: Tensor) -> Tensor:
        return self.body(images * 2 - 1).mean(dim=(2, 3))

    def forward(self, images: Tensor) -> Tensor:
        return self.classify(self.features(images))


def load_classifier(path: str) -> DigitsClassifier:
    try:
        return DigitsClassifier.from_pretrained(path).eval().requires_grad_(False)
    except Exception as err:
        raise FileNotFoundError(f"could not load the scoring classifier from {path!r} (local directory or hub id): {err}") from err


def weights_identity(name_or_path: str) -> str:
    """A local directory's resolved path plus its weight files' sizes and content hash; a hub
    id as given (the Hub's revision pins its content)."""
    path = Path(name_or_path)
    if not path.is_dir():
        return name_or_path
    digest = hashlib.sha256()
    for file in sorted(path.glob("*.safetensors")):
        digest.update(file.name.encode())
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                digest.update(block)
    return f"{path.resolve()}@{digest.hexdigest()[:16]}"


class ClassifierFeatures(nn.Module):
    """Penultimate features of the scoring classifier (``DigitsClassifier``)."""

    def __init__(self, classifier: str):
        super().__init__()
        self.classifier = load_classifier(classifier)
        self.identity = f"classifier:{weights_identity(classifier)}"

    def forward(self, images: Tensor) -> Tensor:
        return self.classifier.features(images.float())


def dinov2_preprocessing(name_or_path: str, model_config) -> tuple[int, tuple, tuple]:
    """(input size, mean, std) the checkpoint expects: from its image processor config when it
    has one (the Hub's DINOv2 checkpoints: 224, ImageNet statistics), else its model config's
    image size with ImageNet statistics."""
    from transformers import AutoImageProcessor

    try:
        processor = AutoImageProcessor.from_pretrained(name_or_path)
    except (OSError, ValueError):
        return model_config.image_size, IMAGENET_MEAN, IMAGENET_STD
    crop = getattr(processor, "crop_size", None) or {}
    size = crop.get("height", model_config.image_size)
    return size, tuple(processor.image_mean), tuple(processor.image_std)


def dinov2_inputs(images: Tensor, size: int, mean: tuple, std: tuple) -> Tensor:
    """[N, C, H, W] in [0, 1] -> DINOv2 pixel values [N, 3, size, size]: grey images are
    repeated to RGB, resized (bicubic, antialiased, differentiable) and normalised."""
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    images = F.interpolate(images.float(), size=(size, size), mode="bicubic", antialias=True, align_corners=False)
    mean = torch.tensor(mean, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(std, device=images.device).view(1, 3, 1, 1)
    return (images - mean) / std


def load_dinov2(name_or_path: str) -> tuple[nn.Module, int, tuple, tuple]:
    """A frozen ``Dinov2Model`` (hub id or local dir, safetensors) and its (input size, mean, std)."""
    from transformers import Dinov2Model

    try:
        model = Dinov2Model.from_pretrained(name_or_path, use_safetensors=True).eval().requires_grad_(False)
    except OSError as err:
        raise FileNotFoundError(f"could not load DINOv2 from {name_or_path!r} (local directory or hub id): {err}") from err
    return (model, *dinov2_preprocessing(name_or_path, model.config))


class Dinov2Features(nn.Module):
    """DINOv2's CLS token after the final layer norm (``pooler_output``), as in FD-DINOv2."""

    def __init__(self, name_or_path: str):
        super().__init__()
        self.model, self.size, self.mean, self.std = load_dinov2(name_or_path)
        self.identity = f"dinov2:{weights_identity(name_or_path)}:{self.size}"

    def forward(self, images: Tensor) -> Tensor:
        return self.model(pixel_values=dinov2_inputs(images, self.size, self.mean, self.std)).pooler_output


class InceptionFeatures(nn.Module):
    """InceptionV3 pool features (2048-d) as torchmetrics' FID computes them."""

    identity = "inception-v3-compat:2048"

    def __init__(self):
        super().__init__()
        try:
            from torchmetrics.image.fid import NoTrainInceptionV3

            self.model = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"])
        except Exception as err:  # missing torch-fidelity, or its weights not downloadable
            raise FileNotFoundError(
                "InceptionV3 features (classic FID) need torch-fidelity and its weights, downloaded from GitHub on "
                f"first use ({type(err).__name__}: {err}). Install `pip install torch-fidelity` on a machine with "
                "network (it needs torchvision, so not on the CPU install), or use the dinov2 or classifier features."
            ) from err

    def forward(self, images: Tensor) -> Tensor:
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        return self.model((images.clamp(0, 1) * 255).round().to(torch.uint8)).float()


def load_extractor(name: str, *, classifier: str | None, dinov2: str) -> nn.Module:
    """The feature extractor called ``name`` (one of ``FEATURE_SPACES``), frozen, in eval mode."""
    if name == "classifier":
        if classifier is None:
            raise ValueError("the classifier feature space needs a classifier (eval.classifier)")
        return ClassifierFeatures(classifier)
    if name == "dinov2":
        return Dinov2Features(dinov2)
    if name == "inception":
        return InceptionFeatures()
    raise ValueError(f"unknown feature space {name!r}; choose from {', '.join(FEATURE_SPACES)}")


@torch.no_grad()
def extract(extractor: nn.Module, images: Tensor, batch_size: int) -> Tensor:
    """Features [N, D] (float32, CPU) of images [N, C, H, W] in [0, 1], in batches."""
    device = next(extractor.parameters()).device
    return torch.cat([extractor(part.to(device)).float().cpu() for part in images.split(batch_size)])
