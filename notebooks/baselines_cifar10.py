# %% [markdown]
# # Baselines on CIFAR-10: PGD-AT, TRADES, CutMix and weight averaging
#
# The methods the other notebooks are measured against, trained on one budget (the profile's: architecture, epochs, schedule, training PGD steps) and evaluated by one protocol ([docs/evaluation.md](../docs/evaluation.md)). How each method is implemented, its hyperparameters and the weight average: [docs/baselines.md](../docs/baselines.md).
#
# - **PGD-AT** (Madry et al., ICLR 2018, arXiv 1706.06083): trains on the worst case PGD finds in the Linf ball around each training image.
# - **Weight averaging** (Gowal et al. 2020, arXiv 2010.03593; Rebuffi et al. 2021, arXiv 2103.01946): an exponential moving average of the weights and BatchNorm statistics along training, decay min(`ema_decay`, (1 + t)/(10 + t)) at step t. The average is validated beside the raw weights, selects the checkpoint and is the model evaluated; averaging changes nothing in a method's loss. Runs with it are marked `_ema`.
# - **CutMix** (Yun et al., ICCV 2019, arXiv 1905.04899): pastes a box of another training image into each image, the label mixed by the box's area; trained without any attack (`method="mixup"`, `mix="cutmix"`), with averaging.
# - **PGD-AT with CutMix** (Rebuffi et al. 2021): each image mixed with a partner first, then PGD attacks the mixed image against its soft label; with averaging.
# - **TRADES** (Zhang et al., ICML 2019, arXiv 1901.08573): clean cross-entropy plus β times the KL divergence between the predictions at x and at the point of the ball that maximises it (β = 6).
# - **AMP** (Bunk et al. 2021, arXiv 2103.11589; mixlab's stated reconstruction, [docs/amp.md](../docs/amp.md)): PGD on the mixup interpolation, training on the worst mixed points; with averaging.
#
# The averaged PGD-AT run appears twice in the table, as its average and as its raw weights (`pgd_at_ema_raw`: the same checkpoint file, the weights the optimiser trained), so the table shows what averaging buys; the figure of the training curves shows the same for every averaged run on the validation split.
#
# **The cpu profile trains three of them** (`baselines` in `mixlab.notebook_settings`), to fit about a quarter of an hour on two cores: `pgd_at_ema`, `pgd_at_cutmix_ema` and `trades`. PGD-AT is trained once: averaging changes nothing in the loss, so with the same seed the averaged run's raw weights are PGD-AT's own, step for step, and its `pgd_at_ema_raw` rows are PGD-AT (the `best` one at the epoch the average selected). AMP is left to `amp_cifar10`, which trains it against PGD-AT on the same budget, and CutMix without an attack, which is not robust at all (0.6% worst case at this scale), is left out.
#
# Run headless: `papermill notebooks/baselines_cifar10.ipynb runs/baselines_cifar10.ipynb -p profile short --cwd notebooks`. Profiles: `smoke` (CPU, tiny CNN, 1k images, 2 epochs: the machinery, not the papers' numbers), `cpu` (a laptop's CPU: about a quarter of an hour on two cores, three of the runs, see above), `short` (GPU, PreActResNet-18), `paper`. What each profile evaluates: `mixlab.notebook_settings`.

# %% tags=["parameters"]
profile = "smoke"      # type: str  run size: smoke | cpu | short | paper
dataset = "cifar10"    # type: str  cifar10 | cifar100
seed = 0               # type: int  random seed of data order, initialisation and attacks
epochs = None          # type: int|None  training epochs; None: the profile's
ema_decay = 0.999      # type: float  weight averaging decay in [0, 1) (with warm-up)
run_dir = ""           # type: str  run folder; empty: runs/baselines_cifar10/<profile>/<dataset>-seed<seed>
device = "auto"        # type: str  auto | cpu | cuda | cuda:N
quiet = False          # type: bool  no progress bars (training steps, evaluation batches; -p quiet true)

# %%
# %matplotlib inline
from pathlib import Path

from mixlab import checks, nbtools, plots
from mixlab.config import resolve_config
from mixlab.notebook_settings import notebook_settings
from mixlab.references import reference_rows

# the parameters, checked before anything runs (a wrong profile or type stops here) and
# rebound to their normalised values (papermill's `-p quiet true` arrives as text)
profile, dataset, seed, epochs, ema_decay, run_dir, device, quiet = nbtools.check_params(
    profile=profile, dataset=dataset, seed=seed, epochs=epochs, ema_decay=ema_decay,
    run_dir=run_dir, device=device, quiet=quiet).values()
s = notebook_settings("baselines_cifar10", profile)
dev = nbtools.resolve_device(device)
# one budget for every method: the engine profile's, as PGD-AT resolves it (TRADES' own
# profile would otherwise bring its own data subset, epochs and learning rate)
budget = nbtools.shared_budget(resolve_config(method="pgd_at", profile=profile, dataset=dataset,
                                              **({} if epochs is None else {"epochs": epochs})))
root = Path(run_dir) if run_dir else nbtools.run_dir(
    "baselines_cifar10", profile, f"{dataset}-seed{seed}" + (f"-ep{epochs}" if epochs else ""))
averaged = dict(ema_decay=ema_decay)  # engine settings of weight averaging (warm-up on)
methods = {"pgd_at": dict(method="pgd_at"),
           "pgd_at_ema": dict(method="pgd_at", **averaged),
           "cutmix_ema": dict(method="mixup", method_hp={"mix": "cutmix"}, **averaged),
           "pgd_at_cutmix_ema": dict(method="pgd_at", method_hp={"mix": "cutmix"}, **averaged),
           "trades": dict(method="trades"),
           "amp_ema": dict(method="amp", **averaged)}
# the runs this profile trains (the cpu profile's leave out PGD-AT without averaging, whose
# weights are the averaged run's raw ones, and AMP, which amp_cifar10 trains)
methods = {name: methods[name] for name in s["baselines"]}
# averaged runs whose raw weights are evaluated too (each costs one more row per checkpoint;
# the figure below shows every averaged run's raw weights on the validation split for free)
raw_too = ["pgd_at_ema"]
print(f"profile={profile} device={dev} runs in {root}\nbudget: {budget}\nsettings: {s}")

# %% [markdown]
# ## Train (or load the finished runs), one budget for all
#
# Every run holds out the same validation split of the training set: the in-training accuracies and the choice of each run's best checkpoint come from it, never from the test set. An averaged run's best checkpoint is the epoch whose *average* scored best; its raw weights are loaded from that same checkpoint. A second execution loads the finished runs instead of retraining.

# %%
finished = {name: nbtools.train_or_load(run_dir=root / name, dataset=dataset, profile=profile,
                                        seed=seed, device=str(dev), quiet=quiet,
                                        weights="ema" if "ema_decay" in spec else "raw",
                                        **budget, **spec)
            for name, spec in methods.items()}
runs = {}
for name, run in finished.items():
    if name in raw_too:  # the same checkpoint, the weights the optimiser trained
        runs[f"{name}_raw"] = nbtools.open_run(run.path, which=run.which, weights="raw",
                                               device=dev)
    runs[name] = run
cfg = runs["pgd_at_ema"].config  # one budget: every run has the same engine settings
eps = cfg["eps"]
print(f"{cfg['model']}, {cfg['epochs']} epochs, training PGD steps {cfg['steps']}, validation "
      f"split of {cfg['val_size']} training images, eps {eps * 255:g}/255")
print("weights:", {name: run.weights for name, run in runs.items()})
print(nbtools.describe_runs(runs))
img_per_s = {name: nbtools.train_speed(run) for name, run in finished.items()}

# %% [markdown]
# ## Raw weights and their average during training
#
# Validation accuracy per epoch of every averaged run: the average (solid) and the raw weights (dashed), clean and under the in-training PGD; training validates both on the same split. The star marks the epoch the average selected.

# %%
averaged_runs = {name: run for name, run in finished.items() if run.weights == "ema"}
fig = plots.averaging_curves(averaged_runs, eval_steps=cfg["eval_steps"])
nbtools.save_figure(fig, "baselines_averaging", profile=profile,
                    extra={"dataset": dataset, "ema_decay": ema_decay})

# %% [markdown]
# ## Clean, FGSM, PGD-20, CW-20, AutoAttack
#
# One `evaluate` call per model and checkpoint, every attack on the same test images, in fp32: the selected checkpoint (`best`, chosen on the validation split) and the `last` one side by side; averaged runs with their averaged weights, the `_raw` rows with the raw ones. PGD-20 and CW-20 with step eps/4 and a random start; AutoAttack through the authors' `pyautoattack`, standard (APGD-CE, APGD-T, FAB-T, Square) except in the smoke and cpu profiles, which run its two APGD stages only. *worst case*: correct clean and under every attack of the row. The masking report of each row is printed under the table.
#
# **The papers' claims, shown beside the table, not asserted.** TRADES: RobustBench lists the authors' WRN-34-10 (β = 6) at 84.92% clean and 53.08% under AutoAttack (at eps 0.031, about 7.9/255; the row `paper: TRADES β=6 (RobustBench)`, from `mixlab.references`), a network and schedule far larger than any profile here but `paper`. Rebuffi et al. 2021 find that data augmentation such as CutMix, which had not helped adversarial training before, does improve robust accuracy once it is combined with weight averaging: compare `pgd_at_cutmix_ema` with `pgd_at_ema` here, and each average with its raw weights in the figure above. At the smoke and cpu scales these orderings can go either way.

# %%
test, x_test, y_test = nbtools.load_test_images(dataset, s["n_eval"], dev)
by_run = nbtools.evaluate_runs(runs, x_test, y_test, progress=not quiet, eps=eps, norm="Linf",
                               aa_attacks=s["aa_attacks"])
papers = reference_rows("trades", dataset=dataset, norm="Linf")
results = nbtools.table_rows(by_run, papers)
print(nbtools.table_report(results))
aa_run = nbtools.aa_used(results)
print(f"n = {len(y_test)} test images for every attack; AutoAttack: {aa_run}; "
      f"{dataset}, {cfg['model']}, profile {profile}")
for row, r in papers.items():
    print(f"{row}: {r['source']}")
selected = {name: by_run[name][nbtools.checkpoint_label(name, run)]
            for name, run in runs.items()}
for name in raw_too:  # what averaging buys, at the selected checkpoint
    avg, raw = selected[name], selected[f"{name}_raw"]
    print(f"{name}, epoch {runs[name].epoch}: average − raw weights: clean "
          f"{avg['clean'] - raw['clean']:+.3f}, PGD-20 {avg['pgd20'] - raw['pgd20']:+.3f}, "
          f"worst case {avg['robust'] - raw['robust']:+.3f}")
print("training img/s:", {k: round(v) for k, v in img_per_s.items()})
nbtools.save_table(results, "baselines_table", profile=profile,
                   extra={"n": len(y_test), "aa_attacks": aa_run, "dataset": dataset,
                          "model": cfg["model"], "eps": eps, "ema_decay": ema_decay,
                          "train_img_per_s": img_per_s})
fig = plots.accuracy_bars({**selected, **papers},
                          title=f"{dataset}, Linf eps = {eps * 255:g}/255, selected checkpoints, "
                                f"n = {len(y_test)} test images")
nbtools.save_figure(fig, "baselines_bars", profile=profile, extra={"table": "baselines_table"})

# %% [markdown]
# ## Seed table: what averaging buys, over training seeds
#
# Averaged and raw weights differ by a point or two at the smaller scales, about the noise of one training seed. PGD-AT and PGD-AT with averaging are trained again with the seeds after `seed` (`n_seeds` in the settings; the first seed's runs are the ones above) and each selected checkpoint evaluated on the same test images as the table (the averaged run with its averaged and its raw weights): mean ± half the spread, and every seed's value.

# %%
seeds = nbtools.seed_list(seed, s["n_seeds"])
compared = [name for name in ("pgd_at", "pgd_at_ema") if name in methods]
runs_by_seed = {seed: {name: runs[name] for name in [*compared, "pgd_at_ema_raw"]}}
for other in seeds[1:]:
    trained = {name: nbtools.train_or_load(run_dir=root / "seeds" / f"seed{other}" / name,
                                           dataset=dataset, profile=profile, seed=other,
                                           device=str(dev), quiet=quiet,
                                           weights="ema" if "ema_decay" in methods[name] else "raw",
                                           **budget, **methods[name])
               for name in compared}
    raw = nbtools.open_run(trained["pgd_at_ema"].path, which=trained["pgd_at_ema"].which,
                           weights="raw", device=dev)
    runs_by_seed[other] = {**trained, "pgd_at_ema_raw": raw}
by_seed = nbtools.seed_table(runs_by_seed, x_test, y_test, progress=not quiet, eps=eps,
                             norm="Linf", aa_attacks=s["aa_attacks"])
print(nbtools.format_seed_table(by_seed))
nbtools.save_table(by_seed, "baselines_seeds", profile=profile,
                   extra={"n": len(y_test), "aa_attacks": aa_run, "dataset": dataset,
                          "model": cfg["model"], "eps": eps, "ema_decay": ema_decay,
                          "seeds": seeds})

# %% [markdown]
# ## Checks
#
# `mixlab.checks` raises `CheckFailed` with what went wrong. The papers' orderings (averaging over raw weights, CutMix with averaging over PGD-AT alone) are claims shown above, not checked here.

# %%
# CutMix drew its λ from Beta(α, α); AMP drew λ0 so and moved λ only where lam_opt says so
# (each where this profile trains it)
if "cutmix_ema" in runs:
    checks.mixup_lambda(runs["cutmix_ema"])
if "amp_ema" in runs:
    checks.amp_lambda(runs["amp_ema"])

# every evaluated row: AutoAttack not weaker than PGD-20, no masking flags (the noisy ones of a
# barely trained model pass where the settings tolerate them); trained for real (the `trained`
# setting): above chance clean, else an untrained model or test images with other
# preprocessing or labels than training (smoke models, trained for seconds, can sit near
# chance on 64 test images)
min_clean = 1 / test.num_classes + 0.05 if s["trained"] else None
seed_rows = {name: list(row["per_seed"].values()) for name, row in by_seed.items()}
for name, rows in by_run.items():
    for r in [*rows.values(), *seed_rows.get(name, [])]:  # the other seeds' checkpoints too
        checks.evaluation(r, min_clean=min_clean, allow_warnings=s["tolerated_flags"])
if s["trained"]:  # adversarial training is robust beyond chance in the worst case
    for name, rows in by_run.items():
        if runs[name].config["method"] in ("pgd_at", "trades"):
            for r in [*rows.values(), *seed_rows.get(name, [])]:
                checks.evaluation(r, min_robust=s["min_robust"],
                                  allow_warnings=s["tolerated_flags"])
print("all checks passed")
