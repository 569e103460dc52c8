"""Tests of mixlab.theory: the exact mixup loss, its second-order approximation (Zhang et al.,
ICLR 2021, arXiv 2010.04819, as docs/mixup_theory.md states it) and the logistic-regression
robustness bound.
Tiny float64 problems on CPU; the whole file runs in a few seconds."""
import math

import pytest
import torch
from torch import nn

from mixlab import theory as T

ALPHAS = [(0.2, None), (1.0, None), (0.5, 2.0)]  # (alpha, beta); beta None means beta = alpha


@pytest.fixture(scope="module")
def moons():
    return T.make_moons(24, noise=0.1, seed=0)


@pytest.fixture(scope="module")
def gauss():
    return T.make_gaussian_mixture(40, 5, sep=4.0, seed=1)


# ---------------------------------------------------------------------------- data and D~
def test_generators_seeded_centred_separable():
    a, b = T.make_moons(50, seed=3, n_test=20), T.make_moons(50, seed=3, n_test=20)
    assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y) and a.x_test.shape == (20, 2)
    assert a.x.dtype == torch.float64 and float(a.x.mean(0).abs().max()) < 1e-12
    assert set(a.y.tolist()) == {0.0, 1.0}
    g = T.make_gaussian_mixture(60, 7, seed=2, n_test=30)
    assert float(g.x.mean(0).abs().max()) < 1e-12 and g.x_test.shape == (30, 7)
    theta = T.LogisticRegression(7)
    T.fit(theta, g.x, g.y, steps=200, lr=0.1)
    assert T.in_theta(theta(g.x).detach(), g.y)  # linearly separable: ERM classifies all points


@pytest.mark.parametrize("alpha,beta", ALPHAS)
def test_mixing_moments_match_quadrature(alpha, beta):
    lam, w = T.mixing_quadrature(alpha, beta, order=32)
    m1, m2 = T.mixing_moments(alpha, beta)
    assert float(w.sum()) == pytest.approx(1.0, abs=1e-13)
    assert float((w * (1 - lam)).sum()) == pytest.approx(m1, rel=1e-12)
    assert float((w * (1 - lam) ** 2).sum()) == pytest.approx(m2, rel=1e-12)
    b = alpha if beta is None else beta
    assert m1 == pytest.approx(2 * alpha * b / ((alpha + b) * (alpha + b + 1)), rel=1e-14)


# ---------------------------------------------------------------------------- exact mixup loss
@pytest.mark.parametrize("alpha,beta", ALPHAS)
def test_quadrature_matches_monte_carlo(moons, alpha, beta):
    model = T.MLP(2, width=8, depth=1, seed=0)
    with torch.no_grad():  # a moderately confident model, so the loss varies across pairs
        model.net[0].weight.mul_(3.0)
    exact = T.mixup_loss_exact(model, moons.x, moons.y, alpha, beta)
    mean, se = T.mixup_loss_mc(model, moons.x, moons.y, alpha, beta, samples=40_000, seed=1)
    assert se > 0 and abs(exact - mean) < 4 * se


@pytest.mark.parametrize("alpha,beta", ALPHAS)
def test_label_mixing_identity(moons, alpha, beta):
    """Mixed labels under Beta(alpha, beta) == unmixed labels under D~ (l is linear in y)."""
    x, y = moons.x[:8], moons.y[:8]
    model = T.MLP(2, width=8, depth=2, seed=1)
    definition = T.mixup_loss_definition(model, x, y, alpha, beta)
    exact = T.mixup_loss_exact(model, x, y, alpha, beta)
    assert exact == pytest.approx(definition, abs=1e-11)
    assert T.mixup_loss_exact(model, x, y, alpha, beta, order=96) == pytest.approx(exact, abs=1e-11)


# ---------------------------------------------------------------------------- approximation
def test_logistic_closed_form_matches_autograd(moons):
    theta = torch.tensor([1.5, -2.0], dtype=torch.float64)
    for alpha, beta in ALPHAS:
        a = T.approx_mixup_loss_logistic(theta, moons.x, moons.y, alpha, beta)
        b = T.approx_mixup_loss(T.LogisticRegression(2, theta), moons.x, moons.y, alpha, beta)
        for key in ("std", "r1", "r2", "r3"):
            assert getattr(a, key) == pytest.approx(getattr(b, key), abs=1e-13)
        assert a.r3 == 0.0 and b.r3 == 0.0


def test_approximation_close_at_small_norm_far_at_large(moons):
    """L~_mix tracks the exact loss when |grad f^T (x_j - x_i)| is small, not for a confident model."""
    x, y = moons.x, moons.y
    direction = torch.tensor([0.6, -0.8], dtype=torch.float64)
    for alpha in (0.2, 1.0):
        errors = {}
        for scale in (0.05, 30.0):
            theta = scale * direction
            exact = T.mixup_loss_exact(T.LogisticRegression(2, theta), x, y, alpha)
            terms = T.approx_mixup_loss_logistic(theta, x, y, alpha)
            # relative error of the regulariser (exact - L_std vs R1 + R2 + R3)
            errors[scale] = abs(terms.reg - (exact - terms.std)) / abs(exact - terms.std)
        assert errors[0.05] < 1e-2, errors
        assert errors[30.0] > 0.3, errors


class Quadratic(nn.Module):
    """f(x) = x^T A x / 2 + b^T x + c: its Hessian is A everywhere."""

    def __init__(self, A, b, c=0.1):
        super().__init__()
        self.A, self.b, self.c = A, b, c

    def forward(self, x):
        return 0.5 * ((x @ self.A) * x).sum(1) + x @ self.b + self.c


def test_hvp_r3_quadratic_closed_form_and_zero_for_linear(gauss):
    x, y = gauss.x + 0.3, gauss.y  # not centred: exercises E_r[r - x_i] = xbar - x_i
    g = torch.Generator().manual_seed(0)
    M = torch.randn(5, 5, generator=g, dtype=torch.float64)
    A, b = 0.05 * (M + M.T), 0.3 * torch.randn(5, generator=g, dtype=torch.float64)
    alpha = 0.7
    terms = T.approx_mixup_loss(Quadratic(A, b), x, y, alpha)
    # closed form with the double sum over partners r = x_j, no eigendecomposition
    _, m2 = T.mixing_moments(alpha)
    z = 0.5 * ((x @ A) * x).sum(1) + x @ b + 0.1
    diff = x[None, :, :] - x[:, None, :]                       # (i, j, d): x_j - x_i
    expected_quad = torch.einsum("ijd,de,ije->ij", diff, A, diff).mean(1)
    r3 = m2 / 2 * float(((torch.sigmoid(z) - y) * expected_quad).mean())
    assert terms.r3 == pytest.approx(r3, rel=1e-10, abs=1e-14)
    # R1 and R2 by the same double sum: grad f(x_i) = A x_i + b
    m1, _ = T.mixing_moments(alpha)
    grad = x @ A + b
    p = torch.sigmoid(z)
    proj = torch.einsum("id,ijd->ij", grad, diff)
    assert terms.r1 == pytest.approx(m1 * float(((p - y) * proj.mean(1)).mean()), rel=1e-10)
    assert terms.r2 == pytest.approx(m2 / 2 * float((p * (1 - p) * (proj ** 2).mean(1)).mean()),
                                     rel=1e-10)
    linear = T.approx_mixup_loss(T.LogisticRegression(5, b), x, y, alpha)
    relu = T.approx_mixup_loss(T.MLP(5, 16, 2, act="relu", seed=0), x, y, alpha)
    assert linear.r3 == 0.0 and relu.r3 == 0.0


# ---------------------------------------------------------------------------- robustness
def _pgd_l2_logistic(theta, x, y, eps, steps=50):
    """A tiny l2 PGD maximising the logistic loss of f(x) = theta^T x (no box: toy inputs)."""
    delta = torch.zeros_like(x)
    for _ in range(steps):
        delta.requires_grad_(True)
        loss = T.logistic_loss((x + delta) @ theta, y).sum()
        (grad,) = torch.autograd.grad(loss, delta)
        with torch.no_grad():
            delta = delta + (eps / 4) * grad / grad.norm(dim=1, keepdim=True).clamp_min(1e-30)
            delta = delta * (eps / delta.norm(dim=1, keepdim=True).clamp_min(eps))  # project
    return (x + delta).detach()


@pytest.mark.parametrize("eps", [0.1, 0.5, 2.0])
def test_exact_linear_adversarial_loss_equals_pgd(gauss, eps):
    theta = torch.linspace(-1, 1, 5, dtype=torch.float64) + 0.2
    x_adv = _pgd_l2_logistic(theta, gauss.x, gauss.y, eps)
    pgd_loss = float(T.logistic_loss(x_adv @ theta, gauss.y).mean())
    assert T.adv_loss_exact_linear(theta, gauss.x, gauss.y, eps) == pytest.approx(pgd_loss, rel=1e-9)
    # the second-order loss is its Taylor expansion in eps: agrees to O(eps^3)
    approx = T.adv_loss_second_order_logistic(theta, gauss.x, gauss.y, eps)
    assert abs(approx - pgd_loss) < 0.2 * eps ** 3 * float(theta.norm()) ** 3


class TwoLogits(nn.Module):
    """Logits (0, theta^T x + b): softmax CE on them is the logistic loss of the linear model."""

    def __init__(self, theta, b):
        super().__init__()
        self.theta, self.b = theta, b

    def forward(self, x):
        z = x @ self.theta + self.b
        return torch.stack([torch.zeros_like(z), z], 1)


def test_exact_linear_adversarial_loss_equals_mixlab_pgd():
    """Same check against mixlab.attacks.pgd (L2, CE) on a 2-logit view of the linear model,
    with inputs inside [0, 1] and eps small enough that the pixel clamp never binds."""
    attacks = pytest.importorskip("mixlab.attacks")
    g = torch.Generator().manual_seed(0)
    n, d, eps = 32, 6, 0.05
    x = 0.3 + 0.4 * torch.rand(n, d, generator=g, dtype=torch.float64)
    theta = torch.randn(d, generator=g, dtype=torch.float64)
    y = (torch.rand(n, generator=g) < 0.5).long()
    b = -float((x @ theta).mean())
    two_logits = TwoLogits(theta, b)
    x_adv = attacks.pgd(two_logits, x, y, eps=eps, step_size=eps / 4, steps=50, norm="L2",
                        loss="ce", random_start=False, bf16=False)
    pgd_loss = float(T.logistic_loss(x_adv @ theta + b, y.double()).mean())
    exact = T.adv_loss_exact_linear(theta, x, y.double(), eps, bias=b)
    assert exact == pytest.approx(pgd_loss, rel=1e-6)


def test_bound_holds_for_random_theta_in_Theta(gauss):
    """L~_mix(theta) >= L~_adv(eps_mix sqrt(d)) for every theta classifying all points correctly."""
    x, y = gauss.x, gauss.y
    fitted = T.LogisticRegression(5)
    T.fit(fitted, x, y, steps=150, lr=0.1)
    base = fitted.theta.detach()
    g = torch.Generator().manual_seed(0)
    checked = 0
    for _ in range(60):
        theta = base / base.norm() + 0.3 * torch.randn(5, generator=g, dtype=torch.float64)
        theta = theta * 10 ** (3 * torch.rand(1, generator=g, dtype=torch.float64) - 1.5)
        if not T.in_theta(x @ theta, y):
            continue
        for alpha, beta in ALPHAS:
            out = T.robustness_bound(None, x, y, alpha, beta, theta=theta)
            assert out["in_theta"] and out["centred"]
            assert T.norm_condition(x, out["c_x"])
            assert out["eps_l2"] == pytest.approx(out["R"] * out["c_x"] * math.sqrt(5)
                                                  * T.mixing_moments(alpha, beta)[0])
            assert out["holds"], out
        checked += 1
    assert checked >= 20


def test_bound_holds_for_bias_free_relu_net(gauss):
    """The network version: a bias-free ReLU net (f = grad f^T x, R3 = 0) labelling the data itself."""
    x = gauss.x
    for seed in range(3):
        net = T.MLP(5, 16, 2, act="relu", bias=False, seed=seed)
        with torch.no_grad():
            y = (net(x) > 0).double()
        if y.min() == y.max():
            continue
        out = T.robustness_bound(net, x, y, 1.0)
        assert out["in_theta"] and out["homogeneous"] and out["r3"] == 0.0
        assert out["holds"], out
