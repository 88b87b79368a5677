"""Resize modes that F.interpolate does not compute, as one static matrix per resized axis.

ONNX Resize is separable and linear in the data (plus a constant where
tf_crop_and_resize extrapolates), so along each axis it is ``y = W x + b``. W and b
are made at load time by running onnx's reference Resize on the unit vectors (and on
zeros, for b) of that axis: every coordinate mode, nearest rounding, cubic
coefficient, exclude_outside, antialias and aspect policy is then exactly the spec's.
Nearest modes pick rows (index_select), so they keep integer dtypes; linear and
cubic modes multiply by W.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper
from onnx.reference import ReferenceEvaluator

from graphc.frontends.onnx_ops import Node, axis_of, ints

_PASSED = ("mode", "coordinate_transformation_mode", "nearest_mode", "cubic_coeff_a",
           "exclude_outside", "antialias", "extrapolation_value")


_MODES = {
    "mode": ("nearest", "linear", "cubic"),
    "coordinate_transformation_mode": ("half_pixel", "half_pixel_symmetric", "pytorch_half_pixel",
                                       "align_corners", "asymmetric", "tf_crop_and_resize"),
    "nearest_mode": ("round_prefer_floor", "round_prefer_ceil", "floor", "ceil"),
    "keep_aspect_ratio_policy": ("stretch", "not_larger", "not_smaller"),
}
_DEFAULTS = {"mode": "nearest", "coordinate_transformation_mode": "half_pixel",
             "nearest_mode": "round_prefer_floor", "keep_aspect_ratio_policy": "stretch"}


def separable_supports(node: Node) -> bool:
    """Whether the node's modes are ones this opset's spec (and its reference) defines."""
    return all(node.attr(k, _DEFAULTS[k]) in ok for k, ok in _MODES.items())


def _reference_1d(node: Node, n_in: int, roi, scale, size, extrapolation: float):
    """The reference Resize along axis 1 of a [rows, n_in] float64 input, as a function."""
    attrs = {k: node.attrs[k] for k in _PASSED if k in node.attrs}
    attrs.update(axes=[1], extrapolation_value=extrapolation)
    names = ["x", "roi" if roi is not None else "", "scales" if scale is not None else "",
             "sizes" if size is not None else ""]
    while not names[-1]:
        names.pop()
    inputs = [helper.make_tensor_value_info("x", TensorProto.DOUBLE, None)]
    inits = []
    if roi is not None:
        inits.append(onnx.numpy_helper.from_array(np.array(roi, np.float64), "roi"))
    if scale is not None:
        inits.append(onnx.numpy_helper.from_array(np.array([scale], np.float32), "scales"))
    if size is not None:
        inits.append(onnx.numpy_helper.from_array(np.array([size], np.int64), "sizes"))
    graph = helper.make_graph([helper.make_node("Resize", names, ["y"], **attrs)], "resize",
                              inputs, [helper.make_tensor_value_info("y", TensorProto.DOUBLE,
                                                                     None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    session = ReferenceEvaluator(model)
    return lambda x: session.run(None, {"x": x})[0]


def _axis_plan(node: Node, x: torch.Tensor, scales, sizes) -> dict[int, tuple]:
    """axis -> (output size, scale passed to the reference or None, size or None)."""
    axes = [axis_of(node, a, x.ndim) for a in (node.attr("axes") or range(x.ndim))]
    policy = node.attr("keep_aspect_ratio_policy", "stretch")
    if sizes is not None and np.asarray(sizes).size:
        outs = ints(sizes)
        if policy == "stretch":
            return {a: (o, None, o) for a, o in zip(axes, outs)}
        ratios = [o / x.shape[a] for a, o in zip(axes, outs)]
        scale = min(ratios) if policy == "not_larger" else max(ratios)
        return {a: (math.floor(scale * x.shape[a] + 0.5), scale, None) for a in axes}
    factors = [float(f) for f in np.asarray(scales).reshape(-1)]
    return {a: (math.floor(x.shape[a] * f), f, None) for a, f in zip(axes, factors)}


def resize_separable(node: Node, x: torch.Tensor, roi=None, scales=None, sizes=None):
    plan = _axis_plan(node, x, scales, sizes)
    crop = node.attr("coordinate_transformation_mode") == "tf_crop_and_resize"
    nearest = node.attr("mode", "nearest") == "nearest"
    if not nearest and not x.is_floating_point():
        raise node.unsupported("mode (for an integer input)", node.attr("mode"))
    extrapolation = node.attr("extrapolation_value", 0.0)
    roi_flat = None if roi is None else np.asarray(roi, np.float64).reshape(-1)
    for i, (a, (out, scale, size)) in enumerate(plan.items()):
        n = x.shape[a]
        if out == n and (scale in (None, 1.0)) and not crop:
            continue
        axis_roi = [roi_flat[i], roi_flat[len(plan) + i]] if crop else None
        run = _reference_1d(node, n, axis_roi, scale, size, 0.0)
        w = run(np.eye(n)).T  # [out, n]: column j is the response to the unit vector j
        b = _reference_1d(node, n, axis_roi, scale, size, extrapolation)(np.zeros((1, n)))[0]
        if w.shape[0] != out:
            raise node.unsupported(f"output size along axis {a}", (w.shape[0], out))
        x = _apply(node, x, a, w, b if crop else None, nearest)
    return x


def _apply(node: Node, x: torch.Tensor, axis: int, w: np.ndarray, b, nearest: bool):
    shape = [1] * x.ndim
    shape[axis] = w.shape[0]
    if nearest:
        if not (((w == 0) | (w == 1)).all() and (w.sum(1) <= 1).all()):
            raise node.unsupported("nearest weights", "not a row selection")
        y = x.index_select(axis, torch.from_numpy(w.argmax(1)).to(x.device))
        outside = w.sum(1) == 0  # tf_crop_and_resize rows outside the image
        if b is None or not outside.any():
            return y
        fill = torch.from_numpy(b).to(dtype=x.dtype, device=x.device).reshape(shape)
        return torch.where(torch.from_numpy(outside).to(x.device).reshape(shape), fill, y)
    wt = torch.from_numpy(w.T.copy()).to(dtype=x.dtype, device=x.device)
    y = (x.movedim(axis, -1) @ wt).movedim(-1, axis)
    if b is not None and np.any(b):
        y = y + torch.from_numpy(b).to(dtype=x.dtype, device=x.device).reshape(shape)
    return y
