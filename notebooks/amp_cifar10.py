# %% [markdown]
# # AMP: adversarially optimized mixup on CIFAR-10
#
# Bunk, Chattopadhyay, Manjunath, Chandrasekaran, *Adversarially Optimized Mixup for Robust Classification*, 2021 (arXiv 2103.11589). PGD probes the space **between** training points by backpropagating through the mixup interpolation; the model is trained on the worst mixed points found. Two optional modifications: optimizing the mixup ratio λ (`lam_opt`) and geometric label assignment (`geo_label`).
#
# **mixlab's AMP is a stated reconstruction**: the paper has no public code and its abstract is all that fixes the method, so every choice beyond the abstract (perturb both endpoints, soft labels, signed λ steps of 0.05 in a box, the projection that defines the geometric label, ...) is mixlab's and is a flag of `mixlab.methods.amp` (see its docstring and [docs/amp.md](../docs/amp.md)). Name clash: "AMP" also names Adversarial Model Perturbation (Zheng et al., CVPR 2021), an unrelated method; mixup surveys call this paper "AOM".
#
# The notebook trains (or loads) ERM, mixup, PGD-AT and the AMP variants on one budget, then shows predictions along interpolation paths (clean and worst case over the eps-ball), the images along a path, histograms of the optimized λ* and of t_geo − λ, and the ablation table clean / FGSM / PGD-20 / CW-20 / AutoAttack.
#
# Run headless: `papermill notebooks/amp_cifar10.ipynb runs/amp_cifar10.ipynb -p profile short --cwd notebooks` (`make demo` does this). Profiles: `smoke` (CPU, tiny CNN, 1k images, 2 epochs: the plots show the machinery, not the paper's numbers), `cpu` (a laptop's CPU: about a quarter of an hour on two cores, two seeds of PGD-AT and AMP; measured times in the README's Results), `short` (GPU, PreActResNet-18), `paper`. What each profile evaluates: `mixlab.notebook_settings`.

# %% tags=["parameters"]
profile = "smoke"      # type: str  run size: smoke | cpu | short | paper
# AMP variants of the ablation: names in mixlab.methods.amp.VARIANTS
variants = ["base", "lam_opt", "geo_label", "both"]  # type: list[str]  AMP variants
dataset = "cifar10"    # type: str  cifar10 | cifar100
seed = 0               # type: int  random seed of data order, initialisation and attacks
eps = None             # type: float|None  Linf radius, pixel units; None: the dataset's standard (8/255)
epochs = None          # type: int|None  training epochs; None: the profile's
run_dir = ""           # type: str  run folder; empty: runs/amp_cifar10/<profile>/<dataset>-eps<..>-seed<seed>
device = "auto"        # type: str  auto | cpu | cuda | cuda:N
quiet = False          # type: bool  no progress bars (training steps, evaluation batches; -p quiet true)

# %%
# %matplotlib inline
from pathlib import Path

import numpy as np
import torch

from mixlab import checks, nbtools, plots
from mixlab.config import attack_spec
from mixlab.data import dataset_info
from mixlab.methods.amp import VARIANTS
from mixlab.notebook_settings import notebook_settings
from mixlab.paths import interpolation_path

# the parameters, checked before anything runs (a wrong profile or type stops here) and
# rebound to their normalised values (`-p variants base,both` is a list now)
profile, variants, dataset, seed, eps, epochs, run_dir, device, quiet = nbtools.check_params(
    profile=profile, variants=variants, dataset=dataset, seed=seed, eps=eps, epochs=epochs,
    run_dir=run_dir, device=device, quiet=quiet).values()
s = notebook_settings("amp_cifar10", profile)
dev = nbtools.resolve_device(device)
eps = eps if eps is not None else dataset_info(dataset)["eps"]["Linf"]
budget = {} if epochs is None else {"epochs": epochs}
root = Path(run_dir) if run_dir else nbtools.run_dir(
    "amp_cifar10", profile, f"{dataset}-eps{eps * 255:g}-seed{seed}"
    + (f"-ep{epochs}" if epochs else ""))
methods = {"erm": dict(method="erm"), "mixup": dict(method="mixup"),
           "pgd_at": dict(method="pgd_at"),
           **{f"amp_{v}": dict(method="amp", method_hp=VARIANTS[v]) for v in variants}}
print(f"profile={profile} device={dev} eps={eps:.4f} runs in {root}\nsettings: {s}")
print(methods)

# %% [markdown]
# ## Train (or load the finished runs), one budget for all
#
# Every model gets the same profile (architecture, epochs, schedule, PGD steps) and holds out the same validation split of the training set: the in-training accuracies below and the choice of each run's best checkpoint come from it, never from the test set. A second execution loads the finished runs instead of retraining.

# %%
runs = {name: nbtools.train_or_load(run_dir=root / name, dataset=dataset, profile=profile,
                                    seed=seed, eps=eps, device=str(dev), quiet=quiet, **budget,
                                    **spec)
        for name, spec in methods.items()}
cfg = runs["erm"].config
print(f"{cfg['model']}, {cfg['epochs']} epochs, training PGD steps {cfg['steps']}, validation "
      f"split of {cfg['val_size']} training images; last epoch, and the selected one:")
print(nbtools.describe_runs(runs))
img_per_s = {name: nbtools.train_speed(run) for name, run in runs.items()}

# %% [markdown]
# ## Predictions along interpolation paths
#
# For fixed test pairs (x_a, x_b) with different labels, the path is λ·x_a + (1 − λ)·x_b on 51 points of λ ∈ [0, 1] (λ = 0 is x_b, λ = 1 is x_a). Solid: clean probabilities of y_a, y_b and the strongest other class. Dashed: the **worst case** over the eps-ball around each mixed point, per curve (`mixlab.paths`): the lowest p(y_a), the lowest p(y_b) and the highest p(other) PGD finds at that λ, never better than the clean value (δ = 0 is in the ball). A smooth, congruent model keeps the solid curves monotone and the dashed ones close to them.

# %%
test, x_test, y_test = nbtools.load_test_images(dataset, s["n_eval"], dev)
# fixed pairs: consecutive test images (0, 1), (2, 3), ... whose labels differ
labels = y_test.tolist()
pairs = [(i, i + 1) for i in range(0, len(labels) - 1, 2)
         if labels[i] != labels[i + 1]][:s["n_pairs"]]
ia, ib = [a for a, _ in pairs], [b for _, b in pairs]
x_a, x_b, y_a, y_b = x_test[ia], x_test[ib], y_test[ia], y_test[ib]
# each model's path probe is cached in its run folder, keyed by the checkpoint, the pairs and
# the probe's settings (a second execution loads it)
paths = {name: nbtools.cached(
             run.path, "path_probe",
             dict(checkpoint=nbtools.checkpoint_fingerprint(run),
                  pairs=nbtools.tensor_fingerprint(x_a, x_b, y_a, y_b), eps=eps,
                  steps=s["path_steps"]),
             lambda run=run: interpolation_path(run.model, x_a, x_b, y_a=y_a, y_b=y_b, eps=eps,
                                                steps=s["path_steps"]))
         for name, run in runs.items()}
fig = plots.path_grid(paths, test.classes,
                      title=f"class probabilities along x_b → x_a; solid clean, dashed worst "
                            f"case (Linf eps = {eps * 255:g}/255, PGD-{s['path_steps']} per λ)")
nbtools.save_figure(fig, "amp_paths", profile=profile,
                    extra={"dataset": dataset, "pairs": pairs, "eps": eps})

# %%
fig = plots.path_images(x_a, x_b, y_a, y_b, test.classes, lams=11)
nbtools.save_figure(fig, "amp_path_images", profile=profile, extra={"pairs": pairs})

# %% [markdown]
# ## What AMP's inner maximisation did during training
#
# Per example and epoch the run logged the sampled λ, the λ* after the attack (it differs only with `lam_opt`) and t_geo − λ*, where t_geo is the position of the final mixed point projected onto the clean segment (the label `geo_label` trains with). Histograms over the last epoch. With an eps-ball this small next to the distance between two images (‖x_a − x_b‖₂ is typically 10–20 for CIFAR, a Linf 8/255 ball reaches at most 1.74 in L2), t_geo stays within a few hundredths of λ*: the geometric label is a small correction.

# %%
amp_names = [name for name in runs if name.startswith("amp_")]
fig = plots.lambda_histograms({name: runs[name].method_arrays()[-1] for name in amp_names})
nbtools.save_figure(fig, "amp_lambda_hist", profile=profile, extra={"dataset": dataset})

# %% [markdown]
# ## Ablation: clean, FGSM, PGD-20, CW-20, AutoAttack
#
# One `evaluate` call per model and checkpoint, every attack on the same test images, in fp32: the selected checkpoint (`best`, chosen on the validation split) and the `last` one side by side. Linf eps as above; PGD-20 and CW-20 with step eps/4 and a random start; AutoAttack through the authors' `pyautoattack`, standard (APGD-CE, APGD-T, FAB-T, Square) except in the smoke profile, which runs its two APGD stages only. *worst case*: correct clean and under every attack of the row. The masking report of each row is printed under the table.

# %%
by_run = nbtools.evaluate_runs(runs, x_test, y_test, progress=not quiet, eps=eps, norm="Linf",
                               aa_attacks=s["aa_attacks"])
results = nbtools.table_rows(by_run)
print(nbtools.table_report(results))
aa_run = nbtools.aa_used(results)
print(f"n = {len(y_test)} test images for every attack; AutoAttack: {aa_run}; "
      f"{dataset}, {cfg['model']}, profile {profile}")
print("training img/s:", {k: round(v) for k, v in img_per_s.items()})
nbtools.save_table(results, "amp_table", profile=profile,
                   extra={"n": len(y_test), "aa_attacks": aa_run, "dataset": dataset,
                          "model": cfg["model"], "eps": eps, "variants": variants,
                          "train_img_per_s": img_per_s})
fig = plots.accuracy_bars(results, title=f"{dataset}, Linf eps = {eps * 255:g}/255, "
                                         f"n = {len(y_test)} test images")
nbtools.save_figure(fig, "amp_ablation", profile=profile, extra={"table": "amp_table"})

# %% [markdown]
# ## Seed table: the close comparison, over training seeds
#
# AMP and PGD-AT differ by a few points at most at the smaller scales, about the noise of one training seed. PGD-AT and the first AMP variant are trained again with the seeds after `seed` (`n_seeds` in the settings; the first seed's runs are the ones above) and each selected checkpoint evaluated on the same test images as the table above: mean ± half the spread, and every seed's value.

# %%
seeds = nbtools.seed_list(seed, s["n_seeds"])
compared = ["pgd_at", amp_names[0]] if amp_names else ["pgd_at"]
runs_by_seed = {seed: {name: runs[name] for name in compared}}
for other in seeds[1:]:
    runs_by_seed[other] = {
        name: nbtools.train_or_load(run_dir=root / "seeds" / f"seed{other}" / name,
                                    dataset=dataset, profile=profile, seed=other, eps=eps,
                                    device=str(dev), quiet=quiet, **budget, **methods[name])
        for name in compared}
by_seed = nbtools.seed_table(runs_by_seed, x_test, y_test, progress=not quiet, eps=eps,
                             norm="Linf", aa_attacks=s["aa_attacks"])
print(nbtools.format_seed_table(by_seed))
nbtools.save_table(by_seed, "amp_seeds", profile=profile,
                   extra={"n": len(y_test), "aa_attacks": aa_run, "dataset": dataset,
                          "model": cfg["model"], "eps": eps, "seeds": seeds})

# %% [markdown]
# ## Checks
#
# `mixlab.checks` raises `CheckFailed` with what went wrong: each check can fail for a real bug in training, in AMP's inner maximisation or in the evaluation.

# %%
# the paths: λ = 0 is x_b and λ = 1 is x_a, so the clean curves start and end at the model's
# own probabilities on the endpoints (fails if mixlab.paths flips λ or misplaces an endpoint)
for name, run in runs.items():
    with torch.no_grad():
        p_end_a = run.model(x_a).float().softmax(1).cpu().numpy()
        p_end_b = run.model(x_b).float().softmax(1).cpu().numpy()
    assert np.allclose(paths[name]["probs"][:, -1], p_end_a, atol=1e-4), name
    assert np.allclose(paths[name]["probs"][:, 0], p_end_b, atol=1e-4), name

# mixup drew λ ~ Beta(α, α); each AMP variant drew λ0 so, moved λ exactly when lam_opt
# says so, and its inner maximisation raises the loss of the mixed points
checks.mixup_lambda(runs["mixup"])
for name in amp_names:
    run = runs[name]
    checks.amp_lambda(run)
    checks.amp_attack_ascends(run.model, x_test, y_test, attack=attack_spec(run.config),
                              method_hp=run.config["method_hp"], num_classes=test.num_classes)

# every row: AutoAttack not weaker than PGD-20, no masking flags (the noisy ones of a barely
# trained model pass where the settings tolerate them); trained for real (the `trained`
# setting): above chance clean, else an untrained model or test images with other
# preprocessing or labels than training (smoke models, trained for seconds, can sit near
# chance on 64 test images)
min_clean = 1 / test.num_classes + 0.05 if s["trained"] else None
for row, r in results.items():
    checks.evaluation(r, min_clean=min_clean, allow_warnings=s["tolerated_flags"])
for name, row in by_seed.items():  # the other seeds' checkpoints pass the same checks
    for r in row["per_seed"].values():
        checks.evaluation(r, min_clean=min_clean, allow_warnings=s["tolerated_flags"])
if s["trained"]:  # adversarial training buys robustness over ERM
    selected = {name: results[nbtools.checkpoint_label(name, run)] for name, run in runs.items()}
    checks.evaluation(selected["pgd_at"], min_robust=selected["erm"]["robust"] + 0.1,
                      allow_warnings=s["tolerated_flags"])
    for name in amp_names:  # no gain over ERM: AMP's training attack does nothing
        checks.evaluation(selected[name], min_robust=selected["erm"]["robust"] + 0.01,
                          allow_warnings=s["tolerated_flags"])
print("all checks passed")
