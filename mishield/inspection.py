"""`inspect_model`: a model's skip connections, its stages, and what RoLSS / SSF would change,
without changing anything (the library call behind `mishield inspect`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mishield.errors import BadInputError

if TYPE_CHECKING:
    from mishield.models import LoadedModel
    from mishield.surgery import SkipAnalysis, SurgeryPlan


@dataclass
class ModelInspection:
    """What `inspect_model` found. `to_dict()` is the document `mishield inspect --json` prints."""

    model: str  # what was inspected, as given
    loaded: LoadedModel
    plan: SurgeryPlan  # RoLSS on the default (or chosen) stage: which sites a method would change
    parameters: int
    rolss_drops_modules: list[str]  # projection shortcuts RoLSS removes
    rolss_drops_parameters: int

    @property
    def analysis(self) -> SkipAnalysis:
        return self.plan.analysis

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "arch": self.loaded.arch,
            "num_classes": self.loaded.num_classes,
            "parameters": self.parameters,
            "preprocessing": self.loaded.preprocessing.to_dict(),
            "selection": self.plan.selection,
            "selected": self.plan.selected,
            "rolss_drops_modules": self.rolss_drops_modules,
            "rolss_drops_parameters": self.rolss_drops_parameters,
            **self.analysis.to_dict(),
        }


def inspect_model(
    model: str | Path | LoadedModel,
    *,
    stage: int | None = None,
    sites: list[str] | str | None = None,
    load_options: dict | None = None,
) -> ModelInspection:
    """Find every skip site of `model` (a `LoadedModel`, or a file or spec for `load_model` with
    `load_options`) and mark those a method would change on `stage` / `sites` (default: the last stage)."""
    from mishield.models import LoadedModel, load_model
    from mishield.surgery import plan_surgery

    loaded = model if isinstance(model, LoadedModel) else load_model(str(model), **(load_options or {}))
    label = str(model) if not isinstance(model, LoadedModel) else str(loaded.source or loaded.arch)
    if not loaded.supports_surgery:
        raise BadInputError(
            f"{label} is a {loaded.kind} archive, which cannot be traced for surgery; inspect the original "
            "checkpoint instead (audit and export accept it as it is)."
        )
    plan = plan_surgery(loaded.model, "rolss", stage=stage, sites=[sites] if isinstance(sites, str) else sites,
                        input_size=loaded.preprocessing.input_size)
    dropped = sorted({m for name in plan.selected for m in plan.analysis.site(name).shortcut_modules})
    return ModelInspection(
        model=label,
        loaded=loaded,
        plan=plan,
        parameters=sum(p.numel() for p in loaded.model.parameters()),
        rolss_drops_modules=dropped,
        rolss_drops_parameters=sum(p.numel() for path in dropped for p in loaded.model.get_submodule(path).parameters()),
    )
