"""Calibration: run real data through a fake-quant graph and set its activation ranges.

    g = graphc.quantize(graph)                               # fake-quant ops inserted
    g = graphc.calibrate(g, batches, observer="entropy")     # re-calibrated on real data

Every static activation fake-quant (graphc.fake_quant_per_tensor on a computed tensor)
gets an observer on its input. While observing, every fake-quant op is bypassed, so the
ranges describe the float network and do not depend on the weight formats: the mixed
precision search can reuse them for every candidate. Weight ranges come from the weights
themselves when `quantize` inserts them; calibration leaves them alone.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable

import torch
from torch import fx

from graphc.errors import GraphcError
from graphc.ir import Graph
from graphc.observers import OBSERVERS, Grid, Observer, qparams
from graphc.ops_quant import FAKE_QUANT_OPS
from graphc.spec import check_inputs

PER_TENSOR = torch.ops.graphc.fake_quant_per_tensor.default
ObserverLike = str | Callable[[], Observer]


def calibrate(graph: Graph, batches: Iterable | None = None, *,
              observer: ObserverLike = "minmax", progress: bool | None = None) -> Graph:
    """Fake-quant graph + batches -> a copy whose activation scales and zero points fit them.

    batches: input tuples (or tensors, for one-input graphs) shaped like the example
    inputs; default: the example inputs. observer: a name in graphc.observers.OBSERVERS or
    a factory returning an Observer. progress: rich progress bar (default: on a terminal,
    for 10 batches or more).
    """
    g = graph.copy()
    targets = static_activation_nodes(g)
    if not targets:
        return graph
    batches = as_batches(g, batches)
    observers = observe(g, batches, targets, observer, progress)
    for node in targets:
        set_qparams(g, node, observers[node.args[0].name])
    g.gm.recompile()
    return g


def static_activation_nodes(g: Graph) -> list[fx.Node]:
    """Per-tensor fake-quant nodes whose input is computed from the user inputs."""
    computed, out = set(), []
    for n in g.gm.graph.nodes:
        if n.op == "placeholder" or any(a in computed for a in n.all_input_nodes):
            computed.add(n)
        if n.target is PER_TENSOR and n.args[0] in computed:
            out.append(n)
    return out


def observe(g: Graph, batches: list[tuple], targets: list[fx.Node], observer: ObserverLike,
            progress: bool | None = None) -> dict[str, Observer]:
    """One observer per distinct input of `targets`, fed every batch; keyed by input name."""
    make = _factory(observer)
    watched = {n.args[0].name: make() for n in targets}
    interp = _Bypass(g.gm, watched)
    show = progress if progress is not None else (sys.stderr.isatty() and len(batches) >= 10)
    from rich.progress import track

    with torch.no_grad():
        for batch in track(batches, description="calibrating", disable=not show,
                           transient=True):
            interp.run(*batch)
    return watched


def set_qparams(g: Graph, node: fx.Node, obs: Observer) -> None:
    """Point a fake-quant node's scale / zero point at fresh tensors from `obs`'s range."""
    grid = Grid(node.args[3], node.args[4])
    scale, zp = qparams(*obs.range(grid), grid)
    for arg, value in ((node.args[1], scale), (node.args[2], zp)):
        # the copy shares tensors with the graph it came from: replace, never edit in place
        if value.is_floating_point():
            g.gm.register_parameter(arg.target, torch.nn.Parameter(value.reshape(()).clone()))
        else:
            g.gm.register_buffer(arg.target, value.reshape(()).clone())


def as_batches(g: Graph, batches: Iterable | None) -> list[tuple]:
    """Normalize to a list of input tuples and check each against the graph's input specs."""
    if batches is None:
        return [tuple(g.example_inputs)]
    out = [tuple(b) if isinstance(b, (tuple, list)) else (b,) for b in batches]
    if not out:
        raise GraphcError(f"calibrate: no calibration batches were given for '{g.name}'")
    for i, b in enumerate(out):
        check_inputs(g.inputs, b, where=f"calibration batch {i} of '{g.name}'")
    return out


def _factory(observer: ObserverLike) -> Callable[[], Observer]:
    if callable(observer):
        return observer
    if observer not in OBSERVERS:
        raise GraphcError(f"calibrate: unknown observer '{observer}'; choose from "
                          f"{sorted(OBSERVERS)} or pass a factory returning an Observer")
    return OBSERVERS[observer]


class _Bypass(fx.Interpreter):
    """Runs the graph with every fake-quant op replaced by identity, observing the inputs
    of the watched ones."""

    def __init__(self, gm: fx.GraphModule, watched: dict[str, Observer]):
        super().__init__(gm)
        self.watched = watched

    def run_node(self, n: fx.Node):
        if n.op == "call_function" and n.target in FAKE_QUANT_OPS:
            x = self.env[n.args[0]]
            if n.target is PER_TENSOR and n.args[0].name in self.watched:
                self.watched[n.args[0].name].update(x)
            return x
        return super().run_node(n)
