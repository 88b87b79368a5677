"""ONNX dense and normalization ops: Gemm, MatMul, norms, Softmax, reductions, ArgMax, TopK.

LayerNormalization, with its statistics outputs, is in onnx_ops_loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from graphc.frontends.onnx_ops import Node, OpDef, axis_of, ints


def _gemm(node: Node, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor | None = None):
    alpha, beta = node.attr("alpha", 1.0), node.attr("beta", 1.0)
    trans_a, trans_b = node.attr("transA", 0), node.attr("transB", 0)
    plain_bias = c is None or tuple(c.shape) == (b.shape[0 if trans_b else 1],)
    if (trans_a, alpha, beta) == (0, 1.0, 1.0) and plain_bias:
        if trans_b:
            return F.linear(a, b, c)  # what nn.Linear exports: keep it a linear for the passes
        if c is not None:  # a linear with its weight stored [in, out] (QDQ import): the same
            return torch.addmm(c, a, b)
    y = (a.t() if trans_a else a) @ (b.t() if trans_b else b)
    y = y if alpha == 1.0 else y * alpha
    if c is None:
        return y
    return y + (c if beta == 1.0 else c * beta)


def _batch_norm_training(node: Node, x, scale, bias, mean, var):
    """Normalize by the batch's statistics; also the updated running mean and variance."""
    dims = [0] + list(range(2, x.ndim))
    shape = [1, -1] + [1] * (x.ndim - 2)
    batch_mean, batch_var = x.mean(dims), x.var(dims, unbiased=False)
    y = (x - batch_mean.reshape(shape)) * torch.rsqrt(
        batch_var.reshape(shape) + node.attr("epsilon", 1e-5))
    y = y * scale.reshape(shape) + bias.reshape(shape)
    m = node.attr("momentum", 0.9)
    return y, mean * m + batch_mean * (1 - m), var * m + batch_var * (1 - m)


def _batch_norm(node: Node, x, scale, bias, mean, var):
    if node.attr("training_mode", 0):
        return _batch_norm_training(node, x, scale, bias, mean, var)
    return F.batch_norm(x, mean, var, scale, bias, False, 0.0, node.attr("epsilon", 1e-5))


def _instance_norm(node: Node, x, scale, bias):
    return F.instance_norm(x, weight=scale, bias=bias, eps=node.attr("epsilon", 1e-5))


def _softmax(fn):
    # opset 13+: a single axis (older opsets flattened to 2-D; the loader rejects them)
    return OpDef(lambda node, x: fn(x, axis_of(node, node.attr("axis", -1), x.ndim)))


def _prod(x: torch.Tensor, dims: list[int], keep: bool) -> torch.Tensor:
    for d in sorted(dims, reverse=True):  # torch.prod takes one dim at a time
        x = x.prod(d, keepdim=keep)
    return x


_REDUCERS = {
    "ReduceMean": lambda x, d, k: x.mean(d, keepdim=k),
    "ReduceSum": lambda x, d, k: x.sum(d, keepdim=k),
    "ReduceMax": lambda x, d, k: x.amax(d, keepdim=k),
    "ReduceMin": lambda x, d, k: x.amin(d, keepdim=k),
    "ReduceProd": _prod,
    "ReduceL1": lambda x, d, k: x.abs().sum(d, keepdim=k),
    "ReduceL2": lambda x, d, k: (x * x).sum(d, keepdim=k).sqrt(),
    "ReduceSumSquare": lambda x, d, k: (x * x).sum(d, keepdim=k),
    "ReduceLogSum": lambda x, d, k: x.sum(d, keepdim=k).log(),
    "ReduceLogSumExp": lambda x, d, k: torch.logsumexp(x, d, keepdim=k),
}


def _extreme(dtype: torch.dtype, low: bool):
    if dtype == torch.bool:
        return not low
    info = torch.finfo(dtype) if dtype.is_floating_point else torch.iinfo(dtype)
    if dtype.is_floating_point:
        return float("-inf") if low else float("inf")
    return info.min if low else info.max


_EMPTY_IDENTITY = {"ReduceMax": lambda dt: _extreme(dt, True),
                   "ReduceMin": lambda dt: _extreme(dt, False)}


_BOOL_REDUCERS = {"ReduceMax": lambda x, d, k: x.any(d, keepdim=k),
                  "ReduceMin": lambda x, d, k: x.all(d, keepdim=k)}


def _reduce(fn) -> OpDef:
    def impl(node: Node, x: torch.Tensor, axes=None):
        # axes: an attribute up to opset 17 (ReduceSum: 12), an input from opset 18 (13)
        axes = ints(axes) if axes is not None else node.attr("axes")
        if not axes:
            if node.attr("noop_with_empty_axes", 0):
                return x
            axes = range(x.ndim)
        if x.ndim == 0:
            return x
        dims = sorted({axis_of(node, a, x.ndim) for a in axes})
        keep = bool(node.attr("keepdims", 1))
        if node.op in _EMPTY_IDENTITY and any(x.shape[d] == 0 for d in dims):
            # torch has no identity for max/min over nothing; ONNX gives -inf / +inf
            shape = [1 if d in dims else n for d, n in enumerate(x.shape) if keep or d not in dims]
            return torch.full(shape, _EMPTY_IDENTITY[node.op](x.dtype), dtype=x.dtype,
                              device=x.device)
        if x.dtype == torch.bool and node.op in _BOOL_REDUCERS:  # max/min of bools: any/all
            return _BOOL_REDUCERS[node.op](x, dims, keep)
        return fn(x, dims, keep)

    return OpDef(impl, static=(1,))


def _arg(fn) -> OpDef:
    def impl(node: Node, x: torch.Tensor):
        axis, keep = axis_of(node, node.attr("axis", 0), x.ndim), bool(node.attr("keepdims", 1))
        if not node.attr("select_last_index", 0):
            return fn(x, axis, keepdim=keep)
        # the last of equal extremes: search the flipped tensor, map indices back
        return x.shape[axis] - 1 - fn(x.flip(axis), axis, keepdim=keep)

    return OpDef(impl)


def _topk(node: Node, x: torch.Tensor, k):
    axis = axis_of(node, node.attr("axis", -1), x.ndim)
    largest = bool(node.attr("largest", 1))
    # ONNX breaks ties by the lower index; torch.topk does not promise any order for them
    values, indices = torch.sort(x, dim=axis, descending=largest, stable=True)
    k = int(k.item())
    return values.narrow(axis, 0, k), indices.narrow(axis, 0, k)


OPS: dict[str, OpDef] = {
    "Gemm": OpDef(_gemm),
    "MatMul": OpDef(lambda node, a, b: torch.matmul(a, b)),
    "Einsum": OpDef(lambda node, *xs: torch.einsum(node.attr("equation"), *xs)),
    "BatchNormalization": OpDef(_batch_norm, stats=(3, 4)),  # running mean and var
    "InstanceNormalization": OpDef(_instance_norm),
    "Softmax": _softmax(F.softmax),
    "LogSoftmax": _softmax(F.log_softmax),
    "ArgMax": _arg(torch.argmax),
    "ArgMin": _arg(torch.argmin),
    "TopK": OpDef(_topk, static=(1,)),
    **{op: _reduce(fn) for op, fn in _REDUCERS.items()},
}
