# %% [markdown]
# # MMA training: margins, not a fixed ε (CIFAR-10 or MNIST)
#
# Ding, Sharma, Lui, Huang, *MMA Training: Direct Input Space Margin Maximization through Adversarial Training*, ICLR 2020 (arXiv 1812.02637; official code BorealisAI/mma_training). More in [docs/mma.md](../docs/mma.md).
#
# The **margin** of a test point is its distance to the nearest input the model misclassifies (Linf or L2, pixel units). PGD-AT trains every example at one radius ε; MMA estimates each training example's own margin ε\* with AN-PGD (PGD at the example's previous ε, then a bisection along the PGD direction for the closest misclassified point) and trains on that boundary point, pushing the boundary out, until ε\* reaches the hinge d_max. Loss: (1 − c)·MMA + c·clean CE with c = 1/3.
#
# This notebook trains (or loads) MMA, PGD-AT and ERM on the same budget and shows:
# 1. the distribution of ε\* over training (histograms by epoch);
# 2. the margins of test points under each model (mixlab's estimate, `mixlab.attacks.estimate_margin`: PGD at max_eps = 1.05·d_max, then a bisection; not the official "ANPGD for test", see [docs/mma.md](../docs/mma.md#the-validation-margin));
# 3. robust accuracy against the attack radius;
# 4. the accuracy table (clean, FGSM, PGD-20, CW-20, AutoAttack) of the selected and the last checkpoint, with the paper's numbers beside it.
#
# Every run holds out a validation split of the training set (as the paper's 45k/5k or 55k/5k split): the mean margin during training and the choice of the best checkpoint come from it; the test images are used only for the figures and the table.
#
# The `dataset` parameter picks the experiment; `python -m mixlab.notebooks` runs both and names the executed copies `mma_cifar10.ipynb` and `mma_mnist.ipynb`, and the figures are `mma_<dataset>_<norm>_*`.
# - **CIFAR-10** (paper: WRN-28-4, SGD lr 0.3 with steps at 20k/30k/40k of 50k steps, batch 128, 45k/5k train/validation split, AN-PGD with 10 PGD steps). Profiles: `smoke` (CPU, tiny CNN, 1k images, about a minute), `short` (GPU, PreActResNet-18, 15 epochs, one-cycle), `paper` (WRN-28-4, 143 epochs = 50k steps, the official schedule).
# - **MNIST** (paper: LeNet5-Madry, Adam lr 1e-4, batch 50, 100k steps, 55k/5k train/validation split, AN-PGD with 40 PGD steps). Profiles: `smoke` (CPU, SmallCNN, 1k images, about a minute), `cpu` (CPU, the tiny CNN, 8,000 images, 8 epochs, Adam 1e-3, 10 AN-PGD steps, the paper's radii: MMA costs about twice PGD-AT per image, and MMA, PGD-AT and ERM on this budget take about a quarter of an hour on two cores; MNIST because its models turn robust within such a budget, CIFAR-10's tiny models barely do), `short` (GPU, LeNet5-Madry, 10 epochs, Adam 1e-3), `paper` (LeNet5-Madry, 91 epochs = 100k steps of batch 50, Adam 1e-4).
#
# Run headless: `papermill notebooks/mma.ipynb runs/mma_cifar10.ipynb -p profile short --cwd notebooks` (also `-p dataset mnist`, `-p norm L2`, `-p d_max ...`). What each profile evaluates: `mixlab.notebook_settings`.

# %% tags=["parameters"]
profile = "smoke"     # type: str  run size: smoke | cpu | short | paper
device = "auto"       # type: str  auto | cpu | cuda | cuda:N
seed = 0              # type: int  random seed of the runs
dataset = "cifar10"   # type: str  cifar10 | mnist
norm = "Linf"         # type: str  threat model: Linf | L2
d_max = 0.0           # type: float  MMA's hinge, pixel units; 0: the paper's (CIFAR-10 32/255 Linf, 2.0 L2; MNIST 0.45 Linf, 4.0 L2)
clean_coeff = -1.0    # type: float  c of (1 - c)·MMA + c·clean CE; < 0: the paper's 1/3 (0 gives OMMA)
epochs = None         # type: int|None  training epochs; None: the profile's
quiet = False         # type: bool  no progress bars (training steps, evaluation batches; -p quiet true)

# %%
# %matplotlib inline
import numpy as np

from mixlab import checks, nbtools, plots
from mixlab.evaluate import masking_report, robust_accuracy_curve
from mixlab.margins import run_margins
from mixlab.methods.mma import PRESETS
from mixlab.notebook_settings import notebook_settings
from mixlab.references import reference_rows
from mixlab.train import resolve_config

# the parameters, checked before anything runs (a wrong profile or type stops here) and
# rebound to their normalised values (papermill's `-p quiet true` arrives as text)
profile, device, seed, dataset, norm, d_max, clean_coeff, epochs, quiet = nbtools.check_params(
    profile=profile, device=device, seed=seed, dataset=dataset, norm=norm, d_max=d_max,
    clean_coeff=clean_coeff, epochs=epochs, quiet=quiet).values()
preset = f"{dataset}-{norm.lower()}"
if profile not in PRESETS.get(preset, {}):  # mixlab.methods.mma.PRESETS: dataset-norm -> profile
    raise ValueError(f"MMA has no preset {preset!r} for profile {profile!r}; presets: "
                     f"{ {k: list(v) for k, v in PRESETS.items()} }")
s = notebook_settings("mma", profile)
name = f"mma_{dataset}"   # runs, figures and tables of this experiment
dev = nbtools.resolve_device(device)
mma_hp = {}
if d_max > 0:
    mma_hp["d_max"] = d_max
if clean_coeff >= 0:
    mma_hp["clean_coeff"] = clean_coeff
mma_config = dict(PRESETS[preset][profile], seed=seed, device=str(dev), quiet=quiet,
                  method_hp=mma_hp)
if epochs is not None:
    mma_config["epochs"] = epochs
cfg = resolve_config(**mma_config)
hp = cfg["method_hp"]                              # d_max and mineps filled in for the data
d_max, eps = hp["d_max"], cfg["eps"]               # the hinge; the threat model's radius
max_eps = hp["max_eps_factor"] * d_max             # where every margin search stops
# the baselines get MMA's budget (network, data split, epochs, optimiser and schedule), and
# PGD-AT trains with as many PGD steps as AN-PGD takes
budget = nbtools.shared_budget(cfg)
steps = cfg["steps"]                               # AN-PGD's PGD steps: the engine's
baseline = dict(dataset=dataset, norm=norm, profile=profile, seed=seed, device=str(dev),
                quiet=quiet, **budget)
configs = {
    "mma": mma_config,
    "pgd_at": dict(method="pgd_at", steps=steps, step_size=2.5 * eps / steps, **baseline),
    "erm": dict(method="erm", **baseline),
}
eps_grid = [eps * f for f in s["eps_fractions"]]
print(f"profile={profile} device={dev} dataset={dataset} norm={norm} d_max={d_max:.4f} "
      f"max_eps={max_eps:.4f} eps={eps:.4f} c={hp['clean_coeff']:.3f} model={cfg['model']} "
      f"epochs={cfg['epochs']}\nsettings: {s}")

# %% [markdown]
# ## Train (or load the finished runs)
#
# Each run lives in `runs/mma_<dataset>/<profile>/<norm>-dmax<d_max>/<method>`; a second execution loads it. MMA keeps every training example's ε\* in a device tensor indexed by dataset index, saved in its checkpoints and logged each epoch (`run.method_arrays()`); its best checkpoint is the one with the largest mean margin on the validation split, as in the paper.

# %%
tag = (f"{norm}-dmax{d_max:.4g}-c{hp['clean_coeff']:.3g}"
       + (f"-ep{epochs}" if epochs else ""))
runs = {method: nbtools.train_or_load(run_dir=nbtools.run_dir(name, profile, tag, method), **config)
        for method, config in configs.items()}
speed = {method: nbtools.train_speed(run) for method, run in runs.items()}
print(nbtools.describe_runs(runs))
# with the smoke profile's few PGD steps the 11 forward passes of the bisection weigh
# relatively more than on the GPU profiles
print(f"MMA takes {speed['pgd_at'] / speed['mma']:.2f}x the time of PGD-AT per training image")

# %% [markdown]
# ## 1. ε\* over training
#
# The margin estimate ε\* of every training example at the end of each epoch. ε\* = 0 marks examples whose clean point is not *confidently* correct (soft logit margin ≥ 0, i.e. p_y ≤ 1/2, the official criterion): they train on clean CE. ε\* ≥ d_max are past the hinge and add no MMA loss; max_eps means no boundary was found along the PGD direction. As training goes on the mass moves right: the model pushes its decision boundary away from the training points. (In the smoke profile a tiny CNN trained for seconds on CIFAR-10 is rarely confident, so only a few percent of the ε\* are above 0 there; MNIST's smoke run shows the dynamics.)

# %%
logged = runs["mma"].method_arrays()
fig = plots.eps_by_epoch(logged, [h.get("val_mean_margin") for h in runs["mma"].history],
                         d_max=d_max, eps=eps, max_eps=max_eps, norm=norm)
nbtools.save_figure(fig, f"{name}_{norm.lower()}_eps_by_epoch", profile=profile,
                    extra={"norm": norm, "d_max": d_max, "model": cfg["model"]})
print(f"last epoch: {(logged[-1]['eps'] > 0).mean():.1%} of the training examples have ε* > 0")

# %% [markdown]
# ## 2. Margins of test points: MMA vs PGD-AT vs ERM
#
# The same estimator for every model (`mixlab.attacks.estimate_margin`; it differs from the official "ANPGD for test": [docs/mma.md](../docs/mma.md#the-validation-margin)): PGD with the SLM loss at max_eps, then a 10-step bisection along the PGD direction for the first misclassified point (`mixlab.margins.estimate_margin`; each value is an upper bound on the true margin). Misclassified test points have margin 0; max_eps means none was found. The right panel reads as an accuracy curve: the share of test points whose margin exceeds r is the accuracy under this attack at radius r. Per-example margins are saved with each run (`<run>/margins/test.npz`).

# %%
test, x_test, y_test = nbtools.load_test_images(dataset, s["n_eval"], dev)
# the selected checkpoints; the file name keeps them apart from the last checkpoint's
margins = {method: run_margins(run, x_test, y_test, norm=norm, max_eps=max_eps,
                               steps=s["margin_steps"], name=f"test_{run.which}")
           for method, run in runs.items()}
fig = plots.margin_distributions(margins, eps=eps, d_max=d_max, max_eps=max_eps, norm=norm)
nbtools.save_figure(fig, f"{name}_{norm.lower()}_test_margins", profile=profile,
                    extra={"norm": norm, "d_max": d_max, "n": len(y_test)})
for method, m in margins.items():
    correct = m > 0
    print(f"{method:7s} mean margin {m.mean():.4f}  median over correct points "
          f"{np.median(m[correct]) if correct.any() else 0:.4f}")

# %% [markdown]
# ## 3. Robust accuracy against the radius
#
# PGD with a random start at each radius (0 = clean accuracy), on the same test points. MMA trades a little accuracy at small radii for accuracy at large ones: its margins spread up to d_max rather than piling up at one ε.

# %%
curves = {method: robust_accuracy_curve(run.model, x_test, y_test, eps_list=eps_grid,
                                        attack=s["curve_attack"], norm=norm,
                                        progress=not quiet)
          for method, run in runs.items()}
fig = plots.accuracy_vs_eps({method: {s["curve_attack"].upper(): accs}
                             for method, accs in curves.items()}, eps_grid,
                            xlabel=f"ε ({norm}, pixel units)", marks={"test ε": eps},
                            title=f"{s['curve_attack'].upper()} accuracy, {len(y_test)} test images")
nbtools.save_figure(fig, f"{name}_{norm.lower()}_robust_curves", profile=profile,
                    extra={"norm": norm, "attack": s["curve_attack"], "n": len(y_test)})

# %% [markdown]
# ## 4. The table, with the paper's numbers beside it
#
# Clean, FGSM, PGD-20 (CE), CW-20 and AutoAttack accuracy at the threat model's ε, by one `evaluate` call per model and checkpoint on the same test images (AutoAttack standard; its two APGD stages only in the smoke profile): the selected checkpoint (`best`, the largest mean margin on the validation split for MMA, the best validation accuracy for the others) and the `last` one side by side. Under the table, each row's masking report (for the selected checkpoints with the robust-accuracy curve of section 3). The paper's rows (`mixlab.references`) are full-test-set numbers for its own (much longer) runs; ours depend on the profile (the smoke profile trains a tiny network for seconds: only the code path is checked, not the paper's claims).

# %%
# {method: {"<method> (best, ep B)": result, "<method> (last, ep L)": result}}
by_method = nbtools.evaluate_runs(runs, x_test, y_test, progress=not quiet, eps=eps, norm=norm,
                                  aa_attacks=s["aa_attacks"])
papers = reference_rows("mma", dataset=dataset, norm=norm)
if not papers:
    print(f"mixlab.references holds no published numbers for {dataset} {norm}: the table shows "
          f"this run only")
rows = nbtools.table_rows(by_method, papers)
curve_of_row = {nbtools.checkpoint_label(method, run): curves[method]
                for method, run in runs.items()}
print(nbtools.table_report(rows, curves=curve_of_row))
aa_run = nbtools.aa_used(rows)
print(f"n={len(y_test)} test images for every attack (AutoAttack: {aa_run}), eps={eps:.4f} {norm}")
for label, row in papers.items():
    print(f"{label}: {row['source']}")
nbtools.save_table(rows, f"{name}_{norm.lower()}_table", profile=profile,
                   extra={"n": len(y_test), "aa_attacks": aa_run, "norm": norm, "eps": eps,
                          "d_max": d_max, "model": cfg["model"],
                          "mean_margin_selected": {k: float(m.mean()) for k, m in margins.items()},
                          "mma_over_pgd_at_time": speed["pgd_at"] / speed["mma"]})

# %% [markdown]
# ## Checks
#
# `mixlab.checks` raises `CheckFailed` with what went wrong: each check can fail for a real bug in MMA's margin search, in training or in the evaluation.

# %%
# the margins ε* stored during training were found by AN-PGD's search
checks.mma_margins(runs["mma"])
# every row: AutoAttack not weaker than PGD-20, no masking flags (the noisy ones of a barely
# trained model pass where the settings tolerate them), for the selected checkpoints also none
# from the robust-accuracy curve of section 3 (accuracy rising with the radius). Trained for
# real (the `trained` setting): above chance clean (else an untrained model, or test images
# with other preprocessing or labels than training), and PGD-AT robust in the worst case
# (`min_robust`); MMA's robustness at the threat model's eps is the paper's claim, shown in the
# table and the curve, not asserted; smoke models, trained for seconds, can sit near chance on
# 64 test images
for method, by_row in by_method.items():
    for row, r in by_row.items():
        flags = masking_report(r, curve=curve_of_row.get(row))
        checks.evaluation({**r, "warnings": flags}, allow_warnings=s["tolerated_flags"],
                          min_clean=1 / test.num_classes + 0.05 if s["trained"] else None,
                          min_robust=s["min_robust"] if method == "pgd_at" else None)
if s["trained"]:  # fails when MMA's margin loss does not push the boundary out
    assert margins["mma"].mean() > margins["erm"].mean(), "MMA margins below ERM's"
print("all checks passed")
