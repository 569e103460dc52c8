# %% [markdown]
# # Margin explorer: walk from a test image towards the decision boundary
#
# The *margin* of a classifier at a test point is the distance to the nearest input it gets wrong (MMA, Ding et al. 2020, arXiv 1812.02637; [docs/mma.md](../docs/mma.md)). Pick a trained run (any method), a test image and a direction (the adversarial one, PGD or MMA's AN-PGD, a random one, or towards another image) and move the slider along the path `clip(x + t·u, 0, 1)`: every class's probability and logit, the predicted class, the first boundary crossing on the path (red) and the model's margin estimate (green: PGD at `max_eps` then bisection, `mixlab.margins.estimate_margin`) are drawn for two models side by side, with the perturbed image below. The whole path is computed in one batched forward per model when the image, direction or model changes, so the slider itself is instant.
#
# Live: open this notebook in JupyterLab (`.venv/bin/jupyter lab`; as root add `--allow-root`) and run all cells. Headless: `papermill notebooks/margin_explorer.ipynb runs/margin_explorer.ipynb -p profile smoke --cwd notebooks` builds the widgets and saves a static figure of one path to `figures/margin_explorer_path_<profile>.png`. Profiles: `smoke` (CPU, tiny CNN, seconds), `cpu` (a laptop's CPU), `short` (GPU, PreActResNet-18), `paper`.

# %% tags=["parameters"]
profile = "smoke"             # type: str  run size: smoke (CPU, seconds) | cpu | short (GPU, minutes) | paper
device = "auto"               # type: str  auto | cpu | cuda | cuda:N
seed = 0                      # type: int  seeds the runs trained here and the random direction
dataset = "cifar10"           # type: str  cifar10 | mnist | cifar100 | svhn
norm = "Linf"                 # type: str  threat model: Linf | L2
methods = ["erm", "pgd_at"]   # type: list[str]  runs trained (or reused) here when run_dirs is empty
run_dirs = {}                 # type: dict  name -> directory of any finished run, loaded instead
image_index = 0               # type: int  test image the explorer opens on
direction = "anpgd"           # type: str  pgd | anpgd | random | image
target_index = 1              # type: int  the image walked towards when direction is "image"
n_points = 101                # type: int  points per path (one batched forward per model)
quiet = False                 # type: bool  no progress bars (training steps, evaluation batches; -p quiet true)

# %%
# %matplotlib inline
import math

from IPython.display import display

from mixlab import nbtools
from mixlab.data import dataset_info, load_dataset
from mixlab.explorer import MarginExplorer
from mixlab.notebook_settings import notebook_settings

# the parameters, checked before anything runs (a wrong profile or type stops here) and
# rebound to their normalised values (`-p run_dirs '{"a": "runs/x"}'` is a dict now)
(profile, device, seed, dataset, norm, methods, run_dirs, image_index, direction, target_index,
 n_points, quiet) = nbtools.check_params(
    profile=profile, device=device, seed=seed, dataset=dataset, norm=norm, methods=methods,
    run_dirs=run_dirs, image_index=image_index, direction=direction, target_index=target_index,
    n_points=n_points, quiet=quiet).values()
s = notebook_settings("margin_explorer", profile)
dev = nbtools.resolve_device(device)
eps = dataset_info(dataset)["eps"][norm]   # the threat model, pixel units (8/255 CIFAR Linf)
max_eps = s["max_eps_factor"] * eps       # how far paths go and the margin search range
print(f"profile={profile} device={dev} dataset={dataset} norm={norm} eps={eps:.4f}")

# %% [markdown]
# ## The runs: load the given ones, or train (or reuse) one per method
#
# Each run is its selected checkpoint (the best epoch on the validation split held out of the training set), printed with its last epoch's accuracies on that split and the epoch selected.

# %%
if run_dirs:
    runs = {name: nbtools.open_run(path, device=dev) for name, path in run_dirs.items()}
else:
    runs = {m: nbtools.train_or_load(run_dir=nbtools.run_dir("margin_explorer", profile,
                                                             f"{dataset}-{norm}-{m}"),
                                     method=m, dataset=dataset, norm=norm, profile=profile,
                                     seed=seed, device=str(dev), quiet=quiet)
            for m in methods}
print(nbtools.describe_runs(runs))
test = load_dataset(dataset, "test")

# %% [markdown]
# ## The explorer
#
# Controls: models A and B, the test image (slider, or click a thumbnail), the direction (adversarial directions attack the model chosen in *attack on*), and `t`, the distance walked (Linf: also in 1/255). Lines: grey = eps of the threat model, red = where this path first leaves the true class, green = the margin estimate. Along the AN-PGD direction of a model the red and green lines of that model should nearly meet; along a random direction the crossing lies far beyond the margin. *What the terms mean* under the controls explains PGD-CE, AN-PGD, SLM, the lines and the argmax strip; hovering over a control says what it does.

# %%
explorer = MarginExplorer(runs, test.x, test.y, test.classes, norm=norm, eps=eps,
                          max_eps=max_eps, n_points=n_points, direction=direction,
                          image=image_index, target=target_index, seed=seed)
display(explorer.widget)

# %% [markdown]
# ## A static figure of one path (for headless runs and the record)
#
# The slider is placed at model A's first boundary crossing (or half-way when the path never leaves the true class).

# %%
crossing = explorer.paths["A"].crossing
explorer.set_position(crossing if not math.isnan(crossing) else explorer.t_max / 2)
fig = explorer.path_figure()
path = nbtools.save_figure(fig, "margin_explorer_path", profile=profile, extra=dict(
    dataset=dataset, norm=norm, image=image_index, direction=direction,
    runs={name: str(run.path) for name, run in runs.items()}))
print(path)
for slot, name in explorer.shown().items():
    p = explorer.paths[slot]
    print(f"{slot}: {name:8s} crossing {p.crossing:.4f}  margin estimate {p.margin:.4f}")

# %% [markdown]
# ## Checks

# %%
# moving the slider moves the position marker of every panel, without a new forward
# (fails when the slider is not wired to the figures)
marker = explorer.trace_index("position")[0]
explorer.set_position(explorer.t_max)
for slot in explorer.shown():
    assert math.isclose(explorer.figures[slot].data[marker].x[0], explorer.t_max, rel_tol=1e-6)
print("all checks passed")
