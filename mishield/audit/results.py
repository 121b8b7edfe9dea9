"""The audit's typed results: `AuditReport` (one audit), `ModelAudit` (one audited model) and
`PrivacyGate` (the `max_attack_acc` verdict).

`AuditReport.to_dict()` is exactly the layout of `report.json` (schema `mishield.audit-report`,
version 2; docs/architecture.md §3); `AuditReport.from_dict()` reads one back, so saved reports can be
compared from Python. Metrics stay plain dicts (the keys are listed in docs/audit.md, "The
numbers in the report"), because the schema lets later versions add numbers without a new type.

No torch here: a report can be read back without it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

SCHEMA = "mishield.audit-report"
# 2: the feature spaces (`feature_extractors`; per model and class FID, precision, recall, density,
# coverage, the KNN judge and the false-positive share), masking diagnostics, the gradient-free and
# transfer attacks and the optimisation's gain. Every version-1 field is kept, so `AuditReport.from_dict`
# reads a version 1 document as it did.
SCHEMA_VERSION = 2
READABLE_VERSIONS = (1, 2)
# What `ModelAudit.info` holds: where the model came from (copied into the report as it is).
MODEL_INFO_KEYS = ("source", "sha256", "arch", "kind", "surgery", "surrogates", "defences")


def finite(v: Any) -> Any:
    """JSON has no NaN: missing numbers are null."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: finite(x) for k, x in v.items()}
    if isinstance(v, list):
        return [finite(x) for x in v]
    return v


GATE_RULE = ("upper end of the 95 % class-bootstrap interval of attack accuracy @1 at or below max_attack_acc, "
             "for the worst case over attacks and evaluation models; inconclusive never passes")


@dataclass
class PrivacyGate:
    """Whether every model passed: the upper end of its attack-accuracy @1 interval at or below
    `max_attack_acc`, and a conclusive audit (an inconclusive one never passes)."""

    max_attack_acc: float
    passed: bool
    failing: list[str] = field(default_factory=list)  # every model that did not pass (leaky or inconclusive)
    inconclusive: list[str] = field(default_factory=list)  # those of `failing` whose audit was inconclusive
    reasons: dict[str, str] = field(default_factory=dict)  # failing model -> why, in one sentence
    rule: str = GATE_RULE

    def to_dict(self) -> dict:
        return {"max_attack_acc": self.max_attack_acc, "passed": self.passed, "failing": list(self.failing),
                "inconclusive": list(self.inconclusive), "reasons": dict(self.reasons), "rule": self.rule}  # fmt: skip


@dataclass
class ModelAudit:
    """One audited model: where it came from, its metrics overall and per class, its image grid."""

    name: str
    metrics: dict  # natural_acc, attack_acc1 and its class-bootstrap interval, paired difference, ... (docs/audit.md)
    per_class: list[dict] = field(default_factory=list)  # class, name, n, attack_acc1, attack_acc5, knn_dist, ...
    grid: str = ""  # the PNG grid, relative to the report directory
    info: dict = field(default_factory=dict)  # MODEL_INFO_KEYS
    num_classes: int | None = None
    preprocessing: dict | None = None
    timing: dict | None = None
    delta: dict | None = None  # against the report's first model (None for the first itself)
    budget: dict | None = None  # the attack configuration that ran (S, C, I, K, A, lr, seeds, ...)
    verdict: dict | None = None  # worst case over attacks: status, passed, reason, attack
    attack: str | None = None  # the strongest attack, whose row gives the figures above
    attacks: list[dict] = field(default_factory=list)  # one row per attack: attack, metrics, per_class, verdict, grid, ...
    masking: dict | None = None  # the masking diagnostics (mishield.audit.masking_checks): statistics, signals

    @property
    def attack_acc1(self) -> float | None:
        return self.metrics.get("attack_acc1")

    @property
    def natural_acc(self) -> float | None:
        return self.metrics.get("natural_acc")

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            **self.info,
            "num_classes": self.num_classes,
            "preprocessing": self.preprocessing,
            "metrics": self.metrics,
            "per_class": self.per_class,
            "grid": self.grid,
            "timing": self.timing,
            "delta": self.delta,
            "budget": self.budget,
            "verdict": self.verdict,
            "attack": self.attack,
            "attacks": self.attacks,
            "masking": self.masking,
        }

    @classmethod
    def from_dict(cls, d: dict) -> ModelAudit:
        return cls(
            name=d["name"], metrics=d["metrics"], per_class=d.get("per_class", []), grid=d.get("grid", ""),
            info={k: d[k] for k in MODEL_INFO_KEYS if k in d}, num_classes=d.get("num_classes"),
            preprocessing=d.get("preprocessing"), timing=d.get("timing"), delta=d.get("delta"),
            budget=d.get("budget"), verdict=d.get("verdict"), attack=d.get("attack"), attacks=list(d.get("attacks") or []),
            masking=d.get("masking"),
        )


@dataclass
class AuditReport:
    """One audit of one or more models; the first model is the baseline of every `delta`."""

    models: list[ModelAudit]
    classes: list[int]  # the attacked class ids
    options: dict  # the attack configuration, runtime and provenance: enough to rerun the audit
    prior: dict  # which image prior the attacker optimised through
    eval_model: dict  # the first evaluation model (`eval_models[0]`)
    seed: int = 0
    data: dict = field(default_factory=dict)  # classes, train_images, val_images
    gate: PrivacyGate | None = None
    warnings: list[str] = field(default_factory=list)
    created: str = ""  # ISO 8601, UTC
    mishield_version: str = ""
    files: dict[str, str] = field(default_factory=dict)  # what was written: json, html, grid<i>
    eval_models: list[dict] = field(default_factory=list)  # every evaluation model; each row reads the most leaky
    prior_samples: str | None = None  # the grid of prior samples shown in the HTML, relative to the report
    feature_extractors: list[dict] = field(default_factory=list)  # the feature spaces (mishield.audit.feature_spaces)

    @property
    def passed(self) -> bool:
        """True without a gate; otherwise the gate's verdict."""
        return self.gate is None or self.gate.passed

    def model(self, name: str) -> ModelAudit:
        for m in self.models:
            if m.name == name:
                return m
        raise KeyError(f"no audited model named {name!r}; the report has {', '.join(m.name for m in self.models)}.")

    def to_dict(self) -> dict:
        """The report.json document (NaN written as null)."""
        doc = {
            "schema": SCHEMA,
            "schema_version": SCHEMA_VERSION,
            "created": self.created,
            "mishield_version": self.mishield_version,
            "options": self.options,
            "seed": self.seed,
            "classes": self.classes,
            "data": self.data,
            "prior": self.prior,
            "eval_model": self.eval_model,
            "eval_models": self.eval_models,
            "prior_samples": self.prior_samples,
            "feature_extractors": self.feature_extractors,
            "models": [m.to_dict() for m in self.models],
            "gate": None if self.gate is None else self.gate.to_dict(),
            "warnings": self.warnings,
        }
        if self.files:
            doc["files"] = dict(self.files)
        return finite(doc)

    @classmethod
    def from_dict(cls, d: dict) -> AuditReport:
        """Read a report.json document back (the inverse of `to_dict`)."""
        if d.get("schema") != SCHEMA or d.get("schema_version") not in READABLE_VERSIONS:
            from mishield.errors import BadInputError

            raise BadInputError(
                f"not a {SCHEMA} document of version {' or '.join(map(str, READABLE_VERSIONS))} "
                f"(schema {d.get('schema')!r}, version {d.get('schema_version')!r})."
            )
        gate = d.get("gate")
        return cls(
            models=[ModelAudit.from_dict(m) for m in d["models"]], classes=list(d["classes"]),
            options=d.get("options", {}), prior=d.get("prior", {}), eval_model=d.get("eval_model", {}),
            seed=d.get("seed", 0), data=d.get("data", {}), gate=None if gate is None else PrivacyGate(**gate),
            warnings=list(d.get("warnings", [])), created=d.get("created", ""),
            mishield_version=d.get("mishield_version", ""), files=dict(d.get("files") or {}),
            eval_models=list(d.get("eval_models") or []), prior_samples=d.get("prior_samples"),
            feature_extractors=list(d.get("feature_extractors") or []),
        )
