"""int8 x int8 -> int32 matmul (dense, matmul, batch-matmul) on x86 (AVX2, AVX-512 VNNI) and
AArch64 (dotprod, i8mm), with dot-product instructions (intrin.py) in the micro-kernel.

The loop nest is matmul.py's (parallel outer tiles, j0 outside i0, fused epilogue, constant
weights packed at compile time) with an int32 accumulator tile and k grouped by the
instruction's kp:

    for k0 in K/kp:                              acc[r, v*L:(v+1)*L] += X[r, k0*kp:+kp]
        for r in RI, v in NV:                                  . Yp[j0, k0, v*L:(v+1)*L, :]
            dot instruction (L int32 lanes x kp products)

Weights are packed as Yp[N/cols, K/kp, cols, kp] so each instruction reads one contiguous
vector (an activation Y is packed per call). M, N and K are padded to the tile (zeros add
nothing to a dot product); tensorize cannot take a block with a predicate, so unlike the
fp32 rule an M tail pads too. On the int16-pair paths X is widened to int16 once per call.
"""

from __future__ import annotations

import tvm
from tvm import s_tir, tirx
from tvm.s_tir import dlight

from . import layout
from . import matmul as mm_rule
from .common import RULE_MARK
from .intrin import DotIntrin, dot_intrin
from .isa import isa_of

INT8 = ("int8", "uint8")

# Micro-kernel rows RI for NV accumulator vectors per row, by instruction family: RI*NV
# accumulators, NV weight vectors (widened to int16 on the i16 paths) and a broadcast must
# fit the register file. Measured at 1024x384x1536 (noisy, 2 shared cores): VNNI tiles from
# 3x6 to 12x2 within 5% of each other; AVX2 6x2 ~10% ahead of 2x4 and 4x2. NEON: 32 q
# registers hold 24 accumulators + NV weight vectors + the broadcast row (not measured on a
# board; the register budget is the same as VNNI's).
_NEON = {4: 6, 3: 8, 2: 12, 1: 16}                  # 32 q registers, 4 int32 lanes
TILES: dict[str, dict[int, int]] = {
    "vnni_u8s8": {4: 6, 3: 8, 2: 12, 1: 16},        # 32 zmm, 16 int32 lanes
    "vnni_s8u8": {4: 6, 3: 8, 2: 12, 1: 16},
    "vnni_i16": {4: 6, 3: 8, 2: 12, 1: 16},
    "avx2_i16": {2: 6, 1: 8},                       # 16 ymm, 8 int32 lanes
    "neon_usdot": _NEON, "neon_sdot": _NEON, "neon_udot": _NEON,
}


def schedule_int8(sch: s_tir.Schedule, func, mm, shape: mm_rule.Matmul, tile: mm_rule.Tile,
                  intrin: DotIntrin) -> None:
    multiples = {shape.i: tile.rows, shape.j: tile.cols, shape.k: intrin.kp}
    out, copies = mm_rule.prepare_output(sch, mm, shape, multiples, tile.lanes)
    if intrin.widen_a:
        widen_lhs(sch, mm, shape, copies)
    # the instruction reads kp consecutive k per lane: activations get packed too, per call
    packed = mm_rule.pack_or_copy(sch, func, mm, shape, copies, tile.cols, intrin.kp,
                                  tile.lanes, pack_activations=True)
    outer, (ei, ej) = mm_rule.tile_outer(sch, out, shape, tile)
    sch.compute_at(mm, outer, preserve_unit_loops=True)
    sch.annotate(mm, RULE_MARK, f"int8 {tile.rows}x{tile.vecs}x{tile.lanes} {intrin.name}"
                 + (" packed" if packed else ""))
    i, j, k = sch.get_loops(mm)[-3:]
    k0, kp = sch.split(k, [None, intrin.kp])
    jv, lane = sch.split(j, [tile.vecs, tile.lanes])
    sch.reorder(k0, i, jv, lane, kp)
    sch.unroll(i)
    sch.unroll(jv)
    init = sch.decompose_reduction(mm, k0)
    sch.tensorize(lane, intrin.name)
    mm_rule.vectorize_tile(sch, ei, ej, tile)
    mm_rule.vectorize_init(sch, init)


def widen_lhs(sch: s_tir.Schedule, mm, shape: mm_rule.Matmul, copies: dict) -> None:
    """The int16-pair instructions want X's pair (x[k], x[k+1]) as int16s in one int32 to
    broadcast: widen X once per call (a copy of M*K) so that is a single broadcast load
    instead of load + sign-extend + broadcast per row and k pair (~4 instructions)."""
    copy = next((b for buf, b in copies.items() if buf.same_as(shape.lhs)), None)
    if copy is None:
        copy = sch.cache_read(mm, layout.read_index(sch, mm, shape.lhs), "global")
        copies[shape.lhs] = copy
    sch.unsafe_set_dtype(copy, 0, "int16")  # exact: int16 holds every int8 and uint8 value


class Int8MatmulRule(dlight.ScheduleRule):
    """int8/uint8 operands accumulating in int32, where the target has a dot instruction for
    them (intrin.DOTS): x86 AVX2 / AVX-512 VNNI, AArch64 dotprod / i8mm."""

    def apply(self, func, target: tvm.target.Target, _tunable: bool):
        if not isinstance(func, tirx.PrimFunc):
            return None
        isa = isa_of(target)
        sch = s_tir.Schedule(func)
        mm = mm_rule.find_reduction(sch)
        if mm is None or not mm_rule.inline_prologue(sch, mm):
            return None
        shape = mm_rule.match_matmul(sch, mm, INT8, out_dtype="int32")
        if shape is None:
            return None
        intrin = dot_intrin(isa, str(shape.lhs.dtype), str(shape.rhs.dtype))
        if intrin is None:
            return None
        tile = mm_rule.choose_tile(TILES[intrin.family], intrin.lanes, shape.m, shape.n)
        schedule_int8(sch, func, mm, shape, tile, intrin)
        return sch
