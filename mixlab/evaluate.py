"""Robustness evaluation: one protocol for clean, FGSM, PGD, CW and AutoAttack accuracy.

The protocol follows "On Evaluating Adversarial Robustness" (Carlini et al. 2019,
arXiv 1902.06705) and RobustBench's rules (Croce et al. 2021, arXiv 2010.09670):

* Every attack runs on the *same* images and labels, with the model in eval mode and in fp32:
  autocast is switched off for the whole evaluation (also inside a caller's autocast block),
  the attacks get ``bf16=False``, and AutoAttack gets the fp32 model in eval mode.
* Random starts are seeded per chunk of ``batch_size`` images from (seed, chunk start), so
  under torchrun each process attacks whole chunks and the gathered result equals one
  process's (docs/distributed.md).
* Per attack, the accuracy under that attack alone (a fraction in [0, 1]); and ``"robust"``,
  shown as "worst case": the fraction of examples classified correctly clean *and* under every
  attack of the call, i.e. the per-example minimum. A clean-misclassified example that some
  attack happens to push into the right class is not robust; AutoAttack counts the same way
  (it attacks only the clean-correct points and keeps a point robust only while every attack
  fails on it).
* PGD-k (Madry et al. 2018, arXiv 1706.06083): CE loss, one uniform random start, step eps/4
  for k = 20 (as GAIRAT evaluates) and max(eps/4, 2.5·eps/k) otherwise. CW-20: the same PGD-20
  on the CW margin loss (Carlini & Wagner 2017, arXiv 1608.04644). FGSM (Goodfellow et al.
  2015, arXiv 1412.6572): one step of size eps from x.
* AutoAttack (Croce & Hein 2020, arXiv 2003.01690) is the authors' own package
  (``pyautoattack``), "standard" version by default (APGD-CE, APGD-T, FAB-T, Square); a custom
  list runs each attack with the standard version's budget. The package's own checks
  (randomised or dynamic defence, probabilities instead of logits, zero gradients, number of
  classes, Square beating the gradient attacks) are kept in ``result["aa_warnings"]``.
* :func:`masking_report` flags the known signs of gradient masking or a broken evaluation;
  its flags are ``result["warnings"]``, and :func:`format_report` prints them under a table.

Units: ``eps`` in pixel units (images in [0, 1]; 8/255 for CIFAR Linf), accuracies as fractions
in [0, 1] (tables show percent), times in wall-clock seconds.

>>> result = evaluate(model, x_test, y_test, eps=8/255)         # clean, fgsm, pgd20, cw20, aa
>>> print(format_table({"selected": result, "last": evaluate(last, x_test, y_test)}))
>>> print(format_report(result))
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import time
import warnings
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch

from . import distributed
from .attacks import (PIXEL_TOL, _check_count, is_number, check_eps, check_label_tensor,
                      eval_mode, fgsm, pgd, pgd_step_size, predict)  # noqa: F401 (predict)
from .attacks import fp32 as _fp32
from .extras import require
from .fileio import atomic_write_text

ATTACKS = ("clean", "fgsm", "pgd10", "pgd20", "pgd50", "cw20", "aa")
#: AutoAttack versions that fix their own attack list; a custom list goes in ``aa_attacks``
AA_VERSIONS = ("standard", "plus", "rand")
#: attack names the ``pyautoattack`` package runs (its ``AttackName``)
AA_ATTACKS = ("apgd-ce", "apgd-dlr", "apgd-t", "fab", "fab-t", "square")
#: AutoAttack reaches below PGD-20 by a few points on honest models; a larger gap (accuracy,
#: in [0, 1]) means PGD is being fooled, i.e. gradient masking (Croce & Hein 2020)
MASKING_GAP = 0.10
#: CW-20 (margin loss) lands at most a few points below PGD-20 (CE) on honestly adversarially
#: trained models (PGD-AT, TRADES): both attacks search the same ball, only the loss differs.
#: Much lower means the model resists the CE loss rather than attacks, the pattern of
#: instance-reweighted training such as GAIRAT (Zhang et al. 2021, arXiv 2010.01736), whose
#: robustness to the PGD-CE attack it reweights by drops sharply under other attacks such as
#: CW (Gao et al. 2021, "Local Reweighting for Adversarial Training", arXiv 2106.15776).
#: Accuracy, in [0, 1].
CW_GAP = 0.05
#: one FGSM step should never beat 20 PGD steps by more than sampling noise (Carlini et al.
#: 2019's checklist: iterative attacks must do better than single-step ones)
FGSM_GAP = 0.02
#: robust accuracy must not rise with eps (a larger ball contains the smaller one; Carlini
#: et al. 2019's checklist); rises above this (accuracy) are flagged
CURVE_RISE = 0.02
#: column labels of :func:`format_table`
LABELS = {"clean": "clean", "fgsm": "FGSM", "pgd10": "PGD-10", "pgd20": "PGD-20",
          "pgd50": "PGD-50", "cw20": "CW-20", "aa": "AutoAttack", "robust": "worst case"}


def _pgd_attack(steps: int, loss: str):
    def run(model, x, y, *, eps, norm):
        step_size = pgd_step_size(eps, steps)  # eps/4 for 10 steps or more
        return pgd(model, x, y, eps=eps, step_size=step_size, steps=steps, norm=norm, loss=loss,
                   bf16=False)
    return run


_BATCHED = {
    "fgsm": lambda model, x, y, *, eps, norm: fgsm(model, x, y, eps=eps, norm=norm, bf16=False),
    "pgd10": _pgd_attack(10, "ce"),
    "pgd20": _pgd_attack(20, "ce"),
    "pgd50": _pgd_attack(50, "ce"),
    "cw20": _pgd_attack(20, "cw"),
}


def _as_tensors(x, y):
    """Accept tensors, a TensorDataset-like object (uint8 .x, .y), or a loader of (x, y)."""
    if y is not None or isinstance(x, torch.Tensor):
        if y is None:
            raise TypeError("y is None but x is a tensor: pass the labels as y (an int64 "
                            "(N,) tensor), or pass a dataset / loader as x")
        return x, y
    if hasattr(x, "x") and hasattr(x, "y"):
        xs = x.x
        return (xs.float() / 255 if xs.dtype == torch.uint8 else xs), x.y
    xs, ys = zip(*[(b[0], b[1]) if isinstance(b, (tuple, list)) else (b.x, b.y) for b in x])
    return torch.cat(xs), torch.cat(ys)


# ----------------------------------------------------------------------------- AutoAttack
class _ListHandler(logging.Handler):
    def __init__(self, messages: list[str]):
        super().__init__(level=logging.WARNING)
        self.messages = messages

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


class _AutoAttackProgress(logging.Handler):
    """Turns AutoAttack's per-batch log records into a progress bar.

    ``pyautoattack`` logs, at DEBUG level on the ``"auto-attack"`` logger, "running <attack>"
    before each attack, "<attack> - <batch>/<batches> - ..." after each batch and "robust
    accuracy after <ATTACK>: <acc>" after each attack; the bar shows the attack, its batches
    and the robust accuracy so far. A record in another format only leaves the bar as it is.
    """

    def __init__(self, bar):
        super().__init__(level=logging.DEBUG)
        self.bar = bar
        self.description = None

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        if text.startswith("running "):   # AutoAttack runs once per chunk of images
            description = f"AutoAttack {text[len('running '):]}"
            if description != self.description:
                self.bar.set_description(description)
                self.description = description
            self.bar.reset(total=1)
        elif match := re.match(r"\S+ - (\d+)/(\d+) - ", text):
            done, total = map(int, match.groups())
            self.bar.total = total
            self.bar.n = done
            self.bar.refresh()
        elif match := re.match(r"robust accuracy after \S+: ([\d.]+%)", text):
            self.bar.set_postfix_str(f"robust {match.group(1)}")


@contextlib.contextmanager
def autoattack_progress(enabled: bool = True):
    """A progress bar over AutoAttack's attacks and batches (``tqdm``) while the block runs.

    Listens to the ``"auto-attack"`` logger's DEBUG records with its own handler; records
    below the logger's previous level are not passed on to other handlers, so turning the bar
    on prints nothing else. ``enabled=False`` does nothing.
    """
    if not enabled:
        yield
        return
    from tqdm.auto import tqdm
    logger = logging.getLogger("auto-attack")
    old_level = logger.getEffectiveLevel()
    bar = tqdm(total=1, desc="AutoAttack", unit="batch", leave=False, dynamic_ncols=True)
    handler = _AutoAttackProgress(bar)
    quiet_debug = logging.Filter()
    quiet_debug.filter = lambda record: record.levelno >= old_level  # type: ignore[method-assign]
    saved_level, saved_propagate = logger.level, logger.propagate
    others = list(logger.handlers)
    for other in others:
        other.addFilter(quiet_debug)
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    # DEBUG records reach the root logger's handlers only at the old level or above
    logger.propagate = False
    propagate = _PassOn(old_level) if saved_propagate else None
    if propagate is not None:
        logger.addHandler(propagate)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        if propagate is not None:
            logger.removeHandler(propagate)
        for other in others:
            other.removeFilter(quiet_debug)
        logger.setLevel(saved_level)
        logger.propagate = saved_propagate
        bar.close()


class _PassOn(logging.Handler):
    """Hands a record at or above ``level`` to the parent loggers' handlers, as propagation
    would have."""

    def __init__(self, level: int):
        super().__init__(level=level)

    def emit(self, record: logging.LogRecord) -> None:
        parent = logging.getLogger("auto-attack").parent
        while parent is not None:
            for h in parent.handlers:
                if record.levelno >= h.level:
                    h.handle(record)
            if not parent.propagate:
                break
            parent = parent.parent


@contextlib.contextmanager
def capture_autoattack_warnings():
    """Collect what AutoAttack's own checks report, as a list of strings filled in the block.

    The ``pyautoattack`` checks (module ``checks``) report through the ``"auto-attack"`` logger
    at WARNING level when AutoAttack passes its logger, and through ``warnings.warn`` when it
    does not; both are captured. The logger still passes its records on (so they are also
    printed as before); other warnings raised in the block are re-emitted unchanged.

    >>> with capture_autoattack_warnings() as aa_warnings:
    ...     x_adv = autoattack(model, x, y, eps=8/255)
    """
    messages: list[str] = []
    logger = logging.getLogger("auto-attack")
    handler = _ListHandler(messages)
    old_level = logger.level
    if logger.getEffectiveLevel() > logging.WARNING:  # someone silenced it: we still listen
        logger.setLevel(logging.WARNING)
    logger.addHandler(handler)
    caught: list[warnings.WarningMessage] = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield messages
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
        for w in caught:
            if "pyautoattack" in str(w.filename):
                messages.append(str(w.message))
            else:
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


def _autoattack(model, x, y, *, eps, norm, version, attacks, batch_size, seed):
    """Run AutoAttack; returns (x_adv, the attack list it ran)."""
    AutoAttack = require("pyautoattack", feature="AutoAttack (attack 'aa')").AutoAttack
    kwargs = dict(norm=norm, eps=float(eps), seed=seed, device=x.device)
    with eval_mode(model), _fp32(x.device):
        if attacks:
            attack = AutoAttack(model, attacks=list(attacks), version="custom", **kwargs)
            # the standard version's budget (1 restart, 9 target classes, 5000 Square
            # queries) for every attack of the custom list; then the list itself again
            attack._set_version("standard")
            attack.attacks_to_run, attack.version = list(attacks), "custom"
        else:
            attack = AutoAttack(model, version=version, **kwargs)
        x_adv, _ = attack.run_standard_evaluation(x, y, batch_size=batch_size)
    return x_adv.to(x.device), list(attack.attacks_to_run)


def autoattack(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float,
               norm: str = "Linf", version: str = "standard",
               attacks: Sequence[str] | None = None, batch_size: int = 500,
               seed: int = 0) -> torch.Tensor:
    """AutoAttack (Croce & Hein 2020, arXiv 2003.01690) through the authors' ``pyautoattack``.

    ``version``: "standard", "plus" or "rand"; ``attacks``: a custom list from ``AA_ATTACKS``
    instead (run with the standard version's budget). The model runs in fp32 and eval mode.
    Returns x_adv (N, C, H, W); examples AutoAttack did not break (or that were misclassified
    to begin with) come back unchanged. Wrap the call in :func:`capture_autoattack_warnings`
    to keep the package's own warnings; :func:`evaluate` does, and checks its inputs first.
    """
    return _autoattack(model, x, y, eps=eps, norm=norm, version=version, attacks=attacks,
                       batch_size=batch_size, seed=seed)[0]


# ----------------------------------------------------------------------------- input checks
def _check_attack_names(attacks) -> list[str]:
    """Known names, each once, clean first (the worst case needs it)."""
    if isinstance(attacks, str):
        raise TypeError(f"attacks must be a sequence of names, got the string {attacks!r}; "
                        f"write attacks=({attacks!r},)")
    attacks = list(attacks)
    unknown = [a for a in attacks if a not in ATTACKS]
    if unknown:
        raise ValueError(f"unknown attack(s) {unknown}; choose from {ATTACKS}")
    return ["clean"] + [a for a in dict.fromkeys(attacks) if a != "clean"]


def _check_aa(attacks: list[str], version: str, aa_attacks) -> list[str] | None:
    if aa_attacks is None:
        if version not in AA_VERSIONS:
            raise ValueError(f"unknown aa_version {version!r}; choose one of {AA_VERSIONS}, or "
                             f"give a custom list as aa_attacks=[...] (from {AA_ATTACKS})")
        return None
    if isinstance(aa_attacks, str):
        raise TypeError(f"aa_attacks must be a list of names, got the string {aa_attacks!r}; "
                        f"write aa_attacks=[{aa_attacks!r}]")
    aa_attacks = list(aa_attacks)
    unknown = [a for a in aa_attacks if a not in AA_ATTACKS]
    if unknown or not aa_attacks:
        raise ValueError(f"unknown AutoAttack attack(s) {unknown or aa_attacks}; aa_attacks is "
                         f"a non-empty list from {AA_ATTACKS}")
    if version not in ("standard", "custom"):
        raise ValueError(f"aa_version={version!r} fixes its own attack list; give either "
                         f"aa_version or aa_attacks={aa_attacks}, not both")
    if "aa" not in attacks:
        raise ValueError(f"aa_attacks={aa_attacks} is given but 'aa' is not in attacks "
                         f"{attacks[1:]}: add 'aa' to attacks")
    return list(dict.fromkeys(aa_attacks))


def _check_data(x, y) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a tensor of images (N, C, H, W) in [0, 1], got "
                        f"{type(x).__name__}")
    if x.dtype == torch.uint8:
        raise TypeError("x has dtype torch.uint8 (pixels 0-255); evaluate takes float pixels in "
                        "[0, 1]: pass x.float() / 255")
    if not x.is_floating_point():
        raise TypeError(f"x has dtype {x.dtype}; evaluate takes float pixels in [0, 1]: pass "
                        f"x.float() (divided by 255 if the pixels are 0-255)")
    if x.dim() != 4:
        raise ValueError(f"x has shape {tuple(x.shape)}; evaluate takes images (N, C, H, W) "
                         f"(x[None] for one image)")
    if len(x) == 0:
        raise ValueError("x holds no images (N = 0): there is nothing to evaluate")
    check_label_tensor(x, y, what="image")
    # one host sync each: evaluation is not a training step
    lo, hi = (float(v) for v in torch.aminmax(x))
    if math.isnan(lo) or math.isnan(hi):
        raise ValueError("x contains NaN pixels; evaluate takes pixels in [0, 1]")
    if lo < -PIXEL_TOL or hi > 1 + PIXEL_TOL:
        hint = ("they look like 0-255 pixels: pass x / 255" if lo >= 0 and hi > 1.5 else
                "normalisation belongs in the model's first layer: pass the raw pixels")
        raise ValueError(f"x has values in [{lo:.4g}, {hi:.4g}]; evaluate takes pixels in "
                         f"[0, 1] ({hint})")


def _check_model(model, x: torch.Tensor, batch_size: int) -> int:
    """Model type, fp32 parameters on x's device; returns the number of classes (from the
    logits of the first batch, checked against ``model.num_classes`` where present)."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module mapping pixels to logits, got "
                        f"{type(model).__name__}")
    for pname, p in model.named_parameters():
        if p.is_floating_point() and p.dtype != torch.float32:
            raise TypeError(f"model parameter {pname!r} is {p.dtype}; the evaluation protocol "
                            f"runs in fp32: pass model.float()")
        if p.device != x.device:
            raise ValueError(f"model is on {p.device} and x on {x.device}: move x and y with "
                             f".to({str(p.device)!r})")
    with torch.no_grad(), eval_mode(model), _fp32(x.device):
        logits = model(x[:batch_size])
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or len(logits) != len(
            x[:batch_size]):
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits)
        raise ValueError(f"the model returned {shape} for {len(x[:batch_size])} images; "
                         f"evaluate needs logits of shape (N, num_classes)")
    if not bool(torch.isfinite(logits).all()):
        raise ValueError("the model's logits on the first batch contain NaN or inf; "
                         "an evaluation of them would mean nothing")
    num_classes = logits.shape[1]
    declared = getattr(model, "num_classes", None)
    if isinstance(declared, int) and declared != num_classes:
        raise ValueError(f"model.num_classes is {declared} but the model outputs "
                         f"{num_classes} logits")
    return num_classes


def _check_labels(y: torch.Tensor, num_classes: int) -> None:
    lo, hi = (int(v) for v in torch.aminmax(y))
    if lo < 0 or hi >= num_classes:
        bad = lo if lo < 0 else hi
        raise ValueError(f"y has label {bad} but the model has {num_classes} classes; labels "
                         f"must lie in [0, {num_classes})")


def _check_run_dir(run_dir, name) -> Path | None:
    if not isinstance(name, str) or not name or "/" in name or "\\" in name or name in (".",
                                                                                      ".."):
        raise ValueError(f"name={name!r} must be a plain file name (no folders): the result "
                         f"goes to run_dir/<name>.json")
    if run_dir is None:
        return None
    path = Path(run_dir) / f"{name}.json"
    existing = next((p for p in [path.parent, *path.parent.parents] if p.exists()), None)
    if existing is not None and not (existing.is_dir() and os.access(existing, os.W_OK)):
        warnings.warn(f"{existing} is not a writable folder: the evaluation will run, but "
                      f"{path} cannot be written; the result will only be returned",
                      RuntimeWarning, stacklevel=3)
    return path


# ----------------------------------------------------------------------------- evaluation
def evaluate(model: torch.nn.Module, x, y=None, *,
             attacks: Sequence[str] = ("clean", "fgsm", "pgd20", "cw20", "aa"),
             eps: float = 8 / 255, norm: str = "Linf", batch_size: int = 500,
             aa_version: str = "standard", aa_attacks: Sequence[str] | None = None,
             seed: int = 0, run_dir: str | Path | None = None,
             name: str = "eval", progress: bool = True) -> dict[str, Any]:
    """Accuracy of ``model`` under each attack and in the worst case, on the same images.

    Args:
        model: maps (N, C, H, W) pixels in [0, 1] to logits (N, K); fp32 parameters on x's
            device. Evaluated in eval mode (its mode is restored afterwards) and in fp32.
        x, y: test images (N, C, H, W), float in [0, 1], and int64 labels (N,) in [0, K); or a
            TensorDataset-like object / loader as ``x`` with ``y=None``. Slice for a subset:
            the result records n.
        attacks: names from ``ATTACKS``; "clean" is always evaluated (first), since the worst
            case and the masking report need it.
        eps, norm: the threat model, pixel units ("Linf": eps in [0, 1]; "L2"). With eps = 0
            no attack can move a point: every attack's accuracy is the clean one.
        batch_size: images per forward pass and per seeded chunk (AutoAttack's too).
        aa_version: AutoAttack version ("standard", "plus", "rand").
        aa_attacks: a custom AutoAttack list instead, e.g. ["apgd-ce", "apgd-t"] (names from
            ``AA_ATTACKS``), run as version "custom" with the standard version's budget.
        seed: the RNG seed of the attacks: each chunk of ``batch_size`` images is attacked
            from the seed ``mixlab.distributed.chunk_seed(seed, chunk start)``, so a chunk's
            result depends neither on which attacks ran before nor on the process that ran
            it; AutoAttack runs once per chunk. The caller's RNG state is restored.
        run_dir, name: if run_dir is given, the result is written to ``run_dir/<name>.json``,
            atomically (a temporary file in the same folder, fsync, rename).
        progress: show a progress bar (``tqdm``; a widget in Jupyter) over each attack's
            batches, and over AutoAttack's attacks and batches with the robust accuracy so
            far (:func:`autoattack_progress`); False for none.
    Returns:
        dict: one accuracy per attack (``"clean"``, ``"pgd20"``, ...), each the accuracy under
        that attack alone; ``"robust"``, the worst case; ``"per_example"``, {attack or
        "robust": list of N bools, correct or not}; ``"attacks"`` (the names, clean first);
        ``"n"``, ``"eps"``, ``"norm"``, ``"seed"``; ``"seconds"`` and ``"img_per_s"`` per
        attack; with "aa", ``"aa_version"``, ``"aa_attacks"`` (the list AutoAttack ran) and
        ``"aa_warnings"`` (its own checks' messages); ``"warnings"``, the masking report
        (:func:`masking_report`); ``"saved_to"`` (the JSON path, or None); after a failed
        write ``"save_error"``. Everything is JSON-able.
    Raises:
        TypeError / ValueError, before anything runs or is written, naming the bad value and
        the fix: x not a float (N, C, H, W) tensor in [0, 1] (uint8 images: divide by 255), y
        not int64 (N,) with labels in [0, num_classes), eps not a finite number >= 0 (Linf
        <= 1), unknown attack / AutoAttack names, batch_size < 1, a model that is not fp32 or
        not on x's device.

    A finished evaluation is never lost to a failed write. If ``run_dir/<name>.json`` cannot
    be written (read-only or full disk, a file in the way), the result is still *returned*:
    ``result["saved_to"]`` is None, ``result["save_error"]`` says why (and
    :func:`format_report` shows it), and a ``RuntimeWarning`` is emitted; write it elsewhere
    with :func:`save_result`. ``result["warnings"]`` stays the masking report alone, so a check
    on it does not mistake a full disk for gradient masking. Returning was chosen over raising an error that carries the result:
    in a notebook an exception leaves nothing bound to the cell's variable, and an AutoAttack
    run of an hour would be reachable only through ``sys.last_value``. A folder that already
    looks unwritable is warned about before the attacks start.

    Under torchrun (``mixlab.distributed``) every process calls ``evaluate`` on the same
    images with the model on its own device; each attacks whole chunks (chunk k on rank
    k mod W), every process gets the full result, equal to one process's, and rank 0 alone
    writes ``run_dir/<name>.json``.

    >>> result = evaluate(model, x_test[:1000], y_test[:1000], eps=8/255, run_dir=run.path)
    >>> result["robust"], result["warnings"]
    """
    attacks = _check_attack_names(attacks)
    aa_attacks = _check_aa(attacks, aa_version, aa_attacks)
    if not is_number(eps):
        raise TypeError(f"eps must be a number in pixel units (e.g. 8/255), got "
                        f"{type(eps).__name__} {eps!r}")
    check_eps(eps, norm)
    _check_count(batch_size, "batch_size", 1)
    _check_count(seed, "seed", 0)
    if not isinstance(progress, bool):
        raise TypeError(f"progress must be True or False, got {type(progress).__name__} "
                        f"{progress!r}")
    path = _check_run_dir(run_dir, name)
    x, y = _as_tensors(x, y)
    _check_data(x, y)
    num_classes = _check_model(model, x, batch_size)
    _check_labels(y, num_classes)

    eps = float(eps)
    n = len(x)
    group = distributed.setup("cuda" if x.is_cuda else "cpu")   # None without torchrun
    if group is not None and x.device != group.device:
        raise ValueError(f"under torchrun each process evaluates on its own device: move the "
                         f"model, x and y to {group.device} (they are on {x.device})")
    progress = progress and distributed.is_main(group)
    mine = distributed.my_chunks(n, batch_size, group)   # every chunk in one process
    result: dict[str, Any] = {"attacks": attacks, "n": n, "eps": eps, "norm": norm,
                              "seed": seed, "seconds": {}, "img_per_s": {}}
    correct: dict[str, torch.Tensor] = {}
    aa_warnings: list[str] = []
    cuda_devices = list(range(torch.cuda.device_count())) if x.is_cuda else []
    with torch.random.fork_rng(devices=cuda_devices), eval_mode(model), _fp32(x.device):
        for attack in attacks:
            t0 = time.perf_counter()
            starts = mine
            if progress and attack not in ("clean", "aa") and eps != 0:
                from tqdm.auto import tqdm
                starts = tqdm(starts, desc=LABELS.get(attack, attack), unit="batch",
                              leave=False, dynamic_ncols=True)
            rows, aa_run = [], None
            with contextlib.ExitStack() as aa_context:
                if attack == "aa" and eps != 0:
                    aa_warnings = aa_context.enter_context(capture_autoattack_warnings())
                    aa_context.enter_context(autoattack_progress(progress))
                for i in starts:
                    # each chunk of batch_size images is attacked from its own seed, so a
                    # chunk's result is the same in whichever process and after whatever ran
                    chunk_seed = distributed.chunk_seed(seed, i)
                    torch.manual_seed(chunk_seed)
                    xb, yb = x[i:i + batch_size], y[i:i + batch_size]
                    if attack == "clean" or eps == 0:
                        x_eval = xb
                    elif attack == "aa":
                        x_eval, aa_run = _autoattack(model, xb, yb, eps=eps, norm=norm,
                                                     version=aa_version, attacks=aa_attacks,
                                                     batch_size=batch_size, seed=chunk_seed)
                    else:
                        x_eval = _BATCHED[attack](model, xb, yb, eps=eps, norm=norm)
                    rows.append(predict(model, x_eval, batch_size) == yb)
            hits = torch.cat(rows) if rows else torch.zeros(0, dtype=torch.bool, device=x.device)
            correct[attack] = distributed.gather_rows(hits, mine, batch_size, n, group)
            if attack == "aa" and eps != 0:
                result["aa_version"] = "custom" if aa_attacks else aa_version
                result["aa_attacks"] = distributed.from_main(aa_run, group)  # rank 0 ran one
                result["aa_warnings"] = list(dict.fromkeys(
                    w for part in distributed.gather_lists(aa_warnings, group) for w in part))
            # wall-clock seconds of the slowest process
            seconds = distributed.slowest(time.perf_counter() - t0, group)
            result["seconds"][attack] = seconds
            result["img_per_s"][attack] = n / max(seconds, 1e-9)
    robust = torch.stack(list(correct.values())).all(0)
    for attack, c in correct.items():
        result[attack] = c.float().mean().item()
    result["robust"] = robust.float().mean().item()
    result["per_example"] = {**{a: c.tolist() for a, c in correct.items()},
                             "robust": robust.tolist()}
    result["warnings"] = masking_report(result)
    result["saved_to"] = None if path is None else str(path)
    if path is not None and not distributed.is_main(group):   # rank 0 writes the file
        return result
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            save_result(result, path)
        except OSError as err:
            msg = (f"the result could not be written to {path} ({err}); it is only in "
                   f"memory: keep the returned dict and save it with save_result(result, "
                   f"<writable path>)")
            result["saved_to"] = None
            result["save_error"] = msg
            warnings.warn(msg, RuntimeWarning, stacklevel=2)
    return result


def result_json(result: Mapping[str, Any]) -> str:
    """``result`` as indented JSON text, each per-example list on one line (a list of 10,000
    bools would otherwise take 10,000 lines)."""
    summary = {k: v for k, v in result.items() if k != "per_example"}
    text = json.dumps(summary, indent=2, allow_nan=False)
    per_example = result.get("per_example")
    if per_example is None:
        return text + "\n"
    rows = ",\n".join(f"    {json.dumps(k)}: {json.dumps(v, separators=(',', ':'))}"
                      for k, v in per_example.items())
    block = '  "per_example": {\n' + rows + "\n  }" if rows else '  "per_example": {}'
    head = text[:-1].rstrip()
    return head + (",\n" if summary else "\n") + block + "\n}\n"


def save_result(result: Mapping[str, Any], path: str | Path) -> Path:
    """Write an :func:`evaluate` result to ``path`` as JSON, atomically (a temporary file in
    the same folder, flushed and fsync-ed, then renamed over ``path``; the folder must exist).
    Raises OSError if it cannot be written. Returns the path."""
    path = Path(path)
    atomic_write_text(path, result_json(result))
    return path


def load_result(path: str | Path) -> dict[str, Any]:
    """Read a result written by :func:`evaluate` / :func:`save_result`."""
    return json.loads(Path(path).read_text())


# ----------------------------------------------------------------------------- masking report
def _curve_values(curve) -> list[tuple[Any, float]]:
    """(eps, accuracy) pairs in eps order from a mapping {eps: acc} or a sequence of
    accuracies already in increasing eps order (eps then reads as the index)."""
    if isinstance(curve, Mapping):
        return sorted((float(k), float(v)) for k, v in curve.items())
    return [(i, float(v)) for i, v in enumerate(curve)]


def masking_report(result: Mapping[str, Any], curve=None) -> list[str]:
    """Flags that point at gradient masking or a broken evaluation, as readable sentences.

    Following Carlini et al. 2019 ("On Evaluating Adversarial Robustness", arXiv 1902.06705,
    its checklist) and RobustBench's checks, on a (possibly merged) :func:`evaluate` result:

    * an attack's accuracy above the clean accuracy (> 0 points): on the same images an attack
      can only lower accuracy, so the attack is broken (or the numbers come from different
      images);
    * AutoAttack below PGD-20 by more than ``MASKING_GAP`` (10 points): PGD is being fooled;
    * CW-20 below PGD-20 by more than ``CW_GAP`` (5 points): robust to the CE loss only,
      GAIRAT's known symptom;
    * FGSM below PGD-20 by more than ``FGSM_GAP`` (2 points): one step beats twenty;
    * ``curve``, robust accuracies in increasing eps order (a sequence, or a mapping
      {eps: accuracy}), rising by more than ``CURVE_RISE`` (2 points) from one eps to the next;
    * each of AutoAttack's own warnings (``result["aa_warnings"]``).

    Accuracies are fractions in [0, 1]. Returns [] when nothing is flagged.

    >>> masking_report({"clean": 0.8, "pgd20": 0.6, "aa": 0.3})
    ['AutoAttack (30.0%) is 30.0 points below PGD-20 (60.0%): ...']
    """
    flags = []
    acc = {k: float(v) for k, v in result.items()
           if k in ATTACKS and isinstance(v, (int, float)) and not isinstance(v, bool)}
    clean = acc.get("clean")
    if clean is not None:
        for key in ATTACKS[1:]:
            if key in acc and acc[key] > clean + 1e-9:
                flags.append(f"{LABELS[key]} accuracy {acc[key]:.1%} is above clean accuracy "
                             f"{clean:.1%}: on the same images an attack can only lower "
                             f"accuracy, so the attack is broken (or the numbers come from "
                             f"different images)")
    pgd20 = acc.get("pgd20")
    if pgd20 is not None:
        if "aa" in acc and pgd20 - acc["aa"] > MASKING_GAP:
            flags.append(f"AutoAttack ({acc['aa']:.1%}) is {100 * (pgd20 - acc['aa']):.1f} "
                         f"points below PGD-20 ({pgd20:.1%}), more than "
                         f"{100 * MASKING_GAP:.0f}: PGD is likely fooled by gradient masking; "
                         f"report AutoAttack")
        if "cw20" in acc and pgd20 - acc["cw20"] > CW_GAP:
            flags.append(f"CW-20 ({acc['cw20']:.1%}) is {100 * (pgd20 - acc['cw20']):.1f} "
                         f"points below PGD-20 ({pgd20:.1%}), more than {100 * CW_GAP:.0f}: "
                         f"the model resists the CE loss rather than attacks (GAIRAT's "
                         f"known symptom); trust AutoAttack, not PGD-20")
        if "fgsm" in acc and acc["fgsm"] < pgd20 - FGSM_GAP:
            flags.append(f"FGSM ({acc['fgsm']:.1%}) is stronger than PGD-20 ({pgd20:.1%}) by "
                         f"{100 * (pgd20 - acc['fgsm']):.1f} points: one step beating twenty "
                         f"is a sign of gradient masking")
    if curve is not None:
        points = _curve_values(curve)
        rises = [(a, b) for a, b in zip(points, points[1:]) if b[1] > a[1] + CURVE_RISE]
        if rises:
            (e0, a0), (e1, a1) = rises[0]
            where = (f"from {a0:.1%} at eps {e0:.4g} to {a1:.1%} at eps {e1:.4g}"
                     if isinstance(curve, Mapping) else
                     f"from {a0:.1%} at point {e0} to {a1:.1%} at point {e1}")
            flags.append(f"robust accuracy rises with eps in the curve ({where}"
                         f"{'' if len(rises) == 1 else f', and {len(rises) - 1} more rise(s)'})"
                         f": a larger ball contains the smaller one, so this is gradient "
                         f"masking or too few attack steps")
    for message in result.get("aa_warnings") or ():
        flags.append(f"AutoAttack's own check: {message}")
    return flags


def format_report(result: Mapping[str, Any], curve=None) -> str:
    """The masking report as text, to print under a table: "masking report: clean" when
    nothing is flagged, else one line per flag; plus a line for a result that could not be
    written (``result["save_error"]``). The flags are recomputed from the numbers (so a merged
    result is judged as merged) together with those stored in ``result["warnings"]``."""
    flags = masking_report(result, curve)
    flags += [w for w in result.get("warnings") or () if w not in flags]
    lines = ([f"masking report: {len(flags)} flag(s)"] + [f"- {f}" for f in flags] if flags
             else ["masking report: clean"])
    if result.get("save_error"):
        lines.append(f"not saved: {result['save_error']}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- curves, tables
def robust_accuracy_curve(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, *,
                          eps_list: Iterable[float], attack: str = "pgd20",
                          norm: str = "Linf", batch_size: int = 500,
                          seed: int = 0, progress: bool = True) -> list[float]:
    """Worst-case accuracy (clean and ``attack``, per example) for each eps of ``eps_list``
    (pixel units), through :func:`evaluate`, so in fp32 and with its input checks. ``attack``:
    "fgsm", "pgd10", "pgd20", "pgd50" or "cw20". eps = 0 gives the clean accuracy. Feed the
    list to :func:`masking_report` as ``curve`` (in increasing eps order). ``progress``:
    :func:`evaluate`'s progress bars (False: none)."""
    if attack not in _BATCHED:
        raise ValueError(f"curve attack {attack!r} must be one of {sorted(_BATCHED)}")
    return [evaluate(model, x, y, attacks=(attack,), eps=eps, norm=norm,
                     batch_size=batch_size, seed=seed, progress=progress)["robust"]
            for eps in eps_list]


def format_table(rows: Mapping[str, Mapping[str, Any]],
                 columns: Sequence[str] = ("clean", "fgsm", "pgd20", "cw20", "aa",
                                           "robust")) -> str:
    """A Markdown table of accuracies (percent), one row per named result.

    Rows are just named results, e.g. a selected and a last checkpoint side by side:
    ``format_table({"PGD-AT selected": r_best, "PGD-AT last": r_last})``. "robust" is labelled
    "worst case" (correct clean and under every attack of the row). Columns no row has are
    left out; cells a row lacks show "–"; an "n" column is added when any row records n.
    """
    if not isinstance(rows, Mapping) or not all(isinstance(r, Mapping) for r in rows.values()):
        raise TypeError("format_table takes {name: result}; wrap one result as "
                        "{'model': result}")

    def number(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    present = [c for c in columns
               if c != "n" and any(number(r.get(c)) for r in rows.values())]
    with_n = any("n" in r for r in rows.values())
    labels = [LABELS.get(c, c) for c in present] + (["n"] if with_n else [])
    lines = ["| model | " + " | ".join(labels) + " |",
             "|---|" + "---:|" * len(labels)]
    for name, r in rows.items():
        cells = [f"{100 * r[c]:.2f}" if number(r.get(c)) else "–" for c in present]
        if with_n:
            cells.append(str(r.get("n", "–")))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
