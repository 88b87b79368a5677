"""Human-readable reports: model inspection and the per-pass table."""

from __future__ import annotations

import io
import os

from rich.console import Console
from rich.table import Table

from graphc.ir import Graph


def render(table: Table) -> str:
    """A rich Table as plain text (no colour codes), for printing, logs and tests."""
    buf = io.StringIO()
    Console(file=buf, width=120, color_system=None, force_terminal=False).print(table)
    return buf.getvalue().rstrip("\n")


def passes_table(rows: list[dict], title: str = "passes") -> str:
    """The pipeline's per-pass records (PassRecord.row()) as a table."""
    if not rows:
        return f"{title}\n(no passes were run)"
    t = Table()
    for col in ("step", "time ms", "nodes", "params", "param bytes", "max abs err",
                "max rel err"):
        t.add_column(col, justify="left" if col == "step" else "right")
    for r in rows:
        t.add_row(r["step"], f"{r['seconds'] * 1e3:.1f}", str(r["nodes"]), f"{r['params']:,}",
                  f"{r['param_bytes']:,}", f"{r['max_abs_err']:.2e}", f"{r['max_rel_err']:.2e}")
    return f"{title}\n{render(t)}"  # the title on its own line: rich would wrap it


def inspect_text(g: Graph, source=None) -> str:
    """Specs, parameter count/bytes and op histogram of a traced model."""
    st = g.stats()
    lines = [f"model {g.name}" + (f" ({source})" if isinstance(source, (str, os.PathLike))
                                   else ""),
             "inputs:  " + ", ".join(str(s) for s in g.inputs),
             "outputs: " + ", ".join(str(s) for s in g.outputs),
             f"parameters: {st['params']:,} ({st['param_bytes']:,} bytes)",
             f"ops: {st['nodes']}"]
    hist = Table(title="graphc IR ops (core ATen)")
    hist.add_column("op")
    hist.add_column("count", justify="right")
    for op, n in sorted(g.op_histogram().items(), key=lambda kv: (-kv[1], kv[0])):
        hist.add_row(op, str(n))
    text = "\n".join(lines) + "\n" + render(hist)
    if isinstance(source, (str, os.PathLike)) and str(source).endswith(".onnx"):
        text += "\n" + _onnx_histogram(source)
    return text


def _onnx_histogram(path) -> str:
    import collections

    import onnx

    model = onnx.load(str(path), load_external_data=False)
    counts = collections.Counter(n.op_type for n in model.graph.node)
    t = Table(title=f"ONNX ops (opset {max(o.version for o in model.opset_import)})")
    t.add_column("op_type")
    t.add_column("count", justify="right")
    for op, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
        t.add_row(op, str(n))
    return render(t)
