"""Vector lanes that read every second input column: stride-2 depthwise convs.

A vectorized loop over output columns x reads input column 2x + r. TVM's LLVM codegen turns
such a stride-2 ramp load into one scalar load and one `vinsertps` per lane (630 of them in a
3x3 depthwise kernel), which made MobileNetV2's stride-2 depthwise convs 2.8x slower than
onnxruntime's. These tensor intrinsics replace the lane loop with two contiguous vector loads
and one shuffle that keeps the even elements (`vpermt2ps` on AVX-512, `uzp1` on NEON):

    lanes  0 .. L-1  of  A[0 : L]  ++  A[L-1 : 2L-1]   ->   A[0], A[2], ..., A[2L-2]

The second load starts at L-1, not L, so nothing past the last element the loop reads
(A[2L-2]) is touched. Registered on first use per (op, lanes, dtype), like intrin.py.

    fma   C[i] += A[2i] * B[0]    depthwise conv: one tap, one weight broadcast

Max pooling does not use it: a `max` row tried on ResNet-18's 3x3/2 pool (64x113x113) ran
0.177 ms against 0.152 ms for the scalar-insert loads.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache

import tvm
from tvm import tirx
from tvm.s_tir import TensorIntrin
from tvm.script import tirx as T

STRIDE = 2


def _even_lanes(a, lanes: int):
    """A[0], A[2], ..., A[2L-2] from two contiguous loads (see the module docstring)."""
    idx = [2 * i if 2 * i < lanes else 2 * i + 1 for i in range(lanes)]
    return T.Shuffle([a[T.ramp(0, 1, lanes)], a[T.ramp(lanes - 1, 1, lanes)]], idx)


def _fma(lanes: int, dtype: str):
    n = 2 * lanes - 1

    @T.prim_func(s_tir=True)
    def desc(A: T.Buffer((n,), dtype, offset_factor=1), B: T.Buffer((1,), dtype, offset_factor=1),
             C: T.Buffer((lanes,), dtype, offset_factor=1)):
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:n], B[0:1])
            T.writes(C[0:lanes])
            for i in T.serial(lanes):
                with T.sblock("update"):
                    vi = T.axis.remap("S", [i])
                    C[vi] = C[vi] + A[vi * 2] * B[0]

    @T.prim_func(s_tir=True)
    def impl(A: T.Buffer((n,), dtype, offset_factor=1), B: T.Buffer((1,), dtype, offset_factor=1),
             C: T.Buffer((lanes,), dtype, offset_factor=1)):
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:n], B[0:1])
            T.writes(C[0:lanes])
            C[T.ramp(0, 1, lanes)] = (C[T.ramp(0, 1, lanes)]
                                      + _even_lanes(A, lanes) * T.broadcast(B[0], lanes))

    return desc, impl


OPS: dict[str, Callable] = {"fma": _fma}


@cache
def intrin(op: str, lanes: int, dtype: str = "float32") -> str:
    """The registered intrinsic's name for `op` on `lanes` output columns."""
    name = f"graphc_stride2_{op}_{dtype}x{lanes}"
    TensorIntrin.register(name, *OPS[op](lanes, dtype))
    return name


def applies(stride: int, width: int, lanes: int, dtype: str) -> bool:
    """Stride 2, whole vectors along the row (tensorize takes no predicated tail), float
    data (integer convs accumulate through casts the fma pattern does not have)."""
    return stride == STRIDE and lanes > 1 and width % lanes == 0 and dtype.startswith("float")


def column_stride(index, var) -> int:
    """The coefficient of the output column `var` in an input column index (x*stride + r*dil),
    0 when the index is not linear in it."""
    coeffs = tvm.sym.detect_linear_equation(index, [var])
    return int(coeffs[0]) if len(coeffs) == 2 and isinstance(coeffs[0], tirx.IntImm) else 0
