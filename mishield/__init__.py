"""mishield: harden image classifiers against model-inversion attacks, and prove it.

The public API (everything in `__all__`), grouped by what a user does:

* load and save models: `load_model`, `save_model`, `LoadedModel`;
* look before changing anything: `inspect_model` -> `ModelInspection`;
* harden in one call (surgery, and with private data fine-tuning): `harden` -> `HardenResult`;
* find skip connections and rewrite them step by step: `analyse`, `plan_surgery`, `apply_plan`,
  `SkipSite`, `SurgeryPlan`, `SurgeryResult`;
* fine-tune with your own loop around it: `TrainingRecipe`, `run_schedule`;
* measure the leak: `audit` -> `AuditReport` (one `ModelAudit` per model, a `PrivacyGate`);
  distil surrogates of a target for the adaptive attack: `train_surrogate` -> `SurrogateResult`;
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
    "HardenResult": "mishield.hardening",
    "harden": "mishield.hardening",
    "ModelInspection": "mishield.inspection",
    "inspect_model": "mishield.inspection",
    "AuditReport": "mishield.attack.results",
    "ModelAudit": "mishield.attack.results",
    "PrivacyGate": "mishield.attack.results",
    "audit": "mishield.attack.audit",
    "SurrogateResult": "mishield.attack.surrogates",
    "train_surrogate": "mishield.attack.surrogates",
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
    "AuditReport",
    "BadInputError",
    "HardenResult",
    "LoadedModel",
    "MishieldError",
    "ModelAudit",
    "ModelInspection",
    "OnnxExportReport",
    "OutputError",
    "ParityError",
    "PrivacyGate",
    "PrivacyGateError",
    "SkipSite",
    "SurgeryPlan",
    "SurgeryResult",
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
    "train_surrogate",
]


def __getattr__(name: str):
    module = _API.get(name)
    if module is None:
        raise AttributeError(f"module 'mishield' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))

