"""Per-op knowledge of structured pruning: how each ATen op moves a tracked channel axis.

A tracked tensor carries `Track(axis, labels)`: labels[i] is the global channel unit that
owns index i along `axis` (-1: owned by no prunable layer, never removed). A rule gets the
analysis (passes/prune_groups.py), the node and its tracked inputs {arg position: Track},
records members (weight axes to slice), shape constants to rewrite and couplings, and
returns the output's Track (a dict {getitem index: Track} for tuple outputs) or None.
An op with a tracked input that is not in OPS blocks the channels it carries.
"""

from __future__ import annotations

import operator
from typing import NamedTuple

import torch
from torch import fx

aten = torch.ops.aten


class Track(NamedTuple):
    axis: int
    labels: torch.Tensor  # int64 [size along axis]


def _shape(x) -> tuple[int, ...]:
    return tuple(int(s) for s in x.meta["val"].shape)


def _weight(node) -> fx.Node | None:
    """The get_attr a layer's weight operand is (directly, or permute(get_attr, [1, 0]))."""
    if isinstance(node, fx.Node) and node.op == "get_attr":
        return node
    if isinstance(node, fx.Node) and node.target is aten.permute.default \
            and list(node.args[1]) == [1, 0] and node.args[0].op == "get_attr":
        return node.args[0]
    return None


# ---- layers: sinks of their input's channels and sources of new ones ----------------------
def _conv(an, n, tr):
    w, b, groups = _weight(n.args[1]), n.args[2], n.args[8]
    o, i_per_group = _shape(n.args[1])[:2]
    c_in = _shape(n.args[0])[1]
    x = tr.get(0)
    if w is None or n.args[6] or (b is not None and _weight(b) is None):
        an.block_track(x, n, "its weight is computed or it is a transposed convolution")
        return None
    if x is not None and x.axis != 1:
        an.block_track(x, n, f"channels on axis {x.axis} of a convolution input")
        x = None
    if groups != 1 and groups == c_in == o and i_per_group == 1:
        # depthwise: output channel c reads input channel c only, so it joins that group
        if x is None:
            return None
        an.member(w, 0, x.labels, n, "weight")
        if b is not None:
            an.member(b, 0, x.labels, n, "aux")
        an.const(n, 8, None, x.labels)
        return Track(1, x.labels)
    if groups != 1:
        an.block_track(x, n, f"grouped convolution (groups={groups})")
        return None
    if x is not None:
        an.member(w, 1, x.labels, n, "weight")
    units = an.new_space(n, o)
    an.member(w, 0, units, n, "weight")
    if b is not None:
        an.member(b, 0, units, n, "aux")
    return Track(1, units)


def _linear_rule(x_arg, w_arg, b_arg):
    def rule(an, n, tr):
        w = _weight(n.args[w_arg])
        b = n.args[b_arg] if b_arg is not None else None
        x = tr.get(x_arg)
        if w is None or (isinstance(b, fx.Node) and _weight(b) is None):
            for t in tr.values():
                an.block_track(t, n, "a matrix product of two computed tensors")
            return None
        rank = len(_shape(n.args[x_arg]))
        if x is not None and x.axis != rank - 1:
            an.block_track(x, n, f"channels on axis {x.axis} of a linear layer's input")
            x = None
        if x is not None:
            an.member(w, 1, x.labels, n, "weight")
        units = an.new_space(n, _shape(w)[0])
        an.member(w, 0, units, n, "weight")
        if isinstance(b, fx.Node):
            an.member(b, 0, units, n, "aux")
        return Track(len(_shape(n)) - 1, units)
    return rule


def _batch_norm(an, n, tr):
    x = tr[0]
    if x.axis != 1:
        return an.block_track(x, n, "batchnorm over another axis than the channels")
    for a in n.args[1:5]:
        if isinstance(a, fx.Node):
            if a.op != "get_attr":
                return an.block_track(x, n, "batchnorm parameters are computed")
            an.member(a, 0, x.labels, n, "aux")
    return {0: x}


def _layer_norm(an, n, tr):
    x = tr[0]
    rank = len(_shape(n.args[0]))
    if x.axis >= rank - len(n.args[1]):
        return an.block_track(x, n, "layer norm's statistics mix the channels")
    return {0: x}


# ---- channel-preserving ops ---------------------------------------------------------------
def _same(an, n, tr):
    """Unary elementwise / pooling / layout-free ops: the axis passes through."""
    (pos, x), = tr.items()
    if pos != 0:
        return an.block_track(x, n, "a tracked tensor as a secondary operand")
    return x


def _pool(an, n, tr):
    x = tr[0]
    if x.axis >= len(_shape(n.args[0])) - 2:
        return an.block_track(x, n, "pooling over the channel axis")
    return {0: x, 1: x} if n.target is aten.max_pool2d_with_indices.default else x


def _elementwise(an, n, tr):
    """Binary/ternary elementwise with broadcasting: tracked operands are coupled; a
    constant operand along the axis is a member; a computed untracked one blocks."""
    out_rank = len(_shape(n))
    axes = {t.axis + out_rank - len(_shape(n.args[p])) for p, t in tr.items()}
    if len(axes) != 1:
        for t in tr.values():
            an.block_track(t, n, "operands tracked on different axes")
        return None
    axis = axes.pop()
    labels = None
    for p, t in tr.items():
        labels = t.labels if labels is None else an.couple(labels, t.labels, n)
    size = _shape(n)[axis]
    for p, a in enumerate(n.args):
        if p in tr or not isinstance(a, fx.Node) or "val" not in a.meta:
            continue
        shp = _shape(a)
        ax = axis - (out_rank - len(shp))
        if ax < 0 or shp[ax] == 1:
            continue  # broadcast along the channels: nothing to slice
        if a.op == "get_attr":
            an.member(a, ax, labels, n, "aux")
        else:
            an.block_track(Track(axis, labels), n,
                           f"channels meet %{a.name}, which no prunable layer owns")
            return None
    if len(labels) != size:
        return an.block_track(Track(axis, labels), n, "a broadcast of the channels")
    return Track(axis, labels)


def _reduce(an, n, tr):
    x = tr[0]
    rank = len(_shape(n.args[0]))
    dims = n.args[1] if len(n.args) > 1 and n.args[1] is not None else list(range(rank))
    dims = {d % rank for d in (dims if isinstance(dims, (list, tuple)) else [dims])}
    keep = (n.args[2] if len(n.args) > 2 else n.kwargs.get("keepdim", False))
    if x.axis in dims:
        return an.block_track(x, n, "a reduction over the channel axis")
    return Track(x.axis if keep else x.axis - sum(d < x.axis for d in dims), x.labels)


def _softmax(an, n, tr):
    x = tr[0]
    if n.args[1] % len(_shape(n)) == x.axis:
        return an.block_track(x, n, "a softmax over the channel axis")
    return x


def _permute(an, n, tr):
    x = tr[0]
    perm = [d % len(_shape(n)) for d in n.args[1]]
    return Track(perm.index(x.axis), x.labels)


def _transpose(an, n, tr):
    x = tr[0]
    rank = len(_shape(n))
    a, b = n.args[1] % rank, n.args[2] % rank
    return Track(b if x.axis == a else a if x.axis == b else x.axis, x.labels)


def _unsqueeze(an, n, tr):
    x = tr[0]
    d = n.args[1] % len(_shape(n))
    return Track(x.axis + (d <= x.axis), x.labels)


def _squeeze(an, n, tr):
    x = tr[0]
    rank = len(_shape(n.args[0]))
    dims = n.args[1] if len(n.args) > 1 else [i for i, s in enumerate(_shape(n.args[0]))
                                              if s == 1]
    dims = [d % rank for d in (dims if isinstance(dims, (list, tuple)) else [dims])]
    dims = [d for d in dims if _shape(n.args[0])[d] == 1]
    if x.axis in dims:
        return an.block_track(x, n, "squeezing the channel axis")
    return Track(x.axis - sum(d < x.axis for d in dims), x.labels)


def _off_axis(dim_arg: int, drops: bool):
    """slice / select along another axis than the channels."""
    def rule(an, n, tr):
        x = tr[0]
        d = n.args[dim_arg] % len(_shape(n.args[0]))
        if d == x.axis:
            return an.block_track(x, n, "slicing the channel axis")
        return Track(x.axis - (drops and d < x.axis), x.labels)
    return rule


def _expand(an, n, tr):
    x = tr[0]
    axis = x.axis + len(_shape(n)) - len(_shape(n.args[0]))
    if n.args[1][axis] != -1:
        an.const(n, 1, axis, x.labels)
    return Track(axis, x.labels)


def _cat(an, n, tr):
    tensors = n.args[0]
    rank = len(_shape(n))
    dim = (n.args[1] if len(n.args) > 1 else 0) % rank
    tracks = {}
    for p, t in tr.items():  # tracked positions are (0, k): the list's k-th element
        tracks[p[1] if isinstance(p, tuple) else p] = t
    if any(t.axis != dim for t in tracks.values()):
        for t in tracks.values():
            an.block_track(t, n, "a concatenation along another axis than the channels")
        return None
    parts = [tracks[k].labels if k in tracks else torch.full((_shape(a)[dim],), -1)
             for k, a in enumerate(tensors)]
    return Track(dim, torch.cat(parts))


def _bmm(an, n, tr):
    """bmm([b, n, k], [b, k, m]): the batch axis couples both operands, k is contracted
    (pruning it is coupled on both), n and m pass through to the output."""
    a, b = tr.get(0), tr.get(1)
    if (a and a.axis == 0) or (b and b.axis == 0):
        if not (a and b and a.axis == b.axis == 0):
            for t in tr.values():
                an.block_track(t, n, "a batched product with an untracked operand")
            return None
        return Track(0, an.couple(a.labels, b.labels, n))
    if a and a.axis == 2 or b and b.axis == 1:
        if a and b and a.axis == 2 and b.axis == 1:
            an.couple(a.labels, b.labels, n)
            return None
        for t in tr.values():
            an.block_track(t, n, "a contraction with an untracked operand")
        return None
    return a or b


def _view(an, n, tr):
    return an.view(n, tr[0])


def _getitem(an, n, tr):
    return None  # handled by the analysis (tuple tracks)


_UNARY = ("relu", "gelu", "hardtanh", "sigmoid", "tanh", "silu", "hardswish", "hardsigmoid",
          "leaky_relu", "elu", "clone", "alias", "detach", "_to_copy", "dropout", "neg", "abs",
          "exp", "sqrt", "rsqrt", "erf", "clamp", "relu6", "contiguous")
_SCALAR = ("mul.Scalar", "div.Scalar", "add.Scalar", "sub.Scalar", "pow.Tensor_Scalar",
           "clamp_min", "clamp_max")


def _overload(name: str):
    base, _, ov = name.partition(".")
    packet = getattr(aten, base, None)
    return getattr(packet, ov or "default", None) if packet is not None else None


OPS = {
    aten.convolution.default: _conv,
    aten.addmm.default: _linear_rule(1, 2, 0),
    aten.mm.default: _linear_rule(0, 1, None),
    aten.linear.default: _linear_rule(0, 1, 2),
    aten._native_batch_norm_legit_no_training.default: _batch_norm,
    aten.native_layer_norm.default: _layer_norm,
    aten.max_pool2d_with_indices.default: _pool,
    aten.max_pool2d.default: _pool,
    aten.avg_pool2d.default: _pool,
    aten._adaptive_avg_pool2d.default: _pool,
    aten.adaptive_avg_pool2d.default: _pool,
    aten.add.Tensor: _elementwise,
    aten.sub.Tensor: _elementwise,
    aten.mul.Tensor: _elementwise,
    aten.div.Tensor: _elementwise,
    aten.maximum.default: _elementwise,
    aten.minimum.default: _elementwise,
    aten.where.self: _elementwise,
    aten.mean.dim: _reduce,
    aten.sum.dim_IntList: _reduce,
    aten.amax.default: _reduce,
    aten._softmax.default: _softmax,
    aten._log_softmax.default: _softmax,
    aten.permute.default: _permute,
    aten.transpose.int: _transpose,
    aten.unsqueeze.default: _unsqueeze,
    aten.squeeze.dims: _squeeze,
    aten.squeeze.dim: _squeeze,
    aten.squeeze.default: _squeeze,
    aten.slice.Tensor: _off_axis(1, False),
    aten.select.int: _off_axis(1, True),
    aten.expand.default: _expand,
    aten.cat.default: _cat,
    aten.bmm.default: _bmm,
    aten.view.default: _view,
    aten._unsafe_view.default: _view,
    aten.reshape.default: _view,
    operator.getitem: _getitem,
}
for _name in _UNARY + _SCALAR:
    _op = _overload(_name)
    if _op is not None:
        OPS.setdefault(_op, _same)
