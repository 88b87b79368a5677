"""fold-fake-quant on a shared weight: the int8 weight stays a codebook + packed indices.

    %w  = graphc.codebook_decode(%codebook, %packed, 4, [N, K])        float codebook
    %wq = graphc.fake_quant_per_channel(permute(%w), %scale, 0, 1, -127, 127)
      ->  %w8 = permute(graphc.codebook_decode(%codebook_int8, %packed, 4, [N, K]))

The fake-quant of a decoded element is quantize(codebook[k] / scale[row]), so it is a
function of (row, k) only: one int8 codebook row per output channel ([N, 2^bits] int8,
2^bits bytes per channel) reproduces the int8 weight exactly, and the artifact keeps the
b-bit indices instead of a dense int8 copy (which is what folding the decoded weight into
a constant would store: 8 bits per weight instead of b). The integer kernel then reads the
decoded int8 weight; the TVM backend decodes it once and caches it in the kernel's packed
layout (backends/tvm/decode_chain.py). Used by passes/fold_fake_quant.py.
"""

from __future__ import annotations

import torch
from torch import fx

from graphc.ir import Graph
from graphc.ops_codebook import decode_reference, rows_per_codebook
from graphc.ops_qint import quantize_reference
from graphc.rewrite import add_weight, const_value

aten, Q = torch.ops.aten, torch.ops.graphc
# ops between the decode and the fake-quant that only move elements (replayed on int8)
LAYOUT_OPS = {aten.permute.default, aten.t.default, aten.transpose.int, aten.view.default,
              aten.reshape.default, aten._unsafe_view.default}


def codebook_int8(g: Graph, fq: fx.Node, wq: torch.Tensor, scale: torch.Tensor,
                  grid: tuple[int, int], layout, layout_node) -> fx.Node | None:
    """A node computing `wq` (the int8 weight in the integer op's layout) from an int8
    codebook and fq's packed indices, or None when fq's weight is not a decoded codebook
    weight (or its int8 form would not be exactly wq). layout: the op's weight -> the
    integer op's (tensors); layout_node: the same on fx nodes."""
    chain, dec = _chain(fq.args[0])
    if dec is None:
        return None
    codebook, packed, bits, shape = dec.args
    cb = const_value(g, codebook).detach().to(torch.float32)
    rows = shape[0]
    if scale.numel() not in (1, rows):
        return None  # scales not per decoded row: no per-row int8 codebook
    per = rows_per_codebook(cb, shape)
    cb_rows = cb[torch.arange(rows) // per] if cb.dim() == 2 else cb.expand(rows, -1)
    c8 = quantize_reference(cb_rows, scale.reshape(-1, 1).expand(rows, 1),
                            torch.zeros((), dtype=torch.int32), *grid).to(torch.int8)
    value = decode_reference(c8, const_value(g, packed), bits, shape)
    for n in reversed(chain):
        value = n.target(value, *n.args[1:], **n.kwargs)
    if not _equal(layout(value), wq):
        return None
    graph = g.gm.graph
    name = f"{codebook.name}_int8"
    node = graph.get_attr(add_weight(g, name, c8.contiguous(), trainable=False))
    node = graph.call_function(Q.codebook_decode.default, (node, packed, bits, shape))
    for n in reversed(chain):
        node = graph.call_function(n.target, (node, *n.args[1:]), dict(n.kwargs))
    return layout_node(node)


def _equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and bool(torch.equal(a.to(torch.int8), b))


def _chain(node) -> tuple[list[fx.Node], fx.Node | None]:
    """(layout ops from node back to a codebook_decode, that decode) or ([], None)."""
    chain = []
    while isinstance(node, fx.Node) and node.op == "call_function":
        if node.target is Q.codebook_decode.default:
            return chain, node
        if node.target not in LAYOUT_OPS:
            break
        chain.append(node)
        node = node.args[0]
    return [], None
