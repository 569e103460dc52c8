"""mixlab.plots: each figure draws the data it was given, where it says it does (the right
values on the right axis, in the right order, NaNs left out), and the numbers figures compute
(κ shares, margin survival, the epochs shown) are right."""
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from mixlab import plots  # noqa: E402


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def _lines(ax):
    return {line.get_label(): np.asarray(line.get_ydata(), dtype=float) for line in ax.lines}


# ----------------------------------------------------------------------------- numbers
def test_spread_indices():
    assert plots.spread_indices(10, 5) == [0, 2, 4, 7, 9]
    assert plots.spread_indices(3, 6) == [0, 1, 2]
    assert plots.spread_indices(1, 5) == [0] and plots.spread_indices(0, 5) == []
    for n in range(1, 30):
        got = plots.spread_indices(n, 6)
        assert got[0] == 0 and got[-1] == n - 1 and len(got) == min(n, 6)
        assert got == sorted(set(got))


def test_kappa_shares():
    shares = plots.kappa_shares([np.array([0, 0, 3, 1]), np.array([3, 3])], steps=3)
    assert shares.tolist() == [[0.5, 0.25, 0.0, 0.25], [0.0, 0.0, 0.0, 1.0]]
    with pytest.raises(ValueError, match="0..3"):
        plots.kappa_shares([np.array([4])], steps=3)
    assert plots.kappa_shares([], steps=2).shape == (0, 3)


def test_margin_survival():
    m = np.array([0.0, 0.1, 0.2, 0.4])
    assert plots.margin_survival(m, [0, 0.1, 0.3, 0.5]).tolist() == [0.75, 0.5, 0.25, 0.0]


# ----------------------------------------------------------------------------- figures
def _history():
    return [dict(epoch=e, train_loss=2.0 / e, train_acc=0.1 * e, val_clean=0.2 * e,
                 val_robust=0.05 * e, img_per_s=100.0) for e in (1, 2, 3)]


def test_training_curves_draw_the_history():
    fig = plots.training_curves(_history(), selected_epoch=2, eval_steps=5, title="t")
    ax_loss, ax_acc = fig.axes
    assert np.allclose(ax_loss.lines[0].get_ydata(), [2.0, 1.0, 2 / 3])
    lines = _lines(ax_acc)
    assert np.allclose(lines["validation clean"], [0.2, 0.4, 0.6])
    assert np.allclose(lines["validation PGD-5"], [0.05, 0.1, 0.15])
    selected = next(line for line in ax_acc.lines if line.get_label() == "selected")
    assert list(selected.get_xdata()) == [2, 2]


class _Run:
    def __init__(self, history, epoch, config=None):
        self.history, self.epoch, self.config = history, epoch, config or {"val_size": 256}


def test_validation_curves_star_the_selected_epoch():
    runs = {"a": _Run(_history(), 2), "b": _Run(_history(), 3)}
    fig = plots.validation_curves(runs, eval_steps=5, begin_epoch=2)
    ax = fig.axes[0]
    star_a = next(l for l in ax.lines if l.get_label() == "a selected")
    assert list(star_a.get_xdata()) == [2] and np.allclose(star_a.get_ydata(), [0.1])
    assert "n=256" in ax.get_ylabel()


def test_averaging_curves_draw_average_and_raw_and_skip_unaveraged_runs():
    averaged = [dict(h, ema_val_clean=h["val_clean"] + 0.01, ema_val_robust=h["val_robust"] + 0.02)
                for h in _history()]
    runs = {"ema": _Run(averaged, 2), "plain": _Run(_history(), 3)}
    fig = plots.averaging_curves(runs, eval_steps=5)
    ax_clean, ax_pgd = fig.axes
    clean, pgd = _lines(ax_clean), _lines(ax_pgd)
    assert np.allclose(clean["ema average"], [0.21, 0.41, 0.61])
    assert np.allclose(clean["ema raw"], [0.2, 0.4, 0.6])
    assert np.allclose(pgd["ema average"], [0.07, 0.12, 0.17])
    assert np.allclose(pgd["ema raw"], [0.05, 0.1, 0.15])
    star = next(line for line in ax_pgd.lines if line.get_label() == "ema selected")
    assert list(star.get_xdata()) == [2] and np.allclose(star.get_ydata(), [0.12])
    assert not any(label.startswith("plain") for label in {**clean, **pgd})
    assert "PGD-5" in ax_pgd.get_title() and "n=256" in ax_clean.get_ylabel()
    with pytest.raises(ValueError, match="ema_decay"):
        plots.averaging_curves({"plain": runs["plain"]}, eval_steps=5)


def test_accuracy_bars_heights_in_column_order():
    rows = {"m1": dict(clean=0.5, pgd20=0.25, robust=0.2), "m2": dict(clean=0.75, robust=0.5)}
    fig = plots.accuracy_bars(rows, columns=("clean", "pgd20", "robust"))
    ax = fig.axes[0]
    by_label = {c.get_label(): [b.get_height() for b in c] for c in ax.containers}
    assert by_label["clean"] == [50, 75]
    assert by_label["pgd20"][0] == 25 and np.isnan(by_label["pgd20"][1])  # m2 has no PGD-20
    assert by_label["worst case"] == [20, 50]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["m1", "m2"]


def test_image_rows_show_each_image_in_order_as_hwc():
    images = torch.zeros(3, 3, 4, 5, dtype=torch.uint8)
    images[1, 0] = 255  # the second image red
    fig = plots.image_rows([("top", list(images), ["a", "b", "c"]),
                            ("bottom", list(images[:2]), ["d", "e"])], title="grid")
    axes = np.array(fig.axes).reshape(2, 3)
    shown = axes[0, 1].images[0].get_array()
    assert shown.shape == (4, 5, 3) and shown[..., 0].min() == 1.0 and shown[..., 1].max() == 0
    assert [a.get_title() for a in axes[0]] == ["a", "b", "c"]
    assert not axes[1, 2].images  # a shorter row leaves the cell empty


def test_adversarial_examples_say_which_predictions_are_wrong():
    x = torch.rand(2, 1, 6, 6)
    y = torch.tensor([0, 1])
    fig = plots.adversarial_examples(x, x, y, torch.tensor([0, 1]), torch.tensor([1, 1]),
                                     ["zero", "one"])
    titles = [a.get_title() for a in fig.axes]
    assert titles == ["zero (ok)", "one (ok)", "one (WRONG)", "one (ok)"]


def _path(n_pairs=2, n_lams=5):
    lams = np.linspace(0, 1, n_lams)
    p_a = np.tile(lams, (n_pairs, 1))
    return dict(lams=lams, y_a=np.array([1, 2])[:n_pairs], y_b=np.array([0, 0])[:n_pairs],
                p_a=p_a, p_b=1 - p_a, p_other=np.zeros_like(p_a), p_a_worst=p_a / 2)


def test_path_grid_one_row_per_model_and_titles_from_b_to_a():
    fig = plots.path_grid({"erm": _path(), "amp": _path()}, ["cat", "dog", "car"], title="t")
    assert len(fig.axes) == 4
    assert fig.axes[0].get_title() == "erm: cat → dog" and fig.axes[3].get_title() == "amp: cat → car"


def test_path_images_put_x_b_left_and_x_a_right():
    x_a, x_b = torch.ones(1, 3, 4, 4), torch.zeros(1, 3, 4, 4)
    fig = plots.path_images(x_a, x_b, torch.tensor([1]), torch.tensor([0]), ["b", "a"], lams=3)
    strip = fig.axes[0].images[0].get_array()
    assert strip[0, 0, 0] == 0 and strip[0, -1, 0] == 1  # λ = 0 is x_b, λ = 1 is x_a


def test_lambda_histograms_leave_out_unseen_examples():
    log = dict(lam0=np.array([0.1, 0.5, np.nan, 0.9]), lam_star=np.array([0.2, 0.5, np.nan, 0.8]),
               t_geo_minus_lam=np.array([0.01, 0.0, np.nan, -0.01]))
    fig = plots.lambda_histograms({"amp_base": log})
    ax_top, ax_bottom = fig.axes
    sampled = sum(p.get_height() for p in ax_top.patches[:20])
    assert sampled == 3 and sum(p.get_height() for p in ax_bottom.patches) == 3
    assert "3 examples" in fig._suptitle.get_text()


def test_kappa_histograms_show_the_shares():
    logs = {"gairat": [dict(kappa=np.array([0, 1, 1, 2])), dict(kappa=np.array([2, 2, 2, 2]))]}
    fig = plots.kappa_histograms(logs, steps=2)
    heat = fig.axes[0].images[0].get_array()
    assert np.allclose(heat, plots.kappa_shares([l["kappa"] for l in logs["gairat"]], 2).T)


def test_weight_functions_normalise_over_the_epoch():
    from mixlab.methods.gairat import WEIGHT_FNS, gair_weights

    kappa = np.array([0, 0, 5, 10, 10])
    used = dict(kappa=kappa, weight=np.ones(5), lam=-1.0, weight_fn="tanh")
    fig = plots.weight_functions(kappa, 10, [-1.0, 0.0], used=used)
    ax = fig.axes[WEIGHT_FNS.index("tanh")]
    raw = gair_weights(torch.arange(11), 10, -1.0, "tanh")     # ∝ ω(κ), any constant
    expected = raw / raw[torch.as_tensor(kappa)].mean()        # mean 1 over the epoch's κ
    assert np.allclose(_lines(ax)["λ=-1"], expected.numpy(), rtol=1e-4)
    assert len(ax.collections) == 1  # the used weights, on the weight function trained with
    assert len(fig.axes[WEIGHT_FNS.index("discrete")].lines) == 1  # Discrete ignores λ


def test_weight_vs_margin_scatters_the_values():
    fig = plots.weight_vs_margin(np.array([-1.0, 2.0]), np.array([3.0, 0.5]), np.array([0, 10]))
    offsets = fig.axes[0].collections[0].get_offsets()
    assert np.allclose(offsets, [[-1.0, 3.0], [2.0, 0.5]])


def test_eps_by_epoch_shares_and_validation_margins():
    logged = [dict(eps=np.array([0.0, 0.0, 0.1, 0.5])), dict(eps=np.array([0.0, 0.2, 0.4, 0.5]))]
    fig = plots.eps_by_epoch(logged, [0.05, 0.1], d_max=0.4, eps=0.03, max_eps=0.42, norm="Linf")
    ax_hist, ax_mean, ax_share = fig.axes
    assert np.allclose(_lines(ax_share)["ε* = 0 (clean CE)"], [0.5, 0.25])
    assert np.allclose(_lines(ax_share)["ε* ≥ d_max (past the hinge)"], [0.25, 0.5])
    assert np.allclose(_lines(ax_mean)["mean ε* (ε* > 0)"], [0.3, (0.2 + 0.4 + 0.5) / 3])
    assert np.allclose(_lines(ax_mean)["mean margin, validation split"], [0.05, 0.1])


def test_margin_distributions_survival_is_the_accuracy_curve():
    m = np.array([0.0, 0.01, 0.02, 0.03])
    fig = plots.margin_distributions({"mma": m}, eps=0.015, d_max=0.03, max_eps=0.0315,
                                     norm="Linf")
    line = fig.axes[1].lines[0]
    assert np.allclose(line.get_ydata(), plots.margin_survival(m, line.get_xdata()))
    assert line.get_ydata()[0] == 0.75  # the misclassified point has margin 0


def test_accuracy_vs_eps_one_line_per_model_and_attack():
    fig = plots.accuracy_vs_eps({"erm": {"FGSM": [0.9, 0.1], "PGD-20": [0.9, 0.0]},
                                 "mixup": {"FGSM": [0.8, 0.3]}}, [0, 0.1], xlabel="eps",
                                marks={"test ε": 0.05})
    lines = _lines(fig.axes[0])
    assert np.allclose(lines["erm, PGD-20"], [0.9, 0.0]) and np.allclose(lines["mixup, FGSM"], [0.8, 0.3])
    assert "test ε" in lines


def _trace(scale):
    return [dict(step=s, exact=1.0 * scale, approx=0.9 * scale, reg_exact=0.1 * scale,
                 reg_approx=0.09 * scale, spread=0.5 + s, r1=-0.01, r2=0.05, r3=0.001)
            for s in (0, 10, 100)]


def test_theory_figures_draw_their_rows():
    from mixlab.theory import EpsMix

    traces = {(k, a): _trace(1 + a) for k in ("logistic", "mlp") for a in (0.2, 1.0)}
    fig = plots.theory_traces(traces, [0.2, 1.0], title="on moons")
    assert np.allclose(_lines(fig.axes[0])["exact, α=1.0"], [2.0, 2.0, 2.0])
    rel = fig.axes[2].collections[0].get_offsets()
    assert np.allclose(rel[:, 1], 0.1)  # |0.09 - 0.1| / 0.1
    eps_curve = [EpsMix(eps=0.1 * a, R=0.5, c_x=1.0, m1=a / 3, d=4) for a in (0.1, 1.0)]
    fig = plots.theory_terms(traces, [0.2, 1.0], [0.1, 1.0], eps_curve)
    assert np.allclose(fig.axes[2].lines[0].get_ydata(), [e.eps_l2 for e in eps_curve])
    assert "|R3|, α=0.2" in _lines(fig.axes[1]) and "|R3|, α=0.2" not in _lines(fig.axes[0])
    fig = plots.theory_alpha({"m": [0.5, 2.0]}, [0.1, 1.0], [(0.1, 1.0, 1.1, 0.9), (1.0, 2.0, 3.0, 1.5)],
                             alpha=1.0)
    assert np.allclose(_lines(fig.axes[1])["L̃_mix"], [1.1, 3.0])
    bounds = {0.2: dict(mix=0.7, eps_l2=0.3, adv=0.6)}
    fig = plots.bound_figure([0, 0.5], [0.5, 0.8], [0.5, 0.9], bounds, {0.2: [(1, 0.1, 0.05)]})
    assert np.allclose(_lines(fig.axes[1])["L̃_mix − L̃_adv(ε_mix√d), α=0.2"], [0.1])


def test_decision_boundaries_titles_and_gap():
    from mixlab import theory as T

    data = T.make_moons(16, noise=0.1, seed=0, n_test=8)
    nets = {0.0: T.MLP(2, 4, 2, act="tanh", seed=0), 1.0: T.MLP(2, 4, 2, act="tanh", seed=1)}
    acc = {0.0: (1.0, 0.75), 1.0: (0.875, 0.875)}
    fig = plots.decision_boundaries(nets, data, acc)
    assert fig.axes[0].get_title() == "ERM: train 1.00, test 0.75"
    assert np.allclose(fig.axes[-1].lines[0].get_ydata(), [0.25, 0.0])
