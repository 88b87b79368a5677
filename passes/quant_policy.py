"""Quantization policy: which layers get which scheme. Plain data, no graph rewriting.

    policy = QuantPolicy(weight=QuantScheme(bits=4, symmetric=True, per_channel=True),
                         exclude=("fc3*",))
    plan(graph, policy)   # -> [(Layer, LayerScheme)] for every selected layer, validated

A layer is one node whose op is in QUANT_OPS. Its class is the op's ("conv", "linear",
"embedding": weight-only, its input is indices), or "matmul" when the op multiplies two
computed tensors (attention's q @ k). Patterns
(fnmatch) match the node name ("addmm_2") or the weight's attribute name ("fc3_weight").
The mechanism that inserts fake-quant ops is passes/quantize.py.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import fx

from graphc.errors import PassError
from graphc.ir import Graph, op_name
from graphc.observers import Grid
from graphc.ops_quant import FAKE_QUANT_OPS

aten = torch.ops.aten
WEIGHT_BITS, ACTIVATION_BITS = (4, 8), (8,)
OP_CLASSES = ("linear", "conv", "matmul", "embedding")


@dataclass(frozen=True)
class QuantScheme:
    """One tensor's integer format: bits, symmetric (signed, zero point 0) or not, per channel."""

    bits: int = 8
    symmetric: bool = True
    per_channel: bool = False

    @property
    def grid(self) -> Grid:
        if self.symmetric:  # restricted range -127..127: negation stays on the grid
            return Grid(-(2 ** (self.bits - 1) - 1), 2 ** (self.bits - 1) - 1)
        return Grid(0, 2 ** self.bits - 1)

    def __str__(self) -> str:
        sign = "int" if self.symmetric else "uint"
        return (f"{sign}{self.bits} {'sym' if self.symmetric else 'asym'} "
                f"{'per-ch' if self.per_channel else 'per-t'}")


@dataclass(frozen=True)
class LayerScheme:
    """What one layer gets: weight and input formats (None: stays float)."""

    weight: QuantScheme | None
    activation: QuantScheme | None
    dynamic: bool = False  # input ranges measured at run time instead of calibrated


FLOAT = LayerScheme(None, None)


@dataclass(frozen=True)
class QuantPolicy:
    """Defaults: weights int8 symmetric per channel, inputs uint8 asymmetric per tensor."""

    weight: QuantScheme | None = QuantScheme(8, symmetric=True, per_channel=True)
    activation: QuantScheme | None = QuantScheme(8, symmetric=False, per_channel=False)
    dynamic: bool = False
    ops: tuple[str, ...] = OP_CLASSES
    include: tuple[str, ...] = ()  # empty: every layer of the selected classes
    exclude: tuple[str, ...] = ()
    overrides: tuple[tuple[str, LayerScheme], ...] = ()  # (pattern, scheme); first match wins

    def scheme_for(self, layer: Layer) -> LayerScheme | None:
        """The layer's scheme, or None when the policy leaves it alone."""
        for pattern, scheme in self.overrides:
            if layer.matches(pattern):
                return scheme
        if layer.kind not in self.ops or any(layer.matches(p) for p in self.exclude):
            return None
        if self.include and not any(layer.matches(p) for p in self.include):
            return None
        return LayerScheme(self.weight, self.activation, self.dynamic)


@dataclass(frozen=True)
class OpInfo:
    """Per-op knowledge: which args are multiplied, which may be a constant weight, and the
    output-channel axis of that weight as the op consumes it (None: there is none; a
    function of the node when the op's arguments decide it)."""

    kind: str
    operands: tuple[int, ...]
    weight_arg: int | None
    channel_axis: int | Callable[[fx.Node], int | None] | None

    def axis(self, node: fx.Node) -> int | None:
        return self.channel_axis(node) if callable(self.channel_axis) else self.channel_axis


def _conv_axis(node: fx.Node) -> int | None:
    """convolution(x, w, b, stride, pad, dilation, transposed, out_pad, groups): w is
    [out, in/g, *k], or [in, out/g, *k] when transposed, where grouped output channels
    span two axes and no single axis holds them."""
    transposed, groups = node.args[6], node.args[8]
    return 0 if not transposed else 1 if groups == 1 else None


QUANT_OPS = {
    aten.convolution.default: OpInfo("conv", (0, 1), 1, _conv_axis),
    aten.addmm.default: OpInfo("linear", (1, 2), 2, 1),           # permute(w): [in, out]
    aten.mm.default: OpInfo("linear", (0, 1), 1, 1),              # [in, out]
    aten.linear.default: OpInfo("linear", (0, 1), 1, 0),          # w: [out, in]
    aten.bmm.default: OpInfo("matmul", (0, 1), None, None),       # no channel axis
    aten.embedding.default: OpInfo("embedding", (0,), 0, 0),      # w: [vocab, dim]; per row
}


@dataclass(frozen=True)
class Layer:
    node: str
    op: str
    kind: str
    weight: str | None  # attribute name of the constant weight operand's source
    weight_arg: int | None
    channel_axis: int | None
    act_args: tuple[int, ...]

    def matches(self, pattern: str) -> bool:
        names = (self.node,) if self.weight is None else (self.node, self.weight)
        return any(fnmatch.fnmatchcase(n, pattern) for n in names)


def find_layers(g: Graph) -> list[Layer]:
    """Every node the quantizer knows, in graph order, with its class and operands. Layers
    with a fake-quantized operand are already quantized and are left out."""
    computed = _input_dependent(g)
    layers = []
    for n in g.gm.graph.nodes:
        info = QUANT_OPS.get(n.target) if n.op == "call_function" else None
        if info is None or any(a.target in FAKE_QUANT_OPS for a in n.all_input_nodes):
            continue
        const = [i for i in info.operands
                 if isinstance(n.args[i], fx.Node) and n.args[i] not in computed]
        w = const[-1] if const else None  # the weight operand (the op's rhs when both are)
        weight = None if w is None else _source_attr(n.args[w]) or n.args[w].name
        layers.append(Layer(n.name, op_name(n), info.kind if w is not None else "matmul",
                            weight, w, info.axis(n) if w == info.weight_arg else None,
                            tuple(i for i in info.operands if n.args[i] in computed)))
    return layers


def plan(g: Graph, policy: QuantPolicy) -> list[tuple[Layer, LayerScheme]]:
    """The selected layers and their schemes; bad combinations raise PassError."""
    check_policy(policy)
    out = []
    for layer in find_layers(g):
        scheme = policy.scheme_for(layer)
        if scheme is None or scheme == FLOAT:
            continue
        if scheme.weight and scheme.weight.per_channel and layer.weight is not None \
                and layer.channel_axis is None:
            raise PassError(
                f"pass 'quantize': per_channel=True, but %{layer.node} ({layer.op}) has no "
                f"single output-channel axis in its weight operand; use per_channel=False or "
                f"exclude=['{layer.node}']")
        out.append((layer, scheme))
    return out


def check_policy(policy: QuantPolicy) -> None:
    """Raise PassError naming the option when the policy asks for something unsupported."""
    schemes = [("", LayerScheme(policy.weight, policy.activation))]
    schemes += [(f" (override '{p}')", s) for p, s in policy.overrides]
    for where, s in schemes:
        if s.weight and s.weight.bits not in WEIGHT_BITS:
            raise PassError(f"pass 'quantize': bits={s.weight.bits}{where} is not supported "
                            f"for weights; choose one of {list(WEIGHT_BITS)}")
        if s.activation and s.activation.bits not in ACTIVATION_BITS:
            raise PassError(f"pass 'quantize': act_bits={s.activation.bits}{where} is not "
                            f"supported for activations; choose one of {list(ACTIVATION_BITS)}")
        if s.activation and s.activation.per_channel:
            raise PassError(f"pass 'quantize': activations{where} are quantized per tensor; "
                            "per-channel ranges apply to weights only")
    unknown = [k for k in policy.ops if k not in OP_CLASSES]
    if unknown:
        raise PassError(f"pass 'quantize': ops={list(policy.ops)} names unknown op classes "
                        f"{unknown}; choose from {list(OP_CLASSES)}")


def _input_dependent(g: Graph) -> set[fx.Node]:
    """Nodes whose value depends on a user input (the rest are constants)."""
    out = set()
    for n in g.gm.graph.nodes:
        if n.op == "placeholder" or any(a in out for a in n.all_input_nodes):
            out.add(n)
    return out


def _source_attr(node: fx.Node) -> str | None:
    """The get_attr a constant operand is computed from (through permutes, views, ...)."""
    while node.op != "get_attr":
        inputs = node.all_input_nodes
        if len(inputs) != 1:
            return None
        node = inputs[0]
    return str(node.target)
