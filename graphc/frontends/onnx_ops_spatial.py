"""ONNX ops over positions: GridSample, LpPool, RotaryEmbedding, CenterCropPad, ScatterND."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch
import torch.nn.functional as F

from graphc.frontends.onnx_ops import Node, OpDef, axis_of, ints
from graphc.frontends.onnx_ops_conv import _avg_pool
from graphc.frontends.onnx_ops_shape import _nd_index

_GRID_MODES = {"linear": "bilinear", "bilinear": "bilinear", "nearest": "nearest",
               "cubic": "bicubic", "bicubic": "bicubic"}


def _grid_sample(node: Node, x: torch.Tensor, grid: torch.Tensor):
    mode, padding = node.attr("mode", "linear"), node.attr("padding_mode", "zeros")
    if mode not in _GRID_MODES or (mode in ("cubic", "bicubic") and x.ndim != 4):
        raise node.unsupported("mode", mode)  # torch samples cubically in 2-D only
    if padding not in ("zeros", "border", "reflection") or x.ndim not in (4, 5):
        raise node.unsupported("padding_mode / rank", (padding, x.ndim))
    return F.grid_sample(x, grid, _GRID_MODES[mode], padding,
                         bool(node.attr("align_corners", 0)))


def _lp_pool(node: Node, x: torch.Tensor):
    # a sum of |x|^p over each window, pads adding 0: an average counting pads, times its size
    p = node.attr("p", 2)
    avg = _avg_pool(dataclasses.replace(node, attrs={**node.attrs, "count_include_pad": 1}),
                    x.abs() ** p)
    return (avg * math.prod(node.attr("kernel_shape"))) ** (1.0 / p)


def _rotary(node: Node, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, pos=None):
    shape = x.shape
    if x.ndim == 4:  # [batch, heads, seq, head] -> [batch, seq, heads, head]
        x = x.transpose(1, 2)
    else:
        heads = node.attr("num_heads")
        if not heads:
            raise node.unsupported("3-D input without num_heads", None)
        x = x.reshape(shape[0], shape[1], heads, shape[2] // heads)
    dim = node.attr("rotary_embedding_dim", 0) or x.shape[3]
    rot, keep = x[..., :dim], x[..., dim:]
    if pos is not None:
        cos, sin = cos[pos], sin[pos]
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    if node.attr("interleaved", 0):
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
    else:
        x1, x2 = rot.split(dim // 2, -1)
    real, imag = cos * x1 - sin * x2, sin * x1 + cos * x2
    if node.attr("interleaved", 0):
        rot = torch.stack([real, imag], -1).reshape(rot.shape)
    else:
        rot = torch.cat([real, imag], -1)
    out = torch.cat([rot, keep], -1)
    return out.reshape(shape) if len(shape) == 3 else out.transpose(1, 2)


def _center_crop_pad(node: Node, x: torch.Tensor, shape: np.ndarray):
    axes = node.attr("axes") or list(range(x.ndim))
    for a, size in zip((axis_of(node, a, x.ndim) for a in axes), ints(shape)):
        dim = x.shape[a]
        if size < dim:  # crop the centre; an odd excess drops one more at the end
            x = x.narrow(a, (dim - size) // 2, size)
        elif size > dim:  # pad around; an odd excess adds one more at the end
            spec = [0, 0] * (x.ndim - 1 - a) + [(size - dim) // 2, size - dim - (size - dim) // 2]
            x = F.pad(x, spec)
    return x


_ND_REDUCE = {"add": "sum", "mul": "prod", "max": "amax", "min": "amin"}


def _scatter_nd(node: Node, x: torch.Tensor, idx: torch.Tensor, updates: torch.Tensor):
    reduction = node.attr("reduction", "none")
    if reduction == "none":
        return torch.index_put(x, _nd_index(node, x, idx), updates)
    if reduction not in _ND_REDUCE:
        raise node.unsupported("reduction", reduction)
    # flatten the indexed dims into one, then a scatter_reduce along it
    m = idx.shape[-1]
    lead, rest = x.shape[:m], x.shape[m:]
    strides = torch.tensor([math.prod(lead[i + 1:]) for i in range(m)], device=idx.device)
    cols = torch.stack(_nd_index(node, x, idx), -1)
    flat_idx = (cols * strides).sum(-1).reshape(-1)
    flat = x.reshape((-1,) + rest)
    src = updates.reshape((-1,) + rest)
    index = flat_idx.reshape((-1,) + (1,) * len(rest)).expand(src.shape)
    out = torch.scatter_reduce(flat, 0, index, src, _ND_REDUCE[reduction])
    return out.reshape(x.shape)


OPS: dict[str, OpDef] = {
    "GridSample": OpDef(_grid_sample),
    "LpPool": OpDef(_lp_pool),
    "RotaryEmbedding": OpDef(_rotary),
    "CenterCropPad": OpDef(_center_crop_pad, static=(1,)),
    "ScatterND": OpDef(_scatter_nd),
}
