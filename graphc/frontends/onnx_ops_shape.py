"""ONNX ops that create, index or rearrange tensors (Shape, Reshape, Slice, Gather, Pad, ...).

Their shape-like inputs are declared static (numpy at load time), so Reshape or
Slice hand torch python ints even when the model computes them with Shape ops.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from graphc.errors import FrontendError
from graphc.frontends.onnx_ops import Node, OpDef, axis_of, ints, torch_pads

_CONSTANT_ATTRS = {
    "value": np.asarray,
    "value_float": lambda v: np.array(v, np.float32),
    "value_floats": lambda v: np.array(v, np.float32),
    "value_int": lambda v: np.array(v, np.int64),
    "value_ints": lambda v: np.array(v, np.int64),
}


def _constant(node: Node):
    for key, convert in _CONSTANT_ATTRS.items():
        if key in node.attrs:
            return convert(node.attrs[key])
    raise node.unsupported("attribute", next(iter(node.attrs), None))


def _constant_of_shape(node: Node, shape: np.ndarray):
    value = node.attr("value", np.zeros(1, np.float32))
    return np.full(ints(shape), value.reshape(-1)[0], dtype=value.dtype)


def _shape(node: Node, x: torch.Tensor):
    # python slicing clamps start/end exactly as ONNX Shape-15 specifies
    return np.array(x.shape[node.attr("start", 0):node.attr("end", None)], np.int64)


def _reshape(node: Node, x: torch.Tensor, shape: np.ndarray):
    dims = ints(shape)
    if not node.attr("allowzero", 0):  # 0 copies the input's dim unless allowzero
        dims = [x.shape[i] if d == 0 else d for i, d in enumerate(dims)]
    return x.reshape(dims)


def _flatten(node: Node, x: torch.Tensor):
    axis = node.attr("axis", 1)
    axis = axis + x.ndim if axis < 0 else axis
    return x.reshape(math.prod(x.shape[:axis]), math.prod(x.shape[axis:]))


def _squeeze(node: Node, x: torch.Tensor, axes: np.ndarray | None = None):
    if axes is None:
        dims = [i for i, d in enumerate(x.shape) if d == 1]
    else:
        dims = [axis_of(node, a, x.ndim) for a in ints(axes)]
        if any(x.shape[d] != 1 for d in dims):  # torch would silently keep such a dim
            raise FrontendError(f"{node}: cannot squeeze dims {dims} of shape {list(x.shape)}")
    return x.squeeze(tuple(dims)) if dims else x


def _unsqueeze(node: Node, x: torch.Tensor, axes: np.ndarray):
    rank = x.ndim + len(ints(axes))
    for a in sorted(axis_of(node, a, rank) for a in ints(axes)):
        x = x.unsqueeze(a)
    return x


def _transpose(node: Node, x: torch.Tensor):
    return x.permute(node.attr("perm", list(reversed(range(x.ndim)))))


def _split(node: Node, x: torch.Tensor, split: np.ndarray | None = None):
    axis = axis_of(node, node.attr("axis", 0), x.ndim)
    n, dim = len(node.outputs), x.shape[axis]
    if split is not None:
        sizes = ints(split)
    elif node.attr("num_outputs"):  # opset 18: the last chunk may be smaller
        return torch.split(x, -(-dim // node.attr("num_outputs")), axis)
    elif dim % n:
        raise FrontendError(f"{node}: cannot split a dim of {dim} into {n} equal parts")
    else:
        sizes = [dim // n] * n
    return torch.split(x, sizes, axis)


def _slice_axis(x: torch.Tensor, axis: int, start: int, end: int, step: int) -> torch.Tensor:
    dim = x.shape[axis]
    start, end = start + dim if start < 0 else start, end + dim if end < 0 else end
    lead = (slice(None),) * axis
    if step > 0:
        start, end = min(max(start, 0), dim), min(max(end, 0), dim)
        return x if (start, end, step) == (0, dim, 1) else x[lead + (slice(start, end, step),)]
    # torch has no negative steps: slice the flipped tensor instead
    start, end = min(max(start, 0), dim - 1), min(max(end, -1), dim - 1)
    return x.flip(axis)[lead + (slice(dim - 1 - start, dim - 1 - end, -step),)]


def _slice(node: Node, x: torch.Tensor, starts, ends, axes=None, steps=None):
    starts, ends = ints(starts), ints(ends)
    axes = ints(axes) if axes is not None else list(range(len(starts)))
    steps = ints(steps) if steps is not None else [1] * len(starts)
    if 0 in steps:
        raise FrontendError(f"{node}: slice step 0")
    for axis, start, end, step in zip(axes, starts, ends, steps):
        x = _slice_axis(x, axis_of(node, axis, x.ndim), start, end, step)
    return x


def _positive(node: Node, pos: int, idx: torch.Tensor, size) -> torch.Tensor:
    """ONNX indices may be negative; skip the fix-up when load-time values show none are."""
    known = node.consts.get(pos)
    if known is not None and (known >= 0).all():
        return idx
    return torch.where(idx < 0, idx + size, idx)


def _gather(node: Node, x: torch.Tensor, idx):
    axis = axis_of(node, node.attr("axis", 0), x.ndim)
    if not isinstance(idx, torch.Tensor):  # a known one-element index: select/narrow
        known = node.consts[1]
        if known.ndim == 0:
            return x.select(axis, idx)
        out = x.narrow(axis, idx % x.shape[axis], 1)
        return out.reshape(x.shape[:axis] + known.shape + x.shape[axis + 1:])
    idx = _positive(node, 1, idx, x.shape[axis])
    if axis == 0 and x.ndim == 2 and x.is_floating_point():
        return F.embedding(idx, x)  # an embedding lookup: keep it recognizable
    flat = torch.index_select(x, axis, idx.reshape(-1))
    return flat.reshape(x.shape[:axis] + idx.shape + x.shape[axis + 1:])


def _gather_elements(node: Node, x: torch.Tensor, idx: torch.Tensor):
    axis = axis_of(node, node.attr("axis", 0), x.ndim)
    return torch.gather(x, axis, _positive(node, 1, idx, x.shape[axis]))


def _nd_index(node: Node, x: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """GatherND/ScatterND index tuple for x[...]: batch aranges, then idx's columns."""
    b, m = node.attr("batch_dims", 0), idx.shape[-1]
    known = node.consts.get(1)
    if known is None or (known < 0).any():
        sizes = torch.tensor(x.shape[b:b + m], device=idx.device)
        idx = torch.where(idx < 0, idx + sizes, idx)
    batch = [
        torch.arange(x.shape[i], device=idx.device).reshape((-1,) + (1,) * (idx.ndim - 2 - i))
        for i in range(b)
    ]
    return tuple(batch) + tuple(idx[..., k] for k in range(m))


def _expand(node: Node, x: torch.Tensor, shape: np.ndarray):
    return x.expand(np.broadcast_shapes(tuple(x.shape), tuple(ints(shape))))  # bidirectional


def _range(node: Node, start, limit, delta):
    return np.arange(start.item(), limit.item(), delta.item(), dtype=start.dtype)


_PAD_MODES = {"constant": "constant", "reflect": "reflect", "edge": "replicate", "wrap": "circular"}


def _pad(node: Node, x: torch.Tensor, pads, value=None, axes=None):
    mode = node.attr("mode", "constant")
    if mode not in _PAD_MODES:
        raise node.unsupported("mode", mode)
    axes = [axis_of(node, a, x.ndim) for a in ints(axes)] if axes is not None else range(x.ndim)
    pads, n = ints(pads), len(axes)
    begin, end = [0] * x.ndim, [0] * x.ndim
    for i, a in enumerate(axes):
        begin[a], end[a] = pads[i], pads[n + i]
    spec = torch_pads(begin, end)
    while spec[-2:] == [0, 0]:  # drop unpadded leading dims (F.pad lists the last dim first)
        spec = spec[:-2]
    if not spec:
        return x
    if mode == "constant" and isinstance(value, torch.Tensor):
        # a pad value computed from the inputs: pad with 0, then select it in the pads
        pads_mask = F.pad(torch.zeros_like(x, dtype=torch.bool), spec, value=True)
        return torch.where(pads_mask, value.reshape(()).to(x.dtype), F.pad(x, spec))
    if mode == "constant":
        return F.pad(x, spec, value=0.0 if value is None else value)
    # torch pads in these modes only the last 1-3 dims, after 1 or 2 untouched dims
    if len(spec) // 2 > 3 or x.ndim - len(spec) // 2 not in (1, 2) or min(spec) < 0:
        raise node.unsupported(f"pads (mode={mode})", pads)
    return F.pad(x, spec, mode=_PAD_MODES[mode])


def _dropout(node: Node, x: torch.Tensor, ratio=None, training=None):
    if training is not None and training.item() and (ratio is None or ratio.item() != 0):
        raise node.unsupported("training_mode", True)  # random unless the ratio is 0
    wants_mask = len(node.outputs) > 1 and node.outputs[1]
    return (x, torch.ones_like(x, dtype=torch.bool)) if wants_mask else x


def _trilu(node: Node, x: torch.Tensor, k=None):
    k = 0 if k is None else int(k.item())
    return torch.triu(x, k) if node.attr("upper", 1) else torch.tril(x, k)


def log_scan(x: torch.Tensor, axis: int, op, identity) -> torch.Tensor:
    """Inclusive prefix op along axis in ceil(log2 n) shifted steps (Hillis-Steele).

    Used instead of aten.cumsum / cumprod: TVM 0.27 fails to schedule those on CPU, and
    these steps are plain pads and elementwise ops that every backend lowers.
    """
    n, step = x.shape[axis], 1
    spec = [0, 0] * (x.ndim - 1 - axis)
    while step < n:
        shifted = F.pad(x.narrow(axis, 0, n - step), spec + [step, 0], value=identity)
        x = op(x, shifted)
        step *= 2
    return x


def _cumsum(node: Node, x: torch.Tensor, axis: np.ndarray):
    axis = axis_of(node, int(axis.item()), x.ndim)
    x = x.flip(axis) if node.attr("reverse", 0) else x
    out = log_scan(x, axis, torch.add, 0)
    out = out - x if node.attr("exclusive", 0) else out
    return out.flip(axis) if node.attr("reverse", 0) else out


OPS: dict[str, OpDef] = {
    "Constant": OpDef(_constant),
    "ConstantOfShape": OpDef(_constant_of_shape, static=(0,)),
    "Shape": OpDef(_shape),
    "Size": OpDef(lambda node, x: np.array(x.numel(), np.int64)),
    "Identity": OpDef(lambda node, x: x),
    "Dropout": OpDef(_dropout, static=(1, 2)),
    "Reshape": OpDef(_reshape, static=(1,)),
    "Flatten": OpDef(_flatten),
    "Squeeze": OpDef(_squeeze, static=(1,)),
    "Unsqueeze": OpDef(_unsqueeze, static=(1,)),
    "Transpose": OpDef(_transpose),
    "Concat": OpDef(lambda node, *xs: torch.cat(xs, node.attr("axis"))),
    "Split": OpDef(_split, static=(1,)),
    "Slice": OpDef(_slice, static=(1, 2, 3, 4)),
    "Gather": OpDef(_gather, scalars=(1,)),
    "GatherElements": OpDef(_gather_elements),
    "GatherND": OpDef(lambda node, x, idx: x[_nd_index(node, x, idx)]),
    "Expand": OpDef(_expand, static=(1,)),
    "Tile": OpDef(lambda node, x, repeats: x.repeat(ints(repeats)), static=(1,)),
    "Range": OpDef(_range, static=(0, 1, 2)),
    "Pad": OpDef(_pad, static=(1, 3), scalars=(2,)),
    "Trilu": OpDef(_trilu, static=(1,)),
    "CumSum": OpDef(_cumsum, static=(1,)),
    "NonZero": OpDef(lambda node, x: torch.stack(torch.nonzero(x, as_tuple=True)), fold_only=True),
}
