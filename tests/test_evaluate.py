"""Evaluation protocol: worst case per example, fp32, AutoAttack (custom lists, its own
warnings), the masking report, tables, input checks and a result that survives a failed write."""
import errno
import json
import logging
import typing
import warnings

import pytest
import torch
import torch.nn as nn

import mixlab.evaluate as ev
from mixlab.evaluate import (AA_ATTACKS, capture_autoattack_warnings, evaluate, format_report,
                             format_table, load_result, masking_report, robust_accuracy_curve,
                             save_result)
from mixlab.models import build_model


@pytest.fixture(scope="module")
def model_and_data():
    torch.manual_seed(0)
    model = build_model("tiny", 10, 3).eval()
    x = torch.rand(24, 3, 32, 32)
    with torch.no_grad():
        y = model(x).argmax(1)  # clean accuracy 1 by construction
    return model, x, y


class GridDetector(nn.Module):
    """Class 0 for images on the 8-bit grid (every pixel k/255, as clean data is), class 1 off
    it. Its input gradient is zero, so PGD stays at its random start (off the grid) and FGSM at
    x: the textbook obfuscated model, where an "attack" flips the prediction for reasons that
    have nothing to do with the label."""

    def forward(self, x):
        offset = (x * 255 - (x * 255).round()).abs().flatten(1).amax(1)
        off_grid = (offset > 1e-3).float()
        z = 10 * off_grid - 5 + 0 * x.flatten(1).sum(1)  # 0 * ...: an input gradient exists
        return torch.stack([-z, z], 1)


def grid_images(n):
    g = torch.Generator().manual_seed(3)
    return torch.randint(16, 240, (n, 3, 8, 8), generator=g).float() / 255  # no clamping at eps


# ----------------------------------------------------------------------------- results
def test_evaluate_all_batched_attacks(model_and_data, tmp_path):
    model, x, y = model_and_data
    res = evaluate(model, x, y, attacks=("clean", "fgsm", "pgd20", "cw20"), eps=8 / 255,
                   batch_size=10, run_dir=tmp_path)
    assert res["clean"] == 1.0 and res["n"] == 24
    assert res["attacks"] == ["clean", "fgsm", "pgd20", "cw20"]
    assert all(0 <= res[a] <= res["clean"] for a in ("fgsm", "pgd20", "cw20"))
    assert res["robust"] <= min(res[a] for a in res["attacks"])
    per = res["per_example"]
    assert set(per) == {"clean", "fgsm", "pgd20", "cw20", "robust"}
    assert all(len(v) == 24 and all(isinstance(b, bool) for b in v) for v in per.values())
    assert per["robust"] == [all(per[a][i] for a in res["attacks"]) for i in range(24)]
    assert res["pgd20"] == sum(per["pgd20"]) / 24
    assert res["warnings"] == masking_report(res)
    saved = load_result(tmp_path / "eval.json")
    assert saved == json.loads(json.dumps(res)) and res["saved_to"] == str(tmp_path / "eval.json")
    assert [p.name for p in tmp_path.iterdir()] == ["eval.json"]  # no temporary file left
    # one line per per-example list, not one line per bool
    assert len((tmp_path / "eval.json").read_text().splitlines()) < 60


def test_worst_case_is_the_per_example_minimum_with_clean():
    """A clean-wrong example that an attack pushes into its class is not robust, and each
    attack alone can look better than the worst case."""
    model, x = GridDetector(), grid_images(4)
    y = torch.tensor([1, 0, 1, 0])  # clean predictions are all 0, PGD's all 1
    res = evaluate(model, x, y, attacks=("pgd20",), eps=8 / 255)
    assert res["per_example"]["clean"] == [False, True, False, True]
    assert res["per_example"]["pgd20"] == [True, False, True, False]
    assert res["clean"] == 0.5 and res["pgd20"] == 0.5
    assert res["robust"] == 0.0
    assert res["per_example"]["robust"] == [False] * 4
    # FGSM's zero-gradient step leaves x on the grid: same as clean, so examples 1 and 3
    # survive FGSM, yet none survives both FGSM and PGD
    res = evaluate(model, x, y, attacks=("fgsm", "pgd20"), eps=8 / 255)
    assert res["fgsm"] == 0.5 and res["robust"] == 0.0


def test_attack_above_clean_is_flagged_on_the_obfuscated_model():
    model, x = GridDetector(), grid_images(3)
    y = torch.tensor([1, 1, 0])  # clean 1/3, PGD 2/3
    res = evaluate(model, x, y, attacks=("pgd20",), eps=8 / 255)
    assert res["pgd20"] > res["clean"] and res["robust"] == 0.0
    assert len(res["warnings"]) == 1 and "above clean" in res["warnings"][0]


def test_fp32_and_eval_mode_everywhere_even_inside_autocast(model_and_data, monkeypatch):
    model, x, y = model_and_data

    class Spy(nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net, self.calls = net, []

        def forward(self, inp):
            out = self.net(inp)
            self.calls.append((torch.is_autocast_enabled("cpu"), self.training, out.dtype))
            return out

    spy = Spy(model).train()
    bf16_flags = []

    def recording(fn):
        def wrapped(*args, **kwargs):
            bf16_flags.append(kwargs.get("bf16"))
            return fn(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(ev, "pgd", recording(ev.pgd))
    monkeypatch.setattr(ev, "fgsm", recording(ev.fgsm))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        res = evaluate(spy, x[:8], y[:8], eps=8 / 255, aa_attacks=["apgd-ce"], batch_size=8)
    assert set(res["attacks"]) == {"clean", "fgsm", "pgd20", "cw20", "aa"}
    assert bf16_flags and all(flag is False for flag in bf16_flags)  # fgsm, pgd20, cw20
    assert len(spy.calls) > 50  # the attacks' forwards, AutoAttack's included
    assert {c[0] for c in spy.calls} == {False}, "a forward ran under autocast"
    assert {c[1] for c in spy.calls} == {False}, "a forward ran in train mode"
    assert {c[2] for c in spy.calls} == {torch.float32}
    assert spy.training  # mode restored


def test_caller_rng_untouched_and_attacks_seeded_one_by_one(model_and_data):
    model, x, y = model_and_data
    torch.manual_seed(123)
    state = torch.get_rng_state()
    alone = evaluate(model, x, y, attacks=("pgd20",), eps=4 / 255)
    assert torch.equal(torch.get_rng_state(), state)
    after_others = evaluate(model, x, y, attacks=("fgsm", "cw20", "pgd20"), eps=4 / 255)
    assert after_others["per_example"]["pgd20"] == alone["per_example"]["pgd20"]


def test_eps_zero_means_every_attack_is_clean(model_and_data):
    model, x, y = model_and_data
    res = evaluate(model, x[:6], y[:6], eps=0.0)  # AutoAttack included: nothing can move
    assert all(res[a] == res["clean"] == res["robust"] for a in res["attacks"])
    assert res["warnings"] == []


# ----------------------------------------------------------------------------- AutoAttack
def test_standard_autoattack_on_tiny_model(model_and_data):
    model, x, y = model_and_data
    res = evaluate(model, x[:8], y[:8], attacks=("clean", "aa"), eps=8 / 255, batch_size=8)
    assert 0 <= res["aa"] <= res["clean"] and res["robust"] == res["aa"]
    assert res["aa"] < 1.0  # an untrained net is not robust at 8/255
    assert res["aa_version"] == "standard"
    assert res["aa_attacks"] == ["apgd-ce", "apgd-t", "fab-t", "square"]


def test_custom_autoattack_list_runs_with_the_standard_budget(model_and_data, monkeypatch):
    import pyautoattack
    model, x, y = model_and_data
    seen = []
    run = pyautoattack.AutoAttack.run_standard_evaluation

    def spy(self, *args, **kwargs):
        seen.append(self)
        return run(self, *args, **kwargs)

    monkeypatch.setattr(pyautoattack.AutoAttack, "run_standard_evaluation", spy)
    res = evaluate(model, x[:8], y[:8], attacks=("aa",), aa_attacks=["apgd-ce", "apgd-t"],
                   eps=2 / 255, batch_size=8)
    attack, = seen
    assert attack.version == "custom" and attack.attacks_to_run == ["apgd-ce", "apgd-t"]
    assert attack.apgd.n_restarts == 1 and attack.apgd_targeted.n_target_classes == 9
    assert res["aa_version"] == "custom" and res["aa_attacks"] == ["apgd-ce", "apgd-t"]
    assert res["attacks"] == ["clean", "aa"] and res["robust"] <= res["aa"]


def test_known_autoattack_names_match_the_package():
    from pyautoattack.autoattack import AttackName
    assert set(AA_ATTACKS) == set(typing.get_args(AttackName))


@pytest.mark.parametrize("kwargs, match", [
    (dict(aa_attacks=["apgd-ce", "apgd-xx"]), r"apgd-xx.*'apgd-ce', 'apgd-dlr'"),
    (dict(aa_attacks=[]), r"non-empty list"),
    (dict(aa_attacks=["apgd-ce"], aa_version="plus"), r"aa_version='plus'.*not both"),
    (dict(aa_attacks=["apgd-ce"], attacks=("clean", "pgd20")), r"'aa' is not in attacks"),
    (dict(aa_version="fast"), r"'fast'.*standard"),
])
def test_bad_autoattack_settings(model_and_data, kwargs, match):
    model, x, y = model_and_data
    with pytest.raises(ValueError, match=match):
        evaluate(model, x, y, **kwargs)


def test_autoattack_warnings_are_captured_from_a_softmax_model(model_and_data):
    model, x, y = model_and_data
    probs = nn.Sequential(model, nn.Softmax(dim=1)).eval()
    res = evaluate(probs, x[:8], y[:8], attacks=("aa",), aa_attacks=["apgd-ce"], eps=8 / 255,
                   batch_size=8)
    assert any("probability distribution" in w for w in res["aa_warnings"])
    assert any(w.startswith("AutoAttack's own check") and "probability distribution" in w
               for w in res["warnings"])
    assert "probability distribution" in format_report(res)


def test_capture_takes_both_channels_even_from_a_silenced_logger():
    from pyautoattack import checks
    probs = lambda t: torch.softmax(t.flatten(1)[:, :10], 1)  # noqa: E731
    x = torch.rand(4, 3, 8, 8)
    logger = logging.getLogger("auto-attack")
    logger.setLevel(logging.ERROR)  # as a notebook might, to quieten the package
    try:
        with capture_autoattack_warnings() as messages:
            checks.check_range_output(probs, x, logger=logger)     # the logger channel
            checks.check_range_output(probs, x)                    # the warnings.warn channel
    finally:
        logger.setLevel(logging.NOTSET)
    assert len(messages) == 2 and all("probability distribution" in m for m in messages)
    assert logger.level == logging.NOTSET and not logger.handlers


def test_unrelated_warnings_pass_through_the_capture():
    with pytest.warns(UserWarning, match="unrelated"):
        with capture_autoattack_warnings() as messages:
            warnings.warn("unrelated", UserWarning)
    assert messages == []


# ----------------------------------------------------------------------------- masking report
HONEST = {"clean": 0.84, "fgsm": 0.56, "pgd20": 0.51, "cw20": 0.49, "aa": 0.47, "robust": 0.47}


def test_an_honest_result_raises_no_flag():
    assert masking_report(HONEST) == []
    assert masking_report(HONEST, curve=[0.84, 0.70, 0.51, 0.30]) == []
    assert format_report(HONEST) == "masking report: clean"


@pytest.mark.parametrize("change, needle", [
    (dict(cw20=0.90), "above clean"),                       # broken attack
    (dict(aa=0.85), "above clean"),
    (dict(aa=0.51 - 0.11), "AutoAttack"),                   # gap > MASKING_GAP
    (dict(cw20=0.51 - 0.06, aa=0.45), "CW-20"),             # gap > CW_GAP
    (dict(fgsm=0.51 - 0.03), "FGSM"),                       # fgsm < pgd20 - FGSM_GAP
    (dict(aa_warnings=["there are 3 points with zero gradient!"]), "zero gradient"),
])
def test_each_flag_fires_alone(change, needle):
    flags = masking_report({**HONEST, **change})
    assert len(flags) == 1 and needle in flags[0], flags
    assert format_report({**HONEST, **change}).startswith("masking report: 1 flag(s)")


@pytest.mark.parametrize("change", [
    dict(aa=0.51 - 0.09), dict(cw20=0.51 - 0.04, aa=0.45), dict(fgsm=0.51 - 0.01),
    dict(cw20=0.84), dict(aa_warnings=[]),
])
def test_no_flag_just_inside_each_threshold(change):
    assert masking_report({**HONEST, **change}) == []


def test_curve_flags():
    assert "rises with eps" in " ".join(masking_report({}, curve=[0.8, 0.5, 0.6]))
    assert masking_report({}, curve=[0.8, 0.5, 0.51]) == []
    # a mapping is read in eps order: 0 -> 4/255 -> 8/255 is 0.8, 0.5, 0.6
    flags = masking_report({}, curve={0: 0.8, 8 / 255: 0.6, 4 / 255: 0.5})
    assert len(flags) == 1 and "eps 0.03137" in flags[0]
    assert masking_report({}, curve={0: 0.8, 8 / 255: 0.3, 4 / 255: 0.5}) == []


# ----------------------------------------------------------------------------- curves, tables
def test_eps_zero_curve_point_is_clean_accuracy(model_and_data):
    model, x, y = model_and_data
    curve = robust_accuracy_curve(model, x, y, eps_list=[0, 2 / 255, 8 / 255], attack="fgsm")
    assert curve[0] == 1.0 and curve[2] <= curve[0]
    with pytest.raises(ValueError, match="'aa'"):
        robust_accuracy_curve(model, x, y, eps_list=[0], attack="aa")


def test_format_table():
    table = format_table({"pgd_at": {"clean": 0.8, "pgd20": 0.5}})
    assert "| pgd_at | 80.00 | 50.00 |" in table


def test_format_table_worst_case_for_selected_and_last_checkpoint():
    rows = {"selected": {**HONEST, "n": 1000},
            "last": {"clean": 0.86, "pgd20": 0.44, "aa": 0.41, "robust": 0.41, "n": 1000}}
    lines = format_table(rows).splitlines()
    assert lines[0] == "| model | clean | FGSM | PGD-20 | CW-20 | AutoAttack | worst case | n |"
    assert lines[2] == "| selected | 84.00 | 56.00 | 51.00 | 49.00 | 47.00 | 47.00 | 1000 |"
    assert lines[3] == "| last | 86.00 | – | 44.00 | – | 41.00 | 41.00 | 1000 |"
    with pytest.raises(TypeError, match="name: result"):
        format_table(HONEST)


# ----------------------------------------------------------------------------- input checks
BAD_INPUTS = {  # name: (overrides of a valid call from (x, y), exception, message regex)
    "uint8": (lambda x, y: dict(x=(x * 255).to(torch.uint8)), TypeError,
              r"uint8.*x\.float\(\) / 255"),
    "0-255 floats": (lambda x, y: dict(x=x * 255), ValueError, r"\[0, 1\].*0-255.*x / 255"),
    "normalised": (lambda x, y: dict(x=x * 3 - 1), ValueError, r"x has values in \[-1, 2\]"),
    "nan pixels": (lambda x, y: dict(x=torch.full_like(x, float("nan"))), ValueError, r"NaN"),
    "one image": (lambda x, y: dict(x=x[0]), ValueError, r"shape \(3, 32, 32\).*\(N, C, H, W\)"),
    "empty": (lambda x, y: dict(x=x[:0], y=y[:0]), ValueError, r"N = 0"),
    "numpy x": (lambda x, y: dict(x=x.numpy()), TypeError, r"ndarray"),
    "int32 y": (lambda x, y: dict(y=y.int()), TypeError, r"torch\.int32.*y\.long\(\)"),
    "soft y": (lambda x, y: dict(y=y.float()), TypeError, r"torch\.float32.*hard labels"),
    "short y": (lambda x, y: dict(y=y[:-1]), ValueError, r"shape \(23,\) for x of shape \(24, "),
    "label 10": (lambda x, y: dict(y=torch.where(torch.arange(24) == 5, 10, y)), ValueError,
                 r"label 10 .* 10 classes"),
    "label -1": (lambda x, y: dict(y=torch.where(torch.arange(24) == 5, -1, y)), ValueError,
                 r"label -1"),
    "eps nan": (lambda x, y: dict(eps=float("nan")), ValueError, r"eps=nan"),
    "eps < 0": (lambda x, y: dict(eps=-0.1), ValueError, r"eps must be >= 0, got eps=-0\.1"),
    "eps 8": (lambda x, y: dict(eps=8), ValueError, r"eps=8 is outside \[0, 1\].*8/255"),
    "eps inf": (lambda x, y: dict(eps=float("inf"), norm="L2"), ValueError, r"eps=inf"),
    "eps tensor": (lambda x, y: dict(eps=torch.tensor(8 / 255)), TypeError,
                   r"eps must be a number.*Tensor"),
    "norm": (lambda x, y: dict(norm="L1"), ValueError, r"'L1'"),
    "attack name": (lambda x, y: dict(attacks=("clean", "deepfool")), ValueError, r"deepfool"),
    "attacks str": (lambda x, y: dict(attacks="pgd20"), TypeError, r"attacks=\('pgd20',\)"),
    "batch 0": (lambda x, y: dict(batch_size=0), ValueError,
                r"batch_size must be >= 1, got batch_size=0"),
    "batch float": (lambda x, y: dict(batch_size=2.5), TypeError, r"batch_size.*float 2\.5"),
    "name": (lambda x, y: dict(name="a/b"), ValueError, r"name='a/b'"),
    "bf16 model": (lambda x, y: dict(model=build_model("tiny", 10, 3).to(torch.bfloat16)),
                   TypeError, r"bfloat16.*model\.float\(\)"),
    "7 classes": (lambda x, y: dict(model=build_model("tiny", 7, 3),
                                    y=torch.where(torch.arange(24) == 0, 8, y)),
                  ValueError, r"label 8 but the model has 7 classes"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_every_input_error_is_one_clear_exception_before_anything_runs(case, model_and_data,
                                                                         tmp_path, monkeypatch):
    model, x, y = model_and_data
    override, exc, match = BAD_INPUTS[case]

    def must_not_run(*args, **kwargs):
        raise AssertionError("an attack ran before the inputs were checked")

    monkeypatch.setattr(ev, "pgd", must_not_run)
    monkeypatch.setattr(ev, "fgsm", must_not_run)
    monkeypatch.setattr(ev, "_autoattack", must_not_run)
    run_dir = tmp_path / "run"
    call = {"model": model, "x": x, "y": y, "run_dir": run_dir, **override(x, y)}
    with pytest.raises(exc, match=match):
        evaluate(call.pop("model"), call.pop("x"), call.pop("y"), **call)
    assert not run_dir.exists()


def test_labels_beyond_model_num_classes(model_and_data):
    model, x, y = model_and_data
    net = build_model("tiny", 10, 3)
    net.num_classes = 12  # declared and actual logits disagree
    with pytest.raises(ValueError, match="num_classes is 12 but the model outputs 10"):
        evaluate(net, x, y, attacks=("clean",))


# ----------------------------------------------------------------------------- failed writes
def test_a_failed_write_returns_the_result_and_says_so(model_and_data, tmp_path, monkeypatch):
    model, x, y = model_and_data

    def read_only(path, text):
        raise OSError(errno.EROFS, "Read-only file system", str(path))

    monkeypatch.setattr(ev, "atomic_write_text", read_only)
    with pytest.warns(RuntimeWarning, match="could not be written"):
        res = evaluate(model, x, y, attacks=("fgsm",), run_dir=tmp_path, name="ro")
    assert res["fgsm"] <= res["clean"] == 1.0  # the numbers are all there
    assert res["saved_to"] is None and "Read-only file system" in res["save_error"]
    assert res["warnings"] == masking_report(res)  # masking flags only: a full disk is not one
    assert "not saved:" in format_report(res) and "Read-only" in format_report(res)
    monkeypatch.undo()
    save_result(res, tmp_path / "elsewhere.json")
    assert load_result(tmp_path / "elsewhere.json") == json.loads(json.dumps(res))


def test_a_file_in_the_way_of_run_dir_is_warned_early_and_the_result_kept(model_and_data,
                                                                           tmp_path):
    model, x, y = model_and_data
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("x")
    with pytest.warns(RuntimeWarning) as record:
        res = evaluate(model, x, y, attacks=("clean",), run_dir=blocker / "run")
    messages = [str(w.message) for w in record]
    assert any("not a writable folder" in m for m in messages)  # before the attacks
    assert any("could not be written" in m for m in messages)   # after them
    assert res["clean"] == 1.0 and res["saved_to"] is None


# ----------------------------------------------------------------------------- progress
class RecordingBar:
    """Stands in for tqdm: records what the progress handler sets."""

    def __init__(self, *args, **kwargs):
        self.kwargs, self.total, self.n = kwargs, kwargs.get("total"), 0
        self.descriptions, self.postfixes, self.positions, self.closed = [], [], [], False

    def __iter__(self):  # the batched attacks iterate over their batch starts
        for item in self.kwargs.get("iterable") or self.iterable:
            self.n += 1
            self.positions.append(self.n)
            yield item

    def set_description(self, text):
        self.descriptions.append(text)

    def reset(self, total=None):
        self.total, self.n = total, 0

    def refresh(self):
        self.positions.append((self.n, self.total))

    def set_postfix_str(self, text):
        self.postfixes.append(text)

    def close(self):
        self.closed = True


@pytest.fixture
def recorded_bars(monkeypatch):
    import tqdm.auto
    bars = []

    def make(iterable=None, *args, **kwargs):
        bar = RecordingBar(**kwargs)
        bar.iterable = iterable
        bars.append(bar)
        return bar

    monkeypatch.setattr(tqdm.auto, "tqdm", make)
    return bars


def test_progress_bars_follow_every_batch_and_autoattack_stage(model_and_data, recorded_bars):
    model, x, y = model_and_data
    quiet = evaluate(model, x[:12], y[:12], attacks=("clean", "pgd20", "aa"), eps=8 / 255,
                     batch_size=5, aa_attacks=["apgd-ce"], progress=False)
    assert recorded_bars == []  # progress=False: no bar at all
    loud = evaluate(model, x[:12], y[:12], attacks=("clean", "pgd20", "aa"), eps=8 / 255,
                    batch_size=5, aa_attacks=["apgd-ce"])
    assert {k: loud[k] for k in ("clean", "pgd20", "aa", "robust", "per_example")} == \
        {k: quiet[k] for k in ("clean", "pgd20", "aa", "robust", "per_example")}
    pgd_bar, aa_bar = recorded_bars
    assert pgd_bar.kwargs["desc"] == "PGD-20" and pgd_bar.positions == [1, 2, 3]  # 12 / 5
    assert aa_bar.descriptions == ["AutoAttack apgd-ce"]
    assert aa_bar.positions[-1] == (aa_bar.total, aa_bar.total)  # every batch reported
    assert aa_bar.postfixes and aa_bar.postfixes[-1].startswith("robust ")
    assert aa_bar.closed


def test_autoattack_progress_passes_on_no_debug_records(model_and_data):
    """A root handler that takes everything (as logging.basicConfig installs) must see no
    DEBUG chatter from AutoAttack while its progress bar listens at DEBUG level."""
    model, x, y = model_and_data
    seen = []
    catch_all = logging.Handler(level=logging.NOTSET)
    catch_all.emit = lambda record: seen.append(record)
    root = logging.getLogger()
    root.addHandler(catch_all)
    try:
        evaluate(model, x[:4], y[:4], attacks=("clean", "aa"), eps=8 / 255,
                 aa_attacks=["apgd-ce"])
    finally:
        root.removeHandler(catch_all)
    assert not [r for r in seen if r.name == "auto-attack" and r.levelno < logging.WARNING]
    assert logging.getLogger("auto-attack").level == logging.NOTSET  # restored
    assert logging.getLogger("auto-attack").propagate


def test_progress_must_be_a_bool(model_and_data):
    model, x, y = model_and_data
    with pytest.raises(TypeError, match="progress must be True or False, got str 'no'"):
        evaluate(model, x, y, progress="no")
