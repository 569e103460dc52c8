"""Adversarial attacks as pure functions (FGSM, PGD with CE / CW / SLM losses, Linf and L2).

Contract (as in RobustBench / AutoAttack): ``model`` maps NCHW pixels in [0, 1] to logits;
normalisation is the model's first layer, so every ``eps`` and step size is in pixel units
(``8/255`` for CIFAR Linf). Every attack

* puts the model in eval mode while it runs (BatchNorm statistics never see attack inputs)
  and restores the previous mode afterwards;
* runs the module inside ``DistributedDataParallel`` (:func:`unwrap`), never the wrapper, so
  under torchrun its passes stay out of the gradient reducer (docs/distributed.md);
* takes gradients w.r.t. the perturbation only (``torch.autograd.grad``), so ``param.grad``
  is never touched;
* returns points inside the eps-ball around ``x`` *and* inside the box [0, 1];
* accepts ``eps`` (and ``step_size``) as a float or a per-example tensor of shape (B,) (MMA needs
  one radius per example);
* runs without per-example Python loops or host synchronisation, so it can sit inside a
  training step;
* checks its arguments at the boundary and raises one ``TypeError`` / ``ValueError`` that
  names the bad value and the fix (see "Input checks" below).

Input checks. What costs nothing on any device is always checked: x is a float tensor with a
batch dimension (2-D or more, (B, C, H, W) for images); y is a 1-D int64 tensor with
``len(y) == len(x)`` on x's device; ``eps`` and ``step_size`` given as Python numbers are finite
and > 0 (a Linf ``eps`` is at most 1), given as tensors are 0-d or (B,); ``steps`` and
``restarts`` are ints >= 1; ``norm`` is in ``NORMS`` and ``loss`` in ``LOSSES`` (or a callable).
What needs the tensors' *values* (x within [0, 1], labels in [0, num_classes), per-example
radii finite and >= 0) is checked only when x is on the CPU, where reading a value is free,
and not inside :func:`mixlab.sync.no_host_sync`, which stands for a GPU training step on the
CPU. On a GPU these reads would make the host wait for the device at every training step,
so there they are skipped: check data once where it is loaded, not in the step.

Papers: FGSM, Goodfellow et al. 2015 (arXiv 1412.6572); PGD, Madry et al. 2018
(arXiv 1706.06083); CW margin loss, Carlini & Wagner 2017 (arXiv 1608.04644); the SLM
(soft logit margin) loss of MMA, Ding et al. 2020 (arXiv 1812.02637); GAIRAT's geometry
value kappa, Zhang et al. 2021 (arXiv 2010.01736).

>>> x_adv = pgd(model, x, y, eps=8/255, step_size=2/255, steps=10)           # Madry PGD-10
>>> x_adv, kappa = pgd(model, x, y, eps=8/255, step_size=2/255, steps=10, return_kappa=True)
"""
from __future__ import annotations

import contextlib
import math
import numbers
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from .sync import no_host_sync

NORMS = ("Linf", "L2")
LOSSES = ("ce", "cw", "slm")
#: slack on the [0, 1] pixel range: mixing two images in fp32 (λ·a + (1-λ)·b) can land a
#: rounding error outside it
PIXEL_TOL = 1e-5


# ----------------------------------------------------------------------------- losses
def cw_margin(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """CW margin ``max_{j != y} z_j - z_y`` per example, shape (B,). > 0 means misclassified."""
    z_true = logits.gather(1, y[:, None]).squeeze(1)
    z_other = logits.masked_fill(F.one_hot(y, logits.shape[1]).bool(), float("-inf"))
    return z_other.amax(1) - z_true


def slm_margin(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """MMA's soft logit margin ``logsumexp_{j != y} z_j - z_y`` per example, shape (B,)."""
    z_true = logits.gather(1, y[:, None]).squeeze(1)
    z_other = logits.masked_fill(F.one_hot(y, logits.shape[1]).bool(), float("-inf"))
    return torch.logsumexp(z_other, 1) - z_true


def attack_loss(logits: torch.Tensor, y: torch.Tensor, kind: str = "ce") -> torch.Tensor:
    """Per-example loss the attacker *maximises*, shape (B,), computed in fp32."""
    logits = logits.float()
    if kind == "ce":
        return F.cross_entropy(logits, y, reduction="none")
    if kind == "cw":
        return cw_margin(logits, y)
    if kind == "slm":
        return slm_margin(logits, y)
    raise ValueError(f"unknown attack loss {kind!r}; choose one of {LOSSES}")


# ----------------------------------------------------------------------------- helpers
def is_number(v) -> bool:
    """A Python / numpy real number (not a bool, not a tensor)."""
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _host_sync_guarded() -> bool:
    """True inside :func:`mixlab.sync.no_host_sync`: the code is standing in for a GPU step, so
    checks that read tensor values are skipped, as they are on a GPU."""
    try:
        stack = torch.overrides._get_current_function_mode_stack()
    except AttributeError:  # a torch without the helper: assume guarded, skip value checks
        return True
    return any(isinstance(mode, no_host_sync) for mode in stack)


def _values_checkable(t: torch.Tensor) -> bool:
    """Whether reading ``t``'s values is free: on the CPU and outside ``no_host_sync``."""
    return t.device.type == "cpu" and not _host_sync_guarded()


def _check_radius(value, name: str, norm: str, *, positive: bool) -> None:
    """Check one radius-like argument (eps or step_size) in pixel units: a Python number must
    be finite and >= 0 (> 0 when ``positive``), at most 1 for a Linf eps; a tensor's values
    are checked (finite, >= 0) only where that is free (see the module docstring)."""
    if is_number(value):
        v = float(value)
        if not math.isfinite(v):
            example = "eps=8/255" if name == "eps" else "step_size=2/255"
            raise ValueError(f"{name}={value} is not a finite number; give a finite size in "
                             f"pixel units, e.g. {example}")
        if v < 0 or (positive and v == 0):
            bound = "> 0" if positive else ">= 0"
            why = (" (a zero step leaves PGD at its random start: training on it would be "
                   "noise augmentation, not adversarial training)" if name == "step_size"
                   else " (eps=0 leaves x unchanged: use the model's clean predictions)")
            raise ValueError(f"{name} must be {bound}, got {name}={value}"
                             f"{why if v == 0 else ': it is a size in pixel units'}")
        if name == "eps" and norm == "Linf" and v > 1:
            raise ValueError(
                f"Linf eps={value} is outside [0, 1]: mixlab works in pixel space, "
                f"write 8/255 (= {8 / 255:.4f}) rather than 8")
    elif isinstance(value, torch.Tensor):
        if not value.is_floating_point():
            raise TypeError(f"{name} is a {value.dtype} tensor; give a float radius or a float "
                            f"(B,) tensor in pixel units")
        if value.numel() and _values_checkable(value):
            lo, hi = torch.aminmax(value.detach())
            if not (bool(torch.isfinite(value).all()) and float(lo) >= 0):
                raise ValueError(f"per-example {name} must be finite and >= 0, found values "
                                 f"in [{float(lo):.4g}, {float(hi):.4g}]")
    else:
        raise TypeError(f"{name} must be a number (pixel units, e.g. 8/255) or a per-example "
                        f"(B,) tensor, got {type(value).__name__} {value!r}")


def check_eps(eps, norm: str = "Linf", *, positive: bool = False) -> None:
    """Reject radii that cannot be meant: pixel-space Linf eps lives in [0, 1], L2 eps >= 0,
    both finite; ``positive=True`` also rejects eps = 0 (an attack that cannot move).

    Python numbers are always checked; a tensor's values only where that is free (on the CPU,
    outside ``no_host_sync``): checking a device tensor would force a host sync."""
    if norm not in NORMS:
        raise ValueError(f"unknown norm {norm!r}; choose one of {NORMS}")
    _check_radius(eps, "eps", norm, positive=positive)


def _check_count(value, name: str, minimum: int) -> None:
    """An int (not a bool, not a float) >= minimum."""
    if not isinstance(value, numbers.Integral) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int >= {minimum}, got {type(value).__name__} "
                        f"{value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {name}={value}")


def _check_per_example_shape(value, name: str, batch: int) -> None:
    if isinstance(value, torch.Tensor) and value.dim() > 0 and tuple(value.shape) != (batch,):
        raise ValueError(f"per-example {name} must have shape ({batch},) (one value per "
                         f"example) or be 0-d, got shape {tuple(value.shape)}")


def check_label_tensor(x: torch.Tensor, y, *, what: str = "example") -> None:
    """y must be an int64 tensor (N,) of class indices, one per row of x, on x's device
    (shape and dtype only: no host sync)."""
    if not isinstance(y, torch.Tensor):
        raise TypeError(f"y must be a torch.Tensor of int64 labels, got {type(y).__name__}")
    if y.dtype != torch.int64:
        hint = ("hard labels are needed, e.g. y.argmax(1) of one-hot rows"
                if y.is_floating_point() else "pass y.long()")
        raise TypeError(f"y has dtype {y.dtype}; labels must be int64 class indices: {hint}")
    if y.dim() != 1 or len(y) != len(x):
        raise ValueError(f"y has shape {tuple(y.shape)} for x of shape {tuple(x.shape)}; it "
                         f"must be ({len(x)},), one label per {what}")
    if y.device != x.device:
        raise ValueError(f"y is on {y.device} and x on {x.device}; move both to one device")


def check_attack_inputs(x, y, *, eps, step_size=None, steps=None, norm: str = "Linf",
                        loss: str | Callable = "ce") -> None:
    """The boundary checks every attack runs (see the module docstring for which ones read
    values, and where). Raises one ``TypeError`` or ``ValueError`` naming the bad argument.

    x: (B, ...) float tensor, pixels in [0, 1]. y: (B,) int64 labels on x's device.
    eps, step_size: pixel units, numbers > 0 or per-example tensors. steps: int >= 1."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor of pixels in [0, 1], got "
                        f"{type(x).__name__}")
    if not x.is_floating_point():
        hint = (": convert uint8 images with x.float() / 255" if x.dtype == torch.uint8
                else ": convert with x.float()")
        raise TypeError(f"x has dtype {x.dtype}; attacks take float pixels in [0, 1]{hint}")
    if x.dim() not in (2, 4):  # (B, d) points of the toy models or (B, C, H, W) images
        raise ValueError(f"x has shape {tuple(x.shape)}; attacks take a batch of images "
                         f"(B, C, H, W) or of points (B, d) (use x[None] for one image)")
    check_label_tensor(x, y)
    check_eps(eps, norm, positive=True)
    _check_per_example_shape(eps, "eps", len(x))
    if step_size is not None:
        _check_radius(step_size, "step_size", norm, positive=True)
        _check_per_example_shape(step_size, "step_size", len(x))
    if steps is not None:
        _check_count(steps, "steps", 1)
    if not (callable(loss) or loss in LOSSES):
        raise ValueError(f"unknown attack loss {loss!r}; choose one of {LOSSES} or pass a "
                         f"callable (logits, y) -> (B,)")
    if x.numel() and _values_checkable(x):
        lo, hi = (float(v) for v in torch.aminmax(x.detach()))
        if not (lo >= -PIXEL_TOL and hi <= 1 + PIXEL_TOL):  # also catches NaN
            hint = (" (they look like 0-255 pixels: divide by 255)" if hi > 1.5 and lo >= 0
                    else " (normalisation belongs in the model's first layer)")
            raise ValueError(f"x has values in [{lo:.4g}, {hi:.4g}]; attacks take pixels in "
                             f"[0, 1]{hint}")
        if len(y) and int(y.min()) < 0:
            raise ValueError(f"y has a negative label {int(y.min())}; labels are class "
                             f"indices in [0, num_classes)")


def _check_labels_fit(y: torch.Tensor, logits: torch.Tensor) -> None:
    """Labels below the number of classes the model outputs (only where reading is free)."""
    if len(y) and _values_checkable(y):
        top = int(y.max())
        if top >= logits.shape[-1]:
            raise ValueError(f"y has label {top} but the model outputs {logits.shape[-1]} "
                             f"classes; labels must lie in [0, {logits.shape[-1]})")


def _per_example(v, x: torch.Tensor) -> torch.Tensor | float:
    """A float stays a float; a (B,) tensor becomes (B, 1, 1, 1) to broadcast over images."""
    if isinstance(v, torch.Tensor):
        return v.to(device=x.device, dtype=x.dtype).reshape(-1, *([1] * (x.dim() - 1)))
    return float(v)


def _l2_norm(v: torch.Tensor) -> torch.Tensor:
    """Per-example L2 norm, shape (B, 1, 1, 1), floored to avoid division by zero."""
    return v.flatten(1).norm(dim=1).clamp_min(1e-12).reshape(-1, *([1] * (v.dim() - 1)))


def project(delta: torch.Tensor, x: torch.Tensor, eps, norm: str) -> torch.Tensor:
    """Project ``delta`` onto the eps-ball, then so that ``x + delta`` lies in [0, 1].

    Clamping to the box after the ball keeps the ball constraint: it only shrinks each
    coordinate's magnitude (``x`` itself is in the box)."""
    eps = _per_example(eps, x)
    if norm == "Linf":
        delta = delta.clamp(-eps, eps) if isinstance(eps, float) else torch.maximum(
            torch.minimum(delta, eps), -eps)
    else:
        delta = delta * (eps / _l2_norm(delta)).clamp(max=1.0)
    return (x + delta).clamp(0, 1) - x


def random_init(x: torch.Tensor, eps, norm: str) -> torch.Tensor:
    """Uniform start in the Linf ball, or a uniformly random direction times a uniform radius
    in the L2 ball (the usual PGD starts), projected to the box."""
    eps_b = _per_example(eps, x)
    if norm == "Linf":
        delta = (torch.rand_like(x) * 2 - 1) * eps_b
    else:
        direction = torch.randn_like(x)
        radius = torch.rand(x.shape[0], *([1] * (x.dim() - 1)), device=x.device, dtype=x.dtype)
        delta = direction / _l2_norm(direction) * radius * eps_b
    return project(delta, x, eps, norm)


def ascent_step(delta: torch.Tensor, grad: torch.Tensor, step_size, norm: str) -> torch.Tensor:
    """One steepest-ascent step of size step_size: sign of the gradient (Linf) or its unit
    direction (L2)."""
    step_size = _per_example(step_size, delta)
    if norm == "Linf":
        return delta + step_size * grad.sign()
    return delta + step_size * grad / _l2_norm(grad)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module an attack runs: ``DistributedDataParallel``'s wrapper removed, any other
    module as it is. Under torchrun (``mixlab.distributed``) the training step calls the
    wrapper, whose forward pass arms its gradient reducer and broadcasts buffers; an attack's
    passes must do neither, so every attack here unwraps its model first."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module):
    """Run with the model in eval mode and restore its previous mode afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def autocast_for(x: torch.Tensor, bf16: bool | None):
    """bf16 autocast on CUDA by default (bf16=None); bf16=True forces it (CPU tests exercise the
    GPU path this way); bf16=False turns it off. Nested inside an outer autocast it is a no-op."""
    enabled = x.is_cuda if bf16 is None else bf16
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(x.device.type, dtype=torch.bfloat16)


def fp32(device: torch.device):
    """Autocast off on ``device`` for the block, also inside a caller's autocast block."""
    try:
        return torch.autocast(device.type, enabled=False)
    except RuntimeError:  # a device type without autocast: nothing to switch off
        return contextlib.nullcontext()


@torch.no_grad()
def eval_logits(model: torch.nn.Module, x: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """The model's fp32 logits (N, K) for x (N, C, H, W), in eval mode (its previous mode is
    restored), ``batch_size`` examples per forward, no autograd, autocast off: the forward
    pass that every evaluation, margin search and path plot reads."""
    model = unwrap(model)
    with eval_mode(model), fp32(x.device):
        return torch.cat([model(x[i:i + batch_size]).float()
                          for i in range(0, len(x), batch_size)])


def predict(model: torch.nn.Module, x: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """Predicted labels (N,) from :func:`eval_logits`."""
    return eval_logits(model, x, batch_size).argmax(1)


def pgd_step_size(eps, steps: int, *, scale: float = 2.5, floor: float = 0.25):
    """The step of a ``steps``-step PGD in a ball of radius ``eps`` (pixel units):
    ``scale·eps/steps``, so that the steps add up to 2.5 radii and reach the boundary from any
    start (Madry et al. 2018, arXiv 1706.06083), and never below ``floor·eps``: eps/4 for 10
    steps or more, the usual step of PGD-10/20 and of every evaluation. ``floor=0`` is MMA's
    rule, 2.5·eps/steps (Ding et al. 2020, arXiv 1812.02637), and takes per-example (B,)
    tensors; with a floor, eps is a float."""
    step = scale * eps / steps
    return max(floor * eps, step) if floor else step


# ----------------------------------------------------------------------------- attacks
def fgsm(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps,
         norm: str = "Linf", loss: str = "ce", bf16: bool | None = None) -> torch.Tensor:
    """Fast Gradient Sign Method (Goodfellow et al. 2015, arXiv 1412.6572).

    Distance measure: Linf (or L2: one step of length eps along the gradient).
    x: (B, C, H, W) in [0, 1]; y: (B,) int64 labels; eps: float or (B,) tensor, pixel units.
    Returns x_adv, same shape, in [0, 1] and within eps of x.

    Raises TypeError / ValueError at the boundary (see the module docstring), e.g. for
    eps <= 0: FGSM with a zero step returns x itself.

    >>> x_adv = fgsm(model, x, y, eps=8/255)
    """
    check_attack_inputs(x, y, eps=eps, norm=norm, loss=loss)
    return pgd(model, x, y, eps=eps, step_size=eps, steps=1, norm=norm, loss=loss,
               random_start=False, bf16=bf16)


def pgd(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps, step_size, steps: int,
        norm: str = "Linf", loss: str | Callable = "ce", random_start: bool = True,
        restarts: int = 1, early_stop: bool = False, return_kappa: bool = False,
        bf16: bool | None = None):
    """Projected gradient descent on the loss (Madry et al. 2018, arXiv 1706.06083).

    Distance measure: Linf or L2 (``norm``), radius ``eps`` in pixel units, step ``step_size``
    (both floats or per-example (B,) tensors). Maximises ``loss``: "ce", "cw" (CW margin),
    "slm" (MMA's soft logit margin) or a callable ``(logits, y) -> (B,)``.

    Args:
        x: (B, C, H, W) clean inputs in [0, 1]. y: (B,) int64 labels.
        restarts: independent random starts; per example the strongest is kept (a
            misclassified result first, then the higher loss).
        early_stop: freeze an example as soon as an iterate is misclassified (its
            perturbation stops moving; the loop itself runs all steps, no host sync).
        return_kappa: also return GAIRAT's geometry value kappa (B,) int64 in {0..steps}:
            the number of iterates, each taken *before* a step, that the model still
            classifies correctly (Zhang et al. 2021). With restarts > 1 it is the kappa of
            the kept restart.
        bf16: bf16 autocast (None: on CUDA only). Attack losses are computed in fp32.
    Returns:
        x_adv (B, C, H, W) in [0, 1] with ||x_adv - x|| <= eps; or (x_adv, kappa).
    Raises:
        TypeError / ValueError at the boundary (module docstring): among others a float eps
        or step_size that is NaN, infinite or <= 0 (a zero step with steps >= 1 would return
        the random start and call it PGD), steps or restarts < 1, and on the CPU x outside
        [0, 1] or labels outside the model's classes.

    >>> x_adv = pgd(model, x, y, eps=8/255, step_size=2/255, steps=10)
    >>> x_adv = pgd(model, x, y, eps=0.5, step_size=0.125, steps=20, norm="L2", loss="cw")
    """
    check_attack_inputs(x, y, eps=eps, step_size=step_size, steps=steps, norm=norm, loss=loss)
    _check_count(restarts, "restarts", 1)
    loss_fn = loss if callable(loss) else (lambda z, t, _k=loss: attack_loss(z, t, _k))
    model, x = unwrap(model), x.detach()
    best_x, best_score, best_kappa = None, None, None
    # enable_grad: callers may sit in a no_grad block (evaluation); the attack still needs
    # input gradients
    with eval_mode(model), autocast_for(x, bf16), torch.enable_grad():
        for restart in range(restarts):
            delta = random_init(x, eps, norm) if random_start else torch.zeros_like(x)
            kappa = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
            active = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
            for step in range(steps):
                delta.requires_grad_(True)
                logits = model(x + delta)
                if restart == 0 and step == 0:
                    _check_labels_fit(y, logits)
                correct = logits.argmax(1) == y
                kappa += correct
                per_example = loss_fn(logits, y)
                grad, = torch.autograd.grad(per_example.sum(), delta)
                with torch.no_grad():
                    if early_stop:
                        active = active & correct
                        grad = grad * active.reshape(-1, *([1] * (x.dim() - 1)))
                    delta = project(ascent_step(delta.detach(), grad, step_size, norm), x, eps,
                                    norm)
            x_adv = (x + delta).detach()
            if restarts <= 1:
                best_x, best_kappa = x_adv, kappa
                break
            with torch.no_grad():
                logits = model(x_adv).float()
                score = loss_fn(logits, y).float() + 1e6 * (logits.argmax(1) != y)
            if best_x is None:
                best_x, best_score, best_kappa = x_adv, score, kappa
            else:
                better = score > best_score
                best_x = torch.where(better.reshape(-1, 1, 1, 1), x_adv, best_x)
                best_kappa = torch.where(better, kappa, best_kappa)
                best_score = torch.maximum(score, best_score)
    return (best_x, best_kappa) if return_kappa else best_x


# ----------------------------------------------------------------------------- line search
def boundary_bisection(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
                       direction: torch.Tensor, *, lo, hi, steps: int = 10,
                       margin: str | Callable = "cw", bf16: bool | None = None) -> torch.Tensor:
    """Batched bisection along ``x + t·direction`` for the smallest t where the model is fooled.

    The line search of MMA's AN-PGD and of its test-time margin estimate (Ding et al. 2020,
    arXiv 1812.02637, ``bisection_search`` in BorealisAI/mma_training). Every example halves its
    own interval [lo_i, hi_i] ``steps`` times, all in one forward pass per step: the probe
    ``clamp(x + mid·direction, 0, 1)`` either counts as misclassified (``margin >= 0``; then
    hi = mid) or not (lo = mid).

    Args:
        x: (B, C, H, W) inputs in [0, 1]. y: (B,) labels.
        direction: (B, C, H, W), the search direction, usually of unit norm (then t is a distance
            in pixel units, Linf or L2 as the direction was made).
        lo, hi: floats or (B,) tensors; lo should be a t the model gets right, hi one it gets
            wrong (the caller knows, e.g. from the PGD point it started from).
        margin: what "misclassified" means: "cw" (``max_{j≠y} z_j - z_y >= 0``, the decision
            itself) or "slm" (MMA's soft logit margin ``>= 0``, a little earlier) or a callable
            ``(logits, y) -> (B,)``.
        bf16: bf16 autocast for the probes (None: on CUDA only), as in :func:`pgd`.
    Returns:
        (B,) tensor: hi after the search, i.e. the smallest t found to be misclassified, within
        (hi - lo) / 2**steps above the boundary. An example never found misclassified keeps
        its starting hi: the search reads "no boundary below hi".

    >>> u = (x_adv - x) / eps                      # the PGD direction, Linf norm <= 1
    >>> eps_star = boundary_bisection(model, x, y, u, lo=0.0, hi=eps, steps=10)
    """
    margin_fn = margin if callable(margin) else (lambda z, t, _k=margin: attack_loss(z, t, _k))
    if not callable(margin) and margin not in ("cw", "slm"):
        raise ValueError(f"margin must be 'cw', 'slm' or a callable, got {margin!r}")
    model, x, direction = unwrap(model), x.detach(), direction.detach()
    shape = (x.shape[0],)
    lo = torch.as_tensor(lo, dtype=torch.float32, device=x.device).expand(shape).clone()
    hi = torch.as_tensor(hi, dtype=torch.float32, device=x.device).expand(shape).clone()
    with eval_mode(model), autocast_for(x, bf16), torch.no_grad():
        for _ in range(steps):
            mid = (lo + hi) / 2
            logits = model((x + _per_example(mid, x) * direction).clamp(0, 1))
            fooled = margin_fn(logits.float(), y) >= 0
            hi = torch.where(fooled, mid, hi)
            lo = torch.where(fooled, lo, mid)
    return hi


def estimate_margin(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, *, norm: str,
                    max_eps: float, steps: int = 20, search_steps: int = 10,
                    step_scale: float = 2.5, batch_size: int = 500) -> torch.Tensor:
    """Estimated input-space margin of each example, shape (N,), pixel units.

    The margin of (x, y) is the smallest ||δ|| with f(x + δ) ≠ y (x + δ in [0, 1]), the
    quantity MMA maximises (Ding et al. 2020, arXiv 1812.02637). Every distance returned was
    probed; the official "ANPGD for test" differs (docs/mma.md#the-validation-margin).
    Distance measure: ``norm`` ("Linf" or "L2"). PGD-``steps`` on the SLM loss at radius
    ``max_eps`` with step ``step_scale``·max_eps/steps and a random start, then
    ``search_steps`` bisection steps along u = (x_adv - x)/max_eps for the smallest t at which
    ``clamp(x + t·u, 0, 1)`` is misclassified (argmax ≠ y). Everything runs in fp32 (no bf16
    autocast): near the boundary bf16 logits are too coarse to place it, and one precision
    makes the estimates of every caller comparable.

    Args:
        x: (N, C, H, W) in [0, 1]; y: (N,) labels; any model mapping pixels to logits.
        batch_size: examples per attack batch (memory only: each example is searched alone).
    Returns:
        (N,) float tensor on x's device: 0 where the clean point is already misclassified,
        ``max_eps`` where no misclassified point was found up to max_eps, else the distance, an
        upper bound on the true margin (up to max_eps / 2**search_steps).

    >>> margin = estimate_margin(model, x_test, y_test, norm="Linf", max_eps=16/255)   # (N,)
    """
    check_eps(max_eps, norm)
    step_size = pgd_step_size(max_eps, steps, scale=step_scale, floor=0)
    out = []
    for i in range(0, len(x), batch_size):
        xb, yb = x[i:i + batch_size], y[i:i + batch_size]
        correct = predict(model, xb, batch_size) == yb
        x_adv = pgd(model, xb, yb, eps=max_eps, step_size=step_size, steps=steps, norm=norm,
                    loss="slm", bf16=False)
        eps = boundary_bisection(model, xb, yb, (x_adv - xb) / max_eps, lo=0.0, hi=max_eps,
                                 steps=search_steps, margin="cw", bf16=False)
        out.append(torch.where(correct, eps, torch.zeros_like(eps)))
    return torch.cat(out) if out else torch.zeros(0, device=x.device)


# ----------------------------------------------------------------------------- FAT's PGD
def early_stopped_pgd(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps,
                      step_size, steps: int, tau: int = 0, omega: float = 0.0, norm: str = "Linf",
                      loss: str = "ce", random_start: bool = True, bf16: bool | None = None,
                      return_kappa: bool = False):
    """Early-stopped PGD, "PGD-K-τ" (FAT, Zhang et al. 2020, arXiv 2002.11242, Alg. 1).

    Per example: run PGD from a uniform random start; each iterate (before its step) the
    model misclassifies spends one unit of a budget of τ; the first misclassified iterate
    found with no budget left is returned unchanged (τ = 0: the first misclassified iterate).
    Examples that never run out return the last iterate, as plain PGD-K does. ``omega`` adds
    N(0, omega²) noise to every step (the official code's escape from flat regions; FAT
    uses 0.001, GAIR-FAT 0).

    Vectorised: the whole batch runs all ``steps`` forward/backward passes and stopped
    examples are simply not moved (no per-example Python loop, no host sync); so unlike the
    official code it saves no compute, it only changes which point each example trains on.

    Args:
        x: (B, C, H, W) in [0, 1]; y: (B,) int64. eps, step_size: floats or (B,) tensors, pixel
            units. steps: K, the most PGD steps. tau: the budget τ >= 0 (int).
        loss: attack loss maximised, "ce" (FAT) or "cw" / "slm".
        return_kappa: also return GAIRAT's κ (B,) int64: iterates still classified correctly
            while the example was running, each compared with its own label (the official
            GA_earlystop compares with misaligned labels once examples stop; docs/gairat.md).
    Returns:
        x_adv (B, C, H, W) in [0, 1] within eps of x; or (x_adv, kappa).

    Raises TypeError / ValueError at the boundary, as :func:`pgd` does; also for a tau that
    is not an int >= 0 and an omega that is not a finite number >= 0.

    >>> x_adv = early_stopped_pgd(model, x, y, eps=8/255, step_size=2/255, steps=10, tau=1)
    """
    if loss not in LOSSES:  # no callables here: the official FAT attack is CE only
        raise ValueError(f"unknown attack loss {loss!r}; choose one of {LOSSES}")
    check_attack_inputs(x, y, eps=eps, step_size=step_size, steps=steps, norm=norm, loss=loss)
    if not isinstance(tau, numbers.Integral) or isinstance(tau, bool):
        raise TypeError(f"tau counts misclassified iterates and must be an int >= 0, got "
                        f"{type(tau).__name__} {tau!r}")
    if tau < 0:
        raise ValueError(f"tau counts misclassified iterates and must be >= 0, got {tau}")
    if not is_number(omega) or not math.isfinite(omega) or omega < 0:
        raise ValueError(f"omega is the std of the step noise and must be a finite number "
                         f">= 0, got omega={omega!r}")
    model, x = unwrap(model), x.detach()
    batch = x.shape[0]
    budget = torch.full((batch,), int(tau), dtype=torch.long, device=x.device)
    running = torch.ones(batch, dtype=torch.bool, device=x.device)
    kappa = torch.zeros(batch, dtype=torch.long, device=x.device)
    with eval_mode(model), autocast_for(x, bf16), torch.enable_grad():
        delta = random_init(x, eps, norm) if random_start else torch.zeros_like(x)
        for step in range(steps):
            delta.requires_grad_(True)
            logits = model(x + delta)
            if step == 0:
                _check_labels_fit(y, logits)
            fooled = logits.argmax(1) != y
            kappa += running & ~fooled
            # stop where the model errs with no budget left; elsewhere an error costs 1
            running = running & ~(fooled & (budget == 0))
            budget = budget - (running & fooled).long()
            grad, = torch.autograd.grad(attack_loss(logits, y, loss).sum(), delta)
            with torch.no_grad():
                moved = ascent_step(delta.detach(), grad, step_size, norm)
                if omega:
                    moved = moved + omega * torch.randn_like(moved)
                moved = project(moved, x, eps, norm)
                delta = torch.where(running.reshape(-1, *([1] * (x.dim() - 1))), moved,
                                    delta.detach())
    x_adv = (x + delta).detach()
    return (x_adv, kappa) if return_kappa else x_adv


def tau_at(epoch: int, epochs: int, tau: int | Sequence[int],
           milestones: Sequence[float] = ()) -> int:
    """τ for the 0-based ``epoch`` of ``epochs``: ``tau`` is one int (fixed τ) or one value
    per stage, the stages split at ``milestones`` (fractions of training). The official
    dynamic τ of FAT over 120 epochs is tau=(0, 1, 2), milestones=(50/120, 90/120)."""
    if isinstance(tau, int):
        return tau
    if len(tau) != len(milestones) + 1:
        raise ValueError(f"tau {tuple(tau)} needs one value more than milestones "
                         f"{tuple(milestones)}")
    stage = sum(epoch >= m * epochs - 1e-9 for m in milestones)
    return int(tau[stage])
