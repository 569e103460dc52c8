"""Writes notebooks/margin_explorer.ipynb (outputs stripped). Run: python tools/make_margin_explorer.py"""
from nbwrite import code, md, write_notebook

cells = [
    md("# Margin explorer: walk from a test image towards the decision boundary\n\n"
       "The *margin* of a classifier at a test point is the distance to the nearest input it gets "
       "wrong (MMA, Ding et al. 2020, arXiv 1812.02637). Pick a trained run (any method), a test "
       "image and a direction (the adversarial one, PGD or MMA's AN-PGD, a random one, or towards "
       "another image) and move the slider along the path `clip(x + t·u, 0, 1)`: every class's "
       "probability and logit, the predicted class, the first boundary crossing on the path (red) "
       "and the model's margin estimate (green: PGD at `max_eps` then bisection, "
       "`mixlab.margins.estimate_margin`) are drawn for two models side by side, with the "
       "perturbed image below. The whole path is computed in one batched forward per model when "
       "the image, direction or model changes, so the slider itself is instant.\n\n"
       "Live: open this notebook in JupyterLab (`.venv/bin/jupyter lab`; as root add "
       "`--allow-root`) and run all cells. "
       "Headless: `papermill notebooks/margin_explorer.ipynb runs/margin_explorer.ipynb -p profile "
       "smoke --cwd notebooks` builds the widgets and saves a static figure of one path to "
       "`figures/margin_explorer_path_<profile>.png`. Profiles: `smoke` (CPU, tiny CNN, seconds), "
       "`short` (GPU, PreActResNet-18), `paper`."),
    code('profile = "smoke"             # type: str  run size: smoke (CPU, seconds) | short (GPU, minutes) | paper\n'
         'device = "auto"               # type: str  auto | cpu | cuda | cuda:N\n'
         'seed = 0                      # type: int  seeds the runs trained here and the random direction\n'
         'dataset = "cifar10"           # type: str  cifar10 | mnist | cifar100 | svhn\n'
         'norm = "Linf"                 # type: str  threat model: Linf | L2\n'
         'methods = ["erm", "pgd_at"]   # type: list[str]  runs trained (or reused) here when run_dirs is empty\n'
         'run_dirs = {}                 # type: dict  name -> directory of any finished run, loaded instead\n'
         'image_index = 0               # type: int  test image the explorer opens on\n'
         'direction = "anpgd"           # type: str  pgd | anpgd | random | image\n'
         'target_index = 1              # type: int  the image walked towards when direction is "image"\n'
         'n_points = 101                # type: int  points per path (one batched forward per model)',
         metadata={"tags": ["parameters"]}),
    code('%matplotlib inline\n'
         'import math\n\n'
         'from IPython.display import display\n\n'
         'from mixlab import nbtools\n'
         'from mixlab.data import dataset_info, load_dataset\n'
         'from mixlab.explorer import MarginExplorer\n'
         'from mixlab.train import load_run\n\n'
         '# the parameters, checked before anything runs (a wrong profile or type stops here)\n'
         'methods = nbtools.check_params(profile=profile, device=device, seed=seed, dataset=dataset, norm=norm,\n'
         '                               methods=methods, run_dirs=run_dirs, image_index=image_index,\n'
         '                               direction=direction, target_index=target_index,\n'
         '                               n_points=n_points)["methods"]\n'
         'dev = nbtools.resolve_device(device)\n'
         'eps = dataset_info(dataset)["eps"][norm]   # the threat model, pixel units (8/255 CIFAR Linf)\n'
         'max_eps = 4 * eps                         # how far paths go and the margin search range\n'
         'print(f"profile={profile} device={dev} dataset={dataset} norm={norm} eps={eps:.4f}")'),
    md("## The runs: load the given ones, or train (or reuse) one per method\n\n"
       "Each run is its selected checkpoint (the best epoch on the validation split held out of "
       "the training set), printed with its accuracies on that split."),
    code('if run_dirs:\n'
         '    runs = {name: load_run(path, device=dev) for name, path in run_dirs.items()}\n'
         'else:\n'
         '    runs = {m: nbtools.train_or_load(run_dir=nbtools.run_dir("margin_explorer", profile, f"{dataset}-{norm}-{m}"),\n'
         '                             method=m, dataset=dataset, norm=norm, profile=profile, seed=seed,\n'
         '                             device=str(dev), quiet=True)\n'
         '            for m in methods}\n'
         'for name, run in runs.items():\n'
         '    h = next(h for h in run.history if h["epoch"] == run.epoch)  # the selected epoch\n'
         '    print(f"{name:8s} {run.config[\'method\']:8s} {run.config[\'model\']:15s} epoch {run.epoch} of "\n'
         '          f"{len(run.history)}; validation clean {h.get(\'val_clean\', float(\'nan\')):.3f}  "\n'
         '          f"robust {h.get(\'val_robust\', float(\'nan\')):.3f}")\n'
         'test = load_dataset(dataset, "test")'),
    md("## The explorer\n\n"
       "Controls: models A and B, the test image (slider, or click a thumbnail), the direction "
       "(adversarial directions attack the model chosen in *attack on*), and `t`, the distance "
       "walked (Linf: also in 1/255). Lines: grey = eps of the threat model, red = where this path "
       "first leaves the true class, green = the margin estimate. Along the AN-PGD direction of a "
       "model the red and green lines of that model should nearly meet; along a random direction "
       "the crossing lies far beyond the margin. *What the terms mean* under the controls "
       "explains PGD-CE, AN-PGD, SLM, the lines and the argmax strip; hovering over a control "
       "says what it does."),
    code('explorer = MarginExplorer(runs, test.x, test.y, test.classes, norm=norm, eps=eps,\n'
         '                          max_eps=max_eps, n_points=n_points, direction=direction,\n'
         '                          image=image_index, target=target_index, seed=seed)\n'
         'display(explorer.widget)'),
    md("## A static figure of one path (for headless runs and the record)\n\n"
       "The slider is placed at model A's first boundary crossing (or half-way when the path "
       "never leaves the true class)."),
    code('crossing = explorer.paths["A"].crossing\n'
         'explorer.set_position(crossing if not math.isnan(crossing) else explorer.t_max / 2)\n'
         'fig = explorer.path_figure()\n'
         'path = nbtools.save_figure(fig, "margin_explorer_path", profile=profile, extra=dict(\n'
         '    dataset=dataset, norm=norm, image=image_index, direction=direction,\n'
         '    runs={name: str(run.path) for name, run in runs.items()}))\n'
         'print(path)\n'
         'for slot, name in explorer.shown().items():\n'
         '    p = explorer.paths[slot]\n'
         '    print(f"{slot}: {name:8s} crossing {p.crossing:.4f}  margin estimate {p.margin:.4f}")'),
    md("## Checks"),
    code('# moving the slider moves the position marker of every panel, without a new forward\n'
         '# (fails when the slider is not wired to the figures)\n'
         'marker = explorer.trace_index("position")[0]\n'
         'explorer.set_position(explorer.t_max)\n'
         'for slot in explorer.shown():\n'
         '    assert math.isclose(explorer.figures[slot].data[marker].x[0], explorer.t_max, rel_tol=1e-6)\n'
         'print("all checks passed")'),
]
write_notebook(cells, "notebooks/margin_explorer.ipynb")
