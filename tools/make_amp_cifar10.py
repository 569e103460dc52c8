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
    code('profile = "smoke"      # smoke | short | paper\n'
         'variants = ["base", "lam_opt", "geo_label", "both"]  # AMP ablation, names in '
         'mixlab.methods.amp.VARIANTS\n'
         'dataset = "cifar10"    # cifar10 | cifar100\n'
         'seed = 0\n'
         'eps = None             # Linf radius, pixel units; None: the dataset\'s standard (8/255)\n'
         'run_dir = ""           # empty: runs/amp_cifar10/<profile>/<dataset>-eps<..>-seed<seed>\n'
         'device = "auto"        # auto | cpu | cuda',
         metadata={"tags": ["parameters"]}),
    code('%matplotlib inline\n'
         'from pathlib import Path\n\n'
         'import matplotlib.pyplot as plt\n'
         'import numpy as np\n'
         'import torch\n\n'
         'from mixlab import nbtools\n'
         'from mixlab.data import dataset_info, load_dataset\n'
         'from mixlab.evaluate import evaluate, format_table\n'
         'from mixlab.methods.amp import VARIANTS\n'
         'from mixlab.paths import image_strip, interpolation_path, plot_path\n'
         'from mixlab.train import train_or_load\n\n'
         '# per profile: test images evaluated, AutoAttack\'s share, interpolation pairs, PGD steps '
         'of the path probe\n'
         'settings = {"smoke": dict(n_eval=200, n_aa=16, n_pairs=4, path_steps=5),\n'
         '            "short": dict(n_eval=1000, n_aa=1000, n_pairs=6, path_steps=10),\n'
         '            "paper": dict(n_eval=10000, n_aa=10000, n_pairs=6, path_steps=20)}[profile]\n'
         'dev = nbtools.resolve_device(device)\n'
         'eps = eps if eps is not None else dataset_info(dataset)["eps"]["Linf"]\n'
         'root = Path(run_dir) if run_dir else nbtools.run_dir(\n'
         '    "amp_cifar10", profile, f"{dataset}-eps{eps * 255:g}-seed{seed}")\n'
         'methods = {"erm": dict(method="erm"), "mixup": dict(method="mixup"),\n'
         '           "pgd_at": dict(method="pgd_at"),\n'
         '           **{f"amp_{v}": dict(method="amp", **VARIANTS[v]) for v in variants}}\n'
         'print(f"profile={profile} device={dev} eps={eps:.4f} runs in {root}")\n'
         'print({name: spec for name, spec in methods.items()})'),
    md("## Train (or load the finished runs), one budget for all\n\n"
       "Every model gets the same profile (architecture, epochs, schedule, PGD steps). A second "
       "execution loads the finished runs instead of retraining."),
    code('runs = {}\n'
         'for name, spec in methods.items():\n'
         '    runs[name] = train_or_load(run_dir=root / name, dataset=dataset, profile=profile,\n'
         '                               seed=seed, eps=eps, device=str(dev), quiet=True, **spec)\n'
         'cfg = runs["erm"].config\n'
         'print(f"{cfg[\'model\']}, {cfg[\'epochs\']} epochs, training PGD steps {cfg[\'steps\']}")\n'
         'print(f"{\'run\':14s} {\'loss\':>7s} {\'clean\':>6s} {\'PGD\':>6s} {\'img/s\':>8s}")\n'
         'img_per_s = {}\n'
         'for name, run in runs.items():\n'
         '    last = run.history[-1]\n'
         '    img_per_s[name] = float(np.mean([h["img_per_s"] for h in run.history]))\n'
         '    print(f"{name:14s} {last[\'train_loss\']:7.3f} {last[\'test_clean\']:6.3f} "\n'
         '          f"{last.get(\'test_robust\', float(\'nan\')):6.3f} {img_per_s[name]:8.0f}")'),
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
         'paths = {name: interpolation_path(run.model, x_a, x_b, y_a=y_a, y_b=y_b, eps=eps,\n'
         '                                  steps=settings["path_steps"])\n'
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
       "Linf eps as above; PGD-20 and CW-20 with step eps/4 and a random start; AutoAttack "
       "standard (APGD-CE, APGD-T, FAB-T, Square) through the authors' `pyautoattack`, on the "
       "first `n_aa` test images (in the smoke profile only 16: its FAB-T and Square stages "
       "cost a fixed number of iterations per surviving image, and dominate the CPU time)."),
    code('results = {}\n'
         'for name, run in runs.items():\n'
         '    results[name] = evaluate(run.model, x_test, y_test, attacks=("clean", "fgsm", "pgd20", '
         '"cw20"),\n'
         '                             eps=eps, norm="Linf", run_dir=run.path)\n'
         '    results[name]["aa"] = evaluate(run.model, x_test[:settings["n_aa"]],\n'
         '                                   y_test[:settings["n_aa"]], attacks=("aa",), eps=eps,\n'
         '                                   norm="Linf")["aa"]\n'
         '    results[name]["img_per_s_train"] = img_per_s[name]\n'
         'print(format_table(results))\n'
         'print(f"n = {settings[\'n_eval\']} test images (AutoAttack: the first {settings[\'n_aa\']}); "\n'
         '      f"{dataset}, {cfg[\'model\']}, profile {profile}")\n'
         'print("training img/s:", {k: round(v) for k, v in img_per_s.items()})\n'
         'for name, r in results.items():\n'
         '    for warning in r["warnings"]:\n'
         '        print(f"warning ({name}):", warning)\n'
         'nbtools.save_table(results, "amp_table", profile=profile,\n'
         '                   extra={"n": settings["n_eval"], "n_aa": settings["n_aa"], "dataset": dataset,\n'
         '                          "model": cfg["model"], "eps": eps, "variants": variants})\n\n'
         'columns = ["clean", "fgsm", "pgd20", "cw20", "aa"]\n'
         'fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(results)), 3.5))\n'
         'width = 0.8 / len(columns)\n'
         'for k, col in enumerate(columns):\n'
         '    ax.bar(np.arange(len(results)) + k * width, [100 * r[col] for r in results.values()],\n'
         '           width, label=col)\n'
         'ax.set_xticks(np.arange(len(results)) + 0.4 - width / 2, list(results), rotation=20)\n'
         'ax.set(ylabel="accuracy (%)", title=f"{dataset}, Linf eps = {eps * 255:g}/255, "\n'
         '       f"n = {settings[\'n_eval\']} (AA: {settings[\'n_aa\']})")\n'
         'ax.legend(fontsize=8, ncol=5)\n'
         'nbtools.save_figure(fig, "amp_ablation", profile=profile, extra={"table": "amp_table"})'),
    md("## What must hold for this profile"),
    code('# paths: λ = 0 is x_b and λ = 1 is x_a, so the clean curves start and end at the model\'s\n'
         '# own probabilities on the endpoints\n'
         'for name, run in runs.items():\n'
         '    with torch.no_grad():\n'
         '        p_end_a = run.model(x_a).float().softmax(1).cpu().numpy()\n'
         '        p_end_b = run.model(x_b).float().softmax(1).cpu().numpy()\n'
         '    path = paths[name]\n'
         '    assert np.allclose(path["probs"][:, -1], p_end_a, atol=1e-4), name\n'
         '    assert np.allclose(path["probs"][:, 0], p_end_b, atol=1e-4), name\n'
         '    # worst case never exceeds clean for the true labels (and never lowers "other")\n'
         '    assert (path["p_a_worst"] <= path["p_a"]).all() and (path["p_b_worst"] <= path["p_b"]).all()\n'
         '    assert (path["p_other_worst"] >= path["p_other"]).all()\n'
         'if profile != "smoke":  # trained models: on average p(y_a) rises from x_b to x_a, p(y_b) falls\n'
         '    p_a_ends = np.array([[p["p_a"][:, 0].mean(), p["p_a"][:, -1].mean()] for p in paths.values()])\n'
         '    p_b_ends = np.array([[p["p_b"][:, 0].mean(), p["p_b"][:, -1].mean()] for p in paths.values()])\n'
         '    assert (p_a_ends[:, 1] > p_a_ends[:, 0]).all(), p_a_ends\n'
         '    assert (p_b_ends[:, 0] > p_b_ends[:, 1]).all(), p_b_ends\n\n'
         '# the λ logs: λ* in its box, equal to the sampled λ without lam_opt, t_geo − λ* in [-1, 1]\n'
         'for name in amp_names:\n'
         '    hp, log = runs[name].config["method_hp"], logs[name]\n'
         '    seen = ~np.isnan(log["lam_star"])\n'
         '    assert seen.sum() > 0, name\n'
         '    lam_star = log["lam_star"][seen]\n'
         '    assert (lam_star >= hp["lam_min"] - 1e-6).all() and (lam_star <= hp["lam_max"] + 1e-6).all()\n'
         '    if not hp["lam_opt"]:\n'
         '        assert np.allclose(lam_star, log["lam0"][seen]), name\n'
         '    assert (np.abs(log["t_geo_minus_lam"][seen]) <= 1).all(), name\n\n'
         '# the table has every row and column; no attack beats clean accuracy\n'
         'assert set(results) == set(methods), (set(results), set(methods))\n'
         'for name, r in results.items():\n'
         '    for col in ("clean", "fgsm", "pgd20", "cw20", "aa"):\n'
         '        assert col in r and 0 <= r[col] <= 1, (name, col)\n'
         '    for col in ("fgsm", "pgd20", "cw20"):\n'
         '        assert r[col] <= r["clean"] + 1e-9, (name, col, r)\n'
         'chance = 1 / test.num_classes\n'
         'assert results["erm"]["clean"] > chance + 0.05, results["erm"]\n'
         'if profile != "smoke":  # trained for real: adversarial training buys robustness\n'
         '    assert results["pgd_at"]["pgd20"] > results["erm"]["pgd20"] + 0.1, results\n'
         '    for name in amp_names:\n'
         '        assert results[name]["pgd20"] > results["erm"]["pgd20"], (name, results[name])\n'
         'print("all checks passed")'),
]
write_notebook(cells, "notebooks/amp_cifar10.ipynb")
