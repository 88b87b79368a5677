"""Relax lowerings of the sparse-weight ops (graphc/ops_sparse.py).

bsr_linear: y = x @ W.T (+ bias), W in BSR with R x C blocks, one hand-written TIR kernel
    (no rule-based schedule applies to data-dependent loop bounds; TVM 0.27 has no
    topi/relax sparse_dense any more). Two loop nests, chosen by the row count M of x:

    M = 1 (a sparse matrix-vector product):
        parallel over tasks of block rows; per block row, its stored blocks:
            R = C = 1: 8 independent partial sums over the row's non-zeros (a vector FMA of
                data[j:j+8] with the gathered x[indices[j:j+8]]), then a horizontal sum;
                a serial reduction would wait on the FMA latency every step. LLVM gathers
                x with scalar loads + inserts; AVX2's vgatherdps (llvm.x86.avx2.gather)
                measured 1.1-1.3x slower on this Zen 4 (1536x384 at 80-95% zeros)
            otherwise: acc[R] += data[j, :, c] * x[indices[j]*C + c]   (vector over R)
    M > 1:
        x is first transposed (and its rows padded to the tile) to xT [K, Mp], so the rows
        of x a weight column multiplies are contiguous:
        parallel over (row tile, task of block rows); per block row
            acc[R, MT] += data[j, r, c] * xT[indices[j]*C + c, tile]   (vector over MT)
        and the tile is written to y[tile, rows] with the bias added.

    The per-thread accumulators are allocated once per task, not per row: TVM 0.27 turns
    every local buffer into a TVMBackendAllocWorkspace call at its scope (no stack
    allocas), which cost ~0.2 ms per 1536 rows when they sat inside the row loop.

sparse_decode: decoded ONCE, when the model loads, with the codebook's machinery
    (decode_once.py: an init function, TVM's process-wide tensor cache): lib.so stores the
    bitmask and the non-zero values, the kernels run on the dense weight.
"""

from __future__ import annotations

import math

import numpy as np
from tvm import relax, te, tirx
from tvm.script import tirx as T

from .decode_once import decode_func
from .lower import register_lowering
from .lower_codebook import _args, cache_key
from .schedules.isa import isa_of

op = relax.op
TASKS = 64  # parallel tasks per row tile: enough for load balance, few allocations


def vector_unit(target) -> tuple[int, int]:
    """(fp32 lanes, vector registers) of the target (AVX2's outside a build)."""
    if target is None:
        return 8, 16
    isa = isa_of(target)
    return isa.f32_lanes, isa.vector_regs


def _tasks(nb: int) -> tuple[int, int]:
    """(tasks, block rows per task) covering nb block rows."""
    per = max(1, -(-nb // TASKS))
    return -(-nb // per), per


def row_tile(m: int, r: int, lanes: int, regs: int) -> int:
    """MT: rows of x per tile; R * MT / lanes accumulator vectors must fit the registers
    (with a few left for the operands)."""
    vecs = max(1, min(4, (regs - 4) // r))
    return lanes * min(vecs, -(-m // lanes))


# ---- kernels ----------------------------------------------------------------------------
# Each kernel is one opaque block per parallel task under the root block (the schedule phase
# expects a root block; tirx.is_scheduled keeps the default rules off it).
def gemv_kernel(k: int, n: int, block: tuple[int, int], nnzb: int, bias: bool,
                lanes: int = 8):
    """x [1, K] -> y [1, N]."""
    r, c = block
    nb = n // r
    tasks, per = _tasks(nb)
    nbias = n if bias else 1
    csr = r == 1 and c == 1
    width = max(r, lanes)

    @T.prim_func(private=True, check_well_formed=False)
    def gemv(x: T.Buffer((1, k), "float32"), data: T.Buffer((nnzb, r, c), "float32"),
             indices: T.Buffer((nnzb,), "int32"), indptr: T.Buffer((nb + 1,), "int32"),
             b: T.Buffer((nbias,), "float32"), y: T.Buffer((1, n), "float32")):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        with T.sblock("root"):
            for t in T.parallel(tasks):
                with T.sblock("task"):
                    vt = T.axis.spatial(tasks, t)
                    acc = T.alloc_buffer((width,), "float32", scope="local")
                    for q in range(per):
                        if vt * per + q < nb:
                            br = T.meta_var(vt * per + q)
                            lo = T.meta_var(indptr[br])
                            hi = T.meta_var(indptr[br + 1])
                            for v in T.vectorized(width):
                                acc[v] = T.float32(0)
                            if csr:
                                for jo in range((hi - lo) // lanes):
                                    for v in T.vectorized(lanes):
                                        j = T.meta_var(lo + jo * lanes + v)
                                        acc[v] = acc[v] + data[j, 0, 0] * x[0, indices[j]]
                                for j in range(lo + (hi - lo) // lanes * lanes, hi):
                                    acc[0] = acc[0] + data[j, 0, 0] * x[0, indices[j]]
                                for v in range(1, lanes):
                                    acc[0] = acc[0] + acc[v]
                            else:
                                for j in range(lo, hi):
                                    for cc in range(c):
                                        for v in T.vectorized(r):
                                            acc[v] = acc[v] + data[j, v, cc] * x[
                                                0, indices[j] * c + cc]
                            for v in range(r):
                                if bias:
                                    y[0, br * r + v] = acc[v] + b[br * r + v]
                                else:
                                    y[0, br * r + v] = acc[v]

    return gemv


def gemm_kernel(m: int, mp: int, mt: int, k: int, n: int, block: tuple[int, int], nnzb: int,
                bias: bool):
    """xT [K, Mp] (x transposed, rows padded to a multiple of the tile MT) -> y [M, N]."""
    r, c = block
    nb = n // r
    tiles = mp // mt
    tasks, per = _tasks(nb)
    nbias = n if bias else 1

    @T.prim_func(private=True, check_well_formed=False)
    def gemm(xt: T.Buffer((k, mp), "float32"), data: T.Buffer((nnzb, r, c), "float32"),
             indices: T.Buffer((nnzb,), "int32"), indptr: T.Buffer((nb + 1,), "int32"),
             b: T.Buffer((nbias,), "float32"), y: T.Buffer((m, n), "float32")):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        with T.sblock("root"):
            # tile-major: the threads sweep one K x MT slice of xT (cache-resident) at a time
            for t in T.parallel(tiles * tasks):
                with T.sblock("task"):
                    vt = T.axis.spatial(tiles * tasks, t)
                    acc = T.alloc_buffer((r, mt), "float32", scope="local")
                    m0 = T.meta_var(vt // tasks * mt)
                    for q in range(per):
                        if vt % tasks * per + q < nb:
                            br = T.meta_var(vt % tasks * per + q)
                            for v in range(r):
                                for u in T.vectorized(mt):
                                    acc[v, u] = T.float32(0)
                            for j in range(indptr[br], indptr[br + 1]):
                                for cc in range(c):
                                    for v in range(r):
                                        for u in T.vectorized(mt):
                                            acc[v, u] = acc[v, u] + data[j, v, cc] * xt[
                                                indices[j] * c + cc, m0 + u]
                            for u in range(mt):
                                if m0 + u < m:
                                    for v in range(r):
                                        if bias:
                                            y[m0 + u, br * r + v] = acc[v, u] + b[br * r + v]
                                        else:
                                            y[m0 + u, br * r + v] = acc[v, u]

    return gemm


def _transpose_padded(x2, m: int, mp: int, k: int):
    """xT[k, i] = x[i, k] for i < m, 0 for the pad rows (an injective kernel: the default
    elementwise rule schedules it)."""
    return te.compute((k, mp), lambda kk, i: tirx.if_then_else(
        i < m, x2[tirx.min(i, m - 1), kk], tirx.const(0, "float32")), name="sparse_xt")


@register_lowering("graphc::bsr_linear")
def _bsr_linear(node, importer):
    x, data, indices, indptr, shape, bias = _args(node, importer)
    n, k = shape
    nnzb, r, c = (int(d) for d in data.ty.shape)
    lead = [int(d) for d in x.ty.shape][:-1]
    m = math.prod(lead)
    bb = importer.block_builder
    if nnzb == 0:  # an all-zero weight: nothing to multiply (a zero-size buffer would not build)
        zeros = relax.const(np.zeros([*lead, n], np.float32))
        return zeros if bias is None else bb.emit(op.add(zeros, bias))
    x2 = bb.emit(op.reshape(x, [m, k])) if x.ty.ndim != 2 else x
    b = bias if bias is not None else relax.const(np.zeros(1, np.float32))
    lanes, regs = vector_unit(importer.target)
    if m == 1:
        # 8 partial sums, not 16 on AVX-512: the gathers are scalar loads either way, and a
        # row at 90% sparsity has ~40 non-zeros (1536x384 at 90%: 16 sums 0.018 ms, 8: 0.015)
        kernel = gemv_kernel(k, n, (r, c), nnzb, bias is not None, min(lanes, 8))
        first = x2
    else:
        mt = row_tile(m, r, lanes, regs)
        mp = -(-m // mt) * mt
        kernel = gemm_kernel(m, mp, mt, k, n, (r, c), nnzb, bias is not None)
        first = bb.emit_te(_transpose_padded, x2, m, mp, k, primfunc_name_hint="sparse_xt")
    gv = bb.add_func(kernel, f"bsr_linear_{node.name}")
    y = bb.emit(relax.call_tir(gv, [first, data, indices, indptr, b],
                               relax.TensorType((m, n), "float32")))
    return bb.emit(op.reshape(y, [*lead, n])) if x.ty.ndim != 2 else y


# ---- sparse_decode: once, when the model loads -------------------------------------------
def decode_kernel(n: int, nnz: int, mask_len: int):
    """decode(mask u8[mask_len], values f32[nnz], out f32[n]): out[i] = the next value where
    bit i is set, else 0. Serial (a running count of set bits): it runs once per load."""

    @T.prim_func(private=True, check_well_formed=False)
    def decode(mask: T.Buffer((mask_len,), "uint8"), values: T.Buffer((nnz,), "float32"),
               out: T.Buffer((n,), "float32")):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        with T.sblock("root"):  # noqa: SIM117  (TVMScript wants one block per with)
            with T.sblock("decode"):
                count = T.alloc_buffer((1,), "int32", scope="local")
                count[0] = 0
                for i in range(n):
                    if T.bitwise_and(T.shift_right(T.Cast("int32", mask[i // 8]), i % 8), 1) != 0:
                        out[i] = values[count[0]]
                        count[0] = count[0] + 1
                    else:
                        out[i] = T.float32(0)

    return decode


@register_lowering("graphc::sparse_decode")
def _sparse_decode(node, importer):
    values, mask, shape = _args(node, importer)
    n, nnz, mask_len = math.prod(shape), int(values.ty.shape[0]), int(mask.ty.shape[0])
    bb = importer.block_builder
    if nnz == 0:  # all zeros: nothing to store or decode
        return relax.const(np.zeros(shape, np.float32))
    prim = bb.add_func(decode_kernel(n, nnz, mask_len), "sparse_decode")
    params = [relax.Var("mask", relax.TensorType((mask_len,), "uint8")),
              relax.Var("values", relax.TensorType((nnz,), "float32"))]
    # the key is reproducible: weights digest + node
    func = decode_func(prim, cache_key(importer, node.name), params,
                       relax.TensorType((n,), "float32"))
    gv = bb.add_func(func, f"sparse_decode_once_{node.name}")
    flat = bb.emit(relax.Call(gv, [mask, values]))
    return bb.emit(op.reshape(flat, shape))
