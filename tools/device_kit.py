"""GPU results in few remote calls: pack here, run a stage on the GPU machine, unpack here.

The GPU machine has torch but not papermill, pyautoattack or
the Jupyter stack, cannot reach PyPI, and does not see ``../shared``. One call runs at most
10 minutes and GPU time comes in short loans, so the work is cut into stages that
each fit one call and bring their figures back in one archive.

1. Here, once per GPU loan (stdlib + pip; seconds)::

       python3 tools/device_kit.py pack

   writes, under the git-ignored ``.carry/``:
   ``whl/``      wheels for the device's Python (3.12, manylinux x86-64) of everything the
                 notebooks and the bench import beyond torch/numpy/matplotlib, resolved by pip
                 (pyautoattack without its 45 MB ``examples/`` model file);
   ``cifar10/``  ``cifar10-jpeg.tar.gz`` from ``../shared/data``;
   ``mnist/``    ``MNIST/raw/*.gz`` from the same place.

2. There, one ``run`` per stage (``python3 tools/device_kit.py plan`` prints the calls)::

       run(command="python3 tools/device_kit.py stage amp --out $OUT",
           carry=[".carry/whl", ".carry/cifar10"])

   A stage installs the carried wheels the machine lacks into /tmp/site (``pip --no-index
   --no-deps``), unpacks the data into /tmp/mixlab-data (kept while the machine stays warm),
   runs its jobs in the ``--profile`` (short), each under a timeout that leaves time to pack, and
   writes ``$OUT/<stage>.tar.gz`` (the figures, tables and bench JSON it made) and
   ``$OUT/<stage>.log``. It packs whatever was made even when a job fails or times out.

3. Here::

       python3 tools/device_kit.py unpack /work/.device/.../amp.tar.gz

   extracts into the checkout (``figures/``, ``results/``); review and commit.

The same ``stage`` runs on a CPU for a dry run of the mechanics
(``python tools/device_kit.py stage quickstart --profile smoke --out /tmp/out``), which is how it
is tested here; there it only installs what the running Python lacks.
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

#: top-level requirements of the notebooks and the bench on a machine that already has torch,
#: torchvision, numpy, scipy, matplotlib and tqdm (pip resolves the rest)
REQUIREMENTS = ("papermill", "ipykernel", "ipywidgets", "anywidget", "plotly", "pyautoattack")

#: distributions the device image ships (the device tool's KINDS.md, read 2026-11-17): not
#: carried, to keep the call under its 64 MiB. The stage still checks each wheel it does carry
#: against what the machine has.
DEVICE_HAS = frozenset("""
attrs certifi charset-normalizer click filelock fsspec idna jinja2 markupsafe matplotlib narwhals
numpy packaging pillow pip psutil pygments pyparsing python-dateutil pyyaml requests rich scipy
six sympy torch torchvision tqdm typing-extensions urllib3""".split())

#: pulled in by pip but never imported by a headless run: ipykernel's debugger (debugpy),
#: IPython's completion (jedi) and the classic notebook's widget front end (tested: papermill
#: runs the notebooks without them). 12.5 MB that the 64 MiB call limit needs for data.
NOT_NEEDED = frozenset({"debugpy", "jedi", "widgetsnbextension"})

#: pip's platform tags for the device (x86-64 Linux, glibc >= 2.28 covers every wheel needed)
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_26_x86_64",
             "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux1_x86_64")

def notebook_job(name: str, minutes: float) -> tuple[str, list[str], float]:
    """A job that runs notebooks/<name>.ipynb with papermill (``python -m mixlab.notebooks``)."""
    return name, ["mixlab.notebooks", "--only", name], minutes


#: stage -> (carried folders, jobs). A job is (label, command after `python -m`, minutes it
#: may take at most). The minutes are guesses for an H100 from issue 8's orientation figures
#: (PGD-10 AT on PreActResNet-18 ~6,900 img/s: one short run, 15 epochs of 50k images, ~2 min;
#: AutoAttack on 1,000 images ~2 min); the call's budget is what holds. A notebook stage that
#: runs out of time keeps every finished epoch (checkpoints in $MIXLAB_RUNS, /tmp): calling it
#: again while the machine is still warm (30 s) resumes the runs instead of starting over.
STAGES: dict[str, tuple[tuple[str, ...], list[tuple[str, list[str], float]]]] = {
    # the CUDA-only tests (skipped on every CPU machine), then the unit suite where CUDA is
    # present (device="auto" paths take the GPU there)
    "tests": (("whl",), [
        ("pytest -m gpu", ["pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "tests"], 4),
        ("unit tests", ["pytest", "-m", "not notebook and not browser and not gpu", "-q",
                        "-p", "no:cacheprovider", "tests"], 5),
    ]),
    # every row on PreActResNet-18, the compiled rows, the WRN-32-10 targets
    "bench": (("whl", "cifar10"), [
        ("bench preactresnet18", ["mixlab.bench", "--arch", "preactresnet18"], 4),
        ("bench preactresnet18 compiled", ["mixlab.bench", "--arch", "preactresnet18",
                                           "--compile", "--methods",
                                           "ceiling,pgd_at,amp,gairat,mma"], 3),
        ("bench wrn-32-10", ["mixlab.bench", "--arch", "wrn-32-10", "--methods",
                             "ceiling,reference,pgd_at,mma", "--aa-n", "0"], 3),
    ]),
    # the main job: ERM, mixup, PGD-AT and four AMP variants (likely two calls)
    "amp": (("whl", "cifar10"), [notebook_job("amp_cifar10", 10)]),
    "gairat": (("whl", "cifar10"), [notebook_job("gairat_cifar10", 10)]),
    "mma": (("whl", "cifar10"), [notebook_job("mma_cifar10", 10)]),
    # one PGD-AT run, then AutoAttack's throughput on that trained model (issue 8's
    # "AutoAttack on 1,000 images" target, on a robust model rather than the bench's
    # untrained one)
    "quickstart": (("whl", "cifar10"), [
        notebook_job("quickstart", 6),
        ("bench eval, trained PGD-AT", ["mixlab.bench", "--methods", "eval", "--checkpoint",
                                        "{runs}/quickstart/{profile}/cifar10-pgd_at"], 4),
    ]),
    # the explorer's runs (PGD-AT and MMA) and its static figure
    "explorer": (("whl", "cifar10"), [notebook_job("margin_explorer", 10)]),
    # MNIST MMA; the theory notebook (small MLPs, an MNIST gap study, ERM vs mixup on CIFAR-10)
    "mnist": (("whl", "mnist", "cifar10"), [
        notebook_job("mma_mnist", 5),
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
    "explorer": ("figures/margin_explorer_*_short.png",),
    "mnist": ("figures/mma_mnist_*_short.png", "figures/theory_*_short.png"),
}

#: one device command may run 10 minutes; the stage keeps this much for packing and margin
PACK_RESERVE_S = 45


def canonical(name: str) -> str:
    """PEP 503 name: 'Typing_Extensions' -> 'typing-extensions'."""
    return re.sub(r"[-_.]+", "-", name).lower()


def wheel_project(path: Path) -> str:
    return canonical(path.name.split("-")[0])


# ----------------------------------------------------------------------------- pack (here)
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


def pack(shared_data: Path, python_version: str = "3.12", dest: Path = CARRY) -> None:
    """Fill ``dest/{whl,cifar10,mnist}`` (see the module docstring)."""
    whl = dest / "whl"
    shutil.rmtree(whl, ignore_errors=True)
    whl.mkdir(parents=True)
    platforms = [arg for p in (*PLATFORMS, "any") for arg in ("--platform", p)]
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--only-binary=:all:",
                    "--python-version", python_version, "--implementation", "cp", *platforms,
                    "-d", str(whl), *REQUIREMENTS], check=True)
    for wheel in sorted(whl.glob("*.whl")):
        if wheel_project(wheel) in DEVICE_HAS | NOT_NEEDED:
            wheel.unlink()
        elif wheel_project(wheel) == "pyautoattack":
            slim_wheel(wheel, "pyautoattack/examples/")
    archive = shared_data / "cifar10-jpeg.tar.gz"
    mnist = sorted((shared_data / "MNIST" / "raw").glob("*.gz"))
    if not archive.is_file() or len(mnist) != 4:
        raise SystemExit(f"device_kit: {shared_data} lacks cifar10-jpeg.tar.gz or the 4 "
                         f"MNIST/raw/*.gz files; pass --shared-data to the folder that has them")
    (dest / "cifar10").mkdir(exist_ok=True)
    shutil.copy2(archive, dest / "cifar10" / archive.name)
    (dest / "mnist" / "MNIST" / "raw").mkdir(parents=True, exist_ok=True)
    for f in mnist:
        shutil.copy2(f, dest / "mnist" / "MNIST" / "raw" / f.name)
    for name in ("whl", "cifar10", "mnist"):
        size = sum(f.stat().st_size for f in (dest / name).rglob("*") if f.is_file())
        print(f"{dest / name}: {size / 2**20:.1f} MiB")


def stage_results(name: str, root: Path = ROOT) -> list[Path]:
    """The committed GPU results of a stage (STAGE_RESULTS globs), if any."""
    return sorted(f for pattern in STAGE_RESULTS.get(name, ()) for f in root.glob(pattern))


def plan(root: Path = ROOT) -> str:
    """The device calls, one per stage, in the order worth spending device time on, each
    marked with whether its GPU results are already in the checkout."""
    lines = ["# one run per stage; each <= 10 min; unpack each $OUT archive here afterwards"]
    for stage, (carry, jobs) in STAGES.items():
        minutes = sum(limit for _, _, limit in jobs)
        have = stage_results(stage, root)
        status = ("log only" if stage not in STAGE_RESULTS else
                  f"done: {len(have)} files" if have else "to do")
        lines.append(f'run(command="python3 tools/device_kit.py stage {stage} --out $OUT", '
                     f'carry={[f".carry/{c}" for c in carry]})   # [{status}] jobs: '
                     f'{", ".join(label for label, _, _ in jobs)} (<= {minutes:g} min)')
    return "\n".join(lines)


# ----------------------------------------------------------------------------- stage (there)
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


def stage(name: str, out: Path, *, profile: str = "short", budget_s: float = 600,
          params: list[str] = (), data_root: Path | None = None,
          runs_root: Path | None = None) -> int:
    """Run one stage (see STAGES) in the checkout; write ``out/<name>.tar.gz`` and
    ``out/<name>.log``. ``params``: KEY=VALUE notebook parameters passed to every notebook
    job (``python -m mixlab.notebooks --param``). Exit status: 0 if every job passed, else 1."""
    t_start = time.time()
    carry, jobs = STAGES[name]
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / f"{name}.log"
    env = dict(os.environ, PYTHONUNBUFFERED="1",
               OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "8"))
    env["MIXLAB_DATA"] = str(data_root or Path(tempfile.gettempdir()) / "mixlab-data")
    env["MIXLAB_RUNS"] = str(runs_root or Path(tempfile.gettempdir()) / "mixlab-runs")
    failures = 0
    with open(log_path, "w") as log:
        def say(text: str) -> None:
            line = f"[{time.time() - t_start:6.1f} s] {text}"
            print(line, flush=True)
            log.write(line + "\n")
            log.flush()

        site = Path(tempfile.gettempdir()) / "site"
        if "whl" in carry and (CARRY / "whl").is_dir():
            installed = install_missing_wheels(CARRY / "whl", site)
            say(f"installed {len(installed)} wheels into {site}: {' '.join(installed) or '-'}")
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(site), str(ROOT),
                                                        env.get("PYTHONPATH")) if p)
        for folder in (f for f in carry if f != "whl"):
            rc = subprocess.run([sys.executable, "-m", "mixlab", "prepare", "--from",
                                 str(CARRY / folder)], env=env, cwd=ROOT, stdout=log,
                                stderr=subprocess.STDOUT).returncode
            say(f"data from .carry/{folder}: " + (f"ready in {env['MIXLAB_DATA']}" if rc == 0 else
                f"FAILED (exit {rc}; was .carry/{folder} named in carry?)"))
            if rc != 0:  # every job needs its data: report, pack nothing, stop
                jobs, failures = [], len(jobs)
        for label, module_args, minutes in jobs:
            left = budget_s - PACK_RESERVE_S - (time.time() - t_start)
            if left < 30:
                say(f"SKIP  {label}: {left:.0f} s left in the call's budget")
                failures += 1
                continue
            argv = [sys.executable, "-m",
                    *(a.format(runs=env["MIXLAB_RUNS"], profile=profile) for a in module_args)]
            if module_args[0] == "mixlab.notebooks":
                argv += ["--profile", profile, *(f"--param={p}" for p in params)]
            argv += ["--quick"] if module_args[0] == "mixlab.bench" and profile == "smoke" else []
            t0 = time.time()
            say(f"start {label}: {' '.join(argv[1:])} (timeout {min(left, 60 * minutes):.0f} s)")
            rc = run_in_own_group(argv, env=env, log=log, timeout=min(left, 60 * minutes))
            failures += rc != 0
            say(f"{'ok   ' if rc == 0 else 'FAIL '} {label}: exit {rc}, {time.time() - t0:.0f} s")
            if rc == "timeout":
                say(f"  {label} ran out of time: its finished epochs are in {env['MIXLAB_RUNS']}; "
                    f"call this stage again at once (the machine stays warm 30 s) to resume")
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
    pk = sub.add_parser("pack", help="fill .carry/ here (wheels for the device, data copies)")
    pk.add_argument("--shared-data", type=Path, default=ROOT.parent / "shared" / "data")
    pk.add_argument("--python-version", default="3.12", help="the device's Python")
    pk.add_argument("--dest", type=Path, default=CARRY)
    sub.add_parser("plan", help="print the device calls, one per stage")
    st = sub.add_parser("stage", help="run one stage (on the device machine)")
    st.add_argument("name", choices=sorted(STAGES))
    st.add_argument("--out", type=Path, required=True, help="$OUT on the device")
    st.add_argument("--profile", default="short", choices=["smoke", "short", "paper"])
    st.add_argument("--budget-s", type=float, default=600, help="the call's time limit")
    st.add_argument("--param", "-p", action="append", default=[], metavar="KEY=VALUE",
                    help="notebook parameter for every notebook job, e.g. "
                         "'variants=[\"base\",\"both\"]' to trim AMP's ablation")
    up = sub.add_parser("unpack", help="extract stage archives into figures/ and results/")
    up.add_argument("archives", nargs="+", type=Path)
    args = p.parse_args(argv)
    if args.command == "pack":
        pack(args.shared_data, args.python_version, args.dest)
    elif args.command == "plan":
        print(plan())
    elif args.command == "stage":
        return stage(args.name, args.out, profile=args.profile, budget_s=args.budget_s,
                     params=args.param)
    else:
        unpack(args.archives)
    return 0


if __name__ == "__main__":
    sys.exit(main())
