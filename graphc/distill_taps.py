"""Knowledge distillation's pieces: the output losses (a table keyed by name), reading
intermediate values ("taps") of a student Graph and of a teacher Graph or nn.Module, and
splitting a data item into inputs and labels. graphc/distill.py runs the loop.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import fx

from graphc.errors import GraphcError
from graphc.ir import Graph
from graphc.spec import check_inputs


def _kl(s: torch.Tensor, t: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton's soft-target loss: KL(softmax(t/T) || softmax(s/T)) * T^2 per row (last dim
    is the class axis); T^2 keeps its gradient on the scale of a hard-label loss."""
    s, t = s.reshape(-1, s.shape[-1]), t.reshape(-1, t.shape[-1])
    return F.kl_div(F.log_softmax(s / temperature, -1), F.log_softmax(t / temperature, -1),
                    log_target=True, reduction="batchmean") * temperature ** 2


def _cosine(s: torch.Tensor, t: torch.Tensor, temperature: float) -> torch.Tensor:
    return (1 - F.cosine_similarity(s, t, dim=-1)).mean()


def _mse(s: torch.Tensor, t: torch.Tensor, temperature: float) -> torch.Tensor:
    return F.mse_loss(s, t)


# loss name -> fn(student output, teacher output, temperature); "kl" wants logits, the
# others suit embedding models (MiniLM's outputs are unit vectors, not logits)
OUTPUT_LOSSES: dict[str, Callable] = {"kl": _kl, "mse": _mse, "cosine": _cosine}


def as_tuple(out) -> tuple:
    """A model's output as a tuple of tensors (HF ModelOutputs give their tensors in order)."""
    if isinstance(out, torch.Tensor):
        return (out,)
    if isinstance(out, dict):
        return tuple(v for v in out.values() if isinstance(v, torch.Tensor))
    return tuple(out)


def feature_pairs(features) -> list[tuple[str, str]]:
    """features: names shared by student and teacher, or {student name: teacher name}."""
    if features is None:
        return []
    if isinstance(features, str):
        features = [features]
    if isinstance(features, dict):
        return [(str(k), str(v)) for k, v in features.items()]
    return [(str(f), str(f)) for f in features]


def tap_graph(g: Graph, names: list[str], who: str) -> fx.GraphModule:
    """A module that runs g and returns (outputs..., value of each named node...). Built on
    g.gm as root, so it shares g's parameters: training it trains g."""
    graph = copy.deepcopy(g.gm.graph)
    by_name = {n.name: n for n in graph.nodes}
    missing = [n for n in names if n not in by_name]
    if missing:
        computed = [n.name for n in graph.nodes if n.op == "call_function"]
        raise GraphcError(f"distill: features {missing} are not nodes of the {who} graph "
                          f"'{g.name}'; name nodes as printed by print(graph) (for example "
                          f"{computed[:4]})")
    out = graph.output_node()
    outs = out.args[0] if isinstance(out.args[0], (tuple, list)) else (out.args[0],)
    out.args = (tuple(outs) + tuple(by_name[n] for n in names),)
    return fx.GraphModule(g.gm, graph)


class ModuleTaps:
    """Forward hooks on named submodules of an nn.Module teacher, keeping their outputs."""

    def __init__(self, module: torch.nn.Module, names: list[str]):
        self.values: dict[str, torch.Tensor] = {}
        self.handles = []
        known = dict(module.named_modules())
        for name in names:
            if name not in known:
                raise GraphcError(
                    f"distill: feature '{name}' is not a submodule of the teacher "
                    f"{type(module).__name__}; use a name from teacher.named_modules() "
                    f"(for example {[k for k in known if k][:4]})")
            self.handles.append(known[name].register_forward_hook(self._keep(name)))

    def _keep(self, name: str):
        def hook(mod, args, out):
            self.values[name] = as_tuple(out)[0]  # HF layers return (hidden, ...)
        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def split_item(item, g: Graph) -> tuple[tuple, object]:
    """A data item -> (inputs, labels or None). An item is the graph's inputs (a tensor, or a
    tuple of them), or (inputs, labels)."""
    n = len(g.inputs)
    if isinstance(item, torch.Tensor):
        inputs, labels = (item,), None
    elif len(item) == n and all(isinstance(t, torch.Tensor) for t in item) and _fits(item, g):
        inputs, labels = tuple(item), None
    elif len(item) == 2:
        first = item[0]
        inputs = (first,) if isinstance(first, torch.Tensor) else tuple(first)
        labels = item[1]
    else:
        raise GraphcError(f"distill: a data item has {len(item)} parts; give the student's "
                          f"{n} input(s), or (inputs, labels)")
    check_inputs(g.inputs, inputs, where=f"distill data for '{g.name}'")
    return inputs, labels


def _fits(item, g: Graph) -> bool:
    return all(tuple(t.shape) == s.shape and t.dtype == s.dtype for t, s in zip(item, g.inputs))
