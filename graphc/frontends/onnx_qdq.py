"""QDQ import: a quantized ONNX model (QuantFormat.QDQ) -> graphc fake-quant nodes.

Runs on the node list before the loader plans the graph, and rewrites

    DequantizeLinear(W_int, s, zp)   W_int constant     -> FakeQuant(W, s, zp)
    DequantizeLinear(B_int32, s, 0)  the bias of a conv -> B, a float initializer
    x -> QuantizeLinear(s, zp) -> DequantizeLinear(s, zp) -> FakeQuant(x, s, zp)

where ``graphc.FakeQuant`` (onnx_ops_quant.py) becomes graphc::fake_quant_per_tensor or
fake_quant_per_channel, the ops the ``quantize`` pass inserts. W = (W_int - zp) * s is
computed at load time; it lies on the grid, so its fake-quant is an identity that
carries the scheme. W, s and zp become initializers: W and s trainable parameters,
zp an int32 buffer, all get_attr weights after tracing.

Fake-quants sit on the operands as the traced op reads them, where the quantize pass
puts them and fold-fake-quant looks: a Gemm(transB=1) weight is stored transposed with
transB=0 (aten.addmm's [in, out], axis 1), and a MatMul of a fake-quantized input and a
2-D weight becomes graphc.FakeQuantMatMul (the input's fake-quant after the flattening
to aten.mm's rows).

Kept as real integer ops (onnx_ops_quant.py): a pair whose scales or zero points
differ (a requantization), a DequantizeLinear of a computed integer tensor (a uint8
input), a QuantizeLinear whose output is a graph output. Refused with an
UnsupportedOpError: QOperator-format and dynamic-quantization ops, a QuantizeLinear
feeding anything but DequantizeLinear, computed scales, float8 and blocked formats.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
from onnx import helper

from graphc.errors import FrontendError, GraphcError, UnsupportedOpError
from graphc.frontends.onnx_ops import Node, op_table, to_numpy, to_torch
from graphc.frontends.onnx_ops_quant import (
    REQUANTIZE,
    check_block_size,
    grid,
    reject_integer_ops,
)

log = logging.getLogger("graphc")
_Q = ("QuantizeLinear", "com.microsoft.QuantizeLinear")
_DQ = ("DequantizeLinear", "com.microsoft.DequantizeLinear")


class _Consts:
    """Values known at import time: initializers, Constant nodes and what they compute.

    Evaluated on demand (scales, zero points, weights), with the op table's impls, so a
    value is computed only when a Q/DQ node asks for it."""

    def __init__(self, nodes: list[Node], inits: dict[str, np.ndarray]):
        self.values, self.producer = dict(inits), {}
        for node in nodes:
            if all(not n or n in self.values or n in self.producer for n in node.inputs):
                self.producer.update((o, node) for o in node.outputs if o)

    def get(self, name: str) -> np.ndarray | None:
        if not name or name in self.values or name not in self.producer:
            return self.values.get(name)
        node = self.producer[name]
        opdef = op_table().get(node.op)
        if opdef is None:
            raise UnsupportedOpError(f"unsupported ONNX op: {node} has no rule in graphc's "
                                     "ONNX frontend (graphc/frontends/onnx_ops*.py)")
        vals = [self.get(n) if n else None for n in node.inputs]
        try:
            out = opdef.impl(node, *[v if v is None or i in opdef.static else to_torch(v)
                                     for i, v in enumerate(vals)])
        except GraphcError:
            raise
        except Exception as e:  # as the loader's folding reports it
            raise FrontendError(f"{node} failed at load time: {type(e).__name__}: {e}") from e
        for n, v in zip(node.outputs, out if isinstance(out, (tuple, list)) else [out]):
            self.values[n] = v if isinstance(v, np.ndarray) else to_numpy(v)
        return self.values.get(name)


@dataclasses.dataclass
class _Rewrite:
    """The state of one rewrite: what replaces which node, and the new initializers."""

    nodes: list[Node]
    inits: dict[str, np.ndarray]
    outputs: set[str]
    consts: _Consts
    consumers: dict[str, list[Node]]
    taken: set[str]
    replace: dict[int, list[Node]] = dataclasses.field(default_factory=dict)  # by node.index
    params: dict[tuple, tuple[str, str]] = dataclasses.field(default_factory=dict)
    acts: dict[str, Node] = dataclasses.field(default_factory=dict)  # per-tensor, by output
    matrices: set[str] = dataclasses.field(default_factory=set)  # 2-D weight fake-quants

    def fresh(self, base: str, value: np.ndarray) -> str:
        """A new initializer under an unused name derived from base."""
        name, i = base, 1
        while name in self.taken:
            name, i = f"{base}_{i}", i + 1
        self.taken.add(name)
        self.inits[name] = value
        return name

    def const(self, node: Node, i: int, what: str) -> np.ndarray | None:
        name = node.inputs[i] if i < len(node.inputs) else ""
        value = self.consts.get(name)
        if name and value is None:
            raise UnsupportedOpError(f"{node}: its {what} '{name}' is computed at run time; "
                                     "graphc imports constant scales and zero points only")
        return value


def rewrite_qdq(nodes: list[Node], inits: dict[str, np.ndarray],
                outputs: list[str]) -> tuple[list[Node], dict[str, np.ndarray]]:
    """The node list and initializers with QDQ patterns as graphc.FakeQuant nodes."""
    reject_integer_ops(nodes)
    if not any(n.op in _Q or n.op in _DQ for n in nodes):
        return nodes, inits
    consumers: dict[str, list[Node]] = {}
    for node in nodes:
        for name in dict.fromkeys(n for n in node.inputs if n):
            consumers.setdefault(name, []).append(node)
    taken = set(inits) | {o for n in nodes for o in n.outputs} | set(outputs)
    rw = _Rewrite(nodes, dict(inits), set(outputs), _Consts(nodes, inits), consumers, taken)
    producer = {o: n for n in nodes for o in n.outputs if o}
    for node in nodes:
        if node.op in _Q:
            _check_consumers(node, rw)
        elif node.op in _DQ:
            _rewrite_dq(node, producer.get(node.inputs[0]), rw)
    _fuse_matmuls(rw)
    nodes = _apply(rw)
    # quantized initializers the rewrite consumed go: torch has no int4 to hold them
    read = {i for n in nodes for i in n.inputs} | rw.outputs
    return nodes, {k: v for k, v in rw.inits.items() if k in read}


def _check_consumers(q: Node, rw: _Rewrite) -> None:
    for user in rw.consumers.get(q.outputs[0], []):
        if user.op not in _DQ:
            raise UnsupportedOpError(
                f"{user} consumes the integer output '{q.outputs[0]}' of {q}; graphc imports "
                f"QDQ models, where a QuantizeLinear feeds only DequantizeLinear: {REQUANTIZE}")


def _rewrite_dq(dq: Node, src: Node | None, rw: _Rewrite) -> None:
    check_block_size(dq)
    if src is not None and src.op in _Q:
        _pair(src, dq, rw)
        return
    w = rw.consts.get(dq.inputs[0])
    if w is None:
        return  # a computed integer tensor, e.g. a uint8 input: a real dequantize
    scale, zp = _broadcast_params(dq, w, rw)
    value = (w.astype(np.int64) - zp).astype(np.float32) * scale  # as onnxruntime computes it
    if w.dtype == np.int32:  # onnxruntime's bias, scale_x * scale_w: a float weight
        rw.inits[dq.outputs[0]] = value
        rw.replace[dq.index] = []
    else:
        _weight(dq, w, value.astype(np.float32), scale.ndim > 0, rw)


def _broadcast_params(node: Node, w: np.ndarray, rw: _Rewrite):
    """Scale and zero point of a DequantizeLinear of w, broadcastable against w."""
    scale, zp = rw.const(node, 1, "scale"), rw.const(node, 2, "zero point")
    shape = []
    if scale.size > 1:
        axis = _axis(node, w.ndim)
        if scale.shape != (w.shape[axis],):
            raise FrontendError(f"{node}: scale has shape {list(scale.shape)}, expected "
                                f"[{w.shape[axis]}] (axis {axis} of {list(w.shape)})")
        shape = [-1 if d == axis else 1 for d in range(w.ndim)]
    return scale.reshape(shape), 0 if zp is None else zp.reshape(shape).astype(np.int64)


def _axis(node: Node, rank: int) -> int:
    axis = node.attr("axis", 1)
    if not -rank <= axis < rank:
        raise FrontendError(f"{node}: axis {axis} is out of range for a rank-{rank} tensor")
    return axis % rank


def _weight(dq: Node, w: np.ndarray, value: np.ndarray, per_channel: bool,
            rw: _Rewrite) -> None:
    """A quantized constant: its float value as a weight, fake-quantized on its grid."""
    qmin, qmax = grid(dq, w.dtype)
    axis = _axis(dq, w.ndim) if per_channel else None
    stem = dq.inputs[0].removesuffix("_quantized")
    users = rw.consumers.get(dq.outputs[0], [])
    if _linear_weight(dq, users, w, rw):  # [out, in] -> [in, out]: what aten.addmm reads
        value, axis, stem = value.T.copy(), None if axis is None else 1 - axis, f"{stem}_t"
        for gemm in users:
            rw.replace[gemm.index] = [dataclasses.replace(gemm, attrs={**gemm.attrs,
                                                                       "transB": 0})]
    s, z = _params(dq, rw)
    inputs = [rw.fresh(stem, value), s, z]
    rw.replace[dq.index] = [_fake_quant(dq, inputs, axis, qmin, qmax)]
    if w.ndim == 2:
        rw.matrices.add(dq.outputs[0])


def _linear_weight(dq: Node, users: list[Node], w: np.ndarray, rw: _Rewrite) -> bool:
    """Whether dq's only readers are Gemm(transB=1) B operands (torch's nn.Linear export)."""
    return (w.ndim == 2 and bool(users) and dq.outputs[0] not in rw.outputs
            and all(u.op == "Gemm" and u.attr("transB", 0) and u.inputs[1] == dq.outputs[0]
                    and u.inputs[0] != dq.outputs[0] for u in users))


def _pair(q: Node, dq: Node, rw: _Rewrite) -> None:
    """Q -> DQ: one fake-quant on Q's input, or real ops when the two disagree."""
    check_block_size(q)
    qs, qz = rw.const(q, 1, "scale"), rw.const(q, 2, "zero point")
    ds, dz = rw.const(dq, 1, "scale"), rw.const(dq, 2, "zero point")
    dtype = _q_dtype(q, qz)
    qmin, qmax = grid(q, dtype)
    zero = np.zeros_like(qs, dtype=np.int64)
    qz = zero if qz is None else qz.astype(np.int64)
    dz = zero if dz is None else dz.astype(np.int64)
    per_channel = qs.size > 1
    same = (np.array_equal(qs.reshape(-1), ds.reshape(-1))
            and np.array_equal(qz.reshape(-1), dz.reshape(-1))
            and (not per_channel or q.attr("axis", 1) == dq.attr("axis", 1)))
    if not same:
        log.warning("%s and %s use different scales or zero points (a requantization): "
                    "imported as a real quantize and dequantize, not a fake-quant", q, dq)
        return
    s, z = _params(q, rw)
    axis = q.attr("axis", 1) if per_channel else None
    rw.replace[dq.index] = [_fake_quant(dq, [q.inputs[0], s, z], axis, qmin, qmax)]
    if not per_channel:
        rw.acts[dq.outputs[0]] = rw.replace[dq.index][0]


def _q_dtype(q: Node, zp: np.ndarray | None):
    if zp is not None:
        return zp.dtype
    if q.attr("output_dtype", 0):
        return helper.tensor_dtype_to_np_dtype(q.attr("output_dtype"))
    return np.uint8


def _params(node: Node, rw: _Rewrite) -> tuple[str, str]:
    """Initializers for a node's scale (float32, [] or [C]) and zero point (int32, same
    shape); one pair per (scale, zero point) names, so shared scales stay shared."""
    s_name, z_name = node.inputs[1], node.inputs[2] if len(node.inputs) > 2 else ""
    key = (s_name, z_name)
    if key not in rw.params:
        scale, zp = rw.const(node, 1, "scale"), rw.const(node, 2, "zero point")
        if scale.dtype != np.float32:
            raise node.unsupported("scale type", scale.dtype.name)
        shape = () if scale.size == 1 else (scale.size,)
        zp = np.zeros(shape, np.int32) if zp is None else zp.astype(np.int32).reshape(shape)
        stem = s_name.removesuffix("_scale")
        s = s_name if s_name in rw.inits and scale.shape == shape else rw.fresh(
            f"{stem}_scale", scale.reshape(shape))
        rw.params[key] = (s, rw.fresh(f"{stem}_zp", zp))
    return rw.params[key]


def _fuse_matmuls(rw: _Rewrite) -> None:
    """MatMul(fake-quantized input, 2-D weight) -> graphc.FakeQuantMatMul: torch.matmul
    of a 3-D input flattens it for aten.mm, and the input's fake-quant must come after
    that view to be mm's operand, as the quantize pass leaves it for fold-fake-quant."""
    for mm in rw.nodes:
        act = rw.acts.get(mm.inputs[0]) if mm.op == "MatMul" else None
        if act is not None and mm.inputs[1] in rw.matrices:
            rw.replace[mm.index] = [Node(mm.index, mm.name, "FakeQuantMatMul", "graphc",
                                         [*act.inputs, mm.inputs[1]], list(mm.outputs),
                                         dict(act.attrs), mm.opset)]


def _fake_quant(like: Node, inputs: list[str], axis, qmin: int, qmax: int) -> Node:
    attrs = {"qmin": qmin, "qmax": qmax} | ({} if axis is None else {"axis": axis})
    return Node(like.index, like.name, "FakeQuant", "graphc", inputs, list(like.outputs),
                attrs, like.opset)


def _apply(rw: _Rewrite) -> list[Node]:
    """The new node list: replacements in place; Q and fake-quant nodes nobody reads any
    more (their readers were rewritten) dropped."""
    out = [m for n in rw.nodes for m in rw.replace.get(n.index, [n])]
    read = {i for n in out for i in n.inputs} | rw.outputs
    unread = (*_Q, "graphc.FakeQuant")
    return [n for n in out if not (n.op in unread and n.outputs[0] not in read)]
