"""int8 dot-product tensor intrinsics (x86 and AArch64) that LLVM 22 accepts, exact for every
8-bit input, and the table that picks one for a target and operand dtypes.

Each computes C[lanes] (int32) += sum over kp of A[kp] * B[lanes, kp], A broadcast to every
lane, B packed lane-major with kp consecutive k per lane (the int8 rule's weight panels):

    vnni_u8s8     16 x 4   vpdpbusd zmm (AVX-512 VNNI): u8 x s8, four products per lane;
                           TVM's shipped "dot_16x4_vnni" passes int32 vectors where LLVM 22's
                           llvm.x86.avx512.vpdpbusd.512 wants <64 x i8>, and fails to verify.
    vnni_s8u8     16 x 4   the same instruction for s8 A x u8 B (qconv2d's W @ cols)
    vnni_i16      16 x 2   vpdpwssd zmm: both sides widened to int16 first, so any mix of
                           u8/s8 is exact (vpdpbusd only takes u8 x s8)
    avx2_i16       8 x 2   vpmaddwd ymm + vpaddd, widened to int16: exact; the faster
                           vpmaddubsw pair (u8 x s8) saturates in int16 (255*127*2 > 32767)
    neon_usdot     4 x 4   usdot (AArch64 i8mm): u8 x s8, four products per int32 lane
    neon_sdot      4 x 4   sdot (AArch64 dotprod): s8 x s8. graphc's u8 activations reach it
                           as s8 through lower_quant's exact shift (x - 128, zero point - 128)
    neon_udot      4 x 4   udot: u8 x u8

The int16-pair ones read A from an int16 copy of the activations that the schedule makes
once per call, so broadcasting a pair is one load (or an embedded {1to16} operand). The NEON
ones broadcast A's four bytes as one int32, which LLVM turns into the by-element form
(sdot v0.4s, v1.16b, v2.4b[0]).

Registered on first use: parsing TVMScript is slow once torch is imported, and a model without
int8 matmuls should not pay for it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

from tvm.s_tir import TensorIntrin
from tvm.script import tirx as T

from .isa import ISA


@dataclass(frozen=True)
class DotIntrin:
    name: str
    family: str  # a DOTS row's family: what the int8 rule's tile table is keyed by
    lanes: int   # int32 accumulator lanes (one vector register)
    kp: int      # k values per lane per instruction (the weight panel's inner pack)
    widen_a: bool = False  # reads A from an int16 copy of the activations (int8.widen_lhs)


def _desc(lanes: int, kp: int, a_dtype: str, b_dtype: str, a_widened: bool):
    """a_widened: A is an int16 copy of `a_dtype` data; the kernel reads it as the cast back
    that unsafe_set_dtype leaves in the block (int32(a_dtype(A16))), exact by construction."""
    a_buf = "int16" if a_widened else a_dtype

    @T.prim_func(s_tir=True)
    def desc(A: T.Buffer((kp,), a_buf, offset_factor=1),
             B: T.Buffer((lanes, kp), b_dtype, offset_factor=1),
             C: T.Buffer((lanes,), "int32", offset_factor=1, scope="local")):
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:kp], B[0:lanes, 0:kp])
            T.writes(C[0:lanes])
            for i, k in T.grid(lanes, kp):
                with T.sblock("update"):
                    vi, vk = T.axis.remap("SR", [i, k])
                    if a_widened:
                        C[vi] = C[vi] + T.Cast("int32", T.Cast(a_dtype, A[vk])) \
                            * T.Cast("int32", B[vi, vk])
                    else:
                        C[vi] = C[vi] + T.Cast("int32", A[vk]) * T.Cast("int32", B[vi, vk])

    return desc


def _vnni(a_dtype: str, b_dtype: str):
    """vpdpbusd: its first source is the unsigned bytes, its second the signed ones. A (four
    consecutive k, broadcast) is whichever of the two the dtypes say: u8 activations x s8
    weights for qlinear, s8 weights x u8 pixels for qconv2d's W @ cols, whose output so
    comes out in NCHW."""
    @T.prim_func(s_tir=True)
    def impl(A: T.Buffer((4,), a_dtype, offset_factor=1),
             B: T.Buffer((16, 4), b_dtype, offset_factor=1),
             C: T.Buffer((16,), "int32", offset_factor=1, scope="local")):
        with T.sblock("root"):
            T.reads(C[0:16], A[0:4], B[0:16, 0:4])
            T.writes(C[0:16])
            a = T.reinterpret(T.broadcast(T.reinterpret(A.vload([0], f"{a_dtype}x4"),
                                                        dtype="int32"), 16), dtype="int8x64")
            b = T.reinterpret(B.vload([0, 0], f"{b_dtype}x64"), dtype="int8x64")
            unsigned, signed = (a, b) if a_dtype == "uint8" else (b, a)
            C[T.ramp(0, 1, 16)] = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.x86.avx512.vpdpbusd.512"),
                C.vload([0], "int32x16"), unsigned, signed, dtype="int32x16")

    return impl


def _i16_pairs(lanes: int, b_dtype: str, vnni: bool):
    """A is already int16 (widened per call, see int8.widen_lhs): its pair is one int32 to
    broadcast. B is widened here (sign or zero, by dtype); adjacent pairs multiply-add."""
    wide = f"int16x{2 * lanes}"

    @T.prim_func(s_tir=True)
    def impl(A: T.Buffer((2,), "int16", offset_factor=1),
             B: T.Buffer((lanes, 2), b_dtype, offset_factor=1),
             C: T.Buffer((lanes,), "int32", offset_factor=1, scope="local")):
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:2], B[0:lanes, 0:2])
            T.writes(C[0:lanes])
            a = T.reinterpret(T.broadcast(T.reinterpret(A.vload([0], "int16x2"), dtype="int32"),
                                          lanes), dtype=wide)
            b = T.Cast(wide, B.vload([0, 0], f"{b_dtype}x{2 * lanes}"))
            if vnni:
                C[T.ramp(0, 1, lanes)] = T.call_llvm_pure_intrin(
                    T.llvm_lookup_intrinsic_id("llvm.x86.avx512.vpdpwssd.512"),
                    C.vload([0], f"int32x{lanes}"), a, b, dtype=f"int32x{lanes}")
            else:
                C[T.ramp(0, 1, lanes)] = C.vload([0], f"int32x{lanes}") + T.call_llvm_pure_intrin(
                    T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.wd"), a, b,
                    dtype=f"int32x{lanes}")

    return impl


def _neon_dot(instr: str, a_dtype: str, b_dtype: str):
    """sdot / udot / usdot on 128-bit NEON vectors: 4 int32 lanes, 4 byte products each."""

    @T.prim_func(s_tir=True)
    def impl(A: T.Buffer((4,), a_dtype, offset_factor=1),
             B: T.Buffer((4, 4), b_dtype, offset_factor=1),
             C: T.Buffer((4,), "int32", offset_factor=1, scope="local")):
        with T.sblock("root"):
            T.reads(C[0:4], A[0:4], B[0:4, 0:4])
            T.writes(C[0:4])
            a = T.reinterpret(T.broadcast(T.reinterpret(A.vload([0], f"{a_dtype}x4"),
                                                        dtype="int32"), 4),
                              dtype=f"{a_dtype}x16")
            C[T.ramp(0, 1, 4)] = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id(f"llvm.aarch64.neon.{instr}.v4i32.v16i8"),
                C.vload([0], "int32x4"), a, B.vload([0, 0], f"{b_dtype}x16"), dtype="int32x4")

    return impl


@dataclass(frozen=True)
class DotRow:
    family: str
    needs: str                       # the ISA flag the instruction needs (isa.ISA field)
    dtypes: tuple[str, str] | None   # the (A, B) operand dtypes it takes; None: any 8-bit mix
    lanes: int
    kp: int
    impl: Callable[[str, str], object]  # (A dtype, B dtype) -> the TVMScript implementation

    @property
    def widen_a(self) -> bool:
        return self.kp == 2  # the int16-pair instructions


# First row whose flag the target has and whose dtypes match wins: the fastest exact form.
DOTS: list[DotRow] = [
    DotRow("vnni_u8s8", "vnni", ("uint8", "int8"), 16, 4, _vnni),
    DotRow("vnni_s8u8", "vnni", ("int8", "uint8"), 16, 4, _vnni),
    DotRow("vnni_i16", "vnni", None, 16, 2, lambda a, b: _i16_pairs(16, b, vnni=True)),
    DotRow("avx2_i16", "avx2", None, 8, 2, lambda a, b: _i16_pairs(8, b, vnni=False)),
    DotRow("neon_usdot", "i8mm", ("uint8", "int8"), 4, 4,
           lambda a, b: _neon_dot("usdot", a, b)),
    DotRow("neon_sdot", "dotprod", ("int8", "int8"), 4, 4, lambda a, b: _neon_dot("sdot", a, b)),
    DotRow("neon_udot", "dotprod", ("uint8", "uint8"), 4, 4,
           lambda a, b: _neon_dot("udot", a, b)),
]


def _row(isa: ISA, a_dtype: str, b_dtype: str) -> DotRow | None:
    return next((r for r in DOTS if isa.has(r.needs) and r.dtypes in (None, (a_dtype, b_dtype))),
                None)


def dot_intrin(isa: ISA, a_dtype: str, b_dtype: str) -> DotIntrin | None:
    """The registered intrinsic for the target's ISA and operand dtypes; None if it has no
    exact dot-product instruction for them."""
    row = _row(isa, a_dtype, b_dtype)
    return None if row is None else _register(row.family, a_dtype, b_dtype)


def signed_activations(isa: ISA, weights_first: bool = False) -> bool:
    """Whether u8 activations x s8 weights should be fed to the kernels as s8 (x - 128): the
    target multiplies s8 x s8 with a dot instruction but has none for u8 x s8 (dotprod
    without i8mm), or for s8 x u8 when the weights are the left operand (weights_first, as
    in qconv2d's W @ cols). lower_quant folds the shift into the zero-point correction."""
    pair = ("int8", "uint8") if weights_first else ("uint8", "int8")
    return _row(isa, *pair) is None and _row(isa, "int8", "int8") is not None


@cache
def _register(family: str, a_dtype: str, b_dtype: str) -> DotIntrin:
    row = next(r for r in DOTS if r.family == family)
    name = f"graphc_{family}_{a_dtype}_{b_dtype}"
    TensorIntrin.register(name, _desc(row.lanes, row.kp, a_dtype, b_dtype, row.widen_a),
                          row.impl(a_dtype, b_dtype), override=True)
    return DotIntrin(name, family, row.lanes, row.kp, row.widen_a)
