"""2-D max/avg pooling (NCHW): a window reduction per output pixel, with TOPI's padding copy
before it and, for avg pooling, the divide (and whatever FuseOps added) after it.

The output row is cut into vectors; for each vector the window taps accumulate into one
register (compute_at under the output tile), so the reduction runs on vectors of output
columns, parallel over (batch, channel, row). Global average pooling is a `mean` and goes to
the reduction rule instead.
"""

from __future__ import annotations

import tvm
from tvm import s_tir
from tvm.s_tir import dlight

from .common import RULE_MARK, cpu_kernel, root_blocks
from .elementwise import MIN_PARALLEL, parallel_rows
from .isa import isa_of


class Pool2D(dlight.ScheduleRule):
    """TOPI pool2d kernels (pool_max / pool_sum blocks) on LLVM CPU targets."""

    def apply(self, func, target: tvm.target.Target, _tunable: bool):
        if not cpu_kernel(func, target):
            return None
        sch = s_tir.Schedule(func)
        blocks = root_blocks(sch)
        kinds = [[int(v.iter_type) for v in sch.get(b).iter_vars] for b in blocks]
        pools = [i for i, b in enumerate(blocks)
                 if sch.get(b).name_hint in ("pool_max", "pool_sum") and kinds[i] == [0] * 4 + [2] * 2]
        if len(pools) != 1 or pools[0] > 1 or any(2 in k for k in kinds[pools[0] + 1:]):
            return None
        pool = blocks[pools[0]]
        ext = [int(v.dom.extent) for v in sch.get(pool).iter_vars]
        after = blocks[pools[0] + 1:]
        if any([int(v.dom.extent) for v in sch.get(b).iter_vars] != ext[:4] for b in after):
            return None  # something of another shape after the pool: not this rule's kernel
        lanes = isa_of(target).f32_lanes
        taps = ext[0] * ext[1] * ext[2] * ext[3] * ext[4] * ext[5]  # work, for the pool's wake-up
        if pools[0] == 1:
            pad = blocks[0]
            if _has_if(sch.get(pad)):
                # padding copy: its own (parallel) stage
                parallel_rows(sch, pad, lanes, taps >= MIN_PARALLEL)
            else:
                sch.compute_inline(pad)
        schedule_window(sch, pool, after, ext[3], lanes, taps)
        return sch


def schedule_window(sch: s_tir.Schedule, pool, after: list, ow: int, lanes: int,
                    taps: int) -> None:
    """Output tiles of one row x `vb` columns; the window loops run outside the vector."""
    if after:
        for b in after[:-1]:
            sch.compute_inline(b)
        out = after[-1]
    else:
        out = sch.cache_write(pool, 0, "global")
    vb = min(lanes, ow)
    n, c, h, w = sch.get_loops(out)
    w0, w1 = sch.split(w, [None, vb])
    rows = sch.fuse(n, c, h)
    if taps >= MIN_PARALLEL:
        sch.parallel(rows)
    sch.compute_at(pool, w0, preserve_unit_loops=True)
    cw, kh, kw = sch.get_loops(pool)[-3:]
    sch.reorder(kh, kw, cw)
    sch.unroll(kw)
    if vb > 1:
        sch.vectorize(cw)
        sch.vectorize(w1)
    sch.decompose_reduction(pool, kh)
    sch.annotate(out, RULE_MARK, "pool2d")


def _has_if(block_stmt) -> bool:
    return bool(tvm.get_global_func("s_tir.schedule.HasIfThenElse")(block_stmt))
