"""The factorize pass's view of a graph: which nodes are layers it can factorize (a table
keyed by op), their weights as [out, D] matrices, the shapes their cost depends on, and the
input statistics (second moments) gathered from calibration data.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx

from graphc.distill_taps import tap_graph
from graphc.ir import Graph, node_spec, op_name
from graphc.ops_quant import FAKE_QUANT_OPS
from graphc.passes.factor_methods import Shape, Stats
from graphc.rewrite import const_value, is_constant

aten = torch.ops.aten


@dataclass(frozen=True)
class OpInfo:
    kind: str      # "linear" or "conv"
    x_arg: int     # the computed input
    w_arg: int     # the constant weight
    bias_arg: int | None
    layout: str    # how the op holds its weight: "in_out" (permute(W)), "out_in", "conv"


FACTOR_OPS = {
    aten.addmm.default: OpInfo("linear", 1, 2, 0, "in_out"),   # addmm(b, x, permute(W))
    aten.mm.default: OpInfo("linear", 0, 1, None, "in_out"),   # mm(x, permute(W))
    aten.linear.default: OpInfo("linear", 0, 1, 2, "out_in"),  # linear(x, W, b)
    aten.convolution.default: OpInfo("conv", 0, 1, 2, "conv"),
}


@dataclass
class Layer:
    node: str
    op: str
    kind: str
    info: OpInfo
    base: str                  # name the factor weights derive from (the weight's attribute)
    w: torch.Tensor            # float64 [out, D]
    w4: torch.Tensor | None    # a conv's float64 [O, I, kh, kw]
    bias: torch.Tensor | None
    shape: Shape
    x_name: str                # the input node, whose statistics the layer uses

    def matches(self, pattern: str) -> bool:
        return fnmatch.fnmatchcase(self.node, pattern) or fnmatch.fnmatchcase(self.base, pattern)


def find_layers(g: Graph, ops, include, exclude) -> tuple[list[Layer], list[dict]]:
    """(layers to consider, skipped rows) over the nodes of FACTOR_OPS with a constant
    weight; a skipped row names the node, op and why."""
    layers, skipped = [], []
    for n in g.gm.graph.nodes:
        info = FACTOR_OPS.get(n.target) if n.op == "call_function" else None
        if info is None or not is_constant(n.args[info.w_arg]) or is_constant(n.args[info.x_arg]):
            continue
        layer = _layer(g, n, info)
        if info.kind not in ops or any(layer.matches(p) for p in exclude) or (
                include and not any(layer.matches(p) for p in include)):
            continue
        reason = _unsupported(n, info)
        if reason:
            skipped.append(skip_row(layer, reason))
        else:
            layers.append(layer)
    return layers, skipped


def skip_row(layer: Layer, reason: str) -> dict:
    return {"layer": layer.node, "op": layer.op, "weight_name": layer.base, "skipped": reason}


def _unsupported(n: fx.Node, info: OpInfo) -> str | None:
    """Why a matched node cannot be factorized, or None."""
    if any(a.target in FAKE_QUANT_OPS for a in n.all_input_nodes):
        return "already quantized; run factorize before quantize"
    if n.target is aten.addmm.default and (n.kwargs.get("beta", 1) != 1
                                           or n.kwargs.get("alpha", 1) != 1):
        return "addmm with beta/alpha != 1"
    if info.kind == "conv":
        w = n.args[1].meta.get("val")
        if w is None or w.dim() != 4:
            return "only 2-D convolutions are factorized"
        if n.args[6]:
            return "transposed convolution"
        if n.args[8] != 1:
            return f"grouped convolution (groups={n.args[8]}); its channels are already split"
    return None


def _layer(g: Graph, n: fx.Node, info: OpInfo) -> Layer:
    w = const_value(g, n.args[info.w_arg]).detach().double()
    b_node = n.args[info.bias_arg] if info.bias_arg is not None and \
        len(n.args) > info.bias_arg else None
    bias = const_value(g, b_node).detach().double() if isinstance(b_node, fx.Node) else None
    x = n.args[info.x_arg]
    base = _source(n.args[info.w_arg]) or f"{n.name}_weight"
    (xs, _), (ys, _) = node_spec(x), node_spec(n)
    if info.kind == "conv":
        shape = Shape(n=xs[0], hw=tuple(xs[2:]), out_hw=tuple(ys[2:]), kernel=tuple(w.shape[2:]))
        mat, w4 = w.reshape(w.shape[0], -1), w
    else:
        rows = 1
        for s in xs[:-1]:
            rows *= s
        mat, w4 = (w.T if info.layout == "in_out" else w), None
        shape = Shape(rows=rows)
    return Layer(n.name, op_name(n), info.kind, info, base, mat.contiguous(), w4,
                 bias if bias is None or bias.dim() == 1 else None, shape, x.name)


def _source(node: fx.Node) -> str | None:
    while node.op != "get_attr":
        if len(node.all_input_nodes) != 1:
            return None
        node = node.all_input_nodes[0]
    return str(node.target)


def gather_stats(g: Graph, layers: list[Layer], batches: list[tuple]) -> dict[str, Stats]:
    """Per layer (keyed by node name), the second moments of its input rows or patches."""
    names = sorted({lay.x_name for lay in layers})
    gm = tap_graph(g, names, "calibration")
    n_out = len(g.outputs)
    acc: dict[str, list] = {}
    with torch.no_grad():
        for batch in batches:
            values = dict(zip(names, gm(*batch)[n_out:]))
            for lay in layers:
                rows = _rows(lay, g, values[lay.x_name]).double()
                a = acc.setdefault(lay.node, [0, 0, 0])
                a[0], a[1], a[2] = a[0] + rows.T @ rows, a[1] + rows.sum(0), a[2] + len(rows)
    return {k: Stats(*v) for k, v in acc.items()}


def _rows(lay: Layer, g: Graph, x: torch.Tensor) -> torch.Tensor:
    """The layer's input as rows its weight multiplies: features, or conv patches."""
    if lay.kind == "linear":
        return x.reshape(-1, x.shape[-1])
    node = next(n for n in g.gm.graph.nodes if n.name == lay.node)
    stride, padding, dilation = node.args[3], node.args[4], node.args[5]
    p = F.unfold(x, lay.shape.kernel, dilation=dilation, padding=padding, stride=stride)
    return p.transpose(1, 2).reshape(-1, p.shape[1])
