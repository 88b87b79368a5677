"""fold-fake-quant: fake-quantized linear/conv/embedding -> integer ops on int8 weights.

    %xq = graphc.fake_quant_per_tensor(%x, %x_scale, %x_zp, 0, 255)
    %wq = graphc.fake_quant_per_channel(%w, %w_scale, %w_zp, 1, -127, 127)
    %y  = aten.addmm(%b, %xq, %wq)
      ->  %x_u8 = graphc.quantize(%x, %x_scale, %x_zp, 0, 255)
          %y    = graphc.qlinear(%x_u8, %x_scale, %x_zp, %w_int8, %w_scale, %w_sum, %b)

The weight is stored as int8 (its float copy is dropped), laid out as the integer op reads
it ([K, N] for qlinear, [O, I/g, kh, kw] for qconv2d, [V, D] for qembedding), with its
per-output-channel scales and column sums (for the input zero point's correction). Dynamic
inputs become graphc.quantize_dynamic, whose scale and zero point feed the integer op. One
quantize node serves every layer that reads the same fake-quantized input.

What it leaves fake-quantized, with the reason logged and in graph.meta["fold-fake-quant"]:
asymmetric weights, grids wider than 8 bits, per-channel axes that are not the output
channel, weight-only linear/conv (no integer kernel with float inputs), dynamic inputs on a
convolution, matmuls of two computed tensors (attention), and non-2-D or transposed
convolutions. Those still run (the TVM backend emulates fake-quant in float).
"""

from __future__ import annotations

import logging
import operator
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import fx

from graphc.ir import Graph
from graphc.ops_qint import quantize_reference
from graphc.ops_quant import FAKE_QUANT_OPS
from graphc.pass_manager import register_pass
from graphc.passes.cleanup import dead_code_elimination
from graphc.passes.fold_codebook import codebook_int8
from graphc.rewrite import Match, Rule, add_weight, apply_rules, const_value, is_constant
from graphc.verify import propagate

aten, Q = torch.ops.aten, torch.ops.graphc
log = logging.getLogger("graphc")
INT8 = (-128, 127)
ACT_GRIDS = ((0, 255), (-128, 127), (-127, 127))


@dataclass(frozen=True)
class FoldInfo:
    """One float op: where its input, weight and bias are, the weight's output-channel axis
    as the op reads it, how to lay the weight out for the integer op, and the integer op."""

    x_arg: int | None  # None: weight-only op (embedding)
    w_arg: int
    bias: Callable[[fx.Node], fx.Node | None]
    out_axis: int
    layout: Callable[[torch.Tensor], torch.Tensor]  # op's weight -> integer op's weight
    layout_node: Callable  # the same on an fx node (graph, node) -> node
    sum_dims: Callable[[torch.Tensor], tuple[int, ...]] | None  # dims summed for w_sum
    build: str  # which integer op


def _arg(i: int) -> Callable[[fx.Node], fx.Node | None]:
    return lambda n: n.args[i] if len(n.args) > i else None


def _same(w):
    return w


def _t(graph: fx.Graph, node: fx.Node) -> fx.Node:
    return graph.call_function(aten.t.default, (node,))


FOLDS: dict = {
    aten.addmm.default: FoldInfo(1, 2, _arg(0), 1, _same, lambda g, n: n, lambda w: (0,),
                                 "linear"),
    aten.mm.default: FoldInfo(0, 1, lambda n: None, 1, _same, lambda g, n: n, lambda w: (0,),
                              "linear"),
    aten.linear.default: FoldInfo(0, 1, _arg(2), 0, lambda w: w.t(), _t, lambda w: (0,),
                                  "linear"),
    aten.convolution.default: FoldInfo(0, 1, _arg(2), 0, _same, lambda g, n: n,
                                       lambda w: tuple(range(1, w.dim())), "conv2d"),
    aten.embedding.default: FoldInfo(None, 0, lambda n: None, 0, _same, lambda g, n: n, None,
                                     "embedding"),
}


def _fq(node) -> str | None:
    """'per_tensor', 'per_channel' or 'dynamic' when node is a fake-quant op."""
    return FAKE_QUANT_OPS.get(node.target) if isinstance(node, fx.Node) else None


def _match(g: Graph, node: fx.Node) -> Match | None:
    info = FOLDS.get(node.target) if node.op == "call_function" else None
    if info is None or _fq(node.args[info.w_arg]) is None:
        return None
    m = {"node": node, "w": node.args[info.w_arg], "info": info}
    if info.x_arg is not None:
        m["x"] = node.args[info.x_arg]
    return m


def _grid(fq: fx.Node) -> tuple[int, int]:
    return tuple(fq.args[-2:])


def _check(g: Graph, m: Match) -> str | None:
    info, w, node = m["info"], m["w"], m["node"]
    if not is_constant(w.args[0]):
        return "the fake-quantized weight is computed from the inputs, not a constant"
    if _fq(w) == "dynamic" or torch.any(g.weight(w.args[2]) != 0):
        return "asymmetric weights (zero point != 0); integer kernels take symmetric ones"
    lo, hi = _grid(w)
    if lo < INT8[0] or hi > INT8[1]:
        return f"weight grid [{lo}, {hi}] does not fit int8"
    if _fq(w) == "per_channel" and w.args[3] % _rank(g, w) != info.out_axis:
        return f"per-channel axis {w.args[3]} is not the output-channel axis {info.out_axis}"
    if info.build == "conv2d":
        reason = _conv_reason(node)
        if reason:
            return reason
    if info.x_arg is None:
        return None
    x = m["x"]
    if _fq(x) is None:
        return "weight-only: the input is float, and there is no integer kernel for it"
    if _grid(x) not in ACT_GRIDS:
        return f"input grid {_grid(x)} is not 8-bit"
    if _fq(x) == "per_channel":
        return "per-channel input ranges have no integer kernel"
    if _fq(x) == "dynamic" and info.build == "conv2d":
        return "dynamic input ranges on a convolution (padding needs a constant zero point)"
    if _fq(x) == "per_tensor" and not (is_constant(x.args[1]) and is_constant(x.args[2])):
        return "the input's scale / zero point are computed, not constants"
    return None


def _rank(g: Graph, node: fx.Node) -> int:
    val = node.meta.get("val")
    return val.dim() if isinstance(val, torch.Tensor) else const_value(g, node.args[0]).dim()


def _conv_reason(node: fx.Node) -> str | None:
    stride, padding, _, transposed = node.args[3:7]
    if transposed:
        return "transposed convolution"
    if len(stride) != 2 or len(padding) != 2:
        return f"{len(stride)}-D convolution; the integer kernel is 2-D"
    return None


def _rewrite(g: Graph, m: Match) -> None:
    info, node, w = m["info"], m["node"], m["w"]
    graph = g.gm.graph
    wq, scale = _int_weight(g, w, info)
    name = (w.name.removesuffix("_q")) + "_int8"  # %fc_weight_q
    with graph.inserting_before(node):
        # a shared (codebook) weight stays b-bit indices, with an int8 codebook per channel
        w_node = codebook_int8(g, w, wq, scale, _grid(w), info.layout,
                               lambda n: info.layout_node(graph, n))
        if w_node is None:
            w_node = graph.get_attr(add_weight(g, name, wq, trainable=False))
        s_node = graph.get_attr(add_weight(g, f"{name}_scale", scale, trainable=False))
        if info.build == "embedding":
            args = (w_node, s_node, node.args[1])
        else:
            w_sum = wq.to(torch.int32).sum(dim=info.sum_dims(wq)).to(torch.int32)
            sum_node = graph.get_attr(add_weight(g, f"{name}_sum", w_sum, trainable=False))
            xq, xs, xz = _quantized_input(g, m["x"])
            conv = ()  # qconv2d's stride, dilation, groups; its input padded beforehand
            if info.build == "conv2d":
                xq = _pad(g, xq, xz, node.args[4])
                conv = (list(node.args[3]), list(node.args[5]), node.args[8])
            args = (xq, xs, xz, w_node, s_node, sum_node, info.bias(node), *conv)
        new = graph.create_node("call_function", getattr(Q, "q" + info.build).default, args,
                                name=f"q{node.name}")
    new.meta = dict(node.meta)
    node.replace_all_uses_with(new)
    graph.erase_node(node)


def _pad(g: Graph, xq: fx.Node, xz: fx.Node, padding) -> fx.Node:
    """x padded with its zero point (the integer standing for 0.0) for a padded conv."""
    if not any(padding):
        return xq
    pad = [padding[1], padding[1], padding[0], padding[0]]
    value = float(const_value(g, xz))
    done = next((u for u in xq.users if u.target is aten.constant_pad_nd.default
                 and u.args[1:] == (pad, value)), None)
    return done or g.gm.graph.call_function(aten.constant_pad_nd.default, (xq, pad, value))


def _int_weight(g: Graph, w: fx.Node, info: FoldInfo) -> tuple[torch.Tensor, torch.Tensor]:
    """The weight on its grid as int8 in the integer op's layout, and per-channel scales."""
    value = const_value(g, w.args[0]).detach()
    scale = g.weight(w.args[1]).detach().to(torch.float32)
    channels = value.shape[info.out_axis]
    shape = [1] * value.dim()
    if scale.dim() == 1:
        shape[w.args[3] % value.dim()] = -1
    q = quantize_reference(value, scale.reshape(shape), torch.zeros((), dtype=torch.int32),
                           *_grid(w)).to(torch.int8)  # _check: the grid fits int8
    return info.layout(q).contiguous(), scale.expand(channels).contiguous()


def _quantized_input(g: Graph, fq: fx.Node) -> tuple[fx.Node, fx.Node, fx.Node]:
    """(integers, scale, zero point) for a fake-quantized input, made once per input."""
    x, graph = fq.args[0], g.gm.graph
    op = Q.quantize_dynamic.default if _fq(fq) == "dynamic" else Q.quantize.default
    args = (x, *fq.args[1:])
    done = next((u for u in x.users if u.target is op and u.args == args), None)
    if done is None:
        with graph.inserting_after(fq):
            done = graph.create_node("call_function", op, args, name=f"{x.name}_{_dtype(fq)}")
    if op is Q.quantize.default:
        return done, fq.args[1], fq.args[2]
    items = {u.args[1]: u for u in done.users if u.target is operator.getitem}
    for i in range(3):
        if i not in items:
            with graph.inserting_after(done):
                items[i] = graph.call_function(operator.getitem, (done, i))
    return items[0], items[1], items[2]


def _dtype(fq: fx.Node) -> str:
    return "i8" if _grid(fq)[0] < 0 else "u8"


RULES = [Rule("fold-fake-quant", _match, _check, _rewrite)]


@register_pass("fold-fake-quant")
def fold_fake_quant(graph: Graph) -> Graph:
    """fake-quant around linear/conv/embedding -> graphc.quantize + qlinear/qconv2d/qembedding."""
    out, misses = apply_rules(graph, RULES)
    for miss in misses:
        log.info("fold-fake-quant: left %s", miss)
    if out is graph:
        return graph
    out = propagate(dead_code_elimination(out))
    out.meta["fold-fake-quant"] = {"left": [str(m) for m in misses]}
    return out
