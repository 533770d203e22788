"""Scores of a sampler: Fréchet distance in a classifier's feature space, class accuracy,
and speed; plus the teacher run with a stock diffusers solver, as the baseline.

The built-in benchmark scores digits with ``DigitsClassifier``, a small CNN trained on the
digits training split by ``scripts/train_digits_classifier.py`` and saved in
safetensors with ``PyTorchModelHubMixin`` (so it loads with ``from_pretrained`` from a hub
id or a local directory).
"""

from __future__ import annotations

import time
from typing import Callable

import torch
import torch.nn.functional as F
from huggingface_hub import PyTorchModelHubMixin
from torch import Tensor, nn
from torchmetrics.image.fid import FrechetInceptionDistance


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


class _Features(nn.Module):
    def __init__(self, classifier: DigitsClassifier):
        super().__init__()
        self.classifier = classifier
        self.num_features = classifier.num_features

    def forward(self, images: Tensor) -> Tensor:
        return self.classifier.features(images.float())


@torch.no_grad()
def score_images(images: Tensor, labels: Tensor | None, reference: Tensor, classifier: DigitsClassifier) -> dict[str, float]:
    """Fréchet distance (Heusel et al. 2017, eq. 6) between ``images`` and ``reference`` in
    the classifier's feature space, and the classifier's accuracy on ``labels``.

    images, reference: [N, C, H, W] in [0, 1]; labels: [N] intended classes or None.
    """
    fd = FrechetInceptionDistance(feature=_Features(classifier), normalize=False, input_img_size=tuple(images.shape[1:]))
    for chunk in reference.split(1000):
        fd.update(chunk, real=True)
    for chunk in images.split(1000):
        fd.update(chunk, real=False)
    scores = {"fd": float(fd.compute()), "num_samples": len(images)}
    if labels is not None:
        predicted = torch.cat([classifier(chunk).argmax(1) for chunk in images.split(1000)])
        scores["class_accuracy"] = float((predicted == labels).float().mean())
    return scores


def balanced_labels(num: int, num_classes: int | None) -> Tensor | None:
    """0, 1, ..., num_classes-1, 0, 1, ... so every class is equally represented."""
    return None if num_classes is None else torch.arange(num) % num_classes


def time_per_1000(generate: Callable[[int], Tensor], num: int, warmup: int = 1) -> float:
    """Wall-clock seconds per 1,000 samples of ``generate(num)``, after warm-up calls."""
    for _ in range(warmup):
        generate(min(num, 100))
    start = time.perf_counter()
    generate(num)
    return (time.perf_counter() - start) / num * 1000


@torch.no_grad()
def sample_teacher(teacher, scheduler_class, num_steps: int, noise: Tensor, cond: dict, guidance_scale: float = 1.0,
                   generator: torch.Generator | None = None) -> Tensor:
    """The teacher sampled with a stock diffusers scheduler (e.g. DDIMScheduler,
    DPMSolverMultistepScheduler), built from the teacher's own scheduler config: the
    baseline a distilled student has to beat. Returns x0 [B, C, H, W]."""
    scheduler = scheduler_class.from_config(teacher.scheduler_config)
    scheduler.set_timesteps(num_steps)
    x = noise * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        x_in = scheduler.scale_model_input(x, t)
        out = teacher.guided_output(teacher.denoiser, x_in, t.expand(x.shape[0]).to(x.device), cond, guidance_scale)
        x = scheduler.step(out, t, x, generator=generator).prev_sample
    return x
