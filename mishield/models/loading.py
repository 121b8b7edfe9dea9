"""One loader for every way a user can hand mishield a classifier.

A MODEL argument is a checkpoint file (plain or nested state dict, timm training checkpoint,
safetensors, a mishield output, TorchScript, a `torch.export` .pt2, or, with explicit trust,
a pickled `nn.Module`) or a bare architecture spec (`timm:NAME`, `torchvision:NAME`,
`package.module:factory`) that builds a randomly initialised model.

Security: checkpoints are unpickled with `weights_only=True`, always. A file that needs more
than tensors and plain containers is refused with the list of Python globals it would import,
found by reading its pickle opcodes (nothing is executed); only `trust_checkpoint=True` loads
it with the full unpickler. Input files are only ever read.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import warnings
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import nn

from mishield.errors import BadInputError, UsageError, first_line
from mishield.fileio import sha256_file
from mishield.models import modelfile
from mishield.models.architecture import (
    ARCH_HINT,
    arch_label,
    build_architecture,
    callable_spec,
    is_arch_spec,
)
from mishield.models.filechecks import check_finite, check_recorded_arch, refuse_program
from mishield.models.introspect import (
    count_classes,
    default_preprocessing,
    find_classifier,
)
from mishield.models.loaded import LoadedModel
from mishield.models.pickles import pickle_imports
from mishield.preprocessing import Preprocessing

__all__ = ["load_model"]

# Checked in this order. The raw training weights win over an EMA copy: they are what the
# training run evaluated and exported unless the user chose otherwise, and an EMA taken early
# in (or from a short) run lags far behind them (decay 0.9998 averages over ~5000 steps), so
# silently preferring it could hand back a near-untrained model. EMA is used only when it is
# the sole state dict in the file.
_STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model", "module")
_EMA_KEYS = ("state_dict_ema", "model_ema")
# Stripped only while every key carries them: DataParallel/DDP, torch.compile, Lightning-style wrappers.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.", "model.")



def load_model(
    model: str | Path,
    *,
    arch: str | Callable | None = None,
    num_classes: int | None = None,
    trust_checkpoint: bool = False,
    input_size: int | None = None,
    mean: tuple[float, ...] | None = None,
    std: tuple[float, ...] | None = None,
) -> LoadedModel:
    """Load a classifier from a file or build one from an architecture spec.

    `arch` overrides (or supplies) the architecture of a state dict; `num_classes` is inferred
    from the classifier weight when absent; `input_size`, `mean` and `std` override the
    preprocessing the model or file records. Every user mistake raises `BadInputError`.
    """
    loaded = _load(model, arch, num_classes, trust_checkpoint, input_size)
    if mean is None and std is None:
        return loaded
    prep = loaded.preprocessing
    channels = prep.input_size[0]
    for name, values in (("--mean", mean), ("--std", std)):
        if values is not None and len(values) not in (1, channels):
            raise UsageError(f"{name} needs 1 or {channels} values (the model has {channels} input channels).")
    if std is not None and any(v <= 0 for v in std):
        raise UsageError("--std values must be positive.")

    def per_channel(values, default):
        return default if values is None else tuple(float(v) for v in values) * (channels if len(values) == 1 else 1)

    prep = dataclasses.replace(prep, mean=per_channel(mean, prep.mean), std=per_channel(std, prep.std))
    return dataclasses.replace(loaded, preprocessing=prep)


def _load(model, arch, num_classes, trust_checkpoint, input_size) -> LoadedModel:
    path = Path(model)
    if not path.exists():
        if isinstance(model, str) and is_arch_spec(model):
            if arch is not None and arch != model:
                raise UsageError(f"MODEL {model} is already an architecture spec; drop --arch {arch_label(arch)}.")
            return _from_spec(model, num_classes, input_size)
        raise BadInputError(f"No such file: {path}; pass a model file or an architecture spec such as timm:resnet50.")
    if path.is_dir():
        raise BadInputError(f"{path} is a directory; pass a model file (.pt, .pth, .bin, .safetensors or .pt2).")
    try:
        digest = sha256_file(path)
    except OSError as e:
        raise BadInputError(f"Cannot read {path} ({e.strerror or e}); check the path and its permissions.") from None
    loaded = _load_file(path, arch, num_classes, trust_checkpoint, input_size)
    check_finite(loaded.model.state_dict(), path.name)
    return dataclasses.replace(loaded, source=path, source_sha256=digest)


# --------------------------------------------------------------------------- file formats


def _from_spec(spec: str, num_classes: int | None, input_size: int | None) -> LoadedModel:
    model = build_architecture(spec, num_classes).eval()
    return LoadedModel(
        model=model,
        arch=spec,
        num_classes=count_classes(model) or num_classes,
        preprocessing=default_preprocessing(model, spec).with_input_size(input_size),
        kind="spec",
    )


def _load_file(path: Path, arch, num_classes, trust: bool, input_size) -> LoadedModel:
    name = path.name
    size = path.stat().st_size
    if size == 0:
        raise BadInputError(f"{name} is empty (0 bytes); re-save or re-download the model file.")
    with open(path, "rb") as f:
        head = f.read(16)
    if head.startswith(b"PK\x03\x04"):
        try:
            with zipfile.ZipFile(path) as zf:
                entries = zf.namelist()
        except (zipfile.BadZipFile, OSError):
            raise BadInputError(
                f"{name} is truncated or damaged (its zip directory is missing);"
                " re-download or re-save it."
            ) from None
        # Programs, not data: refused before torch reads a byte of them unless trusted.
        if any(re.match(r"^[^/]+/(archive_format|models/[^/]+\.json)$", e) for e in entries):
            refuse_program(name, "exported", trust)
            return _load_exported(path, num_classes, input_size)
        if any(re.match(r"^[^/]+/(code/|constants\.pkl$)", e) for e in entries):
            refuse_program(name, "torchscript", trust)
            return _load_torchscript(path, num_classes, input_size)
        if not any(re.match(r"^([^/]+/)?data\.pkl$", e) for e in entries):
            raise BadInputError(
                f"{name} is a zip archive but not a PyTorch model file (no data.pkl inside);"
                " pass a model saved with torch.save."
            )
        return _load_torch(path, arch, num_classes, trust, input_size)
    if path.suffix == ".safetensors" or _looks_like_safetensors(head, size):
        return _load_safetensors(path, arch, num_classes, trust, input_size)
    return _load_torch(path, arch, num_classes, trust, input_size)


def _looks_like_safetensors(head: bytes, size: int) -> bool:
    if len(head) < 9:
        return False
    header_len = int.from_bytes(head[:8], "little")
    return 2 <= header_len <= size - 8 and head[8:9] == b"{"


def _load_safetensors(path: Path, arch, num_classes, trust: bool, input_size) -> LoadedModel:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open is not iterable
    except Exception as e:  # noqa: BLE001 - safetensors' own error type; every failure is bad input
        if "incomplete" in str(e) or "not fully covered" in str(e) or _safetensors_truncated(path):
            raise BadInputError(f"{path.name} is a truncated safetensors file; re-download or re-save it.") from None
        raise BadInputError(f"{path.name} is not a PyTorch/safetensors model file ({first_line(e)}).") from None
    if "mishield" in metadata:
        try:
            recipe = json.loads(metadata["mishield"])
            if not isinstance(recipe, dict):
                raise json.JSONDecodeError("not an object", metadata["mishield"], 0)
        except (json.JSONDecodeError, RecursionError):  # RecursionError: JSON nested thousands deep
            raise BadInputError(
                f"{path.name} has a damaged mishield recipe in its metadata;"
                " re-create the file."
            ) from None
        payload = {"mishield": recipe, "state_dict": tensors}
        return _from_mishield(payload, path, arch, num_classes, input_size, trust)
    file_arch = metadata.get("arch")
    return _from_state_dict(tensors, path.name, _choose_arch(arch, file_arch, path.name, trust), num_classes, input_size)


def _safetensors_truncated(path: Path) -> bool:
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            if 8 + header_len > size:
                return True
            header = json.loads(f.read(header_len))
        ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
        return 8 + header_len + max(ends, default=0) > size
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return False


def _torch_load_safe(path: Path):
    # timm's train.py stores its argparse Namespace under "args"; it holds only plain values.
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(path, map_location="cpu", weights_only=True)


def _load_torch(path: Path, arch, num_classes, trust: bool, input_size) -> LoadedModel:
    try:
        obj = _torch_load_safe(path)
    except Exception as e:  # noqa: BLE001 - torch.load raises many types; sorted out right below
        obj = _after_safe_load_failed(path, e, trust)
    if isinstance(obj, nn.Module) or _nested_module(obj) is not None:
        return _from_pickled_module(obj, path, num_classes, input_size)
    if _is_mishield(obj):
        return _from_mishield(obj, path, arch, num_classes, input_size, trust)
    state_dict, file_arch = _find_state_dict(obj, path.name)
    return _from_state_dict(state_dict, path.name, _choose_arch(arch, file_arch, path.name, trust), num_classes, input_size)


def _after_safe_load_failed(path: Path, error: Exception, trust: bool):
    """Explain why a weights-only load failed; with trust, unpickle a file that needs code."""
    name = path.name
    imports, state = pickle_imports(path)
    needs_code = bool(imports) or "Unsupported global" in str(error)
    if needs_code and not trust:
        if not imports:
            imports = re.findall(r"GLOBAL (\S+) was not an allowed global", str(error)) or ["unknown globals"]
        shown = ", ".join(imports[:3]) + (f" (+{len(imports) - 3} more)" if len(imports) > 3 else "")
        raise BadInputError(
            f"{name} is a pickled Python object that would import {shown} when loaded; loading it runs code "
            "from the file — pass --trust-checkpoint only if you trust its source, or save a state_dict instead."
        )
    if needs_code:
        try:
            return torch.load(path, map_location="cpu", weights_only=False)
        except ImportError as e:
            raise BadInputError(
                f"{name} needs the Python module {e.name or e} to load;"
                " install it, or save a state_dict instead."
            ) from None
        except Exception as e:  # noqa: BLE001 - trusted unpickling runs the file's own code
            raise BadInputError(
                f"{name} could not be unpickled even with --trust-checkpoint "
                f"({type(e).__name__}: {first_line(e)}); re-save it as a state_dict."
            ) from None
    if isinstance(error, EOFError) or state == "truncated":
        raise BadInputError(f"{name} is truncated or damaged; re-download or re-save it.")
    if state == "complete":
        raise BadInputError(
            f"{name} is damaged or not a checkpoint PyTorch can read ({_torch_reason(error)});"
            " re-save it with torch.save."
        )
    raise BadInputError(
        f"{name} is not a PyTorch/safetensors model file;"
        " pass a .pt/.pth/.bin/.safetensors/.pt2 checkpoint."
    )


def _torch_reason(error: Exception) -> str:
    """The informative part of a torch.load error (its weights-only preamble is about code execution)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error))
    inner = re.search(r"WeightsUnpickler error:\s*(.+)", text)
    return (inner.group(1).strip() if inner else first_line(error))[:200]


def _from_pickled_module(obj, path: Path, num_classes, input_size) -> LoadedModel:
    model = obj if isinstance(obj, nn.Module) else _nested_module(obj)
    model = model.to("cpu").eval()
    found = count_classes(model)
    _check_num_classes(path.name, found, num_classes)
    return LoadedModel(
        model=model,
        arch=None,
        num_classes=found or num_classes,
        preprocessing=default_preprocessing(model, None).with_input_size(input_size),
        kind="pickled_module",
        supports_surgery=True,
    )


def _nested_module(obj) -> nn.Module | None:
    """A trusted pickle shaped {'model': <nn.Module>, 'optimizer': ...}, as many training scripts save."""
    if isinstance(obj, Mapping):
        for key in _STATE_DICT_KEYS + _EMA_KEYS:
            if isinstance(obj.get(key), nn.Module):
                return obj[key]
    return None


def _load_torchscript(path: Path, num_classes, input_size) -> LoadedModel:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # jit deprecation notice: nothing the user can act on
            model = torch.jit.load(str(path), map_location="cpu")
    except Exception as e:  # noqa: BLE001 - any failure means a damaged archive
        raise BadInputError(
            f"{path.name} looks like a TorchScript archive but cannot be loaded ({first_line(e)});"
            " re-export it."
        ) from None
    model.eval()
    found = count_classes(model)
    _check_num_classes(path.name, found, num_classes)
    return LoadedModel(
        model=model,
        arch=None,
        num_classes=found or num_classes,
        preprocessing=Preprocessing().with_input_size(input_size),
        kind="torchscript",
        supports_surgery=False,
    )


def _load_exported(path: Path, num_classes, input_size) -> LoadedModel:
    try:
        program = torch.export.load(str(path))
        model = program.module()
    except Exception as e:  # noqa: BLE001 - any failure means a damaged program
        raise BadInputError(
            f"{path.name} looks like a torch.export program but cannot be loaded ({first_line(e)});"
            " re-export it."
        ) from None
    # An exported program is frozen in the mode it was exported in; its module refuses train()/eval().
    in_shape, out_shape = _exported_shapes(program)
    pre = Preprocessing()
    if in_shape is not None and len(in_shape) == 4:
        pre = Preprocessing(input_size=tuple(in_shape[1:]))
        if in_shape[1] != 3:
            pre = Preprocessing(input_size=tuple(in_shape[1:]), mean=(0.5,) * in_shape[1], std=(0.5,) * in_shape[1])
    found = out_shape[-1] if out_shape else None
    _check_num_classes(path.name, found, num_classes)
    return LoadedModel(
        model=model,
        arch=None,
        num_classes=found or num_classes,
        preprocessing=pre.with_input_size(input_size),
        kind="exported",
        supports_surgery=False,
    )


def _exported_shapes(program) -> tuple[tuple[int, ...] | None, tuple[int, ...] | None]:
    """Static (input, output) shapes recorded in the program's graph; symbolic dims become -1."""

    def shape(node) -> tuple[int, ...] | None:
        val = getattr(node, "meta", {}).get("val")
        if not isinstance(val, torch.Tensor):
            return None
        return tuple(int(d) if isinstance(d, int) else -1 for d in val.shape)

    try:
        user_inputs = set(program.graph_signature.user_inputs)
        inputs = [n for n in program.graph.nodes if n.op == "placeholder" and n.name in user_inputs]
        outputs = [n for n in program.graph.nodes if n.op == "output"]
        in_shape = shape(inputs[0]) if len(inputs) == 1 else None
        out_args = outputs[0].args[0] if outputs else ()
        out_shape = shape(out_args[0]) if isinstance(out_args, (tuple, list)) and len(out_args) == 1 else None
    except (AttributeError, IndexError, KeyError, TypeError):
        return None, None
    if in_shape and -1 in in_shape[1:]:
        in_shape = None
    if out_shape and out_shape[-1] == -1:
        out_shape = None
    return in_shape, out_shape


def _check_num_classes(name: str, found: int | None, requested: int | None) -> None:
    if requested is not None and found is not None and requested != found:
        raise BadInputError(
            f"{name} has {found} classes but --num-classes {requested} was given;"
            " drop --num-classes or fix it."
        )


# --------------------------------------------------------------------------- state dicts


def _is_mishield(obj) -> bool:
    if not isinstance(obj, Mapping):
        return False
    return modelfile.is_mishield_payload(obj)


def _from_mishield(payload, path: Path, arch, num_classes, input_size, trust: bool) -> LoadedModel:
    # trust is forwarded because a recipe naming a package.module:factory imports that module.
    loaded = modelfile.model_from_payload(payload, source=path, arch_override=arch, trust_checkpoint=trust)
    _check_num_classes(path.name, loaded.num_classes, num_classes)
    if input_size is not None:
        loaded = dataclasses.replace(loaded, preprocessing=loaded.preprocessing.with_input_size(input_size))
    return loaded


def _is_state_dict(node: Mapping) -> bool:
    values = list(node.values())
    return any(isinstance(v, torch.Tensor) for v in values) and not any(isinstance(v, Mapping) for v in values)


def _find_state_dict(obj, name: str) -> tuple[dict[str, torch.Tensor], str | None]:
    """Unwrap checkpoint nesting down to the tensors; also return an `arch` recorded on the way."""
    if not isinstance(obj, Mapping):
        raise BadInputError(f"{name} holds a {type(obj).__name__}, not a state dict; save model.state_dict() instead.")
    file_arch, node = None, obj
    for _ in range(8):
        if file_arch is None and isinstance(node.get("arch"), str):
            file_arch = node["arch"]
        if _is_state_dict(node):
            return {k: v for k, v in node.items() if isinstance(v, torch.Tensor)}, file_arch
        key = next((k for k in _STATE_DICT_KEYS if isinstance(node.get(k), Mapping)), None)
        key = key or next((k for k in _EMA_KEYS if isinstance(node.get(k), Mapping)), None)
        if key is None:
            keys = ", ".join(map(str, list(node)[:6])) or "none"
            raise BadInputError(
                f"{name} holds no state dict (keys: {keys}); "
                "expected tensors at the top level or under 'state_dict' or 'model'."
            )
        node = node[key]
    raise BadInputError(f"{name} nests its state dict too deeply to find; save model.state_dict() directly.")


def _choose_arch(arch, file_arch: str | None, name: str, trust: bool):
    """`--arch` when given; else the file's own, which may not name code to run (filechecks)."""
    if arch is not None:
        return arch
    recorded = _normalise_file_arch(file_arch)
    check_recorded_arch(recorded, name, trust)
    return recorded


def _normalise_file_arch(arch: str | None) -> str | None:
    # timm's train.py writes the bare model name; other tools may already write a full spec.
    if not arch:
        return None
    return arch if ":" in arch else f"timm:{arch}"


def _prefix_variants(state_dict: dict) -> list[dict]:
    """The state dict with wrapper prefixes peeled off one at a time (original first)."""
    variants = [state_dict]
    while True:
        cur = variants[-1]
        prefix = next((p for p in _WRAPPER_PREFIXES if cur and all(k.startswith(p) for k in cur)), None)
        if prefix is None:
            return variants
        variants.append({k[len(prefix):]: v for k, v in cur.items()})


def _build_any_head(arch) -> nn.Module:
    try:
        return build_architecture(arch, None)
    except BadInputError:  # a factory that insists on num_classes: any count names the same head
        return build_architecture(arch, 1)


def _skeleton(arch) -> nn.Module:
    """The architecture's module tree, to find its classifier's name.

    Built on the meta device first, which allocates and initialises no weights; constructors
    that copy data while initialising (torchvision's RegNets, for one) fail there with "Cannot
    copy out of meta tensor", and are built for real on the CPU instead. The only meta-device
    build in mishield is this one.
    """
    try:
        with torch.device("meta"):
            return _build_any_head(arch)
    except BadInputError:
        return _build_any_head(arch)  # a spec that is really broken fails here with its own message


def _infer_num_classes(arch, variants: list[dict]) -> int | None:
    found = find_classifier(_skeleton(arch))
    if found is None:
        return None
    key = f"{found[0]}.weight" if found[0] else "weight"
    for sd in reversed(variants):
        if key in sd and sd[key].dim() >= 1:
            return int(sd[key].shape[0])
    return None


def _from_state_dict(state_dict: dict, name: str, arch, num_classes, input_size) -> LoadedModel:
    if arch is None:
        raise BadInputError(f"{name} does not say which architecture it is; {ARCH_HINT}.")
    label = arch_label(arch)
    variants = _prefix_variants(state_dict)
    if num_classes is None:
        num_classes = _infer_num_classes(arch, variants)
    model = build_architecture(arch, num_classes)
    own = model.state_dict()
    # Most overlap with the model's own keys wins; on a tie the more stripped variant, so a model
    # whose real top-level child is called `model` keeps its prefix.
    _, _, sd = max((len(own.keys() & v.keys()), i, v) for i, v in enumerate(variants))
    _load_into(model, sd, name, label)
    model.eval()
    spec = arch if isinstance(arch, str) else callable_spec(arch)
    return LoadedModel(
        model=model,
        arch=spec,
        num_classes=count_classes(model) or num_classes,
        preprocessing=default_preprocessing(model, spec).with_input_size(input_size),
        kind="state_dict",
    )


def _load_into(model: nn.Module, sd: dict, name: str, label: str) -> None:
    own = model.state_dict()
    mismatched = [
        (k, tuple(v.shape), tuple(own[k].shape)) for k, v in sd.items() if k in own and v.shape != own[k].shape
    ]
    if mismatched:
        key, theirs, ours = mismatched[0]
        more = f" (and {len(mismatched) - 1} more mismatched shapes)" if len(mismatched) > 1 else ""
        raise BadInputError(
            f"{name} does not fit {label}: {key} has shape {theirs} in the file but {ours} in the model{more}; "
            "check --arch and --num-classes."
        )
    # strict=False: torch itself forgives old BatchNorm files without num_batches_tracked
    result = model.load_state_dict(sd, strict=False)
    missing, unexpected = result.missing_keys, result.unexpected_keys
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} keys missing ({_first3(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected ({_first3(unexpected)})")
        raise BadInputError(f"{name} does not fit {label}: {' and '.join(parts)}; check --arch.")


def _first3(keys: list[str]) -> str:
    return ", ".join(keys[:3]) + (", ..." if len(keys) > 3 else "")


