"""aten.upsample_*2d with scale factors: PyTorch's source coordinates, not TVM's.

TVM 0.27's importer lowers upsample_{bilinear,nearest,bicubic}2d.vec to resize2d of the
output size, and resize2d maps an output pixel back with the size ratio in/out. PyTorch maps
it with the given scale, 1/scale, whenever scale factors are given (and align_corners is
off). The two agree when in * scale is a whole number; otherwise every pixel moves: ONNX's
downsample_scales_linear (4x4 at 0.6 -> 2x2) came out 3.5 where 2.67 is right, silently.
And the antialiased bilinear (_upsample_bilinear2d_aa) dropped the antialias filter, which
changes every downscaled pixel.

Rules, keyed by op:
- bilinear and nearest with a scale that does not divide evenly: a TE compute with
  PyTorch's formulas (upsample_bilinear2d / upsample_nearest2d kernels:
  area_pixel_compute_source_index, nearest_idx).
- bicubic with such a scale (torch.export usually decomposes bicubic into index math
  first), and antialiased downscaling: refused (UnsupportedOpError) rather than computed
  on TVM's formula.
- everything else (sizes given, whole-number ratios, align_corners): TVM's own converter.
"""

from __future__ import annotations

from tvm import relax, te, tirx

from graphc.errors import UnsupportedOpError

from .lower import register_lowering


def _args(node) -> tuple:
    """(output_size, align_corners, scale_factors) of an upsample *.vec node."""
    a = list(node.args) + [None] * 4
    if "nearest" in str(node.target):  # upsample_nearest2d.vec(input, output_size, scales)
        return a[1], False, a[2]
    return a[1], bool(a[2]), a[3]


def _hw(x) -> list[int]:
    """The last two dims of a relax expr or a te.Tensor (TVM arrays take no slices)."""
    shape = x.shape if isinstance(x, te.Tensor) else x.ty.shape
    return [int(shape[i]) for i in range(len(shape) - 2, len(shape))]


def _uneven(x: relax.Expr, scales) -> bool:
    """Whether a given scale makes PyTorch's 1/scale differ from TVM's in/out ratio."""
    if not scales:
        return False
    sizes = _hw(x)
    return any(1.0 / s != n / int(n * s) for n, s in zip(sizes, scales) if int(n * s) > 0)


def _out_sizes(x: relax.Expr, size, scales) -> list[int]:
    return list(size) if size else [int(n * s) for n, s in zip(_hw(x), scales)]


def _linear_index(dst, n: int, rscale: float):
    """PyTorch's area_pixel_compute_source_index (align_corners off): the two source
    indices and the weight of the second."""
    src = tirx.max((dst.astype("float32") + 0.5) * rscale - 0.5, tirx.const(0.0, "float32"))
    i0 = tirx.min(src.astype("int64"), n - 1)  # src >= 0: the cast floors
    i1 = tirx.min(i0 + 1, n - 1)
    return i0, i1, src - i0.astype("float32")


def _bilinear(x: te.Tensor, out_hw: list[int], scales) -> te.Tensor:
    (h, w), (rh, rw) = _hw(x), [1.0 / s for s in scales]

    def value(n, c, i, j):
        y0, y1, ly = _linear_index(i, h, rh)
        x0, x1, lx = _linear_index(j, w, rw)
        ly, lx = ly.astype(x.dtype), lx.astype(x.dtype)
        one = tirx.const(1, x.dtype)
        top = x[n, c, y0, x0] * (one - lx) + x[n, c, y0, x1] * lx
        bottom = x[n, c, y1, x0] * (one - lx) + x[n, c, y1, x1] * lx
        return top * (one - ly) + bottom * ly

    return te.compute((x.shape[0], x.shape[1], *out_hw), value, name="resize_bilinear")


def _nearest(x: te.Tensor, out_hw: list[int], scales) -> te.Tensor:
    (h, w), (rh, rw) = _hw(x), [1.0 / s for s in scales]

    def index(dst, n: int, rscale: float):  # PyTorch's nearest_idx: floor(dst * scale)
        return tirx.min((dst.astype("float32") * rscale).astype("int64"), n - 1)

    return te.compute((x.shape[0], x.shape[1], *out_hw),
                      lambda n, c, i, j: x[n, c, index(i, h, rh), index(j, w, rw)],
                      name="resize_nearest")


COMPUTES = {"upsample_bilinear2d": _bilinear, "upsample_nearest2d": _nearest}


def _lower(kind: str):
    def lower(node, importer) -> relax.Expr:
        x = importer.env[node.args[0]]
        size, align_corners, scales = _args(node)
        if align_corners or not _uneven(x, scales):
            return importer.builtin[str(node.target).split(".", 1)[1]](node)
        if kind not in COMPUTES:
            raise UnsupportedOpError(
                f"tvm backend: %{node.name} ({node.target}) with scale factors {list(scales)} "
                "that do not divide the input size: TVM's resize maps pixels by the size "
                "ratio, PyTorch by the scale; only bilinear and nearest are lowered that way")
        return importer.block_builder.emit_te(COMPUTES[kind], x, _out_sizes(x, size, scales),
                                              list(scales), primfunc_name_hint=kind)
    return lower


for _kind in ("upsample_bilinear2d", "upsample_nearest2d", "upsample_bicubic2d"):
    register_lowering(f"aten::{_kind}.vec")(_lower(_kind))


@register_lowering("aten::_upsample_bilinear2d_aa.default")
def _bilinear_aa(node, importer) -> relax.Expr:
    x = importer.env[node.args[0]]
    size, _, scales = _args(node)
    out = _out_sizes(x, size, scales)
    if any(o < n for o, n in zip(out, _hw(x))):
        raise UnsupportedOpError(
            f"tvm backend: %{node.name} ({node.target}) downscales with antialias=True; TVM's "
            "resize has no antialias filter and would compute another image")
    return importer.builtin["_upsample_bilinear2d_aa.default"](node)
