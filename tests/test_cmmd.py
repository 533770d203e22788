"""CMMD: the MMD² estimate against closed forms and an independent float64 double loop, and
the CLIP image embeddings it is computed on (the tiny CLIP the tests build)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from distill import metrics
from distill.clip_features import ClipImageFeatures, clip_inputs
from distill.features import extract


def _naive(x: np.ndarray, y: np.ndarray, sigma: float, unbiased: bool) -> float:
    """MMD² by the definition: a double loop in float64 over every pair."""
    k = lambda a, b: math.exp(-float(np.sum((a - b) ** 2)) / (2 * sigma**2))
    n, m = len(x), len(y)
    kxx = sum(k(x[i], x[j]) for i in range(n) for j in range(n) if not (unbiased and i == j))
    kyy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if not (unbiased and i == j))
    kxy = sum(k(x[i], y[j]) for i in range(n) for j in range(m))
    pairs = (n * (n - 1), m * (m - 1)) if unbiased else (n * n, m * m)
    return kxx / pairs[0] + kyy / pairs[1] - 2 * kxy / (n * m)


def _unit(shape, seed):
    return torch.nn.functional.normalize(torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64), dim=1)


def test_single_points_give_the_closed_form():
    # one point per set: MMD² = k(x, x) + k(y, y) - 2 k(x, y) = 2 - 2 exp(-|x - y|² / (2 σ²))
    x, y = torch.tensor([[1.0, 0.0, 0.0]]), torch.tensor([[0.0, 1.0, 0.0]])  # |x - y|² = 2
    for sigma in (10.0, 1.0, 0.5):
        assert metrics.cmmd(x, y, sigma=sigma) == pytest.approx(1000 * (2 - 2 * math.exp(-2 / (2 * sigma**2))), rel=1e-12)
    assert metrics.cmmd(x, y, sigma=1.0, scale=1.0) == pytest.approx(2 - 2 * math.exp(-1), rel=1e-12)


def test_two_point_sets_by_hand():
    # X = {e1, e2}, Y = {e1, -e1}, sigma = 1: squared distances |e1-e2|² = 2, |e1+e1|² = 4, |e2+e1|² = 2
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    y = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
    e1, e2 = math.exp(-1.0), math.exp(-2.0)  # k at squared distance 2 and 4
    kxx = (2 + 2 * e1) / 4
    kyy = (2 + 2 * e2) / 4
    kxy = (1 + e2 + e1 + e1) / 4  # (e1,e1) (e1,-e1) (e2,e1) (e2,-e1)
    assert metrics.cmmd(x, y, sigma=1.0, scale=1.0) == pytest.approx(kxx + kyy - 2 * kxy, rel=1e-12)
    # unbiased: the within-set means over i != j only
    unbiased = (2 * e1) / 2 + (2 * e2) / 2 - 2 * kxy
    assert metrics.cmmd(x, y, sigma=1.0, scale=1.0, unbiased=True) == pytest.approx(unbiased, rel=1e-12)


@pytest.mark.parametrize("unbiased", [False, True])
def test_matches_a_float64_double_loop(unbiased):
    real, fake = _unit((13, 6), 0), _unit((9, 6), 1) + 0.3
    expected = 1000 * _naive(real.numpy(), fake.numpy(), 10.0, unbiased)
    got = metrics.cmmd(real.float(), fake.float(), unbiased=unbiased, chunk=4)  # several blocks, float32 input
    assert got == pytest.approx(expected, rel=1e-5, abs=1e-9)
    assert metrics.cmmd(fake, real, unbiased=unbiased) == pytest.approx(got, rel=1e-6)  # symmetric
    assert abs(expected) > 1e-3  # the shift is visible at sigma = 10 on the 1000 scale


def test_identical_sets_and_a_growing_shift():
    real = _unit((20, 8), 2)
    assert metrics.cmmd(real, real.clone()) == 0.0
    # the unbiased estimate of two copies is (2 / n) (mean off-diagonal kernel - 1): slightly below 0
    n = len(real)
    d2 = torch.cdist(real, real).square()
    off = (torch.exp(-d2 / 200).sum() - n) / (n * (n - 1))
    assert metrics.cmmd(real, real.clone(), unbiased=True) == pytest.approx(1000 * 2 / n * (float(off) - 1), rel=1e-9)
    values = [metrics.cmmd(real, real + shift) for shift in (0.0, 0.05, 0.1, 0.2)]
    assert values[0] == 0.0 and all(a < b for a, b in zip(values, values[1:]))
    # a common shift delta of every point: k_xy(i, j) = k(x_i, x_j + delta); with one point per set it is the closed form
    delta = torch.zeros(1, 8, dtype=torch.float64)
    delta[0, 0] = 0.2
    assert metrics.cmmd(real[:1], real[:1] + delta) == pytest.approx(1000 * (2 - 2 * math.exp(-0.04 / 200)), rel=1e-9)


def test_rejects_mismatched_sets():
    with pytest.raises(ValueError, match="one width"):
        metrics.cmmd(torch.zeros(3, 4), torch.zeros(3, 5))
    with pytest.raises(ValueError, match="two or more"):
        metrics.cmmd(torch.zeros(1, 4), torch.zeros(3, 4), unbiased=True)


def test_clip_embeddings_are_the_models_unit_image_embeddings(tiny_clip, one_thread):
    from transformers import CLIPModel, CLIPProcessor

    extractor = ClipImageFeatures(str(tiny_clip))
    assert extractor.size == 16 and extractor.identity.startswith("clip:")
    images = torch.rand(5, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    embeddings = extract(extractor, images, batch_size=2)
    assert embeddings.shape == (5, 8)
    torch.testing.assert_close(embeddings.norm(dim=1), torch.ones(5), atol=1e-6, rtol=0)

    # independently: the processor's own normalisation and CLIPModel's forward (unit-norm image_embeds)
    model, processor = CLIPModel.from_pretrained(tiny_clip).eval(), CLIPProcessor.from_pretrained(tiny_clip)
    pixels = processor.image_processor(images=list(images.permute(0, 2, 3, 1).numpy()), do_rescale=False, do_resize=False,
                                       do_center_crop=False, return_tensors="pt").pixel_values
    tokens = processor.tokenizer(["a"] * 5, return_tensors="pt")
    with torch.no_grad():
        expected = model(input_ids=tokens.input_ids, pixel_values=pixels).image_embeds
    torch.testing.assert_close(embeddings, expected, atol=1e-5, rtol=1e-5)


def test_clip_inputs_crop_resize_and_grey(tiny_clip, one_thread):
    extractor = ClipImageFeatures(str(tiny_clip))
    wide = torch.rand(2, 3, 16, 24, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(extractor(wide), extractor(wide[..., 4:20]))  # the centred square
        grey = torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(2))
        torch.testing.assert_close(extractor(grey), extractor(grey.expand(-1, 3, -1, -1)))
    resized = clip_inputs(grey, 16, extractor.mean, extractor.std)
    assert resized.shape == (2, 3, 16, 16)


def test_cmmd_on_clip_embeddings_separates_image_sets(tiny_clip, one_thread):
    extractor = ClipImageFeatures(str(tiny_clip))
    g = torch.Generator().manual_seed(3)
    real = torch.rand(16, 3, 16, 16, generator=g)
    same = extract(extractor, real, 8)
    dark = extract(extractor, real * 0.2, 8)  # a different image distribution
    assert metrics.cmmd(same, extract(extractor, real.clone(), 8)) == pytest.approx(0.0, abs=1e-9)
    assert metrics.cmmd(same, dark) > 1e-3
