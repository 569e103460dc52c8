"""Margin explorer: paths, boundary crossings against a linear model's closed form, and the
widgets (they build, a slider change moves the marker, the image and the title)."""
import ipywidgets
import matplotlib
import numpy as np
import pytest
import torch
import torch.nn as nn

from mixlab.data import synthetic_dataset
from mixlab.attacks import estimate_margin, eval_logits
from mixlab.explorer import MarginExplorer
from mixlab.margin_figure import margin_path_figure
from mixlab.margin_paths import (DIRECTIONS, first_crossing, path_data, path_direction,
                                 path_points)
from mixlab.models import build_model

matplotlib.use("Agg")

SHAPE = (3, 8, 8)  # small images: the linear model's closed form needs no realism
D = 3 * 8 * 8


def linear_model(diff: torch.Tensor, m0: float) -> nn.Module:
    """10 logits, only classes 0 and 1 in play (the rest sit at -100), with
    z_1 - z_0 = diff . (x - 0.5) + m0: at the grey image x = 0.5 the CW margin is m0 < 0
    (class 0 wins) and along x + t·u it reaches 0 at t = -m0 / (diff . u)."""
    lin = nn.Linear(D, 10)
    with torch.no_grad():
        lin.weight.zero_()
        lin.weight[1] = diff
        lin.bias.fill_(-100.0)
        lin.bias[0] = 0.0
        lin.bias[1] = m0 - 0.5 * float(diff.sum())
    return nn.Sequential(nn.Flatten(), lin).eval()


def grey(n=1):
    return torch.full((n, *SHAPE), 0.5)


@pytest.mark.parametrize("norm", ["Linf", "L2"])
def test_crossing_matches_linear_model(norm):
    """Along a random and along the PGD direction, the crossing is where the linear margin
    hits zero; along the PGD direction it also equals the analytic margin
    (-m0 / ||diff||_dual, dual of Linf is L1) and the margin estimate."""
    torch.manual_seed(0)
    diff = torch.randn(D)
    dual = diff.abs().sum() if norm == "Linf" else diff.norm()
    true_margin = 0.06 if norm == "Linf" else 0.5
    m0 = -true_margin * float(dual)
    model = linear_model(diff, m0)
    x, y = grey(), torch.tensor([0])
    max_eps = 0.2 if norm == "Linf" else 2.0  # x + t·u stays inside [0, 1]: no clipping

    u, t_max, note = path_direction("random", model, x, y, norm=norm, eps=0.03,
                                    max_eps=max_eps, seed=3)
    if float(diff @ u.flatten()) < 0:  # walk the way that crosses
        u = -u
    ts = torch.linspace(0, t_max, 101)
    logits = eval_logits(model, path_points(x, u, ts)).numpy()
    expected = -m0 / float(diff @ u.flatten())
    got = first_crossing(model, x, y, u, ts.numpy(), logits)
    if expected <= t_max:
        assert got == pytest.approx(expected, rel=1e-3, abs=1e-4)
    else:
        assert np.isnan(got)

    u, t_max, note = path_direction("pgd", model, x, y, norm=norm, eps=0.03, max_eps=max_eps,
                                    steps=5)
    assert note == ""
    logits = eval_logits(model, path_points(x, u, ts)).numpy()
    assert first_crossing(model, x, y, u, ts.numpy(), logits) == pytest.approx(
        true_margin, rel=1e-3)

    explorer = MarginExplorer({"linear": model}, grey(4), torch.zeros(4, dtype=torch.long),
                              [f"c{k}" for k in range(10)], norm=norm, eps=0.03,
                              max_eps=max_eps, direction="pgd", steps=5)
    path = explorer.paths["A"]
    assert path.crossing == pytest.approx(true_margin, rel=1e-3)
    # the estimator (its own PGD from a random start, then bisection) is an upper bound
    assert true_margin * 0.999 <= path.margin <= true_margin * 1.03


@pytest.mark.parametrize("norm", ["Linf", "L2"])
@pytest.mark.parametrize("kind", list(DIRECTIONS))
def test_directions_are_unit_and_image_path_reaches_target(norm, kind):
    torch.manual_seed(0)
    model = build_model("tiny", 10, 3).eval()
    g = torch.Generator().manual_seed(0)
    x, target = torch.rand(1, 3, 32, 32, generator=g), torch.rand(1, 3, 32, 32, generator=g)
    y = model(x).argmax(1)
    u, t_max, _ = path_direction(kind, model, x, y, norm=norm, eps=8 / 255, max_eps=32 / 255,
                                 steps=3, x_target=target)
    size = u.abs().max() if norm == "Linf" else u.norm()
    assert float(size) == pytest.approx(1.0, rel=1e-5)
    if kind == "image":
        end = path_points(x, u, torch.tensor([0.0, t_max]))
        assert torch.allclose(end[0], x[0]) and torch.allclose(end[1], target[0], atol=1e-5)
    else:
        assert t_max == pytest.approx(32 / 255)


def make_explorer(**kwargs):
    torch.manual_seed(0)
    models = {"a": build_model("tiny", 10, 3), "b": build_model("tiny", 10, 3)}
    ds = synthetic_dataset(20, split="test")
    return MarginExplorer(models, ds.x, ds.y, ds.classes, norm="Linf", eps=8 / 255, steps=3,
                          n_points=21, n_thumbs=8, **kwargs)


def test_widgets_build_and_slider_updates_figure():
    explorer = make_explorer()
    assert isinstance(explorer.widget, ipywidgets.VBox)
    assert set(explorer.shown()) == {"A", "B"}
    fig = explorer.figures["A"]
    marker = fig.data[explorer.trace_index("position")[0]]
    probs = fig.data[explorer.trace_index("prob")[0]]
    assert len(probs.x) == 21 and tuple(marker.x) == (0, 0)
    np.testing.assert_allclose(explorer.paths["A"].probs.sum(1), 1, rtol=1e-5)
    before = (fig.layout.title.text, explorer.image_widgets["perturbed"].value)

    explorer.position.value = explorer.position.max / 2  # as a user dragging the slider
    t = explorer.paths["A"].ts[10]
    assert tuple(marker.x) == pytest.approx((t, t))
    assert tuple(explorer.figures["B"].data[explorer.trace_index("position")[0]].x) == \
        pytest.approx((t, t))
    assert fig.layout.title.text != before[0]
    assert explorer.image_widgets["perturbed"].value != before[1]
    assert list(probs.x) == pytest.approx(list(explorer.paths["A"].ts))  # the path itself stays


def test_controls_recompute_paths():
    explorer = make_explorer(direction="random")
    first = explorer.paths["A"].logits.copy()
    explorer.index.value = 3  # the image slider
    assert not np.allclose(explorer.paths["A"].logits, first)
    explorer.set_direction("image", target=5)
    want = float((explorer.x_test[5].float() - explorer.x_test[3].float()).abs().max() / 255)
    assert explorer.t_max == pytest.approx(want, rel=1e-5)
    assert explorer.position.max == pytest.approx(want, rel=1e-5)
    explorer.thumbs.children[2].children[1].click()  # a thumbnail button
    assert explorer.index.value == 2
    explorer.set_runs("b", None)
    assert set(explorer.paths) == {"A"} and explorer.panels["B"].layout.display == "none"


class _Run:
    """A stand-in for ``mixlab.load_run``'s result: a model and its config."""
    def __init__(self, method):
        self.model = build_model("tiny", 10, 3)
        self.config = {"method": method}


def test_labels_help_and_titles_are_readable():
    """Terms are explained, every class is named on the argmax strip, labels are not cut and
    no title repeats a name."""
    explorer = make_explorer()
    help_text = explorer.help.value
    for term in ("AN-PGD", "SLM", "soft logit margin", "PGD-CE", "crossing", "margin est.",
                 "max_eps", "argmax"):
        assert term in help_text, term
    assert "SLM" in explorer.direction.tooltip and "AN-PGD" in explorer.direction.tooltip
    for slot in ("A", "B"):
        strip = explorer.figures[slot].layout.yaxis3
        assert list(strip.tickvals) == explorer.classes == list(strip.ticktext)
        assert tuple(strip.range) == (-0.5, len(explorer.classes) - 0.5)
    # every thumbnail button shows its whole label: no fixed width that could cut it
    for cell in explorer.thumbs.children:
        button = cell.children[1]
        assert button.layout.width == "auto" and button.description.split()[1] in \
            explorer.classes
    longest = max(map(len, DIRECTIONS.values()))
    assert int(explorer.direction.layout.width.rstrip("px")) >= 7 * longest
    # a run named after its method is not followed by the same name in brackets
    runs = {"pgd_at": _Run("pgd_at"), "smoke model": _Run("mixup")}
    explorer = MarginExplorer(runs, explorer.x_test, explorer.y_test, [f"class {k}" for k in range(10)], eps=8 / 255,
                              steps=2, n_points=11, n_thumbs=2)
    first_lines = [explorer.figures[s].layout.title.text.split("<br>")[0] for s in ("A", "B")]
    assert first_lines == ["A: pgd_at", "B: smoke model [mixup]"]
    for title in first_lines:
        words = title.replace("[", " ").replace("]", " ").split()
        assert len(words) == len(set(words)), title


def test_path_figure_is_static():
    explorer = make_explorer()
    explorer.set_direction("anpgd")
    explorer.set_position(explorer.t_max / 4)
    fig = explorer.path_figure()
    assert isinstance(fig, matplotlib.figure.Figure)
    images = 3 + (not np.isnan(explorer.paths["A"].crossing))  # start, slider, crossing, end
    assert len(fig.axes) == 2 * 2 + images  # probs + logits per model, then the images
    matplotlib.pyplot.close(fig)


def test_static_figure_without_widgets():
    """The computation and the static figure need neither ipywidgets nor plotly."""
    torch.manual_seed(0)
    model = build_model("tiny", 10, 3).eval()
    ds = synthetic_dataset(2, split="test")
    x, y = ds.x[:1].float() / 255, ds.y[:1]
    u, t_max, _ = path_direction("random", model, x, y, norm="Linf", eps=8 / 255,
                                 max_eps=32 / 255, seed=1)
    margin = float(estimate_margin(model, x, y, norm="Linf", max_eps=32 / 255, steps=2)[0])
    path = path_data(model, x, y, u, torch.linspace(0, t_max, 11), margin=margin)
    assert path.logits.shape == (11, 10) and path.margin == margin
    fig = margin_path_figure({"A": path}, {"A": model}, x, u, label=int(y), classes=ds.classes,
                             norm="Linf", eps=8 / 255, max_eps=32 / 255, t_max=t_max,
                             title="random walk")
    images = 3 + (not np.isnan(path.crossing))
    assert len(fig.axes) == 2 + images
    matplotlib.pyplot.close(fig)


def test_bad_arguments():
    with pytest.raises(ValueError, match="runs is empty"):
        MarginExplorer({}, grey(2), torch.zeros(2, dtype=torch.long), ["a", "b"], eps=0.1)
    with pytest.raises(ValueError, match="unknown direction"):
        path_direction("sideways", nn.Identity(), grey(), torch.tensor([0]), norm="Linf",
                       eps=0.1, max_eps=0.2)


@pytest.mark.gpu
def test_explorer_on_cuda():
    torch.manual_seed(0)
    models = {"a": build_model("tiny", 10, 3).cuda(), "b": build_model("tiny", 10, 3).cuda()}
    ds = synthetic_dataset(8, split="test")
    explorer = MarginExplorer(models, ds.x, ds.y, ds.classes, eps=8 / 255, steps=3,
                              n_points=11, n_thumbs=4)
    for kind in DIRECTIONS:
        explorer.set_direction(kind, target=2)
        assert explorer.u.is_cuda and explorer.paths["B"].logits.shape == (11, 10)
    explorer.set_position(explorer.t_max)
    matplotlib.pyplot.close(explorer.path_figure())
