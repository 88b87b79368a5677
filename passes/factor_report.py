"""The factorize report, kept in graph.meta["factorize"] (JSON-safe) and printable as a table.

Per layer: method, rank, params and FLOPs before/after, retained energy and the relative
output error of that layer alone on the calibration data; skipped layers with the reason.
Whole model: params and FLOPs of the factorized layers before/after, parameter count of
the graph, and the relative output error of the whole graph on the calibration data.
FLOPs are 2 x multiply-adds of the layer at the traced shapes; params count weights only
(biases are kept as they were).
"""

from __future__ import annotations

from rich.table import Table

from graphc.ir import Graph
from graphc.passes.factor_methods import dense_cost
from graphc.passes.quant_mixed import reference, relative_error
from graphc.report import render

EVAL_BATCHES = 8  # the whole-model error runs both graphs on this many calibration batches


def factor_report(before: Graph, after: Graph, chosen: list, skipped: list[dict],
                  batches: list[tuple], mode: str, value: float) -> dict:
    rows = [_row(lay, c) for lay, c in chosen]
    p0 = sum(r["params_before"] for r in rows)
    p1 = sum(r["params_after"] for r in rows)
    f0 = sum(r["flops_before"] for r in rows)
    f1 = sum(r["flops_after"] for r in rows)
    ev = batches[:EVAL_BATCHES]
    return {"layers": rows, "skipped": skipped, "selection": {mode: value},
            "params_before": p0, "params_after": p1, "flops_before": f0, "flops_after": f1,
            "graph_params": [before.stats()["params"], after.stats()["params"]],
            "output_error": relative_error(after, ev, reference(before, ev)),
            "eval_batches": len(ev)}


def _row(lay, c) -> dict:
    params, flops = dense_cost(lay.w4 if lay.w4 is not None else lay.w, lay.shape)
    return {"layer": lay.node, "op": lay.op, "weight_name": lay.base, "method": c.method,
            "rank": list(c.rank) if isinstance(c.rank, tuple) else c.rank,
            "params_before": params, "params_after": c.params, "flops_before": flops,
            "flops_after": c.flops, "energy": c.energy, "error": c.error}


def format_factor_report(meta: dict) -> str:
    """graph.meta["factorize"] as a table, the skipped layers and the whole-model summary."""
    t = Table()
    for col in ("layer", "method", "rank", "params", "FLOPs", "energy", "error"):
        t.add_column(col, justify="left" if col in ("layer", "method") else "right")
    for r in meta["layers"]:
        rank = "x".join(map(str, r["rank"])) if isinstance(r["rank"], list) else str(r["rank"])
        t.add_row(f"{r['layer']} ({r['weight_name']})", r["method"], rank,
                  _ratio(r["params_before"], r["params_after"]),
                  _ratio(r["flops_before"], r["flops_after"]), f"{r['energy']:.4f}",
                  f"{r['error']:.2e}")
    lines = [f"factorize ({', '.join(f'{k}={v}' for k, v in meta['selection'].items())})",
             render(t)]
    lines += [f"skipped {s['layer']} ({s['op']}): {s['skipped']}" for s in meta["skipped"]]
    if meta["params_before"]:
        g0, g1 = meta["graph_params"]
        lines.append(f"factorized layers: params {_ratio(meta['params_before'], meta['params_after'])}"
                     f", FLOPs {_ratio(meta['flops_before'], meta['flops_after'])}; graph params "
                     f"{_ratio(g0, g1)}; output error {meta['output_error']:.2e} on "
                     f"{meta['eval_batches']} calibration batch(es)")
    return "\n".join(lines)


def _ratio(a: int, b: int) -> str:
    return f"{a:,} -> {b:,} ({b / max(a, 1):.2f}x)"
