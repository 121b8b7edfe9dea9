"""Architecture specs: `timm:NAME`, `torchvision:NAME` and `package.module:factory`, built with random weights."""

from __future__ import annotations

import difflib
import importlib
import inspect
import re
from collections.abc import Callable

from torch import nn

from mishield.errors import BadInputError, first_line

ARCH_HINT = "pass --arch timm:NAME, torchvision:NAME or package.module:factory"
_SPEC_RE = re.compile(r"^(?:timm|torchvision):\S+$|^[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*$")


def is_arch_spec(text: str) -> bool:
    """True when `text` has the shape of `timm:NAME`, `torchvision:NAME` or `package.module:factory`."""
    return bool(_SPEC_RE.match(text))


def build_architecture(arch: str | Callable, num_classes: int | None) -> nn.Module:
    """Instantiate `arch` with random weights (`num_classes=None`: the architecture's default)."""
    if callable(arch) and not isinstance(arch, str):
        return _check_module(_call_factory(arch, num_classes, arch_label(arch)), arch_label(arch))
    if not isinstance(arch, str) or not is_arch_spec(arch):
        raise BadInputError(f"{arch!r} is not an architecture spec; {ARCH_HINT}.")
    family, _, name = arch.partition(":")
    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    if family == "timm":
        import timm

        if not timm.is_model(name):
            raise BadInputError(
                f"timm has no model named {name!r} ({arch}){_did_you_mean(name, timm.list_models())}; "
                f"list candidates with timm.list_models('*{_name_stem(name)}*')."
            )
        return _check_module(_guarded(arch, lambda: timm.create_model(name, pretrained=False, **kwargs)), arch)
    if family == "torchvision":
        import torchvision

        known = torchvision.models.list_models()
        if name not in known:
            raise BadInputError(
                f"torchvision has no model named {name!r} ({arch}){_did_you_mean(name, known)}; "
                "list candidates with torchvision.models.list_models()."
            )
        return _check_module(
            _guarded(arch, lambda: torchvision.models.get_model(name, weights=None, **kwargs)), arch
        )
    return _check_module(_call_factory(import_factory(arch), num_classes, arch), arch)


def import_factory(spec: str, flag: str = "--arch") -> Callable:
    """The callable a `package.module:factory` spec names (importing the module runs its code)."""
    module_name, _, attr_path = spec.partition(":")
    try:
        obj = importlib.import_module(module_name)
    except ImportError as e:
        raise BadInputError(
            f"Cannot import module {module_name!r} for {flag} {spec} ({e});"
            " check the spec and PYTHONPATH."
        ) from None
    for attr in attr_path.split("."):
        if not hasattr(obj, attr):
            raise BadInputError(
                f"Module {module_name!r} has no attribute {attr_path!r} ({flag} {spec});"
                " check the spec."
            )
        obj = getattr(obj, attr)
    if not callable(obj):
        raise BadInputError(f"{spec} is not callable; {flag} package.module:factory must name a function or class.")
    return obj


def _call_factory(factory: Callable, num_classes: int | None, label: str) -> nn.Module:
    if num_classes is None:
        return _guarded(label, factory)
    try:
        params = inspect.signature(factory).parameters.values()
        takes = any(p.name == "num_classes" or p.kind is p.VAR_KEYWORD for p in params)
    except (TypeError, ValueError):  # builtins / C extensions without a signature
        takes = True
    if takes:
        return _guarded(label, lambda: factory(num_classes=num_classes))
    return _guarded(label, factory)


def _guarded(label: str, build: Callable[[], object]):
    try:
        return build()
    except BadInputError:
        raise
    except Exception as e:  # noqa: BLE001 - a user factory may raise anything; report it in one sentence
        raise BadInputError(
            f"Building {label} failed ({type(e).__name__}: {first_line(e)});"
            " check the architecture spec."
        ) from None


def _check_module(obj: object, label: str) -> nn.Module:
    if not isinstance(obj, nn.Module):
        raise BadInputError(
            f"{label} returned a {type(obj).__name__}, not a torch.nn.Module;"
            " point --arch at a model factory."
        )
    return obj


def arch_label(arch: str | Callable | None) -> str:
    if arch is None or isinstance(arch, str):
        return str(arch)
    return callable_spec(arch) or getattr(arch, "__qualname__", repr(arch))


def callable_spec(fn: Callable) -> str | None:
    """`module:qualname` when that string imports back to `fn` (so a recipe can rebuild it)."""
    module, qualname = getattr(fn, "__module__", None), getattr(fn, "__qualname__", None)
    if not module or not qualname or "<" in qualname or module == "__main__":
        return None
    try:
        obj = importlib.import_module(module)
        for attr in qualname.split("."):
            obj = getattr(obj, attr)
    except (ImportError, AttributeError):
        return None
    return f"{module}:{qualname}" if obj is fn else None


def _did_you_mean(name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.75)
    return f" (did you mean {', '.join(close)}?)" if close else ""


def _name_stem(name: str) -> str:
    stem = re.match(r"[A-Za-z]+", name)
    return stem.group(0)[:6] if stem else name
