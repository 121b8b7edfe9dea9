"""bench/privacy_tradeoff.py's analysis (its docstring, steps 3-5): the t-interval over seeds, the
Bonferroni interval and what counts as an effect, on made-up per-seed rows."""

from __future__ import annotations

import math
import runpy
from pathlib import Path

import pytest

STUDY = runpy.run_path(str(Path(__file__).resolve().parents[1] / "bench" / "privacy_tradeoff.py"), run_name="study")


def test_t_interval_is_students_over_the_seeds():
    mean, low, high = STUDY["t_interval"]([1.0, 2.0, 3.0, 4.0, 5.0])
    half = 2.7764451 * math.sqrt(2.5) / math.sqrt(5)  # t(0.975, 4) sd / sqrt(n)
    # mishield.audit.stats.t_quantile is an approximation good to about 1e-3 of the quantile
    assert mean == 3.0 and low == pytest.approx(3.0 - half, rel=1e-3) and high == pytest.approx(3.0 + half, rel=1e-3)
    wider = STUDY["t_interval"]([1.0, 2.0, 3.0, 4.0, 5.0], 1 - 0.05 / 11)
    assert wider[1] < low and wider[2] > high
    one = STUDY["t_interval"]([0.4])
    assert one[0] == 0.4 and math.isnan(one[1])  # one seed: no interval, never a zero-width one


def _seed(seed: int, shifts: dict[str, float]) -> dict:
    rows = {}
    for name in STUDY["DEFENCES"]:
        acc = 0.5 + shifts.get(name, 0.0) + 0.01 * ((seed * 7 + len(name)) % 3 - 1)  # a little noise per seed
        rows[name] = {"attack_acc1": acc, "natural_acc": 0.9 - (0.02 if name == "RoLSS" else 0.0), "strongest_attack": "ppa",
                      "attacks": {"ppa": {"paired_diff": 0.0, "attack_acc1": acc}, "lomma": {"paired_diff": 0.0, "attack_acc1": acc - 0.1}}}
    return rows


def test_an_effect_is_claimed_only_when_the_interval_over_seeds_excludes_zero():
    per_seed = [_seed(s, {"RoLSS": -0.10, "erase": +0.10, "SSF": -0.10 * (s % 2) + 0.05 * (1 - s % 2)}) for s in range(5)]
    summary = {r["defence"]: r for r in STUDY["summarise"](per_seed)}
    assert summary["RoLSS"]["effect"] == "reduces (robust)"
    assert summary["erase"]["effect"] == "increases (robust)"
    assert summary["SSF"]["effect"] == "no effect shown"  # lower in some seeds, higher in others
    assert summary["TTS"]["effect"] == "no effect shown"
    assert summary["RoLSS"]["seeds_lower"] == 5
    assert summary["RoLSS"]["delta"] == pytest.approx(0.10 / 0.02, rel=0.05)  # attack drop per point of accuracy
    assert summary["erase"]["delta"] is None  # no accuracy drop: Δ undefined
    assert "paired_diff" not in summary["none"]


def test_a_partial_run_says_so_in_its_table():
    per_seed = [_seed(s, {}) for s in range(2)]
    for s, rows in enumerate(per_seed):
        for r in rows.values():
            r |= {"seed": s, "attack_acc1_ci95": [0.4, 0.6], "paired_diff": None if r is rows["none"] else 0.0,
                  "paired_diff_ci95": None if r is rows["none"] else [-0.05, 0.05]}
    doc = {"seeds_asked": 5, "attacks": STUDY["ATTACKS"], "per_seed": per_seed, "summary": STUDY["summarise"](per_seed)}
    text = STUDY["markdown"](doc)
    assert "PARTIAL: 2 of 5 seeds" in text
    # the descriptive tables: each attack's own figure per defence, and attacks that did not run say so
    row = next(line for line in text.splitlines() if line.startswith("| RoLSS | ") and "ppa 2" in line)
    assert row.count("n/a") == len(STUDY["ATTACKS"].split(",")) - 2  # blackbox and transfer did not run here
    assert "| none | 50.5 [50.0 to 51.0] | 40.5 [40.0 to 41.0] | n/a | n/a | ppa 2 |" in text  # mean [min-max] over the 2 seeds
