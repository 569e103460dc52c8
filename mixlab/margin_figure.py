"""The margin explorer's static figure (matplotlib), and the text both of its views share.

:func:`margin_path_figure` draws the paths of ``mixlab.margin_paths`` as one figure for
headless runs (papermill, CI, ``save_figure``): per model, the class probabilities and logits
along t with the eps line, the first boundary crossing and the margin estimate, and below, the
image at a few positions along the path with each model's prediction there. The interactive
view (``mixlab.explorer.MarginExplorer.path_figure``) draws its current state with it.

>>> fig = margin_path_figure({"A": path}, {"A": model}, x, u, label=3, classes=classes,
...                          norm="Linf", eps=8/255, max_eps=32/255, t_max=32/255,
...                          title="image #0 (cat), direction: random")
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch

from .attacks import predict
from .margin_paths import PathData, model_device, path_points


def format_distance(t: float, norm: str) -> str:
    """A distance for humans, pixel units: Linf also in 1/255 units; "none" for nan."""
    if math.isnan(t):
        return "none"
    return f"{t:.4f} ({t * 255:.1f}/255)" if norm == "Linf" else f"{t:.3f}"


def format_margin(margin: float, max_eps: float, norm: str) -> str:
    """A margin estimate for humans: "≥ max_eps" where the search found no boundary (the
    estimator returns max_eps itself then)."""
    if margin >= max_eps:
        return f"≥ {format_distance(max_eps, norm)}"
    return format_distance(margin, norm)


def reference_lines(path: PathData, *, eps: float, max_eps: float, t_max: float
                    ) -> list[tuple[str, float, str, str]]:
    """(what, t, colour, dash) of the vertical lines drawn on every panel: eps (grey), the
    first crossing (red) and the margin estimate (green, where one was found), those in
    [0, t_max]."""
    lines = [("eps", eps, "grey", "dot"), ("crossing", path.crossing, "red", "dash")]
    if path.margin < max_eps:
        lines.append(("margin est.", path.margin, "green", "dot"))
    return [line for line in lines if not math.isnan(line[1]) and line[1] <= t_max]


def run_label(name: str, run: Any) -> str:
    """A run's name, with its method in brackets only where the name does not say it."""
    config = getattr(run, "config", None) or {}
    method = str(config.get("method", "")) if isinstance(config, Mapping) else ""
    shown = name.lower().replace("-", "_")
    return f"{name} [{method}]" if method and method.lower() not in shown else name


def margin_path_figure(paths: Mapping[str, PathData], models: Mapping[str, torch.nn.Module],
                       x: torch.Tensor, u: torch.Tensor, *, label: int, classes: Sequence[str],
                       norm: str, eps: float, max_eps: float, t_max: float, title: str,
                       labels: Mapping[str, str] | None = None,
                       positions: Sequence[float] | None = None, current: float = 0.0,
                       colors: Sequence[Any] | None = None):
    """The paths as a static matplotlib figure; returns the Figure.

    paths, models: panel name (e.g. "A", "B") -> its :class:`~mixlab.margin_paths.PathData`
    and model, in display order. x, u: (1, C, H, W) start image and unit direction (any
    device). label: the true class; classes: the K class names. norm, eps, max_eps, t_max:
    the threat model and the path's length, pixel units. title: the figure's title. labels:
    panel -> the run's name for the panel titles (default: the panel names). positions: the t
    at which to show the image (default: the start, ``current``, the first panel's crossing,
    the end); each is predicted again by every model (a forward at the exact t). colors: one
    colour per class (default: matplotlib's tab10/tab20)."""
    import matplotlib.pyplot as plt

    panels = list(paths)
    labels = labels or {p: p for p in panels}
    if colors is None:
        cmap = plt.get_cmap("tab10" if len(classes) <= 10 else "tab20")
        colors = [cmap(k % cmap.N) for k in range(len(classes))]
    first = paths[panels[0]]
    if positions is None:
        positions = [0.0, float(current)]
        if not math.isnan(first.crossing):
            positions.append(first.crossing)
        positions.append(t_max)
    fig = plt.figure(figsize=(11, 3.0 * len(panels) + 2.4), layout="constrained")
    grid = fig.add_gridspec(len(panels) + 1, 2 * len(positions),
                            height_ratios=[3.0] * len(panels) + [2.0])
    half = len(positions)
    for row, panel in enumerate(panels):
        p = paths[panel]
        for col, (values, ylabel) in enumerate(((p.probs, "probability"), (p.logits, "logit"))):
            ax = fig.add_subplot(grid[row, col * half:(col + 1) * half])
            for k, cname in enumerate(classes):
                ax.plot(p.ts, values[:, k], color=colors[k], lw=2.5 if k == label else 1,
                        label=cname)
            for what, t, color, dash in reference_lines(p, eps=eps, max_eps=max_eps,
                                                        t_max=t_max):
                ax.axvline(t, color=color, ls=":" if dash == "dot" else "--", lw=1.2,
                           label=what)
            ax.set_xlim(0, t_max)
            ax.set_ylabel(ylabel)
            ax.set_xlabel(f"t ({norm}, pixel units)")
            if col == 0:  # one title per model row: the name is not repeated
                ax.set_title(f"{panel}: {labels[panel]}, crossing "
                             f"{format_distance(p.crossing, norm)}, margin est. "
                             f"{format_margin(p.margin, max_eps, norm)}", fontsize=9, loc="left")
            if row == 0 and col == 1:
                ax.legend(fontsize=6, ncol=2, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    x, u = x.detach().float().cpu(), u.detach().float().cpu()
    imgs = path_points(x, u, torch.tensor(positions))
    preds = {}  # panel -> predicted class at each shown position (a forward: exact t)
    for panel in panels:
        model = models[panel]
        preds[panel] = predict(model, imgs.to(model_device(model))).tolist()
    for j, (t, img) in enumerate(zip(positions, imgs.numpy())):
        ax = fig.add_subplot(grid[-1, 2 * j:2 * j + 2])
        ax.imshow(img.transpose(1, 2, 0).squeeze(), cmap="gray" if img.shape[0] == 1
                  else None, vmin=0, vmax=1, interpolation="nearest")
        preds_j = ", ".join(f"{panel}: {classes[preds[panel][j]]}" for panel in panels)
        ax.set_title(f"t={format_distance(t, norm)}\n{preds_j}", fontsize=8)
        ax.axis("off")
    fig.suptitle(title, fontsize=11)
    return fig
