"""tools/device_kit.py: the stages that run on an offline GPU machine name real notebooks and
bench rows and fit their time budget, the data is found in every layout mixlab reads, and a stage
packs what it made even when a job fails."""
import importlib.util
import io
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from mixlab import bench

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def kit():
    spec = importlib.util.spec_from_file_location("device_kit", ROOT / "tools" / "device_kit.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_stages_name_real_notebooks_rows_and_carried_folders(kit):
    notebooks = {p.stem for p in (ROOT / "notebooks").glob("*.ipynb")}
    covered = set()
    for name, (carry, jobs) in kit.STAGES.items():
        assert set(carry) <= {"whl", "cifar10", "mnist"} and "whl" in carry, name
        # each stage is sized for the default ten-minute budget (the budget cuts the last job)
        assert sum(limit for *_, limit in jobs) * 60 <= kit.STAGE_BUDGET_S + 60, name
        for label, argv, _ in jobs:
            if argv[0] == "mixlab.notebooks":
                rest = argv[argv.index("--only") + 1:]
                only = [a for a in rest if not a.startswith("--")]
                assert all(a.startswith("--param=") for a in rest if a.startswith("--"))
                assert set(only) <= notebooks, only
                covered |= set(only)
            elif argv[0] == "pytest":
                assert "-m" in argv and "tests" in argv
            else:
                assert argv[0] == "mixlab.bench"
                methods = (argv[argv.index("--methods") + 1].split(",") if "--methods" in argv
                           else None)
                bench.resolve_settings(methods=methods, device="cpu")  # raises on unknown rows
    assert covered == notebooks  # every notebook gets its GPU figures from some stage
    assert "--param=dataset=mnist" in str(kit.STAGES["mnist"])
    assert "mnist" in kit.STAGES["mnist"][0]
    plan = kit.plan()
    for name in kit.STAGES:
        assert f"stage {name} --out $OUT" in plan


def test_slim_wheel_drops_a_folder_and_its_record_lines(kit, tmp_path):
    wheel = tmp_path / "pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("pkg/__init__.py", "x = 1\n")
        z.writestr("pkg/examples/big.pt", b"\0" * 1000)
        z.writestr("pkg-1.0.dist-info/RECORD",
                   "pkg/__init__.py,sha256=a,6\npkg/examples/big.pt,sha256=b,1000\n"
                   "pkg-1.0.dist-info/RECORD,,\n")
    kit.slim_wheel(wheel, "pkg/examples/")
    with zipfile.ZipFile(wheel) as z:
        assert sorted(z.namelist()) == ["pkg-1.0.dist-info/RECORD", "pkg/__init__.py"]
        assert "examples" not in z.read("pkg-1.0.dist-info/RECORD").decode()


def test_only_missing_wheels_are_installed(kit, tmp_path, monkeypatch):
    for name in ("pytest-99.0-py3-none-any.whl", "no_such_dist_xyz-1.0-py3-none-any.whl"):
        (tmp_path / name).write_bytes(b"")
    calls = []
    monkeypatch.setattr(kit.subprocess, "run", lambda argv, **kw: calls.append(argv))
    assert kit.install_missing_wheels(tmp_path, tmp_path / "site") == ["no-such-dist-xyz"]
    assert len(calls) == 1 and calls[0][-1].endswith("no_such_dist_xyz-1.0-py3-none-any.whl")
    assert "--no-index" in calls[0] and "--no-deps" in calls[0]


def test_unpack_takes_figures_and_results_only(kit, tmp_path):
    archive = tmp_path / "stage.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for name in ("figures/a_short.png", "results/bench.json", "mixlab/evil.py",
                     "figures/../../evil.txt"):
            info = tarfile.TarInfo(name)
            info.size = 2
            tar.addfile(info, io.BytesIO(b"ok"))
    root = tmp_path / "checkout"
    root.mkdir()
    assert kit.unpack([archive], root) == ["figures/a_short.png", "results/bench.json"]
    assert (root / "figures" / "a_short.png").read_text() == "ok"
    assert not (root / "mixlab").exists() and not (tmp_path / "evil.txt").exists()


@pytest.mark.slow
def test_a_stage_logs_each_job_and_packs_even_when_one_fails(kit, tmp_path, monkeypatch):
    monkeypatch.setitem(kit.STAGES, "probe", ((), [
        ("works", ["mixlab", "info", "--help"], 1),
        ("breaks", ["mixlab", "no-such-command"], 1),
        ("hangs", ["timeit", "-n", "1", "-r", "1", "__import__('time').sleep(60)"], 0.05)]))
    rc = kit.stage("probe", tmp_path / "out", profile="smoke", budget_s=300,
                   data_root=tmp_path / "data", runs_root=tmp_path / "runs")
    assert rc == 1
    log = (tmp_path / "out" / "probe.log").read_text()
    assert "ok    works: exit 0" in log and "FAIL  breaks: exit 2" in log
    assert "FAIL  hangs: exit timeout, 3 s" in log and "run this stage again" in log
    assert "packed 0 files" in log  # nothing new in figures/ or results/
    with tarfile.open(tmp_path / "out" / "probe.tar.gz") as tar:
        assert tar.getnames() == []
    # a stage with too little budget left skips its jobs instead of overrunning the limit
    assert kit.stage("probe", tmp_path / "late", profile="smoke", budget_s=50) == 1
    assert "SKIP" in (tmp_path / "late" / "probe.log").read_text()


def test_notebook_parameters_reach_the_notebook_jobs(kit, tmp_path, monkeypatch):
    from mixlab.notebooks import parse_param

    assert parse_param('variants=["base","both"]') == ("variants", ["base", "both"])
    assert parse_param("n_eval=500") == ("n_eval", 500)
    assert parse_param("norm=L2") == ("norm", "L2")
    with pytest.raises(Exception, match="KEY=VALUE"):
        parse_param("just-a-word")
    seen = []
    monkeypatch.setattr(kit, "run_in_own_group", lambda argv, **kw: seen.append(argv) or 0)
    monkeypatch.setitem(kit.STAGES, "probe", ((), [
        ("nb", ["mixlab.notebooks", "--only", "quickstart"], 1),
        ("bench", ["mixlab.bench", "--methods", "eval", "--checkpoint", "{runs}/q/{profile}"], 1)]))
    assert kit.stage("probe", tmp_path, profile="short", params=['variants=["base"]'],
                     runs_root=tmp_path / "runs") == 0
    assert seen[0][-3:] == ["--profile", "short", '--param=variants=["base"]']
    assert seen[1][-1] == f"{tmp_path / 'runs'}/q/short"  # placeholders filled, no --param


def test_missing_carried_data_fails_the_stage_with_a_hint(kit, tmp_path, monkeypatch):
    monkeypatch.setattr(kit, "CARRY", tmp_path / "no-carry")
    ran = []
    monkeypatch.setattr(kit, "run_in_own_group", lambda argv, **kw: ran.append(argv) or 0)
    monkeypatch.setitem(kit.STAGES, "probe", (("cifar10",), [("nb", ["mixlab.notebooks"], 1)]))
    assert kit.stage("probe", tmp_path / "out", data_root=tmp_path / "data") == 1
    assert ran == []  # no job runs without its data
    assert "copy .carry/cifar10" in (tmp_path / "out" / "probe.log").read_text()


def test_plan_marks_the_stages_whose_gpu_results_exist(kit, tmp_path):
    assert set(kit.STAGE_RESULTS) == set(kit.STAGES) - {"tests"}
    assert "[to do]" in kit.plan(tmp_path) and "[done" not in kit.plan(tmp_path)
    (tmp_path / "figures").mkdir()
    (tmp_path / "figures" / "amp_paths_short.png").write_bytes(b"")
    (tmp_path / "figures" / "gairat_curves_smoke.png").write_bytes(b"")  # smoke: not a GPU run
    lines = {line.split("stage ")[1].split()[0]: line
             for line in kit.plan(tmp_path).splitlines()[1:]}
    assert "[done: 1 files]" in lines["amp"] and "[to do]" in lines["gairat"]
    assert "[log only]" in lines["tests"]


def test_data_is_found_in_every_layout_and_placed_once(kit, tmp_path, monkeypatch):
    mnist_names = list(kit.MNIST_FILES)
    # torchvision's layouts
    tv = tmp_path / "tv"
    (tv / "cifar-10-batches-py").mkdir(parents=True)
    (tv / "MNIST" / "raw").mkdir(parents=True)
    for name in mnist_names:
        (tv / "MNIST" / "raw" / name).write_bytes(b"x")
    assert kit.find_cifar10(tv) == ("torchvision", tv / "cifar-10-batches-py")
    assert [f.name for f in kit.find_mnist(tv)] == mnist_names
    assert kit.data_present("cifar10", tv) and kit.data_present("mnist", tv)
    # an image-folder tree one folder down, and gzipped MNIST: packed, not yet usable
    folder = tmp_path / "folder"
    for split in ("train", "test"):
        (folder / "cifar10" / "copy" / split / "cat").mkdir(parents=True)
        (folder / "cifar10" / "copy" / split / "cat" / "0.png").write_bytes(b"png")
    (folder / "cifar10" / "copy" / "train.pt").write_bytes(b"cache")
    (folder / "MNIST" / "raw").mkdir(parents=True)
    for name in mnist_names:
        (folder / "MNIST" / "raw" / f"{name}.gz").write_bytes(b"gz")
    assert kit.find_cifar10(folder) == ("folder", folder / "cifar10" / "copy")
    assert not kit.data_present("mnist", folder)
    archive = tmp_path / "cifar10-jpeg.tar.gz"
    kit.tar_image_folder(folder / "cifar10" / "copy", archive)
    with tarfile.open(archive) as tar:
        assert sorted(tar.getnames()) == ["test/cat/0.png", "train/cat/0.png"]
    assert kit.find_cifar10(tmp_path) == ("archive", archive)
    assert kit.find_cifar10(tmp_path / "nothing") is None
    # placing torchvision's layout copies it; data already there is left alone
    prepared = []
    done = type("Done", (), {"returncode": 0})
    monkeypatch.setattr(kit.subprocess, "run", lambda argv, **kw: prepared.append(argv) or done)
    root = tmp_path / "root"
    with open(tmp_path / "log", "w") as log:
        assert kit.place_data("cifar10", tv, root, env={}, log=log) is None
        assert kit.place_data("mnist", tv, root, env={}, log=log) is None
        assert (root / "cifar-10-batches-py").is_dir() and kit.data_present("mnist", root)
        assert len(prepared) == 2
        assert kit.place_data("mnist", tmp_path / "absent", root, env={}, log=log) is None
        assert len(prepared) == 2  # present: nothing copied, nothing prepared


def test_plan_prints_commands_for_the_gpu_machine(kit):
    plan = kit.plan()
    assert plan.splitlines()[0].startswith("# ")
    for line in plan.splitlines()[1:]:
        assert line.startswith("python3 tools/device_kit.py stage ") and "needs .carry/whl" in line
