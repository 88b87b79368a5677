"""IR dumps: one numbered, deterministic file per stage, and an SVG picture of each graph.

    ir/00-input.txt  ir/00-input.svg  ir/01-fold-batchnorm.txt ...  ir/03-relax.py  ir/05-tir.py
"""

from __future__ import annotations

import html
import os
from pathlib import Path

import networkx as nx
from torch import fx

from graphc.ir import Graph, op_name, spec_text
from graphc.printer import format_graph

_BOX_W, _GAP_X, _GAP_Y, _CHARS = 330, 24, 30, 48


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
    """A top-to-bottom picture: a box per op (op, shape, and the weights it reads), arrows
    for data flow. Weights are listed inside their consumers so the compute graph stays
    narrow enough to read."""
    dg = nx.DiGraph()
    for n in g.gm.graph.nodes:
        if n.op == "get_attr":
            continue
        weights = [f"  {w.target}: {spec_text(w)}" for w in n.all_input_nodes if w.op == "get_attr"]
        dg.add_node(n.name, label=_label(n) + weights, kind=n.op)
        for inp in n.all_input_nodes:
            if inp.op != "get_attr":
                dg.add_edge(inp.name, n.name)
    pos, y = {}, _GAP_Y
    for layer in nx.topological_generations(dg):
        layer = sorted(layer, key=list(dg.nodes).index)
        for i, name in enumerate(layer):
            pos[name] = (i * (_BOX_W + _GAP_X) + _GAP_X, y)
        y += max(_height(dg.nodes[n]["label"]) for n in layer) + _GAP_Y
    width = max(x for x, _ in pos.values()) + _BOX_W + _GAP_X
    svg = (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{y}" '
           f'font-family="monospace" font-size="11">')
    parts = [svg, _ARROW,
             f"<title>{html.escape(g.name)}</title>"]
    for src, dst in dg.edges:
        (x1, y1), (x2, y2) = pos[src], pos[dst]
        y1 += _height(dg.nodes[src]["label"])
        parts.append(f'<line x1="{x1 + _BOX_W // 2}" y1="{y1}" x2="{x2 + _BOX_W // 2}"'
                     f' y2="{y2}" stroke="#666" marker-end="url(#a)"/>')
    for name, data in dg.nodes(data=True):
        x, top = pos[name]
        fill = _FILL.get(data["kind"], "#eef")
        parts.append(f'<rect x="{x}" y="{top}" width="{_BOX_W}" '
                     f'height="{_height(data["label"])}" rx="5" fill="{fill}" stroke="#333"/>')
        for j, line in enumerate(data["label"]):
            parts.append(f'<text x="{x + 6}" y="{top + 15 + 13 * j}">'
                         f'{html.escape(line[:_CHARS])}</text>')
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


def _height(label: list[str]) -> int:
    return 10 + 13 * len(label)


_ARROW = ('<defs><marker id="a" markerWidth="8" markerHeight="8" refX="8" refY="4" '
          'orient="auto"><path d="M0,0 L8,4 L0,8 z" fill="#666"/></marker></defs>')
_FILL = {"placeholder": "#dfd", "get_attr": "#eee", "output": "#fdd", "call_function": "#eef"}


def _label(n: fx.Node) -> list[str]:
    head = {"placeholder": f"input {n.name}", "output": "output"}.get(n.op) or op_name(n)
    return [head, spec_text(n)] if n.op != "output" else [head]
