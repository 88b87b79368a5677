"""Graph: graphc's one IR, a torch.fx GraphModule of core ATen ops from torch.export.

User inputs are the only placeholders; weights are `get_attr` nodes on the module, so a
Graph runs and trains in PyTorch as it stands, and passes can read and replace weights
directly. The printed form is deterministic and shows every node's op, shape and dtype.
"""

from __future__ import annotations

import copy
import operator
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch import fx

from graphc.spec import TensorSpec, check_inputs, dtype_name


@dataclass
class Graph:
    """A traced model: fx module of ATen ops, its input/output specs and example inputs."""

    gm: fx.GraphModule
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    example_inputs: tuple[torch.Tensor, ...]
    name: str = "model"
    single_output: bool = False  # the model returned one tensor rather than a tuple
    meta: dict = field(default_factory=dict)

    # ---- running -------------------------------------------------------------------
    def __call__(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Run in PyTorch; always returns a tuple of output tensors."""
        # a Graph runs in PyTorch: numpy arrays would fail deep inside an aten op
        check_inputs(self.inputs, inputs, where=f"graph '{self.name}'", kinds=(torch.Tensor,))
        out = self.gm(*inputs)
        return tuple(out) if isinstance(out, (tuple, list)) else (out,)

    def run_example(self) -> tuple[torch.Tensor, ...]:
        with torch.no_grad():
            return self(*self.example_inputs)

    # ---- copying -------------------------------------------------------------------
    def copy(self) -> Graph:
        """A new Graph with its own fx graph; weight tensors are shared, not copied."""
        new_graph = copy.deepcopy(self.gm.graph)
        gm = fx.GraphModule(self.gm, new_graph, class_name=self.gm.__class__.__name__)
        return Graph(gm, list(self.inputs), list(self.outputs), self.example_inputs,
                     self.name, self.single_output, dict(self.meta))

    def with_graph(self, graph: fx.Graph, root: torch.nn.Module | None = None) -> Graph:
        """A Graph with this one's specs around a new fx graph (root defaults to ours)."""
        graph.lint()
        gm = fx.GraphModule(root if root is not None else self.gm, graph)
        return Graph(gm, list(self.inputs), list(self.outputs), self.example_inputs,
                     self.name, self.single_output, dict(self.meta))

    # ---- inspection ----------------------------------------------------------------
    @property
    def nodes(self) -> list[fx.Node]:
        return list(self.gm.graph.nodes)

    def weight(self, node: fx.Node) -> torch.Tensor:
        """The tensor a get_attr node refers to."""
        return fetch_attr(self.gm, node.target)

    def weights(self) -> dict[str, torch.Tensor]:
        """Every tensor referenced by a get_attr node, by attribute name."""
        return {n.target: self.weight(n) for n in self.gm.graph.nodes if n.op == "get_attr"}

    def op_histogram(self) -> Counter:
        return Counter(op_name(n) for n in self.gm.graph.nodes if n.op == "call_function")

    def stats(self) -> dict:
        """Node count, parameter count and bytes (each distinct tensor counted once)."""
        seen, params, nbytes = set(), 0, 0
        for t in self.weights().values():
            key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
            if key in seen:
                continue
            seen.add(key)
            params += t.numel()
            nbytes += t.numel() * t.element_size()
        nodes = sum(1 for n in self.gm.graph.nodes if n.op == "call_function")
        return {"nodes": nodes, "params": params, "param_bytes": nbytes}

    def __str__(self) -> str:
        from graphc.printer import format_graph

        return format_graph(self)

    __repr__ = __str__


# ---- helpers shared by passes ----------------------------------------------------------
def fetch_attr(gm: torch.nn.Module, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def op_name(node: fx.Node) -> str:
    """'aten.convolution' for aten.convolution.default, 'aten.mean.dim' for other overloads."""
    t = node.target
    if t is operator.getitem:
        return "getitem"
    if isinstance(t, torch._ops.OpOverload):
        ns, name = t.namespace, t._schema.name.split("::")[-1]
        overload = t._overloadname
        return f"{ns}.{name}" if overload == "default" else f"{ns}.{name}.{overload}"
    if isinstance(t, torch._ops.OpOverloadPacket):
        return str(t).replace("::", ".")
    return getattr(t, "__name__", str(t))


def node_spec(node: fx.Node) -> tuple[tuple[int, ...], torch.dtype] | None:
    """(shape, dtype) of a node from its propagated fake value, if it has one tensor."""
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor):
        return tuple(int(s) for s in val.shape), val.dtype
    return None


def spec_text(node: fx.Node) -> str:
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor):
        return f"{dtype_name(val.dtype)}[{', '.join(str(int(s)) for s in val.shape)}]"
    if isinstance(val, (tuple, list)):
        return "(" + ", ".join(
            f"{dtype_name(v.dtype)}[{', '.join(str(int(s)) for s in v.shape)}]"
            if isinstance(v, torch.Tensor) else "?" for v in val) + ")"
    return "?"
