"""Writes notebooks/quickstart.ipynb (outputs stripped). Run: python tools/make_quickstart.py"""
from nbwrite import code, md, write_notebook

cells = [
    md("# mixlab quickstart: PGD adversarial training, evaluated\n\n"
       "Trains PGD-AT (Madry et al. 2018, arXiv 1706.06083: PGD-10, step 2/255, Linf 8/255) on "
       "CIFAR-10, plots the training curves, evaluates the model under FGSM, PGD-20, CW-20 and "
       "AutoAttack and shows a few adversarial examples.\n\n"
       "**One evaluation protocol.** Training holds out a validation split of the training set; "
       "the in-training evaluation and the choice of the best checkpoint use it, never the test "
       "set. The table evaluates the selected (`best`) and the `last` checkpoint side by side on "
       "the same test images, every attack on every image, with the masking report under it "
       "(AutoAttack standard; its two APGD stages only in the smoke profile).\n\n"
       "Run headless: `papermill notebooks/quickstart.ipynb runs/quickstart.ipynb -p profile short "
       "--cwd notebooks`. Profiles: `smoke` (CPU, tiny CNN, 1k images, seconds), `short` (GPU, "
       "PreActResNet-18, minutes), `paper` (110 epochs)."),
    code('profile = "smoke"     # type: str  run size: smoke | short | paper\n'
         'device = "auto"       # type: str  auto | cpu | cuda | cuda:N\n'
         'seed = 0              # type: int  random seed of data order, initialisation and attacks\n'
         'dataset = "cifar10"   # type: str  cifar10 | cifar100 | svhn | mnist\n'
         'epochs = None         # type: int|None  training epochs; None: the profile\'s\n'
         'run_dir = ""          # type: str  run folder; empty: runs/quickstart/<profile>/<dataset>-pgd_at',
         metadata={"tags": ["parameters"]}),
    code("%matplotlib inline\n"
         "import matplotlib.pyplot as plt\n"
         "import torch\n\n"
         "from mixlab import checks, nbtools\n"
         "from mixlab.attacks import pgd\n"
         "from mixlab.data import load_dataset\n\n"
         "# the parameters, checked before anything runs (a wrong profile or type stops here)\n"
         "nbtools.check_params(profile=profile, device=device, seed=seed, dataset=dataset,\n"
         "                     epochs=epochs, run_dir=run_dir)\n"
         "# test images of the final table (every attack, AutoAttack included, on the same ones) and\n"
         "# the AutoAttack attacks (None: standard; smoke: its two APGD stages, FAB-T and Square\n"
         "# cost ~40 s per model on a CPU)\n"
         "n_eval, aa_attacks = {\"smoke\": (64, [\"apgd-ce\", \"apgd-t\"]), \"short\": (1000, None),\n"
         "                      \"paper\": (10000, None)}[profile]\n"
         "dev = nbtools.resolve_device(device)\n"
         "budget = {} if epochs is None else {\"epochs\": epochs}\n"
         "run_dir = run_dir or nbtools.run_dir(\"quickstart\", profile, f\"{dataset}-pgd_at\"\n"
         "                                     + (f\"-ep{epochs}\" if epochs else \"\"))\n"
         "print(f\"profile={profile} device={dev} run_dir={run_dir}\")"),
    md("## Train (or load the finished run)\n\n"
       "`train_or_load` returns the selected checkpoint: the epoch with the best PGD accuracy on "
       "the validation split."),
    code("run = nbtools.train_or_load(run_dir=run_dir, method=\"pgd_at\", dataset=dataset, profile=profile,\n"
         "                    seed=seed, device=str(dev), quiet=True, **budget)\n"
         "model, cfg = run.model, run.config\n"
         "print(cfg[\"model\"], f\"eps={cfg['eps']:.4f}\", f\"{len(run.history)} epochs, validation \"\n"
         "      f\"split of {cfg['val_size']} training images; selected epoch {run.epoch}\")"),
    code("epochs_run = [h[\"epoch\"] for h in run.history]\n"
         "fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.5))\n"
         "ax_loss.plot(epochs_run, [h[\"train_loss\"] for h in run.history], marker=\"o\")\n"
         "ax_loss.set(xlabel=\"epoch\", ylabel=\"adversarial training loss\", title=\"PGD-AT loss\")\n"
         "for key, label in [(\"train_acc\", \"train (adversarial)\"), (\"val_clean\", \"validation clean\"),\n"
         "                   (\"val_robust\", f\"validation PGD-{cfg['eval_steps']}\")]:\n"
         "    ax_acc.plot(epochs_run, [h.get(key) for h in run.history], marker=\"o\", label=label)\n"
         "ax_acc.axvline(run.epoch, color=\"gray\", ls=\":\", label=\"selected\")\n"
         "ax_acc.set(xlabel=\"epoch\", ylabel=\"accuracy\", title=f\"{dataset}, {cfg['model']}\")\n"
         "ax_acc.legend()\n"
         "nbtools.save_figure(fig, \"quickstart_curves\", profile=profile)"),
    md("## Evaluate: clean, FGSM, PGD-20, CW-20, AutoAttack\n\n"
       "One `evaluate` call per checkpoint: every attack on the same test images, in fp32. "
       "*worst case* counts an image as robust only if it is classified correctly clean and under "
       "every attack of the row."),
    code("test = load_dataset(dataset, \"test\").subset(n_eval, seed=0).to(dev)\n"
         "x_test, y_test = test.x.float() / 255, test.y\n"
         "results = nbtools.evaluate_checkpoints(\"pgd_at\", run, x_test, y_test, eps=cfg[\"eps\"],\n"
         "                                       norm=cfg[\"norm\"], aa_attacks=aa_attacks)\n"
         "print(nbtools.table_report(results))\n"
         "aa_run = next(iter(results.values()))[\"aa_attacks\"]\n"
         "print(f\"n={n_eval} test images for every attack (AutoAttack: {aa_run}), {dataset}, \"\n"
         "      f\"{cfg['model']}, profile {profile}\")\n"
         "nbtools.save_table(results, \"quickstart_table\", profile=profile,\n"
         "                   extra={\"n\": n_eval, \"aa_attacks\": aa_run, \"dataset\": dataset,\n"
         "                          \"model\": cfg[\"model\"]})"),
    md("## A few adversarial examples (PGD-20) and their predictions"),
    code("x_show, y_show = x_test[:8], y_test[:8]\n"
         "x_adv = pgd(model, x_show, y_show, eps=cfg[\"eps\"], step_size=cfg[\"eps\"] / 4, steps=20)\n"
         "with torch.no_grad():\n"
         "    pred_clean, pred_adv = model(x_show).argmax(1), model(x_adv).argmax(1)\n"
         "fig, axes = plt.subplots(2, 8, figsize=(14, 4))\n"
         "for i in range(8):\n"
         "    for row, (img, pred) in enumerate([(x_show[i], pred_clean[i]), (x_adv[i], pred_adv[i])]):\n"
         "        ax = axes[row, i]\n"
         "        ax.imshow(img.permute(1, 2, 0).squeeze().cpu(), cmap=\"gray\")\n"
         "        ok = \"ok\" if pred == y_show[i] else \"WRONG\"\n"
         "        ax.set_title(f\"{test.classes[pred]} ({ok})\", fontsize=8)\n"
         "        ax.axis(\"off\")\n"
         "axes[0, 0].set_ylabel(\"clean\"); axes[1, 0].set_ylabel(\"PGD-20\")\n"
         "fig.suptitle(\"top: clean, bottom: PGD-20 (eps = 8/255); title = prediction\")\n"
         "nbtools.save_figure(fig, \"quickstart_adversarial\", profile=profile)"),
    md("## Checks\n\n"
       "`mixlab.checks` raises `CheckFailed` with what went wrong."),
    code("# trained for real (short, paper): above chance clean, else an untrained model or test images\n"
         "# with other preprocessing or labels than training (smoke models, trained for seconds, can\n"
         "# sit near chance on 64 test images), and robust in the worst case over all attacks\n"
         "trained = profile != \"smoke\"\n"
         "for row, r in results.items():\n"
         "    # AutoAttack not weaker than PGD-20; no masking flags (a few noisy ones pass in smoke:\n"
         "    # nbtools.tolerated_flags)\n"
         "    checks.evaluation(r, allow_warnings=nbtools.tolerated_flags(profile),\n"
         "                      min_clean=1 / test.num_classes + 0.05 if trained else None,\n"
         "                      min_robust=0.3 if trained else None)\n"
         "print(\"all checks passed\")"),
]
write_notebook(cells, "notebooks/quickstart.ipynb")
