"""What the target CPU offers the schedules: vector width and the dot-product extensions.

Schedules pick tile sizes from these facts, never from the build machine, so a target given
in full (say znver3 on a Zen 4 host) gets code for that CPU, and "arm" gets aarch64's.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import tvm
from tvm.target import codegen

# The widest vector unit the target has, first match: LLVM feature -> (fp32 lanes, vector
# registers). AArch64 has 32 128-bit NEON registers; x86 without AVX-512 has 16.
VECTOR_UNITS: list[tuple[str, int, int]] = [
    ("avx512f", 16, 32),
    ("avx2", 8, 16),
    ("neon", 4, 32),
]
SCALAR_FALLBACK = (4, 16)  # SSE (x86-64-v2) or an unknown CPU


@dataclass(frozen=True)
class ISA:
    f32_lanes: int      # fp32 lanes in one vector register: 16 (AVX-512), 8 (AVX2), 4 (SSE/NEON)
    vector_regs: int    # architectural vector registers: 32 (AVX-512, NEON), 16 (AVX2, SSE)
    fma: bool
    avx512: bool
    avx2: bool
    vnni: bool          # AVX-512 VNNI (vpdpbusd on zmm)
    avx_vnni: bool      # AVX-VNNI (vpdpbusd on ymm)
    neon: bool          # AArch64 Advanced SIMD
    dotprod: bool       # AArch64 sdot/udot (armv8.2-a dotprod)
    i8mm: bool          # AArch64 usdot, smmla/ummla/usmmla (armv8.6-a i8mm)
    cores: int

    def has(self, feature: str) -> bool:
        """A boolean field by name (the intrinsic table names what each row needs)."""
        return bool(getattr(self, feature))


def isa_of(target: tvm.target.Target) -> ISA:
    return _isa(str(target))


@lru_cache(maxsize=16)
def _isa(target_str: str) -> ISA:
    target = tvm.target.Target(target_str)

    def has(feature: str) -> bool:
        return bool(codegen.target_has_features(feature, target))

    lanes, regs = next(((lanes, regs) for f, lanes, regs in VECTOR_UNITS if has(f)),
                       SCALAR_FALLBACK)
    avx512 = has("avx512f")
    cores = int(target.attrs.get("num-cores", 1) or 1)
    return ISA(f32_lanes=lanes, vector_regs=regs, fma=has("fma") or has("neon"),
               avx512=avx512, avx2=has("avx2"), vnni=avx512 and has("avx512vnni"),
               avx_vnni=has("avxvnni"), neon=has("neon"), dotprod=has("dotprod"),
               i8mm=has("i8mm"), cores=cores)
