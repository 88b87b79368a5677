"""graphc's overrides of TVM's op legalizations (Relax op -> TE/TIR), keyed by Relax op name.

Passed to relax.transform.LegalizeOps(customize_legalize_map=LEGALIZATIONS); every op not
listed keeps TVM's own rule.
"""

from __future__ import annotations

import math

import tvm
from tvm import relax, te, tirx, topi
from tvm.relax.transform.legalize_ops.nn import _nn_gelu as tvm_gelu


def gelu_fast_erf(bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr:
    """GELU with topi.fast_erf: TVM's rule calls libm erff per element (scalar, no SIMD),
    which cost more than the matmul before it (measured 13 ms vs 1.1 ms per 1M elements
    here). fast_erf is a rational approximation: max abs error 3.7e-7 over [-6, 6] in fp32."""
    if call.args[0].ty.dtype != "float32":
        return tvm_gelu(bb, call)  # fast_erf's coefficients are fit for fp32

    def te_gelu(x: te.Tensor) -> te.Tensor:
        half = tirx.const(0.5, "float32")
        erf = topi.fast_erf(x * tirx.const(0.5**0.5, "float32"))
        return x * (half + erf * half)

    return bb.call_te(te_gelu, call.args[0], primfunc_name_hint="gelu")


def softmax_fast_exp(bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr:
    """Softmax with topi.fast_exp: TVM's rule calls libm expf per element (scalar), which made
    a 12x128x128 softmax 7x slower than onnxruntime. fast_exp's relative error is ~1e-6 on
    the [-20, 0] that softmax feeds it (x - max)."""
    if call.args[0].ty.dtype != "float32":
        return bb.call_te(topi.nn.softmax, call.args[0], call.attrs.axis)
    return bb.call_te(topi.nn.fast_softmax, call.args[0], call.attrs.axis,
                      primfunc_name_hint="softmax")


def full_nonfinite(bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr:
    """relax.full / full_like with an inf or NaN fill: TVM's rule hands topi.full the dtype as
    a PrimType, and topi's inf/NaN check (`"float" in dtype`) raised TypeError, so a -inf fill
    (attention masks, a max over an empty axis) failed to compile. Finite fills: TVM's rule."""
    value = getattr(call.args[1], "value", None)  # a constant's value: a scalar or a Tensor
    if isinstance(value, tvm.runtime.Tensor) and value.ndim == 0:
        value = value.numpy()[()].item()
    if not isinstance(value, float) or math.isfinite(value):
        return tvm.ir.Op.get(call.op.name).get_attr("FLegalize")(bb, call)
    dtype = str(call.ty.dtype)
    if not dtype.startswith(("float", "bfloat")):
        raise ValueError(f"{call.op.name}: fill {value} needs a floating-point dtype, not {dtype}")
    shape = call.args[0].ty.shape if call.op.name == "relax.full_like" else call.args[0]
    return bb.call_te(lambda: te.compute(list(shape.values), lambda *_: tirx.const(value, dtype)),
                      primfunc_name_hint="full")


def _nan_extreme(is_max: bool):
    """The combiner of a NaN-propagating max or min: NaN wins, as in PyTorch (isnan, since
    a != a could be simplified away)."""
    pick = tirx.max if is_max else tirx.min

    def combine(a, b):
        return tirx.Select(tirx.isnan(a), a, tirx.Select(tirx.isnan(b), b, pick(a, b)))
    return combine


def _register_reducers() -> None:
    """Tell TVM's rfactor about the two reducers, so the reduction schedule rules (vectors of
    partial maxima, schedules/reduction.py) still apply to them: rfactor only splits reducers
    it recognizes, and dynamic quantization takes a min and a max of every quantized input."""
    register = tvm.get_global_func("s_tir.schedule.RegisterReducer")
    for name, combine, inf in (("max", _nan_extreme(True), -math.inf),
                               ("min", _nan_extreme(False), math.inf)):
        # Held by TVM's global function table too, which is never destroyed: the reducer
        # registry is, at process exit, and dropping the last reference to a Python
        # callback after the interpreter has finalized corrupts the heap.
        tvm.register_global_func(f"graphc.nan_{name}.combiner", override=True)(
            lambda x, y, c=combine: [c(x[0], y[0])])
        tvm.register_global_func(f"graphc.nan_{name}.identity", override=True)(
            lambda values, v=inf: [tirx.const(v, str(values[0].ty.dtype))])
        register(1, tvm.get_global_func(f"graphc.nan_{name}.combiner"),
                 tvm.get_global_func(f"graphc.nan_{name}.identity"))


_register_reducers()


def _extreme(x: te.Tensor, axis, keepdims: bool, is_max: bool) -> te.Tensor:
    ndim = len(x.shape)
    reduced = sorted({int(a) % ndim for a in axis}) if axis is not None else list(range(ndim))
    reducer = te.comm_reducer(_nan_extreme(is_max),
                              lambda t: tirx.const(-math.inf if is_max else math.inf, t),
                              name="nan_max" if is_max else "nan_min")
    k = {a: te.reduce_axis((0, x.shape[a]), f"k{a}") for a in reduced}
    shape = [1 if a in k else n for a, n in enumerate(x.shape) if keepdims or a not in k]

    def body(*idx):
        it, index = iter(idx), []
        for a in range(ndim):
            if a in k and keepdims:
                next(it)
            index.append(k[a] if a in k else next(it))
        return reducer(x[tuple(index)], axis=[k[a] for a in reduced])

    return te.compute(shape, body, name="max" if is_max else "min")


def float_max_min(is_max: bool):
    """relax.max / relax.min over floats: TVM reduces from the lowest finite float (a row of
    -inf gave -3.4e38, so the expanded ONNX Attention's `max(mask) == -inf` test for a fully
    masked row failed and its NaN softmax went through) and drops NaN. Identity +-inf, and a
    NaN propagates, as in PyTorch. Other dtypes: TVM's rule."""
    def rule(bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr:
        x = call.args[0]
        if not str(x.ty.dtype).startswith("float"):
            return tvm.ir.Op.get(call.op.name).get_attr("FLegalize")(bb, call)
        return bb.call_te(_extreme, x, call.attrs.axis, bool(call.attrs.keepdims), is_max,
                          primfunc_name_hint="max" if is_max else "min")
    return rule


LEGALIZATIONS = {
    "relax.max": float_max_min(True),
    "relax.min": float_max_min(False),
    "relax.full": full_nonfinite,
    "relax.full_like": full_nonfinite,
    "relax.nn.gelu": gelu_fast_erf,
    "relax.nn.softmax": softmax_fast_exp,
}
