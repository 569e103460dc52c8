"""Writes notebooks/quickstart.ipynb (outputs stripped). Run: python tools/make_quickstart.py"""
import nbformat as nbf

from nbwrite import write_notebook

cells = [
    nbf.v4.new_markdown_cell(
        "# mixlab quickstart: PGD adversarial training, evaluated\n\n"
        "Trains PGD-AT (Madry et al. 2018, arXiv 1706.06083: PGD-10, step 2/255, Linf 8/255) on "
        "CIFAR-10, evaluates it under FGSM, PGD-20, CW-20 and AutoAttack, and plots the training "
        "curves and a few adversarial examples.\n\n"
        "Run headless: `papermill notebooks/quickstart.ipynb runs/quickstart.ipynb -p profile short "
        "--cwd notebooks`. Profiles: `smoke` (CPU, tiny CNN, 1k images, seconds), `short` (GPU, "
        "PreActResNet-18, minutes), `paper` (110 epochs)."),
    nbf.v4.new_code_cell(
        'profile = "smoke"     # smoke | short | paper\n'
        'device = "auto"       # auto | cpu | cuda\n'
        'seed = 0\n'
        'dataset = "cifar10"   # cifar10 | cifar100 | svhn | mnist\n'
        'run_dir = ""          # empty: runs/quickstart/<profile>/pgd_at',
        metadata={"tags": ["parameters"]}),
    nbf.v4.new_code_cell(
        "%matplotlib inline\n"
        "import matplotlib.pyplot as plt\n"
        "import torch\n\n"
        "from mixlab import nbtools\n"
        "from mixlab.data import load_dataset\n"
        "from mixlab.evaluate import evaluate, format_table\n"
        "from mixlab.attacks import pgd\n"
        "from mixlab.train import train_or_load\n\n"
        "# how many test images each profile evaluates on, and AutoAttack's share of them\n"
        "n_eval, n_aa = {\"smoke\": (200, 32), \"short\": (1000, 1000), \"paper\": (10000, 10000)}[profile]\n"
        "dev = nbtools.resolve_device(device)\n"
        "run_dir = run_dir or nbtools.run_dir(\"quickstart\", profile, f\"{dataset}-pgd_at\")\n"
        "print(f\"profile={profile} device={dev} run_dir={run_dir}\")"),
    nbf.v4.new_markdown_cell("## Train (or load the finished run)"),
    nbf.v4.new_code_cell(
        "run = train_or_load(run_dir=run_dir, method=\"pgd_at\", dataset=dataset, profile=profile,\n"
        "                    seed=seed, device=str(dev), quiet=True)\n"
        "model, cfg = run.model, run.config\n"
        "print(cfg[\"model\"], f\"eps={cfg['eps']:.4f}\", f\"{len(run.history)} epochs\")"),
    nbf.v4.new_code_cell(
        "epochs = [h[\"epoch\"] for h in run.history]\n"
        "fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.5))\n"
        "ax_loss.plot(epochs, [h[\"train_loss\"] for h in run.history], marker=\"o\")\n"
        "ax_loss.set(xlabel=\"epoch\", ylabel=\"adversarial training loss\", title=\"PGD-AT loss\")\n"
        "for key, label in [(\"train_acc\", \"train (adversarial)\"), (\"test_clean\", \"test clean\"),\n"
        "                   (\"test_robust\", \"test PGD\")]:\n"
        "    ax_acc.plot(epochs, [h.get(key) for h in run.history], marker=\"o\", label=label)\n"
        "ax_acc.set(xlabel=\"epoch\", ylabel=\"accuracy\", title=f\"{dataset}, {cfg['model']}\")\n"
        "ax_acc.legend()\n"
        "nbtools.save_figure(fig, \"quickstart_curves\", profile=profile)"),
    nbf.v4.new_markdown_cell("## Evaluate: clean, FGSM, PGD-20, CW-20, AutoAttack"),
    nbf.v4.new_code_cell(
        "test = load_dataset(dataset, \"test\").subset(n_eval, seed=0).to(dev)\n"
        "x_test, y_test = test.x.float() / 255, test.y\n"
        "results = evaluate(model, x_test, y_test, attacks=(\"clean\", \"fgsm\", \"pgd20\", \"cw20\"),\n"
        "                   eps=cfg[\"eps\"], norm=cfg[\"norm\"], run_dir=run.path)\n"
        "# AutoAttack is expensive: run it on the first n_aa images, with the clean accuracy of\n"
        "# that same subset beside it\n"
        "aa = evaluate(model, x_test[:n_aa], y_test[:n_aa], attacks=(\"clean\", \"aa\"),\n"
        "              eps=cfg[\"eps\"], norm=cfg[\"norm\"])\n"
        "results[\"aa\"], results[\"clean_aa_subset\"] = aa[\"aa\"], aa[\"clean\"]\n"
        "print(format_table({\"pgd_at\": results}))\n"
        "print(f\"n={n_eval} test images (AutoAttack on the first {n_aa})\")\n"
        "for warning in results[\"warnings\"]:\n"
        "    print(\"warning:\", warning)\n"
        "nbtools.save_table({\"pgd_at\": results}, \"quickstart_table\", profile=profile,\n"
        "                   extra={\"n\": n_eval, \"n_aa\": n_aa, \"dataset\": dataset, \"model\": cfg[\"model\"]})"),
    nbf.v4.new_markdown_cell("## A few adversarial examples (PGD-20) and their predictions"),
    nbf.v4.new_code_cell(
        "x_show, y_show = x_test[:8], y_test[:8]\n"
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
    nbf.v4.new_markdown_cell("## What must hold for this profile"),
    nbf.v4.new_code_cell(
        "chance = 1 / test.num_classes\n"
        "assert results[\"clean\"] > chance + 0.05, f\"clean accuracy {results['clean']} is near chance\"\n"
        "assert results[\"aa\"] <= results[\"clean_aa_subset\"], \"AutoAttack above clean accuracy\"\n"
        "for attack in (\"fgsm\", \"pgd20\", \"cw20\"):\n"
        "    assert results[attack] <= results[\"clean\"], f\"{attack} above clean accuracy\"\n"
        "assert results[\"pgd20\"] <= results[\"fgsm\"] + 0.02, \"PGD-20 weaker than FGSM\"\n"
        "if profile != \"smoke\":  # a trained PGD-AT model keeps real robustness\n"
        "    assert results[\"pgd20\"] > 0.3, results\n"
        "print(\"all checks passed\")"),
]
write_notebook(cells, "notebooks/quickstart.ipynb")
