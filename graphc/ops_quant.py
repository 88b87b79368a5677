"""Fake-quantization ops: `graphc::fake_quant_*`, torch.library custom ops.

    y = (clamp(round(x / scale) + zero_point, qmin, qmax) - zero_point) * scale

    graphc::fake_quant_per_tensor(Tensor x, Tensor scale, Tensor zero_point,
                                  int qmin, int qmax) -> Tensor
    graphc::fake_quant_per_channel(Tensor x, Tensor scale, Tensor zero_point,
                                   int axis, int qmin, int qmax) -> Tensor
    graphc::fake_quant_dynamic(Tensor x, int qmin, int qmax) -> Tensor

`scale` is a float32 tensor (shape [] per tensor, [C] per channel) so QAT can learn it;
`zero_point` is an int32 tensor of the same shape holding the integer offset, which is
what an integer kernel consumes (it is not learned: an integer zero point keeps 0.0
exactly representable, and padding / ReLU rely on that). After `quantize` both are
`get_attr` weights, so a later fold pass reads them as constants. The grid [qmin, qmax]
says the scheme: signed and symmetric (-127..127, zero_point 0) or unsigned (0..255).
Rounding is torch.round (half to even); an integer lowering must round the same way.

Each op has a reference implementation, a fake (meta) implementation so it survives
torch.export, and an autograd formula: the straight-through estimator for x (gradient 1
where round(x/scale)+zero_point lies in [qmin, qmax], 0 where it is clamped) and the
LSQ step-size gradient for scale (Esser et al. 2020): round(x/s) - x/s inside the range,
qmin - zp or qmax - zp where clamped. fake_quant_dynamic computes its range from x at run
time (min/max, widened to include 0; symmetric when qmin < 0) and passes gradients
straight through, since nothing it sees is clamped.
"""

from __future__ import annotations

import torch

_NS = "graphc"


def _shape_for(scale: torch.Tensor, x: torch.Tensor, axis: int) -> torch.Tensor:
    """A per-channel vector reshaped to broadcast along `axis` of x."""
    shape = [1] * x.dim()
    shape[axis] = -1
    return scale.reshape(shape)


def fq_reference(x, scale, zero_point, qmin, qmax):
    """The fake-quant formula on broadcastable scale / zero point tensors."""
    zp = zero_point.to(x.dtype)
    q = torch.clamp(torch.round(x / scale) + zp, qmin, qmax)
    return (q - zp) * scale


def _fq_backward(grad, x, scale, zero_point, qmin, qmax, reduce_dims):
    """STE for x; LSQ gradient for scale, summed back to the scale's shape."""
    zp = zero_point.to(x.dtype)
    v = x / scale
    q = torch.round(v) + zp
    below, above = q < qmin, q > qmax
    inside = ~(below | above)
    grad_x = grad * inside
    d_scale = torch.where(below, qmin - zp, torch.where(above, qmax - zp, torch.round(v) - v))
    grad_scale = (grad * d_scale).sum(dim=reduce_dims)
    return grad_x, grad_scale


# ---- per tensor -----------------------------------------------------------------------
@torch.library.custom_op(f"{_NS}::fake_quant_per_tensor", mutates_args=())
def fake_quant_per_tensor(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
                          qmin: int, qmax: int) -> torch.Tensor:
    """Quantize x to the integer grid [qmin, qmax] with one scale / zero point, dequantize."""
    return fq_reference(x, scale, zero_point, qmin, qmax)


@fake_quant_per_tensor.register_fake
def _(x, scale, zero_point, qmin, qmax):
    return torch.empty_like(x)


def _setup_per_tensor(ctx, inputs, output):
    x, scale, zero_point, qmin, qmax = inputs
    ctx.save_for_backward(x, scale, zero_point)
    ctx.qmin, ctx.qmax = qmin, qmax


def _backward_per_tensor(ctx, grad):
    x, scale, zero_point = ctx.saved_tensors
    grad_x, grad_scale = _fq_backward(grad, x, scale, zero_point, ctx.qmin, ctx.qmax,
                                      list(range(x.dim())))
    return grad_x, grad_scale.reshape(scale.shape), None, None, None


fake_quant_per_tensor.register_autograd(_backward_per_tensor, setup_context=_setup_per_tensor)


# ---- per channel ----------------------------------------------------------------------
@torch.library.custom_op(f"{_NS}::fake_quant_per_channel", mutates_args=())
def fake_quant_per_channel(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
                           axis: int, qmin: int, qmax: int) -> torch.Tensor:
    """Fake-quantize x with one scale / zero point per index along `axis`."""
    return fq_reference(x, _shape_for(scale, x, axis), _shape_for(zero_point, x, axis),
                       qmin, qmax)


@fake_quant_per_channel.register_fake
def _(x, scale, zero_point, axis, qmin, qmax):
    torch._check(scale.dim() == 1 and scale.shape[0] == x.shape[axis],
                 lambda: f"fake_quant_per_channel: scale has shape {tuple(scale.shape)}, "
                         f"expected [{x.shape[axis]}] (x.shape[{axis}])")
    return torch.empty_like(x)


def _setup_per_channel(ctx, inputs, output):
    x, scale, zero_point, axis, qmin, qmax = inputs
    ctx.save_for_backward(x, scale, zero_point)
    ctx.axis, ctx.qmin, ctx.qmax = axis % x.dim(), qmin, qmax


def _backward_per_channel(ctx, grad):
    x, scale, zero_point = ctx.saved_tensors
    axis = ctx.axis
    others = [d for d in range(x.dim()) if d != axis]
    grad_x, grad_scale = _fq_backward(grad, x, _shape_for(scale, x, axis),
                                      _shape_for(zero_point, x, axis), ctx.qmin, ctx.qmax,
                                      others)
    return grad_x, grad_scale.reshape(scale.shape), None, None, None, None


fake_quant_per_channel.register_autograd(_backward_per_channel,
                                         setup_context=_setup_per_channel)


# ---- dynamic (range from the tensor at run time) ----------------------------------------
def dynamic_qparams(x: torch.Tensor, qmin: int, qmax: int):
    """Scale and zero point covering [min(x, 0), max(x, 0)] on the grid [qmin, qmax]."""
    lo, hi = torch.clamp(x.min(), max=0), torch.clamp(x.max(), min=0)
    if qmin < 0:  # a signed grid means symmetric: zero point 0
        scale = torch.maximum(-lo, hi) / qmax
        return torch.clamp(scale, min=1e-12), torch.zeros((), dtype=torch.int32)
    scale = torch.clamp((hi - lo) / (qmax - qmin), min=1e-12)
    zp = torch.clamp(torch.round(qmin - lo / scale), qmin, qmax).to(torch.int32)
    return scale, zp


@torch.library.custom_op(f"{_NS}::fake_quant_dynamic", mutates_args=())
def fake_quant_dynamic(x: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """Fake-quantize x per tensor with a range measured on x itself (dynamic quantization)."""
    scale, zp = dynamic_qparams(x, qmin, qmax)
    return fq_reference(x, scale, zp, qmin, qmax)


@fake_quant_dynamic.register_fake
def _(x, qmin, qmax):
    return torch.empty_like(x)


def _setup_dynamic(ctx, inputs, output):
    pass


def _backward_dynamic(ctx, grad):
    return grad, None, None


fake_quant_dynamic.register_autograd(_backward_dynamic, setup_context=_setup_dynamic)

FAKE_QUANT_OPS = {
    torch.ops.graphc.fake_quant_per_tensor.default: "per_tensor",
    torch.ops.graphc.fake_quant_per_channel.default: "per_channel",
    torch.ops.graphc.fake_quant_dynamic.default: "dynamic",
}
