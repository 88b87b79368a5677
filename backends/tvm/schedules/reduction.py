"""Row reductions: softmax, layer norm, RMS norm, mean/sum over trailing axes (global average
pooling), each with the elementwise work around it, as one parallel loop over rows.

Every block shares the leading spatial axes (the rows); reductions run over the trailing
axes. Under each row every stage is vectorized, the reductions too: the reduction axis is
split into vectors and rfactor'ed, so a vector of partial sums (or maxima) accumulates in
one register and only `lanes` scalars are combined at the end. dlight's Reduction rule keeps
the reductions scalar, which measured 3-8x slower than onnxruntime on softmax and layer norm.
"""

from __future__ import annotations

import tvm
from tvm import s_tir, tirx
from tvm.s_tir import dlight

from .common import RULE_MARK, cpu_kernel, loop_extent, root_blocks
from .elementwise import MIN_PARALLEL
from .isa import isa_of

SPATIAL, REDUCE = 0, 2


class RowReduction(dlight.ScheduleRule):
    """Kernels of row-wise reductions plus elementwise blocks, on LLVM CPU targets."""

    def apply(self, func, target: tvm.target.Target, _tunable: bool):
        if not cpu_kernel(func, target):
            return None
        sch = s_tir.Schedule(func)
        blocks = root_blocks(sch)
        if any(len(sch.get(b).writes) > 1 for b in blocks):
            return None  # a tuple reduction (argmax: index and value): one output per block here
        if blocks and _is_reduction(sch, blocks[-1]):
            # a bare reduction (sum, max): reduce into a local and copy out, so the last
            # block is elementwise like the others
            sch.cache_write(blocks[-1], 0, "global")
            blocks = root_blocks(sch)
        rows = row_axes(sch, blocks)
        if rows is None:
            return None
        lanes = isa_of(target).f32_lanes
        partial = [rfactor_vector(sch, b, rows, lanes) for b in blocks if _is_reduction(sch, b)]
        blocks = root_blocks(sch)
        last = blocks[-1]
        loops = sch.get_loops(last)
        row = sch.fuse(*loops[:rows]) if rows > 1 else loops[0]
        n_rows = loop_extent(sch, row)
        if n_rows is not None and n_rows * _row_size(sch, last, rows) >= MIN_PARALLEL:
            sch.parallel(row)
        for b in reversed(blocks[:-1]):
            sch.compute_at(b, row, preserve_unit_loops=True)
        for b in _root_blocks_under(sch, row):
            if not _is_reduction(sch, b):
                _vectorize_inner(sch, b, row, lanes)
        for rf in partial:
            if rf is not None:
                sch.decompose_reduction(rf, sch.get_loops(rf)[-2])
        sch.annotate(last, RULE_MARK, "row_reduction")
        return sch


class FullReduction(dlight.ScheduleRule):
    """A reduction of a whole tensor to one value (min, max, sum, norms), elementwise
    producers inlined: vectors of partial results accumulate in registers (rfactor), then
    `lanes` values combine. Dynamic quantization takes min and max of every quantized input;
    left scalar, those were ~0.2 ms each on MiniLM's 128x1536 activations."""

    def apply(self, func, target: tvm.target.Target, _tunable: bool):
        if not cpu_kernel(func, target):
            return None
        sch = s_tir.Schedule(func)
        blocks = root_blocks(sch)
        if not blocks or not _is_reduction(sch, blocks[-1]):
            return None
        try:
            for b in blocks[:-1]:
                sch.compute_inline(b)
        except tvm.TVMError:
            return None
        block = blocks[-1]
        if any(int(v.iter_type) != REDUCE for v in sch.get(block).iter_vars):
            return None
        loops = sch.get_loops(block)
        red = sch.fuse(*loops) if len(loops) > 1 else loops[0]
        lanes = isa_of(target).f32_lanes
        size = loop_extent(sch, red)
        if size is None or size < 2 * lanes:
            return None
        _, lane = sch.split(red, [None, lanes])
        rf = sch.rfactor(lane, factor_axis=0)
        sch.vectorize(sch.get_loops(rf)[-1])
        sch.decompose_reduction(rf, sch.get_loops(rf)[0])
        sch.annotate(block, RULE_MARK, "full_reduction")
        return sch


def row_axes(sch: s_tir.Schedule, blocks: list) -> int | None:
    """How many leading spatial axes all blocks share (the rows), or None when the kernel is
    not a row reduction: every reduction must reduce only trailing axes, the last block must
    be elementwise, and all blocks must agree on the row extents."""
    if len(blocks) < 2:
        return None
    kinds = [[int(v.iter_type) for v in sch.get(b).iter_vars] for b in blocks]
    reds = [k for k in kinds if REDUCE in k]
    if not reds or REDUCE in kinds[-1] or any(set(k) - {SPATIAL, REDUCE} for k in kinds):
        return None
    rows = min(k.index(REDUCE) for k in reds)
    if rows == 0 or any(k[rows:] != [REDUCE] * (len(k) - rows) for k in reds):
        return None
    ext = [[int(v.dom.extent) if isinstance(v.dom.extent, tirx.IntImm) else None
            for v in sch.get(b).iter_vars] for b in blocks]
    first = ext[0][:rows]
    if None in first or any(len(e) < rows or e[:rows] != first for e in ext):
        return None
    return rows


def rfactor_vector(sch: s_tir.Schedule, block, rows: int, lanes: int):
    """Split the reduction into vectors of `lanes` partial results (an rfactor block whose
    lane axis is spatial, vectorized); the final combine of `lanes` values stays scalar.
    Returns the rfactor block, or None when the reduction is too short or does not divide."""
    loops = sch.get_loops(block)
    red = sch.fuse(*loops[rows:]) if len(loops) - rows > 1 else loops[rows]
    size = loop_extent(sch, red)
    if size is None or size < 2 * lanes or size % lanes:
        return None
    _, lane = sch.split(red, [None, lanes])
    rf = sch.rfactor(lane, factor_axis=rows)
    sch.vectorize(sch.get_loops(rf)[-1])  # loops (rows..., reduction, lanes)
    return rf


def _vectorize_inner(sch: s_tir.Schedule, block, row, lanes: int) -> None:
    """Vectorize the innermost loop of an elementwise block inside the row (never the row
    loop itself: other blocks of the row run under it)."""
    loops = list(sch.get_loops(block))
    row_stmt = sch.get(row)
    below = [lp for i, lp in enumerate(loops) if any(sch.get(o).same_as(row_stmt)
                                                    for o in loops[:i])]
    inner = [lp for lp in below if loop_extent(sch, lp) is not None][-1:]
    if not inner:
        return
    size = loop_extent(sch, inner[0])
    if size >= lanes:
        _, vec = sch.split(inner[0], [None, lanes])
        sch.vectorize(vec)
    elif size > 1:
        sch.vectorize(inner[0])


def _is_reduction(sch: s_tir.Schedule, block) -> bool:
    return any(int(v.iter_type) == REDUCE for v in sch.get(block).iter_vars)


def _row_size(sch: s_tir.Schedule, block, rows: int) -> int:
    size = 1
    for v in list(sch.get(block).iter_vars)[rows:]:
        size *= int(v.dom.extent)
    return size


def _root_blocks_under(sch: s_tir.Schedule, loop) -> list:
    return list(sch.get_child_blocks(loop))

