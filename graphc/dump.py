"""IR dumps: one numbered, deterministic file per stage, and an SVG picture of each graph.

    ir/00-input.txt  ir/00-input.svg  ir/01-fold-batchnorm.txt ...  ir/03-relax.py  ir/05-tir.py
"""

from __future__ import annotations

import html
import os
from pathlib import Path

import networkx as nx
import torch.fx as fx

from graphc.ir import Graph, op_name, spec_text
from graphc.printer import format_graph

_BOX_W, _BOX_H, _GAP_X, _GAP_Y = 190, 38, 24, 34


class Dumper:
    """Writes stage files into `directory` with a running two-digit stage number."""

    def __init__(self, directory: str | os.PathLike):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.count = 0
        self.written: list[Path] = []

    def text(self, stage: str, text: str, ext: str = "txt") -> Path:
        path = self.dir / f"{self.count:02d}-{stage}.{ext}"
        path.write_text(text if text.endswith("\n") else text + "\n")
        self.written.append(path)
        self.count += 1
        return path

    def graph(self, stage: str, g: Graph) -> Path:
        path = self.text(stage, format_graph(g))
        svg = path.with_suffix(".svg")
        svg.write_text(graph_svg(g))
        self.written.append(svg)
        return path


def graph_svg(g: Graph) -> str:
    """A top-to-bottom picture of the graph: a box per node (op and shape), arrows for uses."""
    dg = nx.DiGraph()
    for n in g.gm.graph.nodes:
        dg.add_node(n.name, label=_label(n), kind=n.op)
        for inp in n.all_input_nodes:
            dg.add_edge(inp.name, n.name)
    pos = {}
    for depth, layer in enumerate(nx.topological_generations(dg)):
        for i, name in enumerate(sorted(layer, key=list(dg.nodes).index)):
            pos[name] = (i * (_BOX_W + _GAP_X) + _GAP_X, depth * (_BOX_H + _GAP_Y) + _GAP_Y)
    width = max(x for x, _ in pos.values()) + _BOX_W + _GAP_X
    height = max(y for _, y in pos.values()) + _BOX_H + _GAP_Y
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'font-family="monospace" font-size="11">',
             '<defs><marker id="a" markerWidth="8" markerHeight="8" refX="8" refY="4" '
             'orient="auto"><path d="M0,0 L8,4 L0,8 z" fill="#666"/></marker></defs>',
             f"<title>{html.escape(g.name)}</title>"]
    for src, dst in dg.edges:
        (x1, y1), (x2, y2) = pos[src], pos[dst]
        parts.append(f'<line x1="{x1 + _BOX_W // 2}" y1="{y1 + _BOX_H}" x2="{x2 + _BOX_W // 2}"'
                     f' y2="{y2}" stroke="#666" marker-end="url(#a)"/>')
    for name, data in dg.nodes(data=True):
        x, y = pos[name]
        fill = _FILL.get(data["kind"], "#eef")
        parts.append(f'<rect x="{x}" y="{y}" width="{_BOX_W}" height="{_BOX_H}" rx="5" '
                     f'fill="{fill}" stroke="#333"/>')
        for j, line in enumerate(data["label"]):
            parts.append(f'<text x="{x + 6}" y="{y + 15 + 13 * j}">{html.escape(line)}</text>')
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


_FILL = {"placeholder": "#dfd", "get_attr": "#eee", "output": "#fdd", "call_function": "#eef"}


def _label(n: fx.Node) -> list[str]:
    head = {"placeholder": f"input {n.name}", "get_attr": f"param {n.target}",
            "output": "output"}.get(n.op) or op_name(n)
    return [head[:28], spec_text(n)[:28] if n.op != "output" else ""]
