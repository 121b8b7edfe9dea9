"""mishield: harden image classifiers against model-inversion attacks, and prove it.

The public API (everything in `__all__`), grouped by what a user does:

* load and save models: `load_model`, `save_model`, `LoadedModel`;
* look before changing anything: `inspect_model` -> `ModelInspection`;
* harden in one call (surgery, and with private data fine-tuning with stacked defences):
  `harden(model, config=HardenConfig(...))` -> `HardenResult`;
* search a grid of stacked defences for the least leaky within an accuracy budget:
  `search_defences(model, data=..., public=..., out=..., config=SearchConfig(...))` -> `SearchResult`;
* find skip connections and rewrite them step by step: `analyse`, `plan_surgery`, `apply_plan`,
  `SkipSite`, `SurgeryPlan`, `SurgeryResult`;
* fine-tune with your own loop around it: `TrainingRecipe`, `RunOptions`, `run_schedule`;
* measure the leak: `audit(models, ..., config=AuditConfig.preset(...))` -> `AuditReport` (one
  `ModelAudit` per model, a `PrivacyGate`; the budget is an `AttackConfig`); train what an audit
  needs: the image prior (`train_prior`, `PriorTrainingConfig`), the evaluation model
  (`train_eval_model`, `EvalModelConfig`) and surrogates for the adaptive attack (`train_surrogate`,
  `SurrogateConfig` -> `SurrogateResult`);
* export: `export_onnx`, `OnnxExportReport`;
* errors, each carrying the CLI's exit code: `MishieldError`, `UsageError`, `BadInputError`,
  `PrivacyGateError`, `ParityError`, `OutputError`.

Names are imported on first use, so `import mishield` (and `mishield --help`) stays cheap and
does not import torch. The layers behind these names: docs/architecture.md.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> the module that defines it
_API = {
    "LoadedModel": "mishield.models",
    "load_model": "mishield.models",
    "save_model": "mishield.models",
    "SkipSite": "mishield.surgery",
    "SurgeryPlan": "mishield.surgery",
    "SurgeryResult": "mishield.surgery",
    "analyse": "mishield.surgery",
    "apply_plan": "mishield.surgery",
    "plan_surgery": "mishield.surgery",
    "HardenConfig": "mishield.hardening",
    "HardenResult": "mishield.hardening",
    "harden": "mishield.hardening",
    "SearchConfig": "mishield.search.config",
    "SearchResult": "mishield.search.results",
    "search_defences": "mishield.search.runner",
    "ModelInspection": "mishield.inspection",
    "inspect_model": "mishield.inspection",
    "AttackConfig": "mishield.attack.config",
    "AuditConfig": "mishield.audit.config",
    "AuditReport": "mishield.audit.results",
    "ModelAudit": "mishield.audit.results",
    "PrivacyGate": "mishield.audit.results",
    "audit": "mishield.audit",
    "SurrogateConfig": "mishield.training.distillation",
    "SurrogateResult": "mishield.training.distillation",
    "train_surrogate": "mishield.training.distillation",
    "EvalModelConfig": "mishield.training.evaluator",
    "train_eval_model": "mishield.training.evaluator",
    "PriorTrainingConfig": "mishield.training.prior",
    "train_prior": "mishield.training.prior",
    "RunOptions": "mishield.training",
    "TrainingRecipe": "mishield.training",
    "run_schedule": "mishield.training",
    "OnnxExportReport": "mishield.onnx_export",
    "export_onnx": "mishield.onnx_export",
    "MishieldError": "mishield.errors",
    "UsageError": "mishield.errors",
    "BadInputError": "mishield.errors",
    "PrivacyGateError": "mishield.errors",
    "ParityError": "mishield.errors",
    "OutputError": "mishield.errors",
}

__all__ = [
    "AttackConfig",
    "AuditConfig",
    "AuditReport",
    "BadInputError",
    "EvalModelConfig",
    "HardenConfig",
    "HardenResult",
    "LoadedModel",
    "MishieldError",
    "ModelAudit",
    "ModelInspection",
    "OnnxExportReport",
    "OutputError",
    "ParityError",
    "PriorTrainingConfig",
    "PrivacyGate",
    "PrivacyGateError",
    "RunOptions",
    "SearchConfig",
    "SearchResult",
    "SkipSite",
    "SurgeryPlan",
    "SurgeryResult",
    "SurrogateConfig",
    "SurrogateResult",
    "TrainingRecipe",
    "UsageError",
    "__version__",
    "analyse",
    "apply_plan",
    "audit",
    "export_onnx",
    "harden",
    "inspect_model",
    "load_model",
    "plan_surgery",
    "run_schedule",
    "save_model",
    "search_defences",
    "train_eval_model",
    "train_prior",
    "train_surrogate",
]


def __getattr__(name: str):
    module = _API.get(name)
    if module is None:
        raise AttributeError(f"module 'mishield' has no attribute {name!r}")
    found = importlib.import_module(module)
    # `mishield.audit` is a callable package (mishield/audit/__init__.py), not a name inside one.
    value = found if module == f"mishield.{name}" else getattr(found, name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))

