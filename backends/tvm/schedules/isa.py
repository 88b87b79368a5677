"""What the target CPU offers the schedules: vector width and the dot-product extensions.

Schedules pick tile sizes from these facts, never from the build machine, so a target given
in full (say znver3 on a Zen 4 host) gets code for that CPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import tvm
from tvm.target import codegen


@dataclass(frozen=True)
class ISA:
    f32_lanes: int      # fp32 lanes in one vector register: 16 (AVX-512), 8 (AVX2), 4 (SSE/NEON)
    vector_regs: int    # architectural vector registers: 32 (AVX-512), 16 (AVX2)
    fma: bool
    avx512: bool
    vnni: bool          # AVX-512 VNNI (vpdpbusd on zmm)
    avx_vnni: bool      # AVX-VNNI (vpdpbusd on ymm)
    cores: int


def isa_of(target: tvm.target.Target) -> ISA:
    return _isa(str(target))


@lru_cache(maxsize=16)
def _isa(target_str: str) -> ISA:
    target = tvm.target.Target(target_str)

    def has(feature: str) -> bool:
        return bool(codegen.target_has_features(feature, target))

    avx512 = has("avx512f")
    avx2 = has("avx2")
    lanes = 16 if avx512 else 8 if avx2 else 4
    cores = int(target.attrs.get("num-cores", 1) or 1)
    return ISA(f32_lanes=lanes, vector_regs=32 if avx512 else 16, fma=has("fma"),
               avx512=avx512, vnni=avx512 and has("avx512vnni"), avx_vnni=has("avxvnni"),
               cores=cores)
