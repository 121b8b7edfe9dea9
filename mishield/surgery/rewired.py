"""The rewritten model: one fx graph per mode, the original parameter names kept.

Tracing bakes `self.training` branches (functional batch norm, dropout) into a graph, so a single
eval-mode graph would stop updating batch-norm statistics when the model is fine-tuned; the
rewritten model therefore keeps a train-mode and an eval-mode graph and swaps them in train()/eval().
"""

from __future__ import annotations

import torch
from torch import fx, nn


class SkipRewiredModel(fx.GraphModule):
    """A rewritten model that runs its train-mode graph in train() and its eval-mode graph in eval().

    Parameters and buffers keep the original model's names, so an original checkpoint (minus the
    dropped projection) loads into it with `load_state_dict`.
    """

    def __init__(
        self, root: nn.Module, train_graph: fx.Graph, eval_graph: fx.Graph, class_name: str, keep=()
    ) -> None:
        super().__init__(root, train_graph, class_name=f"{class_name}SkipRewired")
        for node in eval_graph.nodes:
            if node.op in ("call_module", "get_attr"):
                _copy_attr(root, self, node.target)
        for key in keep:
            _copy_attr(root, self, key)
        _restore_buffer_persistence(root, self)
        self._mishield_graphs = {True: train_graph, False: eval_graph}
        self._mishield_name = class_name
        # Generate both forwards once; train()/eval() then swap them without regenerating code,
        # so torch.compile sees two stable functions instead of a new one at every switch.
        self._mishield_forwards = {}
        for mode in (False, True):
            self.graph = self._mishield_graphs[mode]  # the setter generates forward()
            self._mishield_forwards[mode] = (type(self).forward, self._code)

    def graph_copy(self, training: bool) -> fx.Graph:
        """A copy of the train- or eval-mode graph (node metadata, hence site names, included)."""
        new = fx.Graph()
        out = new.graph_copy(self._mishield_graphs[training], {})
        new.output(out)
        return new

    def train(self, mode: bool = True):
        self._graph = self._mishield_graphs[mode]
        type(self).forward, self._code = self._mishield_forwards[mode]
        return super().train(mode)

    def _deepcopy_init(self):
        # GraphModule.__deepcopy__ rebuilds through this hook from a copied __dict__; rebuild
        # both graphs so the copy still switches between them.
        def init(res, fake_mod, graph):
            graphs = fake_mod.__dict__["_mishield_graphs"]
            SkipRewiredModel.__init__(res, fake_mod, graphs[True], graphs[False], self._mishield_name)
            res.train(fake_mod.__dict__.get("training", True))

        return init


def _copy_attr(src: nn.Module, dst: nn.Module, target: str) -> None:
    """Give `dst` the object at dotted `target` of `src`, keeping parameter/buffer registration."""
    *path, leaf = target.split(".")
    s, d = src, dst
    for part in path:
        s = getattr(s, part)
        if part not in d._modules:
            d.add_module(part, nn.Module())
        d = d._modules[part]
    if leaf in d._modules or leaf in d._parameters or leaf in d._buffers:
        return
    value = getattr(s, leaf)
    if isinstance(value, nn.Module):
        d.add_module(leaf, value)
    elif isinstance(value, nn.Parameter):
        d.register_parameter(leaf, value)
    elif isinstance(value, torch.Tensor):
        persistent = leaf not in getattr(s, "_non_persistent_buffers_set", set())
        d.register_buffer(leaf, value, persistent=persistent)
    else:
        setattr(d, leaf, value)


def _restore_buffer_persistence(src: nn.Module, dst: nn.Module) -> None:
    """GraphModule registers every copied tensor as a persistent buffer; undo that where the
    original buffer was non-persistent, so state-dict keys match the original model's."""
    for name, module in src.named_modules():
        for buf in getattr(module, "_non_persistent_buffers_set", ()):
            try:
                twin = dst.get_submodule(name) if name else dst
            except AttributeError:
                continue
            if buf in twin._buffers:
                twin._non_persistent_buffers_set.add(buf)
