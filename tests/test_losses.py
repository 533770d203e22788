import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import math  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from distill.losses import (  # noqa: E402
    ADVERSARIAL_LOSSES,
    approximated_r1_penalty,
    denoising_loss,
    discriminator_adversarial_loss,
    dmd_loss,
    generator_adversarial_loss,
    r1_penalty,
    r2_penalty,
)


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def t(*rows, dtype=torch.float32, requires_grad=False):
    return torch.tensor(rows, dtype=dtype, requires_grad=requires_grad)


def assert_logs_detached(logs):
    for key, value in logs.items():
        assert isinstance(value, torch.Tensor), key
        assert value.ndim == 0, key
        assert not value.requires_grad, key


# ---------------------------------------------------------------- dmd


def test_dmd_loss_value_and_gradient():
    x0_student = t([1.0, 2.0], [0.0, -1.0], requires_grad=True)
    x0_real = t([0.0, 0.0], [2.0, 1.0], requires_grad=True)
    x0_fake = t([3.0, -3.0], [0.0, 5.0], requires_grad=True)
    # |student - real| = [[1, 2], [2, 2]] -> w = [1.5, 2.0]
    # fake - real = [[3, -3], [-2, 4]] -> grad = [[2, -2], [-1, 2]]
    loss, logs = dmd_loss(x0_student, x0_real, x0_fake)
    assert loss.ndim == 0 and loss.dtype == torch.float32
    assert loss.item() == pytest.approx(0.5 * (4 + 4 + 1 + 4) / 4)  # 1.625
    assert logs["dmd_weight"].item() == pytest.approx((1.5 + 2.0) / 2)
    assert logs["dmd_grad_norm"].item() == pytest.approx((math.sqrt(8) + math.sqrt(5)) / 2)
    assert logs["dmd_loss"].item() == pytest.approx(1.625)
    assert_logs_detached(logs)

    loss.backward()
    # d loss / d x0_student = grad / numel, numel = 4
    expected = torch.tensor([[0.5, -0.5], [-0.25, 0.5]])
    torch.testing.assert_close(x0_student.grad, expected)
    assert x0_real.grad is None
    assert x0_fake.grad is None


def test_dmd_loss_nan_guard_and_low_precision():
    # student == real == fake -> w = 0 and 0/0; nan_to_num must give a zero update.
    x = t([1.0, 2.0], [3.0, 4.0], requires_grad=True)
    loss, logs = dmd_loss(x, x.detach().clone(), x.detach().clone())
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(x.grad, torch.zeros_like(x))

    xb = t([1.0, 2.0], [0.0, -1.0], dtype=torch.bfloat16, requires_grad=True)
    real = t([0.0, 0.0], [2.0, 1.0], dtype=torch.bfloat16)
    fake = t([3.0, -3.0], [0.0, 5.0], dtype=torch.bfloat16)
    loss, _ = dmd_loss(xb, real, fake)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(1.625)
    loss.backward()
    assert xb.grad.dtype == torch.bfloat16


def test_denoising_loss():
    prediction = t([1.0, 2.0], [3.0, 4.0], requires_grad=True)
    target = t([0.0, 0.0], [3.0, 2.0])
    # squared errors [[1, 4], [0, 4]] -> mean 2.25
    loss, logs = denoising_loss(prediction, target)
    assert loss.item() == pytest.approx(2.25)
    assert logs["denoising_loss"].item() == pytest.approx(2.25)
    assert_logs_detached(logs)
    loss.backward()
    torch.testing.assert_close(prediction.grad, 2 * (prediction.detach() - target) / 4)  # d/dp mean (p - y)^2

    with pytest.raises(ValueError):
        denoising_loss(prediction, target[:1])


# ---------------------------------------------------------------- adversarial

FAKE = [0.0, 2.0]
REAL = [1.0, -1.0]

G_EXPECTED = {
    "non_saturating": (softplus(-0.0) + softplus(-2.0)) / 2,
    "hinge": -(0.0 + 2.0) / 2,
    # fake - real = [-1, 3]
    "relativistic": (softplus(1.0) + softplus(-3.0)) / 2,
}
D_EXPECTED = {
    "non_saturating": (softplus(-1.0) + softplus(1.0)) / 2 + (softplus(0.0) + softplus(2.0)) / 2,
    # relu(1 - real) = [0, 2], relu(1 + fake) = [1, 3]
    "hinge": (0.0 + 2.0) / 2 + (1.0 + 3.0) / 2,
    # real - fake = [1, -3]
    "relativistic": (softplus(-1.0) + softplus(3.0)) / 2,
}


def test_adversarial_kinds_listed():
    assert set(ADVERSARIAL_LOSSES) == set(G_EXPECTED) == set(D_EXPECTED)


@pytest.mark.parametrize("kind", ADVERSARIAL_LOSSES)
def test_generator_adversarial_loss(kind):
    fake = torch.tensor(FAKE, requires_grad=True)
    loss, logs = generator_adversarial_loss(fake, torch.tensor(REAL), kind=kind)
    assert loss.item() == pytest.approx(G_EXPECTED[kind])
    assert logs["gan_g_loss"].item() == pytest.approx(G_EXPECTED[kind])
    assert logs["logits_fake"].item() == pytest.approx(1.0)
    assert_logs_detached(logs)
    loss.backward()
    assert fake.grad is not None

    # [B, K] logits average over every entry: duplicating heads leaves the value unchanged.
    fake2 = torch.tensor([FAKE, FAKE]).T.contiguous()
    real2 = torch.tensor([REAL, REAL]).T.contiguous()
    loss2, _ = generator_adversarial_loss(fake2, real2, kind=kind)
    assert loss2.item() == pytest.approx(G_EXPECTED[kind])


@pytest.mark.parametrize("kind", ADVERSARIAL_LOSSES)
def test_discriminator_adversarial_loss(kind):
    real = torch.tensor(REAL, requires_grad=True)
    fake = torch.tensor(FAKE, requires_grad=True)
    loss, logs = discriminator_adversarial_loss(real, fake, kind=kind)
    assert loss.item() == pytest.approx(D_EXPECTED[kind])
    assert logs["gan_d_loss"].item() == pytest.approx(D_EXPECTED[kind])
    assert logs["logits_real"].item() == pytest.approx(0.0)
    assert logs["logits_fake"].item() == pytest.approx(1.0)
    assert_logs_detached(logs)
    loss.backward()
    assert real.grad is not None and fake.grad is not None

    real2 = torch.tensor([REAL, REAL]).T.contiguous()
    fake2 = torch.tensor([FAKE, FAKE]).T.contiguous()
    loss2, _ = discriminator_adversarial_loss(real2, fake2, kind=kind)
    assert loss2.item() == pytest.approx(D_EXPECTED[kind])


def test_adversarial_errors():
    fake = torch.tensor(FAKE)
    real = torch.tensor(REAL)
    with pytest.raises(ValueError, match="non_saturating"):
        generator_adversarial_loss(fake, real, kind="wasserstein")
    with pytest.raises(ValueError, match="hinge"):
        discriminator_adversarial_loss(real, fake, kind="wasserstein")
    with pytest.raises(ValueError, match="real_logits"):
        generator_adversarial_loss(fake, kind="relativistic")
    with pytest.raises(ValueError):
        discriminator_adversarial_loss(real[:, None], fake, kind="relativistic")
    with pytest.raises(TypeError):  # kind is a required keyword argument
        generator_adversarial_loss(fake)


# ---------------------------------------------------------------- R1 / R2


def test_r1_linear_discriminator_gives_norm_of_weight():
    disc = nn.Linear(3, 1)
    with torch.no_grad():
        disc.weight.copy_(torch.tensor([[1.0, -2.0, 3.0]]))
        disc.bias.fill_(0.7)
    x = torch.tensor([[0.5, 1.0, -1.0], [2.0, 0.0, 3.0]], requires_grad=True)
    loss, logs = r1_penalty(disc(x).squeeze(1), x)
    assert loss.item() == pytest.approx(1 + 4 + 9)
    assert logs["r1_penalty"].item() == pytest.approx(14.0)
    assert_logs_detached(logs)

    loss.backward()
    # d ||w||^2 / dw = 2w: the penalty reaches the discriminator's parameters.
    torch.testing.assert_close(disc.weight.grad, torch.tensor([[2.0, -4.0, 6.0]]))
    assert disc.weight.grad.abs().sum() > 0


def test_r1_quadratic_discriminator():
    x = torch.tensor([[1.0, 2.0], [3.0, 0.0]], requires_grad=True)
    logits = (x**2).sum(dim=1)
    # grad = 2x -> ||2x||^2 = 4 * [5, 9] = [20, 36]
    loss, _ = r1_penalty(logits, x)
    assert loss.item() == pytest.approx(28.0)

    # R2 is the same computation on fake inputs.
    loss2, logs2 = r2_penalty((x**2).sum(dim=1), x)
    assert loss2.item() == pytest.approx(28.0)
    assert logs2["r2_penalty"].item() == pytest.approx(28.0)


def test_r1_requires_grad_inputs():
    x = torch.ones(2, 3)
    w = torch.ones(3, requires_grad=True)
    with pytest.raises(ValueError, match="require grad"):
        r1_penalty(x @ w, x)
    with pytest.raises(ValueError, match="require grad"):
        r2_penalty(x @ w, x)


def test_approximated_r1_linear_discriminator():
    w = torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True)
    x = torch.tensor([[0.3, -0.4], [1.0, 1.0]], dtype=torch.float64)
    noise = torch.tensor([[0.5, -1.0], [2.0, 1.0]], dtype=torch.float64)
    sigma = 0.1
    loss, logs = approximated_r1_penalty(x @ w, (x + sigma * noise) @ w, sigma)
    # w.n = [0.5 - 2, 2 + 2] = [-1.5, 4] -> mean of squares = (2.25 + 16) / 2
    assert loss.item() == pytest.approx(9.125)
    assert logs["approx_r1_penalty"].item() == pytest.approx(9.125)
    assert logs["approx_r1_raw"].item() == pytest.approx(9.125 * sigma**2)
    assert_logs_detached(logs)

    loss.backward()
    # loss = mean_b (w.n_b)^2 -> dw = mean_b 2 (w.n_b) n_b
    expected = (2 * -1.5 * noise[0] + 2 * 4.0 * noise[1]) / 2
    torch.testing.assert_close(w.grad, expected)


def test_approximated_r1_gradient_flows_through_both_logits():
    real = torch.tensor([1.0, 2.0], requires_grad=True)
    perturbed = torch.tensor([1.5, 1.0], requires_grad=True)
    loss, _ = approximated_r1_penalty(real, perturbed, 0.5)
    # diffs [-0.5, 1] -> (0.25 + 1) / 2 / 0.25
    assert loss.item() == pytest.approx(2.5)
    loss.backward()
    torch.testing.assert_close(real.grad, torch.tensor([-0.5, 1.0]) / 0.25)
    torch.testing.assert_close(perturbed.grad, -real.grad)

    with pytest.raises(ValueError):
        approximated_r1_penalty(real, perturbed, 0.0)
    with pytest.raises(ValueError):
        approximated_r1_penalty(real, perturbed[:1], 0.5)


def test_approximated_r1_converges_to_exact_r1():
    gen = torch.Generator().manual_seed(0)
    dim, hidden, n_points, n_draws = 4, 16, 3, 20000
    w1 = torch.randn(dim, hidden, generator=gen, dtype=torch.float64)
    b1 = torch.randn(hidden, generator=gen, dtype=torch.float64)
    w2 = torch.randn(hidden, generator=gen, dtype=torch.float64) / hidden**0.5

    def disc(x):
        return torch.tanh(x @ w1 + b1) @ w2

    x = torch.randn(n_points, dim, generator=gen, dtype=torch.float64, requires_grad=True)
    exact, _ = r1_penalty(disc(x), x)
    exact = exact.item()
    assert exact > 0

    xs = x.detach().repeat_interleave(n_draws, dim=0)
    # Same noise for every sigma, so Monte-Carlo error does not mask the bias trend.
    noise = torch.randn(xs.shape, generator=gen, dtype=torch.float64)
    errors = {}
    for sigma in (0.3, 1e-3):
        approx, _ = approximated_r1_penalty(disc(xs), disc(xs + sigma * noise), sigma)
        errors[sigma] = abs(approx.item() - exact) / exact
    assert errors[1e-3] < 0.05, errors
    assert errors[1e-3] < errors[0.3], errors


def test_r1_conventions_agree_on_a_linear_discriminator_of_k_logits():
    """D_k(x) = w_k . x with K non-parallel w_k: both penalties' expectation is known in closed
    form, mean_k |w_k|^2, whereas |grad sum_k D_k|^2 = |sum_k w_k|^2 is another number."""
    from distill.losses import projection_signs

    gen = torch.Generator().manual_seed(0)
    weights = torch.tensor([[1.0, 0.0, 2.0], [0.0, 3.0, 1.0], [-1.0, 1.0, 0.0], [2.0, 2.0, -2.0]], dtype=torch.float64)
    expected = float(weights.pow(2).sum(1).mean())  # (5 + 10 + 2 + 12) / 4 = 7.25
    assert expected == pytest.approx(7.25)
    assert float(weights.sum(0).pow(2).sum()) == pytest.approx(41.0)  # the summed-logit convention differs

    n, sigma = 40000, 0.01
    x = torch.randn(n, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    logits = x @ weights.T  # [n, K]
    exact, logs = r1_penalty(logits, x, projection_signs(logits, gen))
    assert exact.item() == pytest.approx(expected, rel=0.03)
    assert logs["r1_penalty"].item() == pytest.approx(exact.item())
    noise = torch.randn(x.shape, generator=gen, dtype=torch.float64)
    approx, _ = approximated_r1_penalty(logits, (x + sigma * noise) @ weights.T, sigma)
    assert approx.item() == pytest.approx(expected, rel=0.03)
    with pytest.raises(ValueError, match="projection_signs"):
        r1_penalty(logits, x)  # several logits and no signs: refuse rather than silently sum


def test_discriminator_logs_accuracy_and_logit_gap():
    real = torch.tensor([[2.0, -1.0], [0.5, 3.0]])
    fake = torch.tensor([[-1.0, -2.0], [1.0, -0.5]])
    _, logs = discriminator_adversarial_loss(real, fake, kind="hinge")
    assert logs["logits_real"].item() == pytest.approx(1.125)
    assert logs["logits_fake"].item() == pytest.approx(-0.625)
    assert logs["logit_gap"].item() == pytest.approx(1.75)
    assert logs["d_accuracy"].item() == pytest.approx((3 / 4 + 3 / 4) / 2)  # 3 of 4 real > 0, 3 of 4 fake < 0
    _, logs = discriminator_adversarial_loss(real, fake, kind="relativistic")
    assert logs["d_accuracy"].item() == pytest.approx(3 / 4)  # 2 > -1, -1 > -2, 0.5 < 1, 3 > -0.5


def test_generator_objective_has_the_terms_gradient_and_logs_their_ratio():
    from distill.methods.common import generator_objective

    x0 = torch.tensor([[3.0, 4.0], [0.0, 1.0]], requires_grad=True)
    terms = {"dmd": 0.5 * (x0**2).sum(), "gan": (2 * x0).sum()}  # gradients x0 and 2 everywhere
    loss, logs = generator_objective(x0, terms)
    loss.backward()
    torch.testing.assert_close(x0.grad, x0.detach() + 2)
    assert logs["grad_dmd"].item() == pytest.approx((5.0 + 1.0) / 2)  # per-sample norms 5 and 1
    assert logs["grad_gan"].item() == pytest.approx(math.sqrt(8))
    assert logs["gan_grad_ratio"].item() == pytest.approx(4.0 / math.sqrt(26))  # |2 * ones| / |x0|


def test_generator_objective_caps_the_gan_pull_at_max_gan_ratio():
    from distill.methods.common import generator_objective

    x0 = torch.tensor([[3.0, 4.0], [0.0, 1.0]], requires_grad=True)
    terms = lambda: {"dmd": 0.5 * (x0**2).sum(), "gan": (2 * x0).sum()}  # ratio 4 / sqrt(26) ~ 0.78
    loss, logs = generator_objective(x0, terms(), max_gan_ratio=0.5)
    loss.backward()
    scale = 0.5 / (4.0 / math.sqrt(26))
    assert logs["gan_grad_scale"].item() == pytest.approx(scale)
    assert logs["gan_grad_ratio"].item() == pytest.approx(4.0 / math.sqrt(26))  # logged before the cap
    torch.testing.assert_close(x0.grad, x0.detach() + 2 * scale)  # the GAN's direction, half the DMD norm
    assert (x0.grad - x0.detach()).norm().item() == pytest.approx(0.5 * math.sqrt(26))
    x0.grad = None
    loss, logs = generator_objective(x0, terms(), max_gan_ratio=2.0)  # a cap that does not bind
    loss.backward()
    assert logs["gan_grad_scale"].item() == 1.0
    torch.testing.assert_close(x0.grad, x0.detach() + 2)
