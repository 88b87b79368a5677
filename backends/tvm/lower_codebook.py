"""Relax lowerings of the codebook ops (graphc/ops_codebook.py): two ways to run a shared weight.

decode (graphc::codebook_decode): the dense weight is decoded ONCE, when the model loads,
    and kept; lib.so stores only the packed indices and the codebook. Each weight gets a
    small Relax function `codebook_decode_once_<node>(packed, codebook)` that runs the
    decode kernel (decode_once.decode_func). decode_chain.py adds the weight's relayout to
    it, and decode_once.decode_at_load moves its call out of main into the executable's
    init function, which the runners call once at load: main only reads the decoded weight
    from TVM's process-wide tensor cache (part of the TVM runtime: the tvm + numpy board
    runner has it too), under a name made at compile time (cache_key). Why not a plain
    decode in `main`: FoldConstant would evaluate it at compile time and store the dense
    fp32 weight in lib.so, undoing the compression; a call to a Relax function is not
    folded. Caveat: the dense copies live as long as the process (TVM's cache has no owner
    to free them with).

gather (graphc::codebook_linear, graphc::codebook_embedding): no dense weight exists at
    all. The linear kernel decodes a [KT, NT] tile of W into a per-thread buffer, then
    multiplies every row of x by it (tile decoded once per call, reused across rows); the
    embedding decodes only the rows looked up.

Per-row codebooks (a [G, 2^bits] codebook, see graphc/ops_codebook.py) are flattened to
[G * 2^bits] in Relax; the kernels add (row // rows per codebook) * 2^bits to the field,
so one kernel body serves both layouts (G = 1: the offset is 0).
"""

from __future__ import annotations

import functools
import hashlib
import math
import uuid

import torch
from tvm import relax, s_tir, te, tirx
from tvm.script import tirx as T

from .decode_once import decode_func
from .lower import register_lowering

op = relax.op


def _args(node, importer) -> list:
    return [importer.env[a] if hasattr(a, "op") else a for a in node.args]


def _flat_codebook(codebook, importer):
    """(codebook as [G * 2^bits], G) for a [2^bits] or [G, 2^bits] codebook."""
    shape = [int(d) for d in codebook.ty.shape]
    if len(shape) == 1:
        return codebook, 1
    return importer.block_builder.emit(op.reshape(codebook, [shape[0] * shape[1]])), shape[0]


def _index(p, bits: int, pos):
    """The bits-wide field at element position `pos` (int64) of the packed stream p."""
    start = pos * bits
    byte = start >> 3
    window = p[byte].astype("int32") | (p[byte + 1].astype("int32") << 8)
    return (window >> (start & 7).astype("int32")) & ((1 << bits) - 1)


# ---- decode once ------------------------------------------------------------------------
def _field(p, bits: int, vi):
    """The bits-wide field of element vi (int64) in TIR: the 16-bit window read."""
    start = vi * T.int64(bits)
    lo = T.Cast("int32", p[T.shift_right(start, T.int64(3))])
    hi = T.Cast("int32", p[T.shift_right(start, T.int64(3)) + T.int64(1)])
    return T.bitwise_and(T.shift_right(T.bitwise_or(lo, T.shift_left(hi, 8)),
                                       T.Cast("int32", start % T.int64(8))), (1 << bits) - 1)


@functools.cache  # parsing TVMScript takes ~25 ms; a PrimFunc is immutable
def decode_any_size(bits: int, dtype: str = "float32") -> tirx.PrimFunc:
    """decode(p u8[p_len], c[2^bits], out[nb, nc, nr]): the element of out at (b, k, r)
    is c[field (b * nr + r) * nc + k]. That is, the [nb, nr, nc] weight (in the order its
    indices are packed) with its last two axes swapped: a transpose (nb = 1) or the
    blocked transposes of a kernel's weight prepack; out [n, 1, 1] is the weight as
    packed. The sizes come from the tensors, so this one kernel serves every such decode
    of a bit width and dtype (a kernel per size and layout is ~0.5-1.3 kB of machine code).
    decode_permute.py swaps it in after the schedule phase: TVM 0.27's
    AttachAttrLayoutFreeBuffers, which copies every kernel, gives the copy's shape
    variables new names but not its body's."""
    size = 1 << bits

    @T.prim_func(private=True, check_well_formed=False)
    def decode(p_h: T.handle, c: T.Buffer((size,), dtype), out_h: T.handle):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        nb, nc, nr, p_len = T.int64(), T.int64(), T.int64(), T.int64()
        p = T.match_buffer(p_h, (p_len,), "uint8")
        out = T.match_buffer(out_h, (nb, nc, nr), dtype)
        with T.sblock("root"):
            # one flat loop: LLVM unrolls a serial inner loop over nr 8 times (+0.8 kB)
            for j in T.parallel(nb * nc * nr):
                with T.sblock("decode"):
                    vb = T.axis.spatial(nb, j // (nc * nr))
                    vk = T.axis.spatial(nc, j // nr % nc)
                    vr = T.axis.spatial(nr, j % nr)
                    out[vb, vk, vr] = c[_field(p, bits, (vb * nr + vr) * nc + vk)]

    return decode


def _decode_prim(bits: int, n: int, p_len: int, groups: int, span: int,
                 dtype: str = "float32") -> tirx.PrimFunc:
    """decode(p u8[p_len], c[groups * 2^bits], out[n]): out = c[fields] (element i reads
    codebook i // span). One kernel per (bits, n, groups, span, dtype): weights of one size
    and layout share it. dtype: the codebook's, float32, or int8 for a codebook on an int8
    grid (fold-fake-quant after share-weights)."""
    size = 1 << bits

    @T.prim_func(private=True, check_well_formed=False)
    def decode(p: T.Buffer((p_len,), "uint8"), c: T.Buffer((groups * size,), dtype),
               out: T.Buffer((n,), dtype)):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        with T.sblock("root"):
            for i in T.parallel(n):
                with T.sblock("decode"):
                    vi = T.axis.spatial(n, i)
                    out[vi] = c[vi // span * size + _field(p, bits, T.Cast("int64", vi))]

    return decode


def _decode_gv(importer, bits: int, shape, p_len: int, groups: int,
               dtype: str = "float32") -> relax.GlobalVar:
    n = math.prod(shape)
    span = -(-shape[0] // groups) * (n // shape[0])  # elements per codebook
    key = ("codebook-decode-prim", bits, n, groups, span, dtype)
    if key not in importer.memo:
        prim = _decode_prim(bits, n, p_len, groups, span, dtype)
        importer.memo[key] = importer.block_builder.add_func(prim,
                                                             f"codebook_decode{bits}")
    return importer.memo[key]


def cache_key(importer=None, name: str = "") -> str:
    """The tensor-cache name of one decoded weight: the digest of the imported program's
    weights and the node's name, so the same compile gives the same lib.so (and another
    model another name). decode_chain.py appends a hash of the layout it caches. Without an
    importer: a random name."""
    if importer is None or importer.ep is None:
        return f"graphc.codebook/{uuid.uuid4().hex}"
    return f"graphc.codebook/{weights_digest(importer)[:16]}/{name}"


def weights_digest(importer) -> str:
    """sha256 over the names and bytes of every tensor of the program (once per import)."""
    if "weights-digest" not in importer.memo:
        ep, h = importer.ep, hashlib.sha256()
        tensors = {**ep.state_dict, **ep.constants}
        for name in sorted(tensors):
            t = tensors[name]
            if isinstance(t, torch.Tensor):
                h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
                h.update(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy())
        importer.memo["weights-digest"] = h.hexdigest()
    return importer.memo["weights-digest"]


@register_lowering("graphc::codebook_decode")
def _codebook_decode(node, importer):
    codebook, packed, bits, shape = _args(node, importer)
    codebook, groups = _flat_codebook(codebook, importer)
    n, size = math.prod(shape), 1 << bits
    key = cache_key(importer, node.name)
    bb = importer.block_builder
    p_len, dtype = int(packed.ty.shape[0]), str(codebook.ty.dtype)
    prim = _decode_gv(importer, bits, shape, p_len, groups, dtype)
    params = [relax.Var("packed", relax.TensorType((p_len,), "uint8")),
              relax.Var("codebook", relax.TensorType((groups * size,), dtype))]
    func = decode_func(prim, key, params, relax.TensorType((n,), dtype),
                       bits=bits if groups == 1 else None)
    gv = bb.add_func(func, f"codebook_decode_once_{node.name}")
    flat = bb.emit(relax.Call(gv, [packed, codebook]))
    return bb.emit(op.reshape(flat, shape))


# ---- gather: linear ---------------------------------------------------------------------
def _divisor(n: int, choices: tuple[int, ...]) -> int:
    return next((c for c in choices if n % c == 0), 1)


def _linear_te(m: int, k: int, n: int, bits: int, p_len: int, bias: bool, groups: int):
    x = te.placeholder((m, k), "float32", "x")
    c = te.placeholder((groups << bits,), "float32", "codebook")
    p = te.placeholder((p_len,), "uint8", "packed")
    per = -(-n // groups)  # rows of W per codebook
    # W[r, j] is element (j, r) of the [n, k] index tensor (nn.Linear's layout)
    w = te.compute((k, n), lambda i, j: c[(j // per) * (1 << bits) + _index(
        p, bits, (j * k + i).astype("int64"))], name="W")
    r = te.reduce_axis((0, k), "r")
    y = te.compute((m, n), lambda i, j: te.sum(x[i, r] * w[r, j], axis=r), name="Y")
    args = [x, c, p]
    if bias:
        b = te.placeholder((n,), "float32", "bias")
        y = te.compute((m, n), lambda i, j: y[i, j] + b[j], name="out")
        args.append(b)
    return te.create_prim_func([*args, y]), bias


def linear_kernel(m: int, k: int, n: int, bits: int, p_len: int, bias: bool,
                  groups: int = 1) -> tirx.PrimFunc:
    """x [m, k] @ W.T (+ bias), W [n, k] decoded a [KT, NT] tile at a time into a buffer that
    lives inside the parallel loop (one per thread), reused by all m rows of x."""
    func, _ = _linear_te(m, k, n, bits, p_len, bias, groups)
    sch = s_tir.Schedule(func)
    w, y = sch.get_sblock("W"), sch.get_sblock("Y")
    nt, kt, mt = _divisor(n, (64, 32, 16, 8)), _divisor(k, (64, 32, 16, 8)), _divisor(
        m, (4, 2))
    i, j, r = sch.get_loops(y)
    jo, ji = sch.split(j, [None, nt])
    ro, ri = sch.split(r, [None, kt])
    io, ii = sch.split(i, [None, mt])
    sch.reorder(jo, ro, io, ri, ii, ji)
    sch.parallel(jo)
    sch.set_scope(w, 0, "local")
    sch.compute_at(w, ro)
    if bias:  # before decompose_reduction: it needs Y's update to be a complete reduction
        out = sch.get_sblock("out")
        sch.reverse_compute_at(out, jo)
        sch.vectorize(sch.get_loops(out)[-1])
    sch.vectorize(ji)  # before decompose_reduction, for the same reason
    sch.decompose_reduction(y, ro)
    # no global_symbol: the module names it when it is added (create_prim_func said "main")
    return sch.mod["main"].with_attr("tirx.is_scheduled", True).without_attr("global_symbol")


@register_lowering("graphc::codebook_linear")
def _codebook_linear(node, importer):
    x, codebook, packed, bits, shape, bias = _args(node, importer)
    codebook, groups = _flat_codebook(codebook, importer)
    n, k = shape
    lead = [int(d) for d in x.ty.shape][:-1]
    rows = math.prod(lead)
    bb = importer.block_builder
    x2 = bb.emit(op.reshape(x, [rows, k])) if x.ty.ndim != 2 else x
    kernel = linear_kernel(rows, k, n, bits, int(packed.ty.shape[0]), bias is not None,
                           groups)
    gv = bb.add_func(kernel, f"codebook_linear_{node.name}")
    args = [x2, codebook, packed] + ([bias] if bias is not None else [])
    y = bb.emit(relax.call_tir(gv, args, relax.TensorType((rows, n), "float32")))
    return bb.emit(op.reshape(y, [*lead, n])) if x.ty.ndim != 2 else y


# ---- gather: embedding ------------------------------------------------------------------
@register_lowering("graphc::codebook_embedding")
def _codebook_embedding(node, importer):
    codebook, packed, bits, shape, indices = _args(node, importer)
    codebook, groups = _flat_codebook(codebook, importer)
    dim, per = shape[1], -(-shape[0] // groups)

    def rows(c, p, idx):
        flat = [int(s) for s in idx.shape]

        def value(*ij):
            row = idx[ij[:-1]].astype("int64")
            return c[row // per * (1 << bits) + _index(p, bits, row * dim + ij[-1])]

        return te.compute((*flat, dim), value, name="rows")

    return importer.block_builder.emit_te(rows, codebook, packed, indices,
                                          primfunc_name_hint="codebook_embedding")
