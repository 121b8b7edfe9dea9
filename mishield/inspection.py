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
    # where the input size came from: "file", "input_size" (given), "data" or "default" (the
    # architecture's; the stages' resolutions then describe that size, not the user's images)
    input_size_source: str = "file"

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
            "input_size_source": self.input_size_source,
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
    data: str | Path | None = None,
    load_options: dict | None = None,
) -> ModelInspection:
    """Find every skip site of `model` (a `LoadedModel`, or a file or spec for `load_model` with
    `load_options`) and mark those a method would change on `stage` / `sites` (default: the last stage).

    A plain state dict does not record its input size: with `data` (the private ImageFolder) it is
    inspected at the size `harden` and `audit` would use for those images, otherwise at the
    architecture's default, which `input_size_source` says.
    """
    from mishield.models import LoadedModel, load_model
    from mishield.surgery import plan_surgery

    loaded = model if isinstance(model, LoadedModel) else load_model(str(model), **(load_options or {}))
    label = str(model) if not isinstance(model, LoadedModel) else str(loaded.source or loaded.arch)
    if not loaded.supports_surgery:
        raise BadInputError(
            f"{label} is a {loaded.kind} archive, which cannot be traced for surgery; inspect the original "
            "checkpoint instead (audit and export accept it as it is)."
        )
    size_given = isinstance(model, LoadedModel) or (load_options or {}).get("input_size") is not None
    source = "input_size" if size_given and not isinstance(model, LoadedModel) else "file"
    if not size_given and loaded.kind not in ("mishield", "torchscript", "exported"):
        source = "default"
        if data is not None:
            from mishield.data import fit_resolution, load_image_folders

            loaded, source = fit_resolution(loaded, load_image_folders(data).train, False), "data"
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
        input_size_source=source,
    )
