"""conv2d NCHW (dense, grouped, depthwise) with its fused epilogue: direct schedules, no search.

TOPI's conv is three stages in one PrimFunc: `pad_temp` (a padded copy of the input), the
`conv2d_nchw` / `group_conv2d_nchw` reduction, then the elementwise epilogue FuseOps put
after it (bias, batchnorm as scale/shift, ReLU/clip, residual add), sometimes followed by an
injective op of another shape (the next layer's explicit F.pad, a reshape): the "tail".

The epilogue is inlined into one output block; the conv is computed tile by tile under that
block's loops (compute_at), so a tile's accumulators stay in registers and the epilogue reads
them there. Two schedules:

  channel-vector  (dense and grouped convs) accumulators are vectors of output channels and
                  input pixels are broadcast, so stride, padding and kernel size do not matter;
                  the weight is repacked once at compile time to [OC/t, IC, KH, KW, t].
  depthwise       accumulators are vectors along the output row; stride-2 inputs are stored
                  de-interleaved (even / odd columns) so every load is contiguous.
"""

from __future__ import annotations

from dataclasses import dataclass

import tvm
from tvm import s_tir, tirx
from tvm.s_tir import dlight

from . import strided
from .common import RULE_MARK, cpu_kernel, root_blocks
from .elementwise import parallel_rows
from .isa import ISA, isa_of
from .layout import pack_input

# Below this many flops a conv runs on one thread: waking the thread pool costs more than
# it saves (zoo depthwise_separable, 12 channels 10x10: 0.022 ms serial, 0.041 ms parallel).
# Kept low: inside a model a serial kernel reads the half of its input that the previous
# (parallel) kernel left in the other core's cache, which cost MobileNetV2's 0.5-0.8 MFLOP
# depthwise convs 5x (960ch 7x7 NHWC: 22 us with one TVM thread, 113 us serial after
# parallel kernels, 24 us parallel; whole model 5.22 -> 4.69 ms NCHW, 7.25 -> 4.20 NHWC).
MIN_PARALLEL_FLOPS = 100_000

Block = s_tir.schedule.SBlockRV


@dataclass
class Conv:
    """The blocks of a fused conv PrimFunc and the conv's loop extents."""
    sch: s_tir.Schedule
    pad: Block | None
    conv: Block
    epilogue: list[Block]   # elementwise blocks over the conv's output, in order
    tail: list[Block]       # injective blocks of another shape after the epilogue
    n: int
    oc: int
    oh: int
    ow: int
    icg: int                # input channels per group
    kh: int
    kw: int
    ic: int
    stride_w: int
    layout: str = "NCHW"    # or "NHWC" (nhwc.py converted the graph; conv_nhwc.py schedules)

    @property
    def groups(self) -> int:
        return self.ic // self.icg

    @property
    def parallel(self) -> bool:
        flops = 2 * self.n * self.oc * self.oh * self.ow * self.icg * self.kh * self.kw
        return flops >= MIN_PARALLEL_FLOPS

    @property
    def depthwise(self) -> bool:
        return self.icg == 1 and self.groups == self.oc and self.groups > 1


# TOPI's conv block name -> (layout, positions of n, oc, oh, ow, icg, kh, kw among its iter
# vars, the iter var and input dim of the output column). TOPI orders the reduction axes as
# the layout orders them: (rc, ry, rx) for NCHW, (ry, rx, rc) for NHWC.
LAYOUTS = {
    "conv2d_nchw": ("NCHW", (0, 1, 2, 3, 4, 5, 6), 3),
    "group_conv2d_nchw": ("NCHW", (0, 1, 2, 3, 4, 5, 6), 3),
    "conv2d_nhwc": ("NHWC", (0, 3, 1, 2, 6, 4, 5), 2),
    "group_conv2d_nhwc": ("NHWC", (0, 3, 1, 2, 6, 4, 5), 2),
}


def parse(func: tirx.PrimFunc) -> Conv | None:
    """The conv blocks of `func`, or None when it is not a TOPI NCHW or NHWC conv2d + epilogue
    (fp32, or uint8/int8 x int8 accumulating in int32)."""
    sch = s_tir.Schedule(func)
    blocks = root_blocks(sch)
    names = [sch.get(b).name_hint for b in blocks]
    idx = [i for i, n in enumerate(names) if n in LAYOUTS]
    if len(idx) != 1 or idx[0] > 1 or (idx[0] == 1 and names[0] != "pad_temp"):
        return None
    i = idx[0]
    stmt = sch.get(blocks[i])
    if [int(v.iter_type) for v in stmt.iter_vars] != [0] * 4 + [2] * 3:  # SSSS RRR
        return None
    if len(stmt.reads) != 2 or _dtypes(stmt) not in DTYPES:
        return None
    ext = [int(v.dom.extent) for v in stmt.iter_vars]
    after = blocks[i + 1:]
    if any(int(v.iter_type) != 0 for b in after for v in sch.get(b).iter_vars):
        return None  # a reduction after the conv (a fused pool or mean): not ours
    n_epi = 0
    while n_epi < len(after) and _extents(sch, after[n_epi]) == ext[:4]:
        n_epi += 1
    layout, pos, col = LAYOUTS[names[i]]
    data = stmt.reads[0]
    return Conv(sch, blocks[0] if i == 1 else None, blocks[i], after[:n_epi], after[n_epi:],
                *(ext[p] for p in pos), ic=int(data.source.shape[layout.index("C")]),
                stride_w=strided.column_stride(data.region[col].min, stmt.iter_vars[col].var),
                layout=layout)


# (input, weight, accumulator) dtypes the rule schedules. Integer convs (qconv2d) take the
# fp32 loop nest with int32 lanes: no dot-product instructions yet, but vectorized and
# parallel instead of the serial scalar loops they were.
DTYPES = {("float32", "float32", "float32"), ("uint8", "int8", "int32"),
          ("int8", "int8", "int32")}


def _dtypes(stmt) -> tuple[str, str, str]:
    return (str(stmt.reads[0].source.dtype), str(stmt.reads[1].source.dtype),
            str(stmt.writes[0].source.dtype))


def _extents(sch: s_tir.Schedule, block: Block) -> list[int]:
    return [int(v.dom.extent) for v in sch.get(block).iter_vars]


# ---- tile choice ------------------------------------------------------------------------

@dataclass(frozen=True)
class ConvTiles:
    """Register tiles for one vector width, in order of preference (measured on Zen 4 with
    AVX-512 and with znver3 AVX2 code; see the kernel numbers in the rule table)."""
    lanes: tuple[int, ...]                      # vector widths: a full register, then half
    regs: int                                   # architectural vector registers
    channel_vector: tuple[tuple[int, int], ...]  # (channel vectors, columns)
    pointwise: tuple[tuple[int, int], ...]       # (channels, pixel vectors)
    pointwise_max_ic: int   # above this, channel-vector's longer reduction hides its epilogue
    depthwise_acc: int      # accumulators (rows x row vectors) per depthwise tile


# 14 accumulators beat 16-28 on AVX-512 (4x7 spills: 33 registers); AVX2's 16 registers
# hold 2x4 (+2 weights +1 broadcast) without spilling, 2x7 spills.
TILES = {
    16: ConvTiles(lanes=(16, 8), regs=32,
                  channel_vector=((2, 7), (1, 14), (2, 8), (2, 6), (2, 5), (1, 16), (2, 4),
                                  (3, 4), (1, 12), (1, 8), (1, 7)),
                  pointwise=((6, 2), (6, 1), (4, 2), (4, 1), (2, 2), (1, 2), (1, 1)),
                  pointwise_max_ic=48, depthwise_acc=14),
    8: ConvTiles(lanes=(8, 4), regs=16,
                 channel_vector=((2, 4), (1, 7), (1, 8), (2, 6), (1, 12), (3, 4), (2, 3),
                                 (1, 6), (1, 5), (1, 4)),
                 pointwise=((6, 2), (6, 1), (4, 2), (4, 1), (2, 2), (1, 2), (1, 1)),
                 pointwise_max_ic=24, depthwise_acc=12),
}


def tiles_for(isa: ISA) -> ConvTiles:
    return TILES.get(isa.f32_lanes, TILES[8])


def choose_channel_vector(ocg: int, ow: int, t: ConvTiles) -> tuple[int, int, int]:
    """(vb, nv, nw) for `ocg` output channels per group and rows of `ow` columns: the first
    table tile that divides both; then one that divides the channels (a predicated column
    tail); odd channel counts get one vector of the largest divisor that fits."""
    for need_cols in (True, False):
        for nv, nw in t.channel_vector:
            for vb in t.lanes:
                if ocg % (nv * vb) == 0 and (ow % nw == 0 or not need_cols):
                    return vb, nv, min(nw, ow)
    vb = max(d for d in range(1, min(ocg, 2 * t.lanes[0]) + 1) if ocg % d == 0)
    return vb, 1, min(ow, t.regs // 2)


def choose_pointwise(c: Conv, t: ConvTiles) -> tuple[int, int, int] | None:
    """(vb, no, nwv) when the pointwise schedule applies and pays: few input channels (the
    channel-vector epilogue would dominate) and tiles that divide the channels and pixels."""
    if not (c.kh == c.kw == 1 and c.stride_w == 1 and c.pad is None and c.groups == 1
            and c.ic <= t.pointwise_max_ic):
        return None
    pixels = c.oh * c.ow
    for no, nwv in t.pointwise:
        for vb in t.lanes:
            if c.oc % no == 0 and pixels % (nwv * vb) == 0:
                return vb, no, nwv
    return None


def choose_depthwise(c: Conv, t: ConvTiles) -> tuple[int, int, int]:
    """(vb, nwv, nh): row vectors of vb columns (a divisor of the row when one is at least half
    a register, so no tail), nwv of them, times nh rows, about depthwise_acc accumulators."""
    full = t.lanes[0]
    whole = [v for v in t.lanes if c.ow % v == 0]  # full or half registers, no tail
    vb = whole[0] if whole else max(d for d in range(1, full + 1) if c.ow % d == 0)
    if vb < full // 2 and c.ow > full:
        vb = full  # a row like 29 or 97: vectors with a predicated tail
    per_row = -(-c.ow // vb)
    nwv = max(d for d in range(1, min(per_row, t.depthwise_acc) + 1) if per_row % d == 0)
    rows = max(1, t.depthwise_acc // nwv)
    nh = max(d for d in range(1, min(rows, c.oh) + 1) if c.oh % d == 0)
    return vb, nwv, nh


# ---- the stages around the conv -----------------------------------------------------------

def output_block(c: Conv) -> Block:
    """Inline the epilogue into its last block (or add a copy-out block when there is none):
    the block whose tiles drive the conv."""
    if not c.epilogue:
        return c.sch.cache_write(c.conv, 0, "global")
    for b in c.epilogue[:-1]:
        c.sch.compute_inline(b)
    return c.epilogue[-1]


def private_output(c: Conv) -> None:
    """Before a rule relayouts the conv's output buffer: when no epilogue follows, that buffer
    is the function's output param, whose layout the caller fixes (NCHW); the conv then
    writes a buffer of its own and a copy-out block (its epilogue from now on) writes the
    param."""
    if not c.epilogue:
        c.epilogue = [c.sch.cache_write(c.conv, 0, "global")]


def schedule_pad(c: Conv, lanes: int) -> None:
    """A padding copy runs as its own parallel, vectorized stage (inlined into the conv it
    would put a bounds test in the inner loop); a copy that pads nothing is inlined. A
    depthwise conv pads each channel's plane where it uses it (pad_channel_plane)."""
    sch = c.sch
    if c.pad is None:
        return
    if not _has_if(sch.get(c.pad)):
        sch.compute_inline(c.pad)
        c.pad = None
        return
    if not c.depthwise:  # a depthwise conv pads per channel plane or tile, where it reads
        parallel_rows(sch, c.pad, lanes, c.parallel)


def pad_channel_plane(c: Conv, channel_loop, lanes: int) -> None:
    """Depthwise: the padded copy of one channel's plane is made inside the channel loop,
    right before the conv reads it, so it stays in cache (113x113 floats: 51 kB) instead of a
    whole padded tensor going out to memory and back (MobileNetV2's 96x113x113: 4.9 MB)."""
    if c.pad is None:
        return
    sch = c.sch
    sch.compute_at(c.pad, channel_loop, preserve_unit_loops=True)
    inner = sch.get_loops(c.pad)[-1]
    _, vec = sch.split(inner, [None, lanes])
    sch.vectorize(vec)


def schedule_tail(c: Conv, lanes: int) -> None:
    """Blocks after the epilogue with another shape (the next layer's F.pad): parallel,
    vectorized copies."""
    for b in c.tail:
        parallel_rows(c.sch, b, lanes, c.parallel)


def _parallel(c: Conv, loop) -> None:
    if c.parallel:
        c.sch.parallel(loop)


def _has_if(block_stmt) -> bool:
    return bool(tvm.get_global_func("s_tir.schedule.HasIfThenElse")(block_stmt))


# ---- schedules ----------------------------------------------------------------------------

def schedule_channel_vector(c: Conv, vb: int, nv: int, nw: int) -> None:
    """Direct conv, output channels in vectors: a tile of nv vectors (t = nv*vb channels) x
    nw output columns of one row, nv*nw accumulators. Per reduction step (ic, ky, kx) it
    loads nv weight vectors and broadcasts nw input pixels, so any stride works. The
    weight is packed to [OC/t, IC/groups, KH, KW, t]: the reduction streams through it."""
    sch, t = c.sch, nv * vb
    pack_input(sch, c.conv, sch.get(c.conv).reads[1].source,
               lambda o, i, h, w: (o // t, i, h, w, o % t))
    # channels innermost in the accumulator tile, so each accumulator is one register
    private_output(c)
    sch.transform_layout(c.conv, ("write", 0), lambda n, o, h, w: (n, h, w, o))
    out = output_block(c)
    n, o, h, w = sch.get_loops(out)
    o0, o1 = sch.split(o, [None, t])
    w0, w1 = sch.split(w, [None, nw])
    sch.reorder(n, o0, h, w0, o1, w1)
    _parallel(c, sch.fuse(n, o0, h))
    sch.compute_at(c.conv, w0, preserve_unit_loops=True)
    _, co, _, cw, rc, ry, rx = sch.get_loops(c.conv)[-7:]
    cv, cl = sch.split(co, [nv, vb])
    sch.reorder(rc, ry, rx, cw, cv, cl)
    sch.unroll(cw)
    sch.unroll(cv)
    if vb > 1:
        sch.vectorize(cl)
    sch.decompose_reduction(c.conv, rc)
    # the epilogue reads the tile transposed; LLVM turns this into in-register shuffles
    sch.unroll(o1)
    sch.unroll(w1)
    sch.annotate(out, RULE_MARK, "conv2d.channel_vector")


def schedule_pointwise(c: Conv, vb: int, no: int, nwv: int) -> None:
    """1x1 stride-1 unpadded conv as a matmul over the flattened pixels p = h*W + w, which
    are contiguous in both the input and the output: a tile of `no` output channels x nwv
    vectors of vb pixels. Per input channel it broadcasts `no` weights and loads nwv input
    vectors; the epilogue stores whole vectors (no transposition, unlike channel-vector)."""
    sch, width = c.sch, c.ow
    pack_input(sch, c.conv, sch.get(c.conv).reads[1].source,
               lambda o, i, h, w: (o // no, i, h, w, o % no))
    private_output(c)
    sch.transform_layout(c.conv, ("write", 0), lambda n, o, h, w: (n, o, h * width + w))
    sch.transform_block_layout(c.conv, lambda n, o, h, w, i, r, s: (n, o, h * width + w, i, r, s))
    out = output_block(c)
    sch.transform_block_layout(out, lambda n, o, h, w: (n, o, h * width + w))
    n, o, p = sch.get_loops(out)
    o0, o1 = sch.split(o, [None, no])
    p0, p1 = sch.split(p, [None, nwv * vb])
    sch.reorder(n, o0, p0, o1, p1)
    tile = sch.fuse(n, o0, p0)
    _parallel(c, tile)
    sch.compute_at(c.conv, tile, preserve_unit_loops=True)
    _, co, cp, rc, ry, rx = sch.get_loops(c.conv)[-6:]
    pv, pl = sch.split(cp, [nwv, vb])
    sch.reorder(rc, ry, rx, co, pv, pl)
    sch.unroll(co)
    sch.unroll(pv)
    sch.vectorize(pl)
    sch.decompose_reduction(c.conv, rc)
    _, ol = sch.split(p1, [None, vb])
    sch.vectorize(ol)
    sch.annotate(out, RULE_MARK, "conv2d.pointwise")


def schedule_depthwise(c: Conv, vb: int, nwv: int, nh: int, lanes: int) -> None:
    """Depthwise conv, vectors along the output row: a tile of nh rows x nwv vectors of vb
    columns of one channel (nh*nwv accumulators); per tap one weight broadcast and one input
    load per accumulator. The weight needs no packing: a channel's taps are contiguous."""
    sch = c.sch
    out = output_block(c)
    n, ch, h, w = sch.get_loops(out)
    h0, h1 = sch.split(h, [None, nh])
    w0, w1 = sch.split(w, [None, nwv * vb])
    sch.reorder(n, ch, h0, w0, h1, w1)
    channel = sch.fuse(n, ch)
    _parallel(c, channel)
    sch.compute_at(c.conv, w0, preserve_unit_loops=True)
    pad_channel_plane(c, channel, lanes)
    _, _, ch_, cw, rc, ry, rx = sch.get_loops(c.conv)[-7:]
    wv, wl = sch.split(cw, [nwv, vb])
    sch.reorder(rc, ry, rx, ch_, wv, wl)
    for loop in (ry, rx, ch_, wv):
        sch.unroll(loop)
    dtype = _dtypes(sch.get(c.conv))[2]
    if strided.applies(c.stride_w, c.ow, vb, dtype):
        # stride 2: each tap's lanes from two vector loads and a shuffle (strided.py)
        init = sch.decompose_reduction(c.conv, rc)
        sch.tensorize(wl, strided.intrin("fma", vb, dtype))
        sch.vectorize(sch.get_loops(init)[-1])
    else:
        sch.vectorize(wl)
        sch.decompose_reduction(c.conv, rc)
    _, ol = sch.split(w1, [None, vb])
    sch.vectorize(ol)
    sch.annotate(out, RULE_MARK, "conv2d.depthwise")


class Conv2D(dlight.ScheduleRule):
    """NCHW fp32 conv2d (+ fused epilogue) on LLVM CPU targets."""

    def apply(self, func, target: tvm.target.Target, _tunable: bool):
        if not cpu_kernel(func, target):
            return None
        c = parse(func)
        if c is None:
            return None
        isa = isa_of(target)
        schedule_pad(c, isa.f32_lanes)
        schedule_tail(c, isa.f32_lanes)
        t = tiles_for(isa)
        if c.layout == "NHWC":
            from . import conv_nhwc  # it imports this module's helpers

            conv_nhwc.schedule(c, t, isa.f32_lanes)
        elif c.depthwise:
            schedule_depthwise(c, *choose_depthwise(c, t), lanes=isa.f32_lanes)
        elif (pw := choose_pointwise(c, t)) is not None:
            schedule_pointwise(c, *pw)
        else:
            schedule_channel_vector(c, *choose_channel_vector(c.oc // c.groups, c.ow, t))
        return c.sch
