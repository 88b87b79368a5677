"""quantize: selected conv/linear/matmul/embedding layers -> fake-quantized weights, inputs.

    %y = aten.addmm(%b, %x, %wt)
      ->  %xq = graphc.fake_quant_per_tensor(%x, %x_act_scale, %x_act_zp, 0, 255)
          %wq = graphc.fake_quant_per_channel(%wt, %fc_weight_scale, %fc_weight_zp, 1, -127, 127)
          %y  = aten.addmm(%b, %xq, %wq)

The policy (passes/quant_policy.py) picks the layers and schemes; this module inserts the
ops. Weight ranges come from the weights (observer `weight_observer`, per channel along
the op's output-channel axis); static input ranges from calibration (graphc.calibrate),
dynamic ones are measured at run time. An input shared by several layers is quantized
once. Scales are trainable parameters (QAT), zero points int32 buffers; both are get_attr
constants that fold-fake-quant can read. Biases stay float: integer kernels quantize them
with scale_x * scale_w. The result runs and trains in PyTorch; the weights are still
float32 in memory until a fold pass stores them as integers.

Calibration data: `calibration=` (Python API: a list of input tuples), else a list in
graph.meta["calibration"] (set it on a traced Graph to use pipeline strings with real
data), else the graph's example inputs.
"""

from __future__ import annotations

import logging
from typing import Literal

import torch
from torch import fx

from graphc.calibrate import as_batches, observe, set_qparams, static_activation_nodes
from graphc.errors import PassError
from graphc.ir import Graph
from graphc.observers import OBSERVERS, Observer, qparams
from graphc.ops_quant import FAKE_QUANT_OPS
from graphc.pass_manager import register_pass
from graphc.passes.quant_mixed import choose_precision
from graphc.passes.quant_policy import (
    OP_CLASSES,
    Layer,
    LayerScheme,
    QuantPolicy,
    QuantScheme,
    plan,
)
from graphc.passes.quant_report import quant_report
from graphc.rewrite import add_weight, const_value, is_constant
from graphc.verify import propagate

log = logging.getLogger("graphc")
FQ = torch.ops.graphc
Planned = list[tuple[Layer, LayerScheme]]
WEIGHT_OBSERVERS = ("minmax", "mse")  # the observers with per-channel ranges


@register_pass("quantize")
def quantize(graph: Graph, *, bits: int = 8, per_channel: bool = True, symmetric: bool = True,
             activations: Literal["static", "dynamic", "none"] = "static", act_bits: int = 8,
             act_symmetric: bool = False, observer: str = "minmax",
             weight_observer: str = "minmax", ops: tuple[str, ...] = OP_CLASSES,
             include: tuple[str, ...] = (), exclude: tuple[str, ...] = (),
             max_error: float = 0.0, policy: QuantPolicy | None = None,
             calibration: list | None = None) -> Graph:
    """float conv/linear/matmul/embedding -> fake-quant on weights and inputs (graphc:: ops).

    bits / per_channel / symmetric: weight format. activations: static (calibrated),
    dynamic (range at run time) or none (weight-only). act_bits / act_symmetric: input
    format. observer: activation observer; weight_observer: minmax or mse. ops / include /
    exclude: layer classes and fnmatch patterns on node or weight names. max_error > 0:
    keep the most sensitive layers at higher precision until the output's relative RMS
    error on the calibration data is within it. policy: a QuantPolicy replacing the
    scheme options (Python API). calibration: input batches (Python API).
    """
    _check_options(activations, observer, weight_observer, max_error)
    policy = policy or QuantPolicy(
        weight=QuantScheme(bits, symmetric, per_channel),
        activation=None if activations == "none" else QuantScheme(act_bits, act_symmetric),
        dynamic=activations == "dynamic", ops=tuple(ops), include=tuple(include),
        exclude=tuple(exclude))
    layers = plan(graph, policy)
    if not layers:
        log.info("quantize: the policy selects no layer in '%s'", graph.name)
        return graph
    batches = as_batches(graph, calibration if calibration is not None
                         else graph.meta.get("calibration"))
    weight_qparams: dict = {}  # the search rebuilds often: weight ranges are computed once
    full = insert_fake_quant(graph, layers, weight_observer=weight_observer,
                             weight_qparams=weight_qparams)
    act_obs = observe(full, batches, static_activation_nodes(full), observer)

    def build(chosen: Planned) -> Graph:
        return insert_fake_quant(graph, chosen, weight_observer=weight_observer,
                                 act_observers=act_obs, weight_qparams=weight_qparams)

    frozen: dict = {}  # the search evaluates ~one graph per layer: quantize weights once
    chosen, search = choose_precision(graph, layers, lambda c: freeze_weights(build(c), frozen),
                                      batches, max_error)
    out = propagate(build(chosen))
    out.meta["quantize"] = quant_report(graph, out, chosen, search, batches)
    return out


def _check_options(activations: str, observer: str, weight_observer: str,
                   max_error: float) -> None:
    """Options the pipeline parser cannot check by type (Python callers skip it anyway)."""
    choices = {"activations": (activations, ("static", "dynamic", "none")),
               "observer": (observer, tuple(sorted(OBSERVERS))),
               "weight_observer": (weight_observer, WEIGHT_OBSERVERS)}
    for name, (value, allowed) in choices.items():
        if value not in allowed:
            raise PassError(f"pass 'quantize': {name}={value!r} is not supported; choose "
                            f"from {list(allowed)}")
    if max_error < 0:
        raise PassError(f"pass 'quantize': max_error={max_error} must be >= 0 (0: no budget)")


def insert_fake_quant(graph: Graph, layers: Planned, *, weight_observer: str = "minmax",
                      act_observers: dict[str, Observer] | None = None,
                      weight_qparams: dict | None = None) -> Graph:
    """A copy of graph with fake-quant ops on the planned layers' operands. Static inputs
    take their range from act_observers (keyed by the input's node name) when given;
    weight_qparams caches weight scales across calls."""
    g, cache = graph.copy(), {} if weight_qparams is None else weight_qparams
    nodes = {n.name: n for n in g.gm.graph.nodes}
    shared: dict[tuple, fx.Node] = {}
    for layer, scheme in layers:
        node = nodes[layer.node]
        args = list(node.args)
        with g.gm.graph.inserting_before(node):
            if scheme.weight and layer.weight is not None:
                args[layer.weight_arg] = _weight_fq(g, args[layer.weight_arg], layer,
                                                    scheme.weight, weight_observer, cache)
            for i in layer.act_args if scheme.activation else ():
                key = (args[i].name, scheme.activation, scheme.dynamic)
                if key not in shared:
                    shared[key] = _act_fq(g, args[i], scheme, act_observers)
                args[i] = shared[key]
        node.args = tuple(args)
    g.gm.recompile()
    return g


def _weight_fq(g: Graph, operand: fx.Node, layer: Layer, scheme: QuantScheme,
               observer: str, cache: dict) -> fx.Node:
    axis = layer.channel_axis if scheme.per_channel else None
    key = (layer.node, scheme, observer)
    if key not in cache:
        obs = OBSERVERS[observer](axis=axis)
        obs.update(const_value(g, operand))
        cache[key] = qparams(*obs.range(scheme.grid), scheme.grid)
    scale, zp = cache[key]
    base = layer.weight or f"{layer.node}_weight"
    s = g.gm.graph.get_attr(add_weight(g, f"{base}_scale", scale.clone()))  # own storage:
    z = g.gm.graph.get_attr(add_weight(g, f"{base}_zp", zp.clone(), trainable=False))  # QAT
    grid, name = scheme.grid, f"{base}_q"
    if axis is None:
        return _call(g, FQ.fake_quant_per_tensor.default, (operand, s, z, grid.qmin, grid.qmax),
                     name)
    return _call(g, FQ.fake_quant_per_channel.default,
                 (operand, s, z, axis, grid.qmin, grid.qmax), name)


def _act_fq(g: Graph, x: fx.Node, scheme: LayerScheme, observers) -> fx.Node:
    grid = scheme.activation.grid
    graph = g.gm.graph
    with graph.inserting_after(x):  # right after the producer: shared by every user
        if scheme.dynamic:
            return _call(g, FQ.fake_quant_dynamic.default, (x, grid.qmin, grid.qmax), f"{x.name}_q")
        s = graph.get_attr(add_weight(g, f"{x.name}_act_scale", torch.tensor(1.0)))
    with graph.inserting_after(s):  # (inserting_after puts each new node right after x)
        z = graph.get_attr(add_weight(g, f"{x.name}_act_zp", torch.tensor(0, dtype=torch.int32),
                                      trainable=False))
    with graph.inserting_after(z):
        fq = _call(g, FQ.fake_quant_per_tensor.default, (x, s, z, grid.qmin, grid.qmax),
                   f"{x.name}_q")
    if observers is not None and x.name in observers:
        set_qparams(g, fq, observers[x.name])
    return fq


def freeze_weights(g: Graph, cache: dict) -> Graph:
    """g (modified) with each fake-quantized constant weight replaced by its value, computed
    once per weight and grid across calls sharing `cache`: same numbers, no per-call cost
    (MiniLM's 30522x384 embedding table was fake-quantized on every evaluation)."""
    graph = g.gm.graph
    for node in list(graph.nodes):
        if node.target not in FAKE_QUANT_OPS or not is_constant(node.args[0]):
            continue
        key = (node.name, node.args[-2:])
        if key not in cache:
            cache[key] = const_value(g, node).detach()
        with graph.inserting_before(node):
            attr = graph.get_attr(add_weight(g, f"{node.name}_frozen", cache[key], False))
        node.replace_all_uses_with(attr)
        graph.erase_node(node)
    graph.eliminate_dead_code()
    g.gm.recompile()
    return g


def _call(g: Graph, target, args: tuple, name: str) -> fx.Node:
    """A call node named after what it quantizes (%x_q, %fc1_weight_q), kept unique."""
    return g.gm.graph.create_node("call_function", target, args, name=name)

