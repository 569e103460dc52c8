"""Mixup theory: the Taylor view of the mixup loss and the adversarial bound it implies.

Paper: Zhang, Deng, Kawaguchi, Ghorbani, Zou, "How Does Mixup Help With Robustness and
Generalization?", ICLR 2021, arXiv 2010.04819. No official code.

Source of the statements: docs/mixup_theory.md, mixlab's derivation of the paper's results in
the paper's setting, each checked numerically (tests/test_theory.py and the notebook). Equation
numbers are not quoted; the exact conditions of each theorem are the paper's, and where the two
disagree the paper is right.

Setting (binary classification, labels y in {0, 1}). A model f maps inputs x of shape (n, d) to
logits f(x) of shape (n,), and the loss is

    l(theta, x, y) = h(f(x)) - y * f(x),      h(z) = log(1 + e^z)

i.e. binary cross-entropy on logits; h' = sigmoid, h'' = sigmoid * (1 - sigmoid). Mixup draws
lam ~ Beta(alpha, beta), a partner j uniform over the n training points, and trains on
x~ = lam x_i + (1 - lam) x_j with label y~ = lam y_i + (1 - lam) y_j.

What is here
- data:            make_moons, make_gaussian_mixture (seeded, centred, float64)
- the mixing law:  mixing_moments, mixing_quadrature, beta_quadrature  (D~ below)
- exact loss:      mixup_loss_exact (Gauss-Jacobi over D~, all n^2 pairs),
                   mixup_loss_definition (Beta(alpha, beta), mixed labels), mixup_loss_mc
- approximation:   approx_mixup_loss (autograd + batched Hessian-vector products),
                   approx_mixup_loss_logistic (closed form)
- robustness:      adv_loss_second_order(_logistic), adv_loss_exact_linear, eps_mix,
                   in_theta, norm_condition, homogeneity_gap, robustness_bound
- toy models:      LogisticRegression, MLP, fit, accuracy, track_mixup_losses, decision_grid

Conventions. Work in float64: the generators return float64 CPU tensors and the toy models are
built in float64, because the quantities compared (remainders of a Taylor expansion) are small
differences of O(1) numbers. Models must treat samples independently (eval mode, no batch norm
in training mode): input gradients and Hessian-vector products are taken of f(x).sum(), which
gives the per-sample derivatives only in that case. Nothing here touches a device at import;
tensors stay on the device of ``x``.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import NamedTuple, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy.special import roots_jacobi
from torch import nn

__all__ = [
    "ToyData", "make_moons", "make_gaussian_mixture",
    "mixing_moments", "beta_quadrature", "mixing_quadrature",
    "logistic_loss", "standard_loss",
    "mixup_loss_exact", "mixup_loss_definition", "mixup_loss_mc",
    "MixupTerms", "approx_mixup_loss", "approx_mixup_loss_logistic", "input_gradients",
    "adv_loss_second_order", "adv_loss_second_order_logistic", "adv_loss_exact_linear",
    "EpsMix", "eps_mix", "in_theta", "norm_condition", "homogeneity_gap", "robustness_bound",
    "LogisticRegression", "MLP", "fit", "accuracy", "track_mixup_losses", "decision_grid",
]

# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


class ToyData(NamedTuple):
    """A toy split. x: (n, d) float64, y: (n,) float64 in {0, 1}; test tensors likewise
    (empty when n_test = 0). Both are shifted by the *training* mean, so the training inputs
    are exactly centred (sum_i x_i = 0), as the robustness theorem assumes."""

    x: torch.Tensor
    y: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def _split_and_centre(x: np.ndarray, y: np.ndarray, n: int, centre: bool) -> ToyData:
    if centre:
        x = x - x[:n].mean(0)
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float64))  # noqa: E731
    return ToyData(t(x[:n]), t(y[:n]), t(x[n:]), t(y[n:]))


def make_moons(n: int = 200, *, noise: float = 0.1, seed: int = 0, n_test: int = 0,
               centre: bool = True) -> ToyData:
    """Two interleaving half circles (the geometry of sklearn's ``make_moons``), seeded.

    Class 0 lies on (cos t, sin t), class 1 on (1 - cos t, 1/2 - sin t), t in [0, pi], plus
    isotropic Gaussian noise of standard deviation ``noise`` (input units). Train and test points
    are drawn together, shuffled, split, and shifted by the training mean.

    >>> data = make_moons(128, noise=0.1, seed=0, n_test=1000)
    >>> data.x.shape, float(data.x.mean(0).abs().max()) < 1e-12
    (torch.Size([128, 2]), True)
    """
    rng = np.random.default_rng(seed)
    total = n + n_test
    n0 = total // 2
    t0 = np.linspace(0.0, math.pi, n0)
    t1 = np.linspace(0.0, math.pi, total - n0)
    x = np.concatenate([np.stack([np.cos(t0), np.sin(t0)], 1),
                        np.stack([1.0 - np.cos(t1), 0.5 - np.sin(t1)], 1)])
    y = np.concatenate([np.zeros(n0), np.ones(total - n0)])
    x = x + noise * rng.standard_normal(x.shape)
    perm = rng.permutation(total)
    return _split_and_centre(x[perm], y[perm], n, centre)


def make_gaussian_mixture(n: int = 100, d: int = 10, *, sep: float = 4.0, sigma: float = 1.0,
                          margin: float = 0.5, seed: int = 0, n_test: int = 0,
                          centre: bool = True) -> ToyData:
    """A linearly separable, balanced two-Gaussian mixture, seeded and centred.

    Class y has mean (2y - 1) * (sep / 2) * u for a random unit vector u, covariance sigma^2 I,
    conditioned (by rejection) on the margin (2y - 1) u^T x >= margin, so the hyperplane u^T x = 0
    separates the classes with room to spare after centring (the shift is O(sigma / sqrt(n))).
    Used for the logistic-regression robustness theorem, which needs theta classifying every
    training point correctly.
    """
    rng = np.random.default_rng(seed)
    u = rng.standard_normal(d)
    u /= np.linalg.norm(u)
    total = n + n_test
    y = (np.arange(total) % 2).astype(np.float64)  # balanced, so centring barely moves points
    s = 2.0 * y - 1.0
    x = np.empty((total, d))
    todo = np.arange(total)
    while todo.size:  # rejection: redraw the points that violate the margin
        x[todo] = s[todo, None] * (sep / 2) * u + sigma * rng.standard_normal((todo.size, d))
        todo = todo[s[todo] * (x[todo] @ u) < margin]
    perm = rng.permutation(total)
    data = _split_and_centre(x[perm], y[perm], n, centre)
    m = (2 * data.y - 1) * (data.x @ torch.from_numpy(u))
    if not bool((m > 0).all()):
        raise ValueError("centring broke separability: raise `margin` or `n`")
    return data


# --------------------------------------------------------------------------------------------
# The mixing law D~
# --------------------------------------------------------------------------------------------


def _beta(alpha: float, beta: float | None) -> float:
    return float(alpha if beta is None else beta)


def mixing_moments(alpha: float, beta: float | None = None) -> tuple[float, float]:
    """(E[1 - lam], E[(1 - lam)^2]) under D~ (docs/mixup_theory.md, step 1).

    D~ = alpha/(alpha+beta) Beta(alpha+1, beta) + beta/(alpha+beta) Beta(beta+1, alpha)
    (alpha = beta: Beta(alpha+1, alpha)). E_D~[1 - lam] = 2 alpha beta / ((alpha+beta)(alpha+beta+1))
    = alpha / (2 alpha + 1) when alpha = beta. Both moments are Theta(alpha) as alpha -> 0.
    """
    a, b = float(alpha), _beta(alpha, beta)
    m1 = m2 = 0.0
    for w, p, q in ((a / (a + b), a + 1, b), (b / (a + b), b + 1, a)):
        m1 += w * q / (p + q)                                # E[1 - lam] under Beta(p, q)
        m2 += w * q * (q + 1) / ((p + q) * (p + q + 1))      # E[(1 - lam)^2] under Beta(p, q)
    return m1, m2


def beta_quadrature(p: float, q: float, order: int = 48) -> tuple[torch.Tensor, torch.Tensor]:
    """Gauss-Jacobi rule for E_{lam ~ Beta(p, q)}[g(lam)] ~= sum_k w_k g(lam_k).

    With lam = (1 + t)/2 the Beta(p, q) density is proportional to (1 - t)^(q-1) (1 + t)^(p-1),
    the Jacobi weight with a = q - 1, b = p - 1 (scipy.special.roots_jacobi); normalising the
    weights to sum 1 removes the constant. Exact for polynomials of degree <= 2*order - 1 and
    exponentially convergent for analytic g, including the integrable end-point singularities
    of p, q < 1. Returns float64 tensors lam (order,) and w (order,).
    """
    t, w = roots_jacobi(int(order), float(q) - 1.0, float(p) - 1.0)
    return torch.from_numpy((1.0 + t) / 2.0), torch.from_numpy(w / w.sum())


def mixing_quadrature(alpha: float, beta: float | None = None,
                      order: int = 48) -> tuple[torch.Tensor, torch.Tensor]:
    """Quadrature nodes/weights for lam ~ D~ (the label-mixing law; see ``mixing_moments``)."""
    a, b = float(alpha), _beta(alpha, beta)
    if a == b:
        return beta_quadrature(a + 1, a, order)
    lam1, w1 = beta_quadrature(a + 1, b, order)
    lam2, w2 = beta_quadrature(b + 1, a, order)
    return torch.cat([lam1, lam2]), torch.cat([w1 * a / (a + b), w2 * b / (a + b)])


# --------------------------------------------------------------------------------------------
# Losses: standard and exact mixup
# --------------------------------------------------------------------------------------------


def logistic_loss(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """l = h(z) - y z with h = softplus, elementwise (y may be a mixed label in [0, 1])."""
    return F.softplus(z) - y * z


def standard_loss(model, x: torch.Tensor, y: torch.Tensor) -> float:
    """L_std = (1/n) sum_i l(theta, x_i, y_i)."""
    with torch.no_grad():
        return float(logistic_loss(model(x), y).mean())


def _pair_sum(model, x: torch.Tensor, y: torch.Tensor, lam: torch.Tensor, w: torch.Tensor,
              mixed_labels: bool, chunk_rows: int) -> float:
    """(1/n^2) sum_ij sum_k w_k l(theta, lam_k x_i + (1 - lam_k) x_j, label), all pairs.

    label = y_i (unmixed, used with D~) or lam_k y_i + (1 - lam_k) y_j (mixed, the definition).
    Rows i are processed in chunks so that one forward pass sees about ``chunk_rows`` inputs.
    """
    n, d = x.shape
    lam, w = lam.to(x), w.to(x)
    k = lam.numel()
    step = max(1, chunk_rows // (n * k))
    lam4 = lam.view(1, 1, k, 1)
    total = 0.0
    with torch.no_grad():
        for start in range(0, n, step):
            xi = x[start:start + step, None, None, :]                  # (c, 1, 1, d)
            xt = lam4 * xi + (1 - lam4) * x[None, :, None, :]          # (c, n, k, d)
            z = model(xt.reshape(-1, d)).reshape(-1, n, k)
            yi = y[start:start + step, None, None]
            target = lam * yi + (1 - lam) * y[None, :, None] if mixed_labels else yi
            total += float((logistic_loss(z, target) * w).sum())
    return total / n ** 2


def mixup_loss_exact(model, x: torch.Tensor, y: torch.Tensor, alpha: float,
                     beta: float | None = None, *, order: int = 48,
                     chunk_rows: int = 1 << 16) -> float:
    """Exact mixup loss by Gauss-Jacobi quadrature over D~ on all n^2 pairs.

    L_mix = (1/n^2) sum_ij E_{lam ~ D~} l(theta, lam x_i + (1 - lam) x_j, y_i)
    (docs/mixup_theory.md, step 1: l is linear in y, so mixing the labels is the same as
    keeping y_i and reweighting lam by lam, which turns Beta(alpha, beta) into D~).
    "Exact" up to the quadrature error, which is negligible for analytic l at the default order
    (compare ``order`` and ``2 * order`` to see it). Cost: n^2 * order model evaluations.
    """
    lam, w = mixing_quadrature(alpha, beta, order)
    return _pair_sum(model, x, y, lam, w, mixed_labels=False, chunk_rows=chunk_rows)


def mixup_loss_definition(model, x: torch.Tensor, y: torch.Tensor, alpha: float,
                          beta: float | None = None, *, order: int = 48,
                          chunk_rows: int = 1 << 16) -> float:
    """The mixup loss as defined (Zhang et al. 2018, arXiv 1710.09412): mixed inputs *and* labels.

    L_mix = (1/n^2) sum_ij E_{lam ~ Beta(alpha, beta)} l(theta, x~_ij, y~_ij), with
    x~_ij = lam x_i + (1-lam) x_j and y~_ij = lam y_i + (1-lam) y_j, by Gauss-Jacobi quadrature on
    all pairs. Equal to ``mixup_loss_exact`` (the label-mixing
    identity); kept separate so that the identity can be checked.
    """
    lam, w = beta_quadrature(float(alpha), _beta(alpha, beta), order)
    return _pair_sum(model, x, y, lam, w, mixed_labels=True, chunk_rows=chunk_rows)


def mixup_loss_mc(model, x: torch.Tensor, y: torch.Tensor, alpha: float,
                  beta: float | None = None, *, samples: int = 20_000, seed: int = 0,
                  batch: int = 1 << 15) -> tuple[float, float]:
    """Monte Carlo estimate of the mixup loss as defined, with its standard error.

    Draws i, j uniform over the n points and lam ~ Beta(alpha, beta) independently, evaluates
    l(theta, lam x_i + (1-lam) x_j, lam y_i + (1-lam) y_j) and returns (mean, std / sqrt(samples)).
    """
    rng = np.random.default_rng(seed)
    n = x.shape[0]
    i = torch.from_numpy(rng.integers(n, size=samples)).to(x.device)
    j = torch.from_numpy(rng.integers(n, size=samples)).to(x.device)
    lam = torch.from_numpy(rng.beta(float(alpha), _beta(alpha, beta), size=samples)).to(x)
    losses = []
    with torch.no_grad():
        for s in range(0, samples, batch):
            ii, jj, ll = i[s:s + batch], j[s:s + batch], lam[s:s + batch]
            xt = ll[:, None] * x[ii] + (1 - ll[:, None]) * x[jj]
            yt = ll * y[ii] + (1 - ll) * y[jj]
            losses.append(logistic_loss(model(xt), yt))
    losses = torch.cat(losses)
    return float(losses.mean()), float(losses.std() / math.sqrt(samples))


# --------------------------------------------------------------------------------------------
# The approximate mixup loss (second-order expansion around the unshifted point x_i)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MixupTerms:
    """L~_mix = std + r1 + r2 + r3 (docs/mixup_theory.md, step 2)."""

    std: float
    r1: float
    r2: float
    r3: float

    @property
    def reg(self) -> float:
        """The regulariser R1 + R2 + R3 = L~_mix - L_std."""
        return self.r1 + self.r2 + self.r3

    @property
    def total(self) -> float:
        """The approximate mixup loss L~_mix."""
        return self.std + self.reg


def input_gradients(model, x: torch.Tensor, *, create_graph: bool = False):
    """Logits f(x) (n,) and input gradients grad_x f(x_i) (n, d), per sample.

    Taken as the gradient of f(x).sum(), which is per-sample only if the model treats samples
    independently (eval mode). With ``create_graph`` the returned x (a leaf requiring grad) and
    gradients can be differentiated again (Hessian-vector products); returns (z, g, x_leaf).
    """
    xl = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        z = model(xl)
        (g,) = torch.autograd.grad(z.sum(), xl, create_graph=create_graph)
    return z.detach(), g, xl


def _hvp_quadratic(g: torch.Tensor, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Row-wise v_i^T Hess f(x_i) v_i from a batched Hessian-vector product; v: (n, d) or (d,)."""
    if not g.requires_grad:  # f is linear in x (e.g. logistic regression): the Hessian is 0
        return torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
    with torch.enable_grad():
        (hv,) = torch.autograd.grad((g * v).sum(), x, retain_graph=True, allow_unused=True)
    if hv is None:
        return torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
    return (hv * v).sum(1)


def approx_mixup_loss(model, x: torch.Tensor, y: torch.Tensor, alpha: float,
                      beta: float | None = None) -> MixupTerms:
    """Approximate mixup loss L~_mix = L_std + R1 + R2 + R3 of any differentiable model (autograd).

    Second-order Taylor expansion in (1 - lam) of l(theta, x_i + (1 - lam)(r - x_i), y_i) around
    the unshifted point x_i (docs/mixup_theory.md, step 2; r ~ training inputs, moments of
    1 - lam under D~, grad/Hess with respect to the input):
      R1 = E[1-lam]/n       sum_i (h'(f_i) - y_i) grad f(x_i)^T E_r[r - x_i]
      R2 = E[(1-lam)^2]/(2n) sum_i h''(f_i) grad f(x_i)^T E_r[(r - x_i)(r - x_i)^T] grad f(x_i)
      R3 = E[(1-lam)^2]/(2n) sum_i (h'(f_i) - y_i) E_r[(r - x_i)^T Hess f(x_i) (r - x_i)]
    with E_r[r - x_i] = xbar - x_i and E_r[(r - x_i)(r - x_i)^T] = Sigma + (xbar - x_i)(xbar - x_i)^T,
    Sigma the (1/n) covariance of the training inputs. The standard loss is evaluated at the
    unshifted x_i; the shift towards the partners is carried by R1.

    R3 uses batched Hessian-vector products: E_r[...] = tr(Hess_i Sigma) + delta_i^T Hess_i delta_i,
    and tr(Hess_i Sigma) = sum_k s_k u_k^T Hess_i u_k over the eigenpairs (s_k, u_k) of Sigma, so
    d + 1 backward passes serve all n points. R3 = 0 for linear f and for ReLU/max-pool nets.
    Units: all terms are losses (nats per example).
    """
    m1, m2 = mixing_moments(alpha, beta)
    z, g, xl = input_gradients(model, x, create_graph=True)
    xd = x.detach()
    p = torch.sigmoid(z)
    resid, curv = p - y, p * (1 - p)                       # h'(f) - y and h''(f)
    delta = xd.mean(0) - xd                                # E_r[r - x_i], (n, d)
    xc = xd - xd.mean(0)
    cov = xc.T @ xc / xd.shape[0]                          # Sigma, (d, d)
    gd = g.detach()
    proj = (gd * delta).sum(1)                             # grad f_i^T E_r[r - x_i]
    quad = ((gd @ cov) * gd).sum(1) + proj ** 2            # grad f_i^T E_r[(r-x_i)(r-x_i)^T] grad f_i
    s, u = torch.linalg.eigh(cov)
    hess = _hvp_quadratic(g, xl, delta)                    # delta_i^T Hess_i delta_i
    for k in range(u.shape[1]):
        hess = hess + s[k] * _hvp_quadratic(g, xl, u[:, k])
    return MixupTerms(std=float(logistic_loss(z, y).mean()),
                      r1=float(m1 * (resid * proj).mean()),
                      r2=float(m2 / 2 * (curv * quad).mean()),
                      r3=float(m2 / 2 * (resid * hess).mean()))


def approx_mixup_loss_logistic(theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
                               alpha: float, beta: float | None = None) -> MixupTerms:
    """Closed form of ``approx_mixup_loss`` for logistic regression f(x) = theta^T x.

    grad f = theta and Hess f = 0, so with z_i = theta^T x_i, p_i = sigmoid(z_i):
      R1 = E[1-lam]/n sum_i (p_i - y_i) theta^T (xbar - x_i)
      R2 = E[(1-lam)^2]/(2n) sum_i p_i (1 - p_i) (theta^T Sigma theta + (theta^T (xbar - x_i))^2)
      R3 = 0.
    For centred data R2's leading part is a ridge penalty with Sigma in place of I: the
    data-adaptive regularisation of the paper's generalisation section.
    """
    m1, m2 = mixing_moments(alpha, beta)
    theta = theta.detach().to(x)
    z = x @ theta
    p = torch.sigmoid(z)
    xc = x - x.mean(0)
    proj = (x.mean(0) - x) @ theta
    spread = theta @ (xc.T @ xc / x.shape[0]) @ theta     # theta^T Sigma theta
    return MixupTerms(std=float(logistic_loss(z, y).mean()),
                      r1=float(m1 * ((p - y) * proj).mean()),
                      r2=float(m2 / 2 * (p * (1 - p) * (spread + proj ** 2)).mean()),
                      r3=0.0)


# --------------------------------------------------------------------------------------------
# Robustness: second-order and exact adversarial losses, eps_mix, the conditions
# --------------------------------------------------------------------------------------------


def _second_order_adv(std: torch.Tensor, resid: torch.Tensor, curv: torch.Tensor,
                      gnorm: torch.Tensor, eps):
    e = np.asarray(eps, dtype=np.float64)
    a = float(std.mean())
    b = float((resid.abs() * gnorm).mean())
    c = float((curv * gnorm ** 2).mean())
    out = a + e * b + e ** 2 / 2 * c
    return float(out) if out.ndim == 0 else out


def adv_loss_second_order(model, x: torch.Tensor, y: torch.Tensor, eps):
    """Second-order adversarial loss for the l2 ball of radius eps (docs/mixup_theory.md,
    robustness):

    L~_adv(eps) = L_std + eps/n sum_i |h'(f_i) - y_i| ||grad f(x_i)||_2
                        + eps^2/(2n) sum_i h''(f_i) ||grad f(x_i)||_2^2.
    eps: a float (returns a float) or an array of radii in input units (returns an array).
    """
    z, g, _ = input_gradients(model, x)
    p = torch.sigmoid(z)
    return _second_order_adv(logistic_loss(z, y), p - y, p * (1 - p), g.norm(dim=1), eps)


def adv_loss_second_order_logistic(theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor, eps):
    """Closed form of ``adv_loss_second_order`` for f(x) = theta^T x (grad f = theta)."""
    theta = theta.detach().to(x)
    z = x @ theta
    p = torch.sigmoid(z)
    gnorm = theta.norm().expand_as(z)
    return _second_order_adv(logistic_loss(z, y), p - y, p * (1 - p), gnorm, eps)


def adv_loss_exact_linear(theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor, eps,
                          bias: float = 0.0):
    """Exact l2 adversarial loss of a linear model f(x) = theta^T x + bias:

    (1/n) sum_i max_{||delta||_2 <= eps} l(theta, x_i + delta, y_i)
        = (1/n) sum_i softplus(-m_i + eps ||theta||_2)
    with margin m_i = (2 y_i - 1) f(x_i): the worst delta is -eps (2y_i - 1) theta / ||theta||.
    No box constraint (toy inputs are not pixels). It can slightly exceed L~_adv(eps)
    (docs/mixup_theory.md, robustness). eps: float or array, as in ``adv_loss_second_order``.
    """
    theta = theta.detach().to(x)
    m = ((2 * y - 1) * (x @ theta + bias)).cpu().numpy()
    e = np.asarray(eps, dtype=np.float64)
    out = np.logaddexp(0.0, -m + e[..., None] * float(theta.norm())).mean(-1)  # softplus
    return float(out) if out.ndim == 0 else out


@dataclass(frozen=True)
class EpsMix:
    """eps_mix = R * c_x * E_D~[1 - lam]; ``eps_l2`` = eps_mix * sqrt(d), the l2 radius of the bound."""

    eps: float
    R: float      # min_i |cos(direction_i, x_i)|
    c_x: float    # min_i ||x_i||_2 / sqrt(d): the largest c_x meeting the norm condition
    m1: float     # E_D~[1 - lam]
    d: int

    @property
    def eps_l2(self) -> float:
        return self.eps * math.sqrt(self.d)


def eps_mix(direction: torch.Tensor, x: torch.Tensor, alpha: float,
            beta: float | None = None) -> EpsMix:
    """eps_mix = R c_x E_D~[1 - lam] (docs/mixup_theory.md, the logistic-regression theorem).

    direction: theta (d,) for logistic regression, R = min_i |cos(theta, x_i)|; or the per-point
    input gradients grad f(x_i) (n, d) for the network version, R = min_i |cos(grad f(x_i), x_i)|.
    c_x is taken as min_i ||x_i||_2 / sqrt(d), the largest constant with ||x_i|| >= c_x sqrt(d)
    for every i (a choice: the theorem holds for any smaller c_x too, with a smaller radius).
    """
    direction = direction.detach().to(x)
    dirs = direction.expand_as(x) if direction.ndim == 1 else direction
    norms = dirs.norm(dim=1) * x.norm(dim=1)
    # a zero direction (theta = 0) or input has no angle; R = 0 then, so eps_mix = 0 and the
    # bound reads L_std >= L_std
    cos = torch.where(norms > 0, (dirs * x).sum(1).abs() / norms.clamp_min(1e-300),
                      torch.zeros_like(norms))
    d = x.shape[1]
    c_x = float(x.norm(dim=1).min()) / math.sqrt(d)
    m1, _ = mixing_moments(alpha, beta)
    R = float(cos.min())
    return EpsMix(eps=R * c_x * m1, R=R, c_x=c_x, m1=m1, d=d)


def in_theta(logits: torch.Tensor, y: torch.Tensor) -> bool:
    """theta in Theta: every training point classified correctly, (2 y_i - 1) f(x_i) >= 0 for all i."""
    return bool(((2 * y - 1) * logits >= 0).all())


def norm_condition(x: torch.Tensor, c_x: float, *, rtol: float = 1e-12) -> bool:
    """The theorem's norm condition ||x_i||_2 >= c_x sqrt(d) for every training input."""
    return bool((x.norm(dim=1) >= c_x * math.sqrt(x.shape[1]) * (1 - rtol)).all())


def homogeneity_gap(model, x: torch.Tensor) -> float:
    """max_i |f(x_i) - grad f(x_i)^T x_i|: 0 for bias-free ReLU/max-pool nets, the condition of
    the network version of the theorem (docs/mixup_theory.md: it needs f(x) = grad f(x)^T x; the
    paper's exact conditions take precedence)."""
    z, g, _ = input_gradients(model, x)
    return float((z - (g * x).sum(1)).abs().max())


def robustness_bound(model, x: torch.Tensor, y: torch.Tensor, alpha: float,
                     beta: float | None = None, *, theta: torch.Tensor | None = None) -> dict:
    """Both sides of L~_mix(theta) >= L~_adv(eps_mix sqrt(d)) and the theorem's conditions.

    Logistic regression (pass ``theta``; ``model`` may be None): closed forms. Otherwise the
    network version through autograd, with R from the input gradients. Returns a dict with
    mix = L~_mix, adv = L~_adv(eps_mix sqrt(d)), exact_adv (linear models only), eps_mix, eps_l2,
    R, c_x, in_theta, centred, homogeneous, r3 and ``holds`` (mix >= adv). The inequality is
    guaranteed only when in_theta and centred (and, for networks, homogeneous with r3 = 0).
    """
    if theta is not None:
        terms = approx_mixup_loss_logistic(theta, x, y, alpha, beta)
        em = eps_mix(theta, x, alpha, beta)
        adv = adv_loss_second_order_logistic(theta, x, y, em.eps_l2)
        exact = adv_loss_exact_linear(theta, x, y, em.eps_l2)
        logits, homog = x @ theta.detach().to(x), 0.0
    else:
        terms = approx_mixup_loss(model, x, y, alpha, beta)
        logits, g, _ = input_gradients(model, x)
        em = eps_mix(g, x, alpha, beta)
        adv = adv_loss_second_order(model, x, y, em.eps_l2)
        exact, homog = None, homogeneity_gap(model, x)
    scale = float(x.norm(dim=1).max())
    return dict(mix=terms.total, adv=adv, exact_adv=exact, eps_mix=em.eps, eps_l2=em.eps_l2,
                R=em.R, c_x=em.c_x, in_theta=in_theta(logits, y),
                centred=float(x.mean(0).norm()) <= 1e-10 * max(scale, 1.0),
                homogeneous=homog <= 1e-8 * max(scale, 1.0), r3=terms.r3,
                holds=terms.total >= adv - 1e-12)


# --------------------------------------------------------------------------------------------
# Toy models and full-batch training for the theory figures
# --------------------------------------------------------------------------------------------


class LogisticRegression(nn.Module):
    """f_theta(x) = theta^T x, (n, d) -> (n,) logits, float64. No bias: the theorem's model on
    centred data. ``theta`` starts at zero unless given."""

    def __init__(self, d: int, theta: torch.Tensor | None = None):
        super().__init__()
        init = torch.zeros(d, dtype=torch.float64) if theta is None else theta.detach().clone()
        self.theta = nn.Parameter(init.to(torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.theta


class MLP(nn.Module):
    """A small fully connected net, (n, d) -> (n,) logits, float64, seeded without touching the
    global RNG. act = "tanh" (smooth: R3 != 0) or "relu" (R3 = 0; with bias=False it is
    positively homogeneous, f(x) = grad f(x)^T x, the network version of the theorem)."""

    def __init__(self, d: int, width: int = 32, depth: int = 2, act: str = "tanh",
                 bias: bool = True, seed: int = 0):
        super().__init__()
        acts = {"tanh": nn.Tanh, "relu": nn.ReLU}
        dims = [d] + [width] * depth
        layers: list[nn.Module] = []
        with torch.random.fork_rng(devices=[]):  # seeded init, global RNG state restored after
            torch.manual_seed(seed)
            for a, b in zip(dims[:-1], dims[1:]):
                layers += [nn.Linear(a, b, bias=bias), acts[act]()]
            layers.append(nn.Linear(dims[-1], 1, bias=bias))
        self.net = nn.Sequential(*layers).double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(-1)


def fit(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, method: str = "erm",
        alpha: float = 1.0, steps: int = 300, lr: float = 0.05, weight_decay: float = 0.0,
        seed: int = 0, snapshots: Sequence[int] = ()) -> list[tuple[int, dict]]:
    """Train a toy binary model in place by full-batch Adam; return [(step, state_dict), ...].

    method="erm": the standard loss. method="mixup": at each step one Monte Carlo draw of the
    mixup loss as defined, with a partner j uniform over the n points and lam ~ Beta(alpha, alpha)
    per example (an unbiased estimate of the same expected loss as one lam per batch, with less
    variance). Snapshots are deep copies taken *before* the update of the listed steps (step 0 =
    initialisation, step ``steps`` = the final model). This is a toy optimiser for the
    two-dimensional theory figures, not the image training engine (mixlab.train).
    """
    if method not in ("erm", "mixup"):
        raise ValueError(f"method must be 'erm' or 'mixup', got {method!r}")
    rng = np.random.default_rng(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    want, out = set(int(s) for s in snapshots), []
    n = x.shape[0]
    for step in range(steps + 1):
        if step in want:
            out.append((step, copy.deepcopy(model.state_dict())))
        if step == steps:
            break
        xt, yt = x, y
        if method == "mixup":
            lam = torch.from_numpy(rng.beta(alpha, alpha, size=n)).to(x)
            j = torch.from_numpy(rng.integers(n, size=n)).to(x.device)
            xt = lam[:, None] * x + (1 - lam[:, None]) * x[j]
            yt = lam * y + (1 - lam) * y[j]
        loss = logistic_loss(model(xt), yt).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return out


def accuracy(model, x: torch.Tensor, y: torch.Tensor) -> float:
    """Fraction of points with sign(f(x)) matching y in {0, 1}."""
    with torch.no_grad():
        return float(((model(x) > 0).to(y.dtype) == y).to(torch.float64).mean())


def track_mixup_losses(model: nn.Module, snapshots: Sequence[tuple[int, dict]], x: torch.Tensor,
                       y: torch.Tensor, alpha: float, beta: float | None = None, *,
                       order: int = 48) -> list[dict]:
    """Exact vs approximate mixup loss at each snapshot of ``fit`` (loads each into ``model``).

    Each row: step, exact (quadrature), approx (L~_mix), std, r1, r2, r3, reg_exact = exact - std,
    reg_approx = r1 + r2 + r3, and spread = sqrt(mean_i grad f_i^T E_r[(r-x_i)(r-x_i)^T] grad f_i),
    the typical |grad f(x_i)^T (x_j - x_i)| that decides whether the expansion holds.
    The model is left holding the last snapshot.
    """
    rows = []
    xc = x - x.mean(0)
    for step, state in snapshots:
        model.load_state_dict(state)
        terms = approx_mixup_loss(model, x, y, alpha, beta)
        exact = mixup_loss_exact(model, x, y, alpha, beta, order=order)
        _, g, _ = input_gradients(model, x)
        spread = ((g @ (xc.T @ xc / x.shape[0])) * g).sum(1) + ((g * xc).sum(1)) ** 2
        rows.append(dict(step=step, exact=exact, approx=terms.total, std=terms.std, r1=terms.r1,
                         r2=terms.r2, r3=terms.r3, reg_exact=exact - terms.std,
                         reg_approx=terms.reg, spread=float(spread.mean().sqrt())))
    return rows


def decision_grid(model, x: torch.Tensor, *, steps: int = 200, pad: float = 0.5):
    """sigmoid(f) on a steps x steps grid covering the 2-D inputs x plus ``pad``: (xx, yy, prob)
    numpy arrays for contour plots of decision boundaries."""
    lo = (x.min(0).values - pad).tolist()
    hi = (x.max(0).values + pad).tolist()
    gx = torch.linspace(lo[0], hi[0], steps, dtype=x.dtype, device=x.device)
    gy = torch.linspace(lo[1], hi[1], steps, dtype=x.dtype, device=x.device)
    xx, yy = torch.meshgrid(gx, gy, indexing="xy")
    with torch.no_grad():
        prob = torch.sigmoid(model(torch.stack([xx.reshape(-1), yy.reshape(-1)], 1)))
    return xx.cpu().numpy(), yy.cpu().numpy(), prob.reshape(steps, steps).cpu().numpy()
