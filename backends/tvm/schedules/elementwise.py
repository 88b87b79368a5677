"""Injective kernels (elementwise math, broadcasts, transposes, reshapes that copy, padding,
gathers, GELU when it is not fused into a matmul): the last rule in the table, so no kernel
stays a serial scalar loop nest.

Every block but the outputs is inlined into its consumer; each remaining block runs as one
parallel loop over its outer dimensions with the innermost ones split into vectors.
Transposes keep their strided reads (LLVM gathers them); the stores are contiguous, except
where the output's last axis is narrower than a vector (schedule_narrow_transpose).
"""

from __future__ import annotations

import tvm
from tvm import s_tir
from tvm.s_tir import dlight
from tvm.s_tir.schedule import ScheduleError

from .common import RULE_MARK, cpu_kernel, loop_extent, root_blocks
from .isa import isa_of

# Below this many elements a kernel runs on one thread: waking the pool costs more (a few
# microseconds) than the copy.
MIN_PARALLEL = 16384


class Injective(dlight.ScheduleRule):
    """Kernels whose blocks are all spatial (no reduction) on LLVM CPU targets."""

    def apply(self, func, target: tvm.target.Target, _tunable: bool):
        if not cpu_kernel(func, target):
            return None
        sch = s_tir.Schedule(func)
        blocks = root_blocks(sch)
        if not blocks or any(int(v.iter_type) != 0 for b in blocks for v in sch.get(b).iter_vars):
            return None
        for b in blocks[:-1]:
            _try_inline(sch, b)
        lanes = isa_of(target).f32_lanes
        for b in root_blocks(sch):
            sch.annotate(b, RULE_MARK, "injective")
            if not (schedule_padding(sch, b, lanes) or schedule_narrow_transpose(sch, b, lanes)):
                parallel_vectorize(sch, b, lanes)
        return sch


def schedule_padding(sch: s_tir.Schedule, block, lanes: int) -> bool:
    """A padding copy (`if_then_else(in bounds, x[...], c)` over the last two axes): per
    plane, fill it with the constant, then copy the in-bound rows without a bounds test
    (decompose_padding), both as vectors. Vectorized as one block, the bounds test turned
    every element into a scalar load (960x9x9 pad: ~0.25 ms). Returns False when `block`
    is not such a copy."""
    loops = sch.get_loops(block)
    extents = [loop_extent(sch, lp) for lp in loops]
    if len(loops) < 3 or None in extents or not sch.can_decompose_padding(block, loops[-2]):
        return False
    outer = sch.fuse(*loops[:-2]) if len(loops) > 3 else loops[0]
    fill = sch.decompose_padding(block, loops[-2])
    for b in (fill, block):
        row = sch.get_loops(b)[-1]
        width = loop_extent(sch, row)
        if width is not None and width > 1:
            _, vec = sch.split(row, [None, min(lanes, width)])
            sch.vectorize(vec)
    if _product(extents) >= MIN_PARALLEL:
        sch.parallel(outer)
    return True


def schedule_narrow_transpose(sch: s_tir.Schedule, block, lanes: int) -> bool:
    """A copy whose output's last axis is narrower than a vector and comes from the source's
    contiguous axis one level up (NCHW -> NHWC of an RGB image: out[h, w, c] = x[c, h, w]):
    parallel over the outer axes; per c (unrolled) a contiguous vector load along w and a
    strided store. Fusing (w, c) into vectors instead made every lane a gather with a
    division by 3 (MobileNetV2's 3x224x224 input: 0.12 -> 0.027 ms). A row that is not a
    whole number of vectors keeps a plain w loop (LLVM vectorizes it: 0.038 ms). Returns
    False when `block` is not such a copy."""
    loops = sch.get_loops(block)
    extents = [loop_extent(sch, lp) for lp in loops]
    if len(loops) < 2 or None in extents or extents[-1] >= lanes or extents[-2] < lanes:
        return False
    stmt = sch.get(block)
    load = stmt.body.value if isinstance(stmt.body, tvm.tirx.BufferStore) else None
    if not isinstance(load, tvm.ir.expr.TensorLoad) or \
            not load.indices[-1].same_as(stmt.iter_vars[-2].var):
        return False
    narrow = loops[-1]
    if extents[-2] % lanes == 0:
        w0, w1 = sch.split(loops[-2], [None, lanes])
        sch.reorder(w0, narrow, w1)
        sch.vectorize(w1)
    sch.unroll(narrow)
    if len(loops) > 2 and _product(extents) >= MIN_PARALLEL:
        sch.parallel(sch.fuse(*loops[:-2]))
    return True


def parallel_rows(sch: s_tir.Schedule, block, lanes: int, parallel: bool = True) -> None:
    """Parallel over all axes but the last, vectors along the last (a padding copy inside a
    conv or pool kernel: LLVM turns its bounds test into zero-filled row edges and whole
    vector row copies, measured faster there than decompose_padding's fill-then-copy)."""
    loops = sch.get_loops(block)
    if len(loops) > 1:
        outer = sch.fuse(*loops[:-1])
        if parallel:
            sch.parallel(outer)
    width = loop_extent(sch, loops[-1])
    if width is not None and width > 1:
        _, vec = sch.split(loops[-1], [None, min(lanes, width)])
        sch.vectorize(vec)


def _product(values) -> int:
    out = 1
    for v in values:
        out *= v
    return out


def parallel_vectorize(sch: s_tir.Schedule, block, lanes: int) -> None:
    """One parallel loop over the outer dimensions, the inner ones fused until they fill a
    vector, then split into vectors of `lanes` elements (a tail loop where it does not
    divide)."""
    loops = sch.get_loops(block)
    extents = [loop_extent(sch, lp) for lp in loops]
    if not loops or any(e is None for e in extents):
        return  # symbolic shapes: leave the loop nest alone
    k = len(loops) - 1  # fuse innermost loops until they hold a whole vector
    inner = extents[k]
    while k > 0 and inner < lanes:
        k -= 1
        inner *= extents[k]
    vec_loop = sch.fuse(*loops[k:]) if k < len(loops) - 1 else loops[k]
    outer = loops[:k]
    vec_width = min(lanes, inner)
    _, vec = sch.split(vec_loop, [None, vec_width])
    if vec_width > 1:
        sch.vectorize(vec)
    total = 1
    for e in extents:
        total *= e
    if outer and total >= MIN_PARALLEL:
        sch.parallel(sch.fuse(*outer) if len(outer) > 1 else outer[0])
    elif not outer and total >= MIN_PARALLEL:
        rest = sch.get_loops(block)[-2]  # the vector loop's outer part
        sch.parallel(rest)


def _try_inline(sch: s_tir.Schedule, block) -> None:
    try:
        sch.compute_inline(block)
    except ScheduleError:
        try:
            sch.reverse_compute_inline(block)
        except ScheduleError:
            pass  # an output of the kernel, or read in a way that cannot be inlined

