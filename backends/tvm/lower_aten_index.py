"""ATen index ops (scatter, index_put, grid sampling) that TVM 0.27's importer lowers wrongly
or not at all; found by the ONNX backend node tests (tools/onnx_conformance.py).

- aten.scatter.src / scatter.value / scatter_reduce.two: TOPI's scatter_elements walks the
  index tensor but offsets into the data as if index and data had the same shape outside
  `dim`. torch allows a smaller index (and a larger src); TVM's own converter then writes
  to the wrong places. The data is cropped to the index's extent, scattered, and put back;
  src is cropped to the index. scatter_reduce had no converter: sum/prod/amax/amin map to
  TOPI's add/mul/max/min reductions (applied in index order, so duplicates accumulate);
  include_self=False first resets every target to the reduction's identity. "mean"
  (torch counts self in the divisor, TOPI does not) is refused.
- aten.index.Tensor / index_put (x[i, j], x[:, i] = v): TVM's converters read negative
  indices out of bounds (garbage, ~1e24, no error), put the index dims in the wrong place
  for x[:, i, j] and x[i, :, j], and index_put required one index per dim (ONNX
  ScatterND indexes only the leading ones). Lowered to gather_nd / scatter_nd with torch's
  advanced-indexing layout and negative indices taken from the end (accumulate -> "add").
- aten.grid_sampler_2d / 3d: TVM's converter hands torch's [N, H, W, 2] grid to an op that
  wants [N, 2, H, W], so the output shape was wrong; 3-D had no converter. The grid is
  permuted to TOPI's layout and TOPI's grid_sample (same modes and corner conventions as
  torch) is called.
- aten.max_pool2d_with_indices / max_pool3d_with_indices: TVM returns zeros for the
  indices. When the graph reads them, one TE kernel reduces (flat index, value) pairs over
  each window: torch's convention (index h * W + w within the input plane, the first
  maximum in scan order, NaN wins). Graphs that read only the values keep TVM's pooling.
"""

from __future__ import annotations

import operator

import numpy as np
from tvm import relax, te, tirx, topi

from graphc.errors import UnsupportedOpError

from .lower import register_lowering, target_key

# torch's scatter_reduce names -> TOPI scatter_elements / scatter_nd reductions
_REDUCE = {"sum": "add", "prod": "mul", "amax": "max", "amin": "min"}


def _shape(x: relax.Expr, node) -> list[int]:
    try:
        return [int(s) for s in x.ty.shape]
    except (TypeError, ValueError):
        raise UnsupportedOpError(f"tvm backend: %{node.name} ({node.target}) has a dynamic "
                                 f"shape {x.ty.shape}; graphc compiles static shapes") from None


def _identity(reduce: str, dtype: str) -> relax.Expr:
    """The value a reduction starts from: 0, 1, the lowest or the highest of `dtype`."""
    if reduce == "sum":
        return relax.const(0, dtype)
    if reduce == "prod":
        return relax.const(1, dtype)
    if dtype.startswith("float"):
        return relax.const(float("-inf") if reduce == "amax" else float("inf"), dtype)
    if dtype == "bool":
        return relax.const(reduce == "amin", dtype)
    info = np.iinfo(dtype)
    return relax.const(int(info.min if reduce == "amax" else info.max), dtype)


def _crop(bb, x: relax.Expr, shape: list[int], keep: int | None = None) -> relax.Expr:
    """x[:shape[0], :shape[1], ...], dim `keep` whole."""
    dims = [d for d, (s, n) in enumerate(zip(shape, _shape_of(x))) if d != keep and s < n]
    if not dims:
        return x
    return bb.emit(relax.op.strided_slice(x, dims, [0] * len(dims), [shape[d] for d in dims]))


def _shape_of(x: relax.Expr) -> list[int]:
    return [int(s) for s in x.ty.shape]


def _put_back(bb, base: relax.Expr, piece: relax.Expr, dims: list[int]) -> relax.Expr:
    """base with its leading corner (piece's extent along `dims`) replaced by piece."""
    if not dims:
        return piece
    d, n = dims[0], _shape_of(piece)[dims[0]]
    inner = bb.emit(relax.op.strided_slice(base, [d], [0], [n]))
    inner = _put_back(bb, inner, piece, dims[1:])
    return bb.emit(relax.op.slice_scatter(base, inner, 0, n, 1, axis=d))


def _scatter(node, importer, x, dim: int, index, src, reduction: str) -> relax.Expr:
    """torch.scatter(_reduce) along dim with TOPI's scatter_elements, any index extent."""
    bb = importer.block_builder
    xs, ixs = _shape(x, node), _shape(index, node)
    dim %= len(xs)
    src = _crop(bb, src, ixs)  # torch reads src only where index has an element
    cropped = [d for d in range(len(xs)) if d != dim and ixs[d] < xs[d]]
    part = _crop(bb, x, ixs, dim)
    out = bb.emit(relax.op.scatter_elements(part, index, src, dim, reduction))
    return _put_back(bb, x, out, cropped)


@register_lowering("aten::scatter.src")
def _scatter_src(node, importer) -> relax.Expr:
    x, index, src = (importer.env[a] for a in (node.args[0], node.args[2], node.args[3]))
    return _scatter(node, importer, x, node.args[1], index, src, "update")


@register_lowering("aten::scatter.value")
def _scatter_value(node, importer) -> relax.Expr:
    x, index = importer.env[node.args[0]], importer.env[node.args[2]]
    src = relax.op.broadcast_to(relax.const(node.args[3], x.ty.dtype), index.ty.shape)
    return _scatter(node, importer, x, node.args[1], index, importer.block_builder.emit(src),
                    "update")


@register_lowering("aten::scatter_reduce.two")
def _scatter_reduce(node, importer) -> relax.Expr:
    x, index, src = (importer.env[a] for a in (node.args[0], node.args[2], node.args[3]))
    dim, reduce = node.args[1], node.args[4]
    include_self = node.kwargs.get("include_self", node.args[5] if len(node.args) > 5 else True)
    if reduce not in _REDUCE:
        raise UnsupportedOpError(
            f"tvm backend: %{node.name} ({node.target}) reduce={reduce!r} is not supported "
            f"(supported: {', '.join(_REDUCE)}); TOPI's mean leaves self out of the count")
    dtype = str(x.ty.dtype)
    if not include_self:  # targets start from the identity instead of self
        fill = relax.op.broadcast_to(_identity(reduce, dtype), index.ty.shape)
        x = _scatter(node, importer, x, dim, index, importer.block_builder.emit(fill), "update")
    return _scatter(node, importer, x, dim, index, src, _REDUCE[reduce])


def _advanced_index(node, importer, x: relax.Expr, indices: list):
    """torch's x[indices] (None: a whole dim) as a scatter_nd / gather_nd index: returns
    (index [*out, k], the shape of x[indices]). Leading dims indexed (k of them): out is the
    broadcast index shape and the trailing dims come whole. Otherwise every dim is indexed
    (k = x.ndim) and out is torch's result shape: the broadcast index dims replace adjacent
    indexed dims in place, or go first when the indexed dims are apart."""
    bb = importer.block_builder
    xs = _shape(x, node)
    indices = list(indices) + [None] * (len(xs) - len(indices))
    adv = [d for d, i in enumerate(indices) if i is not None]
    if not adv or any(str(importer.env[indices[d]].ty.dtype) not in ("int64", "int32")
                      for d in adv):
        raise UnsupportedOpError(
            f"tvm backend: %{node.name} ({node.target}) needs integer index tensors (a "
            "boolean mask selects a data-dependent number of elements)")
    shapes = {d: _shape(importer.env[indices[d]], node) for d in adv}
    batch = list(np.broadcast_shapes(*(tuple(s) for s in shapes.values())))
    sliced = [d for d in range(len(xs)) if d not in adv]
    if adv == list(range(len(adv))):
        first, out, sliced = 0, batch, []
        result = batch + xs[len(adv):]
    elif adv == list(range(adv[0], adv[-1] + 1)):
        first = adv[0]
        out = result = xs[:first] + batch + xs[adv[-1] + 1:]
    else:
        first = 0
        out = result = batch + [xs[d] for d in sliced]
    place = [d for d in range(len(out)) if not first <= d < first + len(batch)]
    cols = []
    for d in adv:  # int64, negative -> from the end (as torch does), aligned to batch's dims
        i = relax.op.astype(importer.env[indices[d]], "int64")
        i = relax.op.where(relax.op.less(i, relax.const(0, "int64")),
                           relax.op.add(i, relax.const(xs[d], "int64")), i)
        pad = len(batch) - len(shapes[d])
        i = relax.op.reshape(i, [1] * (first + pad) + shapes[d]
                             + [1] * (len(out) - first - len(batch)))
        cols.append((d, bb.emit(relax.op.broadcast_to(i, out))))
    for d, k in zip(sliced, place, strict=True):  # every position along a sliced dim
        i = relax.op.reshape(relax.op.arange(0, xs[d], 1, "int64"),
                             [xs[d] if j == k else 1 for j in range(len(out))])
        cols.append((d, bb.emit(relax.op.broadcast_to(i, out))))
    cols.sort(key=lambda c: c[0])  # data dim order
    return bb.emit(relax.op.stack([c for _, c in cols], -1)), result


@register_lowering("aten::index_put")
def _index_put(node, importer) -> relax.Expr:
    bb = importer.block_builder
    x = importer.env[node.args[0]]
    accumulate = bool(node.args[3] if len(node.args) > 3 else node.kwargs.get("accumulate"))
    index, shape = _advanced_index(node, importer, x, node.args[1])
    values = bb.emit(relax.op.broadcast_to(importer.env[node.args[2]], shape))
    return bb.emit(relax.op.scatter_nd(x, index, values, "add" if accumulate else "update"))


@register_lowering("aten::index.Tensor")
def _index(node, importer) -> relax.Expr:
    x = importer.env[node.args[0]]
    index, _ = _advanced_index(node, importer, x, node.args[1])
    return importer.block_builder.emit(relax.op.gather_nd(x, index))


_GRID_MODES = {0: "bilinear", 1: "nearest", 2: "bicubic"}
_GRID_PADDING = {0: "zeros", 1: "border", 2: "reflection"}


def _grid_sampler(node, importer, layout: str) -> relax.Expr:
    x, grid = importer.env[node.args[0]], importer.env[node.args[1]]
    mode, padding, align = node.args[2], node.args[3], bool(node.args[4])
    if mode not in _GRID_MODES or padding not in _GRID_PADDING or (
            mode == 2 and layout == "NCDHW"):
        raise UnsupportedOpError(
            f"tvm backend: %{node.name} ({node.target}) interpolation {mode} / padding "
            f"{padding} is not supported (TOPI: bilinear, nearest, 2-D bicubic; zeros, "
            "border, reflection)")
    bb = importer.block_builder
    # torch's grid is [N, *out, ndim]; TOPI's is [N, ndim, *out]
    rank = len(layout)
    grid = bb.emit(relax.op.permute_dims(grid, [0, rank - 1, *range(1, rank - 1)]))
    return bb.emit_te(topi.image.grid_sample, x, grid, _GRID_MODES[mode], layout,
                      _GRID_PADDING[padding], align)


@register_lowering("aten::grid_sampler_2d")
def _grid_sampler_2d(node, importer) -> relax.Expr:
    return _grid_sampler(node, importer, "NCHW")


@register_lowering("aten::grid_sampler_3d")
def _grid_sampler_3d(node, importer) -> relax.Expr:
    return _grid_sampler(node, importer, "NCDHW")


# ---- max pooling with indices ----------------------------------------------------------------

def _lowest(dtype: str):
    """-inf for floats (min_value is -FLT_MAX, which would beat a window of -inf)."""
    dtype = str(dtype)
    return tirx.const(float("-inf"), dtype) if dtype.startswith("float") else tirx.min_value(dtype)


def _argmax_reducer(dtype: str):
    """(index, value) pairs -> the larger value; NaN counts as the largest (torch propagates
    it); ties -> the lower index, so the first maximum in window scan order wins, as in
    torch, whatever order the reduction visits the taps."""
    def combine(x, y):
        (xi, xv), (yi, yv) = x, y
        if dtype.startswith("float"):
            y_nan, x_nan = tirx.isnan(yv), tirx.isnan(xv)
            bigger = tirx.any(yv > xv, tirx.all(y_nan, tirx.Not(x_nan)))
            same = tirx.any(yv == xv, tirx.all(y_nan, x_nan))
        else:
            bigger, same = yv > xv, yv == xv
        take = tirx.any(bigger, tirx.all(same, yi < xi))
        return tirx.Select(take, yi, xi), tirx.Select(take, yv, xv)

    def identity(ti, tv):  # loses every comparison (a tap of value -inf has a lower index)
        return tirx.max_value(ti), _lowest(tv)

    return te.comm_reducer(combine, identity, name="argmax")


def _pool_with_indices(x: te.Tensor, out_shape, kernel, stride, padding, dilation):
    """Max pooling over the trailing len(kernel) dims; indices flatten each input plane
    (h * W + w), torch's convention. Taps in the padding never win."""
    nsp = len(kernel)
    lead, size = list(x.shape[:-nsp]), [int(s) for s in x.shape[-nsp:]]
    axes = [te.reduce_axis((0, k), name=f"k{i}") for i, k in enumerate(kernel)]
    argmax = _argmax_reducer(str(x.dtype))

    def tap(*out):
        pos = [out[len(lead) + d] * stride[d] - padding[d] + axes[d] * dilation[d]
               for d in range(nsp)]
        inside = tirx.all(*[tirx.all(p >= 0, p < size[d]) for d, p in enumerate(pos)])
        flat = pos[0].astype("int64")
        for d in range(1, nsp):
            flat = flat * size[d] + pos[d].astype("int64")
        value = x[(*out[:len(lead)], *pos)]
        return argmax((tirx.Select(inside, flat, tirx.max_value("int64")),
                       tirx.if_then_else(inside, value, _lowest(x.dtype))), axis=axes)

    idx, val = te.compute(out_shape, tap, name="max_pool_argmax")
    return [val, idx]


def _ints(v, n: int) -> list[int]:
    v = list(v) if isinstance(v, list | tuple) else [v]
    return [int(a) for a in (v * n if len(v) == 1 else v)]


def _max_pool_with_indices(node, importer, nsp: int) -> relax.Expr:
    if all(u.target is operator.getitem and (u.args[1] == 0 or not u.users)
           for u in node.users):
        # nobody reads the indices: TVM's converter (scheduled pooling, zeros for indices)
        return importer.builtin[target_key(node.target).split(".", 1)[1]](node)
    x = importer.env[node.args[0]]
    # (self, kernel_size, stride=[] (= kernel), padding=0, dilation=1, ceil_mode)
    args = list(node.args) + [[], 0, 1][len(node.args) - 2:]
    kernel = _ints(args[1], nsp)
    stride = _ints(args[2], nsp) if args[2] else kernel
    padding, dilation = _ints(args[3], nsp), _ints(args[4], nsp)
    _shape(x, node)
    # the output extent (ceil_mode included) as torch computed it at trace time
    out_shape = [int(s) for s in node.meta["val"][0].shape]
    return importer.block_builder.emit_te(_pool_with_indices, x, out_shape, kernel, stride,
                                          padding, dilation)


@register_lowering("aten::max_pool2d_with_indices")
def _max_pool2d_with_indices(node, importer) -> relax.Expr:
    return _max_pool_with_indices(node, importer, 2)


@register_lowering("aten::max_pool3d_with_indices")
def _max_pool3d_with_indices(node, importer) -> relax.Expr:
    return _max_pool_with_indices(node, importer, 3)
