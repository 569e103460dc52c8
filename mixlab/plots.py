"""The notebooks' figures: each function takes what a notebook computed (histories, logged
arrays, evaluation results, margins) and returns a matplotlib figure, which the notebook saves
with :func:`mixlab.nbtools.save_figure`. The few numbers a figure computes itself (shares of
κ per epoch, margin survival, the epochs to show) are separate functions, tested on their own.

Nothing here trains, attacks or evaluates: a figure shows data it was given. Pixels are in
[0, 1]; images are (N, C, H, W) tensors or arrays (uint8 or float).

>>> fig = training_curves(run.history, selected_epoch=run.epoch, eval_steps=5, title="cifar10")
>>> nbtools.save_figure(fig, "quickstart_curves", profile="smoke")
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np


def _plt():
    import matplotlib.pyplot as plt
    return plt


def _image(x) -> np.ndarray:
    """One image (C, H, W), uint8 or float in [0, 1], as an (H, W, C) or (H, W) float array
    for ``imshow``."""
    a = x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)
    a = a.astype(np.float32) / 255 if a.dtype == np.uint8 else a.astype(np.float32)
    a = np.transpose(a, (1, 2, 0))
    return a[..., 0] if a.shape[-1] == 1 else a


# ----------------------------------------------------------------------------- numbers
def spread_indices(n: int, k: int) -> list[int]:
    """At most ``k`` indices spread evenly over ``range(n)``, first and last included, sorted,
    without repeats (the epochs a figure shows out of ``n``)."""
    if n <= 0 or k <= 0:
        return []
    return sorted(set(np.linspace(0, n - 1, min(n, k)).round().astype(int).tolist()))


def kappa_shares(kappas: Sequence[np.ndarray], steps: int) -> np.ndarray:
    """(epochs, steps + 1): for each epoch's κ array, the share of examples at each geometry
    value 0..steps (each row sums to 1). A κ outside 0..steps is a ValueError."""
    rows = []
    for kappa in kappas:
        kappa = np.asarray(kappa).astype(np.int64)
        if kappa.size and (kappa.min() < 0 or kappa.max() > steps):
            raise ValueError(f"κ must lie in 0..{steps}; got {kappa.min()}..{kappa.max()}")
        rows.append(np.bincount(kappa, minlength=steps + 1) / max(len(kappa), 1))
    return np.stack(rows) if rows else np.zeros((0, steps + 1))


def margin_survival(margins: np.ndarray, radii: Sequence[float]) -> np.ndarray:
    """For each radius r, the share of points whose margin exceeds r: the accuracy under the
    margin's attack at radius r (misclassified points have margin 0)."""
    m = np.asarray(margins, dtype=np.float64)
    return np.array([(m > r).mean() if m.size else np.nan for r in radii])


# ----------------------------------------------------------------------------- training
def training_curves(history: Sequence[Mapping[str, Any]], *, selected_epoch: int,
                    eval_steps: int, title: str = ""):
    """Two panels against the epoch: the (adversarial) training loss; the training accuracy
    and the clean and PGD accuracy on the validation split, with the selected epoch
    dotted."""
    plt = _plt()
    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.5))
    ax_loss.plot(epochs, [h["train_loss"] for h in history], marker="o")
    ax_loss.set(xlabel="epoch", ylabel="training loss", title="training loss")
    for key, label in [("train_acc", "train (adversarial)"), ("val_clean", "validation clean"),
                       ("val_robust", f"validation PGD-{eval_steps}")]:
        ax_acc.plot(epochs, [h.get(key) for h in history], marker="o", label=label)
    ax_acc.axvline(selected_epoch, color="gray", ls=":", label="selected")
    ax_acc.set(xlabel="epoch", ylabel="accuracy", title=title)
    ax_acc.legend()
    return fig


def validation_curves(runs: Mapping[str, Any], *, eval_steps: int,
                      begin_epoch: int | None = None):
    """Validation accuracy (PGD solid, clean dashed) of several runs against the epoch, a
    star at each run's selected epoch, and a line where reweighting begins
    (``begin_epoch``, GAIRAT's burn-in) when given."""
    plt = _plt()
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(6, 3.5))
    n_val = None
    for name, run in runs.items():
        ep = [h["epoch"] for h in run.history]
        line, = ax.plot(ep, [h["val_robust"] for h in run.history], marker="o",
                        label=f"{name} PGD-{eval_steps}")
        ax.plot(ep, [h["val_clean"] for h in run.history], ls="--", color=line.get_color(),
                label=f"{name} clean")
        selected = next(h["val_robust"] for h in run.history if h["epoch"] == run.epoch)
        ax.plot([run.epoch], [selected], "*", ms=14, color=line.get_color(),
                label=f"{name} selected")
        n_val = run.config.get("eval_subset") or run.config.get("val_size")
    if begin_epoch is not None:
        ax.axvline(begin_epoch - 0.5, color="gray", lw=0.8)
        ax.text(begin_epoch - 0.5, ax.get_ylim()[1], " reweighting on", va="top", fontsize=8)
    ax.set(xlabel="epoch", ylabel=f"accuracy (n={n_val})",
           title="validation accuracy during training")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(fontsize=7)
    return fig


def averaging_curves(runs: Mapping[str, Any], *, eval_steps: int):
    """Raw weights against their average (``ema_decay``) during training: validation accuracy
    against the epoch, clean (left) and PGD (right), the average solid (``ema_val_clean``,
    ``ema_val_robust``) and the raw weights dashed (``val_clean``, ``val_robust``) in one
    colour per run, a star at each run's selected epoch on the average's PGD curve (the
    average selects ``best.pt``). Runs whose history has no ``ema_val_robust`` (trained
    without averaging) are left out; none with it is a ValueError."""
    plt = _plt()
    from matplotlib.ticker import MaxNLocator

    averaged = {name: run for name, run in runs.items()
                if any(h.get("ema_val_robust") is not None for h in run.history)}
    if not averaged:
        raise ValueError(f"none of the runs {list(runs)} logged ema_val_robust: train with "
                         f"ema_decay set to compare raw and averaged weights")
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.5), sharex=True)
    n_val = None
    for name, run in averaged.items():
        ep = [h["epoch"] for h in run.history]
        color = None
        for ax, key, what in [(axes[0], "val_clean", "clean"),
                              (axes[1], "val_robust", f"PGD-{eval_steps}")]:
            line, = ax.plot(ep, [h.get(f"ema_{key}") for h in run.history], marker="o",
                            color=color, label=f"{name} average")
            color = line.get_color()
            ax.plot(ep, [h.get(key) for h in run.history], ls="--", marker=".", color=color,
                    label=f"{name} raw")
            ax.set(xlabel="epoch", title=f"validation {what}")
        selected = next(h["ema_val_robust"] for h in run.history if h["epoch"] == run.epoch)
        axes[1].plot([run.epoch], [selected], "*", ms=14, color=color,
                     label=f"{name} selected")
        n_val = run.config.get("eval_subset") or run.config.get("val_size")
    axes[0].set_ylabel(f"accuracy (n={n_val})")
    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.suptitle("weight averaging: the average (solid) and the raw weights (dashed)")
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------- images
def image_rows(rows: Sequence[tuple[str, Sequence[Any], Sequence[str]]], *,
               title: str = "", width: float = 14, gray: bool = False):
    """A grid of images, one row per ``(label, images, titles)``: ``images`` (C, H, W) each,
    uint8 or float in [0, 1], each with its title; the label on the left of the row."""
    plt = _plt()
    n_cols = max(len(images) for _, images, _ in rows)
    fig, axes = plt.subplots(len(rows), n_cols, figsize=(width, 2.1 * len(rows)),
                             squeeze=False)
    for r, (label, images, titles) in enumerate(rows):
        for c in range(n_cols):
            ax = axes[r, c]
            ax.axis("off")
            if c < len(images):
                ax.imshow(_image(images[c]), cmap="gray" if gray else None)
                ax.set_title(titles[c], fontsize=8)
        axes[r, 0].text(-0.15, 0.5, label, transform=axes[r, 0].transAxes, rotation=90,
                        va="center", ha="right", fontsize=10)
    if title:
        fig.suptitle(title)
    return fig


def adversarial_examples(x, x_adv, y, pred_clean, pred_adv, classes: Sequence[str], *,
                         title: str = ""):
    """Clean images (top row) and their adversarial versions (bottom), each titled with the
    predicted class and whether it is right."""
    def titles(pred):
        return [f"{classes[int(p)]} ({'ok' if int(p) == int(t) else 'WRONG'})"
                for p, t in zip(pred, y)]
    return image_rows([("clean", list(x), titles(pred_clean)),
                       ("attacked", list(x_adv), titles(pred_adv))],
                      title=title, gray=x.shape[1] == 1)


# ----------------------------------------------------------------------------- AMP
def path_grid(paths: Mapping[str, dict], classes: Sequence[str], *, title: str = ""):
    """One row per model, one column per pair: :func:`mixlab.paths.plot_path` of each
    model's interpolation path (clean solid, worst case dashed)."""
    plt = _plt()
    from .paths import plot_path

    first = next(iter(paths.values()))
    n_pairs = len(first["y_a"])
    fig, axes = plt.subplots(len(paths), n_pairs, figsize=(3.2 * n_pairs, 2.4 * len(paths)),
                             sharex=True, sharey=True, squeeze=False)
    for row, (name, path) in enumerate(paths.items()):
        for col in range(n_pairs):
            ya, yb = int(path["y_a"][col]), int(path["y_b"][col])
            plot_path(path, col, axes[row, col], classes=classes,
                      title=f"{name}: {classes[yb]} → {classes[ya]}", legend=(col == 0))
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def path_images(x_a, x_b, y_a, y_b, classes: Sequence[str], *, lams: int = 11):
    """The images along each pair's path (:func:`mixlab.paths.image_strip`), x_b at the
    left (λ = 0) to x_a at the right (λ = 1), one row per pair."""
    plt = _plt()
    from .paths import image_strip

    fig, axes = plt.subplots(len(x_a), 1, figsize=(12, 1.3 * len(x_a)), squeeze=False)
    for row in range(len(x_a)):
        ax = axes[row, 0]
        ax.imshow(image_strip(x_a[row], x_b[row], lams=lams))
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_ylabel(f"{classes[int(y_b[row])]}\n→ {classes[int(y_a[row])]}", fontsize=8)
    axes[0, 0].set_title(f"images along each path, λ = 0 (x_b, left) to λ = 1 (x_a, right), "
                         f"{lams} points")
    return fig


def lambda_histograms(logs: Mapping[str, Mapping[str, np.ndarray]]):
    """Per AMP run (one epoch's log: ``lam0``, ``lam_star``, ``t_geo_minus_lam``; NaN for
    examples not seen): the sampled λ and the optimised λ* (top), t_geo − λ* (bottom)."""
    plt = _plt()
    fig, axes = plt.subplots(2, len(logs), figsize=(3.4 * len(logs), 5.2), squeeze=False)
    bins = np.linspace(0, 1, 21)
    seen_count = 0
    for col, (name, log) in enumerate(logs.items()):
        seen = ~np.isnan(log["lam_star"])
        seen_count = int(seen.sum())
        axes[0, col].hist(log["lam0"][seen], bins=bins, alpha=0.5, label="sampled λ")
        axes[0, col].hist(log["lam_star"][seen], bins=bins, alpha=0.5, label="λ*")
        axes[0, col].set(title=name, xlabel="λ")
        axes[1, col].hist(log["t_geo_minus_lam"][seen], bins=41, color="C2")
        axes[1, col].set(xlabel="t_geo − λ*")
    axes[0, 0].legend(fontsize=8)
    axes[0, 0].set_ylabel("examples")
    axes[1, 0].set_ylabel("examples")
    fig.suptitle(f"AMP, last training epoch ({seen_count} examples per variant)")
    fig.tight_layout()
    return fig


def accuracy_bars(rows: Mapping[str, Mapping[str, Any]],
                  columns: Sequence[str] = ("clean", "fgsm", "pgd20", "cw20", "aa", "robust"),
                  *, title: str = ""):
    """Grouped bars: for each row (a model and checkpoint) its accuracy in percent under
    each column (``robust`` labelled "worst case"); a column a row lacks is left empty."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(7, 1.0 * len(rows)), 3.8))
    width = 0.8 / len(columns)
    x = np.arange(len(rows))
    for k, col in enumerate(columns):
        ax.bar(x + k * width, [100 * r[col] if col in r else np.nan for r in rows.values()],
               width, label=col if col != "robust" else "worst case")
    ax.set_xticks(x + 0.4 - width / 2, list(rows), rotation=35, ha="right", fontsize=8)
    ax.set(ylabel="accuracy (%)", title=title)
    ax.legend(fontsize=8, ncol=len(columns))
    return fig


# ----------------------------------------------------------------------------- GAIRAT
def kappa_histograms(logs: Mapping[str, Sequence[Mapping[str, np.ndarray]]], steps: int):
    """Per reweighted run, the share of training examples at each κ per epoch (a heat map)
    and at a few epochs (steps); ``logs``: run -> its per-epoch logs with ``kappa``."""
    plt = _plt()
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(len(logs), 2, figsize=(11, 3.3 * len(logs)), squeeze=False)
    for (ax_map, ax_hist), (name, epochs) in zip(axes, logs.items()):
        share = kappa_shares([e["kappa"] for e in epochs], steps)
        im = ax_map.imshow(share.T, origin="lower", aspect="auto", cmap="viridis",
                           extent=(0.5, len(share) + 0.5, -0.5, steps + 0.5))
        fig.colorbar(im, ax=ax_map, label="share of examples")
        ax_map.set(xlabel="epoch", ylabel="κ", title=f"{name}: κ histogram per epoch")
        ax_map.xaxis.set_major_locator(MaxNLocator(integer=True))
        for e in spread_indices(len(share), 5):
            ax_hist.step(np.arange(steps + 1), share[e], where="mid", label=f"epoch {e + 1}")
        ax_hist.set(xlabel="κ", ylabel="share of examples", title=f"{name}: selected epochs")
        ax_hist.legend(fontsize=7)
    fig.tight_layout()
    return fig


def weight_functions(kappa_last: np.ndarray, steps: int, lams: Sequence[float], *,
                     used: Mapping[str, Any] | None = None):
    """GAIR weight against κ for each weight function and λ, normalised over the κ of one
    epoch (``kappa_last``) as training normalises each batch. ``used``: that epoch's log
    (``kappa``, ``weight``, ``lam``) and ``weight_fn``, drawn as dots on its panel."""
    plt = _plt()
    import torch

    from .methods.gairat import WEIGHT_FNS, gair_weights

    kappa = torch.as_tensor(np.asarray(kappa_last).astype(np.int64))
    grid = torch.arange(steps + 1)
    fig, axes = plt.subplots(1, len(WEIGHT_FNS), figsize=(13, 3.5), sharey=True)
    for ax, fn in zip(axes, WEIGHT_FNS):
        for lam in (lams if fn != "discrete" else [0.0]):  # Discrete ignores λ
            # normalised over the epoch's κ: the grid points themselves carry no weight
            w = gair_weights(torch.cat([grid, kappa]), steps, lam, fn)
            w = w[:steps + 1] / w[steps + 1:].mean()
            ax.plot(grid, w, marker="o", label=f"λ={lam:g}" if fn != "discrete" else "(no λ)")
        if used is not None and fn == used["weight_fn"]:
            jitter = np.random.default_rng(0).uniform(-0.15, 0.15, len(used["kappa"]))
            ax.scatter(used["kappa"] + jitter, np.asarray(used["weight"], np.float32), s=3,
                       c="k", alpha=0.3, label=f"used (λ={float(used['lam']):g})")
        ax.set(xlabel="κ", title=fn)
        ax.legend(fontsize=7)
    axes[0].set_ylabel("weight (mean 1)")
    return fig


def weight_vs_margin(margin, weight, kappa, *, title: str = ""):
    """Scatter of GAIR weight against the clean CW margin, coloured by κ."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    sc = ax.scatter(np.asarray(margin), np.asarray(weight), c=np.asarray(kappa),
                    cmap="viridis", s=6)
    fig.colorbar(sc, ax=ax, label="κ")
    ax.axvline(0, color="gray", lw=0.8)
    ax.set(xlabel="clean CW margin  z_y − max_{j≠y} z_j", ylabel="GAIR weight (mean 1)",
           title=title)
    return fig


# ----------------------------------------------------------------------------- MMA
def eps_by_epoch(logged: Sequence[Mapping[str, np.ndarray]],
                 val_margins: Sequence[float | None], *, d_max: float, eps: float,
                 max_eps: float, norm: str):
    """MMA's margin estimates ε* of the training examples: histograms of the positive ones
    at a few epochs, their mean and the mean validation margin per epoch, and the shares at
    ε* = 0 (clean CE) and ε* ≥ d_max (past the hinge) per epoch."""
    plt = _plt()
    fig, (ax_hist, ax_mean, ax_share) = plt.subplots(1, 3, figsize=(16, 4))
    shown = spread_indices(len(logged), 6)
    bins = np.linspace(0, max_eps, 31)
    colors = plt.cm.viridis(np.linspace(0, 0.9, len(shown)))
    for color, i in zip(colors, shown):
        e = logged[i]["eps"]
        ax_hist.hist(e[e > 0], bins=bins, histtype="step", lw=2, color=color,
                     label=f"epoch {i + 1} ({(e > 0).mean():.0%} of examples)")
    for x_line, style, label in [(d_max, "--", "d_max"), (eps, ":", "test ε")]:
        ax_hist.axvline(x_line, color="k", ls=style, label=label)
    ax_hist.set(xlabel=f"ε* ({norm}, pixel units)", ylabel="training examples",
                title="ε* of the confidently correct training examples")
    ax_hist.legend(fontsize=7)
    ep = np.arange(1, len(logged) + 1)
    ax_mean.plot(ep, [a["eps"][a["eps"] > 0].mean() if (a["eps"] > 0).any() else 0
                      for a in logged], marker="o", label="mean ε* (ε* > 0)")
    ax_mean.plot(ep, list(val_margins), marker="^", label="mean margin, validation split")
    ax_mean.set(xlabel="epoch", ylabel=f"{norm} distance", title="margins during training")
    ax_share.plot(ep, [(a["eps"] == 0).mean() for a in logged], marker="o",
                  label="ε* = 0 (clean CE)")
    ax_share.plot(ep, [(a["eps"] >= d_max).mean() for a in logged], marker="s",
                  label="ε* ≥ d_max (past the hinge)")
    ax_share.set(xlabel="epoch", ylabel="share of training examples", ylim=(-0.02, 1.02),
                 title="where the training examples are")
    ax_mean.legend(fontsize=8)
    ax_share.legend(fontsize=8)
    return fig


def margin_distributions(margins: Mapping[str, np.ndarray], *, eps: float, d_max: float,
                 max_eps: float, norm: str):
    """Per model: a histogram of the test margins of its correctly classified points, and the
    margin survival curve (:func:`margin_survival`: the accuracy under the margin attack at
    each radius), with the threat model's eps and MMA's d_max marked."""
    plt = _plt()
    fig, (ax_hist, ax_surv) = plt.subplots(1, 2, figsize=(13, 4))
    radii = np.linspace(0, max_eps, 200)
    n = 0
    for name, m in margins.items():
        n = len(m)
        ax_hist.hist(m[m > 0], bins=np.linspace(0, max_eps, 26), histtype="step", lw=2,
                     label=f"{name} (mean {m.mean():.4f}, {(m == 0).mean():.0%} wrong)")
        ax_surv.plot(radii, margin_survival(m, radii), lw=2, label=name)
    for ax in (ax_hist, ax_surv):
        ax.axvline(eps, color="k", ls=":", label="test ε")
        ax.axvline(d_max, color="k", ls="--", label="d_max")
    ax_hist.set(xlabel=f"margin ({norm})", ylabel="test points",
                title=f"margins of the correct ones among {n} test points")
    ax_surv.set(xlabel="radius r", ylabel="share of test points with margin > r",
                title="margin survival (= accuracy under AN-PGD at r)")
    ax_hist.legend(fontsize=8)
    ax_surv.legend(fontsize=8)
    return fig


def accuracy_vs_eps(curves: Mapping[str, Mapping[str, Sequence[float]]],
                    eps_list: Sequence[float], *, xlabel: str, title: str = "",
                    marks: Mapping[str, float] | None = None,
                    bands: Mapping[str, Mapping[str, Sequence[Sequence[float]]]] | None = None):
    """Robust accuracy against the radius: ``curves`` is model -> attack -> accuracies at
    ``eps_list``; one colour per model, one line style per attack. ``marks``: label ->
    radius drawn as a dotted vertical line (e.g. the test eps). ``bands``: model -> attack ->
    several curves (e.g. one per training seed) whose lowest and highest value at each radius
    are shaded around the line."""
    plt = _plt()
    styles = ["-o", "--x", ":s", "-.^"]
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for k, (model, by_attack) in enumerate(curves.items()):
        for style, (attack, accs) in zip(styles, by_attack.items()):
            ax.plot(eps_list, accs, style, color=f"C{k}", label=f"{model}, {attack}")
            band = (bands or {}).get(model, {}).get(attack)
            if band is not None and len(band) > 1:
                ax.fill_between(eps_list, np.min(band, axis=0), np.max(band, axis=0),
                                color=f"C{k}", alpha=0.15, lw=0)
    for label, x in (marks or {}).items():
        ax.axvline(x, color="k", ls=":", label=label)
    ax.set(xlabel=xlabel, ylabel="accuracy", title=title)
    ax.legend(fontsize=8)
    return fig


# ----------------------------------------------------------------------------- mixup theory
def theory_traces(traces: Mapping[tuple[str, float], Sequence[Mapping[str, float]]],
                  alphas: Sequence[float], *, title: str = ""):
    """Exact mixup loss and its approximation L̃_mix along mixup training, per model kind
    (``logistic``, ``mlp``) and α (``traces[kind, α]``: rows of
    :func:`mixlab.theory.track_mixup_losses`), and the relative error of the regulariser
    against the spread that controls the expansion."""
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.2))
    for ax, kind in zip(axes[:2], ("logistic", "mlp")):
        for k, a in enumerate(alphas):
            rows = traces[kind, a]
            steps = [r["step"] for r in rows]
            ax.plot(steps, [r["exact"] for r in rows], "-o", color=f"C{k}", label=f"exact, α={a}")
            ax.plot(steps, [r["approx"] for r in rows], "--x", color=f"C{k}",
                    label=f"L̃_mix, α={a}")
        ax.set(xscale="symlog", xlabel="step of mixup training", ylabel="mixup loss (nats)",
               title=f"{kind} {title}")
        ax.legend(fontsize=7)
    ax = axes[2]
    for (kind, a), rows in traces.items():
        pts = [(r["spread"], abs(r["reg_approx"] - r["reg_exact"]) / abs(r["reg_exact"]))
               for r in rows if abs(r["reg_exact"]) > 1e-12]
        if pts:
            ax.scatter(*zip(*pts), marker="o" if kind == "logistic" else "^",
                       label=f"{kind}, α={a}")
    ax.set(xscale="log", yscale="log", xlabel="rms of ∇f(x_i)ᵀ(x_j − x_i)",
           ylabel="|approx − exact| / |exact| of R1+R2+R3", title="where the expansion holds")
    ax.legend(fontsize=7)
    return fig


def theory_alpha(ratios: Mapping[str, Sequence[float]], alpha_grid: Sequence[float],
                 scale_rows: Sequence[tuple[float, float, float, float]], *, alpha: float):
    """Left: |approximate / exact regulariser| against α for fixed models. Right: exact and
    approximate mixup loss (and L_std) of logistic regression along a direction at growing
    ‖θ‖; ``scale_rows``: (‖θ‖, exact, approximate, L_std)."""
    plt = _plt()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.2))
    for name, r in ratios.items():
        ax1.plot(alpha_grid, np.abs(r), "-o", label=name)
    ax1.axhline(1.0, color="k", lw=0.8)
    ax1.set(xscale="log", yscale="log", xlabel="α", ylabel="|(R1+R2+R3) / (exact − L_std)|",
            title="the approximation vs α: no improvement as α → 0")
    ax1.legend(fontsize=7)
    s_, ex_, ap_, st_ = map(np.array, zip(*scale_rows))
    ax2.plot(s_, ex_, "-o", label="exact mixup loss")
    ax2.plot(s_, ap_, "--x", label="L̃_mix")
    ax2.plot(s_, st_, ":", color="gray", label="L_std")
    ax2.set(xscale="log", yscale="log", xlabel="‖θ‖ (along the ERM direction)",
            ylabel="loss (nats)", title=f"logistic regression, α = {alpha}: agree small, "
                                        f"part confident")
    ax2.legend(fontsize=7)
    return fig


def theory_terms(traces: Mapping[tuple[str, float], Sequence[Mapping[str, float]]],
                 alphas: Sequence[float], alpha_grid: Sequence[float], eps_curve: Sequence[Any]):
    """|R1|, R2 and |R3| along mixup training per model kind and α, and ε_mix·√d against α
    (``eps_curve``: :func:`mixlab.theory.eps_mix` results at ``alpha_grid``)."""
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.2))
    for ax, kind in zip(axes[:2], ("logistic", "mlp")):
        for k, a in enumerate(alphas):
            rows = traces[kind, a]
            steps = [r["step"] for r in rows]
            ax.plot(steps, [abs(r["r1"]) for r in rows], "-o", color=f"C{k}", label=f"|R1|, α={a}")
            ax.plot(steps, [r["r2"] for r in rows], "--s", color=f"C{k}", label=f"R2, α={a}")
            if kind == "mlp":
                ax.plot(steps, [abs(r["r3"]) for r in rows], ":^", color=f"C{k}",
                        label=f"|R3|, α={a}")
        ax.set(xscale="symlog", yscale="log", xlabel="step of mixup training", ylabel="nats",
               title=f"terms of L̃_mix, {kind}" + (" (R3 = 0)" if kind == "logistic" else ""))
        ax.legend(fontsize=7)
    ax = axes[2]
    ax.plot(alpha_grid, [e.eps_l2 for e in eps_curve], "-o")
    for a in alphas:
        ax.axvline(a, color="gray", lw=0.6)
    first = eps_curve[0]
    ax.set(xscale="log", xlabel="α", ylabel="ε_mix·√d (l2 radius, input units)",
           title=f"ε_mix, R = {first.R:.3f}, c_x = {first.c_x:.2f}, d = {first.d}")
    return fig


def decision_boundaries(nets: Mapping[float, Any], data, accuracy: Mapping[float, tuple]):
    """Per α (0: ERM) the decision boundary of a 2-D model over its training points, titled
    with train and test accuracy, and the train − test gap against α (last panel)."""
    plt = _plt()
    from .theory import decision_grid

    alphas = list(nets)
    fig, axes = plt.subplots(1, len(alphas) + 1, figsize=(4.2 * (len(alphas) + 1), 3.8))
    for ax, a in zip(axes, alphas):
        xx, yy, prob = decision_grid(nets[a], data.x)
        ax.contourf(xx, yy, prob, levels=20, cmap="RdBu_r", alpha=0.6)
        ax.contour(xx, yy, prob, levels=[0.5], colors="k")
        ax.scatter(data.x[:, 0], data.x[:, 1], c=data.y, cmap="RdBu_r", edgecolors="k", s=25)
        tr, te = accuracy[a]
        ax.set(title=("ERM" if a == 0 else f"mixup α={a}") + f": train {tr:.2f}, test {te:.2f}",
               xticks=[], yticks=[])
    ax = axes[-1]
    ax.plot(range(len(alphas)), [accuracy[a][0] - accuracy[a][1] for a in alphas], "-o")
    ax.set(xticks=range(len(alphas)),
           xticklabels=["ERM" if a == 0 else f"α={a}" for a in alphas],
           ylabel="train − test accuracy", title=f"generalisation gap, n={len(data.x)}")
    return fig


def bound_figure(eps_grid: Sequence[float], adv_second_order: Sequence[float],
                 adv_exact: Sequence[float], bounds: Mapping[float, Mapping[str, Any]],
                 slack: Mapping[float, Sequence[tuple[int, float, float]]], *, title: str = ""):
    """Left: the second-order and exact l2 adversarial losses against ε, L̃_mix per α
    (horizontal) and ε_mix·√d (dotted). Right: the slack L̃_mix − L̃_adv(ε_mix√d) (and
    against the exact adversarial loss) along training; ``slack[α]``: (step, slack,
    exact slack) rows."""
    plt = _plt()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.2))
    ax1.plot(eps_grid, adv_second_order, label="L̃_adv(ε) (second order)")
    ax1.plot(eps_grid, adv_exact, "--", label="exact l2 adversarial loss")
    for k, (a, b) in enumerate(bounds.items()):
        ax1.axhline(b["mix"], color=f"C{k + 2}", lw=1, label=f"L̃_mix, α={a}")
        ax1.axvline(b["eps_l2"], color=f"C{k + 2}", ls=":", lw=1)
        ax1.plot([b["eps_l2"]], [b["adv"]], "o", color=f"C{k + 2}")
    ax1.set(xlabel="ε (l2 radius, input units); dotted: ε_mix·√d", ylabel="loss (nats)",
            title=title)
    ax1.legend(fontsize=7)
    for k, (a, rows) in enumerate(slack.items()):
        if rows:
            st, s2, se = map(np.array, zip(*rows))
            ax2.plot(st, s2, "-o", color=f"C{k}", label=f"L̃_mix − L̃_adv(ε_mix√d), α={a}")
            ax2.plot(st, se, ":x", color=f"C{k}", label=f"L̃_mix − exact adv(ε_mix√d), α={a}")
    ax2.axhline(0, color="k", lw=0.8)
    ax2.set_xlim(left=0)
    ax2.set(xscale="symlog", xlabel="ERM step (snapshots strictly inside Θ)",
            ylabel="slack (nats)", title="the bound along training")
    ax2.legend(fontsize=7)
    return fig
