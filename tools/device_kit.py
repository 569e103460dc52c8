"""Run the notebooks and the benchmark on a GPU machine without internet; bring the figures back.

GPU machines are often offline (air-gapped clusters are common): the GPU machine has Python and
torch but cannot reach PyPI, and may not see the folder where your datasets live. This tool packs
what the GPU machine lacks, runs the GPU work there in *stages* (the CUDA tests, the benchmark,
each notebook; each sized for about ten minutes on one H100-class GPU), and brings each stage's
figures, tables and benchmark JSON back in one archive. The guide is ``docs/gpu_machine.md``.

1. On a machine with internet, in the checkout (stdlib + pip; seconds)::

       python3 tools/device_kit.py pack --data-from ~/data --python-version 3.12

   fills the git-ignored ``.carry/``:
   ``whl/``      wheels for the GPU machine's Python (manylinux x86-64) of everything the
                 notebooks and the bench import beyond what a PyTorch installation has,
                 resolved by pip (pyautoattack without its 45 MB ``examples/`` model file);
   ``cifar10/``  CIFAR-10 from the data folder: torchvision's ``cifar-10-batches-py/``, an
                 image-folder tree (packed as ``cifar10-jpeg.tar.gz``) or such an archive;
   ``mnist/``    MNIST's four IDX files (``MNIST/raw/``, gzipped or not).

2. Copy the checkout, ``.carry/`` included, to the GPU machine. There, one command per stage
   (``python3 tools/device_kit.py plan`` lists them, with what each needs)::

       python3 tools/device_kit.py stage amp --out ~/mixlab-out

   A stage installs the carried wheels that the machine's Python lacks into /tmp/site
   (``pip --no-index --no-deps``), puts the data into ``--data-root`` (``$MIXLAB_DATA``, else
   /tmp/mixlab-data) unless it is there already, runs its jobs in ``--profile`` (``short``),
   each under a timeout that leaves time to pack, and writes ``<out>/<stage>.tar.gz`` (the
   figures, tables and bench JSON it made) and ``<out>/<stage>.log``. It packs whatever was
   made even when a job fails or times out. Training runs are checkpointed under
   ``--runs-root`` (``$MIXLAB_RUNS``, else /tmp/mixlab-runs): the same stage run again resumes.

3. Copy ``<out>`` back and, in the checkout::

       python3 tools/device_kit.py unpack ~/mixlab-out/amp.tar.gz

   extracts into ``figures/`` and ``results/``.

The same ``stage`` runs on a CPU as a dry run of the mechanics
(``python3 tools/device_kit.py stage quickstart --profile smoke --out /tmp/out``); there it only
installs what the running Python lacks.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CARRY = ROOT / ".carry"

#: top-level requirements of the notebooks, the bench and the tests stage on a machine that
#: already has torch, torchvision, numpy, scipy, matplotlib and tqdm (pip resolves the rest)
REQUIREMENTS = ("papermill", "ipykernel", "ipywidgets", "anywidget", "plotly", "pyautoattack",
                "pytest")

#: distributions a PyTorch GPU image usually ships (torch, its dependencies, the scientific
#: stack): not packed, which keeps ``.carry/whl`` small; ``pack --also NAME`` packs one anyway
#: for a machine that lacks it. A stage installs only the carried wheels the machine lacks.
DEVICE_HAS = frozenset("""
attrs certifi charset-normalizer click filelock fsspec idna jinja2 markupsafe matplotlib narwhals
numpy packaging pillow pip psutil pygments pyparsing python-dateutil pyyaml requests rich scipy
six sympy torch torchvision tqdm typing-extensions urllib3""".split())

#: pulled in by pip but never imported by a headless run: ipykernel's debugger (debugpy),
#: IPython's completion (jedi) and the classic notebook's widget front end (papermill runs the
#: notebooks without them); leaving them out saves 12.5 MB.
NOT_NEEDED = frozenset({"debugpy", "jedi", "widgetsnbextension"})

#: pip's platform tags for the GPU machine (x86-64 Linux; glibc >= 2.28 covers every wheel)
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_26_x86_64",
             "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux1_x86_64")


def notebook_job(name: str, minutes: float, label: str | None = None,
                 **params: str) -> tuple[str, list[str], float]:
    """A job that runs notebooks/<name>.ipynb with papermill (``python -m mixlab.notebooks``);
    ``params``: notebook parameters of this job (a stage's --param may override them)."""
    return (label or name, ["mixlab.notebooks", "--only", name,
                            *(f"--param={k}={v}" for k, v in params.items())], minutes)


#: stage -> (folders of .carry/ it needs, jobs). A job is (label, command after `python -m`,
#: minutes it may take on one H100-class GPU; a --budget-s above 600 s scales them up). The
#: minutes are estimates from the benchmark's pass counts (PGD-10 AT on PreActResNet-18 at about
#: 7,000 img/s: one short run, 15 epochs of 50k images, ~2 min; AutoAttack on 1,000 images
#: ~2 min). A notebook job that runs out of time keeps every finished epoch (checkpoints under
#: --runs-root): running the stage again resumes the runs instead of starting over.
STAGES: dict[str, tuple[tuple[str, ...], list[tuple[str, list[str], float]]]] = {
    # the CUDA-only tests (skipped on every CPU machine), then the unit suite where CUDA is
    # present (device="auto" paths take the GPU there)
    "tests": (("whl",), [
        ("pytest -m gpu", ["pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "tests"], 4),
        ("unit tests", ["pytest", "-m", "not notebook and not browser and not gpu", "-q",
                        "-p", "no:cacheprovider", "tests"], 5),
    ]),
    # every row on PreActResNet-18, the compiled rows, and WRN-32-10 (docs/benchmark.md)
    "bench": (("whl", "cifar10"), [
        ("bench preactresnet18", ["mixlab.bench", "--arch", "preactresnet18"], 4),
        ("bench preactresnet18 compiled", ["mixlab.bench", "--arch", "preactresnet18",
                                           "--compile", "--methods",
                                           "ceiling,pgd_at,amp,gairat,mma"], 3),
        ("bench wrn-32-10", ["mixlab.bench", "--arch", "wrn-32-10", "--methods",
                             "ceiling,reference,pgd_at,mma", "--aa-n", "0"], 3),
    ]),
    # the main notebook: ERM, mixup, PGD-AT and four AMP variants (likely two runs of the stage)
    "amp": (("whl", "cifar10"), [notebook_job("amp_cifar10", 10)]),
    "gairat": (("whl", "cifar10"), [notebook_job("gairat_cifar10", 10)]),
    "mma": (("whl", "cifar10"), [notebook_job("mma", 10, "mma_cifar10", dataset="cifar10")]),
    # one PGD-AT run, then AutoAttack's throughput on that trained model (the benchmark's
    # "AutoAttack on 1,000 images" reference speed, docs/benchmark.md, on a robust model
    # rather than the bench's untrained one)
    "quickstart": (("whl", "cifar10"), [
        notebook_job("quickstart", 6),
        ("bench eval, trained PGD-AT", ["mixlab.bench", "--methods", "eval", "--checkpoint",
                                        "{runs}/quickstart/{profile}/cifar10-pgd_at"], 4),
    ]),
    # the baselines on one budget: PGD-AT, weight averaging, CutMix, TRADES, AMP
    "baselines": (("whl", "cifar10"), [notebook_job("baselines_cifar10", 10)]),
    # the explorer's runs (ERM and PGD-AT) and its static figure
    "explorer": (("whl", "cifar10"), [notebook_job("margin_explorer", 10)]),
    # MNIST MMA; the theory notebook (small MLPs, an MNIST gap study, ERM vs mixup on CIFAR-10)
    "mnist": (("whl", "mnist", "cifar10"), [
        notebook_job("mma", 5, "mma_mnist", dataset="mnist"),
        notebook_job("mixup_theory", 5),
    ]),
}

#: what each stage leaves in the checkout once its archive is unpacked (GPU runs only: the
#: bench's CPU results are named bench-cpu-*, the smoke figures *_smoke.*)
STAGE_RESULTS = {
    "bench": ("results/bench-nvidia-*.json",),
    "amp": ("figures/amp_*_short.png",),
    "gairat": ("figures/gairat_*_short.png",),
    "mma": ("figures/mma_cifar10_*_short.png",),
    "quickstart": ("figures/quickstart_*_short.png",),
    "baselines": ("figures/baselines_*_short.png",),
    "explorer": ("figures/margin_explorer_*_short.png",),
    "mnist": ("figures/mma_mnist_*_short.png", "figures/theory_*_short.png"),
}

#: seconds a stage keeps at the end of its budget for packing its archive
PACK_RESERVE_S = 45
#: the budget (s) the job minutes of STAGES are sized for; a larger one scales them up
STAGE_BUDGET_S = 600

#: MNIST's four IDX files (torchvision's MNIST/raw layout, without .gz)
MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
               "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def canonical(name: str) -> str:
    """PEP 503 name: 'Typing_Extensions' -> 'typing-extensions'."""
    return re.sub(r"[-_.]+", "-", name).lower()


def wheel_project(path: Path) -> str:
    return canonical(path.name.split("-")[0])


# ----------------------------------------------------------------- pack (with internet)
def slim_wheel(path: Path, drop_prefix: str) -> Path:
    """Rewrite a wheel without the files under ``drop_prefix`` (and their RECORD lines)."""
    tmp = path.with_suffix(".tmp")
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as dst:
        for item in src.infolist():
            if item.filename.startswith(drop_prefix):
                continue
            data = src.read(item)
            if item.filename.endswith(".dist-info/RECORD"):
                lines = data.decode().splitlines(keepends=True)
                data = "".join(l for l in lines if not l.startswith(drop_prefix)).encode()
            dst.writestr(item, data)
    os.replace(tmp, path)
    return path


def find_cifar10(folder: Path) -> tuple[str, Path] | None:
    """Where ``folder`` holds CIFAR-10, as (kind, path): "archive" (``cifar10-jpeg.tar.gz``, an
    image-folder tree in one tar.gz, what ``python -m mixlab prepare`` unpacks), "torchvision"
    (``cifar-10-batches-py/``) or "folder" (``cifar10/{train,test}/<class>/*.png|jpg``, also one
    folder below, or under ``cifar10-jpeg/``, as ``mixlab.data`` reads it); None if absent."""
    if (folder / "cifar10-jpeg.tar.gz").is_file():
        return "archive", folder / "cifar10-jpeg.tar.gz"
    if (folder / "cifar-10-batches-py").is_dir():
        return "torchvision", folder / "cifar-10-batches-py"
    for base in (folder / "cifar10", folder / "cifar10-jpeg"):
        if base.is_dir():
            for tree in (base, *sorted(p for p in base.iterdir() if p.is_dir())):
                if (tree / "train").is_dir() and (tree / "test").is_dir():
                    return "folder", tree
    return None


def find_mnist(folder: Path) -> list[Path] | None:
    """MNIST's four IDX files under ``folder/MNIST/raw``, gzipped or not; None if absent."""
    raw = folder / "MNIST" / "raw"
    for suffix in (".gz", ""):
        files = [raw / f"{name}{suffix}" for name in MNIST_FILES]
        if all(f.is_file() for f in files):
            return files
    return None


def tar_image_folder(tree: Path, archive: Path) -> None:
    """Pack the images of ``tree/{train,test}/<class>/`` into ``archive`` (tar.gz), in the
    layout ``python -m mixlab prepare`` unpacks (cached tensors and other files left out)."""
    with tarfile.open(archive, "w:gz") as tar:
        for split in ("train", "test"):
            for f in sorted((tree / split).rglob("*")):
                if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES:
                    tar.add(f, arcname=str(f.relative_to(tree)))


def pack(data_from: Path, python_version: str = "3.12", dest: Path = CARRY,
         also: list[str] = ()) -> None:
    """Fill ``dest/{whl,cifar10,mnist}`` (see the module docstring). ``data_from``: the folder
    holding CIFAR-10 and MNIST (see :func:`find_cifar10`, :func:`find_mnist`); ``also``: extra
    distributions to pack, even ones a PyTorch image usually has (``DEVICE_HAS``)."""
    cifar, mnist = find_cifar10(data_from), find_mnist(data_from)
    if cifar is None and mnist is None:
        raise SystemExit(f"device_kit: {data_from} holds neither CIFAR-10 (cifar-10-batches-py/, "
                         f"cifar10/{{train,test}}/ or cifar10-jpeg.tar.gz) nor MNIST "
                         f"(MNIST/raw/); pass --data-from the folder that has them")
    whl = dest / "whl"
    shutil.rmtree(whl, ignore_errors=True)
    whl.mkdir(parents=True)
    platforms = [arg for p in (*PLATFORMS, "any") for arg in ("--platform", p)]
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--only-binary=:all:",
                    "--python-version", python_version, "--implementation", "cp", *platforms,
                    "-d", str(whl), *REQUIREMENTS, *also], check=True)
    keep = {canonical(name) for name in also}
    for wheel in sorted(whl.glob("*.whl")):
        if wheel_project(wheel) in (DEVICE_HAS | NOT_NEEDED) - keep:
            wheel.unlink()
        elif wheel_project(wheel) == "pyautoattack":
            slim_wheel(wheel, "pyautoattack/examples/")
    for name in ("cifar10", "mnist"):
        shutil.rmtree(dest / name, ignore_errors=True)
    if cifar is not None:
        kind, path = cifar
        (dest / "cifar10").mkdir(parents=True)
        if kind == "archive":
            shutil.copy2(path, dest / "cifar10" / path.name)
        elif kind == "torchvision":
            shutil.copytree(path, dest / "cifar10" / path.name)
        else:
            tar_image_folder(path, dest / "cifar10" / "cifar10-jpeg.tar.gz")
    else:
        print(f"device_kit: no CIFAR-10 in {data_from}: the stages that need it will look for "
              f"it in the GPU machine's --data-root")
    if mnist is not None:
        raw = dest / "mnist" / "MNIST" / "raw"
        raw.mkdir(parents=True)
        for f in mnist:
            shutil.copy2(f, raw / f.name)
    else:
        print(f"device_kit: no MNIST in {data_from}: the stages that need it will look for it "
              f"in the GPU machine's --data-root")
    for name in ("whl", "cifar10", "mnist"):
        if (dest / name).is_dir():
            size = sum(f.stat().st_size for f in (dest / name).rglob("*") if f.is_file())
            print(f"{dest / name}: {size / 2**20:.1f} MiB")


def stage_results(name: str, root: Path = ROOT) -> list[Path]:
    """The committed GPU results of a stage (STAGE_RESULTS globs), if any."""
    return sorted(f for pattern in STAGE_RESULTS.get(name, ()) for f in root.glob(pattern))


def plan(root: Path = ROOT) -> str:
    """The commands to run on the GPU machine, one per stage, in the order worth spending GPU
    time on, each marked with whether its GPU results are already in the checkout."""
    lines = ["# on the GPU machine, in the copied checkout, one command per stage (OUT: a folder "
             "to bring back); then here: python3 tools/device_kit.py unpack OUT/<stage>.tar.gz"]
    for stage, (carry, jobs) in STAGES.items():
        minutes = sum(limit for _, _, limit in jobs)
        have = stage_results(stage, root)
        status = ("log only" if stage not in STAGE_RESULTS else
                  f"done: {len(have)} files" if have else "to do")
        lines.append(f"python3 tools/device_kit.py stage {stage} --out $OUT   # [{status}] "
                     f"needs {', '.join(f'.carry/{c}' for c in carry)}; jobs: "
                     f"{', '.join(label for label, _, _ in jobs)} (<= {minutes:g} min)")
    return "\n".join(lines)


# ----------------------------------------------------------------- stage (on the GPU machine)
def install_missing_wheels(wheels: Path, site: Path) -> list[str]:
    """pip-install (no index, no deps) each carried wheel whose project the running Python
    lacks, into ``site``; returns the projects installed."""
    missing = []
    for wheel in sorted(wheels.glob("*.whl")):
        try:
            importlib.metadata.version(wheel_project(wheel))
        except importlib.metadata.PackageNotFoundError:
            missing.append(wheel)
    if missing:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                        "--no-compile", "--no-cache-dir", "--upgrade", "--target", str(site),
                        *map(str, missing)], check=True)
    return [wheel_project(w) for w in missing]


def run_in_own_group(argv: list[str], *, env: dict, log, timeout: float) -> int | str:
    """Run ``argv`` in a new process group; on timeout kill the whole group (papermill's
    kernel too, so it frees the GPU); returns the exit status or "timeout"."""
    proc = subprocess.Popen(argv, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return "timeout"


def newer_files(folders: list[Path], since: float) -> list[Path]:
    return sorted(f for folder in folders if folder.is_dir() for f in folder.rglob("*")
                  if f.is_file() and f.stat().st_mtime >= since)


def data_present(folder: str, root: Path) -> bool:
    """Whether ``root`` already holds the dataset of a ``.carry/`` folder in a layout
    ``mixlab.data`` reads (an archive still to unpack does not count)."""
    if folder == "cifar10":
        found = find_cifar10(root)
        return found is not None and found[0] != "archive"
    files = find_mnist(root)
    return files is not None and files[0].suffix != ".gz"


def place_data(folder: str, src: Path, root: Path, *, env: dict, log) -> str | None:
    """Put the dataset of ``.carry/<folder>`` (``src``) into the data root ``root``, unless it is
    there already. Returns None when the data is ready, else the reason it is not."""
    if data_present(folder, root):
        return None
    if not src.is_dir():
        return (f"no .carry/{folder} here and no {folder} in {root}: copy .carry/{folder} "
                f"(made by `pack`) with the checkout, or pass --data-root a folder that holds it")
    root.mkdir(parents=True, exist_ok=True)
    cifar = find_cifar10(src) if folder == "cifar10" else None
    if cifar is not None and cifar[0] == "torchvision":
        shutil.copytree(cifar[1], root / cifar[1].name, dirs_exist_ok=True)
    mnist = find_mnist(src) if folder == "mnist" else None
    if mnist is not None and mnist[0].suffix != ".gz":
        (root / "MNIST" / "raw").mkdir(parents=True, exist_ok=True)
        for f in mnist:
            shutil.copy2(f, root / "MNIST" / "raw" / f.name)
    # archives (the CIFAR-10 image-folder tar, gzipped MNIST files): mixlab's own unpacking
    rc = subprocess.run([sys.executable, "-m", "mixlab", "prepare", "--from", str(src)],
                        env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT).returncode
    if rc != 0 or not data_present(folder, root):
        return f"`python -m mixlab prepare --from {src}` failed (exit {rc}; see the log above)"
    return None


def stage(name: str, out: Path, *, profile: str = "short", budget_s: float = STAGE_BUDGET_S,
          params: list[str] = (), data_root: Path | None = None,
          runs_root: Path | None = None) -> int:
    """Run one stage (see STAGES) in the checkout; write ``out/<name>.tar.gz`` and
    ``out/<name>.log``. ``budget_s``: seconds the whole stage may take (each job's limit grows in
    proportion above ``STAGE_BUDGET_S``). ``params``: KEY=VALUE notebook parameters passed to
    every notebook job (``python -m mixlab.notebooks --param``). ``data_root``, ``runs_root``:
    where datasets and training runs live (default ``$MIXLAB_DATA`` / ``$MIXLAB_RUNS``, else
    folders under the temporary directory). Exit status: 0 if every job passed, else 1."""
    t_start = time.time()
    carry, jobs = STAGES[name]
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / f"{name}.log"
    tmp = Path(tempfile.gettempdir())
    env = dict(os.environ, PYTHONUNBUFFERED="1",
               OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "8"))
    env["MIXLAB_DATA"] = str(data_root or os.environ.get("MIXLAB_DATA") or tmp / "mixlab-data")
    env["MIXLAB_RUNS"] = str(runs_root or os.environ.get("MIXLAB_RUNS") or tmp / "mixlab-runs")
    scale = max(1.0, budget_s / STAGE_BUDGET_S)
    failures = 0
    with open(log_path, "w") as log:
        def say(text: str) -> None:
            line = f"[{time.time() - t_start:6.1f} s] {text}"
            print(line, flush=True)
            log.write(line + "\n")
            log.flush()

        site = tmp / "site"
        if "whl" in carry:
            if (CARRY / "whl").is_dir():
                installed = install_missing_wheels(CARRY / "whl", site)
                say(f"installed {len(installed)} wheels into {site}: "
                    f"{' '.join(installed) or '-'}")
            else:
                say("no .carry/whl here: using the packages this Python already has")
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(site), str(ROOT),
                                                        env.get("PYTHONPATH")) if p)
        for folder in (f for f in carry if f != "whl"):
            problem = place_data(folder, CARRY / folder, Path(env["MIXLAB_DATA"]), env=env,
                                 log=log)
            say(f"data {folder}: " + (f"ready in {env['MIXLAB_DATA']}" if problem is None else
                                      f"FAILED: {problem}"))
            if problem is not None:  # every job needs its data: report, pack nothing, stop
                jobs, failures = [], len(jobs)
        for label, module_args, minutes in jobs:
            left = budget_s - PACK_RESERVE_S - (time.time() - t_start)
            if left < 30:
                say(f"SKIP  {label}: {left:.0f} s left in the stage's budget (--budget-s)")
                failures += 1
                continue
            argv = [sys.executable, "-m",
                    *(a.format(runs=env["MIXLAB_RUNS"], profile=profile) for a in module_args)]
            if module_args[0] == "mixlab.notebooks":
                argv += ["--profile", profile, *(f"--param={p}" for p in params)]
            argv += ["--quick"] if module_args[0] == "mixlab.bench" and profile == "smoke" else []
            timeout = min(left, 60 * minutes * scale)
            t0 = time.time()
            say(f"start {label}: {' '.join(argv[1:])} (timeout {timeout:.0f} s)")
            rc = run_in_own_group(argv, env=env, log=log, timeout=timeout)
            failures += rc != 0
            say(f"{'ok   ' if rc == 0 else 'FAIL '} {label}: exit {rc}, {time.time() - t0:.0f} s")
            if rc == "timeout":
                say(f"  {label} ran out of time: its finished epochs are in {env['MIXLAB_RUNS']}; "
                    f"run this stage again with the same --runs-root to resume (or give it a "
                    f"larger --budget-s)")
        made = newer_files([ROOT / "figures", ROOT / "results"], t_start)
        with tarfile.open(out / f"{name}.tar.gz", "w:gz") as tar:
            for f in made:
                tar.add(f, arcname=str(f.relative_to(ROOT)))
        say(f"packed {len(made)} files into {out / (name + '.tar.gz')}; {failures} job(s) failed")
    return 1 if failures else 0


def unpack(archives: list[Path], root: Path = ROOT) -> list[str]:
    """Extract stage archives into the checkout ``root``: plain files under figures/ and
    results/ only; returns their paths."""
    done = []
    for archive in archives:
        with tarfile.open(archive) as tar:
            members = [m for m in tar.getmembers()
                       if m.isfile() and m.name.split("/")[0] in ("figures", "results")
                       and ".." not in m.name.split("/") and not m.name.startswith("/")]
            tar.extractall(root, members=members)
        done += [m.name for m in members]
        print(f"{archive}: {len(members)} files into {root}")
    return done


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="tools/device_kit.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    pk = sub.add_parser("pack", help="fill .carry/ here: wheels for the GPU machine, the data")
    pk.add_argument("--data-from", "--shared-data", dest="data_from", type=Path,
                    default=Path(os.environ.get("MIXLAB_DATA") or ROOT / "data"),
                    help="folder holding CIFAR-10 and MNIST (default: $MIXLAB_DATA, else data/)")
    pk.add_argument("--python-version", default="3.12",
                    help="the GPU machine's Python, e.g. 3.11 (default 3.12)")
    pk.add_argument("--also", nargs="+", default=[], metavar="DIST",
                    help="more distributions to pack, e.g. pyyaml jinja2 for a machine that "
                         "has torch but not the packages a PyTorch image usually ships")
    pk.add_argument("--dest", type=Path, default=CARRY)
    sub.add_parser("plan", help="print the commands to run on the GPU machine, one per stage")
    st = sub.add_parser("stage", help="run one stage (on the GPU machine)")
    st.add_argument("name", choices=sorted(STAGES))
    st.add_argument("--out", type=Path, required=True,
                    help="folder for <stage>.tar.gz and <stage>.log (the one to bring back)")
    st.add_argument("--profile", default="short", choices=["smoke", "short", "paper"])
    st.add_argument("--budget-s", type=float, default=STAGE_BUDGET_S,
                    help="seconds the whole stage may take, e.g. your batch job's time limit "
                         f"(default {STAGE_BUDGET_S}); above it every job's limit grows in "
                         "proportion")
    st.add_argument("--param", "-p", action="append", default=[], metavar="KEY=VALUE",
                    help="notebook parameter for every notebook job, e.g. "
                         "'variants=[\"base\",\"both\"]' to trim AMP's ablation")
    st.add_argument("--data-root", type=Path,
                    help="datasets (default: $MIXLAB_DATA, else /tmp/mixlab-data); the stage "
                         "fills it from .carry/ unless the data is there already")
    st.add_argument("--runs-root", type=Path,
                    help="training runs, kept for resuming (default: $MIXLAB_RUNS, else "
                         "/tmp/mixlab-runs)")
    up = sub.add_parser("unpack", help="extract stage archives into figures/ and results/")
    up.add_argument("archives", nargs="+", type=Path)
    args = p.parse_args(argv)
    if args.command == "pack":
        pack(args.data_from, args.python_version, args.dest, also=args.also)
    elif args.command == "plan":
        print(plan())
    elif args.command == "stage":
        return stage(args.name, args.out, profile=args.profile, budget_s=args.budget_s,
                     params=args.param, data_root=args.data_root, runs_root=args.runs_root)
    else:
        unpack(args.archives)
    return 0


if __name__ == "__main__":
    sys.exit(main())
