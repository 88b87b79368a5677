"""ONNX frontend: an ONNX model becomes an nn.Module that evaluates its graph with torch ops.

The rest of graphc traces that module with torch.export, so ONNX is never a second IR.
Loading plans the graph once, for the static input shapes:

- every value is either *static* (a numpy array known at load time: Constants,
  non-float initializers, Shape outputs and whatever is computed from those) or
  *dynamic* (a tensor that depends on the model's inputs or weights);
- a node whose inputs are all static runs eagerly at load time, so shape
  arithmetic (Shape -> Gather -> Concat -> Reshape) reaches torch as python ints
  and never as traced tensors, which torch.export could not turn into shapes;
- the other nodes run on meta tensors to learn shapes; they form the forward plan.

Tensors the forward needs are registered on the module: float initializers as
nn.Parameters (so the graph can be fine-tuned), other values as buffers.
Initializers that only feed shape arithmetic are folded away and not registered.
"""

from __future__ import annotations

import os
import re

import numpy as np
import onnx
import onnx.inliner
import torch
from onnx import numpy_helper

from graphc.errors import FrontendError, GraphcError, UnsupportedOpError
from graphc.frontends.onnx_control import CONTROL_FLOW
from graphc.frontends.onnx_ops import (
    Node,
    OpDef,
    decode_attrs,
    op_table,
    to_numpy,
    to_torch,
    torch_dtype,
)
from graphc.frontends.onnx_qdq import rewrite_qdq
from graphc.spec import TensorSpec, check_inputs

MIN_OPSET = 13
_DEFAULT_DOMAINS = ("", "ai.onnx")


def load_onnx(
    model: str | os.PathLike | bytes | onnx.ModelProto,
    input_shapes: dict[str, tuple[int, ...]] | None = None,
) -> OnnxModule:
    """Turn an ONNX model (path, bytes or ModelProto) into a traceable OnnxModule.

    ``input_shapes`` fixes the shape of inputs with dynamic dims (graphc compiles
    for static shapes), e.g. ``{"input_ids": (1, 128)}``.
    """
    proto = _parse(model)
    # the checker reads a path itself: that handles external data and models over 2 GB
    opset = _check(proto, model if isinstance(model, (str, os.PathLike)) else proto)
    if proto.functions:  # model-local functions: inline them, the op table has ONNX ops only
        proto = onnx.inliner.inline_local_functions(proto)
    return OnnxModule(proto, opset, input_shapes or {})


def _parse(model) -> onnx.ModelProto:
    if isinstance(model, onnx.ModelProto):
        proto, what = model, "the given ModelProto"
    else:
        what = "the given bytes" if isinstance(model, bytes) else f"'{os.fspath(model)}'"
        try:
            proto = onnx.load_from_string(model) if isinstance(model, bytes) else onnx.load(model)
        except OSError as e:
            raise FrontendError(f"could not read {what}: {e}") from e
        except Exception as e:  # protobuf raises DecodeError and friends on garbage
            raise FrontendError(f"could not parse {what} as an ONNX model: {e}") from e
    if not proto.HasField("graph") or not proto.opset_import:
        # protobuf happily decodes many byte strings into an empty message
        raise FrontendError(f"could not parse {what} as an ONNX model: it has no graph or opset")
    return proto


def _check(proto: onnx.ModelProto, checkable) -> int:
    """The model's default-domain opset, after rejecting old opsets and invalid models."""
    opset = next((o.version for o in proto.opset_import if o.domain in _DEFAULT_DOMAINS), None)
    if opset is None or opset < MIN_OPSET:
        raise FrontendError(
            f"ONNX model has opset {opset}; graphc's ONNX frontend supports opsets "
            f"{MIN_OPSET}+: convert it first with "
            f"onnx.version_converter.convert_version(model, {MIN_OPSET})"
        )
    _check_dataflow(proto.graph)  # before the checker: its messages do not name the node
    try:
        onnx.checker.check_model(checkable)
    except Exception as e:
        raise FrontendError(f"invalid ONNX model (onnx.checker): {e}") from e
    return opset


def _check_dataflow(graph: onnx.GraphProto) -> None:
    """Every node input is defined (a graph input, an initializer, a node output) and no
    nodes form a cycle; else a FrontendError naming the node, the op and the value."""
    defined = {v.name for v in graph.input} | {t.name for t in graph.initializer}
    defined |= {t.values.name for t in graph.sparse_initializer}
    producer = {out: node for node in graph.node for out in node.output if out}
    for node in graph.node:
        for name in node.input:
            if not name or name in defined:
                continue
            if name not in producer:
                raise FrontendError(
                    f"invalid ONNX model: {node.op_type} node '{node.name}' reads '{name}', "
                    "which is no graph input, initializer or node output (a missing "
                    "initializer?)")
            cycle = _cycle_through(node, producer)
            if cycle:
                raise FrontendError("invalid ONNX model: nodes form a cycle: " + " -> ".join(
                    f"{n.op_type} '{n.name}'" for n in cycle + cycle[:1]))
        defined.update(node.output)


def _cycle_through(start: onnx.NodeProto, producer: dict) -> list[onnx.NodeProto]:
    """The nodes of a cycle back to `start` along node inputs, or [] (depth-first)."""
    stack, seen = [(start, [start])], set()
    while stack:
        node, path = stack.pop()
        for name in node.input:
            prev = producer.get(name)
            if prev is start:
                return path[::-1]
            if prev is not None and id(prev) not in seen:
                seen.add(id(prev))
                stack.append((prev, path + [prev]))
    return []


def _input_shape(vi: onnx.ValueInfoProto, given: dict) -> tuple[int, ...]:
    t = vi.type.tensor_type
    declared = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
    if vi.name in given:
        shape = tuple(int(d) for d in given[vi.name])
        fixed_ok = all(d is None or d == s for d, s in zip(declared, shape))
        if (t.HasField("shape") and len(shape) != len(declared)) or not fixed_ok:
            raise FrontendError(f"input_shapes['{vi.name}'] = {shape} does not fit the model's "
                                f"declared shape {['?' if d is None else d for d in declared]}")
        return shape
    if not t.HasField("shape") or None in declared:
        dims = [d.dim_value if d.HasField("dim_value") else d.dim_param or "?"
                for d in t.shape.dim] if t.HasField("shape") else "unknown"
        raise FrontendError(
            f"input '{vi.name}' has dynamic shape {dims}; graphc compiles for static shapes: "
            f"pass input_shapes={{'{vi.name}': (...)}} to graphc.trace/compile "
            f"(CLI: --input-shape {vi.name}=D0,D1,...)"
        )
    return tuple(declared)


def _attr_name(name: str, taken: set[str]) -> str:
    """A unique python identifier for an ONNX value name (module attributes need one)."""
    base = re.sub(r"\W", "_", name) or "value"
    base = base if base[0].isalpha() else f"v_{base}"
    out, i = base, 1
    while out in taken:
        out, i = f"{base}_{i}", i + 1
    taken.add(out)
    return out


def _is_float(arr: np.ndarray) -> bool:
    return arr.dtype.kind == "f" or arr.dtype.name == "bfloat16"


def _call(node: Node, opdef: OpDef, args: list) -> list:
    """Run an op's impl; its outputs as a list, refusing outputs the impl does not produce."""
    out = opdef.impl(node, *args)
    outs = list(out) if isinstance(out, (tuple, list)) else [out]
    for i, name in enumerate(node.outputs[len(outs):], len(outs)):
        if name:
            raise node.unsupported(f"output #{i}", name)
    return outs


def _guard(node: Node, fn):
    """Run fn; a torch or numpy failure becomes a FrontendError naming the node."""
    try:
        return fn()
    except GraphcError:
        raise
    except Exception as e:
        raise FrontendError(f"{node} failed at load time: {type(e).__name__}: {e}") from e


def _fold(node: Node, opdef: OpDef, vals: list) -> list:
    """Run a node whose inputs are all static eagerly; its outputs stay static (numpy)."""
    args = [v if v is None or i in opdef.static else to_torch(v) for i, v in enumerate(vals)]
    return [o if isinstance(o, np.ndarray) else to_numpy(o) for o in _call(node, opdef, args)]


def _bind(node: Node, opdef: OpDef, vals: list) -> dict:
    """The arguments of a traced node fixed at load time: static inputs, python scalars."""
    bound = {}
    for i in opdef.static:
        v = vals[i] if i < len(vals) else None
        if isinstance(v, torch.Tensor):
            raise FrontendError(
                f"{node}: input #{i} ('{node.inputs[i]}') must be known at load time "
                "(graphc compiles for static shapes), but it is computed from the model's "
                "inputs or weights"
            )
        if v is not None:
            bound[i] = v
    # a one-element value of no higher rank than the tensors cannot change the result's shape
    rank = max(v.ndim for v in vals if isinstance(v, torch.Tensor))
    for i in opdef.scalars:
        v = vals[i] if i < len(vals) else None
        if isinstance(v, np.ndarray) and v.size == 1 and v.ndim <= rank:
            bound[i] = v.item()
    return bound


class OnnxModule(torch.nn.Module):
    """An ONNX graph as a module: ``forward(*inputs)`` returns the graph's outputs as a tuple."""

    def __init__(self, proto: onnx.ModelProto, opset: int, input_shapes: dict):
        super().__init__()
        graph = proto.graph
        self.opset, self.graph_name = opset, graph.name
        inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
        user = [vi for vi in graph.input if vi.name not in inits]
        unknown = sorted(set(input_shapes) - {vi.name for vi in user})
        if unknown:
            raise FrontendError(f"input_shapes names {unknown}, which are not inputs of the "
                                f"model; its inputs are {[vi.name for vi in user]}")
        self.input_specs = [
            TensorSpec(vi.name, _input_shape(vi, input_shapes),
                       torch_dtype(vi.type.tensor_type.elem_type, f"input '{vi.name}'"))
            for vi in user
        ]
        self.input_names = [s.name for s in self.input_specs]
        self.output_names = [vi.name for vi in graph.output]
        nodes = [
            Node(i, p.name, p.op_type, p.domain, list(p.input), list(p.output), decode_attrs(p),
                 opset)
            for i, p in enumerate(graph.node)
        ]
        nodes, inits = rewrite_qdq(nodes, inits, self.output_names)  # quantized models
        env = self._initial_env(inits)
        self._plan: list[Node] = []
        for node in nodes:
            self._plan_any(node, env, inits)
        self._attr = self._register(inits, env)

    def _initial_env(self, inits: dict) -> dict:
        """Inputs and float weights as meta tensors; other initializers static."""
        env = {s.name: torch.empty(s.shape, dtype=s.dtype, device="meta") for s in self.input_specs}
        for name, arr in inits.items():
            # one-element floats stay static too: exporters compute sizes with them
            static = not _is_float(arr) or arr.size == 1
            dtype = to_torch(arr.reshape(-1)[:0]).dtype  # without copying a large weight
            env[name] = arr if static else torch.empty(arr.shape, dtype=dtype, device="meta")
        return env

    def _plan_any(self, node: Node, env: dict, inits: dict) -> None:
        """Plan a node, or the nodes a control-flow node expands to (onnx_control.py): each
        is planned before the expansion yields the next, so it can read their values."""
        expand = CONTROL_FLOW.get(node.op)
        if expand is None:
            if self._plan_node(node, env, inits):
                self._plan.append(node)
            return
        for sub in expand(node, env):
            self._plan_any(sub, env, inits)

    def _plan_node(self, node: Node, env: dict, inits: dict) -> bool:
        """Evaluate a node at load time (folded, or on meta tensors); True if forward runs it."""
        opdef = op_table().get(node.op)
        if opdef is None:
            raise UnsupportedOpError(f"unsupported ONNX op: {node} has no rule in graphc's ONNX "
                                     "frontend (graphc/frontends/onnx_ops*.py)")
        missing = [n for n in node.inputs if n and n not in env]
        if missing:
            raise FrontendError(f"{node}: input '{missing[0]}' is not produced by any node")
        vals = [env[n] if n else None for n in node.inputs]
        for i in opdef.static:  # a float weight used as, e.g., Resize scales is a constant there
            if i < len(vals) and node.inputs[i] in inits:
                vals[i] = inits[node.inputs[i]]
        node.consts = {i: v for i, v in enumerate(vals) if isinstance(v, np.ndarray)}
        if all(v is None or isinstance(v, np.ndarray) for v in vals):
            outs = _guard(node, lambda: _fold(node, opdef, vals))
        elif opdef.fold_only:
            raise FrontendError(f"{node}: its output shape depends on tensor values, which "
                                "graphc supports only for values known at load time")
        else:
            node.bound = _bind(node, opdef, vals)
            args = [node.bound[i] if i in node.bound else
                    v if not isinstance(v, np.ndarray) else to_torch(v).to("meta")
                    for i, v in enumerate(vals)]
            outs = _guard(node, lambda: _call(node, opdef, args))
        env.update((n, v) for n, v in zip(node.outputs, outs) if n)
        traced = any(isinstance(v, torch.Tensor) for n, v in zip(node.outputs, outs) if n)
        if not traced:
            node.consts, node.bound = {}, {}  # folded: forward never looks at it again
        return traced

    def _register(self, inits: dict, env: dict) -> dict[str, str]:
        """Register the params/buffers forward reads; returns ONNX name -> attribute name."""
        produced = set(self.input_names)
        used, stats = [], set()
        for node in self._plan:
            used += [n for i, n in enumerate(node.inputs) if n and i not in node.bound]
            stats.update(node.inputs[i] for i in op_table()[node.op].stats
                         if i < len(node.inputs))
            produced.update(n for n in node.outputs if isinstance(env.get(n), torch.Tensor))
        taken, attrs = set(dir(self)), {}
        for name in dict.fromkeys(used + self.output_names):
            if name in produced:
                continue
            attrs[name] = attr = _attr_name(name, taken)
            value = to_torch(inits[name] if name in inits else env[name])
            if name in inits and value.is_floating_point() and name not in stats:
                self.register_parameter(attr, torch.nn.Parameter(value))
            else:
                self.register_buffer(attr, value)
        return attrs

    def _tensor(self, name: str, env: dict) -> torch.Tensor:
        v = env.get(name)
        return v if isinstance(v, torch.Tensor) else getattr(self, self._attr[name])

    def example_inputs(self, seed: int = 0) -> tuple[torch.Tensor, ...]:
        return tuple(spec.example(seed + i) for i, spec in enumerate(self.input_specs))

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        check_inputs(self.input_specs, inputs, f"ONNX model '{self.graph_name}'")
        env = dict(zip(self.input_names, inputs))
        table = op_table()
        for node in self._plan:
            args = [node.bound[i] if i in node.bound else self._tensor(n, env) if n else None
                    for i, n in enumerate(node.inputs)]
            env.update(zip(node.outputs, _call(node, table[node.op], args)))
        return tuple(self._tensor(n, env) for n in self.output_names)

    def extra_repr(self) -> str:
        return (f"'{self.graph_name}', opset {self.opset}, {len(self._plan)} traced nodes, "
                f"inputs: {', '.join(map(str, self.input_specs))}")
