"""The search's selection rule and its statements, on hand-made audit reports (no training), and
the privacy/utility SVG drawn from a search document."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest

from mishield.search import GRIDS, Candidate, SearchConfig, make_grid
from mishield.search.front import front_svg
from mishield.search.selection import judge, pick, statements

SVG = "{http://www.w3.org/2000/svg}"


def _model(name: str, acc: float, attack: float, low: float, high: float, paired: tuple[float, float, float] | None = None,
           n: int = 200) -> dict:
    metrics = {"natural_acc": acc, "natural_acc_n": n, "attack_acc1": attack,
               "attack_acc1_interval": {"estimate": attack, "low": low, "high": high}, "strongest_attack": "ppa",
               "paired_diff_acc1_interval": None if paired is None else dict(zip(("estimate", "low", "high"), paired))}
    return {"name": name, "metrics": metrics, "timing": {"seconds": 1.0}, "verdict": {"status": "not gated"}}


def _report(*candidates: dict) -> dict:
    return {"models": [_model("model.pt", 0.90, 0.80, 0.70, 0.90), *candidates]}


def test_the_pick_has_the_lowest_upper_end_not_the_lowest_estimate():
    report = _report(
        _model("a", 0.89, 0.30, 0.05, 0.60, (-0.5, -0.8, -0.2)),  # lowest estimate, wide interval
        _model("b", 0.89, 0.35, 0.25, 0.45, (-0.45, -0.6, -0.3)),  # lowest upper end: the pick
        _model("c", 0.80, 0.10, 0.05, 0.15, (-0.7, -0.8, -0.6)),  # best of all, but 10 points of accuracy
    )
    base, rows = judge(report, ["a", "b", "c"], max_acc_drop=0.02)
    assert [r["within_budget"] for r in rows] == [True, True, False]
    assert pick(rows)["name"] == "b"
    assert rows[0]["accuracy_drop"] == pytest.approx(0.01) and base["natural_acc"] == 0.90


def test_a_drop_of_exactly_the_budget_is_within_it_and_ties_go_to_the_smaller_drop():
    report = _report(_model("a", 0.88, 0.40, 0.30, 0.50), _model("b", 0.89, 0.40, 0.30, 0.50), _model("c", 0.879, 0.1, 0.0, 0.2))
    _, rows = judge(report, ["a", "b", "c"], max_acc_drop=0.02)
    assert [r["within_budget"] for r in rows] == [True, True, False]
    assert pick(rows)["name"] == "b"


def test_natural_accuracy_carries_its_wilson_interval():
    _, rows = judge(_report(_model("a", 0.5, 0.4, 0.3, 0.5, n=100)), ["a"], 0.5)
    low, high = rows[0]["natural_acc_ci95"]
    assert low == pytest.approx(0.4038, abs=1e-3) and high == pytest.approx(0.5962, abs=1e-3)


def test_significance_is_the_paired_interval_below_zero():
    _, rows = judge(_report(_model("a", 0.9, 0.5, 0.4, 0.6, (-0.3, -0.5, -0.01)), _model("b", 0.9, 0.5, 0.4, 0.6, (-0.3, -0.5, 0.0))),
                    ["a", "b"], 0.02)
    assert [r["significant"] for r in rows] == [True, False]


def test_a_null_result_is_said_plainly():
    report = _report(_model("a", 0.89, 0.70, 0.60, 0.85, (-0.1, -0.2, 0.05)), _model("b", 0.89, 0.75, 0.65, 0.86, (-0.05, -0.15, 0.05)))
    base, rows = judge(report, ["a", "b"], 0.02)
    said = statements(base, rows, pick(rows), 0.02)
    assert said[0].startswith("Picked a: within the budget")
    assert "a is not significantly less leaky than the original (paired difference -10.0 points" in said[1]
    assert "No candidate within the budget is significantly less leaky than the original" in said[2]
    assert any("noisy" in s for s in said)  # b's interval overlaps a's


def test_no_candidate_within_the_budget_writes_nothing_and_says_so():
    base, rows = judge(_report(_model("a", 0.85, 0.1, 0.0, 0.2), _model("b", 0.80, 0.1, 0.0, 0.2)), ["a", "b"], 0.02)
    assert pick(rows) is None
    (said,) = statements(base, rows, None, 0.02)
    assert "No candidate kept natural accuracy within the budget of 2.0 points" in said
    assert "smallest drop was 5.0 points (a)" in said and "no hardened model was written" in said


def test_a_significant_pick_is_reported_with_its_interval():
    base, rows = judge(_report(_model("a", 0.90, 0.30, 0.20, 0.40, (-0.5, -0.6, -0.4))), ["a"], 0.02)
    said = statements(base, rows, pick(rows), 0.02)
    assert "level with the original's 90.0 %" in said[0]
    assert said[1] == "a is significantly less leaky than the original: paired difference -50.0 points, 95 % interval [-60.0, -40.0]."


def test_the_grids_are_the_documented_ones():
    assert len(GRIDS["default"]) == 12 and len(GRIDS["quick"]) == 4
    assert GRIDS["default"] == make_grid([("rolss", None), ("ssf", 0.2), ("ssf", 0.5)])
    assert [c.name for c in GRIDS["default"][:4]] == ["rolss", "rolss+erase", "rolss+neg-ls", "rolss+neg-ls+erase"]
    assert Candidate("ssf", 0.5, -0.05, 1.0).changes() == {"method": "ssf", "alpha": 0.5, "neg_ls": -0.05, "erase": (1.0, 0.1, 0.8)}


@pytest.mark.parametrize(("fields", "words"), [
    ({"grid": "huge"}, "`grid` must be one of default, quick"),
    ({"grid": [Candidate("rolss"), Candidate("rolss")]}, "`grid` lists rolss more than once"),
    ({"grid": [Candidate("ssf", 1.5)]}, "alpha"),
    ({"search_epochs": 0}, "`search_epochs`"),
    ({"max_acc_drop": 2.0}, "`max_acc_drop` is a fraction"),
])  # fmt: skip
def test_bad_search_options_are_usage_errors(fields, words):
    from mishield.errors import UsageError

    with pytest.raises(UsageError, match=words):
        SearchConfig(**fields)


def test_base_options_the_grid_chooses_are_refused():
    from mishield.errors import UsageError
    from mishield.hardening import HardenConfig

    for base in (HardenConfig(neg_ls=-0.05), HardenConfig(erase=1.0), HardenConfig(freeze_stages=1), HardenConfig(resume=True)):
        with pytest.raises(UsageError, match="is not an option of the search's candidates"):
            SearchConfig(base=base)
    from mishield.audit.config import AuditConfig

    with pytest.raises(UsageError, match="does not gate"):
        SearchConfig(audit=AuditConfig.preset("ci", max_attack_acc=0.5))


def _document() -> dict:
    base, rows = judge(_report(_model("a", 0.89, 0.30, 0.2, 0.4), _model("b", 0.80, 0.2, 0.1, 0.3), _model("c", 0.895, 0.6, 0.5, 0.7)),
                       ["a", "b", "c"], 0.02)
    return {"baseline": {"name": "model.pt", **base}, "candidates": rows, "pick": pick(rows)["name"], "final": None,
            "options": {"max_acc_drop": 0.02, "audit": {"preset": "ci"}}}


def test_the_front_svg_marks_every_model_the_pick_and_the_budget():
    doc = _document()
    root = ET.fromstring(front_svg(doc))
    groups = {g.get("data-name"): g.get("class") for g in root.iter(f"{SVG}g")}
    assert groups == {"original": "model original", "a": "model pick", "b": "model outside", "c": "model within"}
    assert len([e for e in root.iter(f"{SVG}line") if e.get("class") == "interval"]) == 4  # every model's interval bar
    budget = next(e for e in root.iter(f"{SVG}line") if e.get("class") == "budget")
    xs = {g.get("data-name"): float(next(g.iter(f"{SVG}circle" if g.get("data-name") != "original" else f"{SVG}rect")).get(
        "cx" if g.get("data-name") != "original" else "x")) for g in root.iter(f"{SVG}g")}
    assert xs["b"] < float(budget.get("x1")) < xs["a"]  # 0.88: b (0.80) outside, a (0.89) inside
    front = next(e for e in root.iter(f"{SVG}polyline") if e.get("class") == "front").get("points").split()
    assert len(front) == 4  # no model is beaten on both axes here: b < a < c < original in accuracy, the reverse in leakage
    doc["candidates"][2]["attack_acc1"] = 0.2  # now c is more accurate than a and b and as private as b
    front = next(e for e in ET.fromstring(front_svg(doc)).iter(f"{SVG}polyline") if e.get("class") == "front").get("points")
    assert len(front.split()) == 2  # c and the original
