# %% [markdown]
# # mixlab quickstart: PGD adversarial training, evaluated
#
# Trains PGD-AT (Madry et al. 2018, arXiv 1706.06083: PGD-10, step 2/255, Linf 8/255) on CIFAR-10, plots the training curves, evaluates the model under FGSM, PGD-20, CW-20 and AutoAttack and shows a few adversarial examples.
#
# **One evaluation protocol.** Training holds out a validation split of the training set; the in-training evaluation and the choice of the best checkpoint use it, never the test set. The table evaluates the selected (`best`) and the `last` checkpoint side by side on the same test images, every attack on every image, with the masking report under it (AutoAttack standard; its two APGD stages only in the smoke profile). The protocol is [docs/evaluation.md](../docs/evaluation.md).
#
# Run headless: `papermill notebooks/quickstart.ipynb runs/quickstart.ipynb -p profile short --cwd notebooks`. Profiles: `smoke` (CPU, tiny CNN, 1k images, seconds), `cpu` (a laptop's CPU, minutes), `short` (GPU, PreActResNet-18, minutes), `paper` (110 epochs). What each profile evaluates: `mixlab.notebook_settings`.

# %% tags=["parameters"]
profile = "smoke"     # type: str  run size: smoke | cpu | short | paper
device = "auto"       # type: str  auto | cpu | cuda | cuda:N
seed = 0              # type: int  random seed of data order, initialisation and attacks
dataset = "cifar10"   # type: str  cifar10 | cifar100 | svhn | mnist
epochs = None         # type: int|None  training epochs; None: the profile's
run_dir = ""          # type: str  run folder; empty: runs/quickstart/<profile>/<dataset>-pgd_at
quiet = False         # type: bool  no progress bars (training steps, evaluation batches; -p quiet true)

# %%
# %matplotlib inline
import torch

from mixlab import checks, nbtools, plots
from mixlab.attacks import pgd
from mixlab.notebook_settings import notebook_settings

# the parameters, checked before anything runs (a wrong profile or type stops here) and
# rebound to their normalised values (papermill's `-p quiet true` arrives as text)
profile, device, seed, dataset, epochs, run_dir, quiet = nbtools.check_params(
    profile=profile, device=device, seed=seed, dataset=dataset, epochs=epochs,
    run_dir=run_dir, quiet=quiet).values()
s = notebook_settings("quickstart", profile)
dev = nbtools.resolve_device(device)
budget = {} if epochs is None else {"epochs": epochs}
run_dir = run_dir or nbtools.run_dir("quickstart", profile, f"{dataset}-pgd_at"
                                     + (f"-ep{epochs}" if epochs else ""))
print(f"profile={profile} device={dev} run_dir={run_dir}\nsettings: {s}")

# %% [markdown]
# ## Train (or load the finished run)
#
# `train_or_load` returns the selected checkpoint: the epoch with the best PGD accuracy on the validation split.

# %%
run = nbtools.train_or_load(run_dir=run_dir, method="pgd_at", dataset=dataset, profile=profile,
                            seed=seed, device=str(dev), quiet=quiet, **budget)
model, cfg = run.model, run.config
print(nbtools.describe_runs({"pgd_at": run}))
print(f"eps={cfg['eps']:.4f}; validation split of {cfg['val_size']} training images")

# %%
fig = plots.training_curves(run.history, selected_epoch=run.epoch, eval_steps=cfg["eval_steps"],
                            title=f"{dataset}, {cfg['model']}")
nbtools.save_figure(fig, "quickstart_curves", profile=profile)

# %% [markdown]
# ## Evaluate: clean, FGSM, PGD-20, CW-20, AutoAttack
#
# One `evaluate` call per checkpoint: every attack on the same test images, in fp32. *worst case* counts an image as robust only if it is classified correctly clean and under every attack of the row.

# %%
test, x_test, y_test = nbtools.load_test_images(dataset, s["n_eval"], dev)
results = nbtools.evaluate_checkpoints("pgd_at", run, x_test, y_test, progress=not quiet, eps=cfg["eps"],
                                       norm=cfg["norm"], aa_attacks=s["aa_attacks"])
print(nbtools.table_report(results))
aa_run = nbtools.aa_used(results)
print(f"n={len(y_test)} test images for every attack (AutoAttack: {aa_run}), {dataset}, "
      f"{cfg['model']}, profile {profile}")
nbtools.save_table(results, "quickstart_table", profile=profile,
                   extra={"n": len(y_test), "aa_attacks": aa_run, "dataset": dataset,
                          "model": cfg["model"]})

# %% [markdown]
# ## A few adversarial examples (PGD-20) and their predictions

# %%
x_show, y_show = x_test[:8], y_test[:8]
x_adv = pgd(model, x_show, y_show, eps=cfg["eps"], step_size=cfg["eps"] / 4, steps=20)
with torch.no_grad():
    pred_clean, pred_adv = model(x_show).argmax(1), model(x_adv).argmax(1)
fig = plots.adversarial_examples(x_show, x_adv, y_show, pred_clean, pred_adv, test.classes,
                                 title=f"top: clean, bottom: PGD-20 (eps = {cfg['eps']:.4g}); "
                                       f"title = prediction")
nbtools.save_figure(fig, "quickstart_adversarial", profile=profile)

# %% [markdown]
# ## Checks
#
# `mixlab.checks` raises `CheckFailed` with what went wrong.

# %%
# trained for real (the `trained` setting: short, paper): above chance clean, else an untrained
# model or test images with other preprocessing or labels than training (smoke models, trained
# for seconds, can sit near chance on 64 test images), and robust in the worst case
for row, r in results.items():
    # AutoAttack not weaker than PGD-20; no masking flags (the noisy ones of a barely trained
    # model pass where the settings tolerate them)
    checks.evaluation(r, allow_warnings=s["tolerated_flags"],
                      min_clean=1 / test.num_classes + 0.05 if s["trained"] else None,
                      min_robust=s["min_robust"])
print("all checks passed")
