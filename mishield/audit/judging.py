"""Judging the reconstructions: every evaluator's figures, the most leaky one, the worst-case attack.

Each audited model is attacked by every chosen attack, and every evaluation model judges the same
kept reconstructions. A (model, attack) row takes the figures of its most leaky evaluator, and a
model takes those of its worst-case row; "most leaky" is the highest upper end of the attack
accuracy @1 interval, the number the gate reads. So a second evaluator or a second attack can
only make an audit stricter, never flatter it (docs/audit.md "Worst case").
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field, fields

import numpy as np
import torch

from mishield.audit.metrics import deltas, summarize
from mishield.audit.outcomes import EvaluatorOutcome, ShardOutcome
from mishield.audit.results import ModelAudit, PrivacyGate
from mishield.audit.stats import (
    MIN_REACHED,
    Interval,
    chance_level,
    class_bootstrap,
    optimisation_verdict,
    paired_difference,
)
from mishield.audit.stats import verdict as stats_verdict

# What each evaluator's entry in a row's `metrics.evaluators` lists.
EVALUATOR_SUMMARY = ("evaluator", "evaluator_acc", "attack_acc1", "attack_acc1_interval", "attack_acc5", "knn_dist",
                     "unfiltered_acc1", "selection_only_acc1")  # fmt: skip


@dataclass(frozen=True)
class Judging:
    """What every model is judged against: the gate's threshold (None: no gate), the budget each
    attack ran with, each evaluator's name and measured accuracy (None where unmeasured), and what
    each attack reads of the model (`AttackKind.to_dict()`; an attack not listed reads everything)."""

    threshold: float | None
    budgets: dict[str, dict]
    evaluators: list[dict]
    attacks: dict[str, dict] = field(default_factory=dict)


@dataclass
class Row:
    """One model under one attack, judged by every evaluator; its figures are the most leaky evaluator's."""

    attack: str
    metrics: dict
    per_class: list[dict]
    verdict: dict
    hits: list[np.ndarray]  # per evaluator: [classes, images] top-1 hits
    evaluator: int  # index of the most leaky evaluator
    interval: Interval  # that evaluator's @1 interval
    grid: str
    timing: dict
    budget: dict
    shown: dict  # class -> uint8 reconstructions to show
    delta: dict | None = None
    kind: dict = field(default_factory=dict)  # what the attack reads of the model (AttackKind.to_dict())
    excluded: str | None = None  # why this row cannot decide the model's verdict (masking), set by `model_verdict`

    @property
    def severity(self) -> tuple[float, float]:
        return (self.interval.high, self.interval.estimate)

    def to_dict(self) -> dict:
        return {"attack": self.attack, "metrics": self.metrics, "per_class": self.per_class, "verdict": self.verdict,
                "grid": self.grid, "timing": self.timing, "budget": self.budget, "delta": self.delta,
                "reads": {k: self.kind.get(k, True) for k in ("target_gradients", "target_outputs")},
                "decides": self.excluded is None, "excluded": self.excluded}  # fmt: skip


def per_class(parts: list[ShardOutcome], classes: list[int], get: Callable[[ShardOutcome], torch.Tensor | None]) -> torch.Tensor | None:
    """[classes, images] of one outcome gathered from the ranks' parts, rows in `classes` order (None where not measured)."""
    where = {c: (p, i) for p in parts for i, c in enumerate(p.classes)}
    values = [get(where[c][0]) for c in classes]
    if any(v is None for v in values):
        return None
    return torch.stack([v[where[c][1]] for v, c in zip(values, classes)]).float()


def _figures(out: EvaluatorOutcome, num_classes: int, evaluator: dict) -> tuple[dict, Interval]:
    """One evaluator's verdict on one row: accuracy @1/@5 with class-bootstrap intervals, chance,
    KNN distance, unfiltered and selection-only accuracy."""
    top1, top5, unfiltered, so_top1 = out.top1, out.top5, out.unfiltered, out.so_top1
    iv1, iv5 = class_bootstrap(top1.numpy()), class_bootstrap(top5.numpy())
    so = None if so_top1 is None else class_bootstrap(so_top1.numpy())
    figures = {
        "evaluator": evaluator["name"],
        "evaluator_acc": evaluator.get("accuracy"),
        **summarize(top1.flatten(), top5.flatten(), out.knn.flatten()),
        "interval_method": iv1.method,
        "attack_acc1_ci95": [iv1.low, iv1.high],
        "attack_acc1_interval": iv1.to_dict(),
        "attack_acc5_ci95": [iv5.low, iv5.high],
        "attack_acc5_interval": iv5.to_dict(),
        "chance_acc1": chance_level(num_classes, 1),
        "chance_acc5": chance_level(num_classes, 5),
        "unfiltered_acc1": None if unfiltered is None else float(unfiltered.mean()),
        "unfiltered_n": None if unfiltered is None else int(unfiltered.numel()),
        "selection_only_acc1": None if so is None else so.estimate,
        "selection_only_acc1_interval": None if so is None else so.to_dict(),
    }
    return figures, iv1


def _optimisation(out: EvaluatorOutcome) -> tuple[Interval | None, Interval | None]:
    """The paired intervals of attack accuracy and of unfiltered accuracy minus the selection-only baseline's."""
    if out.so_top1 is None:
        return None, None
    gain = paired_difference(out.so_top1.numpy(), out.top1.numpy())
    return gain, None if out.unfiltered is None else paired_difference(out.so_top1.numpy(), out.unfiltered.numpy())


def judge_row(attack: str, parts: list[ShardOutcome], classes: list[int], class_names: list[str], num_classes: int,
              natural: tuple[float | None, int], judging: Judging, grid: str) -> Row:  # fmt: skip
    """Judge one model under one attack from its ranks' parts (`mishield.audit.runner.AuditRun`)."""
    conf = per_class(parts, classes, lambda p: p.target_conf)
    top1 = per_class(parts, classes, lambda p: p.target_top1)
    outs, figures = [], []
    for e, evaluator in enumerate(judging.evaluators):
        out = EvaluatorOutcome(**{f.name: per_class(parts, classes, lambda p, k=f.name, e=e: getattr(p.evaluators[e], k))
                                  for f in fields(EvaluatorOutcome)})
        outs.append(out)
        figures.append(_figures(out, num_classes, evaluator))
    leaky = max(range(len(figures)), key=lambda e: (figures[e][1].high, figures[e][1].estimate))  # first on ties
    best, interval = figures[leaky]
    out = outs[leaky]
    gain, drop = _optimisation(out)
    kind = judging.attacks.get(attack, {})
    metrics = {"attack": attack, "natural_acc": natural[0], "natural_acc_n": natural[1], **best,
               "target_confidence": float(conf.mean()), "target_top1": float(top1.mean()),
               "scoring_model": "surrogates" if kind.get("target_outputs") is False else "target",
               "gain_over_selection_acc1": None if gain is None else gain.estimate,
               "gain_over_selection_acc1_interval": None if gain is None else gain.to_dict(),
               "unfiltered_minus_selection_acc1_interval": None if drop is None else drop.to_dict(),
               "evaluators": [{k: f[k] for k in EVALUATOR_SUMMARY} for f, _ in figures],
               "paired_diff_acc1": None, "paired_diff_acc1_interval": None}  # fmt: skip
    rows = []
    for r, c in enumerate(classes):
        s = summarize(out.top1[r], out.top5[r], out.knn[r])
        rows.append({"class": c, "name": class_names[c], "n": s["n"], "attack_acc1": s["attack_acc1"], "attack_acc5": s["attack_acc5"],
                     "knn_dist": s["knn_dist"], "target_confidence": float(conf[r].mean()), "target_top1": float(top1[r].mean()),
                     "reached": bool(top1[r].mean() >= MIN_REACHED),
                     "unfiltered_acc1": None if out.unfiltered is None else float(out.unfiltered[r].mean()),
                     "selection_only_acc1": None if out.so_top1 is None else float(out.so_top1[r].mean())})  # fmt: skip
    judged = stats_verdict(interval, judging.threshold, chance=best["chance_acc1"], reached=top1.numpy())
    judged = optimisation_verdict(judged, gain, drop, out.top1.shape[1])
    where = {c: (p, i) for p in parts for i, c in enumerate(p.classes)}
    return Row(attack, metrics, rows, {**judged.to_dict(), "attack": attack}, [o.top1.numpy() for o in outs], leaky,
               interval, grid, _timing(parts), dict(judging.budgets[attack]), {c: where[c][0].shown[where[c][1]] for c in classes},
               kind=dict(kind))  # fmt: skip


def _timing(parts: list[ShardOutcome]) -> dict:
    """Work and time of one row over its ranks; the black-box attack's target queries by phase."""
    image_steps, seconds = sum(p.image_steps for p in parts), max(p.seconds for p in parts)
    timing = {"image_steps": image_steps, "seconds": seconds, "image_steps_per_s": image_steps / seconds if seconds else None,
              **{k: max(p.timings[k] for p in parts) for k in parts[0].timings}}  # fmt: skip
    if parts[0].queries is not None:
        timing["queries"] = {k: v if k == "per_candidate" else sum(p.queries[k] for p in parts) for k, v in parts[0].queries.items()}
    return timing


def worst(rows: list[Row]) -> Row:
    """The row an attacker would pick: the highest upper end of the @1 interval (then the estimate; first on ties)."""
    return max(rows, key=lambda r: r.severity)


# A leaky row decides a model's verdict before an inconclusive one: it is conclusive evidence of leakage.
VERDICT_ORDER = {"leaky": 0, "inconclusive": 1}


def model_verdict(rows: list[Row], masking: dict | None = None) -> dict:
    """Worst case over attacks: leaky if any attack shows leakage; otherwise only the attacks the
    masking diagnostics leave (`masking_checks.cannot_decide`, set as `Row.excluded`) decide:
    inconclusive if none is left (the reason names the masking) or if any of them was inconclusive
    (an attack that failed proves nothing), else the worst-case deciding row's verdict; among rows of
    the same status, the most severe one speaks. A masked row can still show leakage: what it
    recovered, an attacker recovers too."""
    from mishield.audit.masking_checks import cannot_decide, masked_verdict

    for r in rows:
        r.excluded = cannot_decide(r.kind or {}, masking)
    deciding = [r for r in rows if r.excluded is None]
    failing = [r for r in rows if r.verdict["status"] == "leaky"] or [r for r in deciding if r.verdict["status"] in VERDICT_ORDER]
    failing.sort(key=lambda r: (VERDICT_ORDER[r.verdict["status"]], -r.severity[0], -r.severity[1]))  # stable: attack order on ties
    if not failing and not deciding:
        return masked_verdict(masking, [(r.attack, r.excluded) for r in rows])
    chosen = failing[0] if failing else worst(deciding)
    verdict = dict(chosen.verdict)
    if len(rows) > 1:
        verdict["reason"] = f"under the {chosen.attack} attack: {verdict['reason']}"
    excluded = {r.attack: r.excluded for r in rows if r.excluded}
    if excluded and verdict["status"] != "leaky":
        verdict["reason"] += f" ({', '.join(excluded)} could not decide: {next(iter(excluded.values()))}.)"
    verdict["excluded"] = excluded
    return verdict


def grid_name(mi: int, name: str, attack: str, attacks: int) -> str:
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", name)[:60]
    return f"grids/{mi}_{slug}.png" if attacks == 1 else f"grids/{mi}_{slug}_{attack}.png"


def add_differences(rows_per_model: list[list[Row]]) -> list[dict | None]:
    """Δ and the paired difference against the first model, in place on each row; returns the
    model-level paired interval of each model (None for the first).

    A row is compared with the first model's row of the same attack under the row's own (most
    leaky) evaluator: same pool, same crops, same judge, so the pairing is exact. The model-level
    difference compares each model's worst case with the first model's worst case.
    """
    base = {r.attack: r for r in rows_per_model[0]}
    model_level: list[dict | None] = [None]
    for rows in rows_per_model[1:]:
        for r in rows:
            b = base[r.attack]
            r.delta = deltas(b.metrics, r.metrics)
            paired = paired_difference(b.hits[r.evaluator], r.hits[r.evaluator])
            r.metrics["paired_diff_acc1"], r.metrics["paired_diff_acc1_interval"] = paired.estimate, paired.to_dict()
        w, wb = worst(rows), worst(rows_per_model[0])
        model_level.append(paired_difference(wb.hits[wb.evaluator], w.hits[w.evaluator]).to_dict())
    return model_level


def model_audits(targets, names: list[str], rows_per_model: list[list[Row]], masking: list[dict] | None = None) -> list[ModelAudit]:
    """One `ModelAudit` per target: the worst-case row's figures on top, every attack's row in `attacks`,
    the verdict over the rows the masking diagnostics (`masking[i]`, `masking_checks.diagnose`) leave."""
    from mishield.audit.masking_checks import to_json
    from mishield.audit.trust import program_note

    paired = add_differences(rows_per_model)
    masking = masking or [None] * len(targets)
    models = []
    for target, name, rows, diff, diagnosed in zip(targets, names, rows_per_model, paired, masking):
        w = worst(rows)
        metrics = {**w.metrics, "strongest_attack": w.attack}
        if diff is not None:
            metrics["paired_diff_acc1"], metrics["paired_diff_acc1_interval"] = diff["estimate"], diff
        verdict = program_note(model_verdict(rows, diagnosed), target.info)
        models.append(ModelAudit(
            name=name, info=dict(target.info), num_classes=target.num_classes, preprocessing=target.preprocessing.to_dict(),
            metrics=metrics, per_class=w.per_class, grid=w.grid, budget=w.budget, verdict=verdict,
            timing=w.timing, attack=w.attack, attacks=[r.to_dict() for r in rows],
            masking=None if diagnosed is None else to_json(diagnosed),
        ))  # fmt: skip
    for m in models[1:]:
        m.delta = deltas(models[0].metrics, m.metrics)
    return models


def gate(models: list[ModelAudit], threshold: float) -> PrivacyGate:
    """Passes only when every model's (worst-case) verdict is "passes"; inconclusive audits fail it too."""
    failing = [m.name for m in models if not (m.verdict or {}).get("passed")]
    inconclusive = [m.name for m in models if (m.verdict or {}).get("status") == "inconclusive"]
    reasons = {m.name: m.verdict["reason"] for m in models if m.name in failing}
    return PrivacyGate(threshold, not failing, failing, inconclusive=inconclusive, reasons=reasons)
