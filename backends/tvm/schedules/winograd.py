"""The Winograd output transform (winograd.py) with the conv's fused epilogue.

FuseOps puts the epilogue that followed the conv (bias, batch-norm arithmetic, ReLU,
residual add) after the output transform in one kernel. The epilogue blocks are inlined
into the transform's output block, which then runs per tile and channel vector: A^T's
combinations unrolled on registers, each output pixel stored once, epilogue applied.
"""

from __future__ import annotations

import tvm
from tvm import s_tir
from tvm.s_tir import dlight

from .common import RULE_MARK, cpu_kernel, loop_extent, root_blocks
from .isa import isa_of

OUTPUT, ROWS = "winograd_output", "winograd_out_rows"


class WinogradOutput(dlight.ScheduleRule):
    """Kernels whose blocks are the output transform's two plus inlinable epilogue blocks."""

    def apply(self, func, target: tvm.target.Target, _tunable: bool):
        if not cpu_kernel(func, target):
            return None
        sch = s_tir.Schedule(func)
        blocks = root_blocks(sch)
        names = [sch.get(b).name_hint for b in blocks]
        if names[:2] != [ROWS, OUTPUT]:
            return None
        for block in blocks[2:]:  # the epilogue, in order: each reads the block before it
            sch.reverse_compute_inline(block)
        out = sch.get_sblock(OUTPUT)
        schedule_output(sch, out, isa_of(target).f32_lanes)
        sch.annotate(out, RULE_MARK, "winograd.output")
        return sch


def vector_width(c: int, lanes: int) -> int:
    """The widest vector (lanes, lanes/2, .., 1) that divides c: no tail predicate."""
    v = lanes
    while c % v:
        v //= 2
    return v


def schedule_output(sch: s_tir.Schedule, out, lanes: int) -> None:
    """Parallel over tiles; per tile and channel vector, A^T's two 1-D transforms unrolled
    on registers, the fused epilogue (already inlined into `out`) applied per pixel."""
    rows = sch.get_producers(out)[0]
    m = loop_extent(sch, sch.get_loops(rows)[0])
    b, y, x, ch = sch.get_loops(out)
    ty, i = sch.split(y, [None, m])
    tx, j = sch.split(x, [None, m])
    per_tile(sch, rows, out, (b, ty, tx), (i, j), ch, lanes)


def per_tile(sch: s_tir.Schedule, rows, block, tile, inner, ch, lanes: int) -> None:
    """Both transforms' loop nest: the tile loops fused and parallel; per tile and channel
    vector, `rows` (the first 1-D transform) computed for the tile, then `block` (the
    second), every position loop unrolled, so each Select arm's condition is a constant."""
    c0, c1 = sch.split(ch, [None, vector_width(loop_extent(sch, ch), lanes)])
    sch.reorder(*tile, c0, *inner, c1)
    sch.parallel(sch.fuse(*tile))
    sch.compute_at(rows, c0, preserve_unit_loops=True)
    for blk in (rows, block):
        loops = sch.get_loops(blk)
        for lp in loops[2:-1]:
            sch.unroll(lp)
        sch.vectorize(loops[-1])
