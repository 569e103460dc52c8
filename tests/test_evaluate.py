"""Evaluation: accuracies, AutoAttack through pyautoattack, sanity warnings, tables."""
import json

import pytest
import torch

from mixlab.evaluate import evaluate, format_table, robust_accuracy_curve, sanity_report
from mixlab.models import build_model


@pytest.fixture(scope="module")
def model_and_data():
    torch.manual_seed(0)
    model = build_model("tiny", 10, 3).eval()
    x = torch.rand(24, 3, 32, 32)
    with torch.no_grad():
        y = model(x).argmax(1)  # clean accuracy 1 by construction
    return model, x, y


def test_evaluate_all_batched_attacks(model_and_data, tmp_path):
    model, x, y = model_and_data
    res = evaluate(model, x, y, attacks=("clean", "fgsm", "pgd20", "cw20"), eps=8 / 255,
                   batch_size=10, run_dir=tmp_path)
    assert res["clean"] == 1.0 and res["n"] == 24
    assert all(0 <= res[a] <= res["clean"] for a in ("fgsm", "pgd20", "cw20"))
    assert res["pgd20"] <= res["fgsm"] + 1e-9 or res["pgd20"] < 1.0
    saved = json.loads((tmp_path / "eval.json").read_text())
    assert saved["pgd20"] == res["pgd20"]


def test_autoattack_wrapper_on_tiny_model(model_and_data):
    model, x, y = model_and_data
    res = evaluate(model, x[:8], y[:8], attacks=("clean", "aa"), eps=8 / 255, batch_size=8)
    assert 0 <= res["aa"] <= res["clean"]
    assert res["aa"] < 1.0  # an untrained net is not robust at 8/255


def test_eps_zero_curve_point_is_clean_accuracy(model_and_data):
    model, x, y = model_and_data
    curve = robust_accuracy_curve(model, x, y, eps_list=[0, 2 / 255, 8 / 255], attack="fgsm")
    assert curve[0] == 1.0 and curve[2] <= curve[0]


def test_sanity_report_flags_gradient_masking_signs():
    assert sanity_report({"clean": 0.8, "pgd20": 0.5, "aa": 0.45, "fgsm": 0.55}) == []
    warnings = sanity_report({"clean": 0.8, "pgd20": 0.6, "aa": 0.3, "fgsm": 0.4},
                             curve=[0.8, 0.5, 0.6])
    text = " ".join(warnings)
    assert "AutoAttack" in text and "FGSM" in text and "rises" in text
    assert "broken" in " ".join(sanity_report({"clean": 0.5, "pgd20": 0.6}))


def test_unknown_attack_and_bad_eps(model_and_data):
    model, x, y = model_and_data
    with pytest.raises(ValueError, match="unknown attack"):
        evaluate(model, x, y, attacks=("deepfool",))
    with pytest.raises(ValueError, match="outside"):
        evaluate(model, x, y, attacks=("clean",), eps=8)


def test_format_table():
    table = format_table({"pgd_at": {"clean": 0.8, "pgd20": 0.5}})
    assert "| pgd_at | 80.00 | 50.00 |" in table
