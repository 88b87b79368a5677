"""ATen ops that TVM 0.27's PyTorch importer converts wrongly or not at all (tests/fuzz).

- aten.select.int with a negative index: TVM emits take(x, index, dim) with the index as
  given, and take's default mode reads out of bounds for -1 (garbage, up to 1e38, in the
  output). The index is normalized against the static size first.
- aten.max_pool2d_with_indices: TVM returns zeros for the indices; lower_aten_index.py
  computes them.
- aten.div.Tensor_mode (torch.floor_divide, //) of an int64 tensor by a Python int: TVM
  makes the int an int32 constant and the import fails on the dtype mismatch. The
  constant takes the tensor's dtype.
- aten.adaptive_max_pool2d: no converter at all. Lowered with topi's adaptive max pool
  (the same windows as PyTorch's: start floor(i * H / oh), end ceil((i + 1) * H / oh));
  a graph that reads the indices is refused rather than given zeros.
- aten.convolution transposed over 3 spatial dims: TVM raises a bare ValueError; refused with
  the node's name instead.
"""

from __future__ import annotations

import operator

from tvm import relax, topi

from graphc.errors import UnsupportedOpError

from .lower import register_lowering


def _static_size(x: relax.Expr, dim: int, node) -> int:
    size = x.ty.shape[dim]
    try:
        return int(size)
    except (TypeError, ValueError):
        raise UnsupportedOpError(f"tvm backend: %{node.name} ({node.target}) selects along "
                                 f"dim {dim} of dynamic size {size}; graphc compiles static "
                                 "shapes") from None


@register_lowering("aten::select.int")
def _select(node, importer) -> relax.Expr:
    x = importer.env[node.args[0]]
    dim = node.args[1] % x.ty.ndim
    index = node.args[2] % _static_size(x, dim, node)  # PyTorch checked the range at trace
    return importer.block_builder.emit(relax.op.take(x, relax.const(index, "int64"), dim))


@register_lowering("aten::div.Tensor_mode")
def _div_mode(node, importer) -> relax.Expr:
    x, other = importer.env[node.args[0]], node.args[1]
    mode = node.kwargs.get("rounding_mode", node.args[2] if len(node.args) > 2 else None)
    dtype = str(x.ty.dtype)
    if mode == "floor" and isinstance(other, int) and dtype.startswith("int"):
        # relax floor_divide on integers rounds toward -inf, as torch does
        return importer.block_builder.emit(
            relax.op.floor_divide(x, relax.const(other, dtype)))
    return importer.builtin["div.Tensor_mode"](node)


def _refuse_indices(node) -> None:
    """Refuse when anything reads output 1 (the argmax indices) of a pooling node."""
    for user in node.users:  # torch.export keeps an unused getitem of the indices: fine
        if user.target is not operator.getitem or (user.args[1] != 0 and user.users):
            raise UnsupportedOpError(
                f"tvm backend: %{user.name} reads the indices of %{node.name} "
                f"({node.target}); the TVM backend computes only the pooled values")


@register_lowering("aten::adaptive_max_pool2d")
def _adaptive_max_pool2d(node, importer) -> relax.Expr:
    _refuse_indices(node)
    x = importer.env[node.args[0]]
    size = [int(s) for s in node.args[1]]
    bb = importer.block_builder
    squeeze = x.ty.ndim == 3  # [C, H, W]: pooled as a batch of one
    if squeeze:
        x = bb.emit(relax.op.expand_dims(x, 0))
    out = bb.emit_te(topi.nn.adaptive_pool, x, size, "max", "NCHW")
    if squeeze:
        out = bb.emit(relax.op.squeeze(out, [0]))
    indices = relax.op.zeros(out.ty.shape, "int64")  # never read: refused above
    return bb.emit(relax.Tuple([out, bb.emit(indices)]))


def _reduce_dims(node, x: relax.Expr):
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", [])
    keep = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
    return [d % x.ty.ndim for d in dims] or None, bool(keep)


# aten.amax / aten.amin (max/min over several dims, no indices): no converter in TVM 0.27.
@register_lowering("aten::amax")
def _amax(node, importer) -> relax.Expr:
    x = importer.env[node.args[0]]
    return importer.block_builder.emit(relax.op.max(x, *_reduce_dims(node, x)))


@register_lowering("aten::amin")
def _amin(node, importer) -> relax.Expr:
    x = importer.env[node.args[0]]
    return importer.block_builder.emit(relax.op.min(x, *_reduce_dims(node, x)))


# aten.sort.stable (what torch.sort(stable=True) exports): no converter. argsort is stable
# on CPU (ties keep the lower index first, descending too); the values are gathered by it.
@register_lowering("aten::sort.stable")
def _sort_stable(node, importer) -> relax.Expr:
    x = importer.env[node.args[0]]
    dim = node.kwargs.get("dim", -1) % x.ty.ndim
    bb = importer.block_builder
    idx = bb.emit(relax.op.argsort(x, dim, bool(node.kwargs.get("descending", False)), "int64"))
    return bb.emit(relax.Tuple([bb.emit(relax.op.gather_elements(x, idx, dim)), idx]))


# aten.convolution, transposed, over 3 spatial dims: TVM 0.27's converter raises a bare
# ValueError ("Unsupported transposed convolution dimensionality: 5"). Refused by name here;
# every other convolution goes to TVM's converter.
@register_lowering("aten::convolution.default")
def _convolution(node, importer) -> relax.Expr:
    x = importer.env[node.args[0]]
    transposed = bool(node.args[6]) if len(node.args) > 6 else False
    if transposed and x.ty.ndim not in (3, 4):
        raise UnsupportedOpError(
            f"tvm backend: %{node.name} ({node.target}) is a transposed convolution over "
            f"{x.ty.ndim - 2} spatial dims; TVM 0.27 lowers transposed convolutions in 1 or 2 "
            "dims only (the torch backend runs it: target='torch')")
    return importer.builtin["convolution.default"](node)
