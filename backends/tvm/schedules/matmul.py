"""The matmul family on CPU: dense/linear (constant weights), matmul and batch-matmul.

One loop nest for every kernel whose single reduction block is C[b.., i, j] += X[.., i, k] *
Y[.., k, j] (operands in any index order, batch dims broadcast or not), followed by
whatever elementwise epilogue FuseOps put after it (bias, activation, residual add):

    parallel  for (b.., j0, i0):                 outer tiles, fused, spread over the cores
                  acc[RI, NV*lanes] = 0          micro-kernel accumulators (registers)
                  for k:                         full K: the weight panel stays in L2
                      acc[r, v] += X[i0*RI + r, k] * Yp[j0, k, v]     RI x NV FMAs, unrolled
                  out[tile] = epilogue(acc)      fused, vectorized, in the same nest

j0 is outside i0 so one K x (NV*lanes) panel of Y is reused by every row tile in a row.
A constant Y is packed into those panels at compile time (layout.py): Yp[j0, k, lane], one
contiguous stream per micro-kernel. Shape tails: N is padded to the panel width (zero
columns in the packed constant, or a padded copy of an activation operand) so the vector
loop never has a lane predicate; an M tail is a per-row predicate on the unrolled rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import tvm
from tvm import s_tir, tirx
from tvm.s_tir import dlight

from . import layout
from .common import RULE_MARK, root_blocks
from .isa import ISA, isa_of

# Micro-kernel rows RI for NV vector accumulators per row, by vector ISA. RI*NV
# accumulators + NV weight vectors must fit the register file; the X operand is a
# broadcast-from-memory FMA operand. AVX2 4x3 is the study's measured best on Zen 3.
TILES: dict[str, dict[int, int]] = {
    "avx512": {4: 6, 3: 8, 2: 12, 1: 14},   # 32 zmm
    "avx2": {3: 4, 2: 6, 1: 8},             # 16 ymm
    "sse": {3: 4, 2: 6, 1: 8},              # 16 xmm (x86-64-v2)
    "neon": {4: 6, 3: 8, 2: 12, 1: 14},     # 32 q (AArch64; X is a by-element fmla operand)
}


def isa_class(isa: ISA) -> str:
    if isa.neon:
        return "neon"
    return "avx512" if isa.avx512 else "avx2" if isa.f32_lanes == 8 else "sse"


@dataclass(frozen=True)
class Tile:
    rows: int    # RI: output rows per micro-kernel
    vecs: int    # NV: vectors per row
    lanes: int   # vector width in elements

    @property
    def cols(self) -> int:
        return self.vecs * self.lanes


@dataclass(frozen=True)
class Matmul:
    """What the schedule needs to know about the reduction block (positions are block iter
    indices, axes are buffer dimensions)."""
    batch: tuple[int, ...]
    i: int
    j: int
    k: int
    m: int
    n: int
    kdim: int
    lhs: tirx.Buffer
    rhs: tirx.Buffer
    rhs_k_axis: int
    rhs_j_axis: int
    dtype: str      # the weight operand's dtype


def choose_tile(table: dict[int, int], lanes: int, m: int, n: int) -> Tile:
    """The widest NV that divides N's vector count (no padding), else the widest that fits."""
    vecs = -(-n // lanes)
    usable = [nv for nv in sorted(table, reverse=True) if nv <= vecs] or [min(table)]
    nv = next((nv for nv in usable if vecs % nv == 0), usable[0])
    return Tile(rows=min(table[nv], m), vecs=nv, lanes=lanes)


# ---- analysis -----------------------------------------------------------------------------

def find_reduction(sch: s_tir.Schedule) -> s_tir.schedule.SBlockRV | None:
    """The one reduction block of the kernel, or None (none, or several)."""
    root = sch.get_sblock("root")
    found = [b for b in sch.get_child_blocks(root)
             if any(iv.iter_type == tirx.IterVar.CommReduce for iv in sch.get(b).iter_vars)]
    return found[0] if len(found) == 1 else None


def match_matmul(sch: s_tir.Schedule, block: s_tir.schedule.SBlockRV,
                 dtypes: tuple[str, ...] = ("float32",), out_dtype: str = "float32"
                 ) -> Matmul | None:
    """C[S..] = C[S..] + X * Y with one reduction var, plain-var indices, X indexed by the
    second-last output var (i) and Y by the last (j), operands of `dtypes` (casts allowed)
    into `out_dtype`: a Matmul, else None."""
    blk = sch.get(block)
    store = blk.body
    if not isinstance(store, tirx.BufferStore) or not isinstance(store.value, tirx.Add) \
            or str(store.buffer.dtype) != out_dtype:
        return None
    loads = _product_loads(store.value.b)
    if loads is None or not _same_load(store.value.a, store):
        return None
    if not all(isinstance(iv.dom.extent, tirx.IntImm) for iv in blk.iter_vars):
        return None  # symbolic shapes: tile sizes and padding need known extents
    ivars = [iv.var for iv in blk.iter_vars]
    reduce = [p for p, iv in enumerate(blk.iter_vars) if iv.iter_type == tirx.IterVar.CommReduce]
    spatial = [p for p in range(len(ivars)) if p not in reduce]
    if len(reduce) != 1 or len(spatial) < 2 or not _plain(store.indices, [ivars[p] for p in spatial]):
        return None
    i, j, k = spatial[-2], spatial[-1], reduce[0]
    uses = [_var_positions(ld.indices, ivars) for ld in loads]
    if any(u is None for u in uses):
        return None
    roles = [r for r in ((0, 1), (1, 0)) if i in uses[r[0]] and j in uses[r[1]]]
    if not roles:
        return None
    x, y = (loads[r] for r in roles[0])
    ux, uy = uses[roles[0][0]], uses[roles[0][1]]
    if j in ux or i in uy or k not in ux or k not in uy \
            or not {str(x.source.dtype), str(y.source.dtype)} <= set(dtypes):
        return None
    ext = [int(iv.dom.extent) for iv in blk.iter_vars]
    return Matmul(batch=tuple(spatial[:-2]), i=i, j=j, k=k, m=ext[i], n=ext[j], kdim=ext[k],
                  lhs=x.source, rhs=y.source, rhs_k_axis=uy.index(k), rhs_j_axis=uy.index(j),
                  dtype=str(y.source.dtype))


# TVM 0.27: tirx.BufferLoad(...) builds an ir.TensorLoad whose buffer is `.source`.
Load = tvm.ir.expr.TensorLoad


def _product_loads(expr) -> list | None:
    if not isinstance(expr, tirx.Mul):
        return None
    loads = [e.value if isinstance(e, tirx.Cast) else e for e in (expr.a, expr.b)]
    return loads if all(isinstance(e, Load) for e in loads) else None


def _same_load(expr, store: tirx.BufferStore) -> bool:
    return (isinstance(expr, Load) and expr.source.same_as(store.buffer)
            and all(a.same_as(b) for a, b in zip(expr.indices, store.indices, strict=True)))


def _plain(indices, want) -> bool:
    return len(indices) == len(want) and all(a.same_as(b) for a, b in zip(indices, want))


def _var_positions(indices, ivars) -> list[int] | None:
    """Block-iter position of each index, None if an index is not a plain block var."""
    out = []
    for idx in indices:
        pos = [p for p, v in enumerate(ivars) if idx.same_as(v)]
        if not pos:
            return None
        out.append(pos[0])
    return out


# ---- schedule -----------------------------------------------------------------------------

def inline_prologue(sch: s_tir.Schedule, block) -> bool:
    """Inline the injective blocks that feed the reduction (fused reshapes/transposes)."""
    for producer in reversed(_blocks_before(sch, block)):
        try:
            sch.compute_inline(producer)
        except Exception:  # noqa: BLE001  (not inlinable: leave the kernel to other rules)
            return False
    return True


def _blocks_before(sch, block):
    root = root_blocks(sch)
    names = [sch.get(b).name_hint for b in root]
    return root[:names.index(sch.get(block).name_hint)]


def prepare_output(sch: s_tir.Schedule, mm, shape: Matmul, multiples: dict[int, int],
                   lanes: int):
    """Pad the block iters in `multiples` (position -> multiple) with zeros, then leave one
    block right after the reduction, reading its result elementwise: the fused epilogue, or
    a copy-out; the accumulator buffer becomes local. Returns (that block, {operand buffer:
    the block that makes its padded copy})."""
    extents = [int(iv.dom.extent) for iv in sch.get(mm).iter_vars]
    pads = [multiples.get(p, 1) for p in range(len(extents))]
    copies = {}
    if any(e % m for e, m in zip(extents, pads, strict=True)):
        sch.pad_einsum(mm, pads)
        for p in sch.get_producers(mm):
            src = sch.get(p).reads[0].source
            copies[shape.rhs if src.same_as(shape.rhs) else shape.lhs] = p
    consumers = _blocks_after(sch, mm)
    for c in consumers[:-1]:
        sch.compute_inline(c)
    if consumers and _reads_acc_elementwise(sch, consumers[-1], mm, shape):
        sch.set_scope(mm, 0, "local")
        return consumers[-1], copies
    # No epilogue, or one that reads the result through a reshape: a copy-out block ends the
    # nest, and such an epilogue stays a separate loop nest after it.
    out = sch.cache_write(mm, 0, "local")  # mm now writes the local tile
    if consumers:
        parallel_copy(sch, consumers[-1], lanes)
    return out, copies


def _blocks_after(sch, block):
    root = root_blocks(sch)
    names = [sch.get(b).name_hint for b in root]
    return root[names.index(sch.get(block).name_hint) + 1:]


def _reads_acc_elementwise(sch, out, mm, shape: Matmul) -> bool:
    acc = sch.get(mm).writes[0].source
    blk = sch.get(out)
    ivars = [iv.var for iv in blk.iter_vars]
    n_spatial = len(shape.batch) + 2
    regions = [r for r in blk.reads if r.source.same_as(acc)]
    return (len(ivars) == n_spatial and len(regions) == 1
            and all(r.extent.value == 1 if isinstance(r.extent, tirx.IntImm) else False
                    for r in regions[0].region)
            and all(r.min.same_as(v) for r, v in zip(regions[0].region, ivars, strict=True)))


def pack_rhs(sch: s_tir.Schedule, func, mm, shape: Matmul, cols: int, kp: int, rhs_pad,
             activations: bool = False):
    """Y -> panels Yp[.., N/cols, K/kp, cols, kp] (leading batch axes kept; the kp axis only
    for dot-product instructions that take kp consecutive k per lane). A constant Y is
    packed at compile time; an activation only when `activations` (then per call). Returns
    the per-call packing block, True when packed at compile time, else None."""
    constant = layout.is_layout_free(func, shape.rhs)
    if not constant and not activations:
        return None
    ka, ja = shape.rhs_k_axis, shape.rhs_j_axis

    def panels(*idx):
        rest = [x for a, x in enumerate(idx) if a not in (ka, ja)]
        j, k = idx[ja], idx[ka]
        if kp == 1:
            return (*rest, j // cols, k, j % cols)
        return (*rest, j // cols, k // kp, j % cols, k % kp)

    zero = tirx.const(0, shape.dtype)
    if rhs_pad is not None:
        block = layout.pack_producer(sch, rhs_pad, mm, panels, zero, preproc=constant)
    else:
        block = layout.pack_input(sch, mm, shape.rhs, panels, zero, preproc=constant)
    return True if constant else block


def tile_outer(sch: s_tir.Schedule, out, shape: Matmul, tile: Tile):
    """Tile the epilogue's loops and parallelize the fused outer tiles; returns
    (outer loop to compute the reduction at, epilogue inner loops)."""
    loops = sch.get_loops(out)
    *batch, i, j = loops
    i0, i1 = sch.split(i, [None, tile.rows])
    j0, j1 = sch.split(j, [None, tile.cols])
    sch.reorder(*batch, j0, i0, i1, j1)
    outer = sch.fuse(*batch, j0, i0)
    sch.parallel(outer)
    return outer, (i1, j1)


def micro_kernel(sch: s_tir.Schedule, mm, tile: Tile):
    """Under the tile loop: k outermost, RI rows x NV vectors unrolled, lanes vectorized
    (LLVM unrolls k by 2 itself and keeps the RI*NV accumulators in registers)."""
    i, j, k = sch.get_loops(mm)[-3:]
    sch.reorder(k, i, j)
    jv, lane = sch.split(j, [tile.vecs, tile.lanes])
    sch.unroll(i)
    sch.unroll(jv)
    sch.vectorize(lane)
    return k


def vectorize_tile(sch: s_tir.Schedule, i, j, tile: Tile) -> None:
    """An RI x cols tile loop pair: rows unrolled, columns as NV vectors."""
    jv, lane = sch.split(j, [tile.vecs, tile.lanes])
    sch.unroll(i)
    sch.unroll(jv)
    sch.vectorize(lane)


def vectorize_init(sch: s_tir.Schedule, init) -> None:
    """The accumulator zeroing decompose_reduction made: loops (rows, NV, lanes)."""
    i, jv, lane = sch.get_loops(init)[-3:]
    sch.unroll(i)
    sch.unroll(jv)
    sch.vectorize(lane)


def parallel_copy(sch: s_tir.Schedule, block, lanes: int) -> None:
    """A padding copy of an activation operand: rows over the cores, last axis vectorized."""
    *outer, last = sch.get_loops(block)
    if outer:
        sch.parallel(sch.fuse(*outer))
    _, lane = sch.split(last, [None, lanes])
    sch.vectorize(lane)


def pack_or_copy(sch: s_tir.Schedule, func, mm, shape: Matmul, copies: dict, cols: int,
                 kp: int, lanes: int, pack_activations: bool = False) -> bool:
    """Pack a constant weight (with its padding) at compile time; padded or packed copies of
    activations stay per call, scheduled as parallel vector copies. True when packed."""
    rhs_pad = next((b for buf, b in copies.items() if buf.same_as(shape.rhs)), None)
    packed = pack_rhs(sch, func, mm, shape, cols, kp, rhs_pad, pack_activations)
    per_call = [b for buf, b in copies.items() if not buf.same_as(shape.rhs)]
    if packed is not True:  # Y's padded copy, or its per-call packing (the same block if both)
        per_call += [b for b in (rhs_pad if packed is None else packed,) if b is not None]
    for block in per_call:
        parallel_copy(sch, block, lanes)
    return packed is True


def schedule_fp32(sch: s_tir.Schedule, func, mm, shape: Matmul, tile: Tile) -> None:
    out, copies = prepare_output(sch, mm, shape, {shape.j: tile.cols}, tile.lanes)
    # An activation Y with j not innermost (Q @ K^T with the transpose fused in) would need
    # a gather per vector: repack it per call into panels instead.
    strided = shape.rhs_j_axis != len(shape.rhs.shape) - 1
    packed = pack_or_copy(sch, func, mm, shape, copies, tile.cols, 1, tile.lanes,
                          pack_activations=strided)
    outer, (ei, ej) = tile_outer(sch, out, shape, tile)
    sch.compute_at(mm, outer, preserve_unit_loops=True)
    sch.annotate(mm, RULE_MARK, f"matmul {tile.rows}x{tile.vecs}x{tile.lanes}"
                 + (" packed" if packed else ""))
    k = micro_kernel(sch, mm, tile)
    vectorize_tile(sch, ei, ej, tile)
    vectorize_init(sch, sch.decompose_reduction(mm, k))


class MatmulRule(dlight.ScheduleRule):
    """fp32 dense / matmul / batch-matmul with fused elementwise epilogue."""

    def apply(self, func, target: tvm.target.Target, _tunable: bool):
        if not isinstance(func, tirx.PrimFunc):
            return None
        sch = s_tir.Schedule(func)
        mm = find_reduction(sch)
        if mm is None or not inline_prologue(sch, mm):
            return None
        shape = match_matmul(sch, mm)
        if shape is None:
            return None
        isa = isa_of(target)
        tile = choose_tile(TILES[isa_class(isa)], isa.f32_lanes, shape.m, shape.n)
        schedule_fp32(sch, func, mm, shape, tile)
        return sch
