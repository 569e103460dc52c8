"""Writes notebooks/mixup_theory.ipynb (outputs stripped). Run: python tools/make_mixup_theory.py"""
from nbwrite import code, md, write_notebook

cells = [
    md(r"""# Mixup theory: the Taylor view of the mixup loss, its adversarial bound, and mixup vs ERM under attack

Zhang, Deng, Kawaguchi, Ghorbani, Zou, *How Does Mixup Help With Robustness and Generalization?*,
ICLR 2021 (arXiv 2010.04819). No official code; everything here is `mixlab.theory` (sections 1-3,
float64 on CPU) and the training engine (section 4).

**Which statements, from where.** The paper's body could not be read offline: the stored copies
reachable from this project show only its abstract and introduction. The statements implemented are
therefore those of the mixup-theory section of `shared/papers.md` (derived and checked numerically
there); equation numbers are not quoted. They are:
- *Step 1 (exact).* $l(\theta,x,y)=h(f_\theta(x))-y f_\theta(x)$, $h(z)=\log(1+e^z)$, is linear in $y$, so
  the mixup loss equals $\frac1{n^2}\sum_{ij}\mathbb E_{\lambda\sim\tilde D}\,l(\theta,\lambda x_i+(1-\lambda)x_j,y_i)$ with
  $\tilde D=\frac{\alpha}{\alpha+\beta}\mathrm{Beta}(\alpha+1,\beta)+\frac{\beta}{\alpha+\beta}\mathrm{Beta}(\beta+1,\alpha)$.
- *The Lemma.* Second order in $1-\lambda$ around the **unshifted** $x_i$:
  $L_{mix}=L_{std}+R_1+R_2+R_3+\text{remainder}$, with $r$ a training input drawn uniformly,
  $R_1=\frac{\mathbb E[1-\lambda]}{n}\sum_i(h'(f_i)-y_i)\nabla f_i^\top\mathbb E_r[r-x_i]$,
  $R_2=\frac{\mathbb E[(1-\lambda)^2]}{2n}\sum_i h''(f_i)\nabla f_i^\top\mathbb E_r[(r-x_i)(r-x_i)^\top]\nabla f_i$,
  $R_3=\frac{\mathbb E[(1-\lambda)^2]}{2n}\sum_i(h'(f_i)-y_i)\mathbb E_r[(r-x_i)^\top\nabla^2 f_i(r-x_i)]$.
  $\tilde L_{mix}=L_{std}+R_1+R_2+R_3$.
- *Robustness (logistic regression).* Centred inputs, $\theta\in\Theta$ (every training point classified
  correctly), $\|x_i\|_2\ge c_x\sqrt d$: $\tilde L_{mix}(\theta)\ge\tilde L_{adv}(\varepsilon_{mix}\sqrt d)$ with
  $\tilde L_{adv}(\varepsilon)=L_{std}+\frac{\varepsilon}{n}\sum_i|h'(f_i)-y_i|\|\nabla f_i\|_2+\frac{\varepsilon^2}{2n}\sum_i h''(f_i)\|\nabla f_i\|_2^2$
  (second-order $\ell_2$ adversarial loss), $\varepsilon_{mix}=R\,c_x\,\mathbb E_{\tilde D}[1-\lambda]$, $R=\min_i|\cos(\theta,x_i)|$.
  The network version replaces $\theta$ by $\nabla f(x_i)$ and needs $f(x)=\nabla f(x)^\top x$ (bias-free ReLU
  nets, for which $R_3=0$); its exact conditions in the paper could not be checked.

Run headless: `papermill notebooks/mixup_theory.ipynb runs/mixup_theory.ipynb -p profile smoke --cwd notebooks`.
Profiles: `smoke` (CPU, under two minutes, MNIST SmallCNN as the robustness proxy), `short`
(GPU: CIFAR-10 PreActResNet-18), `paper` (WRN-16-8 on SVHN when its data is present, else CIFAR-10)."""),
    code('profile = "smoke"        # type: str  run size: smoke (CPU, < 2 min) | short (GPU, minutes) | paper\n'
         'alphas = [0.2, 1.0]      # type: list[float]  mixup Beta(alpha, alpha) parameters compared throughout\n'
         'seed = 0                 # type: int  seeds the toy data, initialisations, mixing draws and runs\n'
         '# data per role: sections 1-2 (moons | gaussian), section 3 (gaussian: the theorem needs\n'
         '# linearly separable data), section 4 (auto: mnist for smoke, svhn if present else cifar10)\n'
         'datasets = {"approx": "moons", "bound": "gaussian", "robust": "auto"}  # type: dict  dataset per role\n'
         'device = "auto"          # type: str  section 4 only (auto | cpu | cuda); the theory runs on CPU, float64\n'
         'run_dir = ""             # type: str  section 4 runs; empty: runs/mixup_theory/<profile>',
         metadata={"tags": ["parameters"]}),
    code(r'''import time

import matplotlib
matplotlib.use("Agg")  # figures are written to figures/ and shown from the file
import matplotlib.pyplot as plt
import numpy as np
import torch
from IPython.display import Image, display

from mixlab import checks, nbtools
from mixlab import theory as T

# the parameters, checked before anything runs (a wrong profile or type stops here)
alphas = nbtools.check_params(profile=profile, alphas=alphas, seed=seed, datasets=datasets,
                              device=device, run_dir=run_dir)["alphas"]
t_start = time.perf_counter()
torch.set_num_threads(1)  # the toy problems are tiny: more threads only contend on a shared CPU
# sizes of the toy experiments per profile (all CPU, float64)
size = {
    "smoke": dict(n=64, noise=0.15, steps=300, snaps=7, order=32, width=32, lr=0.05,
                  alpha_grid=5, gap_n=40, gap_steps=600, gauss_n=100, gauss_d=10,
                  real_subset=1024, n_eval=128),
    "short": dict(n=200, noise=0.15, steps=2000, snaps=12, order=48, width=64, lr=0.02,
                  alpha_grid=12, gap_n=60, gap_steps=5000, gauss_n=200, gauss_d=20,
                  real_subset=2048, n_eval=1000),
    "paper": dict(n=300, noise=0.15, steps=5000, snaps=16, order=64, width=64, lr=0.02,
                  alpha_grid=16, gap_n=60, gap_steps=10000, gauss_n=400, gauss_d=50,
                  real_subset=2048, n_eval=10000),
}[profile]
snap_steps = sorted({0, *np.geomspace(1, size["steps"], size["snaps"]).astype(int).tolist()})
summary = dict(profile=profile, alphas=alphas, seed=seed, datasets=datasets, size=size)


def toy(name, n, n_test=0):
    """The toy data sets of mixlab.theory, seeded and centred by the training mean."""
    if name == "moons":
        return T.make_moons(n, noise=size["noise"], seed=seed, n_test=n_test)
    return T.make_gaussian_mixture(n, size["gauss_d"], seed=seed, n_test=n_test)


def show(fig, name, **extra):
    """Save as figures/<name>_<profile>.png (+ JSON sidecar) and display the file."""
    fig.tight_layout()
    path = nbtools.save_figure(fig, name, profile=profile, extra=extra)
    plt.close(fig)
    display(Image(filename=str(path)))


print(f"profile={profile} alphas={alphas} datasets={datasets} snapshots at {snap_steps}")'''),

    # ------------------------------------------------------------------ section 1
    md(r"""## 1. Exact mixup loss vs its approximation along training

A logistic regression and a small tanh MLP (smooth, so $R_3\neq0$) are trained by mixup on two moons for
each $\alpha$. At each snapshot the exact mixup loss (Gauss-Jacobi quadrature over $\tilde D$ on all $n^2$ pairs)
is compared with $\tilde L_{mix}$ (input gradients and batched Hessian-vector products). The right panel
plots the relative error of the regulariser $R_1+R_2+R_3$ against the size that controls the expansion, the
rms of $\nabla f(x_i)^\top(x_j-x_i)$ over pairs."""),
    code(r'''data = toy(datasets["approx"], size["n"], n_test=1000)
x, y = data.x, data.y
d = x.shape[1]


def new_model(kind):
    if kind == "logistic":
        return T.LogisticRegression(d)
    return T.MLP(d, size["width"], 2, act="tanh", seed=seed)


traces = {}
for kind in ("logistic", "mlp"):
    for a in alphas:
        model = new_model(kind)
        snaps = T.fit(model, x, y, method="mixup", alpha=a, steps=size["steps"], lr=size["lr"],
                      seed=seed, snapshots=snap_steps)
        traces[kind, a] = T.track_mixup_losses(model, snaps, x, y, a, order=size["order"])

fig, axes = plt.subplots(1, 3, figsize=(16, 4.2))
for ax, kind in zip(axes[:2], ("logistic", "mlp")):
    for k, a in enumerate(alphas):
        rows = traces[kind, a]
        steps = [r["step"] for r in rows]
        ax.plot(steps, [r["exact"] for r in rows], "-o", color=f"C{k}", label=f"exact, α={a}")
        ax.plot(steps, [r["approx"] for r in rows], "--x", color=f"C{k}", label=f"L̃_mix, α={a}")
    ax.set(xscale="symlog", xlabel="step of mixup training", ylabel="mixup loss (nats)",
           title=f"{kind} on {datasets['approx']} (n={size['n']})")
    ax.legend(fontsize=7)
ax = axes[2]
for (kind, a), rows in traces.items():
    pts = [(r["spread"], abs(r["reg_approx"] - r["reg_exact"]) / abs(r["reg_exact"]))
           for r in rows if abs(r["reg_exact"]) > 1e-12]
    ax.scatter(*zip(*pts), marker="o" if kind == "logistic" else "^", label=f"{kind}, α={a}")
ax.set(xscale="log", yscale="log", xlabel="rms of ∇f(x_i)ᵀ(x_j − x_i)",
       ylabel="|approx − exact| / |exact| of R1+R2+R3", title="where the expansion holds")
ax.legend(fontsize=7)
show(fig, "theory_approx", dataset=datasets["approx"], n=size["n"], alphas=alphas)
summary["trace_final"] = {f"{k}, alpha={a}": {key: rows[-1][key] for key in ("exact", "approx", "spread")}
                          for (k, a), rows in traces.items()}
for name, row in summary["trace_final"].items():
    print(f"{name:22s} final: exact {row['exact']:.4f}  approx {row['approx']:.4f}  spread {row['spread']:.2f}")'''),
    md(r"""**As α → 0 the approximation does not get relatively better.** Every moment of $1-\lambda$ under $\tilde D$
is $\Theta(\alpha)$: small $\alpha$ means *rarely* mixing, not mixing a little, so the remainder and the terms
shrink together. Left: the ratio (approximate regulariser) / (exact regulariser) against $\alpha$ for fixed
models; it tends to a constant, which is 1 only where the model is smooth on the scale of the data. Right:
logistic regression along its ERM direction at growing $\|\theta\|$: the two agree at small $\|\theta\|$ and part
for a confident model."""),
    code(r'''alpha_grid = np.geomspace(0.01, 2.0, size["alpha_grid"])
erm_mlp, erm_lr = new_model("mlp"), new_model("logistic")
T.fit(erm_mlp, x, y, method="erm", steps=size["steps"], lr=size["lr"], seed=seed)
T.fit(erm_lr, x, y, method="erm", steps=size["steps"], lr=size["lr"], seed=seed)
theta_hat = erm_lr.theta.detach() / erm_lr.theta.detach().norm()
fixed = {"MLP at initialisation": new_model("mlp"), "MLP after ERM": erm_mlp,
         "logistic, ‖θ‖ = 0.1": T.LogisticRegression(d, 0.1 * theta_hat),
         f"logistic after ERM (‖θ‖ = {float(erm_lr.theta.detach().norm()):.1f})": erm_lr}
ratios = {}
for name, m in fixed.items():
    std = T.standard_loss(m, x, y)
    ratios[name] = [T.approx_mixup_loss(m, x, y, a).reg
                    / (T.mixup_loss_exact(m, x, y, a, order=size["order"]) - std) for a in alpha_grid]

scales = np.geomspace(0.03, 100, 15)
a_big = max(alphas)
scale_rows = []
for s in scales:
    theta = float(s) * theta_hat
    terms = T.approx_mixup_loss_logistic(theta, x, y, a_big)
    exact = T.mixup_loss_exact(T.LogisticRegression(d, theta), x, y, a_big, order=size["order"])
    scale_rows.append((float(s), exact, terms.total, terms.std))

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
ax2.set(xscale="log", yscale="log", xlabel="‖θ‖ (along the ERM direction)", ylabel="loss (nats)",
        title=f"logistic regression, α = {a_big}: agree small, part confident")
ax2.legend(fontsize=7)
show(fig, "theory_alpha", alpha_grid=alpha_grid.tolist(), scales=scales.tolist())
summary["ratio_vs_alpha"] = {k: [float(v) for v in r] for k, r in ratios.items()}
summary["scale_sweep"] = [dict(norm=s, exact=e, approx=a) for s, e, a, _ in scale_rows]
for name, r in ratios.items():
    print(f"{name:36s} ratio at α={alpha_grid[0]:.2f}: {r[0]:.3f}   at α={alpha_grid[-1]:.2f}: {r[-1]:.3f}")
print(f"largest ‖θ‖ = {s_[-1]:.0f}: exact {ex_[-1]:.3f} vs approximate {ap_[-1]:.3f}")'''),

    # ------------------------------------------------------------------ section 2
    md(r"""## 2. The size of each term, ε_mix against α, and mixup as data-adaptive regularisation

Left and middle: $|R_1|$, $R_2$ and $|R_3|$ along the mixup training of section 1. For logistic regression
$R_3=0$ and, for centred data, the leading part of $R_2$ is $\frac{\mathbb E[(1-\lambda)^2]}{2n}\sum_i h''(f_i)\,\theta^\top(\hat\Sigma_X+x_ix_i^\top)\theta$:
a ridge penalty with the data covariance in place of the identity (the paper's data-adaptive
regularisation). Right: $\varepsilon_{mix}\sqrt d=R\,c_x\,\mathbb E_{\tilde D}[1-\lambda]\sqrt d$ against $\alpha$ for logistic
regression trained by ERM on the separable Gaussian mixture of section 3
($\mathbb E_{\tilde D}[1-\lambda]=\alpha/(2\alpha+1)$)."""),
    code(r'''bound_data = toy(datasets["bound"], size["gauss_n"])
xg, yg = bound_data.x, bound_data.y
dg = xg.shape[1]
lr_g = T.LogisticRegression(dg)
bound_snaps = T.fit(lr_g, xg, yg, method="erm", steps=size["steps"], lr=size["lr"], seed=seed,
                    snapshots=snap_steps)
theta_g = lr_g.theta.detach()
eps_curve = [T.eps_mix(theta_g, xg, a) for a in alpha_grid]

fig, axes = plt.subplots(1, 3, figsize=(16, 4.2))
for ax, kind in zip(axes[:2], ("logistic", "mlp")):
    for k, a in enumerate(alphas):
        rows = traces[kind, a]
        steps = [r["step"] for r in rows]
        ax.plot(steps, [abs(r["r1"]) for r in rows], "-o", color=f"C{k}", label=f"|R1|, α={a}")
        ax.plot(steps, [r["r2"] for r in rows], "--s", color=f"C{k}", label=f"R2, α={a}")
        if kind == "mlp":
            ax.plot(steps, [abs(r["r3"]) for r in rows], ":^", color=f"C{k}", label=f"|R3|, α={a}")
    ax.set(xscale="symlog", yscale="log", xlabel="step of mixup training", ylabel="nats",
           title=f"terms of L̃_mix, {kind}" + (" (R3 = 0)" if kind == "logistic" else ""))
    ax.legend(fontsize=7)
ax = axes[2]
ax.plot(alpha_grid, [e.eps_l2 for e in eps_curve], "-o")
for a in alphas:
    ax.axvline(a, color="gray", lw=0.6)
ax.set(xscale="log", xlabel="α", ylabel="ε_mix·√d (l2 radius, input units)",
       title=f"ε_mix, R = {eps_curve[0].R:.3f}, c_x = {eps_curve[0].c_x:.2f}, d = {dg}")
show(fig, "theory_terms", dataset_bound=datasets["bound"], d=dg)
summary["eps_mix"] = {f"{a:.3g}": dict(eps=e.eps, eps_l2=e.eps_l2, R=e.R, c_x=e.c_x)
                      for a, e in zip(alpha_grid, eps_curve)}'''),
    md(r"""Decision boundaries of ERM and mixup on a small, noisy two-moons sample (a wide tanh MLP that can
memorise it), and the train/test accuracy gap against $\alpha$ ($\alpha=0$ is ERM). The gap on a small
MNIST subset needs the training engine and is in section 4."""),
    code(r'''gap = T.make_moons(size["gap_n"], noise=0.3, seed=seed, n_test=2000)
gap_alphas = [0.0, *alphas]
nets, gap_acc = {}, {}
for a in gap_alphas:
    net = T.MLP(2, 64, 2, act="tanh", seed=seed)  # wide enough to memorise the noisy sample
    T.fit(net, gap.x, gap.y, method="erm" if a == 0 else "mixup", alpha=a,
          steps=size["gap_steps"], lr=0.02, seed=seed)
    nets[a] = net
    gap_acc[a] = (T.accuracy(net, gap.x, gap.y), T.accuracy(net, gap.x_test, gap.y_test))

fig, axes = plt.subplots(1, len(gap_alphas) + 1, figsize=(4.2 * (len(gap_alphas) + 1), 3.8))
for ax, a in zip(axes, gap_alphas):
    xx, yy, prob = T.decision_grid(nets[a], gap.x)
    ax.contourf(xx, yy, prob, levels=20, cmap="RdBu_r", alpha=0.6)
    ax.contour(xx, yy, prob, levels=[0.5], colors="k")
    ax.scatter(gap.x[:, 0], gap.x[:, 1], c=gap.y, cmap="RdBu_r", edgecolors="k", s=25)
    tr, te = gap_acc[a]
    ax.set(title=("ERM" if a == 0 else f"mixup α={a}") + f": train {tr:.2f}, test {te:.2f}",
           xticks=[], yticks=[])
ax = axes[-1]
ax.plot(range(len(gap_alphas)), [gap_acc[a][0] - gap_acc[a][1] for a in gap_alphas], "-o")
ax.set(xticks=range(len(gap_alphas)), xticklabels=["ERM"] + [f"α={a}" for a in alphas],
       ylabel="train − test accuracy", title=f"generalisation gap, two moons n={size['gap_n']}")
show(fig, "theory_boundaries", n=size["gap_n"], noise=0.3)
summary["moons_gap"] = {str(a): dict(train=tr, test=te) for a, (tr, te) in gap_acc.items()}
for a, (tr, te) in gap_acc.items():
    print(("ERM" if a == 0 else f"mixup α={a}").ljust(14), f"train {tr:.3f}  test {te:.3f}  gap {tr - te:+.3f}")'''),

    # ------------------------------------------------------------------ section 3
    md(r"""## 3. The bound for logistic regression on separable, centred data

For $\theta$ from ERM on the Gaussian mixture: the second-order adversarial loss $\tilde L_{adv}(\varepsilon)$ and the
exact $\ell_2$ adversarial loss of the linear model, $\frac1n\sum_i\mathrm{softplus}(-m_i+\varepsilon\|\theta\|_2)$ with
margin $m_i=(2y_i-1)\theta^\top x_i$, across $\varepsilon$; $\tilde L_{mix}$ for each $\alpha$ as a horizontal line and
$\varepsilon_{mix}\sqrt d$ marked. The theorem guarantees only $\tilde L_{mix}\ge\tilde L_{adv}(\varepsilon_{mix}\sqrt d)$ for
$\theta\in\Theta$ (it compares two approximations; the exact adversarial loss can slightly exceed
$\tilde L_{adv}$). Right: the slack $\tilde L_{mix}-\tilde L_{adv}(\varepsilon_{mix}\sqrt d)$ along ERM training, at every
snapshot strictly inside $\Theta$ (on its boundary, $\theta=0$ at initialisation included, $R=0$ and $\varepsilon_{mix}=0$:
the bound then says nothing). The $\ell_\infty$ ball of radius $\varepsilon$ lies inside the $\ell_2$ ball of radius
$\varepsilon\sqrt d$, hence the link to FGSM."""),
    code(r'''bounds = {a: T.robustness_bound(None, xg, yg, a, theta=theta_g) for a in alphas}
eps_max = 3 * max(b["eps_l2"] for b in bounds.values())
eps_grid = np.linspace(0, eps_max, 80)
adv2 = T.adv_loss_second_order_logistic(theta_g, xg, yg, eps_grid)
adv_exact = T.adv_loss_exact_linear(theta_g, xg, yg, eps_grid)

slack, snapshot_bounds = {a: [] for a in alphas}, {a: [] for a in alphas}
for step, state in bound_snaps:
    for a in alphas:
        b = T.robustness_bound(None, xg, yg, a, theta=state["theta"])
        if checks.strictly_inside_theta(b):
            snapshot_bounds[a].append((step, b))
            slack[a].append((step, b["mix"] - b["adv"], b["mix"] - b["exact_adv"]))

fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.2))
ax1.plot(eps_grid, adv2, label="L̃_adv(ε) (second order)")
ax1.plot(eps_grid, adv_exact, "--", label="exact l2 adversarial loss")
for k, (a, b) in enumerate(bounds.items()):
    ax1.axhline(b["mix"], color=f"C{k + 2}", lw=1, label=f"L̃_mix, α={a}")
    ax1.axvline(b["eps_l2"], color=f"C{k + 2}", ls=":", lw=1)
    ax1.plot([b["eps_l2"]], [b["adv"]], "o", color=f"C{k + 2}")
ax1.set(xlabel="ε (l2 radius, input units); dotted: ε_mix·√d", ylabel="loss (nats)",
        title=f"logistic regression on {datasets['bound']} (n={size['gauss_n']}, d={dg})")
ax1.legend(fontsize=7)
for k, a in enumerate(alphas):
    if slack[a]:
        st, s2, se = map(np.array, zip(*slack[a]))
        ax2.plot(st, s2, "-o", color=f"C{k}", label=f"L̃_mix − L̃_adv(ε_mix√d), α={a}")
        ax2.plot(st, se, ":x", color=f"C{k}", label=f"L̃_mix − exact adv(ε_mix√d), α={a}")
ax2.axhline(0, color="k", lw=0.8)
ax2.set_xlim(left=0)
ax2.set(xscale="symlog", xlabel="ERM step (snapshots strictly inside Θ)", ylabel="slack (nats)",
        title="the bound along training")
ax2.legend(fontsize=7)
show(fig, "theory_bound", dataset=datasets["bound"], n=size["gauss_n"], d=dg)
summary["bound"] = {str(a): b for a, b in bounds.items()}
for a, b in bounds.items():
    print(f"α={a}: θ∈Θ {b['in_theta']}, centred {b['centred']}, ε_mix√d = {b['eps_l2']:.4f}, "
          f"L̃_mix = {b['mix']:.4f} ≥ L̃_adv = {b['adv']:.4f} (exact adversarial {b['exact_adv']:.4f})")'''),
    md(r"""The network version (as papers.md states it: $f(x)=\nabla f(x)^\top x$, $R=\min_i|\cos(\nabla f(x_i),x_i)|$): a
bias-free ReLU MLP trained by ERM on the same data. Its homogeneity gap and $R_3$ are zero, so the same
inequality applies wherever it classifies every training point correctly."""),
    code(r'''relu = T.MLP(dg, size["width"], 2, act="relu", bias=False, seed=seed)
T.fit(relu, xg, yg, method="erm", steps=size["steps"], lr=0.01, seed=seed)
relu_bounds = {a: T.robustness_bound(relu, xg, yg, a) for a in alphas}
for a, b in relu_bounds.items():
    print(f"α={a}: θ∈Θ {b['in_theta']}, homogeneous {b['homogeneous']}, R3 = {b['r3']:.1e}, "
          f"ε_mix√d = {b['eps_l2']:.4f}, L̃_mix = {b['mix']:.4f}, L̃_adv = {b['adv']:.4f}")
summary["bound_relu"] = {str(a): {k: v for k, v in b.items() if k != "exact_adv"} for a, b in relu_bounds.items()}'''),
    md(r"""### What the theory guarantees, checked on this run
`mixlab.checks` raises `CheckFailed` with what went wrong:
- $\tilde L_{mix}\ge\tilde L_{adv}(\varepsilon_{mix}\sqrt d)$ at every ERM snapshot strictly inside $\Theta$ on centred data (logistic
  regression), and for the ReLU network where it lies strictly inside $\Theta$ (`checks.theory_bound`);
- the approximation is close where the expansion is valid: along a logistic-regression direction at small
  $\|\theta\|$, within 1% relative error of the regulariser (`checks.theory_expansion`);
- the closed-form $R_1,R_2,R_3$ of a logistic model equal the autograd ones, and the label-mixing identity
  (mixed labels under Beta = unmixed labels under $\tilde D$) holds to rounding (`checks.theory_identities`)."""),
    code(r'''for a in alphas:
    # the Gaussian mixture is separable, so ERM reaches θ strictly inside Θ (fails for a broken
    # data generator or ERM fit)
    assert snapshot_bounds[a], f"no ERM snapshot strictly inside Θ at alpha={a}"
    for step, b in snapshot_bounds[a]:
        checks.theory_bound(b)
    if checks.strictly_inside_theta(relu_bounds[a]):
        checks.theory_bound(relu_bounds[a])
    checks.theory_expansion(T.LogisticRegression(d, 0.05 * theta_hat), x, y, a, order=size["order"])
    checks.theory_identities(T.LogisticRegression(dg, theta_g), xg[:12], yg[:12], a)
    checks.theory_identities(fixed["MLP at initialisation"], x[:12], y[:12], a)
print("theory checks passed:", {a: f"{len(snapshot_bounds[a])} snapshots strictly inside Θ" for a in alphas})
print(f"sections 1-3 took {time.perf_counter() - t_start:.1f} s")'''),

    # ------------------------------------------------------------------ section 4
    md(r"""## 4. Robustness at scale: FGSM and PGD-20 accuracy against ε, ERM vs mixup

The paper's Fig. 1a is FGSM robust test accuracy against ε for ERM and mixup, two WRN-16-8 trained on SVHN.
SVHN is not available offline, so: `smoke` trains a SmallCNN on an MNIST subset (CPU proxy), `short` a
PreActResNet-18 on CIFAR-10, `paper` a WRN-16-8 on SVHN when its data is present and on CIFAR-10 otherwise;
the dataset used is printed and recorded. No numbers or hyperparameters of the paper's experiment are known
here: the engine's profile settings (SGD momentum 0.9, weight decay 5e-4), mixup α = 1 (Zhang et al. 2018)
and ε in {0, 1, 2, 4, 8}/255 ({0, 0.1, 0.2, 0.3} for MNIST) are choices. Linf threat model, pixels in [0, 1].

First, completing section 2: the train/test gap against α on a small MNIST subset (α = 0 is ERM)."""),
    code(r'''from pathlib import Path

from mixlab.data import find_dataset, load_dataset
from mixlab.evaluate import predict, robust_accuracy_curve

dev = nbtools.resolve_device(device)
base = Path(run_dir) if run_dir else nbtools.run_dir("mixup_theory", profile)


def run_for(dataset, a, **extra):
    """Train (or load) ERM (a = 0) or mixup with Beta(a, a) on ``dataset``."""
    method, hp = ("erm", {}) if a == 0 else ("mixup", {"alpha": a})
    name = f"{dataset}-{method}" + (f"-a{a:g}" if a else "")
    # eval_steps=0: only clean accuracy on the validation split during training (ERM and mixup
    # select their best checkpoint by it); the curves below do the attacking
    return nbtools.train_or_load(run_dir=base / name, dataset=dataset, method=method, profile=profile,
                         seed=seed, device=str(dev), quiet=True, eval_steps=0, method_hp=hp,
                         **extra)


mnist_train = load_dataset("mnist", "train").subset(size["real_subset"], seed=seed)
mnist_test = load_dataset("mnist", "test").subset(size["n_eval"], seed=0)
real_gap, mixup_runs = {}, []
for a in [0.0, *alphas]:
    run = run_for("mnist", a, model="smallcnn", train_subset=size["real_subset"])
    if a:
        mixup_runs.append(run)
    tr = (predict(run.model, mnist_train.x.to(dev).float() / 255).cpu() == mnist_train.y).float().mean().item()
    te = (predict(run.model, mnist_test.x.to(dev).float() / 255).cpu() == mnist_test.y).float().mean().item()
    real_gap[a] = (tr, te)
    print(("ERM" if a == 0 else f"mixup α={a}").ljust(14), f"train {tr:.3f}  test {te:.3f}  gap {tr - te:+.3f}")
summary["mnist_gap"] = {str(a): dict(train=tr, test=te) for a, (tr, te) in real_gap.items()}'''),
    code(r'''robust = datasets["robust"]
if robust == "auto":
    robust = "mnist" if profile == "smoke" else ("svhn" if find_dataset("svhn", "train") else "cifar10")
extra = ({"model": "smallcnn", "train_subset": size["real_subset"]} if robust == "mnist"
         else {"model": {"smoke": "tiny", "short": "preactresnet18", "paper": "wrn-16-8"}[profile]})
eps_list = [0, 0.1, 0.2, 0.3] if robust == "mnist" else [0, 1 / 255, 2 / 255, 4 / 255, 8 / 255]
test = load_dataset(robust, "test").subset(size["n_eval"], seed=0).to(dev)
x_test, y_test = test.x.float() / 255, test.y
curves, robust_runs = {}, {}
for label, a in (("ERM", 0.0), ("mixup α=1", 1.0)):
    run = robust_runs[label] = run_for(robust, a, **extra)
    curves[label] = {attack: robust_accuracy_curve(run.model, x_test, y_test, eps_list=eps_list,
                                                   attack=attack, norm="Linf")
                     for attack in ("fgsm", "pgd20")}
    print(label, {k: [round(v, 3) for v in c] for k, c in curves[label].items()})

eps_axis = [e * 255 for e in eps_list] if robust != "mnist" else eps_list
fig, ax = plt.subplots(figsize=(6.5, 4.2))
for k, (label, c) in enumerate(curves.items()):
    ax.plot(eps_axis, c["fgsm"], "-o", color=f"C{k}", label=f"{label}, FGSM")
    ax.plot(eps_axis, c["pgd20"], "--x", color=f"C{k}", label=f"{label}, PGD-20")
ax.set(xlabel="ε (Linf" + (", ×1/255)" if robust != "mnist" else ")"), ylabel="robust test accuracy",
       title=f"{robust}, {extra['model']} ({profile}; stands in for WRN-16-8 on SVHN)")
ax.legend(fontsize=8)
show(fig, "theory_robust", dataset=robust, model=extra["model"], n_eval=size["n_eval"],
     eps_list=eps_list, curves=curves)
summary["robust"] = dict(dataset=robust, model=extra["model"], eps_list=eps_list, curves=curves)'''),
    md(r"""The same two models at the largest ε of the curves, by one `evaluate` call per model and checkpoint on the
same test images (clean, FGSM, PGD-20, CW-20, AutoAttack; AutoAttack's two APGD stages only in the smoke profile):
the selected checkpoint (best clean accuracy on the validation split held out of the training set) and the last
one side by side, each row's masking report under the table (for the selected checkpoints with the PGD-20 curve
above). Reported, not asserted: nothing in the theory guarantees an ordering of ERM and mixup under attack at this
scale."""),
    code(r'''eps_table = eps_list[-1]
aa_attacks = ["apgd-ce", "apgd-t"] if profile == "smoke" else None
by_model = {label: nbtools.evaluate_checkpoints(label, run, x_test, y_test, eps=eps_table,
                                                norm="Linf", aa_attacks=aa_attacks)
            for label, run in robust_runs.items()}
results = {row: r for rows in by_model.values() for row, r in rows.items()}
curve_of_row = {nbtools.checkpoint_label(label, run): curves[label]["pgd20"]
                for label, run in robust_runs.items()}
print(nbtools.table_report(results, curves=curve_of_row))
print(f"{robust}, {extra['model']}, Linf eps = {eps_table:.4g}, n = {len(y_test)} test images "
      f"(AutoAttack: {next(iter(results.values()))['aa_attacks']})")
nbtools.save_table(results, "theory_robust_table", profile=profile,
                   extra={"dataset": robust, "model": extra["model"], "eps": eps_table,
                          "n": len(y_test)})
summary["robust_table"] = {row: {k: r[k] for k in ("clean", "fgsm", "pgd20", "cw20", "aa", "robust")}
                           for row, r in results.items()}
nbtools.save_table({"summary": summary}, "theory_summary", profile=profile)'''),
    md(r"""### Checks of the trained runs
Every mixup run drew its λ from Beta(α, α) (`checks.mixup_lambda`: α lost on the way to the sampler, or λ collapsed
to {0, 1}, would make it ERM); every evaluated row has AutoAttack not weaker than PGD-20 and no masking flags (the
attack-gap flags pass in the smoke profile, `nbtools.tolerated_flags`), for the selected checkpoints also none
from their PGD-20 curve."""),
    code(r'''from mixlab.evaluate import masking_report

for run in [*mixup_runs, robust_runs["mixup α=1"]]:
    checks.mixup_lambda(run)
for row, r in results.items():
    flags = masking_report(r, curve=curve_of_row.get(row))
    checks.evaluation({**r, "warnings": flags}, allow_warnings=nbtools.tolerated_flags(profile))
print("all checks passed")
print(f"notebook took {time.perf_counter() - t_start:.1f} s; summary in figures/theory_summary_{profile}.json")'''),
]

write_notebook(cells, "notebooks/mixup_theory.ipynb")
