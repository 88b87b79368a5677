"""ONNX elementwise ops: arithmetic, comparisons, logic, activations, casts."""

from __future__ import annotations

import functools
import operator

import torch
import torch.nn.functional as F

from graphc.frontends.onnx_ops import Node, OpDef, to_torch, torch_dtype


def _is_float(v) -> bool:
    return v.is_floating_point() if isinstance(v, torch.Tensor) else isinstance(v, float)


def _as_tensor(v, like: torch.Tensor) -> torch.Tensor:
    # Only for the rare number-first integer op: most torch functions want a tensor first.
    if isinstance(v, torch.Tensor):
        return v
    return torch.full((), v, dtype=like.dtype, device=like.device)


def _div(node: Node, a, b):
    if _is_float(a) or _is_float(b):
        return a / b
    # ONNX integer division truncates toward zero (C semantics), not floor like python.
    return torch.div(_as_tensor(a, b), b, rounding_mode="trunc")


def _pow(node: Node, a: torch.Tensor, b):
    # ONNX Pow keeps the base's type (an int base with a float exponent stays int).
    out = torch.pow(a, b)
    return out if out.dtype == a.dtype else out.to(a.dtype)


def _mod(node: Node, a, b):
    a = _as_tensor(a, b)
    # fmod=1: the sign of the dividend (C fmod); fmod=0: the sign of the divisor (python %).
    return torch.fmod(a, b) if node.attr("fmod", 0) else torch.remainder(a, b)


def _binary(fn, scalars: tuple[int, ...] = (0, 1)) -> OpDef:
    return OpDef(lambda node, a, b: fn(a, b), scalars=scalars)


def _variadic(fn) -> OpDef:
    return OpDef(lambda node, *xs: functools.reduce(fn, xs))


def _unary(fn) -> OpDef:
    return OpDef(lambda node, x: fn(x))


def _where(node: Node, cond, x, y):
    if not isinstance(x, torch.Tensor) and not isinstance(y, torch.Tensor):
        # Two python scalars would give torch's default dtype; keep the model's dtype.
        x = torch.full_like(cond, x, dtype=to_torch(node.consts[1]).dtype)
    return torch.where(cond, x, y)


def _clip(node: Node, x, lo=None, hi=None):
    return x if lo is None and hi is None else torch.clamp(x, lo, hi)


def _hard_sigmoid(node: Node, x):
    alpha, beta = node.attr("alpha", 0.2), node.attr("beta", 0.5)
    if abs(alpha - 1 / 6) < 1e-7 and beta == 0.5:
        return F.hardsigmoid(x)  # the form torch models export; passes recognize it
    return torch.clamp(alpha * x + beta, 0, 1)


def _selu(node: Node, x):
    alpha = node.attr("alpha", 1.67326319217681884765625)
    gamma = node.attr("gamma", 1.05070102214813232421875)
    return gamma * torch.where(x > 0, x, alpha * (torch.exp(x) - 1))


def _gelu(node: Node, x):
    approximate = node.attr("approximate", "none")
    if approximate not in ("none", "tanh"):
        raise node.unsupported("approximate", approximate)
    return F.gelu(x, approximate=approximate)


def _is_inf(node: Node, x):
    neg, pos = node.attr("detect_negative", 1), node.attr("detect_positive", 1)
    return ((x == float("-inf")) & bool(neg)) | ((x == float("inf")) & bool(pos))


def _cast(node: Node, x):
    dtype = torch_dtype(node.attr("to"), str(node))
    return x if x.dtype == dtype else x.to(dtype)  # same-type casts leave no node behind


OPS: dict[str, OpDef] = {
    "Add": _binary(operator.add),
    "Sub": _binary(operator.sub),
    "Mul": _binary(operator.mul),
    "Div": OpDef(_div, scalars=(0, 1)),
    "Pow": OpDef(_pow, scalars=(1,)),
    "Mod": OpDef(_mod, scalars=(1,)),
    "Equal": _binary(operator.eq),
    "Less": _binary(operator.lt),
    "LessOrEqual": _binary(operator.le),
    "Greater": _binary(operator.gt),
    "GreaterOrEqual": _binary(operator.ge),
    "And": _binary(torch.logical_and, scalars=()),
    "Or": _binary(torch.logical_or, scalars=()),
    "Xor": _binary(torch.logical_xor, scalars=()),
    "Not": _unary(torch.logical_not),
    "Max": _variadic(torch.maximum),
    "Min": _variadic(torch.minimum),
    "Sum": _variadic(operator.add),
    "Mean": OpDef(lambda node, *xs: functools.reduce(operator.add, xs) / len(xs)),
    "Where": OpDef(_where, scalars=(1, 2)),
    "Clip": OpDef(_clip, scalars=(1, 2)),
    "Cast": OpDef(_cast),
    "CastLike": OpDef(lambda node, x, like: x.to(like.dtype)),
    "Neg": _unary(torch.neg),
    "Abs": _unary(torch.abs),
    "Sign": _unary(torch.sign),
    "Sqrt": _unary(torch.sqrt),
    "Reciprocal": _unary(torch.reciprocal),
    "Exp": _unary(torch.exp),
    "Log": _unary(torch.log),
    "Floor": _unary(torch.floor),
    "Ceil": _unary(torch.ceil),
    "Round": _unary(torch.round),  # both round half to even
    "Sin": _unary(torch.sin),
    "Cos": _unary(torch.cos),
    "Tanh": _unary(torch.tanh),
    "Erf": _unary(torch.erf),
    "IsNaN": _unary(torch.isnan),
    "IsInf": OpDef(_is_inf),
    "Relu": _unary(torch.relu),
    "Sigmoid": _unary(torch.sigmoid),
    "Softplus": _unary(F.softplus),
    "Softsign": _unary(F.softsign),
    "Mish": _unary(F.mish),
    "HardSwish": _unary(F.hardswish),
    "HardSigmoid": OpDef(_hard_sigmoid),
    "LeakyRelu": OpDef(lambda node, x: F.leaky_relu(x, node.attr("alpha", 0.01))),
    "Elu": OpDef(lambda node, x: F.elu(x, node.attr("alpha", 1.0))),
    "Celu": OpDef(lambda node, x: F.celu(x, node.attr("alpha", 1.0))),
    "Selu": OpDef(_selu),
    "ThresholdedRelu": OpDef(lambda node, x: torch.where(x > node.attr("alpha", 1.0), x, 0.0)),
    "PRelu": OpDef(lambda node, x, slope: torch.where(x < 0, x * slope, x)),
    "Gelu": OpDef(_gelu),
}
