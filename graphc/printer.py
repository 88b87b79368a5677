"""Deterministic text form of a Graph: one line per node with its op, shape and dtype.

    graph Net(x: f32[1, 8]) -> (out0: f32[1, 4]) {
      %fc_weight: f32[4, 8] = param fc_weight
      %permute: f32[8, 4] = aten.permute(%fc_weight, [1, 0])
      %addmm: f32[1, 4] = aten.addmm(%fc_bias, %x, %permute)
      return (%addmm)
    }

Two traces of the same model print the same text, so IR dumps diff cleanly.
"""

from __future__ import annotations

import torch
from torch import fx

from graphc.ir import Graph, op_name, spec_text
from graphc.spec import dtype_name


def format_graph(g: Graph) -> str:
    ins = ", ".join(str(s) for s in g.inputs)
    outs = ", ".join(str(s) for s in g.outputs)
    st = g.stats()
    lines = [f"graph {g.name}({ins}) -> ({outs}) {{",
             f"  # {st['nodes']} ops, {st['params']} params ({st['param_bytes']} bytes)"]
    for n in g.gm.graph.nodes:
        if n.op != "placeholder":
            lines.append("  " + format_node(n))
    lines.append("}")
    return "\n".join(lines)


def format_node(n: fx.Node) -> str:
    if n.op == "output":
        return f"return {format_arg(n.args[0])}"
    head = f"%{n.name}: {spec_text(n)}"
    if n.op == "get_attr":
        return f"{head} = param {n.target}"
    args = [format_arg(a) for a in n.args]
    args += [f"{k}={format_arg(v)}" for k, v in n.kwargs.items()]
    return f"{head} = {op_name(n)}({', '.join(args)})"


def format_arg(a) -> str:
    """One argument; a table keyed by type keeps each kind's spelling in one place."""
    for kind, fmt in _ARG_FORMATS:
        if isinstance(a, kind):
            return fmt(a)
    return repr(a)


_ARG_FORMATS = [
    (fx.Node, lambda n: f"%{n.name}"),
    (tuple, lambda t: "(" + ", ".join(format_arg(x) for x in t) + ")"),
    (list, lambda t: "[" + ", ".join(format_arg(x) for x in t) + "]"),
    (torch.dtype, dtype_name),
    (torch.device, lambda d: f"device({d})"),
    (torch.memory_format, lambda m: str(m).removeprefix("torch.")),
    (torch.layout, lambda m: str(m).removeprefix("torch.")),
    (float, repr),
]
