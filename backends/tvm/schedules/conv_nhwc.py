"""conv2d NHWC (dense, grouped, depthwise) with its fused epilogue: direct schedules, no search.

The graph is NHWC when nhwc.py converted it (the CPU presets' default). Channels are
innermost in the input, the weight (after packing) and the output, so both schedules keep
accumulators as vectors of channels:

  channel-vector  (dense, grouped, 1x1) a tile of nv channel vectors x nw output columns;
                  per reduction step (ky, kx, ic) nv weight vectors are loaded and nw input
                  pixels broadcast. Unlike NCHW's channel-vector the epilogue stores the
                  accumulators as they are: the output is NHWC too, no transposition.
  depthwise       a tile of nv channel vectors x nw output columns of one row; per tap nv
                  weight vectors and nv*nw input vectors, all contiguous loads whatever the
                  stride, and every lane used whatever the width of the row (NCHW's row
                  vectors waste lanes on MobileNetV2's 14- and 7-wide rows). Padding is
                  read through its bounds test, no padded copy.

Weights are packed once at compile time (layout.py): [OC/t, KH, KW, IC/groups, t] for
channel-vector, [KH, KW, C] for depthwise (the weight arrives as OHWI).
"""

from __future__ import annotations

from .common import RULE_MARK
from .conv import Conv, ConvTiles, _parallel, choose_channel_vector, output_block
from .layout import pack_input


def choose_depthwise(c: Conv, t: ConvTiles) -> tuple[int, int, int]:
    """(vb, nv, nw): nv vectors of vb channels (vb a divisor of the channels, a full register
    when it can be) x nw columns (a divisor of the row), about depthwise_acc accumulators."""
    vb = next((v for v in t.lanes if c.oc % v == 0), None)
    if vb is None:
        vb = max(d for d in range(1, t.lanes[0] + 1) if c.oc % d == 0)
    nv = 2 if c.oc % (2 * vb) == 0 and c.ow < t.depthwise_acc else 1
    cols = max(1, t.depthwise_acc // nv)
    nw = max(d for d in range(1, min(cols, c.ow) + 1) if c.ow % d == 0)
    return vb, nv, nw


def schedule_channel_vector(c: Conv, vb: int, nv: int, nw: int) -> None:
    """Direct NHWC conv: a tile of t = nv*vb output channels x nw columns of one row."""
    sch, t = c.sch, nv * vb
    pack_input(sch, c.conv, sch.get(c.conv).reads[1].source,
               lambda o, h, w, i: (o // t, h, w, i, o % t))
    out = output_block(c)
    n, h, w, o = sch.get_loops(out)
    o0, o1 = sch.split(o, [None, t])
    w0, w1 = sch.split(w, [None, nw])
    sch.reorder(n, o0, h, w0, w1, o1)
    _parallel(c, sch.fuse(n, o0, h))
    sch.compute_at(c.conv, w0, preserve_unit_loops=True)
    _accumulate(c, nv, vb)
    _store(c, w1, o1, vb)
    sch.annotate(out, RULE_MARK, "conv2d.nhwc_channel_vector")


def schedule_depthwise(c: Conv, vb: int, nv: int, nw: int) -> None:
    """Depthwise NHWC conv: a tile of nv*vb channels x nw columns of one output row."""
    sch, t = c.sch, nv * vb
    pack_input(sch, c.conv, sch.get(c.conv).reads[1].source,
               lambda o, h, w, i: (h, w, i, o))
    out = output_block(c)
    n, h, w, ch = sch.get_loops(out)
    c0, c1 = sch.split(ch, [None, t])
    w0, w1 = sch.split(w, [None, nw])
    sch.reorder(n, h, c0, w0, w1, c1)
    tile = sch.fuse(n, h, c0)
    _parallel(c, tile)
    sch.compute_at(c.conv, w0, preserve_unit_loops=True)
    if c.pad is not None:
        # read through the padding test: it depends on the pixel only, so each channel
        # vector is one load behind one predictable branch. A padded copy of the tile's
        # rows cost more than the conv (per kernel, us: 576ch 14x14 56 -> 26, 960ch 7x7
        # 20 -> 13.5, 144ch 56x56 161 -> 101)
        sch.compute_inline(c.pad)
    _accumulate(c, nv, vb)
    _store(c, w1, c1, vb)
    sch.annotate(out, RULE_MARK, "conv2d.nhwc_depthwise")


def _accumulate(c: Conv, nv: int, vb: int) -> None:
    """The conv block under the tile: reduction outside, then columns and channel vectors
    unrolled (one register each), lanes vectorized; the taps unrolled when small."""
    sch = c.sch
    _, _, cw, co, ry, rx, rc = sch.get_loops(c.conv)[-7:]
    cv, cl = sch.split(co, [nv, vb])
    sch.reorder(ry, rx, rc, cw, cv, cl)
    sch.unroll(cw)
    sch.unroll(cv)
    if vb > 1:
        sch.vectorize(cl)
    if c.depthwise:
        sch.unroll(ry)
        sch.unroll(rx)
    sch.decompose_reduction(c.conv, ry)


def _store(c: Conv, cols, channels, vb: int) -> None:
    """The epilogue over the tile: columns unrolled, channels in whole vectors."""
    sch = c.sch
    sch.unroll(cols)
    ov, ol = sch.split(channels, [None, vb])
    sch.unroll(ov)
    if vb > 1:
        sch.vectorize(ol)


def schedule(c: Conv, t: ConvTiles, lanes: int) -> None:
    """The NHWC rule for one parsed conv (pad and tail blocks already scheduled)."""
    if c.depthwise:
        schedule_depthwise(c, *choose_depthwise(c, t))
    else:
        schedule_channel_vector(c, *choose_channel_vector(c.oc // c.groups, c.ow, t))
