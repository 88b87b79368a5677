"""The quantize report, kept in graph.meta["quantize"] (JSON-safe) and printable as a table.

Per layer: class, weight and input schemes, bits, scale ranges, and the output error with
only that layer quantized (its sensitivity). Whole model: output error and SQNR on the
calibration data, and weight bytes before/after *as if* each quantized weight were stored
in its bits (plus its float32 scales and, when asymmetric, int32 zero points). The graph
itself still holds float32 weights: real byte savings come from fold-fake-quant.
"""

from __future__ import annotations

from rich.table import Table

from graphc.ir import Graph
from graphc.ops_quant import FAKE_QUANT_OPS
from graphc.passes.quant_mixed import level, sqnr_db
from graphc.passes.quant_policy import Layer, LayerScheme
from graphc.report import render

_FQ_SCALED = {op for op, kind in FAKE_QUANT_OPS.items() if kind != "dynamic"}

NOTE = ("weight bytes are as if stored in their quantized bits; the graph keeps float32 "
        "weights until fold-fake-quant stores integers")


def quant_report(before: Graph, after: Graph, layers: list[tuple[Layer, LayerScheme]],
                 search: dict, batches: list[tuple]) -> dict:
    rows = [_row(after, lay, s, search) for lay, s in layers]
    fp32, quant = _weight_bytes(before, after, layers)
    return {"layers": rows, "weight_bytes_fp32": fp32, "weight_bytes_quantized": quant,
            "output_error": search["error"], "sqnr_db": sqnr_db(search["error"]),
            "max_error": search["max_error"], "error_before_search": search["initial_error"],
            "kept": search["kept"], "calibration_batches": len(batches),
            "eval_batches": search["eval_batches"], "note": NOTE}


def _row(g: Graph, lay: Layer, s: LayerScheme, search: dict) -> dict:
    w_scale, a_scales = _scales(g, lay)
    act = "-" if not lay.act_args else "fp32" if s.activation is None else (  # -: indices
        f"{s.activation}".replace(" per-t", "") + (" dynamic" if s.dynamic else " static"))
    return {"layer": lay.node, "op": lay.op, "class": lay.kind, "weight_name": lay.weight,
            "weight": str(s.weight) if s.weight and lay.weight else "fp32",
            "activation": act, "bits": level(s),
            "weight_scale": _span([w_scale] if w_scale is not None else []),
            "act_scale": _span(a_scales),
            "error_alone": search["sensitivity"][lay.node], "kept": search["kept"].get(lay.node)}


def _scales(g: Graph, lay: Layer):
    """(weight scale tensor or None, [input scale tensors]) of a layer in the quantized g."""
    node = next(n for n in g.gm.graph.nodes if n.name == lay.node)
    w_scale, a_scales = None, []
    for i, arg in enumerate(node.args):
        if getattr(arg, "target", None) in _FQ_SCALED:
            scale = g.weight(arg.args[1]).detach()
            if i == lay.weight_arg:
                w_scale = scale
            else:
                a_scales.append(scale)
    return w_scale, a_scales


def _span(scales) -> list[float] | None:
    if not scales:
        return None
    return [min(float(t.min()) for t in scales), max(float(t.max()) for t in scales)]


def _weight_bytes(before: Graph, after: Graph, layers) -> tuple[int, int]:
    """Float32 bytes of every weight; and with each quantized layer's weight at its bits."""
    weights = before.weights()
    fp32 = sum(t.numel() * t.element_size() for t in weights.values())
    quant, seen = fp32, set()
    for lay, s in layers:
        scale = _scales(after, lay)[0]
        if scale is None or lay.weight not in weights or lay.weight in seen:
            continue
        seen.add(lay.weight)
        w = weights[lay.weight]
        meta = scale.numel() * (4 if s.weight.symmetric else 8)  # f32 scale (+ i32 zero point)
        quant += (w.numel() * s.weight.bits + 7) // 8 + meta - w.numel() * w.element_size()
    return fp32, quant


def measure_deployed(before: Graph, after: Graph, target="cpu", repeat: int = 20) -> dict:
    """The report's deployed side: compile both graphs for `target`, save each artifact and
    time each (CompiledModel.benchmark, median ms). `after` is what you ship: the folded graph
    (a fake-quant graph runs in float and is slower than `before`, which this shows)."""
    import tempfile
    from pathlib import Path

    from graphc.api import compile as compile_graph

    out: dict = {"target": str(target), "artifact_bytes": [], "latency_ms": []}
    with tempfile.TemporaryDirectory(prefix="graphc-deployed-") as tmp:
        for i, g in enumerate((before, after)):
            cm = compile_graph(g, target=target)
            path = Path(tmp) / f"{i}.graphc"
            cm.save(path)
            out["artifact_bytes"].append(path.stat().st_size)
            out["latency_ms"].append(cm.benchmark(repeat=repeat)["median"])
    return out


def format_quant_report(meta: dict, deployed: dict | None = None) -> str:
    """graph.meta["quantize"] as a printable table with the whole-model summary below it, and
    the measure_deployed() result when given."""
    t = Table()
    for col in ("layer", "class", "weight", "input", "w scale", "in scale", "err alone",
                "kept"):
        t.add_column(col, justify="right" if col == "err alone" else "left")
    for r in meta["layers"]:
        t.add_row(r["layer"] + (f" ({r['weight_name']})" if r["weight_name"] else ""),
                  r["class"], r["weight"], r["activation"], _fmt_span(r["weight_scale"]),
                  _fmt_span(r["act_scale"]), f"{r['error_alone']:.2e}", r["kept"] or "")
    fp32, q = meta["weight_bytes_fp32"], meta["weight_bytes_quantized"]
    budget = f" (budget {meta['max_error']:.2e})" if meta["max_error"] else ""
    return (f"quantize\n{render(t)}\n"
            f"output error {meta['output_error']:.2e}{budget}, SQNR {meta['sqnr_db']:.1f} dB "
            f"on {meta['eval_batches']} calibration batch(es)\n"
            f"weight bytes {fp32:,} -> {q:,} ({q / fp32:.2f}x); {meta['note']}"
            + ("" if deployed is None else _fmt_deployed(deployed)))


def _fmt_deployed(d: dict) -> str:
    (b0, b1), (t0, t1) = d["artifact_bytes"], d["latency_ms"]
    return (f"\non {d['target']}: artifact {b0:,} -> {b1:,} bytes ({b1 / b0:.2f}x), "
            f"latency {t0:.3f} -> {t1:.3f} ms ({t1 / t0:.2f}x)")


def _fmt_span(span) -> str:
    if span is None:
        return "-"
    lo, hi = span
    return f"{lo:.1e}" if lo == hi else f"{lo:.1e}..{hi:.1e}"

