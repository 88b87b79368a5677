"""Elementwise and reduction ATen ops that TVM 0.27's importer lacks or lowers wrongly.

Each rule matches PyTorch (the IR's reference), found through the ONNX backend node tests:

- bitwise_left_shift / bitwise_right_shift: no converter. A shift by b < 0 or b >= the bit
  width is undefined in LLVM (poison); PyTorch defines it: left -> 0, right -> the sign fill
  (x >> width-1). The amount is clamped into range and the out-of-range result selected.
  Left shifts run on the unsigned type, so no signed-overflow flag can reach LLVM.
- prod.dim_int / prod.default: no converter for the dim overload; the default one ignored
  the dtype (PyTorch multiplies integers and bools in int64).
- view.dtype (a bitcast): no converter. Same-size dtypes reinterpret the bits; bool -> 8-bit
  integers is a cast (a bool byte is 0 or 1). Other element sizes and views as bool are
  refused.
- pow.Tensor_Tensor on integers: TVM's power is float-only and crashed in legalization.
  Exact integer powers by squaring (wrapping as PyTorch does); a negative exponent gives
  PyTorch's 0, 1 or -1.
- clamp.Tensor / clamp.default with one bound missing: TVM fills it with +-inf and crashed
  casting inf to an integer dtype. Only the given bounds are applied, min first, as PyTorch.
- sinh / cosh: TVM's LLVM codegen has no vector rule for them: a fully vectorized kernel
  (length a multiple of the vector width) failed to build. They are written with exp, which
  vectorizes; sinh uses its odd Taylor series near 0, where exp(x) - exp(-x) cancels.
- remainder on floats: TVM's floor_mod computes a - floor(a / b) * b: NaN for an infinite
  divisor (PyTorch: a, or b when the signs differ) and garbage once a / b loses the integer
  part (1e30 % 7 gave -2.8e22). PyTorch's own rule: fmod, then + b when the signs differ.
- log1p: TVM computes log(1 + x), which loses the digits of a small x (Mish's softplus tail
  was 1e-3 off at x = -10; softplus too). Near 0 it is 2 atanh(x / (2 + x)) as a series,
  in float64.
- split_with_sizes with a zero-size piece: topi.split requires strictly increasing cuts and
  crashed. Each piece is a strided_slice (an empty piece an empty tensor).
"""

from __future__ import annotations

import math

import torch
from torch import fx
from tvm import relax, te, tirx
from tvm.script import tirx as T

from graphc.errors import UnsupportedOpError

from .lower import register_lowering


def _dtype(x: relax.Expr) -> str:
    return str(x.ty.dtype)


def _out_dtype(node: fx.Node) -> str:
    return str(node.meta["val"].dtype).removeprefix("torch.")


def _operand(importer, arg, dtype: str) -> relax.Expr:
    """An fx arg (node or Python number) as a Relax tensor of `dtype`."""
    if isinstance(arg, fx.Node):
        x = importer.env[arg]
        return x if _dtype(x) == dtype else importer.block_builder.emit(relax.op.astype(x, dtype))
    return relax.const(arg, dtype)


def _width(dtype: str, node: fx.Node) -> int:
    if dtype == "bool" or not dtype.startswith(("int", "uint")):
        raise UnsupportedOpError(f"tvm backend: %{node.name} ({node.target}) on {dtype}: "
                                 "bit shifts and integer powers need an integer dtype")
    return int(dtype.removeprefix("u").removeprefix("int"))


# --- bit shifts ------------------------------------------------------------------------------

def _shift(node: fx.Node, importer, left: bool) -> relax.Expr:
    bb, dtype = importer.block_builder, _out_dtype(node)
    width = _width(dtype, node)
    a, b = (_operand(importer, arg, dtype) for arg in node.args[:2])
    out_of_range = relax.op.greater_equal(b, relax.const(width, dtype))
    if not dtype.startswith("u"):
        out_of_range = relax.op.logical_or(out_of_range, relax.op.less(b, relax.const(0, dtype)))
    out_of_range = bb.emit(out_of_range)
    # out of range: left -> 0 (selected below), right -> shift by width-1 (the sign fill)
    safe = bb.emit(relax.op.where(out_of_range, relax.const(0 if left else width - 1, dtype), b))
    if not left:
        return bb.emit(relax.op.right_shift(a, safe))
    unsigned = dtype if dtype.startswith("u") else "u" + dtype
    shifted = relax.op.left_shift(relax.op.astype(a, unsigned), relax.op.astype(safe, unsigned))
    return bb.emit(relax.op.where(out_of_range, relax.const(0, dtype),
                                  relax.op.astype(shifted, dtype)))


# torch.bitwise_*_shift and the << / >> operators (__lshift__ / __rshift__): one semantics
for _op, _left in (("bitwise_left_shift.Tensor", True), ("bitwise_left_shift.Tensor_Scalar", True),
                   ("__lshift__.Tensor", True), ("__lshift__.Scalar", True),
                   ("bitwise_right_shift.Tensor", False),
                   ("bitwise_right_shift.Tensor_Scalar", False),
                   ("__rshift__.Tensor", False), ("__rshift__.Scalar", False)):
    register_lowering(f"aten::{_op}")(
        lambda node, importer, left=_left: _shift(node, importer, left))


# --- reductions ------------------------------------------------------------------------------

@register_lowering("aten::prod.dim_int")
@register_lowering("aten::prod.default")
def _prod(node: fx.Node, importer) -> relax.Expr:
    x = _operand(importer, node.args[0], _out_dtype(node))  # PyTorch's accumulation dtype
    if node.target is torch.ops.aten.prod.default:
        return importer.block_builder.emit(relax.op.prod(x, None, False))
    dim = node.args[1] % max(x.ty.ndim, 1)
    keep = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
    return importer.block_builder.emit(relax.op.prod(x, [dim], bool(keep)))


# --- bitcast ---------------------------------------------------------------------------------

@register_lowering("aten::view.dtype")
def _view_dtype(node: fx.Node, importer) -> relax.Expr:
    x = importer.env[node.args[0]]
    src, dst = _dtype(x), _out_dtype(node)
    src_size, dst_size = (torch.empty(0, dtype=getattr(torch, d)).element_size()
                          for d in (src, dst))
    if src_size != dst_size or (dst == "bool" and src != "bool"):
        why = "a view as bool (a byte other than 0 or 1 has no bool value)" \
            if src_size == dst_size else "a different element size changes the last dimension"
        raise UnsupportedOpError(f"tvm backend: %{node.name} ({node.target}) views {src} as "
                                 f"{dst}: {why}; the TVM backend bitcasts same-size dtypes")
    if src == dst:
        return x
    if src == "bool":  # TVM's bool is a 1-bit integer in registers: a cast gives its byte
        return importer.block_builder.emit(relax.op.astype(x, dst))
    return importer.block_builder.emit_te(
        lambda t: te.compute(t.shape, lambda *i: tirx.reinterpret(dst, t(*i)), name="bitcast"),
        x, primfunc_name_hint="bitcast")


# --- integer power ---------------------------------------------------------------------------

def _int_pow_func(dtype: str, n: int) -> tirx.PrimFunc:
    """out = x ** y over n elements, wrapping like PyTorch: squaring over y's bits in the
    unsigned type (no signed-overflow UB reaches LLVM); a negative y gives PyTorch's 0, 1 or
    -1. A serial loop with the running values in a local buffer: one TE expression of the
    same steps (a Let per step) took the TIR simplifier minutes to build for int32."""
    signed = not dtype.startswith("u")
    unsigned = "u" + dtype if signed else dtype
    steps = int(dtype.removeprefix("u").removeprefix("int")) - signed  # y >= 0: sign bit 0

    # s_tir with one opaque block: the schedule phase's passes walk blocks, and skip this one
    @T.prim_func(private=True, s_tir=True)
    def int_pow(x: T.Buffer((n,), dtype), y: T.Buffer((n,), dtype), out: T.Buffer((n,), dtype)):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        with T.sblock("int_pow"):
            T.reads(x[0:n], y[0:n])
            T.writes(out[0:n])
            acc = T.alloc_buffer((2,), unsigned, scope="local")  # [result, x ** 2 ** k]
            for i in range(n):
                acc[0] = T.Cast(unsigned, 1)
                acc[1] = T.Cast(unsigned, x[i])
                for k in range(steps):
                    if (y[i] >> T.Cast(dtype, k)) & T.Cast(dtype, 1) != T.Cast(dtype, 0):
                        acc[0] = acc[0] * acc[1]
                    acc[1] = acc[1] * acc[1]
                out[i] = T.Cast(dtype, acc[0])
                if signed and y[i] < T.Cast(dtype, 0):  # 1 ** -n = 1, (-1) ** -n = +-1, else 0
                    out[i] = T.if_then_else(
                        x[i] == T.Cast(dtype, 1), T.Cast(dtype, 1),
                        T.if_then_else(x[i] == T.Cast(dtype, -1),
                                       T.Cast(dtype, 1) - (y[i] & T.Cast(dtype, 1)) * T.Cast(dtype, 2),
                                       T.Cast(dtype, 0)))

    return int_pow


@register_lowering("aten::pow.Tensor_Tensor")
@register_lowering("aten::pow.Tensor_Scalar")
def _pow(node: fx.Node, importer) -> relax.Expr:
    dtype = _out_dtype(node)
    if dtype.startswith(("float", "bfloat")) or dtype == "bool":
        return importer.builtin[node.target.__name__](node)
    _width(dtype, node)
    bb = importer.block_builder
    shape = [int(s) for s in node.meta["val"].shape]
    n = math.prod(shape)
    a, b = (bb.emit(relax.op.reshape(relax.op.broadcast_to(_operand(importer, arg, dtype),
                                                           shape), [n]))
            for arg in node.args[:2])
    func = bb.add_func(_int_pow_func(dtype, n), "int_pow")
    out = bb.emit(relax.call_tir(func, [a, b], relax.TensorType([n], dtype)))
    return bb.emit(relax.op.reshape(out, shape))


# --- clamp -----------------------------------------------------------------------------------

@register_lowering("aten::clamp.Tensor")
@register_lowering("aten::clamp.default")
def _clamp(node: fx.Node, importer) -> relax.Expr:
    dtype = _out_dtype(node)
    lo = node.args[1] if len(node.args) > 1 else node.kwargs.get("min")
    hi = node.args[2] if len(node.args) > 2 else node.kwargs.get("max")
    if dtype.startswith("float") or dtype == "bool" or (lo is not None and hi is not None):
        return importer.builtin[node.target.__name__](node)  # no inf to cast: TVM's is fine
    bb = importer.block_builder
    out = _operand(importer, node.args[0], dtype)
    if lo is not None:
        out = bb.emit(relax.op.maximum(out, _operand(importer, lo, dtype)))
    if hi is not None:
        out = bb.emit(relax.op.minimum(out, _operand(importer, hi, dtype)))
    return out


# --- sinh / cosh -----------------------------------------------------------------------------

def _sinh_cosh(x: te.Tensor, sinh: bool) -> te.Tensor:
    def f(*i):
        v = x(*i)
        c = lambda value: tirx.const(value, x.dtype)
        a = tirx.abs(v)
        e = tirx.exp(a * c(0.5))  # exp(|x|/2): halves are exact, and e * e / 2 overflows
        big = (e * c(0.5)) * e  # exp(|x|) / 2            only where sinh / cosh does
        small = (c(0.5) / e) / e  # exp(-|x|) / 2
        if not sinh:
            return big + small
        # |x| < 0.5: x + x^3/3! + ... + x^13/13! (truncation < 1e-16 relative, fp64 too)
        sq, term, series = v * v, v, v
        for k in range(3, 15, 2):
            term = term * sq * c(1.0 / (k * (k - 1)))
            series = series + term
        far = tirx.Select(v < c(0.0), small - big, big - small)
        return tirx.Select(a < c(0.5), series, far)

    return te.compute(x.shape, f, name="sinh" if sinh else "cosh")


def _hyperbolic(sinh: bool):
    def rule(node: fx.Node, importer) -> relax.Expr:
        x = importer.env[node.args[0]]
        if not _dtype(x).startswith("float"):
            return importer.builtin[node.target.__name__](node)
        return importer.block_builder.emit_te(_sinh_cosh, x, sinh,
                                              primfunc_name_hint="sinh" if sinh else "cosh")
    return rule


register_lowering("aten::sinh.default")(_hyperbolic(True))
register_lowering("aten::cosh.default")(_hyperbolic(False))


# --- split -----------------------------------------------------------------------------------

@register_lowering("aten::split_with_sizes.default")
def _split_with_sizes(node: fx.Node, importer) -> relax.Expr:
    x = importer.env[node.args[0]]
    sizes = [int(s) for s in node.args[1]]
    if all(s > 0 for s in sizes):
        return importer.builtin["split_with_sizes.default"](node)
    dim = (node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)) % x.ty.ndim
    bb, pieces, start = importer.block_builder, [], 0
    for size in sizes:
        pieces.append(bb.emit(relax.op.strided_slice(x, [dim], [start], [start + size])))
        start += size
    return bb.emit(relax.Tuple(pieces))



# --- remainder, log1p ------------------------------------------------------------------------

@register_lowering("aten::remainder.Tensor")
@register_lowering("aten::remainder.Scalar")
def _remainder(node: fx.Node, importer) -> relax.Expr:
    dtype = _out_dtype(node)
    if not dtype.startswith("float"):
        return importer.builtin[node.target.__name__](node)
    bb = importer.block_builder
    a, b = (_operand(importer, arg, dtype) for arg in node.args[:2])
    m = bb.emit(relax.op.mod(a, b))  # fmod: exact, sign of a
    zero = relax.const(0.0, dtype)
    differ = relax.op.logical_xor(relax.op.less(b, zero), relax.op.less(m, zero))  # signs
    fix = bb.emit(relax.op.logical_and(relax.op.not_equal(m, zero), differ))
    return bb.emit(relax.op.where(fix, relax.op.add(m, b), m))


def _log1p_te(x: te.Tensor) -> te.Tensor:
    wide = "float64"

    def f(*i):
        v = tirx.Cast(wide, x(*i))
        c = lambda value: tirx.const(value, wide)
        # |x| < 1/4: log1p(x) = 2 atanh(s), s = x / (2 + x): 2 (s + s^3/3 + ...), 13 terms
        # (s^2 < 0.021: the rest < 1e-21 relative); no 1 + x that drops digits. Beyond 1/4,
        # log(1 + x) is within 2 ulp (|log| > 0.22)
        s = v / (c(2.0) + v)
        t = s * s
        series = c(1.0 / 25)
        for k in range(23, 0, -2):
            series = series * t + c(1.0 / k)
        out = tirx.Select(tirx.abs(v) < c(0.25), c(2.0) * s * series, tirx.log(v + c(1.0)))
        return tirx.Cast(x.dtype, out)

    return te.compute(x.shape, f, name="log1p")


@register_lowering("aten::log1p.default")
def _log1p(node: fx.Node, importer) -> relax.Expr:
    x = importer.env[node.args[0]]
    if not _dtype(x).startswith("float"):
        return importer.builtin[node.target.__name__](node)
    return importer.block_builder.emit_te(_log1p_te, x, primfunc_name_hint="log1p")


@register_lowering("aten::softplus.default")
def _softplus(node: fx.Node, importer) -> relax.Expr:
    """softplus with the accurate log1p (TVM's log(1 + exp(x)) is 1e-3 off at x = -10)."""
    x = importer.env[node.args[0]]
    if not _dtype(x).startswith("float"):
        return importer.builtin[node.target.__name__](node)
    beta = float(node.args[1] if len(node.args) > 1 else node.kwargs.get("beta", 1.0))
    threshold = float(node.args[2] if len(node.args) > 2 else node.kwargs.get("threshold", 20.0))
    bb, dtype = importer.block_builder, _dtype(x)
    bx = bb.emit(relax.op.multiply(x, relax.const(beta, dtype)))
    soft = bb.emit_te(_log1p_te, bb.emit(relax.op.exp(bx)), primfunc_name_hint="log1p")
    soft = relax.op.divide(soft, relax.const(beta, dtype))
    return bb.emit(relax.op.where(relax.op.greater(bx, relax.const(threshold, dtype)), x, soft))
