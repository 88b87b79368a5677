"""Integer ops: what `fold-fake-quant` rewrites fake-quantized layers into.

    graphc::quantize(Tensor x, Tensor scale, Tensor zero_point, int qmin, int qmax) -> Tensor
        float -> uint8 (qmin >= 0) or int8: clamp(round(x / scale) + zero_point, qmin, qmax)
    graphc::quantize_dynamic(Tensor x, int qmin, int qmax) -> (Tensor, Tensor, Tensor)
        the same with a range measured on x at run time: (q, scale [], zero_point [] int32)
    graphc::qlinear(Tensor x, Tensor x_scale, Tensor x_zp, Tensor w, Tensor w_scale,
                    Tensor w_sum, Tensor? bias) -> Tensor
        x [..., K] uint8/int8, w [K, N] int8, w_scale [N], w_sum [N] int32 = sum_k w[k, n]:
        y = (int32(x @ w) - x_zp * w_sum) * (x_scale * w_scale) + bias        (float32)
    graphc::qconv2d(Tensor x, Tensor x_scale, Tensor x_zp, Tensor w, Tensor w_scale,
                    Tensor w_sum, Tensor? bias, int[2] stride, int[2] dilation,
                    int groups) -> Tensor
        NCHW, w [O, I/groups, kh, kw] int8, w_sum [O], no padding: fold-fake-quant pads x
        beforehand (aten.constant_pad_nd) with x_zp, the integer that stands for 0.0, so
        every window holds x_zp where the float conv saw zeros and
        y = (conv(x, w) - x_zp * w_sum) * (x_scale * w_scale) + bias exactly
    graphc::qembedding(Tensor w, Tensor w_scale, Tensor indices) -> Tensor
        w [V, D] int8, w_scale [V]: rows w[indices] * w_scale[indices]   (float32)

The accumulation is int32 (x @ w with uint8 x int8 cannot overflow it for K < 66000) and is
exact, so these ops give the fake-quant graph's values up to float rounding in the final
scaling: (a - b) * s in one product instead of a sum of products. Weights are symmetric
(zero point 0): an asymmetric weight would add a run-time correction per row of x. Each op
has a PyTorch reference (int32 matmul / conv on CPU) and a fake impl for torch.export; the
TVM lowerings are in backends/tvm/lower_quant.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from graphc.ops_quant import dynamic_qparams

_NS = "graphc"


def int_dtype(qmin: int) -> torch.dtype:
    """The storage type of a grid: signed grids int8, unsigned uint8."""
    return torch.int8 if qmin < 0 else torch.uint8


def quantize_reference(x, scale, zero_point, qmin: int, qmax: int) -> torch.Tensor:
    q = torch.round(x / scale) + zero_point.to(x.dtype)
    return torch.clamp(q, qmin, qmax).to(int_dtype(qmin))


@torch.library.custom_op(f"{_NS}::quantize", mutates_args=())
def quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int,
             qmax: int) -> torch.Tensor:
    """float x -> integers on the grid [qmin, qmax], per tensor."""
    return quantize_reference(x, scale, zero_point, qmin, qmax)


@quantize.register_fake
def _(x, scale, zero_point, qmin, qmax):
    return torch.empty_like(x, dtype=int_dtype(qmin))


@torch.library.custom_op(f"{_NS}::quantize_dynamic", mutates_args=())
def quantize_dynamic(x: torch.Tensor, qmin: int,
                     qmax: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """float x -> (integers, scale, zero point) with the range of x itself."""
    scale, zp = dynamic_qparams(x, qmin, qmax)
    return quantize_reference(x, scale, zp, qmin, qmax), scale.to(torch.float32), zp


@quantize_dynamic.register_fake
def _(x, qmin, qmax):
    return (torch.empty_like(x, dtype=int_dtype(qmin)), x.new_empty(()),
            x.new_empty((), dtype=torch.int32))


def _dequant(acc, x_scale, x_zp, w_scale, w_sum, bias, axis: int) -> torch.Tensor:
    """(acc - x_zp * w_sum) * (x_scale * w_scale) + bias, the vectors along `axis`."""
    shape = [1] * acc.dim()
    shape[axis] = -1
    out = (acc - x_zp * w_sum.reshape(shape)).to(torch.float32)
    out = out * (x_scale * w_scale).reshape(shape)
    return out if bias is None else out + bias.reshape(shape)


@torch.library.custom_op(f"{_NS}::qlinear", mutates_args=())
def qlinear(x: torch.Tensor, x_scale: torch.Tensor, x_zp: torch.Tensor, w: torch.Tensor,
            w_scale: torch.Tensor, w_sum: torch.Tensor,
            bias: torch.Tensor | None) -> torch.Tensor:
    """Integer x @ w (int32 accumulate), dequantized with per-column scales, plus bias."""
    acc = torch.matmul(x.to(torch.int32), w.to(torch.int32))
    return _dequant(acc, x_scale, x_zp, w_scale, w_sum, bias, -1)


@qlinear.register_fake
def _(x, x_scale, x_zp, w, w_scale, w_sum, bias):
    torch._check(x.shape[-1] == w.shape[0], lambda: f"qlinear: x {tuple(x.shape)} @ w "
                                                   f"{tuple(w.shape)}: inner sizes differ")
    return x.new_empty((*x.shape[:-1], w.shape[1]), dtype=torch.float32)


@torch.library.custom_op(f"{_NS}::qconv2d", mutates_args=())
def qconv2d(x: torch.Tensor, x_scale: torch.Tensor, x_zp: torch.Tensor, w: torch.Tensor,
            w_scale: torch.Tensor, w_sum: torch.Tensor, bias: torch.Tensor | None,
            stride: list[int], dilation: list[int], groups: int) -> torch.Tensor:
    """Integer 2-D convolution (int32 accumulate) of an already padded x, dequantized."""
    if any(d != 1 for d in dilation):
        # PyTorch has no integer dilated conv on CPU ("slow_conv_dilated" for 'Int'); float64
        # holds every int8 x int8 sum exactly (|terms| <= 2^15, far from 2^53)
        acc = F.conv2d(x.double(), w.double(), None, stride, 0, dilation, groups)
        acc = acc.to(torch.int32)
    else:
        acc = F.conv2d(x.to(torch.int32), w.to(torch.int32), None, stride, 0, dilation, groups)
    return _dequant(acc, x_scale, x_zp, w_scale, w_sum, bias, 1)


@qconv2d.register_fake
def _(x, x_scale, x_zp, w, w_scale, w_sum, bias, stride, dilation, groups):
    size = [(x.shape[2 + d] - dilation[d] * (w.shape[2 + d] - 1) - 1)
            // stride[d] + 1 for d in range(2)]
    return x.new_empty((x.shape[0], w.shape[0], *size), dtype=torch.float32)


@torch.library.custom_op(f"{_NS}::qembedding", mutates_args=())
def qembedding(w: torch.Tensor, w_scale: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Rows of an int8 table, each scaled by its own scale."""
    return w[indices].to(torch.float32) * w_scale[indices].unsqueeze(-1)


@qembedding.register_fake
def _(w, w_scale, indices):
    return w.new_empty((*indices.shape, w.shape[1]), dtype=torch.float32)


INTEGER_OPS = (torch.ops.graphc.qlinear.default, torch.ops.graphc.qconv2d.default,
               torch.ops.graphc.qembedding.default)
