"""im2col for graphc.qconv2d's matmul lowering (lower_quant.py): a hand-scheduled byte copy.

    cols[n, ci, ky, kx, y, x] = x[n, ci, y*sh + ky*dh, x*sw + kx*dw]      (x already padded)

viewed as [n, ci*kh*kw, oh*ow], the K x pixels right operand of W[O, K] @ cols. It is its own
kernel, marked opaque: left injective, FuseOps inlines the quantize chain that produced x into
it and every input is re-quantized kh*kw times (ResNet-18's 64-channel layers: 4.8 ms instead
of a ~0.1 ms copy). Scheduled here, not by the rule table, because the generic injective rule
fuses the pixel loops into one vector with div/mod addressing, which loads lane by lane.
"""

from __future__ import annotations

from tvm import relax, s_tir, te

from .schedules.common import loop_extent

OPAQUE = 8  # relax's OpPatternKind.kOpaque
LANES = 16  # a byte vector of 16: one xmm; rows of ResNet/MobileNet convs are 7..112 wide


def emit_im2col(bb: relax.BlockBuilder, x: relax.Expr, kh: int, kw: int, stride, dilation,
                oh: int, ow: int, target=None) -> relax.Expr:
    """Add the im2col kernel for `x` to the module being built; the [n, K, oh*ow] result.
    Scheduled here for CPUs (target None or LLVM); on other targets it stays unscheduled, for
    that target's own rules (CUDA: dlight's Fallback binds it to GPU threads)."""
    shape = [int(d) for d in x.ty.shape]
    n, c = shape[0], shape[1]
    func = _compute(shape, x.ty.dtype, kh, kw, stride, dilation, oh, ow)
    if target is None or target.kind.name == "llvm":
        func = _schedule(func)
    gv = bb.add_func(func.with_attr("op_pattern", OPAQUE), "im2col")
    cols = bb.emit(relax.call_tir(gv, [x], relax.TensorType([n, c, kh, kw, oh, ow],
                                                             x.ty.dtype)))
    return relax.op.reshape(cols, [n, c * kh * kw, oh * ow])


def _compute(shape, dtype, kh, kw, stride, dilation, oh, ow):
    (sh, sw), (dh, dw) = stride, dilation
    data = te.placeholder(shape, dtype, name="x")
    cols = te.compute((shape[0], shape[1], kh, kw, oh, ow),
                      lambda b, ci, ky, kx, y, xx: data[b, ci, y * sh + ky * dh, xx * sw + kx * dw],
                      name="im2col")
    return te.create_prim_func([data, cols]).without_attr("global_symbol")


def _schedule(func):
    """Parallel over (image, channel), whole row copies vectorized along the output row."""
    sch = s_tir.Schedule(func)
    block = sch.get_sblock("im2col")
    b, ci, *_, xx = sch.get_loops(block)  # (image, channel, ky, kx, y, x)
    sch.parallel(sch.fuse(b, ci))
    width = loop_extent(sch, xx)
    if width and width > 1:
        _, vec = sch.split(xx, [None, min(LANES, width)])
        sch.vectorize(vec)
    return sch.mod["main"].with_attr("tirx.is_scheduled", True)
