"""More ONNX elementwise and per-axis ops: trigonometry, bit ops, Shrink, Hardmax, CumProd, ..."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from graphc.frontends.onnx_ops import (
    Node,
    OpDef,
    axis_of,
    ints,
    to_numpy,
    to_torch,
    torch_dtype,
)
from graphc.frontends.onnx_ops_shape import log_scan


def _unary(fn) -> OpDef:
    return OpDef(lambda node, x: fn(x))


def _bit_shift(node: Node, x: torch.Tensor, n: torch.Tensor):
    direction = node.attr("direction")
    if direction not in ("LEFT", "RIGHT"):
        raise node.unsupported("direction", direction)
    shift = torch.bitwise_left_shift if direction == "LEFT" else torch.bitwise_right_shift
    return shift(x, n)


def _shrink(node: Node, x: torch.Tensor):
    lambd, bias = node.attr("lambd", 0.5), node.attr("bias", 0.0)
    out = torch.where(x < -lambd, x + bias, torch.where(x > lambd, x - bias, 0))
    return out.to(x.dtype)  # an integer input stays integer (bias is a float attribute)


def _hardmax(node: Node, x: torch.Tensor):
    axis = axis_of(node, node.attr("axis", -1), x.ndim)
    hot = F.one_hot(x.argmax(axis), x.shape[axis]).to(x.dtype)  # the first maximum wins
    return hot.movedim(-1, axis)


def _cumprod(node: Node, x: torch.Tensor, axis: np.ndarray):
    axis = axis_of(node, int(axis.item()), x.ndim)
    reverse = node.attr("reverse", 0)
    x = x.flip(axis) if reverse else x
    if node.attr("exclusive", 0):  # shift by one: a leading 1, the last element dropped
        ones = torch.ones_like(x.narrow(axis, 0, 1))
        x = torch.cat([ones, x.narrow(axis, 0, x.shape[axis] - 1)], axis)
    out = log_scan(x, axis, torch.mul, 1)
    return out.flip(axis) if reverse else out


def _lp_normalization(node: Node, x: torch.Tensor):
    axis, p = axis_of(node, node.attr("axis", -1), x.ndim), node.attr("p", 2)
    if p not in (1, 2):
        raise node.unsupported("p", p)
    norm = x.abs().sum(axis, keepdim=True) if p == 1 else (x * x).sum(axis, keepdim=True).sqrt()
    return torch.where(norm == 0, 0.0, x / norm).to(x.dtype)  # a zero vector stays zero


def _space_to_depth(node: Node, x: torch.Tensor):
    b, mode = node.attr("blocksize"), node.attr("mode", "DCR")
    if mode not in ("DCR", "CRD"):
        raise node.unsupported("mode", mode)
    n, c, h, w = x.shape
    order = (0, 3, 5, 1, 2, 4) if mode == "DCR" else (0, 1, 3, 5, 2, 4)
    y = x.reshape(n, c, h // b, b, w // b, b).permute(order)
    return y.reshape(n, c * b * b, h // b, w // b)


def _depth_to_space(node: Node, x: torch.Tensor):
    b, mode = node.attr("blocksize"), node.attr("mode", "DCR")
    if mode == "CRD":
        return F.pixel_shuffle(x, b)  # torch's channel order is ONNX's CRD
    n, c, h, w = x.shape
    y = x.reshape(n, b, b, c // (b * b), h, w).permute(0, 3, 4, 1, 5, 2)
    return y.reshape(n, c // (b * b), h * b, w * b)


def _eye_like(node: Node, x: torch.Tensor):
    # the output depends on the input's shape only: a load-time constant
    dtype = torch_dtype(node.attr("dtype"), str(node)) if node.attr("dtype") else x.dtype
    eye = np.eye(x.shape[0], x.shape[1], node.attr("k", 0))
    return to_numpy(to_torch(eye).to(dtype))


def _one_hot(node: Node, idx: torch.Tensor, depth: np.ndarray, values: torch.Tensor):
    depth = int(np.asarray(depth).reshape(-1)[0])
    axis = axis_of(node, node.attr("axis", -1), idx.ndim + 1)
    idx = torch.where(idx < 0, idx + depth, idx)  # out-of-range indices match no class
    classes = torch.arange(depth, device=idx.device).reshape((-1,) + (1,) * (idx.ndim - axis))
    hot = idx.unsqueeze(axis).to(torch.int64) == classes
    return torch.where(hot, values[1], values[0])


_SCATTER_REDUCE = {"add": "sum", "mul": "prod", "max": "amax", "min": "amin"}


def _scatter_elements(node: Node, x: torch.Tensor, idx: torch.Tensor, updates: torch.Tensor):
    axis = axis_of(node, node.attr("axis", 0), x.ndim)
    known = node.consts.get(1)
    if known is None or (known < 0).any():
        idx = torch.where(idx < 0, idx + x.shape[axis], idx)
    reduction = node.attr("reduction", "none")
    if reduction == "none":
        return torch.scatter(x, axis, idx, updates)
    if reduction not in _SCATTER_REDUCE:
        raise node.unsupported("reduction", reduction)
    return torch.scatter_reduce(x, axis, idx, updates, _SCATTER_REDUCE[reduction])


def _mvn(node: Node, x: torch.Tensor):
    dims = [axis_of(node, a, x.ndim) for a in node.attr("axes", [0, 2, 3])]
    mean = x.mean(dims, keepdim=True)
    var = ((x - mean) ** 2).mean(dims, keepdim=True)
    return (x - mean) / (var.sqrt() + 1e-9)


def _lrn(node: Node, x: torch.Tensor):
    return F.local_response_norm(x, node.attr("size"), node.attr("alpha", 1e-4),
                                 node.attr("beta", 0.75), node.attr("bias", 1.0))


def _det(node: Node, x: torch.Tensor):
    return torch.linalg.det(x)


def _swish(node: Node, x: torch.Tensor):
    alpha = node.attr("alpha", 1.0)
    return x * torch.sigmoid(x if alpha == 1.0 else alpha * x)


def _reverse_sequence(node: Node, x: torch.Tensor, lens: np.ndarray):
    b_axis, t_axis = node.attr("batch_axis", 1), node.attr("time_axis", 0)
    rows = []
    for b, n in enumerate(ints(lens)):  # sequence lengths are load-time values
        row = x.select(b_axis, b)
        t = t_axis if t_axis < b_axis else t_axis - 1
        head = row.narrow(t, 0, n).flip(t)
        rows.append(torch.cat([head, row.narrow(t, n, row.shape[t] - n)], t))
    return torch.stack(rows, b_axis)


def _swiglu(node: Node, a: torch.Tensor, b: torch.Tensor):
    alpha = node.attr("alpha", 1.0)
    return a * torch.sigmoid(a if alpha == 1.0 else alpha * a) * b


def _tensor_scatter(node: Node, cache: torch.Tensor, update: torch.Tensor, write=None):
    """Write update into cache along axis, from write[b] on for batch b (a KV cache append)."""
    axis = axis_of(node, node.attr("axis", -2), cache.ndim)
    mode = node.attr("mode", "linear")
    if mode not in ("linear", "circular"):
        raise node.unsupported("mode", mode)
    steps = torch.arange(update.shape[axis], device=update.device)
    pos = steps.reshape((-1,) + (1,) * (cache.ndim - 1 - axis))
    if write is not None:
        pos = pos + write.reshape((-1,) + (1,) * (cache.ndim - 1))
    if mode == "circular":
        pos = pos % cache.shape[axis]
    return torch.scatter(cache, axis, pos.expand(update.shape), update)


OPS: dict[str, OpDef] = {
    # a plain tensor is an optional that holds a value; an absent input holds none
    "OptionalHasElement": OpDef(lambda node, x=None: np.array(x is not None)),
    "OptionalGetElement": OpDef(lambda node, x: x),
    "SwiGLU": OpDef(_swiglu),
    "TensorScatter": OpDef(_tensor_scatter),
    "Tan": _unary(torch.tan),
    "Asin": _unary(torch.asin),
    "Acos": _unary(torch.acos),
    "Atan": _unary(torch.atan),
    "Sinh": _unary(torch.sinh),
    "Cosh": _unary(torch.cosh),
    "Asinh": _unary(torch.asinh),
    "Acosh": _unary(torch.acosh),
    "Atanh": _unary(torch.atanh),
    "BitShift": OpDef(_bit_shift),
    "BitwiseAnd": OpDef(lambda node, a, b: torch.bitwise_and(a, b)),
    "BitwiseOr": OpDef(lambda node, a, b: torch.bitwise_or(a, b)),
    "BitwiseXor": OpDef(lambda node, a, b: torch.bitwise_xor(a, b)),
    "BitwiseNot": _unary(torch.bitwise_not),
    "Shrink": OpDef(_shrink),
    "Swish": OpDef(_swish),
    "Hardmax": OpDef(_hardmax),
    "CumProd": OpDef(_cumprod, static=(1,)),
    "LpNormalization": OpDef(_lp_normalization),
    "SpaceToDepth": OpDef(_space_to_depth),
    "DepthToSpace": OpDef(_depth_to_space),
    "EyeLike": OpDef(_eye_like),
    "OneHot": OpDef(_one_hot, static=(1,)),
    "ScatterElements": OpDef(_scatter_elements),
    "Scatter": OpDef(_scatter_elements),  # opset <= 10, the same op under an older name
    "MeanVarianceNormalization": OpDef(_mvn),
    "LRN": OpDef(_lrn),
    "Det": OpDef(_det),
    "ReverseSequence": OpDef(_reverse_sequence, static=(1,)),
}
