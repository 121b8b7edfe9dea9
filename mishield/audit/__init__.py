"""The audit: attack each model, judge what the attack recovers, and report how much it leaks.

    import mishield
    from mishield.audit import AuditConfig

    report = mishield.audit(["model.pt", "hardened.pt"], data="private/", prior="prior.safetensors",
                            eval_model="eval.pt", config=AuditConfig.preset("default", max_attack_acc=0.5))

`mishield.audit` is this package and, called, the audit itself (`mishield.audit.runner.audit`):
a package may not also be a function, so the package is callable. The modules, in the order an
audit uses them (docs/architecture.md §3):

    config.py       AuditConfig: the attack budget (a preset), the attacks, the gate, the options
    loading.py      the models, evaluators, private data, prior and surrogates an audit reads
    trust.py        checks before any attack: evaluator, prior, targets that cannot be gated
    budgets.py      the smallest attack budget a gate may rely on
    runner.py       audit() and AuditRun: attack every model (mishield.attack), gather the shards
    distributed.py  classes sharded across torchrun ranks
    evaluator.py    the independent evaluation model that judges reconstructions
    outcomes.py     what one shard of one attack hands to the judging (typed, per evaluator)
    judging.py      rows per model and attack, the most leaky evaluator, the worst case, the gate
    metrics.py      attack accuracy, KNN distance, Δ
    stats.py        intervals with the class as the unit, Wilson, chance, verdicts
    results.py      AuditReport, ModelAudit, PrivacyGate (report.json)
    report.py       report.html, the image grids, the terminal table
    junit.py        the gate's result as a JUnit XML test report (CI systems show it natively)
    surrogates.py   surrogate files matched to the models they imitate

The attack engine it drives is `mishield.attack`, which never imports this package.
"""

from __future__ import annotations

import sys
import types


class _AuditPackage(types.ModuleType):
    def __call__(self, models, /, **kwargs):
        """Run the audit: `mishield.audit.runner.audit(models, **kwargs)`."""
        from mishield.audit.runner import audit

        return audit(models, **kwargs)

    def __getattr__(self, name: str):
        # `from mishield.audit import AuditConfig` without importing torch.
        if name == "AuditConfig":
            from mishield.audit.config import AuditConfig

            return AuditConfig
        raise AttributeError(f"module 'mishield.audit' has no attribute {name!r}")


sys.modules[__name__].__class__ = _AuditPackage
