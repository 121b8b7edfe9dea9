"""Partial freezing: only the last stages learn from the private data (TL-DMI; Ho et al., "Model
Inversion Robustness: Can Transfer Learning Help?", CVPR 2024).

TL-DMI's argument: an inversion attack recovers what the model's parameters encode about the
private data, and most of it is encoded in the early layers' low-level features; if those are
trained on public data only and kept fixed while the private data trains the later ones, the model
stays accurate but its early stages carry no private information to invert.

    plan = plan_freeze(model, example, stages=2)   # the stem and the first two stages
    frozen = plan.apply(model)                     # requires_grad False, batch norms held in eval
    ...train...
    frozen.release()

Which layers. The stages are the ones BiDO reads its features from (`find_feature_modules`: the
model's declared stem and stages, timm `feature_info` or torchvision `layer1..4`, otherwise the
last layer at each spatial resolution). When the first of those points is a single layer (the
stem's activation) it is the stem; when it is a whole module (ConvNeXt's `stages.0`, ViT's
`blocks.0`) the model declares no stem and every point is a stage. Freezing N stages cuts the
forward pass at the N-th stage's output: every parameter and buffer whose *first* use comes
before that point is frozen. Uses are observed during one probe forward pass at the level of torch
functions (a `TorchFunctionMode`), so parameters the module tree does not place (ViT's class
token and position embedding on the root module, weights an fx-rewritten model reads with
`get_attr`) are placed by when they are used. First use, not last: a parameter shared with a later
layer still shapes the early features, so it must not learn from the private data either.

Batch norm. The frozen stages' norm layers stay in eval mode (a forward pre-hook re-asserts it
at every call, whatever `model.train()` did). Their running statistics are estimated from the data
that flows through them: left in train mode they would move to the private data's per-channel
means and variances, which is private information stored in exactly the layers the defence keeps
clean (and which BatchNorm-statistics inversion, such as mishield's generator-free prior, reads
directly); and a frozen stage would still change its function, normalising with private batch
statistics while training and with the moved running ones afterwards.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, fx, nn
from torch.overrides import TorchFunctionMode

from mishield.errors import BadInputError, UsageError
from mishield.training.bido import TapPoint, find_feature_modules


def _leaf_names(model: nn.Module) -> set[str]:
    return {name for name, m in model.named_modules() if name and not any(True for _ in m.children())}


def find_stages(model: nn.Module, example: Tensor, declared: Sequence[str] | None = None
                ) -> tuple[TapPoint | None, list[TapPoint]]:
    """(the stem's output point or None, each stage's output point in order); see the module doc."""
    points = find_feature_modules(model, example, declared=declared)
    if points and not points[0].input and points[0].module in _leaf_names(model):
        return points[0], points[1:]
    return None, points


def _tensors(value) -> Iterator[Tensor]:
    if isinstance(value, Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v)


class _FirstUse(TorchFunctionMode):
    """Counts torch function calls and records the call at which each named tensor is first used."""

    def __init__(self, names: dict[int, str]):
        super().__init__()
        self.names = names
        self.clock = 0
        self.first: dict[str, int] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.clock += 1
        for t in _tensors((args, kwargs)):
            name = self.names.get(id(t))
            if name is not None and name not in self.first:
                self.first[name] = self.clock
        return func(*args, **kwargs)


def _first_uses(model: nn.Module, example: Tensor, cut: TapPoint) -> tuple[dict[str, int], int]:
    """First-use clock of every parameter and buffer, and the clock at the cut point (eval-mode probe)."""
    names = {id(p): n for n, p in model.named_parameters()}
    names.update({id(b): n for n, b in model.named_buffers()})
    mode = _FirstUse(names)
    at_cut: list[int] = []
    module = model.get_submodule(cut.module)

    def mark(*_):  # the last call wins, like FeatureTap's
        at_cut.append(mode.clock)

    handle = module.register_forward_pre_hook(mark) if cut.input else module.register_forward_hook(mark)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), mode:
            model(example)
    finally:
        handle.remove()
        model.train(was_training)
    if not at_cut:
        raise BadInputError(f"the stage boundary {cut} did not run in a forward pass; `freeze_stages` cannot cut there.")
    return mode.first, at_cut[-1]


@dataclass(frozen=True)
class FreezePlan:
    """What `freeze_stages` = N freezes in one model, by name (names survive RoLSS / SSF surgery)."""

    stages: int
    boundary: str  # the N-th stage's output point
    stage_points: tuple[str, ...]  # every stage boundary found
    stem: str | None
    parameters: tuple[str, ...]
    buffers: tuple[str, ...]

    def to_dict(self) -> dict:
        return {"stages": self.stages, "boundary": self.boundary, "stage_points": list(self.stage_points),
                "stem": self.stem, "parameters": len(self.parameters), "buffers": len(self.buffers)}

    def apply(self, model: nn.Module) -> FrozenStages:
        """Freeze `model` (this model or a surgery's copy of it) in place until `release()`."""
        frozen = set(self.parameters)
        previous = {}
        for name, p in model.named_parameters():
            if name in frozen:
                previous[name] = p.requires_grad
                p.requires_grad_(False)
        buffers = set(self.buffers)
        norms = {name: m for name, m in model.named_modules()
                 if getattr(m, "track_running_stats", False) and getattr(m, "running_mean", None) is not None
                 and _join(name, "running_mean") in buffers}
        _check_norms_are_called(model, norms)
        handles = [m.register_forward_pre_hook(_hold_eval) for m in norms.values()]
        return FrozenStages(model, self, previous, sorted(norms), handles)


def _join(module: str, leaf: str) -> str:
    return f"{module}.{leaf}" if module else leaf


def _hold_eval(module: nn.Module, _inputs) -> None:
    module.training = False


def _check_norms_are_called(model: nn.Module, norms: dict[str, nn.Module]) -> None:
    """An fx-rewritten model could run a norm layer's code inline, where its `training` flag is not
    read; mishield's tracer keeps norm layers as modules, so this is a guard, not a path."""
    if not isinstance(model, fx.GraphModule):
        return
    called = {str(n.target) for n in model.graph.nodes if n.op == "call_module"}
    inline = [name for name in norms if name not in called]
    if inline:
        raise BadInputError(
            f"the norm layer {inline[0]} of the rewritten model does not run as a module, so `freeze_stages` "
            "cannot keep its running statistics fixed; freeze before surgery or without it."
        )


@dataclass
class FrozenStages:
    """A model with a `FreezePlan` applied; `release()` restores the trainable flags and norm modes."""

    model: nn.Module
    plan: FreezePlan
    previous: dict[str, bool]
    norms: list[str]
    handles: list = field(default_factory=list)

    def release(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
        params = dict(self.model.named_parameters())
        for name, flag in self.previous.items():
            if name in params:
                params[name].requires_grad_(flag)
        modules = dict(self.model.named_modules())
        for name in self.norms:
            modules[name].train(self.model.training)


def plan_freeze(model: nn.Module, example: Tensor, stages: int, declared: Sequence[str] | None = None) -> FreezePlan:
    """The parameters and buffers of the stem and the first `stages` stages of `model`.

    `example` is a small input batch on the model's device (batch 2: batch norm in eval mode does
    not care); `declared` as for `find_feature_modules` (the pre-surgery model's stage names).
    """
    if isinstance(stages, bool) or not isinstance(stages, int) or stages < 1:
        raise UsageError(f"`freeze_stages` must be a whole number of stages, 1 or more, to freeze anything; got {stages!r}.")
    stem, found = find_stages(model, example, declared)
    what = type(model).__name__
    if not found:
        raise BadInputError(
            f"found no stages in {what} to freeze (no declared stages and no convolutional feature maps); "
            "train without `freeze_stages`."
        )
    if stages > len(found):
        listed = ", ".join(str(p) for p in found)
        raise UsageError(
            f"`freeze_stages` is {stages} but {what} has {len(found)} stage(s) after its stem ({listed}); "
            f"choose 1 to {len(found)}."
        )
    cut = found[stages - 1]
    first, at_cut = _first_uses(model, example, cut)
    params = tuple(n for n, _ in model.named_parameters() if first.get(n, at_cut + 1) <= at_cut)
    buffers = tuple(n for n, _ in model.named_buffers() if first.get(n, at_cut + 1) <= at_cut)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad and n not in set(params)]
    if not trainable:
        raise UsageError(
            f"`freeze_stages` {stages} would freeze every trainable parameter of {what}; choose fewer stages."
        )
    return FreezePlan(stages, str(cut), tuple(str(p) for p in found), str(stem) if stem else None, params, buffers)
