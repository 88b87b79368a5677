"""Weights decoded once stay decoded once: the kernels' relayout of them moves into the decode.

A decode function (decode_once.py; lower_codebook.py: codebook weights; lower_sparse.py:
sparse ones) gives the flat dense weight, and decode_once.decode_at_load runs it once, when
the model loads. What `main` does with it next is a chain of kernels whose only input is
that weight: a reshape to the layer's shape, the transpose a matmul wants, the
`_weight_prepack` a conv schedule adds (schedules/layout.py; FoldConstant runs it at compile
time on a constant weight, but a decoded weight is not a constant). Left in `main`, the
chain runs on every call; on ResNet-18 that is every weight read and written again per
inference. This pass moves such a chain into the decode function, so that what is decoded
(and cached) is the chain's result:

    main:   w = decode_once(packed, codebook)              main:  p = decode_once'(packed, ...)
            r = call_tir(reshape, (w,))                ->          y = call_tir(conv, (x, p))
            p = call_tir(conv_weight_prepack, (r,))
            y = call_tir(conv, (x, p))
    decode_once':  w = decode(...); r = reshape(w); p = prepack(r); return p

When the chain only moves the elements of a codebook weight, decode_permute.py drops its
kernels instead: the decode kernel writes the elements where the chain would put them
(decode_once' = decode into p's layout, then a free reshape).

A link joins the chain only if it is the previous value's single use and reads no other
variable (constants are fine), so nothing that depends on the inputs is cached.

mark_decoded_layout_free (before the schedule rules) lets the rules treat a decoded weight
as they treat a constant: a matmul then reads it from packed panels too, and its prepack is
one more link of the chain.
"""

from __future__ import annotations

import tvm
import tvm_ffi
from tvm import relax

from .decode_once import DECODE_ONCE, decode_funcs, substitute
from .decode_permute import relaid_decodes


@tvm.transform.module_pass(opt_level=0, name="GraphcCacheDecodedChains")
def cache_decoded_chains(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
    """decode call + single-use relayout chain in main -> one decode call."""
    once = decode_funcs(mod)
    if not once or "main" not in [gv.name_hint for gv in mod.get_global_vars()]:
        return mod
    bb = relax.BlockBuilder(mod)  # add_func gives the new functions typed GlobalVars
    main_gv = mod.get_global_var("main")
    main = mod[main_gv]
    uses = _uses(main.body)
    blocks = [type(block)(_rewrite_block(block, once, uses, bb)) for block in main.body.blocks]
    body = relax.SeqExpr(blocks, main.body.body)
    bb.update_func(main_gv, relax.Function(main.params, body, main.ret_ty, main.is_pure,
                                           main.attrs))
    return relax.transform.Normalize()(bb.get())


def _uses(seq: relax.SeqExpr) -> dict:
    """var -> number of bindings (and the result) that read it."""
    count: dict = {}
    exprs = [b.value for blk in seq.blocks for b in blk.bindings] + [seq.body]
    for e in exprs:
        for v in relax.analysis.free_vars(e):
            count[v] = count.get(v, 0) + 1
    return count


def _rewrite_block(block, once: dict, uses: dict, bb: relax.BlockBuilder) -> list:
    """One binding block's bindings, each decode call merged with its relayout chain
    (the extended decode functions are added to bb)."""
    bindings = list(block.bindings)
    users = _users(bindings)
    drop, replace, found = set(), {}, []
    for i, b in enumerate(bindings):
        call = b.value
        if not (isinstance(call, relax.Call) and isinstance(call.op, relax.GlobalVar)
                and call.op in once):
            continue
        chain = _chain(b.var, bindings, users, uses)
        if chain:
            links = [bindings[j] for j in chain]
            key = f"{once[call.op].attrs[DECODE_ONCE]}/{_layout_hash(links, bb.get())}"
            found.append((i, chain, (once[call.op], call, links, b.var, key)))
    # no relayout kernels when a relayout only moves elements (decode_permute.py), else its
    # kernels appended to the decode
    relaid = relaid_decodes([case for _, _, case in found], bb)
    for (i, chain, (func, call, links, start, key)), done in zip(found, relaid):
        func, args = done or (_extend(func, links, start, key), call.args)
        last = bindings[chain[-1]]
        gv = bb.add_func(func, f"{call.op.name_hint}_{last.var.name}")
        replace[i] = relax.VarBinding(last.var, relax.Call(gv, args))
        drop.update(chain)
    # the cached call binds the chain's last var at the decode call's position: its args are
    # constants, and that position is before every link, so before every user of the result
    return [replace.get(i, b) for i, b in enumerate(bindings) if i not in drop]


def _users(bindings) -> dict:
    """var -> indices of the bindings that read it."""
    users: dict = {}
    for i, b in enumerate(bindings):
        for v in relax.analysis.free_vars(b.value):
            users.setdefault(v, []).append(i)
    return users


def _chain(start: relax.Var, bindings, users: dict, uses: dict) -> list[int]:
    """Indices of the bindings that form start's relayout chain (possibly empty)."""
    chain, cur = [], start
    while uses.get(cur, 0) == 1 and len(users.get(cur, [])) == 1:
        j = users[cur][0]
        value = bindings[j].value
        if not (isinstance(value, relax.Call) and _pure_op(value)):
            break
        if [v for v in relax.analysis.free_vars(value)] != [cur]:
            break  # it reads something else too (an input, another weight)
        chain.append(j)
        cur = bindings[j].var
    return chain


def _pure_op(call: relax.Call) -> bool:
    """call_tir of a kernel, or a pure Relax operator (say reshape)."""
    if isinstance(call.op, tvm.ir.Op):
        return call.op.name == "relax.call_tir" or not call.op.name.startswith(
            ("relax.call_", "relax.builtin", "relax.vm", "relax.memory"))
    return False


def _extend(func: relax.Function, links, start: relax.Var, key: str) -> relax.Function:
    """func with `links` (main's bindings, reading `start` first) appended, returning the
    last link's value, as the decoder of the cached weight `key`."""
    (block,) = func.body.blocks
    subst = {start: func.body.body}  # the decode's result (decode_once.decode_func)
    fresh = []
    for link in links:
        var = relax.Var(link.var.name, link.var.ty)
        fresh.append(relax.VarBinding(var, substitute(link.value, subst)))
        subst[link.var] = var
    last = fresh[-1].var
    body = relax.SeqExpr([relax.BindingBlock([*block.bindings, *fresh])], last)
    attrs = tvm.ir.make_node("ir.DictAttrs", **{**dict(func.attrs), DECODE_ONCE: key})
    return relax.Function(func.params, body, last.ty, func.is_pure, attrs)


def _layout_hash(links, mod: tvm.IRModule) -> str:
    """Structural hash of the links: the kernels they call and how. The cached tensor is in
    the links' layout: its name says which (two compiles of one model, e.g. tuned and not,
    must not share a cache entry)."""
    parts = []
    for link in links:
        call = link.value
        kernel = call.args[0] if call.op.name == "relax.call_tir" else None
        parts.append(tvm_ffi.structural_hash(mod[kernel]) if kernel is not None else 0)
        parts.append(tvm_ffi.structural_hash(call.ty_args))
    return f"{abs(hash(tuple(parts))):x}"


@tvm.transform.module_pass(opt_level=0, name="GraphcMarkDecodedLayoutFree")
def mark_decoded_layout_free(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
    """kernel params fed only by decoded weights -> also in the kernel's layout_free_buffers.

    Runs after AttachAttrLayoutFreeBuffers (which marks Relax constants). A schedule rule then
    packs a decoded weight as it packs a constant one (a `_weight_prepack` preproc), and
    cache_decoded_chains moves that prepack into the decode function. A kernel called
    from several places gets the mark only where every call passes a decoded value."""
    once = set(decode_funcs(mod))
    if not once or "main" not in [gv.name_hint for gv in mod.get_global_vars()]:
        return mod
    main = mod["main"]
    static: set = set()  # vars computed from decoded weights and constants only
    votes: dict = {}  # kernel GlobalVar -> {param index: every call passes a static value}
    for block in main.body.blocks:
        for b in block.bindings:
            call = b.value
            if not isinstance(call, relax.Call):
                continue
            free = relax.analysis.free_vars(call)
            decoded = isinstance(call.op, relax.GlobalVar) and call.op in once
            if decoded or (_pure_op(call) and free and all(v in static for v in free)):
                static.add(b.var)
            if isinstance(call.op, tvm.ir.Op) and call.op.name == "relax.call_tir":
                kernel, args = call.args[0], list(call.args[1].fields)
                seen = votes.setdefault(kernel, {})
                for i, a in enumerate(args):
                    seen[i] = seen.get(i, True) and isinstance(a, relax.Var) and a in static
    for kernel, seen in votes.items():
        marked = {i for i, ok in seen.items() if ok}
        func = mod[kernel]
        if not marked or not isinstance(func, tvm.tirx.PrimFunc):
            continue
        old = func.attrs.get("layout_free_buffers") if func.attrs is not None else None
        both = sorted(marked | {int(i) for i in (old or [])})
        mod[kernel] = func.with_attr("layout_free_buffers", both)
    return mod
