"""What a classifier says about itself: its classification head, class count and input contract."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from mishield.preprocessing import Preprocessing


def _is_layer(m: nn.Module, kinds: tuple[str, ...]) -> bool:
    # TorchScript modules are RecursiveScriptModule instances that only remember the class name.
    return type(m).__name__ in kinds or getattr(m, "original_name", None) in kinds


def find_classifier(model: nn.Module) -> tuple[str, nn.Module] | None:
    """The final classification layer and its dotted name: timm's get_classifier(), else the last Linear."""
    names = {id(m): n for n, m in model.named_modules()}
    search: list[nn.Module] = []
    get_classifier = getattr(model, "get_classifier", None)
    if callable(get_classifier):
        try:
            head = get_classifier()
        except Exception:  # noqa: BLE001 - third-party models: fall back to the generic search
            head = None
        if isinstance(head, nn.Module) and id(head) in names:
            search.append(head)
    search.append(model)
    for root in search:
        for kinds in (("Linear",), ("Conv2d",)):  # squeezenet-style heads are 1x1 convolutions
            layers = [m for m in root.modules() if _is_layer(m, kinds)]
            if layers:
                return names[id(layers[-1])], layers[-1]
    return None


def count_classes(model: nn.Module) -> int | None:
    found = find_classifier(model)
    weight = getattr(found[1], "weight", None) if found else None
    return int(weight.shape[0]) if isinstance(weight, torch.Tensor) and weight.dim() >= 1 else None


def _first_conv_channels(model: nn.Module) -> int | None:
    cfg = getattr(model, "pretrained_cfg", None)
    first = cfg.get("first_conv") if isinstance(cfg, dict) else None
    if isinstance(first, str):
        try:
            return int(model.get_submodule(first).in_channels)
        except (AttributeError, TypeError):
            pass
    for m in model.modules():
        if _is_layer(m, ("Conv2d",)) and hasattr(m, "in_channels"):
            return int(m.in_channels)
    return None


def default_preprocessing(model: nn.Module, arch: str | Callable | None) -> Preprocessing:
    """The input contract `model` was most likely trained with.

    timm models (by spec or by their `pretrained_cfg`) answer for themselves via
    `resolve_data_config`; everything else gets the ImageNet convention at 224 px, or the
    model's own `image_size` (torchvision ViTs). The channel count follows the first conv, so a
    grayscale model gets one channel with the average of the ImageNet statistics.
    """
    pre = Preprocessing()
    is_timm = isinstance(arch, str) and arch.startswith("timm:")
    is_timm = is_timm or isinstance(getattr(model, "pretrained_cfg", None), dict)
    if is_timm:
        try:
            from timm.data import resolve_data_config

            cfg = resolve_data_config({}, model=model)
            pre = Preprocessing(
                input_size=tuple(int(v) for v in cfg["input_size"]),
                mean=tuple(float(v) for v in cfg["mean"]),
                std=tuple(float(v) for v in cfg["std"]),
                interpolation=str(cfg.get("interpolation", "bicubic")),
            )
        except Exception:  # noqa: BLE001 - a model that only looks like timm
            is_timm = False
    if not is_timm:
        size = getattr(model, "image_size", None)
        if isinstance(size, int):
            pre = Preprocessing(input_size=(3, size, size))
        elif isinstance(size, (tuple, list)) and len(size) == 2:
            pre = Preprocessing(input_size=(3, int(size[0]), int(size[1])))
    channels = _first_conv_channels(model)
    if channels and channels != pre.input_size[0]:
        if channels == 1 and len(pre.mean) == 3:
            mean, std = (sum(pre.mean) / 3,), (sum(pre.std) / 3,)
        else:
            mean, std = (0.5,) * channels, (0.5,) * channels
        pre = Preprocessing((channels, *pre.input_size[1:]), mean, std, pre.interpolation)
    return pre
