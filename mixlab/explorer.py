"""Margin explorer: walk from a test image along a direction and watch the classifier decide.

The interactive view over ``mixlab.margin_paths`` (the computation) and ``mixlab.margin_figure``
(the static figure): pick trained runs, a test image and a direction, then move along the path
x(t) = clip(x + t·u, 0, 1) and watch every class's probability and logit, the predicted class,
the first boundary crossing along the path and the model's margin estimate
(:func:`mixlab.attacks.estimate_margin`: PGD at ``max_eps`` then a bisection, MMA's test-time
estimator, arXiv 1812.02637). Two models are shown side by side on the same image and path.

A path is computed once, in one batched forward per model (``n_points`` points), whenever the
image, direction or model changes; moving the slider only moves a marker and redraws one image.

The widget explains its terms: a "what the terms mean" section under the controls
(:data:`HELP_HTML`: t, eps, max_eps, PGD-CE, AN-PGD, SLM, the crossing, the margin estimate, the
argmax strip) and a tooltip on every control. Every class is named on the argmax strip.

:class:`MarginExplorer` needs ipywidgets and plotly (``pip install 'mixlab[notebooks]'``);
:meth:`MarginExplorer.path_figure` draws the current state as a static matplotlib figure for
headless runs (papermill, CI).

>>> explorer = MarginExplorer({"erm": erm_run, "pgd_at": at_run}, x_test, y_test, classes,
...                           norm="Linf", eps=8/255)
>>> explorer.widget                      # display it in JupyterLab
>>> explorer.set_direction("anpgd"); explorer.set_position(4/255)
>>> fig = explorer.path_figure()         # matplotlib, for save_figure
"""
from __future__ import annotations

import contextlib
import io
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from .attacks import estimate_margin
from .extras import require
from .margin_figure import (format_distance, format_margin, margin_path_figure, reference_lines,
                            run_label)
from .margin_paths import (DIRECTIONS, PathData, model_device, model_of, path_data,
                           path_direction, path_points)

NONE = "(none)"

#: what each direction means, shown as the direction dropdown's tooltip and in the help text
DIRECTION_HELP = {
    "pgd": "PGD-CE: projected gradient descent on the cross-entropy loss, at the threat "
           "model's eps, against the 'attack on' model; the path continues past eps",
    "anpgd": "AN-PGD: MMA's adaptive-norm PGD (Ding et al. 2020), PGD on the SLM loss at max_eps; "
             "SLM (soft logit margin) = the largest other logit minus the true class's logit, "
             "smoothed with a log-sum-exp; it is positive once the image is misclassified, so the "
             "attack pushes towards the nearest decision boundary",
    "random": "random signs (Linf: a corner of the eps-cube) or a Gaussian (L2), seeded",
    "image": "the straight line from this image towards another test image",
}

#: the short glossary under the controls (HTML)
HELP_HTML = (
    "<details><summary><b>what the terms mean</b></summary><ul style='margin:2px 0'>"
    "<li><b>t</b>: the distance walked from the clean image x along the direction u, in pixel "
    "units of the threat model's norm (Linf: 8/255 = 0.0314); x(t) = clip(x + t u, 0, 1)</li>"
    "<li><b>eps</b>: the threat model's radius (grey line); <b>max_eps</b>: how far the margin "
    "search and the adversarial directions go</li>"
    + "".join(f"<li><b>{DIRECTIONS[k]}</b>: {DIRECTION_HELP[k]}</li>" for k in DIRECTIONS)
    + "<li><b>crossing</b> (red line): the first t at which the prediction leaves the true "
    "class on this path</li>"
    "<li><b>margin est.</b> (green line): the model's margin at x, estimated as MMA does "
    "(PGD at max_eps, then a bisection); '≥' when no boundary was found within max_eps</li>"
    "<li><b>argmax</b>: the predicted class at each t; the thick line is the true class</li>"
    "</ul></details>")


# ----------------------------------------------------------------------------- images
def _to_float_image(x: torch.Tensor) -> torch.Tensor:
    return x.float() / 255 if x.dtype == torch.uint8 else x.float()


def image_png(img: np.ndarray, scale: int = 4) -> bytes:
    """PNG bytes of an (C, H, W) image in [0, 1], enlarged ``scale`` times (nearest pixel)."""
    import matplotlib.image

    arr = np.clip(img, 0, 1).transpose(1, 2, 0)
    arr = np.repeat(np.repeat(arr, scale, 0), scale, 1)
    buf = io.BytesIO()
    if arr.shape[2] == 1:
        matplotlib.image.imsave(buf, arr[:, :, 0], cmap="gray", vmin=0, vmax=1, format="png")
    else:
        matplotlib.image.imsave(buf, arr, format="png")
    return buf.getvalue()


def delta_image(delta: np.ndarray) -> np.ndarray:
    """A perturbation (C, H, W) shown around grey 0.5, scaled so its largest entry is visible."""
    peak = float(np.abs(delta).max())
    return 0.5 + 0.5 * delta / peak if peak > 0 else np.full_like(delta, 0.5)


# ----------------------------------------------------------------------------- the widget app
class MarginExplorer:
    """ipywidgets + plotly app over trained runs (see the module docstring).

    Args:
        runs: name -> ``Run`` (from ``train_or_load`` / ``load_run``) or a bare model; models
            stay on their device and are put in eval mode by every forward.
        x_test: (N, C, H, W) test images, uint8 or float in [0, 1] (kept where they are; one
            image at a time is moved to the model's device). y_test: (N,) labels.
        classes: the K class names.
        norm: "Linf" or "L2"; eps: the threat model's radius (pixel units), drawn as a
            reference line and used by the PGD direction; max_eps: how far adversarial and
            random paths go and the margin estimator's search range (default 4·eps).
        steps: PGD steps of the directions and of the margin estimate.
        n_points: points per path (one batched forward per model).
        n_thumbs: thumbnails (the first test images) in the clickable grid.
        compare: the second model's name (default: the second run; ``None`` for one panel).
        direction, image, target, seed: the starting direction (a key of :data:`DIRECTIONS`),
            test image index, image walked towards ("image") and random seed ("random").

    Programmatic control (tests, notebooks): :meth:`set_runs`, :meth:`set_image`,
    :meth:`set_direction`, :meth:`set_position`; state in :attr:`paths` (slot "A"/"B" ->
    :class:`PathData`), :attr:`u`, :attr:`figures`; :attr:`widget` is what to display.
    """

    def __init__(self, runs: Mapping[str, Any], x_test: torch.Tensor, y_test: torch.Tensor,
                 classes: Sequence[str], *, norm: str = "Linf", eps: float,
                 max_eps: float | None = None, steps: int = 10, n_points: int = 101,
                 n_thumbs: int = 16, compare: str | None = "auto", direction: str = "anpgd",
                 image: int = 0, target: int = 1, seed: int = 0):
        W = require("ipywidgets", feature="the margin explorer widget")
        require("plotly", feature="the margin explorer widget")
        if not runs:
            raise ValueError("runs is empty: pass at least one name -> Run or model")
        if norm not in ("Linf", "L2"):
            raise ValueError(f"unknown norm {norm!r}; choose 'Linf' or 'L2'")
        if direction not in DIRECTIONS:
            raise ValueError(f"unknown direction {direction!r}; choose one of {list(DIRECTIONS)}")
        self.runs = dict(runs)
        self.x_test, self.y_test = x_test, y_test
        self.classes = [str(c) for c in classes]
        self.norm, self.eps = norm, float(eps)
        self.max_eps = float(max_eps) if max_eps is not None else 4 * self.eps
        self.steps, self.n_points = int(steps), int(n_points)
        self.paths: dict[str, PathData] = {}
        self.u: torch.Tensor | None = None
        self.t_max = self.max_eps
        self.note = ""
        self._margins: dict[tuple[str, int], float] = {}  # (run, image) -> margin estimate
        self._quiet = False  # True while the app itself sets widget values
        self._titles: dict[str, str] = {}  # slot -> the path part of the panel title
        self._logit_range: dict[str, tuple[float, float]] = {}  # slot -> logit axis range
        self._points: np.ndarray | None = None  # (n_points, C, H, W) the path's images, CPU

        names = list(self.runs)
        second = names[1] if len(names) > 1 else NONE
        if compare != "auto":
            second = compare if compare is not None else NONE
        style = {"description_width": "initial"}
        # widths follow the longest option so that no label is cut off
        run_width = f"{max(140, 8 * max(len(n) for n in [NONE, *names]) + 110)}px"
        self.run_a = W.Dropdown(options=names, value=names[0], description="model A", style=style,
                                layout=W.Layout(width=run_width),
                                tooltip="the model of the left panel")
        self.run_b = W.Dropdown(options=[NONE, *names], value=second, description="model B",
                                style=style, layout=W.Layout(width=run_width),
                                tooltip="the model of the right panel, on the same path")
        self.index = W.IntSlider(value=image, min=0, max=len(x_test) - 1, description="image",
                                 continuous_update=False, style=style,
                                 tooltip="the test image the path starts from")
        self.direction = W.Dropdown(
            options=[(label, key) for key, label in DIRECTIONS.items()], value=direction,
            description="direction", style=style,
            layout=W.Layout(width=f"{8 * max(map(len, DIRECTIONS.values())) + 110}px"),
            tooltip="; ".join(DIRECTION_HELP.values()))
        self.attack_on = W.Dropdown(options=names, value=names[0], description="attack on",
                                    style=style, layout=W.Layout(width=run_width),
                                    tooltip="the model the adversarial directions attack")
        self.target = W.BoundedIntText(value=target, min=0, max=len(x_test) - 1,
                                       description="towards image", style=style,
                                       layout=W.Layout(width="190px"),
                                       tooltip="the image the 'towards another image' path ends at")
        self.seed = W.IntText(value=seed, description="seed", style=style,
                              layout=W.Layout(width="130px"),
                              tooltip="the seed of the random direction")
        step = self.max_eps / (self.n_points - 1)
        self.position = W.FloatSlider(value=0.0, min=0.0, max=self.max_eps, step=step,
                                      description="t", readout_format=".4f",
                                      continuous_update=True, style=style,
                                      layout=W.Layout(width="60%"),
                                      tooltip="t: the distance walked along the direction")
        self.position.add_class("mixlab-position")
        self.info = W.HTML()
        self.image_widgets = {k: W.Image(format="png", layout=W.Layout(width="128px"))
                              for k in ("clean", "perturbed", "delta")}
        images = W.HBox([W.VBox([W.HTML(f"<b>{label}</b>"), self.image_widgets[k]])
                         for k, label in (("clean", "clean x"), ("perturbed", "x(t)"),
                                          ("delta", "x(t) − x (rescaled)"))])
        self.figures = {slot: self._make_figure() for slot in ("A", "B")}
        # panels keep their full width (a squeezed panel would cut off the legend); a window
        # too narrow for two puts B under A
        self.panels = {slot: W.VBox([self.figures[slot]], layout=W.Layout(flex="0 0 auto"))
                       for slot in ("A", "B")}
        self.thumbs = self._make_thumbnails(min(n_thumbs, len(x_test)))

        wrap = W.Layout(flex_flow="row wrap")  # a narrow window wraps rows instead of cutting
        controls = W.VBox([
            W.HBox([self.run_a, self.run_b, self.attack_on], layout=wrap),
            W.HBox([self.index, self.direction, self.target, self.seed], layout=wrap),
            W.HBox([self.position]),
        ])
        self.help = W.HTML(HELP_HTML)
        self.widget = W.VBox([
            W.HTML("<h3>Margin explorer</h3>"),
            controls,
            self.help,
            W.Accordion(children=[self.thumbs], titles=("test images (click one)",)),
            self.info,
            W.HBox([self.panels["A"], self.panels["B"]], layout=W.Layout(flex_flow="row wrap")),
            images,
        ])
        self.widget.add_class("mixlab-explorer")

        for w in (self.run_a, self.run_b, self.index, self.direction, self.attack_on,
                  self.target, self.seed):
            w.observe(self._on_setting, names="value")
        self.position.observe(self._on_position, names="value")
        self.recompute()

    # ------------------------------------------------------------------ programmatic control
    def set_runs(self, a: str, b: str | None = None) -> None:
        """Show run ``a`` (left) and ``b`` (right; None: one panel)."""
        with self._hold():
            self.run_a.value = a
            self.run_b.value = b if b is not None else NONE
        self.recompute()

    def set_image(self, index: int) -> None:
        """Start from test image ``index``."""
        with self._hold():
            self.index.value = int(index)
        self.recompute()

    def set_direction(self, kind: str, *, target: int | None = None, seed: int | None = None,
                      attack_on: str | None = None) -> None:
        """Walk along ``kind`` (a key of :data:`DIRECTIONS`); ``target``: the image index for
        "image"; ``seed`` for "random"; ``attack_on``: the run adversarial directions attack."""
        with self._hold():
            self.direction.value = kind
            if target is not None:
                self.target.value = int(target)
            if seed is not None:
                self.seed.value = int(seed)
            if attack_on is not None:
                self.attack_on.value = attack_on
        self.recompute()

    def set_position(self, t: float) -> None:
        """Move the slider to distance ``t`` (pixel units); the panels show the nearest of
        the path's ``n_points`` grid points."""
        self.position.value = float(t)  # the observer updates the figures

    @property
    def step(self) -> int:
        """The grid index of the slider's position."""
        return int(round(self.position.value / max(self.position.step, 1e-12)))

    # ------------------------------------------------------------------ computation
    def shown(self) -> dict[str, str]:
        """Slot -> run name of the panels on screen."""
        out = {"A": self.run_a.value}
        if self.run_b.value != NONE:
            out["B"] = self.run_b.value
        return out

    def _image(self, index: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        x = _to_float_image(self.x_test[index:index + 1]).to(device)
        return x, self.y_test[index:index + 1].to(device=device, dtype=torch.long)

    def _margin(self, name: str, index: int) -> float:
        """The margin estimate of ``name`` at image ``index`` (cached: direction-free)."""
        key = (name, index)
        if key not in self._margins:
            model = model_of(self.runs[name])
            x, y = self._image(index, model_device(model))
            eps = estimate_margin(model, x, y, norm=self.norm, max_eps=self.max_eps,
                                  steps=self.steps)
            self._margins[key] = float(eps.flatten()[0])
        return self._margins[key]

    def recompute(self) -> None:
        """New direction and paths (one batched forward per shown model), then redraw."""
        index = self.index.value
        attacker = model_of(self.runs[self.attack_on.value])
        device = model_device(attacker)
        x, y = self._image(index, device)
        target = self.target.value
        if self.direction.value == "image" and target == index:
            target = (index + 1) % len(self.x_test)
        x_target = self._image(target, device)[0] if self.direction.value == "image" else None
        try:
            self.u, self.t_max, self.note = path_direction(
                self.direction.value, attacker, x, y, norm=self.norm, eps=self.eps,
                max_eps=self.max_eps, steps=self.steps, x_target=x_target, seed=self.seed.value)
        except ValueError as err:  # e.g. a duplicate target image: say so, walk randomly
            self.u, self.t_max, _ = path_direction(
                "random", attacker, x, y, norm=self.norm, eps=self.eps, max_eps=self.max_eps,
                seed=self.seed.value)
            self.note = f"{err}; random used"
        ts = torch.linspace(0, self.t_max, self.n_points)
        self.paths = {}
        for slot, name in self.shown().items():
            model = model_of(self.runs[name])
            dev = model_device(model)
            xm, ym = self._image(index, dev)
            self.paths[slot] = path_data(model, xm, ym, self.u.to(dev), ts,
                                         margin=self._margin(name, index))
        self._points = path_points(x, self.u, ts).float().cpu().numpy()  # for the image views
        with self._hold():
            self.position.max = self.t_max
            self.position.step = self.t_max / (self.n_points - 1)
            self.position.value = min(self.position.value, self.t_max)
        self._redraw_paths()
        self._redraw_position()

    # ------------------------------------------------------------------ drawing
    def _colors(self) -> list[str]:
        import plotly.colors

        palette = plotly.colors.qualitative.Plotly + plotly.colors.qualitative.Dark24
        return [palette[k % len(palette)] for k in range(len(self.classes))]

    def _make_figure(self):
        """Three stacked panels sharing t: probabilities, logits, predicted class. Traces:
        K probability lines, K logit lines, the predicted-class markers, then the position
        marker (one vertical line per panel, the only traces the slider moves)."""
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots

        # the argmax strip gets ~16 px per class so that every class is named on its axis
        strip = 16 * len(self.classes) + 20
        height = 480 + strip
        base = make_subplots(rows=3, cols=1, shared_xaxes=True, vertical_spacing=0.05,
                             row_heights=[(1 - strip / height) / 2] * 2 + [strip / height])
        fig = go.FigureWidget(base)
        colors = self._colors()
        for row, what in ((1, "prob"), (2, "logit")):
            for k, name in enumerate(self.classes):
                fig.add_scatter(x=[], y=[], mode="lines", name=name, legendgroup=name,
                                showlegend=row == 1, line=dict(color=colors[k], width=1.5),
                                meta=what, row=row, col=1)
        fig.add_scatter(x=[], y=[], mode="markers", name="predicted", showlegend=False,
                        marker=dict(size=5), meta="pred", row=3, col=1)
        for row in (1, 2, 3):
            fig.add_scatter(x=[0, 0], y=[0, 1], mode="lines", showlegend=False,
                            line=dict(color="black", width=2), meta="position",
                            hoverinfo="skip", row=row, col=1)
        fig.update_yaxes(title_text="probability", range=[0, 1.02], row=1, col=1)
        fig.update_yaxes(title_text="logit", row=2, col=1)
        fig.update_yaxes(title_text="argmax", type="category", row=3, col=1,
                         categoryorder="array", categoryarray=self.classes,
                         range=[-0.5, len(self.classes) - 0.5], tickmode="array",
                         tickvals=self.classes, ticktext=self.classes, tickfont=dict(size=10),
                         automargin=True)
        unit = "Linf" if self.norm == "Linf" else "L2"
        fig.update_xaxes(title_text=f"t ({unit} distance, pixel units)", row=3, col=1)
        fig.update_layout(width=520, height=height, margin=dict(l=60, r=10, t=80, b=40),
                          legend=dict(font=dict(size=10)), title=dict(font=dict(size=13)))
        return fig

    def trace_index(self, meta: str) -> list[int]:
        """Indices of the figure traces tagged ``meta`` ("prob", "logit", "pred", "position")."""
        return [i for i, tr in enumerate(self.figures["A"].data) if tr.meta == meta]

    def _fmt(self, t: float) -> str:
        return format_distance(t, self.norm)

    def _fmt_margin(self, m: float) -> str:
        return format_margin(m, self.max_eps, self.norm)

    def _reference_lines(self, p: PathData) -> list[tuple[str, float, str, str]]:
        return reference_lines(p, eps=self.eps, max_eps=self.max_eps, t_max=self.t_max)

    def _redraw_paths(self) -> None:
        """Draw the whole path in every shown panel (after a recompute)."""
        shown = self.shown()
        self.panels["B"].layout.display = None if "B" in shown else "none"
        label = int(self.y_test[self.index.value])
        colors = self._colors()
        self._titles, self._logit_range = {}, {}
        for slot, name in shown.items():
            p, fig = self.paths[slot], self.figures[slot]
            lo, hi = float(p.logits.min()), float(p.logits.max())
            pad = 0.05 * (hi - lo) + 1e-3
            self._logit_range[slot] = (lo - pad, hi + pad)
            with fig.batch_update():
                for i in self.trace_index("prob") + self.trace_index("logit"):
                    tr = fig.data[i]
                    k = self.classes.index(tr.name)
                    tr.x = p.ts
                    tr.y = (p.probs if tr.meta == "prob" else p.logits)[:, k]
                    tr.line.width = 3.5 if k == label else 1.5  # the true class stands out
                pred = fig.data[self.trace_index("pred")[0]]
                pred.x, pred.y = p.ts, [self.classes[c] for c in p.pred]
                pred.marker.color = [colors[c] for c in p.pred]
                fig.layout.shapes = [
                    dict(type="line", xref="x", yref="paper", x0=t, x1=t, y0=0, y1=1,
                         name=what, line=dict(color=color, dash=dash, width=1.5))
                    for what, t, color, dash in self._reference_lines(p)]
                fig.layout.xaxis3.range = [0, self.t_max]
                fig.layout.yaxis2.range = list(self._logit_range[slot])
            self._titles[slot] = (f"{slot}: {self._run_label(name)}<br>crossing "
                                  f"{self._fmt(p.crossing)}, margin est. "
                                  f"{self._fmt_margin(p.margin)}")

    def _run_label(self, name: str) -> str:
        return run_label(name, self.runs[name])

    def _redraw_position(self) -> None:
        """Move the markers and the perturbed image to the slider's position (no forward)."""
        k = min(self.step, self.n_points - 1)
        t = float(self.paths["A"].ts[k])
        label = int(self.y_test[self.index.value])
        for slot in self.shown():
            p, fig = self.paths[slot], self.figures[slot]
            c = int(p.pred[k])
            spans = ([0, 1], list(self._logit_range[slot]), [self.classes[0], self.classes[-1]])
            with fig.batch_update():
                for i, span in zip(self.trace_index("position"), spans):
                    fig.data[i].x, fig.data[i].y = [t, t], span
                verdict = "correct" if c == label else "WRONG"
                fig.layout.title.text = (f"{self._titles[slot]}<br>at t = {self._fmt(t)}: "
                                         f"{self.classes[c]} (p = {p.probs[k, c]:.2f}, {verdict})")
        x0, xt = self._points[0], self._points[k]
        self.image_widgets["clean"].value = image_png(x0)
        self.image_widgets["perturbed"].value = image_png(xt)
        self.image_widgets["delta"].value = image_png(delta_image(xt - x0))
        note = f" <i>{self.note}</i>" if self.note else ""
        self.info.value = (
            f"image #{self.index.value}, true class <b>{self.classes[label]}</b>; direction: "
            f"{DIRECTIONS[self.direction.value]}; t from 0 to {self._fmt(self.t_max)}, eps "
            f"{self._fmt(self.eps)}. Lines: grey = eps, red = first boundary crossing on this "
            f"path, green = margin estimate (PGD at max_eps + bisection).{note}")

    def _make_thumbnails(self, n: int):
        """A grid of the first ``n`` test images; clicking one selects it."""
        import ipywidgets as W

        cells = []
        for i in range(n):
            img = _to_float_image(self.x_test[i]).cpu().numpy()
            label = f"#{i} {self.classes[int(self.y_test[i])]}"
            button = W.Button(description=label, tooltip=f"start from test image {label}",
                              layout=W.Layout(width="auto", min_width="64px"))
            button.on_click(lambda _b, i=i: self.set_image(i))
            cells.append(W.VBox([W.Image(value=image_png(img, scale=2), format="png",
                                         layout=W.Layout(width="64px")), button]))
        return W.GridBox(cells, layout=W.Layout(
            grid_template_columns="repeat(8, max-content)", grid_gap="4px"))

    # ------------------------------------------------------------------ events
    @contextlib.contextmanager
    def _hold(self):
        """Widget values set by the app itself inside this block trigger no recompute."""
        previous, self._quiet = self._quiet, True
        try:
            yield
        finally:
            self._quiet = previous

    def _on_setting(self, change) -> None:
        if not self._quiet:
            self.recompute()

    def _on_position(self, change) -> None:
        if not self._quiet and self.paths:
            self._redraw_position()

    # ------------------------------------------------------------------ static figure
    def path_figure(self, positions: Sequence[float] | None = None):
        """The current paths as a static matplotlib figure (``mixlab.margin_figure``; for
        ``save_figure`` and headless runs): per shown model, probabilities and logits along t
        with the eps line, the crossing and the margin estimate; below, the image at a few
        positions (default: the start, the slider's position, the first crossing of model A,
        the end)."""
        shown = self.shown()
        a = self.paths["A"]
        x, _ = self._image(self.index.value, torch.device("cpu"))
        label = int(self.y_test[self.index.value])
        return margin_path_figure(
            {slot: self.paths[slot] for slot in shown},
            {slot: model_of(self.runs[name]) for slot, name in shown.items()},
            x, self.u, label=label, classes=self.classes, norm=self.norm, eps=self.eps,
            max_eps=self.max_eps, t_max=self.t_max,
            labels={slot: self._run_label(name) for slot, name in shown.items()},
            positions=positions, current=float(a.ts[min(self.step, self.n_points - 1)]),
            colors=self._colors(),
            title=f"image #{self.index.value} ({self.classes[label]}), direction: "
                  f"{DIRECTIONS[self.direction.value]}")
