"""Writes notebooks/mma_cifar10.ipynb and notebooks/mma_mnist.ipynb (outputs stripped).
Run: python tools/make_mma_notebooks.py"""
from nbwrite import code as new_code_cell
from nbwrite import md as new_markdown_cell
from nbwrite import write_notebook

SPEC = {
    "cifar10": dict(
        title="CIFAR-10",
        paper_setup="WRN-28-4, SGD lr 0.3 with steps at 20k/30k/40k of 50k steps, batch 128, "
                    "45k/5k train/validation split, AN-PGD with 10 PGD steps",
        profiles="`smoke` (CPU, tiny CNN, 1k images, about a minute), `short` (GPU, "
                 "PreActResNet-18, 15 epochs, one-cycle), `paper` (WRN-28-4, 143 epochs = 50k "
                 "steps, the official schedule)",
        d_max_doc="0: the paper's (32/255 Linf, 2.0 L2)",
        eps_doc="8/255 Linf, 0.5 L2",
    ),
    "mnist": dict(
        title="MNIST",
        paper_setup="LeNet5-Madry, Adam lr 1e-4, batch 50, 100k steps, 55k/5k train/validation "
                    "split, AN-PGD with 40 PGD steps",
        profiles="`smoke` (CPU, SmallCNN, 1k images, about a minute), `short` (GPU, "
                 "LeNet5-Madry, 10 epochs, Adam 1e-3), `paper` (LeNet5-Madry, 91 epochs = 100k "
                 "steps of batch 50, Adam 1e-4)",
        d_max_doc="0: the paper's (0.45 Linf, 4.0 L2)",
        eps_doc="0.3 Linf, 2.0 L2",
    ),
}


def cells(dataset: str):
    s = SPEC[dataset]
    name = f"mma_{dataset}"
    return [
        new_markdown_cell(f"""# MMA training on {s['title']}: margins, not a fixed ε

Ding, Sharma, Lui, Huang, *MMA Training: Direct Input Space Margin Maximization through Adversarial Training*, ICLR 2020 (arXiv 1812.02637; official code BorealisAI/mma_training).

The **margin** of a test point is its distance to the nearest input the model misclassifies (Linf or L2, pixel units). PGD-AT trains every example at one radius ε; MMA estimates each training example's own margin ε\\* with AN-PGD (PGD at the example's previous ε, then a bisection along the PGD direction for the closest misclassified point) and trains on that boundary point, pushing the boundary out, until ε\\* reaches the hinge d_max. Loss: (1 − c)·MMA + c·clean CE with c = 1/3.

This notebook trains (or loads) MMA, PGD-AT and ERM on the same budget and shows:
1. the distribution of ε\\* over training (histograms by epoch);
2. the margins of test points under each model (the paper's test-time estimate: PGD at max_eps = 1.05·d_max, then bisection);
3. robust accuracy against the attack radius;
4. the accuracy table (clean, FGSM, PGD-20, CW-20, AutoAttack) of the selected and the last checkpoint, with the paper's numbers beside it.

Every run holds out a validation split of the training set (as the paper's 45k/5k or 55k/5k split): the mean margin during training and the choice of the best checkpoint come from it; the test images are used only for the figures and the table.

Paper setup: {s['paper_setup']}.

Run headless: `papermill notebooks/{name}.ipynb runs/{name}.ipynb -p profile short --cwd notebooks` (also `-p norm L2`, `-p d_max ...`). Profiles: {s['profiles']}."""),
        new_code_cell(f"""profile = "smoke"     # type: str  run size: smoke | short | paper
device = "auto"       # type: str  auto | cpu | cuda | cuda:N
seed = 0              # type: int  random seed of the runs
dataset = "{dataset}"    # type: str  dataset name
norm = "Linf"         # type: str  threat model: Linf | L2
d_max = 0.0           # type: float  MMA's hinge, pixel units; {s['d_max_doc']}
clean_coeff = -1.0    # type: float  c of (1 - c)·MMA + c·clean CE; < 0: the paper's 1/3 (0 gives OMMA)
epochs = None         # type: int|None  training epochs; None: the profile's""",
                      metadata={"tags": ["parameters"]}),
        new_code_cell("""%matplotlib inline
import matplotlib.pyplot as plt
import numpy as np

from mixlab import checks, nbtools
from mixlab.data import load_dataset
from mixlab.evaluate import masking_report, robust_accuracy_curve
from mixlab.margins import run_margins
from mixlab.methods.mma import PRESETS
from mixlab.train import resolve_config

# the parameters, checked before anything runs (a wrong profile or type stops here)
nbtools.check_params(profile=profile, device=device, seed=seed, dataset=dataset, norm=norm,
                     d_max=d_max, clean_coeff=clean_coeff, epochs=epochs)
dev = nbtools.resolve_device(device)
mma_hp = {}
if d_max > 0:
    mma_hp["d_max"] = d_max
if clean_coeff >= 0:
    mma_hp["clean_coeff"] = clean_coeff
mma_config = dict(PRESETS[f"{dataset}-{norm.lower()}"][profile], seed=seed, device=str(dev),
                  quiet=True, method_hp=mma_hp)
if epochs is not None:
    mma_config["epochs"] = epochs
cfg = resolve_config(**mma_config)
hp = cfg["method_hp"]                              # d_max and mineps filled in for the data
d_max, eps = hp["d_max"], cfg["eps"]               # the hinge; the threat model's radius
max_eps = hp["max_eps_factor"] * d_max             # where every margin search stops
# the baselines get MMA's budget: network, data split, epochs, optimiser and schedule, and
# PGD-AT trains with as many PGD steps as AN-PGD takes
BUDGET = ("model", "epochs", "batch_size", "optimizer", "lr", "momentum", "weight_decay",
          "schedule", "milestones", "lr_factors", "warmup", "val_size", "train_subset",
          "eval_subset")
budget = {k: cfg[k] for k in BUDGET}
steps = cfg["steps"]                               # AN-PGD's PGD steps: the engine's
configs = {
    "mma": mma_config,
    "pgd_at": dict(method="pgd_at", dataset=dataset, norm=norm, profile=profile, seed=seed,
                   device=str(dev), quiet=True, steps=steps, step_size=2.5 * eps / steps,
                   **budget),
    "erm": dict(method="erm", dataset=dataset, norm=norm, profile=profile, seed=seed,
                device=str(dev), quiet=True, **budget),
}
# test images for margins, curves and the table (every attack on the same ones); the
# AutoAttack attacks (None: standard; smoke: its two APGD stages, FAB-T and Square cost ~40 s
# per model on a CPU); PGD steps of the margin estimate
n_eval, aa_attacks, margin_steps = {"smoke": (64, ["apgd-ce", "apgd-t"], 10),
                                    "short": (1000, None, 20),
                                    "paper": (10000, None, 20)}[profile]
fractions = (0, 0.5, 1, 1.5, 2) if profile == "smoke" else (0, 0.25, 0.5, 0.75, 1, 1.5, 2)
eps_grid = [eps * f for f in fractions]
curve_attack = "pgd10" if profile == "smoke" else "pgd20"
print(f"profile={profile} device={dev} norm={norm} d_max={d_max:.4f} max_eps={max_eps:.4f} "
      f"eps={eps:.4f} c={hp['clean_coeff']:.3f} model={cfg['model']} epochs={cfg['epochs']}")"""),
        new_markdown_cell("""## Train (or load the finished runs)

Each run lives in `runs/""" + name + """/<profile>/<norm>-dmax<d_max>/<method>`; a second execution loads it. MMA keeps every training example's ε\\* in a device tensor indexed by dataset index, saved in its checkpoints and logged each epoch (`run.method_arrays()`); its best checkpoint is the one with the largest mean margin on the validation split, as in the paper."""),
        new_code_cell(f"""tag = (f"{{norm}}-dmax{{d_max:.4g}}-c{{hp['clean_coeff']:.3g}}"
       + (f"-ep{{epochs}}" if epochs else ""))
runs = {{name: nbtools.train_or_load(run_dir=nbtools.run_dir("{name}", profile, tag, name), **config)
        for name, config in configs.items()}}
speed = {{name: np.mean([h["img_per_s"] for h in run.history]) for name, run in runs.items()}}
for name, run in runs.items():
    last = run.history[-1]
    print(f"{{name:7s}} {{len(run.history)}} epochs  train {{speed[name]:8.1f}} img/s  "
          f"validation clean {{last['val_clean']:.3f}}  PGD-{{cfg['eval_steps']}} "
          f"{{last.get('val_robust', float('nan')):.3f}}  selected epoch {{run.epoch}}")
# with the smoke profile's few PGD steps the 11 forward passes of the bisection weigh
# relatively more than on the GPU profiles
print(f"MMA takes {{speed['pgd_at'] / speed['mma']:.2f}}x the time of PGD-AT per training image")"""),
        new_markdown_cell("""## 1. ε\\* over training

The margin estimate ε\\* of every training example at the end of each epoch. ε\\* = 0 marks examples whose clean point is not *confidently* correct (soft logit margin ≥ 0, i.e. p_y ≤ 1/2, the official criterion): they train on clean CE. ε\\* ≥ d_max are past the hinge and add no MMA loss; max_eps means no boundary was found along the PGD direction. As training goes on the mass moves right: the model pushes its decision boundary away from the training points. (In the smoke profile a tiny CNN trained for seconds on CIFAR-10 is rarely confident, so only a few percent of the ε\\* are above 0 there; the MNIST notebook's smoke run shows the dynamics.)"""),
        new_code_cell(f"""logged = runs["mma"].method_arrays()
shown = sorted(set(np.linspace(0, len(logged) - 1, min(6, len(logged))).round().astype(int)))
fig, (ax_hist, ax_mean, ax_share) = plt.subplots(1, 3, figsize=(16, 4))
bins = np.linspace(0, max_eps, 31)
colors = plt.cm.viridis(np.linspace(0, 0.9, len(shown)))
for color, i in zip(colors, shown):
    e = logged[i]["eps"]
    ax_hist.hist(e[e > 0], bins=bins, histtype="step", lw=2, color=color,
                 label=f"epoch {{i + 1}} ({{(e > 0).mean():.0%}} of examples)")
for x_line, style, label in [(d_max, "--", "d_max"), (eps, ":", "test ε")]:
    ax_hist.axvline(x_line, color="k", ls=style, label=label)
ax_hist.set(xlabel=f"ε* ({{norm}}, pixel units)", ylabel="training examples",
            title="ε* of the confidently correct training examples")
ax_hist.legend(fontsize=7)
ep = np.arange(1, len(logged) + 1)
ax_mean.plot(ep, [a["eps"][a["eps"] > 0].mean() if (a["eps"] > 0).any() else 0
                      for a in logged], marker="o", label="mean ε* (ε* > 0)")
ax_mean.plot(ep, [h.get("val_mean_margin") for h in runs["mma"].history], marker="^",
             label="mean margin, validation split")
ax_mean.set(xlabel="epoch", ylabel=f"{{norm}} distance", title="margins during training")
ax_share.plot(ep, [(a["eps"] == 0).mean() for a in logged], marker="o",
              label="ε* = 0 (clean CE)")
ax_share.plot(ep, [(a["eps"] >= d_max).mean() for a in logged], marker="s",
              label="ε* ≥ d_max (past the hinge)")
ax_share.set(xlabel="epoch", ylabel="share of training examples", ylim=(-0.02, 1.02),
             title="where the training examples are")
ax_mean.legend(fontsize=8); ax_share.legend(fontsize=8)
nbtools.save_figure(fig, f"{name}_{{norm.lower()}}_eps_by_epoch", profile=profile,
                    extra={{"norm": norm, "d_max": d_max, "model": cfg["model"]}})
print(f"last epoch: {{(logged[-1]['eps'] > 0).mean():.1%}} of the training examples have ε* > 0")"""),
        new_markdown_cell("""## 2. Margins of test points: MMA vs PGD-AT vs ERM

The same estimator for every model (the paper's "AN-PGD for test"): PGD with the SLM loss at max_eps, then a 10-step bisection along the PGD direction for the first misclassified point (`mixlab.margins.estimate_margin`; each value is an upper bound on the true margin). Misclassified test points have margin 0; max_eps means none was found. The right panel reads as an accuracy curve: the share of test points whose margin exceeds r is the accuracy under this attack at radius r. Per-example margins are saved with each run (`<run>/margins/test.npz`)."""),
        new_code_cell(f"""test = load_dataset(dataset, "test").subset(n_eval, seed=0).to(dev)
x_test, y_test = test.x.float() / 255, test.y
# the selected checkpoints; the file name keeps them apart from the last checkpoint's
margins = {{name: run_margins(run, x_test, y_test, norm=norm, max_eps=max_eps, steps=margin_steps,
                             name=f"test_{{run.which}}")
           for name, run in runs.items()}}
fig, (ax_hist, ax_surv) = plt.subplots(1, 2, figsize=(13, 4))
radii = np.linspace(0, max_eps, 200)
for name, m in margins.items():
    ax_hist.hist(m[m > 0], bins=np.linspace(0, max_eps, 26), histtype="step", lw=2,
                 label=f"{{name}} (mean {{m.mean():.4f}}, {{(m == 0).mean():.0%}} wrong)")
    ax_surv.plot(radii, [(m > r).mean() for r in radii], lw=2, label=name)
for ax in (ax_hist, ax_surv):
    ax.axvline(eps, color="k", ls=":", label="test ε")
    ax.axvline(d_max, color="k", ls="--", label="d_max")
ax_hist.set(xlabel=f"margin ({{norm}})", ylabel="test points",
            title=f"margins of the correct ones among {{n_eval}} test points")
ax_surv.set(xlabel="radius r", ylabel="share of test points with margin > r",
            title="margin survival (= accuracy under AN-PGD at r)")
ax_hist.legend(fontsize=8); ax_surv.legend(fontsize=8)
nbtools.save_figure(fig, f"{name}_{{norm.lower()}}_test_margins", profile=profile,
                    extra={{"norm": norm, "d_max": d_max, "n": n_eval}})
for name, m in margins.items():
    correct = m > 0
    print(f"{{name:7s}} mean margin {{m.mean():.4f}}  median over correct points "
          f"{{np.median(m[correct]) if correct.any() else 0:.4f}}")"""),
        new_markdown_cell("""## 3. Robust accuracy against the radius

PGD with a random start at each radius (0 = clean accuracy), on the same test points. MMA trades a little accuracy at small radii for accuracy at large ones: its margins spread up to d_max rather than piling up at one ε."""),
        new_code_cell(f"""curves = {{name: robust_accuracy_curve(run.model, x_test, y_test, eps_list=eps_grid,
                                     attack=curve_attack, norm=norm)
          for name, run in runs.items()}}
fig, ax = plt.subplots(figsize=(6.5, 4))
for name, accs in curves.items():
    ax.plot(eps_grid, accs, marker="o", label=name)
ax.axvline(eps, color="k", ls=":", label="test ε")
ax.set(xlabel=f"ε ({{norm}}, pixel units)", ylabel="accuracy",
       title=f"{{curve_attack.upper()}} accuracy, {{n_eval}} test images")
ax.legend()
nbtools.save_figure(fig, f"{name}_{{norm.lower()}}_robust_curves", profile=profile,
                    extra={{"norm": norm, "attack": curve_attack, "n": n_eval}})"""),
        new_markdown_cell("""## 4. The table, with the paper's numbers beside it

Clean, FGSM, PGD-20 (CE), CW-20 and AutoAttack accuracy at the threat model's ε, by one `evaluate` call per model and checkpoint on the same test images (AutoAttack standard; its two APGD stages only in the smoke profile): the selected checkpoint (`best`, the largest mean margin on the validation split for MMA, the best validation accuracy for the others) and the `last` one side by side. Under the table, each row's masking report (for the selected checkpoints with the robust-accuracy curve of section 3). The paper's rows are full-test-set numbers for its own (much longer) runs; ours depend on the profile (the smoke profile trains a tiny network for seconds: only the code path is checked, not the paper's claims)."""),
        new_code_cell(f"""# RobustBench's Ding2020MMA entries (WRN-28-4, full CIFAR-10 test set, AutoAttack standard);
# the paper itself reports ≈ 84 clean / 47 under its own PGD ensemble for Linf MMA-32.
PAPER = {{("cifar10", "Linf"): ("paper: MMA-32 (RobustBench)", dict(clean=0.8436, aa=0.4144)),
         ("cifar10", "L2"): ("paper: MMA-2.0 (RobustBench)", dict(clean=0.8802, aa=0.6609))}}
# {{name: {{"<name> (best, ep B)": result, "<name> (last, ep L)": result}}}}
by_method = {{name: nbtools.evaluate_checkpoints(name, run, x_test, y_test, eps=eps, norm=norm,
                                                aa_attacks=aa_attacks)
             for name, run in runs.items()}}
results = {{row: r for rows in by_method.values() for row, r in rows.items()}}
rows = dict(results)
if (dataset, norm) in PAPER:
    label, numbers = PAPER[dataset, norm]
    rows[label] = numbers
else:
    print(f"papers.md records no published numbers for {{dataset}} {{norm}}: the table shows "
          f"this run only")
curve_of_row = {{nbtools.checkpoint_label(name, run): curves[name] for name, run in runs.items()}}
print(nbtools.table_report(rows, curves=curve_of_row))
aa_run = next(iter(results.values()))["aa_attacks"]
print(f"n={{n_eval}} test images for every attack (AutoAttack: {{aa_run}}), eps={{eps:.4f}} {{norm}}")
nbtools.save_table(rows, f"{name}_{{norm.lower()}}_table", profile=profile,
                   extra={{"n": n_eval, "aa_attacks": aa_run, "norm": norm, "eps": eps,
                          "d_max": d_max, "model": cfg["model"],
                          "mean_margin_selected": {{k: float(m.mean()) for k, m in margins.items()}},
                          "mma_over_pgd_at_time": speed["pgd_at"] / speed["mma"]}})"""),
        new_markdown_cell("""## Checks

`mixlab.checks` raises `CheckFailed` with what went wrong: each check can fail for a real bug in MMA's margin search, in training or in the evaluation."""),
        new_code_cell("""# the margins ε* stored during training were found by AN-PGD's search
checks.mma_margins(runs["mma"])
# every row: AutoAttack not weaker than PGD-20, no masking flags (a few noisy ones pass in
# smoke: nbtools.tolerated_flags), for the selected checkpoints also none from the
# robust-accuracy curve of section 3 (accuracy rising with the radius). Trained for real
# (short, paper): above chance clean (else an untrained model, or test images with other
# preprocessing or labels than training), and the adversarially trained models robust in the
# worst case; smoke models, trained for seconds, can sit near chance on 64 test images
trained = profile != "smoke"
for name, rows in by_method.items():
    for row, r in rows.items():
        flags = masking_report(r, curve=curve_of_row.get(row))
        checks.evaluation({**r, "warnings": flags}, allow_warnings=nbtools.tolerated_flags(profile),
                          min_clean=1 / test.num_classes + 0.05 if trained else None,
                          min_robust=0.25 if trained and name != "erm" else None)
if profile != "smoke":  # fails when MMA's margin loss does not push the boundary out
    assert margins["mma"].mean() > margins["erm"].mean(), "MMA margins below ERM's"
print("all checks passed")"""),
    ]


for dataset in SPEC:
    write_notebook(cells(dataset), f"notebooks/mma_{dataset}.ipynb")
