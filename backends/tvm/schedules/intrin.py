"""x86 int8 dot-product tensor intrinsics that LLVM 22 accepts, exact for every 8-bit input.

Each computes C[lanes] (int32) += sum over kp of A[kp] * B[lanes, kp], A broadcast to every
lane, B packed lane-major with kp consecutive k per lane (the int8 rule's weight panels):

    vnni_u8s8     16 x 4   vpdpbusd zmm (AVX-512 VNNI): u8 x s8, four products per lane;
                           TVM's shipped "dot_16x4_vnni" passes int32 vectors where LLVM 22's
                           llvm.x86.avx512.vpdpbusd.512 wants <64 x i8>, and fails to verify.
    vnni_i16      16 x 2   vpdpwssd zmm: both sides widened to int16 first, so any mix of
                           u8/s8 is exact (vpdpbusd only takes u8 x s8)
    avx2_i16       8 x 2   vpmaddwd ymm + vpaddd, widened to int16: exact; the faster
                           vpmaddubsw pair (u8 x s8) saturates in int16 (255*127*2 > 32767)

The int16-pair ones read A from an int16 copy of the activations that the schedule makes
once per call, so broadcasting a pair is one load (or an embedded {1to16} operand).

Registered on first use: parsing TVMScript is slow once torch is imported, and a model without
int8 matmuls should not pay for it.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

from tvm.s_tir import TensorIntrin
from tvm.script import tirx as T


@dataclass(frozen=True)
class DotIntrin:
    name: str
    family: str  # vnni_u8s8 / vnni_i16 / avx2_i16: what the int8 rule's tile table is keyed by
    lanes: int   # int32 accumulator lanes (one vector register)
    kp: int      # k values per lane per instruction (the weight panel's inner pack)


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


def _vnni_u8s8():
    @T.prim_func(s_tir=True)
    def impl(A: T.Buffer((4,), "uint8", offset_factor=1),
             B: T.Buffer((16, 4), "int8", offset_factor=1),
             C: T.Buffer((16,), "int32", offset_factor=1, scope="local")):
        with T.sblock("root"):
            T.reads(C[0:16], A[0:4], B[0:16, 0:4])
            T.writes(C[0:16])
            a = T.reinterpret(T.broadcast(T.reinterpret(A.vload([0], "uint8x4"), dtype="int32"),
                                          16), dtype="int8x64")
            C[T.ramp(0, 1, 16)] = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.x86.avx512.vpdpbusd.512"),
                C.vload([0], "int32x16"), a, B.vload([0, 0], "int8x64"), dtype="int32x16")

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


def dot_intrin(kind: str, a_dtype: str, b_dtype: str) -> DotIntrin:
    """The intrinsic for an ISA class ("vnni" or "avx2") and operand dtypes, registered. The
    int16-pair ones (kp=2) read A from an int16 copy the schedule makes (int8.widen_lhs)."""
    if kind == "vnni" and (a_dtype, b_dtype) == ("uint8", "int8"):
        return _register("vnni_u8s8", 16, 4, a_dtype, b_dtype)
    if kind == "vnni":
        return _register("vnni_i16", 16, 2, a_dtype, b_dtype)
    return _register("avx2_i16", 8, 2, a_dtype, b_dtype)


@cache
def _register(family: str, lanes: int, kp: int, a_dtype: str, b_dtype: str) -> DotIntrin:
    name = f"graphc_{family}_{a_dtype}_{b_dtype}"
    if family == "vnni_u8s8":
        impl = _vnni_u8s8()
    else:
        impl = _i16_pairs(lanes, b_dtype, vnni=family == "vnni_i16")
    TensorIntrin.register(name, _desc(lanes, kp, a_dtype, b_dtype, a_widened=kp == 2), impl,
                          override=True)
    return DotIntrin(name, family, lanes, kp)
