"""The benchmark runs end to end on a CPU (``--quick``) and writes well-formed JSON with every row
and ratio. No test here asserts a speed: speeds are only ever claimed from a GPU run."""
import json

import pytest
import torch
import torch.nn.functional as F

from mixlab import bench, bench_reference, bench_report
from mixlab.data import Batch
from mixlab.methods import METHODS, AttackSpec, Method
from mixlab.train import train_step

CORE_ROWS = ("ceiling", "reference", "erm", "mixup", "pgd_at", "data_path")


def _strict_json(path):
    """Parse as strict JSON: NaN / Infinity are not JSON and fail here."""
    def refuse(name):
        raise ValueError(f"{path} holds {name}, which is not JSON")
    return json.loads(path.read_text(), parse_constant=refuse)


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """One `python -m mixlab.bench --quick` run, shared by the tests below (about 20 s)."""
    out = tmp_path_factory.mktemp("bench")
    rc = bench.main(["--quick", "--dataset", "synthetic", "--out", str(out)])
    files = sorted(out.glob("bench-cpu-*-quick.json"))
    assert len(files) == 1, f"expected one result file in {out}, found {files}"
    return rc, _strict_json(files[0])


@pytest.mark.slow
def test_quick_run_writes_every_row_and_ratio(quick):
    rc, result = quick
    assert result["kind"] == "mixlab-bench" and result["device"] == "cpu"
    assert "CPU" in result["label"] and result["data"]["synthetic"] is True
    assert result["config"]["quick"] is True and result["config"]["arch"] == "tiny"
    for key in ("git_commit", "torch", "torchvision", "python", "device_name"):
        assert result["provenance"][key], key
    rows = result["rows"]
    # every registered method is a row, whoever wrote it and whenever it landed
    assert set(rows) == set(CORE_ROWS) | set(METHODS)
    for name in CORE_ROWS:
        assert "error" not in rows[name], rows[name].get("traceback")
    for name, row in rows.items():
        if "error" in row:  # a method being written elsewhere may fail; it must say so
            assert isinstance(row["error"], str) and row["error"]
            continue
        assert row["img_per_s"] > 0 and row["peak_mem_mib"] is None  # no GPU: no memory
        if name not in ("data_path", "reference"):  # the cost model of every method row
            assert row["passes"]["forward_equivalents"] >= 3, name
        if name != "data_path":
            assert row["steps"] == 2 and row["repeats"] == 2 and row["finite"] is True
    assert rc == (1 if any("error" in r for r in rows.values()) else 0)
    ratios = result["ratios"]
    ok = [n for n in rows if "error" not in rows[n] and n not in ("ceiling", "data_path")]
    for name in ok:
        assert ratios["vs_ceiling"][name] > 0 and ratios["vs_pgd_at"][name] > 0
    assert ratios["vs_pgd_at"]["pgd_at"] == pytest.approx(1.0)
    assert ratios["pgd_at_vs_reference"] > 0
    assert ratios["data_path_overhead"] == pytest.approx(rows["data_path"]["overhead"])
    assert 0 < rows["data_path"]["loader_share"] < 1  # making a batch costs less than a step
    assert result["eval"]["pgd20"]["img_per_s"] > 0 and result["eval"]["pgd20"]["n"] == 64
    assert "skipped" in result["eval"]["aa"]
    assert "targets" not in result  # measurements and ratios only


def test_table_prints_measurements_and_ratios_only():
    """The table shows speeds and ratios; no goals and no verdicts (docs/benchmark.md holds
    the reference speeds)."""
    rows = {"pgd_at": {"img_per_s": 9000.0, "ms_per_step": 56.9, "batch_size": 512}}
    r = dict(vs_ceiling={}, vs_pgd_at={"pgd_at": 1.0}, pgd_at_vs_reference=2.0,
             data_path_overhead=None)
    result = dict(rows=rows, ratios=r, config={"arch": "preactresnet18"}, eval={},
                  device="cuda", label="GPU run", device_name="GPU", provenance={},
                  data={"dataset": "cifar10"}, date="2026-01-01")
    table = bench_report.format_bench_table(result)
    assert "9000.0" in table and "pgd_at / reference: 2.00 (x)" in table
    for word in ("target", "goal", " met", "NOT"):
        assert word not in table, word


@pytest.mark.slow
def test_table_names_every_row(quick, capsys):
    _, result = quick
    table = bench_report.format_bench_table(result)
    for name in result["rows"]:
        assert f"\n{name} " in table
    assert "CPU" in table.splitlines()[0]


class _Probe(Method):
    """A method the bench has never heard of: it must become a row with its own
    hyperparameters and the bench's threat model (PGD steps) as its ``attack``."""
    name = "bench_probe"
    defaults = {"width": 7}   # its own hyperparameter: no name shared with the engine's
    attacks_seen: list = []   # the AttackSpec of every step, read by the test

    def loss(self, model, x, y, idx, *, epoch):
        type(self).attacks_seen.append(self.attack)
        logits = model(x)
        return F.cross_entropy(logits.float(), y), logits


class _Broken(Method):
    name = "bench_broken"
    defaults = {}

    def loss(self, model, x, y, idx, *, epoch):
        raise RuntimeError("half-written method")


def test_new_methods_are_picked_up_and_failures_recorded(monkeypatch, tmp_path):
    monkeypatch.setitem(METHODS, "bench_probe", _Probe)
    monkeypatch.setitem(METHODS, "bench_broken", _Broken)
    monkeypatch.setattr(_Probe, "attacks_seen", [])
    torch.set_num_threads(2)  # the bench runs on one CPU thread and gives the setting back
    result = bench.run_bench(quick=True, dataset="synthetic", train_n=128, batch_size=16,
                             steps=1, pgd_steps=2,
                             methods=["ceiling", "pgd_at", "bench_probe", "bench_broken"])
    assert torch.get_num_threads() == 2 and result["config"]["threads"] == 1
    torch.set_num_threads(1)
    rows = result["rows"]
    assert list(rows) == ["ceiling", "pgd_at", "bench_broken", "bench_probe"]
    # the method's own hyperparameters are its row's hp; the bench's PGD steps reach it only
    # as attack.steps (pgd_at's hp are its own table's defaults, with no PGD setting in it)
    assert rows["bench_probe"]["hp"] == {"width": 7}
    assert rows["pgd_at"]["hp"] == METHODS["pgd_at"].defaults
    assert _Probe.attacks_seen and {a.steps for a in _Probe.attacks_seen} == {2}
    assert {a.eps for a in _Probe.attacks_seen} == {8 / 255}  # the dataset's threat model
    assert "half-written method" in rows["bench_broken"]["error"]
    assert result["ratios"]["vs_pgd_at"]["bench_probe"] > 0
    assert "bench_broken" not in result["ratios"]["vs_pgd_at"]
    assert result["eval"] == {}  # not asked for
    path = bench_report.write_result(result, tmp_path)
    assert path.name.startswith("bench-cpu-") and path.name.endswith("-quick.json")
    _strict_json(path)


def test_settings_and_names():
    assert bench.device_slug(torch.device("cpu")) == "cpu"
    with pytest.raises(ValueError, match="unknown row"):
        bench.resolve_settings(methods=["no_such_method"])
    with pytest.raises(ValueError, match="unknown bench setting"):
        bench.resolve_settings(batch=3)
    cfg = bench.resolve_settings(device="cpu")
    assert cfg["bf16"] is False and cfg["channels_last"] is False  # the engine's CPU defaults
    assert cfg["clock"] == "process"  # a shared CPU: other jobs' load stays out of the figures
    with pytest.raises(ValueError, match="clock"):
        bench.resolve_settings(device="cpu", clock="sundial")
    assert cfg["arch"] == "preactresnet18" and cfg["pgd_steps"] == 10
    result = dict(device="cpu", date="2026-01-02", config=dict(arch="wrn-32-10", quick=False))
    output_path = bench_report.output_path
    assert output_path(result, "results").name == "bench-cpu-2026-01-02-wrn-32-10.json"
    assert output_path(result, "x/y.json").as_posix() == "x/y.json"
    result["config"].update(compile=True, arch="preactresnet18")
    assert output_path(result, "results").name == "bench-cpu-2026-01-02-compile.json"
    r = bench_report.ratios({"pgd_at": {"img_per_s": 10.0}, "reference": {"img_per_s": 2.0}})
    assert r["pgd_at_vs_reference"] == 5.0 and r["vs_ceiling"]["pgd_at"] is None


def test_reference_pgd_stays_in_the_ball():
    """The reference attack is a faithful PGD (it is slow on purpose, not wrong)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 10))
    x = torch.rand(4, 3, 8, 8)
    y = torch.randint(0, 10, (4,))
    x_adv, kappa = bench_reference.reference_pgd(model, x, y, eps=8 / 255, step_size=2 / 255,
                                                 steps=3)
    assert (x_adv - x).abs().max() <= 8 / 255 + 1e-6
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert kappa.shape == (4,) and ((kappa >= 0) & (kappa <= 3)).all()


def test_pass_counts_are_the_cost_model_of_each_method():
    """PassCounter sees what each method's step asks of the model: PGD-AT with k steps is k
    attack passes and one training pass; MMA adds a training pass on the clean batch and one
    probe at the PGD point plus one per bisection step."""
    from mixlab.methods import get_method
    from mixlab.models import build_model

    torch.manual_seed(0)
    model = build_model("tiny", 10, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y, idx = torch.rand(8, 3, 32, 32), torch.randint(0, 10, (8,)), torch.arange(8)
    batch = Batch(x=x, y=y, idx=idx)

    def passes(name, steps=10, **hp):
        method = get_method(name)(num_train=8, num_classes=10, epochs=1,
                                  attack=AttackSpec(steps=steps), **hp)

        def step(b):  # the engine's own step, as the bench times it
            return train_step(method, model, opt, b, epoch=0, bf16=False)[0]
        return bench.count_passes(step, iter([batch] * 2), model, steps=2)

    at = passes("pgd_at", steps=3)
    assert at == dict(train=1, attack=3, probe=0, backward=4, forward_equivalents=9)
    mma = passes("mma", steps=3, search_steps=4)  # AN-PGD's steps are attack.steps
    assert mma == dict(train=2, attack=3, probe=5, backward=5, forward_equivalents=17)
    assert passes("erm")["forward_equivalents"] == 3
    rows = {"pgd_at": {"img_per_s": 10.0, "passes": at}, "mma": {"img_per_s": 5.0, "passes": mma}}
    assert bench_report.ratios(rows)["predicted_vs_pgd_at"]["mma"] == pytest.approx(9 / 17)


@pytest.mark.slow
def test_compiled_rows_run_on_cpu_and_count_passes_on_the_eager_model(tmp_path):
    """The bench's --compile path (a GPU setting) runs on a CPU too: rows time the
    compiled model, pass counts come from the eager one, the result file says -compile."""
    result = bench.run_bench(quick=True, compile=True, dataset="synthetic", train_n=64,
                             batch_size=16, steps=1, repeats=1, pgd_steps=2,
                             methods=["ceiling", "pgd_at"])
    rows = result["rows"]
    for name in ("ceiling", "pgd_at"):
        assert "error" not in rows[name], rows[name].get("traceback")
        assert rows[name]["finite"] is True
    assert rows["ceiling"]["compile"] is True
    assert rows["pgd_at"]["passes"] == dict(train=1, attack=2, probe=0, backward=3,
                                            forward_equivalents=7)
    assert bench_report.write_result(result, tmp_path).name.endswith("-compile-quick.json")
