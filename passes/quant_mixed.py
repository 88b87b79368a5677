"""Mixed precision for `quantize(max_error=...)`: per-layer sensitivity, then a greedy search.

Sensitivity of a layer = the model's output error with only that layer quantized. Error
is the relative RMS error of all outputs against the float graph on the calibration
batches (the first EVAL_BATCHES of them): ||y_q - y|| / ||y||, i.e. 10^(-SQNR/20).
While the whole model's error exceeds the budget, the most sensitive layer still at the
lowest precision moves one step up the ladder int4 -> int8 -> fp32; so every int4 layer
reaches int8 before any layer falls back to float. All-float meets any budget, so the
search always ends; the report says which layers were kept and the error achieved.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import torch

from graphc.ir import Graph
from graphc.passes.quant_policy import FLOAT, Layer, LayerScheme

EVAL_BATCHES = 8
Planned = list[tuple[Layer, LayerScheme]]


def reference(graph: Graph, batches: list[tuple]) -> list[tuple[torch.Tensor, ...]]:
    with torch.no_grad():
        return [graph(*b) for b in batches]


def relative_error(g: Graph, batches: list[tuple], ref) -> float:
    """||y_q - y|| / ||y|| over every output of every batch."""
    num = den = 0.0
    with torch.no_grad():
        for b, r in zip(batches, ref):
            for y, y0 in zip(g(*b), r):
                num += float(((y.double() - y0.double()) ** 2).sum())
                den += float((y0.double() ** 2).sum())
    return math.sqrt(num / max(den, 1e-300))


def sqnr_db(rel_err: float) -> float:
    return math.inf if rel_err == 0 else -20 * math.log10(rel_err)


def level(scheme: LayerScheme) -> int:
    """Bits a layer is held at: its weight's bits, 8 for a weight-less quantized matmul."""
    if scheme == FLOAT:
        return 32
    return scheme.weight.bits if scheme.weight else scheme.activation.bits


def promote(scheme: LayerScheme) -> LayerScheme:
    """One step up: int4 weights -> int8, anything else -> float."""
    if scheme.weight and scheme.weight.bits < 8:
        return dataclasses.replace(scheme, weight=dataclasses.replace(scheme.weight, bits=8))
    return FLOAT


def choose_precision(graph: Graph, layers: Planned, build: Callable[[Planned], Graph],
                     batches: list[tuple], max_error: float) -> tuple[Planned, dict]:
    """(layers with their final schemes, search record). max_error == 0: no search."""
    batches = batches[:EVAL_BATCHES]
    ref = reference(graph, batches)
    sens = {lay.node: relative_error(build([(lay, s)]), batches, ref) for lay, s in layers}
    chosen = {lay.node: (lay, s) for lay, s in layers}
    err = relative_error(build(list(chosen.values())), batches, ref)
    initial, kept = err, {}
    order = sorted(chosen, key=lambda n: -sens[n])
    while max_error > 0 and err > max_error:
        lowest = min(level(s) for _, s in chosen.values())
        if lowest == 32:
            break
        node = next(n for n in order if level(chosen[n][1]) == lowest)
        lay, s = chosen[node]
        chosen[node] = (lay, promote(s))
        kept[node] = "fp32" if chosen[node][1] == FLOAT else f"int{level(chosen[node][1])}"
        err = relative_error(build(list(chosen.values())), batches, ref)
    record = {"sensitivity": sens, "kept": kept, "initial_error": initial, "error": err,
              "max_error": max_error, "eval_batches": len(batches)}
    return list(chosen.values()), record
