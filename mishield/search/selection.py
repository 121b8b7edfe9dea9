"""The search's selection rule, on the audit's report (no torch, no files).

1. **Budget.** A candidate is within the budget when its natural accuracy is at most
   `max_acc_drop` below the original's, by the point estimates on the same held-out images.
   The point estimate, not an interval bound: the budget is the user's statement of the cost they
   accept, and with a few hundred held-out images the interval of a drop is wider than a 2-point
   budget, so a rule on its upper end would reject every candidate, the unchanged model included.
   Each accuracy's Wilson interval is reported beside it so the reader sees that uncertainty.
2. **Pick.** Among the candidates within the budget, the one with the lowest upper end of the
   95 % interval of worst-case attack accuracy @1 (the number the audit's privacy gate reads:
   worst over attacks and evaluation models), then the lower estimate, the smaller accuracy drop,
   the earlier grid position.
3. **Evidence.** A candidate is *significantly less leaky* than the original when the upper end
   of its paired difference's interval (same pool, same crops, same judge) is below 0. The pick
   need not be: the search then says so, and that no candidate within the budget is.
"""

from __future__ import annotations

from collections.abc import Sequence

from mishield.audit.stats import wilson_interval

SELECTION_RULE = (
    "within the budget: natural accuracy at most max_acc_drop below the original's (point estimates on the same held-out "
    "images); pick: the lowest upper end of the 95 % interval of worst-case attack accuracy @1, then the lower estimate, "
    "the smaller accuracy drop, the earlier grid position; significantly less leaky: the upper end of the paired "
    "difference's 95 % interval below 0"
)
TOLERANCE = 1e-9  # accuracies are ratios of counts: a drop of exactly the budget is within it


def _pts(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}"


def _below(drop: float | None) -> str:
    """An accuracy drop in words: "1.2 points below", "0.4 points above", "level with"."""
    if drop is None:
        return "not comparable with"
    if abs(drop) < 5e-4:
        return "level with"
    return f"{_pts(abs(drop))} points {'below' if drop > 0 else 'above'}"


def audit_figures(model: dict) -> dict:
    """One audited model's figures from a report.json entry: natural and worst-case attack accuracy
    with their intervals, and the paired difference to the report's first model."""
    m = model["metrics"]
    acc, n = m.get("natural_acc"), m.get("natural_acc_n") or 0
    interval = m.get("attack_acc1_interval") or {}
    paired = m.get("paired_diff_acc1_interval")
    return {
        "natural_acc": acc,
        "natural_acc_n": n,
        "natural_acc_ci95": None if acc is None or not n else list(wilson_interval(round(acc * n), n)),
        "attack_acc1": m.get("attack_acc1"),
        "attack_acc1_ci95": [interval.get("low"), interval.get("high")] if interval else None,
        "strongest_attack": m.get("strongest_attack") or model.get("attack"),
        "paired_diff_acc1": None if paired is None else paired.get("estimate"),
        "paired_diff_acc1_ci95": None if paired is None else [paired.get("low"), paired.get("high")],
        "significant": bool(paired is not None and paired.get("high") is not None and paired["high"] < 0),
        "verdict": model.get("verdict"),
        "audit_seconds": (model.get("timing") or {}).get("seconds"),
    }


def judge(report: dict, names: Sequence[str], max_acc_drop: float) -> tuple[dict, list[dict]]:
    """(the original's figures, one row per candidate in grid order with `accuracy_drop` and
    `within_budget`), from a report whose first model is the original and the rest `names`."""
    models = report["models"]
    if len(models) != len(names) + 1:
        raise ValueError(f"the audit has {len(models)} models but the search has {len(names)} candidates and the original.")
    base = audit_figures(models[0])
    rows = []
    for name, model in zip(names, models[1:]):
        row = {"name": name, **audit_figures(model)}
        drop = None if base["natural_acc"] is None or row["natural_acc"] is None else base["natural_acc"] - row["natural_acc"]
        row["accuracy_drop"] = drop
        row["within_budget"] = drop is not None and drop <= max_acc_drop + TOLERANCE
        rows.append(row)
    return base, rows


def _key(index_row: tuple[int, dict]) -> tuple:
    index, row = index_row
    high = (row["attack_acc1_ci95"] or [None, None])[1]
    return (high if high is not None else float("inf"), row["attack_acc1"] if row["attack_acc1"] is not None else float("inf"),
            row["accuracy_drop"], index)


def pick(rows: Sequence[dict]) -> dict | None:
    """The selected row (see the module doc), or None when no candidate is within the budget."""
    eligible = [(i, r) for i, r in enumerate(rows) if r["within_budget"]]
    return min(eligible, key=_key)[1] if eligible else None


def statements(base: dict, rows: Sequence[dict], chosen: dict | None, max_acc_drop: float) -> list[str]:
    """What the search found, in plain sentences: a null result is said as plainly as a good one."""
    said = []
    if not rows:
        return ["The grid was empty; nothing was compared."]
    if chosen is None:
        known = [r for r in rows if r["accuracy_drop"] is not None]
        least = min(known, key=lambda r: r["accuracy_drop"]) if known else None
        said.append(
            f"No candidate kept natural accuracy within the budget of {_pts(max_acc_drop)} points below the original's "
            f"{_pts(base['natural_acc'])} %" + (f": the smallest drop was {_pts(least['accuracy_drop'])} points ({least['name']})"
                                                 if least else "") + "; no hardened model was written."
        )
        return said
    lo, hi = chosen["attack_acc1_ci95"]
    said.append(
        f"Picked {chosen['name']}: within the budget (natural accuracy {_pts(chosen['natural_acc'])} %, "
        f"{_below(chosen['accuracy_drop'])} the original's {_pts(base['natural_acc'])} %) with the lowest upper "
        f"end of worst-case attack accuracy, {_pts(chosen['attack_acc1'])} % [{_pts(lo)}, {_pts(hi)}] against the "
        f"original's {_pts(base['attack_acc1'])} %."
    )
    eligible = [r for r in rows if r["within_budget"]]
    if chosen["significant"]:
        d, (dlo, dhi) = chosen["paired_diff_acc1"], chosen["paired_diff_acc1_ci95"]
        said.append(f"{chosen['name']} is significantly less leaky than the original: paired difference "
                    f"{100 * d:+.1f} points, 95 % interval [{100 * dlo:+.1f}, {100 * dhi:+.1f}].")
    else:
        d, ci = chosen["paired_diff_acc1"], chosen["paired_diff_acc1_ci95"]
        detail = "" if d is None else f" (paired difference {100 * d:+.1f} points, 95 % interval [{100 * ci[0]:+.1f}, {100 * ci[1]:+.1f}])"
        said.append(f"{chosen['name']} is not significantly less leaky than the original{detail}.")
        if not any(r["significant"] for r in eligible):
            said.append("No candidate within the budget is significantly less leaky than the original; at this audit "
                        "budget the search found no measurable improvement.")
        else:
            better = ", ".join(r["name"] for r in eligible if r["significant"])
            said.append(f"Within the budget, {better} {'is' if ',' not in better else 'are'} significantly less leaky "
                        "than the original but not lowest by the upper end of attack accuracy.")
    overlapping = [r["name"] for r in eligible if r is not chosen and r["attack_acc1_ci95"] and r["attack_acc1_ci95"][0] <= hi]
    if overlapping:
        said.append(f"The short-budget audits are noisy: the attack-accuracy intervals of {len(overlapping)} other "
                    f"candidate(s) within the budget overlap the pick's, so the ranking among them is not established.")
    return said


def final_statements(final: dict, base: dict, name: str, max_acc_drop: float, epochs: int) -> list[str]:
    """What the re-measurement of the fully fine-tuned pick says."""
    lo, hi = final["attack_acc1_ci95"]
    said = [(f"After full fine-tuning ({epochs} epochs) {name} measured natural accuracy {_pts(final['natural_acc'])} % "
            f"and worst-case attack accuracy {_pts(final['attack_acc1'])} % [{_pts(lo)}, {_pts(hi)}] against the "
            "original in a second audit (same budget, pool and crops); the pick was made on the short-budget audit.")]
    if not final["within_budget"]:
        said.append(f"The fully fine-tuned model is {_below(final['accuracy_drop'])} the original's accuracy, "
                    f"outside the budget of {_pts(max_acc_drop)} points.")
    if not final["significant"]:
        said.append("In that re-measurement the hardened model is not significantly less leaky than the original.")
    return said
