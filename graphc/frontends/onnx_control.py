"""ONNX control flow (If, Loop, Scan) expanded into plain nodes while the loader plans.

graphc compiles one static dataflow graph, so a control-flow node is replaced by the nodes
of its body graphs, renamed apart, the way a compiler inlines and unrolls:

- If     with a condition known at load time: the taken branch's nodes. With a condition
         computed from the inputs: both branches, and Where(cond, then, else) per output,
         which is the same value because ONNX ops have no side effects; the two branches
         must then give outputs of one shape.
- Loop   unrolled: the trip count (M) must be known at load time, and so must the
         condition after every iteration when the loop has one. Scan outputs are stacked
         (Unsqueeze + Concat on axis 0).
- Scan   unrolled over the scan axis (static shapes give its length): input slices are
         Gather(x, t, axis), outputs stacked along their axis, in either direction.

An expansion is a generator of nodes: the loader plans each node it yields before asking
for the next, so a Loop reads its condition (static, from the env) after each iteration.
Body nodes read outer-scope values by name; `Scope` resolves a body's names to the names
the expansion gave them, and nested bodies chain to their parent's scope.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Generator

import numpy as np
import onnx
from onnx import numpy_helper

from graphc.errors import FrontendError, UnsupportedOpError
from graphc.frontends.onnx_ops import Node, decode_attrs

# Unrolling copies the body per iteration: past this many iterations of one node the
# graph would be huge, and the model is almost surely meant to loop at run time.
MAX_ITERATIONS = 4096

SCOPE_ATTR = "__scope__"  # on nodes made from a body: resolves the body's outer names
Expansion = Generator[Node, None, list[str]]
_ids = itertools.count()


class Scope:
    """Names inside one inlined body -> the names the expansion gave them; other names
    resolve in the enclosing scope (the top-level graph maps every name to itself)."""

    def __init__(self, parent: Callable[[str], str], prefix: str):
        self.parent, self.prefix, self.local = parent, prefix, {}

    def __call__(self, name: str) -> str:
        if not name:
            return name
        return self.local[name] if name in self.local else self.parent(name)

    def define(self, name: str) -> str:
        self.local[name] = fresh = f"{self.prefix}/{name}"
        return fresh


def _outer(node: Node) -> Callable[[str], str]:
    return node.attrs.get(SCOPE_ATTR, lambda name: name)


def _make(parent: Node, op: str, inputs: list[str], outputs: list[str], **attrs) -> Node:
    return Node(parent.index, f"{_label(parent)}/{op}", op, "", inputs, outputs, attrs,
                parent.opset)


def _label(node: Node) -> str:
    return node.name or f"{node.op_type}#{node.index}"


def _constant(parent: Node, value: np.ndarray, name: str) -> Node:
    return _make(parent, "Constant", [], [name], value=value)


def inline(parent: Node, graph: onnx.GraphProto, bindings: dict[str, str],
           tag: str) -> Expansion:
    """Yield `graph`'s nodes renamed apart; its inputs read the names in `bindings`.
    Returns the names its outputs got."""
    scope = Scope(_outer(parent), f"{_label(parent)}:{next(_ids)}/{tag}")
    scope.local.update(bindings)
    for init in graph.initializer:
        yield _constant(parent, numpy_helper.to_array(init), scope.define(init.name))
    for i, p in enumerate(graph.node):
        inputs = [scope(n) for n in p.input]  # before define: a node may shadow its input
        outputs = [scope.define(n) if n else n for n in p.output]
        attrs = decode_attrs(p)
        if any(isinstance(v, onnx.GraphProto) for v in attrs.values()):
            attrs[SCOPE_ATTR] = scope  # nested control flow reads this body's names
        yield Node(parent.index, f"{scope.prefix}/{p.name or p.op_type + str(i)}", p.op_type,
                   p.domain, inputs, outputs, attrs, parent.opset)
    return [scope(o.name) for o in graph.output]


def _static(node: Node, env: dict, name: str, what: str) -> np.ndarray:
    value = env[name]
    if not isinstance(value, np.ndarray):
        raise UnsupportedOpError(
            f"{node}: its {what} ('{name}') is computed from the model's inputs or weights; "
            "graphc unrolls control flow at load time, so it must be known then")
    return value


def _shape(env: dict, name: str) -> tuple[int, ...]:
    return tuple(env[name].shape)


def _stack(parent: Node, parts: list[str], axis: int, out: str) -> Expansion:
    """Yield Unsqueeze(axis) of every part, then their Concat on `axis` into `out`."""
    axes = f"{out}:axes:{next(_ids)}"
    yield _constant(parent, np.array([axis], np.int64), axes)
    names = []
    for i, part in enumerate(parts):
        names.append(f"{out}:{i}")
        yield _make(parent, "Unsqueeze", [part, axes], [names[-1]])
    yield _make(parent, "Concat", names, [out], axis=axis)
    return []


def _alias(parent: Node, src: str, out: str) -> Node:
    return _make(parent, "Identity", [src], [out])


def expand_if(node: Node, env: dict) -> Expansion:
    cond = env[node.inputs[0]]
    if isinstance(cond, np.ndarray):
        branch = "then_branch" if bool(cond.reshape(-1)[0]) else "else_branch"
        outs = yield from inline(node, node.attrs[branch], {}, branch)
        for src, out in zip(outs, node.outputs):
            yield _alias(node, src, out)
        return []
    then = yield from inline(node, node.attrs["then_branch"], {}, "then")
    other = yield from inline(node, node.attrs["else_branch"], {}, "else")
    scalar = f"{_label(node)}:cond:{next(_ids)}"  # a [1] condition would broadcast a scalar
    yield _constant(node, np.zeros(0, np.int64), f"{scalar}:shape")
    yield _make(node, "Reshape", [node.inputs[0], f"{scalar}:shape"], [scalar])
    for t, e, out in zip(then, other, node.outputs):
        if _shape(env, t) != _shape(env, e):
            raise UnsupportedOpError(
                f"{node}: its condition is computed from the model's inputs and its branches "
                f"give output '{out}' different shapes ({list(_shape(env, t))} and "
                f"{list(_shape(env, e))}); graphc compiles one static-shape graph")
        yield _make(node, "Where", [scalar, t, e], [out])
    return []


def expand_loop(node: Node, env: dict) -> Expansion:
    body: onnx.GraphProto = node.attrs["body"]
    trip = node.inputs[0] if node.inputs else ""
    cond = node.inputs[1] if len(node.inputs) > 1 else ""
    limit = int(_static(node, env, trip, "trip count M").reshape(-1)[0]) if trip else None
    if limit is None and not cond:
        raise UnsupportedOpError(f"{node}: a loop with neither a trip count nor a condition "
                                 "runs forever")
    carried = list(node.inputs[2:])
    scans: list[list[str]] = [[] for _ in range(len(body.output) - 1 - len(carried))]
    running = not cond or bool(_static(node, env, cond, "condition").reshape(-1)[0])
    i = 0
    while running and (limit is None or i < limit):
        if i == MAX_ITERATIONS:
            raise UnsupportedOpError(f"{node}: more than {MAX_ITERATIONS} iterations; graphc "
                                     "unrolls loops and refuses one this long")
        it = f"{_label(node)}:iter:{next(_ids)}"
        yield _constant(node, np.array(i, np.int64), it)
        cond_in = cond or f"{it}:true"
        if not cond:
            yield _constant(node, np.array(True), cond_in)
        names = [it, cond_in, *carried]
        outs = yield from inline(node, body, {v.name: n for v, n in zip(body.input, names)},
                                 f"iter{i}")
        carried = outs[1:1 + len(carried)]
        for parts, name in zip(scans, outs[1 + len(carried):]):
            parts.append(name)
        if cond:  # without a cond input the body's condition output is ignored (the spec)
            running = bool(_static(node, env, outs[0], "condition").reshape(-1)[0])
        i += 1
    for src, out in zip(carried, node.outputs):
        yield _alias(node, src, out)
    for parts, out in zip(scans, node.outputs[len(carried):]):
        if not parts:
            raise UnsupportedOpError(f"{node}: zero iterations leave scan output '{out}' "
                                     "without a shape")
        yield from _stack(node, parts, 0, out)
    return []


def expand_scan(node: Node, env: dict) -> Expansion:
    body: onnx.GraphProto = node.attrs["body"]
    m = node.attr("num_scan_inputs")
    states, xs = node.inputs[:len(node.inputs) - m], node.inputs[len(node.inputs) - m:]
    k = len(body.output) - len(states)
    in_dirs = node.attr("scan_input_directions", [0] * m)
    in_axes = [a % len(_shape(env, x)) for a, x in zip(node.attr("scan_input_axes", [0] * m),
                                                        xs)]
    lengths = {_shape(env, x)[a] for x, a in zip(xs, in_axes)}
    if len(lengths) != 1:
        raise FrontendError(f"{node}: scan inputs have different lengths along their scan "
                            f"axes: {sorted(lengths)}")
    length = lengths.pop()
    if length > MAX_ITERATIONS:
        raise UnsupportedOpError(f"{node}: {length} iterations; graphc unrolls scans and "
                                 f"refuses more than {MAX_ITERATIONS}")
    outputs: list[list[str]] = [[] for _ in range(k)]
    for t in range(length):
        slices = []
        for x, axis, backward in zip(xs, in_axes, in_dirs):
            index = f"{_label(node)}:t:{next(_ids)}"
            yield _constant(node, np.array(length - 1 - t if backward else t, np.int64), index)
            slices.append(f"{index}:slice")
            yield _make(node, "Gather", [x, index], [slices[-1]], axis=axis)
        names = [*states, *slices]
        outs = yield from inline(node, body, {v.name: n for v, n in zip(body.input, names)},
                                 f"t{t}")
        states = outs[:len(states)]
        for parts, name in zip(outputs, outs[len(states):]):
            parts.append(name)
    for src, out in zip(states, node.outputs):
        yield _alias(node, src, out)
    out_dirs = node.attr("scan_output_directions", [0] * k)
    out_axes = node.attr("scan_output_axes", [0] * k)
    for parts, out, axis, backward in zip(outputs, node.outputs[len(states):], out_axes,
                                          out_dirs):
        if not parts:
            raise UnsupportedOpError(f"{node}: a scan of length 0 leaves output '{out}' "
                                     "without a shape")
        rank = len(_shape(env, parts[0])) + 1
        yield from _stack(node, parts[::-1] if backward else parts, axis % rank, out)
    return []


CONTROL_FLOW: dict[str, Callable[[Node, dict], Expansion]] = {
    "If": expand_if, "Loop": expand_loop, "Scan": expand_scan,
}
