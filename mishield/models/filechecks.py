"""What a model file may make mishield do, checked before anything is built from it.

Every file mishield reads is untrusted input (docs/reliability.md). Weights-only unpickling keeps
a checkpoint from running code as it is read, but three things a file carries would still act:

* a TorchScript archive or a `torch.export` `.pt2` program is code: TorchScript runs a module's
  `__setstate__` while loading, a program's graph runs its operators. Both load only with
  `trust_checkpoint` (`--trust-checkpoint`), like a pickled module.
* an architecture recorded in the file (`{"arch": ..., "state_dict": ...}`, safetensors metadata,
  a mishield recipe) is imported and called to build the model. A registry name (`timm:NAME`,
  `torchvision:NAME`) or one of mishield's own factories only builds a network; any other
  `package.module:factory` runs whatever that function does (`os:abort`, `http.server:test`),
  so it is accepted from the command line (`--arch`) or with trust only.
* the numbers a recipe records size what is allocated (the input probe of the surgery, the
  classifier head): a damaged or hostile recipe is refused with one sentence before any of it.

Weights that are NaN or infinite are refused as well: nothing mishield does with such a model
(surgery, fine-tuning, export, audit) gives a meaningful result, and the errors it would meet
later ("lower --lr", "raise --atol") would point the user at the wrong cause.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from numbers import Real

import torch

from mishield.errors import BadInputError

# Factories inside mishield itself: installed code that only builds a network. Exact specs, not
# prefixes, so that no attribute path below them (`plain_cnn.__class__`) passes as trusted.
OWN_FACTORIES = frozenset({"mishield.models.plaincnn:plain_cnn"})
REGISTRY_FAMILIES = ("timm:", "torchvision:")
PROGRAM_KINDS = {"torchscript": "a TorchScript archive", "exported": "a torch.export program"}
# A recorded input size is probed with a real forward pass (the skip analysis): bound it before
# that pass allocates. 4096 px is four times StyleGAN's 1024 px faces.
MAX_INPUT_SIDE = 4096
MAX_CHANNELS = 4


def builds_only_a_network(arch: str) -> bool:
    """True for the architecture specs that cannot run code of a file's choosing."""
    return arch.startswith(REGISTRY_FAMILIES) or arch in OWN_FACTORIES


def check_recorded_arch(arch: str | None, source, trust: bool) -> None:
    """Refuse an architecture a *file* names when building it would run code it chose."""
    if arch is None or trust or builds_only_a_network(arch):
        return
    raise BadInputError(
        f"{source} records the architecture {arch}, a package.module:factory that mishield would import and "
        f"call (running its code); confirm it with --arch {arch} (or --trust-checkpoint) only if you trust the file."
    )


def refuse_program(name: str, kind: str, trust: bool, instead: str = "a state dict, .safetensors or mishield file") -> None:
    """TorchScript and `.pt2` files run code when loaded: only with `trust_checkpoint`."""
    if trust:
        return
    raise BadInputError(
        f"{name} is {PROGRAM_KINDS[kind]}, a program whose code runs when it is loaded; pass --trust-checkpoint "
        f"only if you trust its source, or give mishield {instead} instead."
    )


def check_finite(tensors: Mapping[str, torch.Tensor], name: str) -> None:
    """Refuse weights (parameters or buffers) that hold NaN or infinite values, naming the first."""
    for key, tensor in tensors.items():
        if not isinstance(tensor, torch.Tensor) or not (tensor.is_floating_point() or tensor.is_complex()):
            continue
        if tensor.device.type == "meta" or bool(torch.isfinite(tensor).all()):
            continue
        what = "NaN" if bool(torch.isnan(tensor).any()) else "infinite"
        raise BadInputError(
            f"{name} has {what} weights in {key}; the file is damaged or its training diverged, "
            "use an earlier checkpoint of it."
        )


# --------------------------------------------------------------------------- mishield recipes


def _damaged(source, field: str, expected: str, value) -> BadInputError:
    shown = repr(value)
    shown = shown if len(shown) <= 60 else shown[:57] + "..."
    return BadInputError(
        f"{source} has a damaged recipe: {field} must be {expected}, got {shown}; re-create the file with mishield."
    )


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value)


def check_recipe(recipe: Mapping, source, state_dict: Mapping | None = None) -> None:
    """Types and ranges of everything `model_from_payload` builds from, before it builds.

    `state_dict` (the file's tensors) lets a recorded class count be checked against the weights
    instead of a fixed cap: a real head has a tensor with that many rows, a forged count does not,
    and it is refused before a head of that size is allocated.
    """
    if state_dict is not None and not (
        isinstance(state_dict, Mapping) and all(isinstance(t, torch.Tensor) for t in state_dict.values())
    ):
        raise BadInputError(f"{source} is damaged: its state_dict is not a mapping of tensors; re-create the file with mishield.")
    version = recipe.get("format_version", 0)
    if not _is_int(version) or version < 0:
        raise _damaged(source, "format_version", "a whole number", version)
    if recipe.get("arch") is not None and not isinstance(recipe["arch"], str):
        raise _damaged(source, "arch", "an architecture spec such as timm:resnet50", recipe["arch"])
    _check_num_classes(recipe.get("num_classes"), source, state_dict)
    preprocessing = recipe.get("preprocessing", {})
    if not isinstance(preprocessing, Mapping):
        raise _damaged(source, "preprocessing", "a mapping", preprocessing)
    _check_preprocessing(preprocessing, source)
    _check_surgery(recipe.get("surgery"), source)
    classes = recipe.get("classes")
    if classes is not None and not (isinstance(classes, list) and all(isinstance(c, str) for c in classes)):
        raise _damaged(source, "classes", "a list of class names", classes)
    for key in ("training", "metrics", "provenance", "surrogate"):
        if recipe.get(key) is not None and not isinstance(recipe[key], Mapping):
            raise _damaged(source, key, "a mapping", recipe[key])


def _check_num_classes(count, source, state_dict: Mapping | None) -> None:
    if count is None:
        return
    if not _is_int(count) or count < 1:
        raise _damaged(source, "num_classes", "a positive whole number", count)
    if state_dict is None:
        return
    rows = {int(t.shape[0]) for t in state_dict.values() if isinstance(t, torch.Tensor) and t.dim() >= 1}
    if count not in rows:
        raise BadInputError(
            f"{source} has a damaged recipe: it records {count} classes but none of its weights has {count} rows; "
            "re-create the file with mishield."
        )


def _check_preprocessing(pre: Mapping, source) -> None:
    size = pre.get("input_size", (3, 224, 224))
    if not (isinstance(size, (list, tuple)) and len(size) == 3 and all(_is_int(v) for v in size)):
        raise _damaged(source, "preprocessing.input_size", "[channels, height, width] as whole numbers", size)
    channels, height, width = size
    if not 1 <= channels <= MAX_CHANNELS:
        raise _damaged(source, "preprocessing.input_size", f"1 to {MAX_CHANNELS} channels", size)
    if not (8 <= height <= MAX_INPUT_SIDE and 8 <= width <= MAX_INPUT_SIDE):
        raise _damaged(source, "preprocessing.input_size", f"a height and width from 8 to {MAX_INPUT_SIDE} px", size)
    for key in ("mean", "std"):
        values = pre.get(key)
        if values is None:
            continue
        if not (isinstance(values, (list, tuple)) and 1 <= len(values) <= MAX_CHANNELS and all(_is_real(v) for v in values)):
            raise _damaged(source, f"preprocessing.{key}", "a list of 1 to 4 finite numbers", values)
        if key == "std" and any(v <= 0 for v in values):
            raise _damaged(source, "preprocessing.std", "positive", values)
    interpolation = pre.get("interpolation", "bilinear")
    if not isinstance(interpolation, str):  # an unknown name falls back to bilinear (mishield.data)
        raise _damaged(source, "preprocessing.interpolation", "a name such as bilinear", interpolation)


def _check_surgery(surgery, source) -> None:
    from mishield.surgery import METHODS

    if surgery is None:
        return
    if not isinstance(surgery, list):
        raise _damaged(source, "surgery", "a list of recorded surgeries", surgery)
    for spec in surgery:
        if not isinstance(spec, Mapping):
            raise _damaged(source, "surgery", "a list of mappings", spec)
        if spec.get("method") not in METHODS:
            raise _damaged(source, "surgery.method", " or ".join(METHODS), spec.get("method"))
        sites = spec.get("sites")
        if not (isinstance(sites, list) and all(isinstance(s, str) for s in sites)):
            raise _damaged(source, "surgery.sites", "a list of skip-site names", sites)
        alpha = spec.get("alpha")
        if alpha is not None and not (_is_real(alpha) and 0 <= alpha <= 1):
            raise _damaged(source, "surgery.alpha", "a number from 0 to 1", alpha)
