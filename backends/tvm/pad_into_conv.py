"""Relax: an explicit zero pad in front of a conv2d becomes the conv's own padding.

    lv = R.nn.pad(x, pad_width=[0, 0, 0, 0, t, b, l, r], pad_value=0)
    y  = R.nn.conv2d(lv, w, padding=(pt, pl, pb, pr))   ->   R.nn.conv2d(x, w,
                                                              padding=(pt+t, pl+l, pb+b, pr+r))

Why in Relax: aten.convolution pads both sides equally, so graphc's fold-pad pass must leave
TensorFlow's asymmetric "SAME" pads ([0, 1, 0, 1] in front of every stride-2 conv) and, in
the benchmarks' pipeline, every pad. Left alone, FuseOps fuses the pad into the *producer*
kernel as a tail: the producer writes its whole output, then copies it into a padded buffer
that the conv reads, two extra passes over the activation. In MobileNetV2 that is the
96x112x112 expansion conv's output (4.8 MB) before the first stride-2 depthwise conv: a
1x1 conv + ReLU6 + pad kernel ran 1.23 ms against 0.78 ms without the pad. Relax's conv2d
takes four padding values, and the conv rule (schedules/conv.py) builds the padded rows it
reads next to the conv, in cache.

Only zero pads of the spatial (last two) axes of NCHW data fold; a pad that other bindings
also read stays for them.
"""

from __future__ import annotations

import tvm
from tvm import relax

PAD, CONV = tvm.ir.Op.get("relax.nn.pad"), tvm.ir.Op.get("relax.nn.conv2d")


@tvm.transform.module_pass(opt_level=0, name="GraphcPadIntoConv")
def pad_into_conv(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
    """conv2d(pad(x)) with a zero spatial pad -> conv2d(x) with the pad in its padding."""
    out = tvm.IRModule(mod.functions, mod.attrs)
    changed = False
    for gv, func in mod.functions_items():
        if not isinstance(func, relax.Function) or not isinstance(func.body, relax.SeqExpr):
            continue
        pads = {b.var: b.value for blk in func.body.blocks for b in blk.bindings
                if _zero_spatial_pad(b.value)}
        if not pads:
            continue
        blocks = [type(blk)([_fold(b, pads) for b in blk.bindings]) for blk in func.body.blocks]
        body = relax.SeqExpr(blocks, func.body.body)
        out[gv] = relax.Function(func.params, body, func.ret_ty, func.is_pure, func.attrs)
        changed = True
    # the pads no conv reads any more go: DeadCodeElimination runs later in the pipeline
    return relax.transform.Normalize()(out) if changed else mod


def _zero_spatial_pad(value) -> bool:
    if not (isinstance(value, relax.Call) and value.op.same_as(PAD)):
        return False
    a = value.attrs
    width = [int(v) for v in a.pad_width]
    return (str(a.pad_mode) == "constant" and float(a.pad_value) == 0.0 and len(width) == 8
            and not any(width[:4]) and min(width) >= 0)


def _fold(binding: relax.VarBinding, pads: dict) -> relax.VarBinding:
    call = binding.value
    if not (isinstance(call, relax.Call) and call.op.same_as(CONV)
            and call.args[0] in pads and str(call.attrs.data_layout) == "NCHW"):
        return binding
    pad = pads[call.args[0]]
    _, _, _, _, top, bottom, left, right = (int(v) for v in pad.attrs.pad_width)
    pt, pl, pb, pr = (int(v) for v in call.attrs.padding)
    a = call.attrs
    conv = relax.op.nn.conv2d(pad.args[0], call.args[1], strides=a.strides,
                              padding=(pt + top, pl + left, pb + bottom, pr + right),
                              dilation=a.dilation, groups=a.groups, data_layout=a.data_layout,
                              kernel_layout=a.kernel_layout, out_layout=a.out_layout,
                              out_dtype=a.out_dtype)
    return relax.VarBinding(binding.var, conv)
