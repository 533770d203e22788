"""Sample-quality metrics: pure functions, features in, numbers out.

``real`` is the reference set's features [N, D] and ``fake`` the generated samples'
features [M, D], both from the same extractor (``distill.features``). Fréchet distance and
KID are torchmetrics' own, fed with features we extracted once (so reference features can
be cached); precision and recall are written here because torchmetrics has none; CLIP
score takes images and prompts; CMMD takes CLIP image embeddings
(``distill.clip_features``).
"""

from __future__ import annotations

import warnings
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance


class _GivenFeatures(nn.Module):
    """Feature 'extractor' for torchmetrics that passes precomputed features through."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, features: Tensor) -> Tensor:
        return features


def frechet_distance(real: Tensor, fake: Tensor) -> float:
    """Fréchet distance between Gaussians fitted to the two sets (Heusel et al. 2017, eq. 6):
    ``|mu_r - mu_f|^2 + Tr(S_r + S_f - 2 (S_r S_f)^(1/2))``. FID when the features are
    InceptionV3's, FD-DINOv2 (Stein et al. 2023) when they are DINOv2's."""
    metric = FrechetInceptionDistance(feature=_GivenFeatures(real.shape[1]))
    metric.update(real.double(), real=True)
    metric.update(fake.double(), real=False)
    return float(metric.compute())


def kernel_distance(real: Tensor, fake: Tensor, subsets: int, subset_size: int, seed: int = 0) -> tuple[float, float]:
    """Kernel Inception Distance (Bińkowski et al. 2018, eq. 2 with the cubic polynomial
    kernel): unbiased MMD² averaged over random subsets; returns (mean, std over subsets).
    ``subset_size`` is capped at the smaller set's size; the subsets are drawn from ``seed``."""
    size = min(subset_size, len(real), len(fake))
    with warnings.catch_warnings():  # torchmetrics warns that it keeps all features: we already hold them
        warnings.simplefilter("ignore", UserWarning)
        metric = KernelInceptionDistance(feature=_GivenFeatures(real.shape[1]), subsets=subsets, subset_size=size)
    metric.update(real.double(), real=True)
    metric.update(fake.double(), real=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return float(mean), float(std)


def precision_recall(real: Tensor, fake: Tensor, k: int, chunk: int = 2048) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019, eqs. 1-2).

    Each set's manifold is the union of balls around its points whose radius is the distance
    to the point's k-th nearest neighbour in the same set. Precision is the fraction of
    generated samples inside the real manifold (are samples realistic?); recall is the
    fraction of real samples inside the generated manifold (are all modes covered?)."""
    real, fake = real.double(), fake.double()
    precision = _inside(fake, real, _knn_radii(real, k, chunk), chunk)
    recall = _inside(real, fake, _knn_radii(fake, k, chunk), chunk)
    return precision, recall


def _knn_radii(points: Tensor, k: int, chunk: int) -> Tensor:
    if len(points) <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} samples per set, got {len(points)}")
    # k + 1: each point is its own nearest neighbour at distance 0
    return torch.cat([torch.cdist(part, points).kthvalue(k + 1, dim=1).values for part in points.split(chunk)])


def _inside(points: Tensor, manifold: Tensor, radii: Tensor, chunk: int) -> float:
    inside = [(torch.cdist(part, manifold) <= radii[None]).any(dim=1) for part in points.split(chunk)]
    return float(torch.cat(inside).double().mean())


def class_accuracy(logits: Tensor, labels: Tensor) -> float:
    """Fraction of class-conditional samples that a classifier assigns to their intended class."""
    return float((logits.argmax(dim=1) == labels.to(logits.device)).double().mean())


def clip_score(images: Tensor, prompts: Sequence[str], model, processor, batch_size: int = 64) -> float:
    """CLIP score (Hessel et al. 2021, eq. 1 with w = 100): the mean over image-prompt pairs of
    ``100 * max(cos(E_image, E_prompt), 0)``.

    images: [N, C, H, W] in [0, 1] (grey is repeated to RGB), resized (bicubic, antialiased)
    to the vision tower's input size and normalised with the processor's mean and std;
    prompts are tokenised by the processor's tokenizer, truncated to the text tower's length.
    ``model`` / ``processor``: a transformers ``CLIPModel`` and ``CLIPProcessor``. (torchmetrics'
    ``CLIPScore`` computes the same but breaks on transformers 5's ``get_image_features``.)"""
    if len(images) != len(prompts):
        raise ValueError(f"clip_score needs one prompt per image, got {len(images)} images and {len(prompts)} prompts")
    size = model.config.vision_config.image_size
    mean = torch.tensor(processor.image_processor.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(processor.image_processor.image_std).view(1, 3, 1, 1)
    device = next(model.parameters()).device
    scores = []
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            pixels = images[start : start + batch_size].float().cpu()
            pixels = pixels.expand(-1, 3, -1, -1) if pixels.shape[1] == 1 else pixels
            pixels = F.interpolate(pixels, size=(size, size), mode="bicubic", antialias=True).clamp(0, 1)
            tokens = processor.tokenizer(list(prompts[start : start + batch_size]), padding=True, truncation=True,
                                         max_length=model.config.text_config.max_position_embeddings, return_tensors="pt")
            out = model(input_ids=tokens.input_ids.to(device), attention_mask=tokens.attention_mask.to(device),
                        pixel_values=((pixels - mean) / std).to(device))
            cosine = (out.image_embeds * out.text_embeds).sum(dim=-1)  # CLIPModel returns unit-norm embeddings
            scores.append(100 * cosine.clamp(min=0))
    return float(torch.cat(scores).mean())


def cmmd(real: Tensor, fake: Tensor, sigma: float = 10.0, scale: float = 1000.0, unbiased: bool = False,
         chunk: int = 4096) -> float:
    """CMMD (Jayasumana et al. 2024, §4): the squared maximum mean discrepancy between the real
    embeddings [N, D] and the generated ones [M, D] with the Gaussian RBF kernel
    ``k(x, y) = exp(-|x - y|^2 / (2 sigma^2))``, times ``scale``.

    The paper's embeddings are CLIP ViT-L/14@336px image embeddings, L2-normalised, with
    sigma = 10 and scale = 1000. The default estimator is the one the paper's reference code
    computes, the minimum-variance (biased) estimate of Gretton et al. 2012, eq. 5: each
    kernel mean runs over all pairs, i = j included, so identical sets give 0.
    ``unbiased=True`` gives the unbiased estimate (Gretton et al. 2012, eq. 3): the two
    within-set means leave out i = j (needs N, M >= 2). Computed in float64, in blocks of
    ``chunk`` rows, so 30,000 embeddings need no 30,000 x 30,000 matrix."""
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"cmmd needs two [N, D] sets of one width, got {tuple(real.shape)} and {tuple(fake.shape)}")
    n, m = len(real), len(fake)
    if min(n, m) < (2 if unbiased else 1):
        raise ValueError(f"cmmd needs {'two' if unbiased else 'one'} or more embeddings per set, got {n} and {m}")
    real, fake = real.double(), fake.double()
    gamma = 1.0 / (2.0 * sigma**2)
    k_rr, k_ff, k_rf = _rbf_sum(real, real, gamma, chunk), _rbf_sum(fake, fake, gamma, chunk), _rbf_sum(real, fake, gamma, chunk)
    if unbiased:  # k(x, x) = 1: the diagonal sums to the set's size
        mmd2 = (k_rr - n) / (n * (n - 1)) + (k_ff - m) / (m * (m - 1)) - 2 * k_rf / (n * m)
    else:
        mmd2 = k_rr / n**2 + k_ff / m**2 - 2 * k_rf / (n * m)
    return float(scale * mmd2)


def _rbf_sum(a: Tensor, b: Tensor, gamma: float, chunk: int) -> float:
    """Sum over all pairs (i, j) of exp(-gamma |a_i - b_j|^2)."""
    b_sq = b.square().sum(dim=1)
    total = 0.0
    for part in a.split(chunk):
        d2 = (part.square().sum(dim=1, keepdim=True) + b_sq[None] - 2 * part @ b.T).clamp(min=0)
        total += float(torch.exp(-gamma * d2).sum())
    return total
