"""ONNX sliding-window ops: Conv, ConvTranspose, MaxPool, AveragePool, global pools, Resize.

torch's conv and pool take symmetric padding only, and pool padding of at most
half a kernel. Other ONNX pads (asymmetric, SAME_*, TF-style exports) become an
explicit F.pad followed by an unpadded op, which computes the same windows.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from graphc.errors import UnsupportedOpError
from graphc.frontends.onnx_ops import Node, OpDef, ints, torch_pads
from graphc.frontends.onnx_ops_resize import resize_separable, separable_supports

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}
_MAX_POOL = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}
_AVG_POOL = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}


def _geometry(node: Node, spatial, kernel):
    """strides, dilations, begin pads, end pads of a conv/pool node (auto_pad resolved)."""
    nd = len(kernel)
    if nd not in _CONV:
        raise node.unsupported("spatial rank", nd)
    strides, dil = node.attr("strides", [1] * nd), node.attr("dilations", [1] * nd)
    auto_pad = node.attr("auto_pad", "NOTSET")
    if auto_pad == "NOTSET":
        pads = node.attr("pads", [0] * 2 * nd)
        return strides, dil, list(pads[:nd]), list(pads[nd:])
    if auto_pad == "VALID":
        return strides, dil, [0] * nd, [0] * nd
    if auto_pad not in ("SAME_UPPER", "SAME_LOWER"):
        raise node.unsupported("auto_pad", auto_pad)
    begin, end = [], []
    for n, k, s, d in zip(spatial, kernel, strides, dil):
        total = max((-(-n // s) - 1) * s + (k - 1) * d + 1 - n, 0)  # output = ceil(n / s)
        small = total // 2  # SAME_UPPER puts the odd pixel at the end, SAME_LOWER at the start
        begin.append(small if auto_pad == "SAME_UPPER" else total - small)
        end.append(total - begin[-1])
    return strides, dil, begin, end


def _conv(node: Node, x: torch.Tensor, w: torch.Tensor, b=None):
    strides, dil, begin, end = _geometry(node, x.shape[2:], w.shape[2:])
    if begin != end:
        x, begin = F.pad(x, torch_pads(begin, end)), [0] * len(begin)
    return _CONV[w.ndim - 2](x, w, b, strides, begin, dil, node.attr("group", 1))


def _conv_transpose(node: Node, x: torch.Tensor, w: torch.Tensor, b=None):
    auto_pad = node.attr("auto_pad", "NOTSET")
    if node.attr("output_shape") is not None or auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        return _conv_transpose_to_shape(node, x, w, b)
    if auto_pad not in ("NOTSET", "VALID"):
        raise node.unsupported("auto_pad", auto_pad)
    nd = w.ndim - 2
    strides, dil, begin, end = _geometry(node, x.shape[2:], w.shape[2:])
    out_pad, group = node.attr("output_padding", [0] * nd), node.attr("group", 1)
    if begin == end:
        return _CONV_T[nd](x, w, b, strides, begin, out_pad, group, dil)
    # asymmetric pads crop the full transposed-conv output
    y = _CONV_T[nd](x, w, b, strides, 0, out_pad, group, dil)
    crop = tuple(slice(p, y.shape[2 + i] - q) for i, (p, q) in enumerate(zip(begin, end)))
    return y[(slice(None), slice(None)) + crop]


def _conv_transpose_to_shape(node: Node, x: torch.Tensor, w: torch.Tensor, b=None):
    """ConvTranspose with output_shape or SAME pads: the full output, cropped (or extended
    by positions no input reaches) to the asked size, as the ONNX spec splits the padding."""
    nd, n = w.ndim - 2, x.shape[2:]
    strides, dil = node.attr("strides", [1] * nd), node.attr("dilations", [1] * nd)
    out_pad, group = node.attr("output_padding", [0] * nd), node.attr("group", 1)
    want = node.attr("output_shape") or [d * s for d, s in zip(n, strides)]
    want = list(want)[-nd:]  # output_shape may list the batch and channel dims too
    y = _CONV_T[nd](x, w, None, strides, 0, 0, group, dil)
    for i in range(nd):
        full = strides[i] * (n[i] - 1) + out_pad[i] + (w.shape[2 + i] - 1) * dil[i] + 1
        total = full - want[i]
        begin = total // 2 if node.attr("auto_pad", "NOTSET") == "SAME_UPPER" \
            else total - total // 2
        if begin < 0:  # the spec would pad before the first output: not implemented
            raise node.unsupported("output_shape (larger than the full output)", want)
        extra = begin + want[i] - y.shape[2 + i]  # positions past what any input reaches
        if extra > 0:
            y = F.pad(y, [0, 0] * (nd - 1 - i) + [0, extra])
        y = y.narrow(2 + i, begin, want[i])
    return y if b is None else y + b.reshape([1, -1] + [1] * nd)


def _out_size(n: int, k: int, s: int, d: int, b: int, e: int, ceil: bool) -> int:
    span = n + b + e - d * (k - 1) - 1
    out = (-(-span // s) if ceil else span // s) + 1
    # ceil mode (onnxruntime, like torch): the last window must start inside the input
    # or its left pad, never entirely in the right pad
    return out - 1 if ceil and (out - 1) * s >= n + b else out


class _Pool(NamedTuple):
    """A pool node's windows: attributes resolved against the input's spatial shape."""

    kernel: list[int]
    strides: list[int]
    dil: list[int]
    begin: list[int]
    end: list[int]
    ceil: bool
    native: bool  # torch's pool with symmetric padding computes exactly these windows
    explicit_end: list[int]  # end pads after which a floor-mode, unpadded pool does


def _pool(node: Node, x: torch.Tensor) -> _Pool:
    kernel = node.attr("kernel_shape")
    strides, dil, begin, end = _geometry(node, x.shape[2:], kernel)
    ceil = bool(node.attr("ceil_mode", 0))
    dims = list(zip(x.shape[2:], kernel, strides, dil, begin, end))
    outs = [_out_size(*d, ceil) for d in dims]
    # torch pads symmetrically, and by at most half a (dilated) kernel
    native = begin == end and all(2 * p <= (k - 1) * d + 1 for _, k, _, d, p, _ in dims)
    ends = [(o - 1) * s + (k - 1) * d + 1 - n - b for o, (n, k, s, d, b, _) in zip(outs, dims)]
    return _Pool(kernel, strides, dil, begin, end, ceil, native, ends)


def _max_pool(node: Node, x: torch.Tensor):
    if node.attr("storage_order", 0):
        raise node.unsupported("storage_order", 1)
    p = _pool(node, x)
    pool = _MAX_POOL[len(p.kernel)]
    if len(node.outputs) > 1 and node.outputs[1]:
        if not p.native:
            raise node.unsupported("indices output with these pads", p.begin + p.end)
        y, idx = pool(x, p.kernel, p.strides, p.begin, p.dil, ceil_mode=p.ceil,
                      return_indices=True)
        # torch counts within each (n, c) plane, ONNX over the whole tensor
        plane = math.prod(x.shape[2:])
        offset = torch.arange(x.shape[0] * x.shape[1], device=x.device) * plane
        return y, idx + offset.reshape(x.shape[0], x.shape[1], *[1] * (x.ndim - 2))
    if p.native:
        return pool(x, p.kernel, p.strides, p.begin, p.dil, ceil_mode=p.ceil)
    x = F.pad(x, torch_pads(p.begin, p.explicit_end), value=float("-inf"))
    return pool(x, p.kernel, p.strides, 0, p.dil)


def _divisor(n: int, o: int, k: int, s: int, b: int, e: int, d: int,
             include_pad: bool) -> np.ndarray:
    """How many elements ONNX averages over in each output window along one dim."""
    lo, hi = (-b, n + e) if include_pad else (0, n)
    taps = (np.arange(o) * s - b)[:, None] + np.arange(k) * d  # every window's positions
    return ((taps >= lo) & (taps < hi)).sum(1)


def _max_unpool(node: Node, x: torch.Tensor, idx: torch.Tensor, shape=None):
    nd = x.ndim - 2
    kernel, strides = node.attr("kernel_shape"), node.attr("strides", [1] * nd)
    pads = node.attr("pads", [0] * 2 * nd)
    default = list(x.shape[:2]) + [(n - 1) * s + k - pads[i] - pads[nd + i] for i, (n, k, s)
                                   in enumerate(zip(x.shape[2:], kernel, strides))]
    out = ints(shape) if shape is not None else default
    if out != default:  # indices address the default shape: same coordinates in the larger one
        coords, rest = [], idx
        for d in reversed(default):
            coords.append(rest % d)
            rest = rest // d
        idx = functools.reduce(lambda acc, cd: acc * cd[1] + cd[0],
                               zip(reversed(coords), out), torch.zeros_like(idx))
    flat = x.new_zeros(math.prod(out))  # indices address the whole output tensor
    return flat.scatter(0, idx.reshape(-1), x.reshape(-1)).reshape(out)


def _avg_pool(node: Node, x: torch.Tensor):
    p = _pool(node, x)
    include_pad, pool = bool(node.attr("count_include_pad", 0)), _AVG_POOL[len(p.kernel)]
    dilated = any(d != 1 for d in p.dil)
    if p.native and not dilated:
        return pool(x, p.kernel, p.strides, p.begin, p.ceil, count_include_pad=include_pad)
    # sum the windows over explicit zero pads, then divide by ONNX's element counts
    x_pad = F.pad(x, torch_pads(p.begin, p.explicit_end))
    if dilated:  # torch's avg_pool has no dilation: a depthwise conv with a kernel of ones
        ones = torch.ones((x.shape[1], 1, *p.kernel), dtype=x.dtype, device=x.device)
        y = _CONV[len(p.kernel)](x_pad, ones, None, p.strides, 0, p.dil, x.shape[1])
        y = y / math.prod(p.kernel)
    else:
        y = pool(x_pad, p.kernel, p.strides, 0)
    dims = zip(x.shape[2:], y.shape[2:], p.kernel, p.strides, p.begin, p.end, p.dil)
    divisor = functools.reduce(np.multiply.outer, [_divisor(*d, include_pad) for d in dims])
    scale = math.prod(p.kernel) / divisor
    if np.all(scale == 1):
        return y
    return y * torch.from_numpy(scale.astype(np.float32)).to(dtype=y.dtype, device=y.device)


def _global_pool(reduce) -> OpDef:
    return OpDef(lambda node, x: reduce(x, tuple(range(2, x.ndim)), keepdim=True))


_RESIZE_DEFAULTS = {"antialias": 0, "exclude_outside": 0, "keep_aspect_ratio_policy": "stretch"}
_LINEAR = {1: "linear", 2: "bilinear", 3: "trilinear"}


def _interp_mode(node: Node, nd: int, out_sizes: list[int]) -> tuple[str, bool | None]:
    """F.interpolate's (mode, align_corners) equal to this Resize's modes, or an error."""
    mode = node.attr("mode", "nearest")
    ctm = node.attr("coordinate_transformation_mode", "half_pixel")
    if ctm == "pytorch_half_pixel" and min(out_sizes) > 1:
        ctm = "half_pixel"  # they differ only for an output size of 1
    if mode == "nearest":
        nearest = (ctm, node.attr("nearest_mode", "round_prefer_floor"))
        if nearest == ("asymmetric", "floor"):
            return "nearest", None
        if nearest == ("half_pixel", "round_prefer_ceil"):
            return "nearest-exact", None
        raise node.unsupported("(coordinate_transformation_mode, nearest_mode)", nearest)
    if ctm not in ("half_pixel", "align_corners"):
        raise node.unsupported("coordinate_transformation_mode", ctm)
    if mode == "linear":
        return _LINEAR[nd], ctm == "align_corners"
    if mode == "cubic" and nd == 2 and node.attr("cubic_coeff_a", -0.75) == -0.75:
        return "bicubic", ctm == "align_corners"
    raise node.unsupported("mode", mode)


def _resize(node: Node, x: torch.Tensor, roi=None, scales=None, sizes=None):
    try:
        return _interpolate(node, x, scales, sizes)
    except UnsupportedOpError:  # not one of F.interpolate's modes: one matrix per axis
        if not separable_supports(node):
            raise
        return resize_separable(node, x, roi, scales, sizes)


def _interpolate(node: Node, x: torch.Tensor, scales=None, sizes=None):
    """Resize as F.interpolate (what passes and backends recognize), or UnsupportedOpError."""
    for key, default in _RESIZE_DEFAULTS.items():
        if node.attr(key, default) != default:
            raise node.unsupported(key, node.attr(key))
    if node.attr("axes") is not None:
        raise node.unsupported("axes", node.attr("axes"))
    nd = x.ndim - 2
    if sizes is not None and sizes.size:
        size, kwargs = ints(sizes), {"size": ints(sizes)[2:]}
    else:
        factors = [float(f) for f in scales.reshape(-1)]
        size = [math.floor(n * f) for n, f in zip(x.shape, factors)]
        align = node.attr("coordinate_transformation_mode") == "align_corners"
        if align and any(n * f != s for n, f, s in zip(x.shape, factors, size)):
            # ONNX then maps with the unrounded n * scale, torch with the output size
            raise node.unsupported("align_corners with a fractional output size", factors)
        kwargs = {"scale_factor": factors[2:], "recompute_scale_factor": False}
    if nd not in _LINEAR or list(size[:2]) != list(x.shape[:2]):
        raise node.unsupported("resized dims", size)  # torch resizes spatial dims only
    mode, align = _interp_mode(node, nd, size[2:])
    return F.interpolate(x, mode=mode, align_corners=align, **kwargs)


def _causal_conv_with_state(node: Node, x: torch.Tensor, w: torch.Tensor, b=None, past=None):
    """A depthwise causal conv1d that continues from past_state; the new state is the tail."""
    act = node.attr("activation", "none")
    if act not in ("none", "silu", "swish"):
        raise node.unsupported("activation", act)
    k = w.shape[2]
    pad = past if past is not None else x.new_zeros(x.shape[0], x.shape[1], k - 1)
    padded = torch.cat([pad, x], 2)
    y = F.conv1d(padded, w, b, groups=x.shape[1])
    y = F.silu(y) if act != "none" else y
    return y, padded[:, :, padded.shape[2] - (k - 1):]


OPS: dict[str, OpDef] = {
    "CausalConvWithState": OpDef(_causal_conv_with_state),
    "Conv": OpDef(_conv),
    "ConvTranspose": OpDef(_conv_transpose),
    "MaxPool": OpDef(_max_pool),
    "AveragePool": OpDef(_avg_pool),
    "MaxUnpool": OpDef(_max_unpool, static=(2,)),
    "GlobalAveragePool": _global_pool(torch.mean),
    "GlobalMaxPool": _global_pool(torch.amax),
    "Resize": OpDef(_resize, static=(1, 2, 3)),
}
