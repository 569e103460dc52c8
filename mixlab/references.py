"""The numbers the papers (or their authors' code) report, with where each comes from.

The notebooks print these rows beside their own results, so every reference number is
written once, here, with its source: the paper (arXiv id), the place (a table of the paper,
the official repository's README, a RobustBench entry) and the setting it was measured in.
Accuracies are fractions in [0, 1] with the keys of :func:`mixlab.evaluate.evaluate`'s result
(``clean``, ``pgd20``, ``aa``, ...), so :func:`mixlab.evaluate.format_table` shows them in
the same columns; ``pgd_plus`` is GAIRAT's PGD+ (five restarts of 40-step PGD), a column the
default table leaves out.

>>> rows = reference_rows("gairat", dataset="cifar10", norm="Linf", methods=["pgd_at", "gairat"])
>>> list(rows)
['paper: pgd_at', 'paper: gairat']
>>> rows["paper: gairat"]["pgd20"]
0.5781
"""
from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class Reference:
    """One reported result: ``numbers`` (accuracy fractions by evaluate's keys) of
    ``method`` on ``dataset`` under ``norm`` at the standard eps, from ``paper`` (authors,
    venue, arXiv id), found at ``source``, measured in ``setting``."""
    paper: str
    method: str
    dataset: str
    norm: str
    numbers: dict[str, float]
    source: str
    setting: str
    label: str = ""

    def row(self) -> dict[str, Any]:
        """The table row: the numbers, then ``source`` (paper, place and setting in one
        line), which :func:`mixlab.nbtools.save_table` writes beside them."""
        return {**self.numbers, "source": f"{self.paper}; {self.source}; {self.setting}"}


_GAIRAT = "Zhang et al., ICLR 2021, arXiv 2010.01736"
_GAIRAT_README = ("README of the official code, "
                  "zjfheart/Geometry-aware-Instance-reweighted-Adversarial-Training")
_GAIRAT_SETTING = ("CIFAR-10, Linf 8/255, WRN-32-10, 120 epochs, best checkpoint; PGD-20 and "
                   "PGD+ (5 restarts of PGD-40); no FGSM, CW-20 or AutoAttack reported")
_MMA = "Ding et al., ICLR 2020, arXiv 1812.02637"
_TRADES = "Zhang et al., ICML 2019, arXiv 1901.08573"

#: paper key -> its reported results (the notebooks' reference rows)
REFERENCES: dict[str, tuple[Reference, ...]] = {
    "gairat": tuple(
        Reference(_GAIRAT, method, "cifar10", "Linf", numbers, _GAIRAT_README, _GAIRAT_SETTING)
        for method, numbers in {
            "pgd_at": dict(clean=0.8692, pgd20=0.5196, pgd_plus=0.5128),
            "fat": dict(clean=0.8916, pgd20=0.5124, pgd_plus=0.4614),
            "gairat": dict(clean=0.8575, pgd20=0.5781, pgd_plus=0.5561),
            "gair_fat": dict(clean=0.8859, pgd20=0.5621, pgd_plus=0.5350),
        }.items()),
    "mma": (
        # the paper itself reports about 84 clean / 47 under its own PGD ensemble for MMA-32
        Reference(_MMA, "mma", "cifar10", "Linf", dict(clean=0.8436, aa=0.4144),
                  "RobustBench Linf leaderboard, entry Ding2020MMA",
                  "CIFAR-10, Linf 8/255, WRN-28-4, MMA-32 (d_max 32/255), full test set, "
                  "AutoAttack standard", label="paper: MMA-32 (RobustBench)"),
        Reference(_MMA, "mma", "cifar10", "L2", dict(clean=0.8802, aa=0.6609),
                  "RobustBench L2 leaderboard, entry Ding2020MMA",
                  "CIFAR-10, L2 0.5, WRN-28-4, MMA-2.0 (d_max 2.0), full test set, "
                  "AutoAttack standard", label="paper: MMA-2.0 (RobustBench)"),
    ),
    "trades": (
        # RobustBench's evaluation of the authors' checkpoint; the paper's own robust number
        # (RobustBench's "reported", 56.43) is under the paper's attacks, not AutoAttack
        Reference(_TRADES, "trades", "cifar10", "Linf", dict(clean=0.8492, aa=0.5308),
                  "RobustBench Linf leaderboard, entry Zhang2019Theoretically",
                  "CIFAR-10, Linf eps 0.031 (about 7.9/255, not 8/255), WRN-34-10, β = 6, "
                  "full test set, AutoAttack standard", label="paper: TRADES β=6 (RobustBench)"),
    ),
}


def references(paper: str, *, dataset: str | None = None, norm: str | None = None,
               methods: list[str] | None = None) -> list[Reference]:
    """The results :data:`REFERENCES` holds for ``paper``, those of ``dataset``, ``norm``
    and ``methods`` when given (in ``methods``' order, else in the table's). An unknown
    paper is a ValueError naming the choices; a setting no paper reports gives []."""
    if paper not in REFERENCES:
        raise ValueError(f"no reference numbers for paper {paper!r}; known: "
                         f"{', '.join(REFERENCES)} (mixlab.references)")
    found = [r for r in REFERENCES[paper]
             if (dataset is None or r.dataset == dataset) and (norm is None or r.norm == norm)]
    if methods is not None:
        found = [r for m in methods for r in found if r.method == m]
    return found


def reference_rows(paper: str, **where: Any) -> dict[str, dict[str, Any]]:
    """:func:`references` as table rows ``{"paper: <method>" (or the reference's label):
    numbers + source}``, ready to sit beside :func:`mixlab.nbtools.evaluate_runs`' rows."""
    return {r.label or f"paper: {r.method}": r.row() for r in references(paper, **where)}
