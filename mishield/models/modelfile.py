"""mishield's own model files: weights plus the recipe that rebuilds the model (docs/architecture.md §6).

A file is either a torch zip holding `{"mishield": recipe, "state_dict": tensors}` (readable with
`torch.load(weights_only=True)`: plain containers and tensors only) or, when the name ends in
`.safetensors`, a safetensors file whose header metadata carries the recipe as JSON. Loading
one needs no flags and no trust: the architecture is rebuilt from a registry name (timm or
torchvision) and the recorded surgery is replayed, then the weights are loaded strictly.
"""

from __future__ import annotations

import datetime as _dt
import json
from pathlib import Path

import torch
from torch import nn

from mishield import __version__
from mishield.errors import BadInputError, UsageError
from mishield.fileio import atomic_output, sha256_file
from mishield.models.architecture import build_architecture
from mishield.models.filechecks import (
    OWN_FACTORIES,
    REGISTRY_FAMILIES,
    check_recipe,
    check_recorded_arch,
)
from mishield.models.loaded import LoadedModel
from mishield.preprocessing import Preprocessing
from mishield.surgery import rebuild

FORMAT = "mishield-model"
FORMAT_VERSION = 1
# Architectures rebuilt without asking: registry names, and factories inside mishield itself
# (the audit's evaluation networks): installed code, not code a file chooses to run. The check
# itself is `mishield.models.filechecks.check_recorded_arch` (exact factory names, not prefixes).
TRUSTED_PREFIXES = (*REGISTRY_FAMILIES, *sorted(OWN_FACTORIES))
# Specs that earlier mishield versions recorded for architectures that have since moved.
_MOVED_ARCHS = {"mishield.attack.evalmodel:plain_cnn": "mishield.models.plaincnn:plain_cnn"}


def save_model(
    path: str | Path,
    model: nn.Module,
    *,
    arch: str | None,
    num_classes: int | None,
    surgery: dict | list[dict] | None,
    preprocessing: Preprocessing,
    source: Path | None = None,
    extra: dict | None = None,
    overwrite: bool = False,
) -> Path:
    """Write `model` with everything needed to rebuild it; atomic, never overwrites by default.

    `surgery` is one spec (`SurgeryResult.spec`) or the list of specs applied in order.
    """
    path = Path(path)
    surgeries = [] if surgery is None else [surgery] if isinstance(surgery, dict) else list(surgery)
    recipe = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "arch": arch,
        "num_classes": num_classes,
        "surgery": surgeries,
        "preprocessing": preprocessing.to_dict(),
        "provenance": {
            "mishield_version": __version__,
            "torch_version": str(torch.__version__),
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "source": str(source) if source else None,
            "source_sha256": sha256_file(source) if source and Path(source).is_file() else None,
        },
        **(extra or {}),
    }
    json.dumps(recipe)  # fail here, before writing, if a caller put something unserialisable in
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_output(path, overwrite) as tmp:
        if path.suffix == ".safetensors":
            from safetensors.torch import save_file

            # safetensors refuses tensors that share memory (tied weights): give each its own.
            save_file({k: v.clone() for k, v in state.items()}, str(tmp), metadata={"mishield": json.dumps(recipe)})
        else:
            torch.save({"mishield": recipe, "state_dict": state}, tmp)
    return path


def is_mishield_payload(obj) -> bool:
    return isinstance(obj, dict) and isinstance(obj.get("mishield"), dict) and obj["mishield"].get("format") == FORMAT


def model_from_payload(payload: dict, *, source: Path | None = None, arch_override=None, trust_checkpoint: bool = False):
    """Rebuild the model a mishield file describes and load its weights (returns a LoadedModel)."""

    recipe = payload["mishield"]
    check_recipe(recipe, source, payload.get("state_dict"))  # types and sizes, before anything is built
    if recipe.get("format_version", 0) > FORMAT_VERSION:
        raise BadInputError(
            f"{source} was written by a newer mishield (format {recipe['format_version']}); upgrade mishield to read it."
        )
    arch = arch_override or _MOVED_ARCHS.get(recipe.get("arch"), recipe.get("arch"))
    if arch is None:
        raise BadInputError(
            f"{source} does not record a rebuildable architecture (it was made from a pickled module); "
            "pass --arch with the architecture it was built from."
        )
    if isinstance(arch, str) and not arch_override:
        check_recorded_arch(arch, source, trust_checkpoint)
    preprocessing = Preprocessing.from_dict(recipe.get("preprocessing", {}))
    model = build_architecture(arch, recipe.get("num_classes"))
    for spec in recipe.get("surgery") or []:
        try:
            model = rebuild(model, spec, preprocessing.input_size)
        except UsageError as err:  # the file, not the command line, asks for the impossible: exit 3
            reason = str(err).rstrip(".")
            raise BadInputError(f"{source} records a surgery that cannot be replayed ({reason}); the file is damaged or was edited.") from None
    try:
        result = model.load_state_dict(payload["state_dict"], strict=False)
    except RuntimeError as err:  # shape mismatches
        raise BadInputError(f"{source} does not fit the architecture it records: {str(err).splitlines()[-1].strip()}") from err
    if result.missing_keys or result.unexpected_keys:
        raise BadInputError(
            f"{source} does not fit the architecture it records ({len(result.missing_keys)} missing keys, "
            f"e.g. {', '.join(result.missing_keys[:3]) or '-'}; {len(result.unexpected_keys)} unexpected, "
            f"e.g. {', '.join(result.unexpected_keys[:3]) or '-'}); the file is damaged or was edited."
        )
    model.eval()
    return LoadedModel(
        model=model,
        arch=arch if isinstance(arch, str) else recipe.get("arch"),
        num_classes=recipe.get("num_classes"),
        preprocessing=preprocessing,
        recipe=recipe,
        source=Path(source) if source else None,
        kind="mishield",  # load_model fills in source_sha256 (hashing once)
        supports_surgery=True,
    )
