"""Finding skip connections in a model's graph (docs/architecture.md §5), without a list of class names.

A skip site is an `add` or a `cat` whose inputs fork from a common ancestor, one input reaching
it through a short path (the shortcut: identity, or a projection such as 1x1 conv + BN) and one
through the residual branch, which holds more learned layers. The model is traced with torch.fx;
nodes are compared through their *data* ancestry (a shape read such as `x.shape[0]` is not a data
path, otherwise ViT's `cat([cls_token.expand(B, ...), x])` would look like a skip).

Sites are grouped into stages by the spatial resolution of their output; for isotropic models
(one resolution throughout, e.g. ViT) the blocks are split into four equal stages.
"""

from __future__ import annotations

import fnmatch
import operator
from dataclasses import asdict, dataclass, field

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from mishield.errors import BadInputError, UsageError, first_line
from mishield.surgery.rewired import SkipRewiredModel

ADD_TARGETS = {operator.add, operator.iadd, torch.add, torch.Tensor.add, torch.Tensor.add_}
ADD_METHODS = {"add", "add_"}
CAT_TARGETS = {torch.cat, torch.concat, torch.concatenate}

# Operations whose result is metadata (a size, a dtype), never image data.
_META_METHODS = {"size", "dim", "numel", "ndimension", "stride", "element_size", "is_contiguous", "get_device"}
_META_ATTRS = {"shape", "dtype", "device", "ndim", "is_cuda", "requires_grad", "layout"}


@dataclass(frozen=True)
class SkipSite:
    """One skip connection: where it merges, how its shortcut looks, which stage it is in."""

    name: str  # stable id: owning module path + op name, e.g. "layer4.0.add"
    block: str  # module path of the module whose forward performs the merge
    kind: str  # "add" or "concat"
    shortcut: str  # "identity" or "projection"
    shortcut_modules: tuple[str, ...]  # learned modules only on the shortcut (dropped by RoLSS)
    skip_inputs: int  # how many inputs are skips (1 for add; older feature maps for concat)
    shortcut_operand: int  # add: which of the two operands is the shortcut (0 or 1)
    output_shape: tuple[int, ...]  # without the batch dimension
    resolution: str  # "7x7" or "197 tokens"
    stage: int = -1


@dataclass(frozen=True)
class Stage:
    index: int
    resolution: str
    module: str  # longest common module path of the stage's blocks ("" for the root)
    sites: tuple[str, ...]


@dataclass
class SkipAnalysis:
    """Every skip site of a model, its stages, and modules after the last skip stage."""

    sites: list[SkipSite]
    stages: list[Stage]
    input_size: tuple[int, int, int]
    isotropic: bool
    skipless_tail: list[str] = field(default_factory=list)  # later module stages with no skip

    def site(self, name: str) -> SkipSite:
        for s in self.sites:
            if s.name == name:
                return s
        raise KeyError(name)

    def select(self, stage: int | None = None, sites: list[str] | None = None) -> tuple[list[str], str]:
        """Names of the selected sites and a description of the selection.

        `sites` (globs over site names or block paths) wins over `stage`; the default is the last
        stage. An empty selection is an error: a method that silently changes nothing would give a
        false sense of protection.
        """
        if not self.sites:
            raise BadInputError(
                "found no skip connection in this model, so RoLSS/SSF have nothing to change; "
                "run `mishield inspect` to see its graph analysis."
            )
        if sites:
            chosen = [s.name for s in self.sites if any(_matches(s, p) for p in sites)]
            description = "sites " + ", ".join(sites)
        else:
            index = -1 if stage is None else stage
            if not -len(self.stages) <= index < len(self.stages):
                raise UsageError(
                    f"`stage` {index} does not exist; this model has {len(self.stages)} skip stages "
                    f"(0..{len(self.stages) - 1}); run `mishield inspect` to see them."
                )
            chosen_stage = self.stages[index]
            chosen = list(chosen_stage.sites)
            description = f"stage {chosen_stage.index} ({chosen_stage.resolution}"
            description += f", {chosen_stage.module})" if chosen_stage.module else ")"
        if not chosen:
            summary = "; ".join(f"stage {st.index}: {st.module or st.resolution}.*" for st in self.stages)
            raise UsageError(
                f"the selection {description} contains no skip connection (skip sites are in {summary}); "
                "choose `stage` or `sites` from `mishield inspect`."
            )
        return chosen, description

    def to_dict(self) -> dict:
        return {
            "input_size": list(self.input_size),
            "isotropic": self.isotropic,
            "stages": [asdict(s) | {"sites": list(s.sites)} for s in self.stages],
            "sites": [asdict(s) | {"shortcut_modules": list(s.shortcut_modules), "output_shape": list(s.output_shape)}
                      for s in self.sites],
            "skipless_tail": self.skipless_tail,
        }


def _matches(site: SkipSite, pattern: str) -> bool:
    if any(ch in pattern for ch in "*?["):
        return fnmatch.fnmatchcase(site.name, pattern) or fnmatch.fnmatchcase(site.block, pattern)
    # A plain path selects that site or everything under that module.
    return site.name == pattern or site.block == pattern or site.block.startswith(pattern + ".")


# ---------------------------------------------------------------------------------------------
# Tracing


class _Tracer(fx.Tracer):
    """fx tracer that keeps timm's untraceable layers and functions opaque."""

    def __init__(self) -> None:
        leaves: tuple[type, ...] = ()
        functions: list = []
        try:
            from timm.layers import _fx as timm_fx

            leaves = tuple(timm_fx.get_notrace_modules())
            functions = list(timm_fx.get_notrace_functions())
        except ImportError:  # timm is optional for models that don't come from it
            pass
        super().__init__(autowrap_functions=tuple(functions))
        self._leaves = leaves

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, self._leaves) or super().is_leaf_module(m, qualname)


def trace(model: nn.Module, training: bool) -> fx.Graph:
    """Trace `model` as it runs in train() or eval() mode, leaving the model's mode as it was.

    Modules that branch on `self.training` in Python (dropout, functional batch norm) are baked
    into the graph, which is why surgery keeps one graph per mode.
    """
    if isinstance(model, SkipRewiredModel):
        # Re-tracing generated code would lose the module paths that name skip sites; reuse
        # the stored graph instead (a second surgery on an already hardened model).
        return model.graph_copy(training)
    was_training = model.training
    model.train(training)
    try:
        return _Tracer().trace(model)
    except Exception as err:  # fx raises many types (TraceError, TypeError, NotImplementedError...)
        raise BadInputError(
            f"torch.fx cannot trace {type(model).__name__} ({first_line(err)}); mishield needs a model whose "
            "forward has no data-dependent Python control flow (MISHIELD_DEBUG=1 shows where it failed)."
        ) from err
    finally:
        model.train(was_training)


def owner_of(node: fx.Node) -> str:
    """Module path of the innermost traced (non-leaf) module whose forward created `node`."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    return path if isinstance(path, str) else ""


def merge_nodes(graph: fx.Graph) -> dict[str, fx.Node]:
    """Every add/cat node keyed by a stable name (owner path + op + ordinal within the owner).

    The name does not depend on fx's global counters, so the same merge gets the same name in the
    train-mode and eval-mode traces and in a later rebuild from a saved file.
    """
    named: dict[str, fx.Node] = {}
    counts: dict[tuple[str, str], int] = {}
    for node in graph.nodes:
        kind = merge_kind(node)
        if kind is None:
            continue
        owner = owner_of(node)
        op = "add" if kind == "add" else "cat"
        n = counts.get((owner, op), 0)
        counts[(owner, op)] = n + 1
        if "mishield_site" not in node.meta:  # names stick to nodes through later surgeries
            leaf = op if n == 0 else f"{op}_{n}"
            node.meta["mishield_site"] = f"{owner}.{leaf}" if owner else leaf
        named[node.meta["mishield_site"]] = node
    return named


def merge_kind(node: fx.Node) -> str | None:
    if node.op == "call_function" and node.target in ADD_TARGETS:
        return "add"
    if node.op == "call_method" and node.target in ADD_METHODS:
        return "add"
    if node.op == "call_function" and node.target in CAT_TARGETS:
        return "concat"
    return None


def add_operands(node: fx.Node) -> tuple[int, int] | None:
    """Argument positions of the two tensor operands of an add node."""
    args = node.args
    if len(args) < 2 and "other" in node.kwargs:
        return None  # unusual spelling; not rewritten
    if len(args) >= 2 and isinstance(args[0], fx.Node) and isinstance(args[1], fx.Node):
        return 0, 1
    return None


def cat_inputs(node: fx.Node) -> list[fx.Node] | None:
    tensors = node.args[0] if node.args else node.kwargs.get("tensors")
    if not isinstance(tensors, (list, tuple)) or not all(isinstance(t, fx.Node) for t in tensors):
        return None
    return list(tensors)


# ---------------------------------------------------------------------------------------------
# Analysis


def analyse(model: nn.Module, input_size: tuple[int, int, int]) -> SkipAnalysis:
    """Find, classify and group the skip connections of `model` (probe: one image of `input_size`)."""
    graph = trace(model, training=False)
    gm = fx.GraphModule(model, graph)
    probe = torch.zeros(1, *input_size)
    was_training = model.training
    model.eval()  # leaf modules read their own mode: in train() the probe would update BN statistics
    try:
        with torch.no_grad():
            ShapeProp(gm).propagate(probe)
    except Exception as err:
        raise BadInputError(
            f"the model does not run on a {input_size[0]}x{input_size[1]}x{input_size[2]} input ({first_line(err)}); "
            "pass the right `input_size`."
        ) from err
    finally:
        model.train(was_training)
    for n in graph.nodes:
        n.meta["mishield_is_tensor"] = "tensor_meta" in n.meta
    sites = _find_sites(model, graph)
    stages, isotropic = _group_stages(sites)
    sites = [_with_stage(s, stages) for s in sites]
    return SkipAnalysis(sites, stages, tuple(input_size), isotropic, _skipless_tail(model, stages))


def _find_sites(model: nn.Module, graph: fx.Graph) -> list[SkipSite]:
    nodes = list(graph.nodes)
    index = {n: i for i, n in enumerate(nodes)}
    modules = dict(model.named_modules())

    # Data ancestry as bitsets: bit i set in ancestors[n] when nodes[i] feeds n's data.
    ancestors: dict[fx.Node, int] = {}
    is_data: dict[fx.Node, bool] = {}
    param_ops = 0  # bitset of nodes that apply learned parameters
    for n in nodes:
        is_data[n] = _is_data(n)
        mask = 0
        if is_data[n]:
            for inp in n.all_input_nodes:
                if is_data[inp]:
                    mask |= ancestors[inp] | (1 << index[inp])
        ancestors[n] = mask
        if _applies_parameters(n, modules):
            param_ops |= 1 << index[n]

    def closure(n: fx.Node) -> int:
        return ancestors[n] | (1 << index[n])

    def learned_ops(mask: int) -> int:
        return (mask & param_ops).bit_count()

    def module_paths(mask: int) -> tuple[str, ...]:
        return tuple(
            nodes[i].target for i in range(len(nodes))
            if (mask >> i) & 1 and (param_ops >> i) & 1 and nodes[i].op == "call_module"
        )

    found = []
    for name, node in merge_nodes(graph).items():
        shape = _shape(node)
        if shape is None:
            continue
        if merge_kind(node) == "add":
            operands = add_operands(node)
            if operands is None:
                continue
            a, b = node.args[operands[0]], node.args[operands[1]]
            if _shape(a) != _shape(b):  # a broadcast (bias, gate) is not a skip
                continue
            ca, cb = closure(a), closure(b)
            common = ca & cb
            if not any(nodes[i].op != "get_attr" for i in _bits(common)):
                continue  # no shared data ancestor: e.g. x + pos_embed
            only_a, only_b = ca & ~cb, cb & ~ca
            pa, pb = learned_ops(only_a), learned_ops(only_b)
            if pa == pb:
                continue  # parallel branches of equal weight (RepVGG's 3x3 + 1x1) are not a skip
            shortcut_operand = 1 if pa > pb else 0
            found.append(SkipSite(
                name=name, block=owner_of(node), kind="add",
                shortcut="projection" if min(pa, pb) else "identity",
                shortcut_modules=module_paths(only_b if pa > pb else only_a), skip_inputs=1,
                shortcut_operand=shortcut_operand,
                output_shape=shape, resolution=_resolution(shape, "add", None),
            ))
        else:
            inputs = cat_inputs(node)
            if not inputs or len(inputs) < 2:
                continue
            main = max(inputs, key=index.__getitem__)  # the newest feature map
            skips = [
                t for t in inputs
                if t is not main and (ancestors[main] >> index[t]) & 1
                and learned_ops(closure(main) & ~closure(t)) > 0
            ]
            if not skips:
                continue
            found.append(SkipSite(
                name=name, block=owner_of(node), kind="concat", shortcut="identity",
                shortcut_modules=(), skip_inputs=len(skips), shortcut_operand=0, output_shape=shape,
                resolution=_resolution(shape, "concat", node),
            ))
    return found


def concat_skip_positions(node: fx.Node) -> list[int]:
    """Positions (in the cat's input list) of the older feature maps that skip ahead.

    Recomputed per graph from the same rule as the analysis: an input that is a data ancestor
    of the newest input.
    """
    inputs = cat_inputs(node) or []
    order = {n: i for i, n in enumerate(node.graph.nodes)}
    main = max(inputs, key=order.__getitem__)
    seen, frontier = set(), [main]
    while frontier:  # data ancestors of `main`
        cur = frontier.pop()
        for inp in cur.all_input_nodes:
            if inp not in seen and _is_data(inp):
                seen.add(inp)
                frontier.append(inp)
    return [i for i, t in enumerate(inputs) if t is not main and t in seen]


def _bits(mask: int):
    i = 0
    while mask:
        if mask & 1:
            yield i
        mask >>= 1
        i += 1


def _is_data(n: fx.Node) -> bool:
    if n.op == "call_method" and n.target in _META_METHODS:
        return False
    if n.op == "call_function" and n.target is getattr and len(n.args) > 1 and n.args[1] in _META_ATTRS:
        return False
    if "mishield_is_tensor" in n.meta:  # set after shape propagation
        return n.meta["mishield_is_tensor"]
    # Without shape information (the train-mode graph) the structural rules above decide.
    return True


def _applies_parameters(n: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if n.op == "call_module":
        mod = modules.get(n.target)
        return mod is not None and any(True for _ in mod.parameters())
    if n.op in ("call_function", "call_method"):
        return any(inp.op == "get_attr" for inp in n.all_input_nodes)
    return False


def _shape(n) -> tuple[int, ...] | None:
    if not isinstance(n, fx.Node):
        return None
    meta = n.meta.get("tensor_meta")
    if meta is None or not hasattr(meta, "shape"):
        return None
    return tuple(int(d) for d in meta.shape[1:])


def _resolution(shape: tuple[int, ...], kind: str, node: fx.Node | None) -> str:
    """Spatial size of an output shape (batch dimension already removed)."""
    if len(shape) == 3:
        if kind == "concat" and node is not None:
            dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
            dim = dim % 4 if isinstance(dim, int) else 1
            spatial = [d for i, d in enumerate(shape, start=1) if i != dim]
        elif shape[1] == shape[2]:  # NCHW with a square probe
            spatial = [shape[1], shape[2]]
        else:  # NHWC (Swin, ConvNeXt MLPs)
            spatial = [shape[0], shape[1]]
        return "x".join(str(d) for d in spatial)
    if len(shape) == 2:
        return f"{shape[0]} tokens"
    return "x".join(str(d) for d in shape)


def _group_stages(sites: list[SkipSite]) -> tuple[list[Stage], bool]:
    groups: list[list[SkipSite]] = []
    for s in sites:
        if groups and groups[-1][0].resolution == s.resolution:
            groups[-1].append(s)
        else:
            groups.append([s])
    isotropic = len(groups) == 1 and len({s.block for s in sites}) >= 4
    if isotropic:
        # Isotropic models have no resolution stages: split their blocks into four equal stages.
        blocks = list(dict.fromkeys(s.block for s in sites))
        q, r = divmod(len(blocks), 4)
        bounds, start = [], 0
        for i in range(4):
            end = start + q + (1 if i < r else 0)
            bounds.append(set(blocks[start:end]))
            start = end
        groups = [[s for s in sites if s.block in b] for b in bounds]
    stages = [
        Stage(i, g[0].resolution, _common_path([s.block for s in g]), tuple(s.name for s in g))
        for i, g in enumerate(groups)
    ]
    return stages, isotropic


def _with_stage(site: SkipSite, stages: list[Stage]) -> SkipSite:
    stage = next(st.index for st in stages if site.name in st.sites)
    return SkipSite(**{**asdict(site), "stage": stage})


def _common_path(paths: list[str]) -> str:
    parts = [p.split(".") if p else [] for p in paths]
    common = []
    for items in zip(*parts):
        if len(set(items)) != 1:
            break
        common.append(items[0])
    return ".".join(common)


def _skipless_tail(model: nn.Module, stages: list[Stage]) -> list[str]:
    """Module stages after the last skip stage that hold learned layers but no skip.

    EfficientNet-B0 is the reason: its last module stage (timm `blocks.6`) is one block with no
    skip, while its last *resolution* group with skips is `blocks.5`. `inspect` shows both views.
    """
    if not stages or not stages[-1].module:
        return []
    path = stages[-1].module
    earlier = [name for st in stages[:-1] for name in st.sites]
    if any(name.startswith(path + ".") for name in earlier):
        return []  # the common path also holds earlier stages: not a stage module (MobileNetV2)
    parent_path, _, leaf = path.rpartition(".")
    try:
        parent = model.get_submodule(parent_path) if parent_path else model
        stage_mod = model.get_submodule(path)
    except AttributeError:
        return []
    names = [n for n, _ in parent.named_children()]
    if leaf not in names:
        return []
    tail = []
    for name in names[names.index(leaf) + 1:]:
        child = getattr(parent, name)
        if type(child) is type(stage_mod) and any(True for _ in child.parameters()):
            tail.append(f"{parent_path}.{name}" if parent_path else name)
    return tail
