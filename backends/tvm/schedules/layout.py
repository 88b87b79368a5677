"""Constant weights packed into the layout a schedule wants, once, at compile time.

A schedule rule that wants a weight in another layout (a matmul micro-kernel's column
panels, a conv kernel's output-channel blocks) does not repack it per call. It marks the
copy into the new layout as a *layout-rewrite preproc* block, MetaSchedule's mechanism:

    packed = pack_input(sch, block, buffer, index_map)     # in the rule, on one kernel

and the schedule phase brackets the rules with the Relax passes that turn it into data:

    before_schedule()   AttachAttrLayoutFreeBuffers: a PrimFunc learns which of its params
                        are Relax constants (attr "layout_free_buffers", param indices)
    after_schedule()    SplitLayoutRewritePreproc moves each preproc block into its own
                        PrimFunc (`<kernel>_weight_prepack`) called before the kernel
                        (`<kernel>_prepacked`, which takes the packed buffer); FoldConstant
                        runs that call on the constant at compile time, so the built module
                        holds only packed weights and nothing repacks per call.

A rule must pack only buffers `is_layout_free` says are constants: on anything else the
preproc would stay in the graph and run on every call (correct, but slow).
"""

from __future__ import annotations

from collections.abc import Callable

import tvm
from tvm import relax, s_tir, tirx

# The block annotation SplitLayoutRewritePreproc looks for (TVM's attr name, C++ side).
PREPROC = "meta_schedule.layout_rewrite_preproc"


def layout_free_params(func: tirx.PrimFunc) -> set[int]:
    """Indices of `func`'s params that are compile-time constants at every call site."""
    attr = func.attrs.get("layout_free_buffers") if func.attrs is not None else None
    return {int(i) for i in attr} if attr is not None else set()


def is_layout_free(func: tirx.PrimFunc, buffer: tirx.Buffer) -> bool:
    """True when `buffer` is a param of `func` that AttachAttrLayoutFreeBuffers marked."""
    free = layout_free_params(func)
    # TVM 0.27: a PrimFunc's params are its buffers (no separate buffer_map).
    return any(i in free and p.same_as(buffer) for i, p in enumerate(func.params))


def pack_input(sch: s_tir.Schedule, block: s_tir.schedule.SBlockRV, buffer: tirx.Buffer,
               index_map: Callable, pad_value: float | None = None, preproc: bool = True
               ) -> s_tir.schedule.SBlockRV:
    """Make `block` read `buffer` (a layout-free param) through a packed copy laid out by
    `index_map` (old indices -> new indices); returns the copy block, marked as a preproc.
    pad_value fills the packed buffer where index_map's range overhangs the source (tile
    sizes that do not divide the dimension); the kernel must not rely on other padding.
    preproc=False: an activation (not a constant); the copy stays in the kernel, per call,
    and the caller schedules it."""
    copy = sch.cache_read(block, read_index(sch, block, buffer), "global")
    return _relayout(sch, copy, block, index_map, pad_value, preproc)


def pack_producer(sch: s_tir.Schedule, producer: s_tir.schedule.SBlockRV,
                  consumer: s_tir.schedule.SBlockRV, index_map: Callable,
                  pad_value: float | None = None, preproc: bool = True
                  ) -> s_tir.schedule.SBlockRV:
    """Like pack_input for an existing single-input copy block (say pad_einsum's zero-pad of
    a weight) that reads a layout-free param: its output takes `index_map`'s layout, and
    the padding and packing fold into one constant."""
    return _relayout(sch, producer, consumer, index_map, pad_value, preproc)


def _relayout(sch, copy, consumer, index_map, pad_value, preproc):
    written = sch.get(copy).writes[0].source
    sch.transform_layout(consumer, ("read", read_index(sch, consumer, written)), index_map,
                         pad_value=pad_value)
    if preproc:
        sch.annotate(copy, PREPROC, True)
    return copy


def read_index(sch: s_tir.Schedule, block, buffer: tirx.Buffer) -> int:
    """Position of `buffer` among `block`'s reads (what cache_read and transform_layout take)."""
    reads = [r.source for r in sch.get(block).reads]
    for i, b in enumerate(reads):
        if b.same_as(buffer):
            return i
    raise ValueError(f"block {sch.get(block).name_hint} does not read {buffer.name}")


def before_schedule() -> list[tvm.transform.Pass]:
    """Relax passes that must run before the schedule rules (they read the attr)."""
    return [relax.transform.AttachAttrLayoutFreeBuffers()]


@tvm.transform.module_pass(opt_level=0, name="graphc.WrapRootBlock")
def wrap_root_block(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
    """Give every PrimFunc a "root" block. SplitLayoutRewritePreproc takes a function's top
    block as its root and checks that a block sits under it; a kernel that TOPI wrote as one
    opaque block (topk's and sort's extern call, scatter's ir_builder loops) has none and
    aborted the build. Nesting that block under an empty root changes no computation."""
    for gv, func in list(mod.functions.items()):
        if not isinstance(func, tirx.PrimFunc):
            continue
        body = func.body
        if isinstance(body, s_tir.SBlockRealize) and body.block.name_hint == "root":
            continue
        root = s_tir.SBlock([], [], [], "root", body)
        mod[gv] = func.with_body(s_tir.SBlockRealize([], True, root))
    return mod


def after_schedule() -> list[tvm.transform.Pass]:
    """Relax passes that turn the rules' preproc blocks into packed constants."""
    return [
        wrap_root_block,
        relax.transform.SplitLayoutRewritePreproc(),
        # Evaluates each `_weight_prepack` call on its constant (builds and runs it on the
        # host); the unpacked weights become dead and DCE drops them from the module.
        relax.transform.FoldConstant(),
        relax.transform.DeadCodeElimination(),
    ]
