"""Run a list of passes over a Graph, recording what each did and dumping IR if asked.

Per pass it records wall time, node count, parameter bytes, and the max abs / relative
error of the graph's outputs against the graph before the pass, on the example inputs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from graphc.dump import Dumper
from graphc.errors import PassError
from graphc.ir import Graph
from graphc.pass_manager import resolve, run_one
from graphc.printer import format_graph
from graphc.verify import propagate, verify


@dataclass
class PassRecord:
    step: str
    seconds: float
    nodes: int
    params: int
    param_bytes: int
    max_abs_err: float
    max_rel_err: float
    changed: bool

    def row(self) -> dict:
        return asdict(self)


def run_pipeline(g: Graph, passes, *, check: bool = False, dump: Dumper | None = None,
                 ) -> tuple[Graph, list[PassRecord]]:
    """Apply `passes` in order. check=True verifies the IR and that no pass mutates its input."""
    steps = resolve(passes)
    ref = g.run_example()
    records = [_record("input", g, 0.0, ref, ref, changed=False)]
    if check:
        verify(g, after="input")
    if dump:
        dump.graph("input", g)
    for info, kwargs in steps:
        label = info.name + (f"({', '.join(f'{k}={v!r}' for k, v in kwargs.items())})"
                             if kwargs else "")
        before = _fingerprint(g) if check else None
        out, seconds = run_one(info, g, kwargs)
        if check and _fingerprint(g) != before:
            raise PassError(f"pass '{info.name}' mutated its input graph; a pass must copy "
                            "(graph.copy()) and return the copy")
        if check:
            verify(out, after=info.name)
        elif out is not g:
            propagate(out)
        new = out.run_example()
        records.append(_record(label, out, seconds, new, ref, changed=out is not g))
        if dump:
            dump.graph(info.name, out)
        g, ref = out, new
    return g, records


def _record(step: str, g: Graph, seconds: float, outs, ref, changed: bool) -> PassRecord:
    st = g.stats()
    abs_err, rel_err = output_error(outs, ref)
    return PassRecord(step, seconds, st["nodes"], st["params"], st["param_bytes"],
                      abs_err, rel_err, changed)


def output_error(outs, ref) -> tuple[float, float]:
    """Max abs error over all outputs, and that divided by the reference's max magnitude."""
    abs_err, rel_err = 0.0, 0.0
    for a, b in zip(outs, ref):
        a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
        if a.numel() == 0:
            continue
        err = (a - b).abs().max().item()
        abs_err = max(abs_err, err)
        rel_err = max(rel_err, err / max(b.abs().max().item(), 1e-12))
    return abs_err, rel_err


def _fingerprint(g: Graph) -> tuple:
    weights = tuple((k, v.data_ptr(), v._version) for k, v in sorted(g.weights().items()))
    return format_graph(g), weights
