"""mixlab.references: the papers' reported numbers are fractions where evaluate's results are,
consistent (no attack above clean accuracy), each with its source, and found by paper, dataset,
norm and method."""
import re

import pytest

from mixlab.evaluate import format_table
from mixlab.methods import METHODS
from mixlab.references import REFERENCES, reference_rows, references

KEYS = {"clean", "fgsm", "pgd20", "cw20", "aa", "pgd_plus"}


def test_numbers_are_fractions_and_no_attack_beats_clean():
    for paper, refs in REFERENCES.items():
        for r in refs:
            assert set(r.numbers) <= KEYS and "clean" in r.numbers, (paper, r.method)
            for key, value in r.numbers.items():
                assert 0 <= value <= 1, f"{paper}/{r.method}/{key}={value}: a percentage?"
                assert value <= r.numbers["clean"], f"{paper}/{r.method}: {key} above clean"
            assert r.method in METHODS, r.method
            assert r.norm in ("Linf", "L2")


def test_every_number_says_where_it_comes_from():
    for paper, refs in REFERENCES.items():
        labels = [r.label or f"paper: {r.method}" for r in refs]
        assert len(set(labels)) == len(labels), paper  # one row would hide another
        for r in refs:
            assert re.search(r"arXiv \d{4}\.\d{4,5}", r.paper), r.paper
            assert r.source and r.setting
            row = r.row()
            assert row["source"].startswith(r.paper) and r.source in row["source"]
            assert {k: v for k, v in row.items() if k != "source"} == r.numbers


def test_rows_by_paper_dataset_norm_and_methods():
    rows = reference_rows("gairat", dataset="cifar10", norm="Linf", methods=["gairat", "pgd_at"])
    assert list(rows) == ["paper: gairat", "paper: pgd_at"]  # in the order asked for
    assert rows["paper: gairat"]["pgd20"] == pytest.approx(0.5781)
    assert rows["paper: pgd_at"]["clean"] == pytest.approx(0.8692)
    assert reference_rows("gairat", methods=["erm"]) == {}
    linf = reference_rows("mma", dataset="cifar10", norm="Linf")
    l2 = reference_rows("mma", dataset="cifar10", norm="L2")
    assert list(linf) == ["paper: MMA-32 (RobustBench)"] and linf[next(iter(linf))]["aa"] < 0.5
    assert list(l2) == ["paper: MMA-2.0 (RobustBench)"] and l2[next(iter(l2))]["aa"] > 0.6
    assert reference_rows("mma", dataset="mnist", norm="Linf") == {}
    assert len(references("gairat")) == 4


def test_trades_is_robustbenchs_entry():
    """TRADES (β = 6, WRN-34-10): clean and AutoAttack as RobustBench lists the authors'
    checkpoint; no PGD number (the paper's own came from other attacks)."""
    rows = reference_rows("trades", dataset="cifar10", norm="Linf", methods=["trades"])
    (label, row), = rows.items()
    assert "RobustBench" in label and "Zhang2019Theoretically" in row["source"]
    assert {k: v for k, v in row.items() if k != "source"} == {"clean": 0.8492, "aa": 0.5308}
    assert reference_rows("trades", norm="L2") == {}


def test_an_unknown_paper_names_the_known_ones():
    with pytest.raises(ValueError, match="'amp'.*gairat, mma"):
        references("amp")


def test_rows_sit_in_evaluate_tables():
    """The rows' keys are evaluate's: format_table puts them in its columns (the source
    string is not a column)."""
    table = format_table(reference_rows("gairat", methods=["gairat"]))
    assert "| paper: gairat | 85.75 | 57.81 |" in table and "source" not in table
