"""A decoded codebook weight's relayout, done by its decode kernel or on its indices.

decode_chain.py moves the kernels that relayout a decoded weight (the reshape to the layer's
shape, a matmul's transpose, a conv's `_weight_prepack`) into the weight's decode function:
they run once, at load, but each is a compiled kernel in lib.so (digits CNN: ~3.5 kB of
machine code for two weights). A relayout that only moves elements is a gather,
`relaid[j] = weight[src[j]]`, and commutes with the codebook lookup:

    relayout(codebook[idx]) == codebook[idx[src]]

So no relayout kernel is needed. Most relayouts of a layer's weight (a transpose, a conv's
or matmul's blocked prepack) swap the last two axes of the weight seen as [nb, nr, nc]:
lower_codebook.decode_any_size decodes straight into that order, reading the indices as
they are packed. Any other gather is applied to the indices at compile time (`idx[src]`,
repacked). Either way the decode function is one kernel, shared by all weights of a bit
width, and a reshape, which is free (a view). The indices keep their packed order when
they can: it compresses better (digits fc1 transposed: +460 bytes of LZMA).

Checked, not assumed. FoldConstant runs the chain at compile time on the decoded weight
and on the element positions (two base-4096 digits + 1, exact in float32; a 0 marks
padding the relayout inserted). The result is used only if the positions give a gather
`src` and codebook[idx[src]] equals the chain's result on the weight bit for bit: exactly
the tensor the kernels would have cached. Otherwise the chain stays kernels. Only float32
weights with one codebook qualify (the decode function carries BITS); with one codebook
per row, where an element lands decides which codebook it reads.
"""

from __future__ import annotations

import numpy as np
import torch
import tvm
from tvm import relax

from graphc.ops_codebook import pack, unpack

from .decode_once import BITS, DECODE_ONCE, substitute
from .lower_codebook import decode_any_size

DIGIT = 4096  # position probes: pos = (hi - 1) * DIGIT + lo - 1, each digit exact in float32


def relaid_decode(func: relax.Function, call: relax.Call, links, start: relax.Var,
                  bb: relax.BlockBuilder, key: str) -> tuple[relax.Function, list] | None:
    """(decode function, its arguments) giving the chain's result without its kernels, or
    None when the chain is not a gather of this weight's elements. bb: the module being
    rewritten (it gets the decode kernel)."""
    bits = func.attrs.get(BITS) if func.attrs is not None else None
    packed, codebook = call.args
    if bits is None or not all(isinstance(a, tvm.ir.expr.Constant) for a in call.args):
        return None
    bits, cb = int(bits), codebook.value.numpy()
    n = int(func.ret_ty.shape[0])
    if cb.dtype != np.float32 or n >= DIGIT * DIGIT:
        return None
    idx = unpack(torch.from_numpy(packed.value.numpy()), bits, torch.arange(n)).numpy()
    pos = np.arange(n)
    weight, hi, lo = _run(links, start, [cb[idx], pos // DIGIT + 1, pos % DIGIT + 1], bb.get())
    src = _gather(hi, lo, n) if weight is not None else None
    if src is None or not _same_bits(cb[idx[src]], weight.reshape(-1)):
        return None
    dims = _swapped_axes(src)
    if dims is None:  # another gather: done on the indices, decoded in order
        packed, dims = relax.const(pack(torch.from_numpy(idx[src]), bits).numpy()), (
            src.size, 1, 1)
    kernel = bb.add_func(decode_any_size(bits, "float32"), f"codebook_decode{bits}")
    return _decode_to(func, kernel, key, dims, weight.shape, packed), [packed, codebook]


def _gather(hi, lo, n: int) -> np.ndarray | None:
    """The source position of each element of the chain's result, or None when some
    element is not one of the weight's (padding, arithmetic)."""
    src = (hi.astype(np.int64) - 1) * DIGIT + lo.astype(np.int64) - 1
    exact = np.array_equal(src, (hi.astype(np.float64) - 1) * DIGIT + lo - 1)
    ok = exact and hi.size and src.min() >= 0 and src.max() < n and lo.min() >= 1
    return src.reshape(-1) if ok else None


def _swapped_axes(src: np.ndarray) -> tuple[int, int, int] | None:
    """(nb, nc, nr) when src reads the [nb, nr, nc] weight with its last two axes swapped
    (decode_any_size's order), else None."""
    m = src.size
    if m < 2 or src[0] != 0 or src[1] <= 0:
        return None
    nc, ones = int(src[1]), np.flatnonzero(src == 1)
    nr = int(ones[0]) if ones.size == 1 else 0
    if nr == 0 or m % (nr * nc):
        return None
    nb = m // (nr * nc)
    b, k, r = np.unravel_index(np.arange(m), (nb, nc, nr))
    return (nb, nc, nr) if np.array_equal(src, (b * nr + r) * nc + k) else None


def _same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.tobytes() == b.tobytes()  # -0.0 and NaNs included


def _run(links, start: relax.Var, inputs: list[np.ndarray], mod: tvm.IRModule) -> list:
    """The chain's result on each input (as float32; FoldConstant builds and runs its
    kernels on the host), or Nones when it does not fold to constants."""
    kernels, bindings, outs = {}, [], []
    for x in inputs:
        subst = {start: relax.const(x.astype(np.float32))}
        for link in links:
            var = relax.Var(link.var.name, link.var.ty)
            bindings.append(relax.VarBinding(var, substitute(link.value, subst)))
            subst[link.var] = var
            if link.value.op.name == "relax.call_tir":
                kernels[link.value.args[0]] = mod[link.value.args[0]]
        outs.append(subst[links[-1].var])
    body = relax.SeqExpr([relax.BindingBlock(bindings)], relax.Tuple(outs))
    probe = relax.Function([], body, relax.TupleType([v.ty for v in outs]), is_pure=True)
    folded = relax.transform.FoldConstant()(tvm.IRModule({**kernels, "probe": probe}))
    body = folded["probe"].body  # folded bindings may be gone, their constants inlined
    values = {b.var: b.value for block in body.blocks for b in block.bindings}
    result = values.get(body.body, body.body)
    fields = [values.get(f, f) for f in getattr(result, "fields", [])]
    if len(fields) != len(inputs) or not all(isinstance(f, tvm.ir.expr.Constant)
                                              for f in fields):
        return [None] * len(inputs)
    return [f.value.numpy() for f in fields]


def _decode_to(func: relax.Function, kernel: relax.GlobalVar, key: str, dims, shape,
               packed) -> relax.Function:
    """(packed, codebook) -> `kernel` decoding into [nb, nc, nr] = dims, reshaped to
    `shape`: the relaid-out weight, as the decoder of the cached weight `key`."""
    params = [relax.Var("packed", packed.ty), func.params[1]]
    dense = relax.Var("dense", relax.TensorType(tuple(dims), "float32"))
    out = relax.Var("weight", relax.TensorType(tuple(shape), "float32"))
    body = relax.SeqExpr([relax.BindingBlock([
        relax.VarBinding(dense, relax.call_tir(kernel, params, dense.ty)),
        relax.VarBinding(out, relax.op.reshape(dense, tuple(shape)))])], out)
    attrs = tvm.ir.make_node("ir.DictAttrs", **{**dict(func.attrs), DECODE_ONCE: key})
    return relax.Function(params, body, out.ty, func.is_pure, attrs)
