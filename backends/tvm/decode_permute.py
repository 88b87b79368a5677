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

Checked, not assumed. The chain's kernels run at compile time, on the host, on the decoded
weight and on the element positions + 1 (exact in float32 below 2^24 elements; a 0 marks
padding the relayout inserted). The result is used only if the positions give a gather
`src` and codebook[idx[src]] equals the chain's result on the weight bit for bit: exactly
the tensor the kernels would have cached. Otherwise the chain stays kernels. (Each kernel
is built once per compile here: FoldConstant rebuilt it per call, +4 s on ResNet-18.) Only float32
weights with one codebook qualify (the decode function carries BITS); with one codebook
per row, where an element lands decides which codebook it reads.
"""

from __future__ import annotations

import numpy as np
import torch
import tvm
from tvm import relax

from graphc.ops_codebook import pack, unpack

from .decode_once import BITS, DECODE_ONCE
from .lower_codebook import decode_any_size

EXACT = 1 << 24  # float32 holds every position + 1 below this exactly


def relaid_decodes(cases: list, bb: relax.BlockBuilder) -> list:
    """For each case (decode function, its call, the chain's links, the variable the chain
    starts from, the cache key): (decode function, its arguments) giving the chain's
    result without its kernels, or None when the chain is not a gather of this weight's
    elements. bb: the module being rewritten (it gets the decode kernel)."""
    built: dict = {}  # kernel GlobalVar -> host function (None: does not build here)
    return [_relaid(case, bb, built) for case in cases]


def _relaid(case, bb: relax.BlockBuilder, built: dict):
    func, call, links, start, key = case
    bits = func.attrs.get(BITS) if func.attrs is not None else None
    if bits is None or not all(isinstance(a, tvm.ir.expr.Constant) for a in call.args):
        return None
    bits, packed, cb = int(bits), call.args[0], call.args[1].value.numpy()
    n = int(func.ret_ty.shape[0])
    if cb.dtype != np.float32 or n >= EXACT:
        return None
    idx = unpack(torch.from_numpy(packed.value.numpy()), bits, torch.arange(n)).numpy()
    weight = _run(links, start, cb[idx], bb.get(), built)
    moved = _run(links, start, np.arange(1, n + 1, dtype=np.float32), bb.get(), built)
    src = _gather(moved, n) if weight is not None and moved is not None else None
    if src is None or not _same_bits(cb[idx[src]], weight.reshape(-1)):
        return None
    dims = _swapped_axes(src)
    if dims is None:  # another gather: done on the indices, decoded in order
        packed = relax.const(pack(torch.from_numpy(idx[src]), bits).numpy())
        dims = (src.size, 1, 1)
    kernel = bb.add_func(decode_any_size(bits, "float32"), f"codebook_decode{bits}")
    return _decode_to(func, kernel, key, dims, weight.shape, packed), [packed, call.args[1]]


def _gather(moved: np.ndarray, n: int) -> np.ndarray | None:
    """The source position of each element of the chain's result, or None when some
    element is not one of the weight's (padding, arithmetic)."""
    src = moved.astype(np.int64).reshape(-1) - 1
    ok = moved.size and np.array_equal(src + 1, moved.reshape(-1)) and src.min() >= 0 \
        and src.max() < n
    return src if ok else None


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


def _run(links, start: relax.Var, x: np.ndarray, mod: tvm.IRModule, built: dict):
    """The chain's result on x (float32, the flat weight), its kernels built for and run
    on the host, or None when a link is not a plain kernel call or does not build."""
    env = {start: tvm.runtime.tensor(x)}
    for link in links:
        call = link.value
        if call.op.name != "relax.call_tir" or len(call.args) != 2:
            return None  # a Relax operator or symbolic arguments: left to the kernels
        kernel = _host(call.args[0], mod, built)
        args = [env.get(a) if isinstance(a, relax.Var) else
                a.value if isinstance(a, tvm.ir.expr.Constant) else None
                for a in call.args[1].fields]
        out_ty = link.var.ty
        if kernel is None or any(a is None for a in args) or not isinstance(
                out_ty, relax.TensorType):
            return None
        out = tvm.runtime.empty([int(d) for d in out_ty.shape], out_ty.dtype)
        kernel(*args, out)
        env[link.var] = out
    return env[links[-1].var].numpy()


def _host(gv: relax.GlobalVar, mod: tvm.IRModule, built: dict):
    """The kernel `gv` built for this host (once per compile), or None."""
    if gv not in built:
        try:
            prim = mod[gv].with_attr("global_symbol", "main")
            built[gv] = tvm.compile(tvm.IRModule({"main": prim}), target="llvm")["main"]
        except Exception:  # noqa: BLE001  (a kernel only the target can build: keep it)
            built[gv] = None
    return built[gv]


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
