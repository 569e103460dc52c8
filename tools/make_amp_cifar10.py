"""Writes notebooks/amp_cifar10.ipynb (outputs stripped). Run: python tools/make_amp_cifar10.py"""
from nbwrite import code, md, write_notebook

cells = [
    md("# AMP: adversarially optimized mixup on CIFAR-10\n\n"
       "Bunk, Chattopadhyay, Manjunath, Chandrasekaran, *Adversarially Optimized Mixup for Robust "
       "Classification*, 2021 (arXiv 2103.11589). PGD probes the space **between** training "
       "points by backpropagating through the mixup interpolation; the model is trained on the "
       "worst mixed points found. Two optional modifications: optimizing the mixup ratio λ "
       "(`lam_opt`) and geometric label assignment (`geo_label`).\n\n"
       "**mixlab's AMP is a stated reconstruction**: the paper has no public code and only its "
       "abstract is available, so every choice beyond the abstract (perturb both endpoints, soft "
       "labels, signed λ steps of 0.05 in a box, the projection that defines the geometric label, "
       "...) is mixlab's and is a flag of `mixlab.methods.amp` (see its docstring and "
       "`../shared/papers.md`). Name clash: \"AMP\" also names Adversarial Model Perturbation "
       "(Zheng et al., CVPR 2021), an unrelated method; mixup surveys call this paper \"AOM\".\n\n"
       "The notebook trains (or loads) ERM, mixup, PGD-AT and the AMP variants on one budget, "
       "then shows predictions along interpolation paths (clean and worst case over the eps-ball), "
       "the images along a path, histograms of the optimized λ* and of t_geo − λ, and the "
       "ablation table clean / FGSM / PGD-20 / CW-20 / AutoAttack.\n\n"
       "Run headless: `papermill notebooks/amp_cifar10.ipynb runs/amp_cifar10.ipynb -p profile "
       "short --cwd notebooks` (`make demo` does this). Profiles: `smoke` (CPU, tiny CNN, 1k "
       "images, 2 epochs: the plots show the machinery, not the paper's numbers), `short` (GPU, "
       "PreActResNet-18), `paper`."),
    code('profile = "smoke"      # type: str  run size: smoke | short | paper\n'
         '# AMP variants of the ablation: names in mixlab.methods.amp.VARIANTS\n'
         'variants = ["base", "lam_opt", "geo_label", "both"]  # type: list[str]  AMP variants\n'
         'dataset = "cifar10"    # type: str  cifar10 | cifar100\n'
         'seed = 0               # type: int  random seed of data order, initialisation and attacks\n'
         'eps = None             # type: float|None  Linf radius, pixel units; None: the dataset\'s standard (8/255)\n'
         'epochs = None          # type: int|None  training epochs; None: the profile\'s\n'
         'run_dir = ""           # type: str  run folder; empty: runs/amp_cifar10/<profile>/<dataset>-eps<..>-seed<seed>\n'
         'device = "auto"        # type: str  auto | cpu | cuda | cuda:N',
         metadata={"tags": ["parameters"]}),
    code('%matplotlib inline\n'
         'from pathlib import Path\n\n'
         'import matplotlib.pyplot as plt\n'
         'import numpy as np\n'
         'import torch\n\n'
         'from mixlab import checks, nbtools\n'
         'from mixlab.config import attack_spec\n'
         'from mixlab.data import dataset_info, load_dataset\n'
         'from mixlab.methods.amp import VARIANTS\n'
         'from mixlab.paths import image_strip, interpolation_path, plot_path\n\n'
         '# the parameters, checked before anything runs (a wrong profile or type stops here)\n'
         'variants = nbtools.check_params(profile=profile, variants=variants, dataset=dataset, seed=seed,\n'
         '                                eps=eps, epochs=epochs, run_dir=run_dir,\n'
         '                                device=device)["variants"]\n'
         '# per profile: test images of the table (every attack on the same ones), the AutoAttack\n'
         '# attacks (None: standard; smoke: its two APGD stages, FAB-T and Square cost ~40 s per\n'
         '# model on a CPU), interpolation pairs, PGD steps of the path probe\n'
         'settings = {"smoke": dict(n_eval=64, aa_attacks=["apgd-ce", "apgd-t"], n_pairs=4, path_steps=5),\n'
         '            "short": dict(n_eval=1000, aa_attacks=None, n_pairs=6, path_steps=10),\n'
         '            "paper": dict(n_eval=10000, aa_attacks=None, n_pairs=6, path_steps=20)}[profile]\n'
         'dev = nbtools.resolve_device(device)\n'
         'eps = eps if eps is not None else dataset_info(dataset)["eps"]["Linf"]\n'
         'budget = {} if epochs is None else {"epochs": epochs}\n'
         'root = Path(run_dir) if run_dir else nbtools.run_dir(\n'
         '    "amp_cifar10", profile, f"{dataset}-eps{eps * 255:g}-seed{seed}"\n'
         '    + (f"-ep{epochs}" if epochs else ""))\n'
         'methods = {"erm": dict(method="erm"), "mixup": dict(method="mixup"),\n'
         '           "pgd_at": dict(method="pgd_at"),\n'
         '           **{f"amp_{v}": dict(method="amp", method_hp=VARIANTS[v]) for v in variants}}\n'
         'print(f"profile={profile} device={dev} eps={eps:.4f} runs in {root}")\n'
         'print({name: spec for name, spec in methods.items()})'),
    md("## Train (or load the finished runs), one budget for all\n\n"
       "Every model gets the same profile (architecture, epochs, schedule, PGD steps) and holds "
       "out the same validation split of the training set: the in-training accuracies below and "
       "the choice of each run's best checkpoint come from it, never from the test set. A second "
       "execution loads the finished runs instead of retraining."),
    code('runs = {}\n'
         'for name, spec in methods.items():\n'
         '    runs[name] = nbtools.train_or_load(run_dir=root / name, dataset=dataset, profile=profile,\n'
         '                               seed=seed, eps=eps, device=str(dev), quiet=True, **budget,\n'
         '                               **spec)\n'
         'cfg = runs["erm"].config\n'
         'print(f"{cfg[\'model\']}, {cfg[\'epochs\']} epochs, training PGD steps {cfg[\'steps\']}")\n'
         'print(f"validation split: {cfg[\'val_size\']} training images; last epoch, and the selected one")\n'
         'print(f"{\'run\':14s} {\'loss\':>7s} {\'clean\':>6s} {\'PGD\':>6s} {\'img/s\':>8s} {\'selected\':>9s}")\n'
         'img_per_s = {}\n'
         'for name, run in runs.items():\n'
         '    last = run.history[-1]\n'
         '    img_per_s[name] = float(np.mean([h["img_per_s"] for h in run.history]))\n'
         '    print(f"{name:14s} {last[\'train_loss\']:7.3f} {last[\'val_clean\']:6.3f} "\n'
         '          f"{last.get(\'val_robust\', float(\'nan\')):6.3f} {img_per_s[name]:8.0f} "\n'
         '          f"{\'epoch \' + str(run.epoch):>9s}")'),
    md("## Predictions along interpolation paths\n\n"
       "For fixed test pairs (x_a, x_b) with different labels, the path is λ·x_a + (1 − λ)·x_b on 51 "
       "points of λ ∈ [0, 1] (λ = 0 is x_b, λ = 1 is x_a). Solid: clean probabilities of y_a, y_b "
       "and the strongest other class. Dashed: the **worst case** over the eps-ball around each "
       "mixed point, per curve (`mixlab.paths`): the lowest p(y_a), the lowest p(y_b) and the "
       "highest p(other) PGD finds at that λ, never better than the clean value (δ = 0 is in the "
       "ball). A smooth, congruent model keeps the solid curves monotone and the dashed ones close "
       "to them."),
    code('test = load_dataset(dataset, "test").subset(settings["n_eval"], seed=0).to(dev)\n'
         'x_test, y_test = test.x.float() / 255, test.y\n'
         '# fixed pairs: consecutive test images (0, 1), (2, 3), ... whose labels differ\n'
         'labels = y_test.tolist()\n'
         'pairs = [(i, i + 1) for i in range(0, len(labels) - 1, 2)\n'
         '         if labels[i] != labels[i + 1]][:settings["n_pairs"]]\n'
         'ia, ib = [a for a, _ in pairs], [b for _, b in pairs]\n'
         'x_a, x_b, y_a, y_b = x_test[ia], x_test[ib], y_test[ia], y_test[ib]\n'
         '# each model\'s path probe is cached in its run folder, keyed by the checkpoint, the pairs and\n'
         '# the probe\'s settings (a second execution loads it)\n'
         'paths = {name: nbtools.cached(\n'
         '             run.path, "path_probe",\n'
         '             dict(checkpoint=nbtools.checkpoint_fingerprint(run),\n'
         '                  pairs=nbtools.tensor_fingerprint(x_a, x_b, y_a, y_b), eps=eps,\n'
         '                  steps=settings["path_steps"]),\n'
         '             lambda run=run: interpolation_path(run.model, x_a, x_b, y_a=y_a, y_b=y_b, eps=eps,\n'
         '                                                steps=settings["path_steps"]))\n'
         '         for name, run in runs.items()}\n\n'
         'fig, axes = plt.subplots(len(runs), len(pairs), figsize=(3.2 * len(pairs), 2.4 * len(runs)),\n'
         '                         sharex=True, sharey=True, squeeze=False)\n'
         'for row, name in enumerate(runs):\n'
         '    for col in range(len(pairs)):\n'
         '        plot_path(paths[name], col, axes[row, col], classes=test.classes,\n'
         '                  title=f"{name}: {test.classes[int(y_b[col])]} → {test.classes[int(y_a[col])]}",\n'
         '                  legend=(col == 0))\n'
         'fig.suptitle(f"class probabilities along x_b → x_a; solid clean, dashed worst case "\n'
         '             f"(Linf eps = {eps * 255:g}/255, PGD-{settings[\'path_steps\']} per λ)")\n'
         'fig.tight_layout()\n'
         'nbtools.save_figure(fig, "amp_paths", profile=profile,\n'
         '                    extra={"dataset": dataset, "pairs": pairs, "eps": eps})'),
    code('fig, axes = plt.subplots(len(pairs), 1, figsize=(12, 1.3 * len(pairs)), squeeze=False)\n'
         'for row in range(len(pairs)):\n'
         '    ax = axes[row, 0]\n'
         '    ax.imshow(image_strip(x_a[row], x_b[row], lams=11))\n'
         '    ax.set_xticks([]); ax.set_yticks([])\n'
         '    ax.set_ylabel(f"{test.classes[int(y_b[row])]}\\n→ {test.classes[int(y_a[row])]}", fontsize=8)\n'
         'axes[0, 0].set_title("images along each path, λ = 0 (x_b, left) to λ = 1 (x_a, right) in "\n'
         '                     "steps of 0.1")\n'
         'nbtools.save_figure(fig, "amp_path_images", profile=profile, extra={"pairs": pairs})'),
    md("## What AMP's inner maximisation did during training\n\n"
       "Per example and epoch the run logged the sampled λ, the λ* after the attack (it differs "
       "only with `lam_opt`) and t_geo − λ*, where t_geo is the position of the final mixed point "
       "projected onto the clean segment (the label `geo_label` trains with). Histograms over the "
       "last epoch. With an eps-ball this small next to the distance between two images "
       "(‖x_a − x_b‖₂ is typically 10–20 for CIFAR, a Linf 8/255 ball reaches at most 1.74 in L2), "
       "t_geo stays within a few hundredths of λ*: the geometric label is a small correction."),
    code('amp_names = [name for name in runs if name.startswith("amp_")]\n'
         'logs = {name: runs[name].method_arrays()[-1] for name in amp_names}\n'
         'fig, axes = plt.subplots(2, len(amp_names), figsize=(3.4 * len(amp_names), 5.2),\n'
         '                         squeeze=False)\n'
         'for col, name in enumerate(amp_names):\n'
         '    log = logs[name]\n'
         '    seen = ~np.isnan(log["lam_star"])\n'
         '    bins = np.linspace(0, 1, 21)\n'
         '    axes[0, col].hist(log["lam0"][seen], bins=bins, alpha=0.5, label="sampled λ")\n'
         '    axes[0, col].hist(log["lam_star"][seen], bins=bins, alpha=0.5, label="λ*")\n'
         '    axes[0, col].set(title=name, xlabel="λ")\n'
         '    axes[1, col].hist(log["t_geo_minus_lam"][seen], bins=41, color="C2")\n'
         '    axes[1, col].set(xlabel="t_geo − λ*")\n'
         'axes[0, 0].legend(fontsize=8); axes[0, 0].set_ylabel("examples"); '
         'axes[1, 0].set_ylabel("examples")\n'
         'fig.suptitle(f"AMP, last training epoch ({int(seen.sum())} examples per variant)")\n'
         'fig.tight_layout()\n'
         'nbtools.save_figure(fig, "amp_lambda_hist", profile=profile, extra={"dataset": dataset})'),
    md("## Ablation: clean, FGSM, PGD-20, CW-20, AutoAttack\n\n"
       "One `evaluate` call per model and checkpoint, every attack on the same test images, in "
       "fp32: the selected checkpoint (`best`, chosen on the validation split) and the `last` one "
       "side by side. Linf eps as above; PGD-20 and CW-20 with step eps/4 and a random start; "
       "AutoAttack through the authors' `pyautoattack`, standard (APGD-CE, APGD-T, FAB-T, Square) "
       "except in the smoke profile, which runs its two APGD stages only. *worst case*: correct "
       "clean and under every attack of the row. The masking report of each row is printed "
       "under the table."),
    code('results = {}\n'
         'for name, run in runs.items():\n'
         '    results.update(nbtools.evaluate_checkpoints(name, run, x_test, y_test, eps=eps, norm="Linf",\n'
         '                                                aa_attacks=settings["aa_attacks"]))\n'
         'print(nbtools.table_report(results))\n'
         'aa_run = next(iter(results.values()))["aa_attacks"]\n'
         'print(f"n = {len(y_test)} test images for every attack; AutoAttack: {aa_run}; "\n'
         '      f"{dataset}, {cfg[\'model\']}, profile {profile}")\n'
         'print("training img/s:", {k: round(v) for k, v in img_per_s.items()})\n'
         'nbtools.save_table(results, "amp_table", profile=profile,\n'
         '                   extra={"n": len(y_test), "aa_attacks": aa_run, "dataset": dataset,\n'
         '                          "model": cfg["model"], "eps": eps, "variants": variants,\n'
         '                          "train_img_per_s": img_per_s})\n\n'
         'columns = ["clean", "fgsm", "pgd20", "cw20", "aa", "robust"]\n'
         'fig, ax = plt.subplots(figsize=(max(7, 1.0 * len(results)), 3.8))\n'
         'width = 0.8 / len(columns)\n'
         'for k, col in enumerate(columns):\n'
         '    ax.bar(np.arange(len(results)) + k * width, [100 * r[col] for r in results.values()],\n'
         '           width, label=col if col != "robust" else "worst case")\n'
         'ax.set_xticks(np.arange(len(results)) + 0.4 - width / 2, list(results), rotation=35,\n'
         '              ha="right", fontsize=8)\n'
         'ax.set(ylabel="accuracy (%)", title=f"{dataset}, Linf eps = {eps * 255:g}/255, "\n'
         '       f"n = {len(y_test)} test images")\n'
         'ax.legend(fontsize=8, ncol=6)\n'
         'nbtools.save_figure(fig, "amp_ablation", profile=profile, extra={"table": "amp_table"})'),
    md("## Checks\n\n"
       "`mixlab.checks` raises `CheckFailed` with what went wrong: each check can fail for a "
       "real bug in training, in AMP's inner maximisation or in the evaluation."),
    code('# the paths: λ = 0 is x_b and λ = 1 is x_a, so the clean curves start and end at the model\'s\n'
         '# own probabilities on the endpoints (fails if mixlab.paths flips λ or misplaces an endpoint)\n'
         'for name, run in runs.items():\n'
         '    with torch.no_grad():\n'
         '        p_end_a = run.model(x_a).float().softmax(1).cpu().numpy()\n'
         '        p_end_b = run.model(x_b).float().softmax(1).cpu().numpy()\n'
         '    assert np.allclose(paths[name]["probs"][:, -1], p_end_a, atol=1e-4), name\n'
         '    assert np.allclose(paths[name]["probs"][:, 0], p_end_b, atol=1e-4), name\n\n'
         '# mixup drew λ ~ Beta(α, α); each AMP variant drew λ0 so, moved λ exactly when lam_opt\n'
         '# says so, and its inner maximisation raises the loss of the mixed points\n'
         'checks.mixup_lambda(runs["mixup"])\n'
         'for name in amp_names:\n'
         '    run = runs[name]\n'
         '    checks.amp_lambda(run)\n'
         '    checks.amp_attack_ascends(run.model, x_test, y_test, attack=attack_spec(run.config),\n'
         '                              method_hp=run.config["method_hp"], num_classes=test.num_classes)\n\n'
         '# every row: AutoAttack not weaker than PGD-20, no masking flags (a few noisy ones pass in\n'
         '# smoke: nbtools.tolerated_flags); trained for real (short, paper): above chance clean, else\n'
         '# an untrained model or test images with other preprocessing or labels than training (smoke\n'
         '# models, trained for seconds, can sit near chance on 64 test images)\n'
         'min_clean = None if profile == "smoke" else 1 / test.num_classes + 0.05\n'
         'for row, r in results.items():\n'
         '    checks.evaluation(r, min_clean=min_clean, allow_warnings=nbtools.tolerated_flags(profile))\n'
         'if profile != "smoke":  # trained for real: adversarial training buys robustness over ERM\n'
         '    selected = {name: results[nbtools.checkpoint_label(name, run)] for name, run in runs.items()}\n'
         '    checks.evaluation(selected["pgd_at"], min_robust=selected["erm"]["robust"] + 0.1)\n'
         '    for name in amp_names:  # no gain over ERM: AMP\'s training attack does nothing\n'
         '        checks.evaluation(selected[name], min_robust=selected["erm"]["robust"] + 0.01)\n'
         'print("all checks passed")'),
]
write_notebook(cells, "notebooks/amp_cifar10.ipynb")
