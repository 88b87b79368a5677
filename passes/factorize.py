"""factorize: dense linear and conv layers -> chains of thinner layers (low-rank factors).

    %y = aten.addmm(%b, %x, permute(%fc_weight))             W: [out, in]
      ->  %t = aten.mm(%x, permute(%fc_weight_in))            [r, in]
          %y = aten.addmm(%b, %t, permute(%fc_weight_out))    [out, r]
    %y = aten.convolution(%x, %w, %b, stride, pad, ...)      tucker2:
      ->  1x1 conv (I -> ri), kxk conv (ri -> ro, stride, pad), 1x1 conv (ro -> O, bias)

Decompositions are in passes/factor_methods.py, layers and input statistics in
passes/factor_layers.py, rank selection in passes/factor_policy.py, the report (kept in
graph.meta["factorize"]) in passes/factor_report.py. The factorized node keeps its name
(it becomes the last layer of its chain), so reports and distillation features name it
as before. Factors are ordinary trainable weights: graphc.distill fine-tunes them.

Calibration data: `calibration=` (Python API), else graph.meta["calibration"], else the
example inputs; it drives data-aware SVD and every layer's measured output error.
"""

from __future__ import annotations

import logging
from typing import Literal

import torch
from torch import fx

from graphc.calibrate import as_batches
from graphc.errors import PassError
from graphc.ir import Graph
from graphc.pass_manager import register_pass
from graphc.passes.factor_layers import Layer, find_layers, gather_stats, skip_row
from graphc.passes.factor_methods import METHODS, Candidate, dense_cost
from graphc.passes.factor_policy import candidates, choose_each, choose_ratio
from graphc.passes.factor_report import factor_report
from graphc.rewrite import add_weight
from graphc.verify import propagate

log = logging.getLogger("graphc")
aten = torch.ops.aten
Method = Literal["auto", "svd", "data-aware", "tucker2", "cp", "spatial-svd"]


@register_pass("factorize")
def factorize(graph: Graph, *, method: Method = "auto", rank: int | None = None,
              energy: float | None = None, ratio: float | None = None,
              max_error: float | None = None, multiple: int = 8,
              ops: tuple[str, ...] = ("linear", "conv"), include: tuple[str, ...] = (),
              exclude: tuple[str, ...] = (), require_saving: bool = True,
              calibration: list | None = None) -> Graph:
    """dense linear/conv layers -> low-rank factor chains (SVD, data-aware SVD, Tucker-2, CP).

    method: auto (every method of the layer's class competes), svd / data-aware (linear),
    tucker2 / cp / spatial-svd (conv). Rank selection, one of: rank (fixed), energy
    (retained fraction), ratio (params of the factorized layers, whole model), max_error
    (relative output error per layer on the calibration data); none: energy=0.95. Ranks
    are multiples of `multiple`. ops / include / exclude: layer classes and fnmatch
    patterns on node or weight names. require_saving: leave a layer dense unless both its
    params and FLOPs drop. calibration: input batches (Python API).
    """
    mode, value = _check(method, rank, energy, ratio, max_error, multiple, ops)
    layers, skipped = find_layers(graph, tuple(ops), tuple(include), tuple(exclude))
    if not layers:
        log.info("factorize: no layer to factorize in '%s'", graph.name)
        return graph
    batches = as_batches(graph, calibration if calibration is not None
                         else graph.meta.get("calibration"))
    stats = gather_stats(graph, layers, batches)
    chosen, skipped = _choose(layers, stats, method, mode, value, multiple, rank,
                              require_saving, skipped)
    for row in skipped:
        log.info("factorize: %%%s (%s) left dense: %s", row["layer"], row["op"], row["skipped"])
    if not chosen:  # unchanged: the reasons are in the log
        return graph
    out = graph.copy()
    nodes = {n.name: n for n in out.gm.graph.nodes}
    used = _weight_names(out)
    for lay, cand in chosen:
        rewrite(out, nodes[lay.node], lay, cand)
    _drop_replaced_weights(out, used)
    propagate(out)
    out.meta["factorize"] = factor_report(graph, out, chosen, skipped, batches, mode, value)
    return out


def _check(method, rank, energy, ratio, max_error, multiple, ops) -> tuple[str, float]:
    """Validate the options; return the rank-selection mode and its value."""
    def bad(msg: str):
        raise PassError(f"pass 'factorize': {msg}")
    if method != "auto" and method not in METHODS:
        bad(f"method={method!r} is unknown; choose from {['auto', *METHODS]}")
    unknown = [k for k in ops if k not in ("linear", "conv")]
    if unknown:
        bad(f"ops={list(ops)} names unknown op classes {unknown}; choose from "
            "['linear', 'conv']")
    if not isinstance(multiple, int) or multiple < 1:
        bad(f"multiple={multiple!r} must be an int >= 1 (8 suits CPU vector widths)")
    modes = {k: v for k, v in (("rank", rank), ("energy", energy), ("ratio", ratio),
                               ("max_error", max_error)) if v is not None}
    if len(modes) > 1:
        bad(f"give one of rank, energy, ratio, max_error; got {modes}")
    limits = {"rank": ("an int >= 1", lambda v: isinstance(v, int) and v >= 1),
              "energy": ("in (0, 1]", lambda v: 0 < v <= 1),
              "ratio": ("in (0, 1] (params of the factorized layers after / before)",
                        lambda v: 0 < v <= 1),
              "max_error": ("> 0 (relative output error per layer)", lambda v: v > 0)}
    for k, v in modes.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not limits[k][1](v):
            bad(f"{k}={v!r} must be {limits[k][0]}")
    return next(iter(modes.items())) if modes else ("energy", 0.95)


def _choose(layers, stats, method, mode, value, multiple, rank, require_saving, skipped):
    """[(layer, candidate)] to rewrite, and the skipped rows (with reasons)."""
    per_layer: dict[str, list[Candidate]] = {}
    for lay in layers:
        cands = candidates(lay, stats[lay.node], method, multiple, rank or 0,
                           require_saving)
        if cands:
            per_layer[lay.node] = cands
        elif method != "auto" and lay.kind != METHODS[method][0]:
            skipped.append(skip_row(lay, f"method '{method}' is for {METHODS[method][0]} "
                                         f"layers; use method=auto"))
        else:
            skipped.append(skip_row(lay, _not_worth(lay, rank, multiple)))
    by_name = {lay.node: lay for lay in layers}
    if mode == "ratio" and per_layer:
        dense = {k: by_name[k].w.numel() for k in per_layer}
        picks = choose_ratio(per_layer, dense, value)
    else:
        picks = {k: choose_each(v, mode, value) for k, v in per_layer.items()}
    chosen = []
    for k, pick in picks.items():
        if isinstance(pick, Candidate):
            chosen.append((by_name[k], pick))
        else:
            skipped.append(skip_row(by_name[k], pick))
    return chosen, skipped


def _not_worth(lay: Layer, rank: int, multiple: int) -> str:
    params, flops = dense_cost(lay.w4 if lay.w4 is not None else lay.w, lay.shape)
    at = f"rank {rank}" if rank else f"any rank that is a multiple of {multiple}"
    return (f"not worth it: at {at} the factors would not cut both its params ({params:,}) "
            f"and FLOPs ({flops:,})")


# ---- rewriting --------------------------------------------------------------------------
def rewrite(g: Graph, node: fx.Node, lay: Layer, cand: Candidate) -> None:
    """Insert the factor chain before `node`, which becomes the chain's last layer."""
    factors = [f.to(torch.float32).contiguous() for f in cand.make()]
    names = ["in", "core", "out"] if len(factors) == 3 else ["in", "out"]
    graph = g.gm.graph
    with graph.inserting_before(node):
        ws = [graph.get_attr(add_weight(g, f"{lay.base}_{n}", f)) for n, f in zip(names, factors)]
        x = node.args[lay.info.x_arg]
        if lay.kind == "linear":
            _linear_chain(graph, node, lay, x, ws)
        else:
            _conv_chain(graph, node, cand, x, ws)


def _call(graph: fx.Graph, target, args: tuple, name: str) -> fx.Node:
    """A call node named after the layer it belongs to (%addmm_in, not %mm_default)."""
    return graph.create_node("call_function", target, args, name=name)


def _linear_chain(graph: fx.Graph, node: fx.Node, lay: Layer, x, ws) -> None:
    first, last = ws
    if lay.info.layout == "out_in":  # aten.linear(x, W, b) keeps [out, in] weights
        t = _call(graph, aten.linear.default, (x, first), f"{node.name}_in")
        node.args = (t, last, *node.args[2:])
        return
    p1 = _call(graph, aten.permute.default, (first, [1, 0]), f"{node.name}_in_t")
    t = _call(graph, aten.mm.default, (x, p1), f"{node.name}_in")
    p2 = _call(graph, aten.permute.default, (last, [1, 0]), f"{node.name}_out_t")
    args = list(node.args)
    args[lay.info.x_arg], args[lay.info.w_arg] = t, p2
    node.args = tuple(args)


def _conv_chain(graph: fx.Graph, node: fx.Node, cand: Candidate, x, ws) -> None:
    """convolution(x, w, b, stride, padding, dilation, transposed, output_padding, groups)."""
    _, _, bias, stride, padding, dilation, _, _, _ = node.args
    conv = aten.convolution.default
    one, zero = [1, 1], [0, 0]
    if cand.method == "spatial-svd":  # kx1 carries the vertical stride/pad/dilation, 1xk the rest
        t = _call(graph, conv, (x, ws[0], None, [stride[0], 1], [padding[0], 0],
                                [dilation[0], 1], False, zero, 1), f"{node.name}_in")
        node.args = (t, ws[1], bias, [1, stride[1]], [0, padding[1]], [1, dilation[1]],
                     False, zero, 1)
        return
    t = _call(graph, conv, (x, ws[0], None, one, zero, one, False, zero, 1), f"{node.name}_in")
    groups = cand.rank if cand.method == "cp" else 1  # CP's middle conv is depthwise
    t = _call(graph, conv, (t, ws[1], None, stride, padding, dilation, False, zero, groups),
              f"{node.name}_core")
    node.args = (t, ws[2], bias, one, zero, one, False, zero, 1)


def _weight_names(g: Graph) -> set[str]:
    return {str(n.target) for n in g.gm.graph.nodes if n.op == "get_attr"}


def _drop_replaced_weights(g: Graph, used_before: set[str]) -> None:
    """DCE, then delete the dense weights the factors replaced from the copy's module (the
    input graph keeps them), so an exported artifact does not carry them."""
    g.gm.graph.eliminate_dead_code()
    for name in used_before - _weight_names(g):
        delattr(g.gm, name)
    g.gm.recompile()
