"""Architecture surgery: RoLSS and SSF on the skip connections of a trained model (docs/architecture.md §4, §5).

    plan = plan_surgery(model, "rolss")          # which sites change, nothing touched yet
    result = apply_plan(model, plan)             # a rewritten copy; `model` is left as it was

* RoLSS removes the selected skips: `z_{i+1} = g_i(z_i)`. A projection shortcut (1x1 conv + BN)
  becomes dead and its parameters are dropped (and reported). For concatenative skips the older
  feature maps are replaced by zeros, so they carry neither signal nor gradient while the layers
  that read them keep their weights.
* SSF scales them by a fixed k: `z_{i+1} = g_i(z_i) + k * s(z_i)`; k = 1 is the original model.

The rewritten model keeps two fx graphs, one traced in train() and one in eval(), because tracing
bakes `self.training` branches (functional batch norm, dropout) into a graph: a single eval-mode
graph would stop updating batch-norm statistics when fine-tuned.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field

import torch
from torch import fx, nn

from mishield.errors import BadInputError
from mishield.surgery.methods import (
    DEFAULT_SSF_ALPHA,
    check_alpha,
    check_method,
)
from mishield.surgery.rewired import SkipRewiredModel
from mishield.surgery.skips import (
    SkipAnalysis,
    SkipSite,
    add_operands,
    analyse,
    cat_inputs,
    concat_skip_positions,
    merge_kind,
    merge_nodes,
    trace,
)


class SkipScale(nn.Module):
    """Multiplies a shortcut by a fixed constant k (SSF). Not learned, not in the state dict."""

    def __init__(self, alpha: float) -> None:
        super().__init__()
        self.alpha = float(alpha)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.alpha

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}"


@dataclass
class SurgeryPlan:
    """What a method will change: the selected skip sites, out of every site the model has."""

    method: str
    alpha: float
    selected: list[str]
    selection: str  # human description ("stage 3 (7x7, layer4)", "sites layer3.*")
    analysis: SkipAnalysis

    def to_dict(self) -> dict:
        return {
            "method": self.method,
            "alpha": self.alpha,
            "selected": list(self.selected),
            "selection": self.selection,
            "analysis": self.analysis.to_dict(),
        }


@dataclass
class SurgeryResult:
    model: nn.Module
    plan: SurgeryPlan
    dropped_parameters: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def spec(self) -> dict:
        """What a model file records so that `rebuild` can redo the surgery exactly."""
        return {
            "method": self.plan.method,
            "alpha": self.plan.alpha,
            "sites": list(self.plan.selected),
            "selection": self.plan.selection,
            "dropped_parameters": list(self.dropped_parameters),
        }


def plan_surgery(
    model: nn.Module,
    method: str = "rolss",
    *,
    alpha: float | None = None,
    stage: int | None = None,
    sites: list[str] | None = None,
    input_size: tuple[int, int, int] = (3, 224, 224),
) -> SurgeryPlan:
    """Analyse `model` and decide which skip sites `method` changes (default: the last stage)."""
    check_method(method)
    analysis = analyse(model, tuple(input_size))
    selected, description = analysis.select(stage=stage, sites=sites)
    if method == "rolss":
        alpha = 0.0
    elif alpha is None:
        kinds = {analysis.site(n).kind for n in selected}
        alpha = DEFAULT_SSF_ALPHA["concat" if kinds == {"concat"} else "add"]
    check_alpha(alpha)
    return SurgeryPlan(method, float(alpha), selected, description, analysis)


def apply_plan(model: nn.Module, plan: SurgeryPlan) -> SurgeryResult:
    """Rewrite a deep copy of `model` as `plan` says; `model` itself is not modified."""
    start = time.perf_counter()
    root = copy.deepcopy(model)
    graphs = {mode: trace(root, training=mode) for mode in (True, False)}
    # State the original graphs never read (unused modules) is carried over untouched; state that
    # only the removed shortcuts read is what RoLSS drops.
    unused = set(root.state_dict()) - _state_read_by(root, graphs.values())
    scales: dict[str, str] = {}  # site name -> SkipScale module path, shared by both graphs
    for graph in graphs.values():
        named = merge_nodes(graph)
        for name in plan.selected:
            node = named.get(name)
            if node is None or merge_kind(node) != plan.analysis.site(name).kind:
                raise BadInputError(
                    f"skip site {name} is not in the model's graph; the architecture differs from the one "
                    "the surgery was planned on."
                )
            _rewrite_site(root, graph, node, plan.analysis.site(name), plan, scales)
    rewired = SkipRewiredModel(root, graphs[True], graphs[False], type(model).__name__, keep=unused)
    rewired.train(model.training)
    dropped = sorted(set(model.state_dict()) - set(rewired.state_dict()))
    return SurgeryResult(rewired, plan, dropped, time.perf_counter() - start)


def rebuild(model: nn.Module, spec: dict, input_size: tuple[int, int, int]) -> nn.Module:
    """Redo a recorded surgery (`SurgeryResult.spec`) on a freshly built architecture."""
    plan = plan_surgery(
        model, spec["method"], alpha=spec.get("alpha"), sites=list(spec["sites"]), input_size=input_size
    )
    if sorted(plan.selected) != sorted(spec["sites"]):
        raise BadInputError("the recorded surgery does not match this architecture's skip sites.")
    return apply_plan(model, plan).model


def _rewrite_site(
    root: nn.Module, graph: fx.Graph, node: fx.Node, site: SkipSite, plan: SurgeryPlan, scales: dict[str, str]
) -> None:
    if site.kind == "add":
        shortcut_pos = add_operands(node)[site.shortcut_operand]
        residual = node.args[add_operands(node)[1 - site.shortcut_operand]]
        shortcut = node.args[shortcut_pos]
        if plan.method == "rolss":
            node.replace_all_uses_with(residual)
            graph.erase_node(node)
            _erase_dead(graph, shortcut, root)
        else:
            target = _scale_module(root, site, plan.alpha, scales)
            with graph.inserting_before(node):
                node.update_arg(shortcut_pos, graph.call_module(target, (shortcut,)))
        return
    inputs = cat_inputs(node)
    new_inputs = list(inputs)
    for i in concat_skip_positions(node):
        with graph.inserting_before(node):
            if plan.method == "rolss":
                # Zeros keep the channel count the next layer's weights expect, and zeros_like
                # has no autograd path back to the older maps.
                new_inputs[i] = graph.call_function(torch.zeros_like, (inputs[i],))
            else:
                new_inputs[i] = graph.call_module(_scale_module(root, site, plan.alpha, scales), (inputs[i],))
    if node.args:
        node.update_arg(0, new_inputs)
    else:
        node.update_kwarg("tensors", new_inputs)


def _scale_module(root: nn.Module, site: SkipSite, alpha: float, scales: dict[str, str]) -> str:
    """Path of the SkipScale module of `site`, registered beside the merge on first use."""
    if site.name not in scales:
        owner = root
        for part in site.block.split(".") if site.block else ():
            # A rewritten model only holds the containers its graphs reference: make the rest.
            if part not in owner._modules:
                owner.add_module(part, nn.Module())
            owner = owner._modules[part]
        i, leaf = 0, "skip_scale"
        while hasattr(owner, leaf):
            i += 1
            leaf = f"skip_scale_{i}"
        owner.add_module(leaf, SkipScale(alpha))
        scales[site.name] = f"{site.block}.{leaf}" if site.block else leaf
    return scales[site.name]


def _state_read_by(root: nn.Module, graphs) -> set[str]:
    keys = set(root.state_dict())
    read = set()
    for graph in graphs:
        for node in graph.nodes:
            if node.op in ("call_module", "get_attr"):
                prefix = node.target + "."
                read.update(k for k in keys if k == node.target or k.startswith(prefix))
    return read


def _erase_dead(graph: fx.Graph, start: fx.Node, root: nn.Module) -> None:
    """Erase `start` and its inputs when nothing uses them any more (the removed projection)."""
    frontier = [start]
    while frontier:
        n = frontier.pop()
        if n.users or n.op in ("placeholder", "output") or _has_side_effects(n, root):
            continue
        inputs = n.all_input_nodes
        graph.erase_node(n)
        frontier.extend(inputs)


def _has_side_effects(n: fx.Node, root: nn.Module) -> bool:
    if n.op == "call_module":
        return bool(getattr(root.get_submodule(n.target), "_is_impure", False))
    if n.op == "call_method":
        return str(n.target).endswith("_")  # in-place method, e.g. a buffer's add_
    if n.op == "call_function":
        return n.is_impure()
    return False
