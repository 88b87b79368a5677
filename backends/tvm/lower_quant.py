"""Relax lowerings of graphc's quantization ops (graphc/ops_quant.py, graphc/ops_qint.py).

Integer ops become integer Relax ops: qlinear is `matmul(x_u8, w_i8, out_dtype="int32")`
followed by the dequantizing epilogue (subtract the zero-point correction, cast, scale, add
bias), which FuseOps keeps in the matmul's kernel, where the int8 schedule rule
(schedules/int8.py) runs it on the dot-product instructions. A dense qconv2d (groups 1) is
the same rule's `matmul(W[O, C*kh*kw], cols[C*kh*kw, OH*OW])`, cols being x itself (1x1,
stride 1) or an im2col copy (im2col.py) of x, which the graph already padded with the zero
point; a grouped or depthwise one is `conv2d(out_dtype="int32")`. quantize is divide, round
(half to even, as torch.round), add, clip, cast: fused into whatever produced x.

On a target whose only 8-bit dot instruction is signed (AArch64 dotprod's sdot, without
i8mm's usdot for u8 x s8 or any s8 x u8 form), qlinear and qconv2d feed the kernel x - 128
as int8 and zero point - 128 instead: since
sum((x - 128) w) - (zp - 128) sum(w) = sum(x w) - zp sum(w), the result is bit-identical.

Fake-quant ops that fold-fake-quant left are emulated in float32 with the same formula.
"""

from __future__ import annotations

from tvm import relax, topi

from .im2col import emit_im2col
from .lower import register_lowering
from .schedules.intrin import signed_activations
from .schedules.isa import isa_of

op = relax.op


def _args(node, importer) -> list:
    """The node's arguments as Relax values (fx nodes) or plain Python values."""
    return [importer.env[a] if hasattr(a, "op") else a for a in node.args]


def _emit(importer, expr):
    return importer.block_builder.emit(expr)


def _along(v, axis: int, rank: int):
    """A [C] vector reshaped to broadcast along `axis` of a rank-`rank` tensor."""
    shape = [1] * rank
    shape[axis % rank] = -1
    return op.reshape(v, shape)


def _rank(importer, expr) -> int:
    return expr.ty.ndim


def _on_grid(x, scale, zpf, qmin: int, qmax: int):
    """clip(round(x / scale) + zp, qmin, qmax): the integers, still in float32."""
    return op.clip(op.add(op.round(op.divide(x, scale)), zpf), float(qmin), float(qmax))


def _fake_quant(x, scale, zp, qmin: int, qmax: int):
    """(clip(round(x / scale) + zp, qmin, qmax) - zp) * scale, in float32."""
    zpf = op.astype(zp, "float32")
    return op.multiply(op.subtract(_on_grid(x, scale, zpf, qmin, qmax), zpf), scale)


def _quantize(x, scale, zp, qmin: int, qmax: int):
    q = _on_grid(x, scale, op.astype(zp, "float32"), qmin, qmax)
    return op.astype(q, "int8" if qmin < 0 else "uint8")


def _dynamic_qparams(importer, x, qmin: int, qmax: int):
    """graphc.ops_quant.dynamic_qparams in Relax: (scale f32[], zero point i32[])."""
    zero = relax.const(0.0, "float32")
    # topi's plain min/max, not relax.min/max: legalize.py makes those propagate NaN, which a
    # quantization range does not need and which cost MiniLM int8 ~4 ms (72 reductions)
    bb = importer.block_builder
    lo = _emit(importer, op.minimum(bb.emit_te(topi.min, x, primfunc_name_hint="min"), zero))
    hi = _emit(importer, op.maximum(bb.emit_te(topi.max, x, primfunc_name_hint="max"), zero))
    tiny = relax.const(1e-12, "float32")
    if qmin < 0:
        scale = op.maximum(op.divide(op.maximum(op.negative(lo), hi),
                                     relax.const(float(qmax), "float32")), tiny)
        return _emit(importer, scale), relax.const(0, "int32")
    scale = _emit(importer, op.maximum(
        op.divide(op.subtract(hi, lo), relax.const(float(qmax - qmin), "float32")), tiny))
    zp = op.clip(op.round(op.subtract(relax.const(float(qmin), "float32"),
                                      op.divide(lo, scale))), float(qmin), float(qmax))
    return scale, _emit(importer, op.astype(zp, "int32"))


@register_lowering("graphc::fake_quant_per_channel")
def _fq_channel(node, importer):
    x, scale, zp, axis, qmin, qmax = _args(node, importer)
    rank = _rank(importer, x)
    return _emit(importer, _fake_quant(x, _along(scale, axis, rank), _along(zp, axis, rank),
                                       qmin, qmax))


@register_lowering("graphc::fake_quant_dynamic")
def _fq_dynamic(node, importer):
    x, qmin, qmax = _args(node, importer)
    scale, zp = _dynamic_qparams(importer, x, qmin, qmax)
    return _emit(importer, _fake_quant(x, scale, zp, qmin, qmax))


# ops whose arguments (x, scale, zero_point, qmin, qmax) map straight onto one formula
PER_TENSOR = {"graphc::fake_quant_per_tensor": _fake_quant, "graphc::quantize": _quantize}
for _name, _formula in PER_TENSOR.items():
    register_lowering(_name)(
        lambda node, importer, f=_formula: _emit(importer, f(*_args(node, importer))))


@register_lowering("graphc::quantize_dynamic")
def _quantize_dyn(node, importer):
    x, qmin, qmax = _args(node, importer)
    scale, zp = _dynamic_qparams(importer, x, qmin, qmax)
    q = _emit(importer, _quantize(x, scale, zp, qmin, qmax))
    return _emit(importer, relax.Tuple([q, scale, zp]))


def _dequant(importer, acc, x_scale, x_zp, w_scale, w_sum, bias, axis: int):
    """(acc - x_zp * w_sum) * (x_scale * w_scale) + bias, vectors along `axis`."""
    rank = _rank(importer, acc)
    corr = _along(_emit(importer, op.multiply(x_zp, w_sum)), axis, rank)
    scale = _along(_emit(importer, op.multiply(x_scale, w_scale)), axis, rank)
    out = op.multiply(op.astype(op.subtract(acc, corr), "float32"), scale)
    return out if bias is None else op.add(out, _along(bias, axis, rank))


def _signed(importer, node, x, zp):
    """u8 x, zp -> s8 x - 128, zp - 128 (flipping the top bit), exact; see the docstring.
    Once per quantized input: q, k and v projections share one."""
    key = ("signed", node.args[0], node.args[2])
    if key not in importer.memo:
        shifted = op.subtract(op.astype(x, "int16"), relax.const(128, "int16"))
        importer.memo[key] = (_emit(importer, op.astype(shifted, "int8")),
                              _emit(importer, op.subtract(zp, relax.const(128, "int32"))))
    return importer.memo[key]


def _wants_signed(importer, x, weights_first: bool = False) -> bool:
    target = importer.target
    return (target is not None and x.ty.dtype == "uint8"
            and signed_activations(isa_of(target), weights_first))


@register_lowering("graphc::qlinear")
def _qlinear(node, importer):
    x, xs, xz, w, ws, wsum, bias = _args(node, importer)
    if _wants_signed(importer, x):
        x, xz = _signed(importer, node, x, xz)
    acc = _emit(importer, op.matmul(x, w, out_dtype="int32"))
    return _emit(importer, _dequant(importer, acc, xs, xz, ws, wsum, bias, -1))


@register_lowering("graphc::qconv2d")
def _qconv2d(node, importer):
    x, xs, xz, w, ws, wsum, bias, stride, dilation, groups = _args(node, importer)
    if groups != 1:  # depthwise / grouped: the conv rule's int32 lanes
        acc = _emit(importer, op.nn.conv2d(x, w, strides=stride, padding=0, dilation=dilation,
                                           groups=groups, out_dtype="int32"))
        return _emit(importer, _dequant(importer, acc, xs, xz, ws, wsum, bias, 1))
    return _qconv2d_as_matmul(node, importer, x, xs, xz, w, ws, wsum, bias, stride, dilation)


def _qconv2d_as_matmul(node, importer, x, xs, xz, w, ws, wsum, bias, stride, dilation):
    """W[O, C*kh*kw] @ cols[C*kh*kw, OH*OW] per image: the int8 matmul rule's dot-product
    kernel (vpdpbusd, sdot) with the output already in NCHW order. cols is x itself for a
    1x1 stride-1 conv, else a uint8 im2col copy of x in a kernel of its own (im2col.py)."""
    b, c, h, wd = (int(d) for d in x.ty.shape)
    o, _, kh, kw = (int(d) for d in w.ty.shape)
    oh = (h - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    ow = (wd - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    if _wants_signed(importer, x, weights_first=True):
        x, xz = _signed(importer, node, x, xz)
    if kh == kw == 1 and tuple(stride) == (1, 1):
        cols = _emit(importer, op.reshape(x, [b, c, h * wd]))
    else:
        cols = _emit(importer, emit_im2col(importer.block_builder, x, kh, kw, stride,
                                           dilation, oh, ow, importer.target))
    weights = _emit(importer, op.reshape(w, [o, c * kh * kw]))
    if b == 1:  # a plain 2-D matmul; batches broadcast the weights over images
        cols = _emit(importer, op.reshape(cols, [c * kh * kw, oh * ow]))
    acc = _emit(importer, op.matmul(weights, cols, out_dtype="int32"))
    # dequantize before the reshape, so FuseOps keeps it in the matmul kernel's epilogue
    out = _emit(importer, _dequant(importer, acc, xs, xz, ws, wsum, bias, 0 if b == 1 else 1))
    return _emit(importer, op.reshape(out, [b, o, oh, ow]))


@register_lowering("graphc::qembedding")
def _qembedding(node, importer):
    w, ws, indices = _args(node, importer)
    rows = op.astype(op.take(w, indices, axis=0), "float32")
    return _emit(importer, op.multiply(rows, op.expand_dims(op.take(ws, indices, axis=0), -1)))
