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
       "Live: open this notebook in JupyterLab (`.venv/bin/jupyter lab`) and run all cells. "
       "Headless: `papermill notebooks/margin_explorer.ipynb runs/margin_explorer.ipynb -p profile "
       "smoke --cwd notebooks` builds the widgets and saves a static figure of one path to "
       "`figures/margin_explorer_path_<profile>.png`. Profiles: `smoke` (CPU, tiny CNN, seconds), "
       "`short` (GPU, PreActResNet-18), `paper`."),
    code('profile = "smoke"             # smoke (CPU, seconds) | short (GPU, minutes) | paper\n'
         'device = "auto"               # auto | cpu | cuda\n'
         'seed = 0                      # seeds the runs trained here and the random direction\n'
         'dataset = "cifar10"           # cifar10 | mnist | cifar100 | svhn\n'
         'norm = "Linf"                 # threat model: Linf | L2\n'
         'methods = ["erm", "pgd_at"]   # runs trained (or reused) here when run_dirs is empty\n'
         'run_dirs = {}                 # name -> directory of any finished run, loaded instead\n'
         'image_index = 0               # test image the explorer opens on\n'
         'direction = "anpgd"           # pgd | anpgd | random | image\n'
         'target_index = 1              # the image walked towards when direction is "image"\n'
         'n_points = 101                # points per path (one batched forward per model)',
         metadata={"tags": ["parameters"]}),
    code('%matplotlib inline\n'
         'import math\n\n'
         'import matplotlib.pyplot as plt\n'
         'import numpy as np\n'
         'from IPython.display import display\n\n'
         'from mixlab import nbtools\n'
         'from mixlab.data import dataset_info, load_dataset\n'
         'from mixlab.explorer import MarginExplorer\n'
         'from mixlab.train import load_run, train_or_load\n\n'
         'dev = nbtools.resolve_device(device)\n'
         'eps = dataset_info(dataset)["eps"][norm]   # the threat model, pixel units (8/255 CIFAR Linf)\n'
         'max_eps = 4 * eps                         # how far paths go and the margin search range\n'
         'print(f"profile={profile} device={dev} dataset={dataset} norm={norm} eps={eps:.4f}")'),
    md("## The runs: load the given ones, or train (or reuse) one per method"),
    code('if run_dirs:\n'
         '    runs = {name: load_run(path, device=dev) for name, path in run_dirs.items()}\n'
         'else:\n'
         '    runs = {m: train_or_load(run_dir=nbtools.run_dir("margin_explorer", profile, f"{dataset}-{norm}-{m}"),\n'
         '                             method=m, dataset=dataset, norm=norm, profile=profile, seed=seed,\n'
         '                             device=str(dev), quiet=True)\n'
         '            for m in methods}\n'
         'for name, run in runs.items():\n'
         '    last = run.history[-1]\n'
         '    print(f"{name:8s} {run.config[\'method\']:8s} {run.config[\'model\']:15s} "\n'
         '          f"clean {last.get(\'test_clean\', float(\'nan\')):.3f}  robust {last.get(\'test_robust\', float(\'nan\')):.3f}")\n'
         'test = load_dataset(dataset, "test")'),
    md("## The explorer\n\n"
       "Controls: models A and B, the test image (slider, or click a thumbnail), the direction "
       "(adversarial directions attack the model chosen in *attack on*), and `t`, the distance "
       "walked (Linf: also in 1/255). Lines: grey = eps of the threat model, red = where this path "
       "first leaves the true class, green = the margin estimate. Along the AN-PGD direction of a "
       "model the red and green lines of that model should nearly meet; along a random direction "
       "the crossing lies far beyond the margin."),
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
    md("## What must hold"),
    code('K = len(test.classes)\n'
         'label = int(test.y[image_index])\n'
         'for slot, p in explorer.paths.items():\n'
         '    assert p.logits.shape == (n_points, K) and np.allclose(p.probs.sum(1), 1, atol=1e-4)\n'
         '    assert p.ts[0] == 0 and math.isclose(p.ts[-1], explorer.t_max, rel_tol=1e-6)\n'
         '    assert 0 <= p.margin <= max_eps + 1e-6\n'
         '    # the crossing is where the prediction first leaves the true class\n'
         '    if math.isnan(p.crossing):\n'
         '        assert (p.pred == label).all()\n'
         '    else:\n'
         '        assert 0 <= p.crossing <= explorer.t_max and (p.pred != label).any()\n'
         '        assert (p.crossing == 0) == (p.pred[0] != label)\n'
         '# moving the slider moves the marker of every panel, without a new forward\n'
         'marker = explorer.trace_index("position")[0]\n'
         'explorer.set_position(explorer.t_max)\n'
         'for slot in explorer.shown():\n'
         '    assert math.isclose(explorer.figures[slot].data[marker].x[0], explorer.t_max, rel_tol=1e-6)\n'
         'assert path.exists()\n'
         'print("all checks passed")'),
]
write_notebook(cells, "notebooks/margin_explorer.ipynb")
