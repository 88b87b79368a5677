"""ONNX frontend: load_onnx(...) and its torch.export trace against onnxruntime.

Every numerical test runs the model three ways: onnxruntime (the reference, graph
optimizations off), the OnnxModule eagerly, and the module traced by torch.export.
Tolerance: max abs error < 1e-4 in fp32 (measured: ~1e-6 and below on all cases).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import helper

from graphc.errors import FrontendError, InputError, UnsupportedOpError
from graphc.frontends.onnx import load_onnx
from tests.models import onnx_models as om

TOL = 1e-4


def ort_run(model: onnx.ModelProto | str, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    src = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(src, opts, providers=["CPUExecutionProvider"]).run(None, feeds)


def max_error(got: np.ndarray, want: np.ndarray) -> float:
    """Max abs difference; equal infinities and NaN against NaN count as exact."""
    got, want = got.astype(np.float64), want.astype(np.float64)
    same = (got == want) | (np.isnan(got) & np.isnan(want))
    with np.errstate(invalid="ignore"):  # inf - inf
        diff = np.nan_to_num(np.abs(got - want), nan=np.inf)
    return float(np.where(same, 0.0, diff).max(initial=0))


def check(model, feeds: dict[str, np.ndarray], input_shapes=None, tol=TOL) -> float:
    """Compare eager and torch.export'ed OnnxModule with onnxruntime; returns the max error."""
    expected = ort_run(model, feeds)
    module = load_onnx(model, input_shapes)
    inputs = tuple(torch.from_numpy(feeds[n]) for n in module.input_names)
    exported = torch.export.export(module, inputs, strict=False).module()
    errors = []
    for run in (module, exported):
        got = run(*inputs)
        assert isinstance(got, tuple) and len(got) == len(expected)
        for g, e in zip(got, expected):
            assert tuple(g.shape) == e.shape and g.dtype == torch.from_numpy(e).dtype
            errors.append(max_error(g.detach().numpy(), e))
    assert max(errors) < tol, f"max abs error {max(errors):.3g}"
    return max(errors)


# ---------------------------------------------------------------- exported networks

NETWORKS = {"resnet18": om.resnet18, "mobilenet_v2": om.mobilenet_v2, "bert": om.bert_encoder}


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "torchscript"])
@pytest.mark.parametrize("net", NETWORKS)
def test_exported_network(net, dynamo, tmp_path):
    model, inputs, names = NETWORKS[net]()
    path = tmp_path / f"{net}.onnx"
    om.export(model, inputs, names, path, dynamo=dynamo)
    feeds = {n: x.numpy() for n, x in zip(names, inputs)}
    # the reference must be non-trivial, or a small absolute error would prove nothing
    assert all(np.abs(r).max() > 0.5 for r in ort_run(path, feeds))
    check(path, feeds)
    with torch.no_grad():  # and the ONNX export itself is faithful to the torch model
        for want, got in zip(model(*inputs), ort_run(path, feeds)):
            np.testing.assert_allclose(got, want.numpy(), atol=1e-4)


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "torchscript"])
def test_exporter_idioms(dynamo, tmp_path):
    model, (x,), names = om.idioms_cnn()
    path = tmp_path / "idioms.onnx"
    # the dynamo export gets a dynamic batch dim; the torchscript one traces x.size(0)
    om.export(model, (x,), names, path, dynamo=dynamo, dynamic_dims={0: "batch"} if dynamo else None)
    ops = {n.op_type for n in onnx.load(path).graph.node}
    assert {"Resize", "AveragePool", "Shape"} <= ops
    check(path, {"x": x.numpy()}, input_shapes={"x": tuple(x.shape)})


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "torchscript"])
def test_bert_with_dynamic_dims_folds_shape_arithmetic(dynamo, tmp_path):
    model, inputs, names = om.bert_encoder()
    path = tmp_path / "bert_dynamic.onnx"
    om.export(model, inputs, names, path, dynamo=dynamo, dynamic_dims={0: "batch", 1: "seq"})
    ops = {n.op_type for n in onnx.load(path).graph.node}
    assert "Shape" in ops  # the export really computes shapes at run time
    for batch, seq in [(2, 8), (3, 5)]:  # the export's own shape, and another one
        ids = np.random.default_rng(seq).integers(0, 100, (batch, seq))
        mask = np.ones((batch, seq), np.int64)
        mask[0, seq // 2:] = 0
        feeds = dict(zip(names, [ids, mask]))
        check(path, feeds, input_shapes={n: (batch, seq) for n in names})
    with pytest.raises(FrontendError, match=r"input 'input_ids' has dynamic shape.*input_shapes="):
        load_onnx(path)


# ---------------------------------------------------------------- one-node graphs

_rng = np.random.default_rng(0)


def f32(*shape) -> np.ndarray:
    return _rng.standard_normal(shape).astype(np.float32)


def i64(*values) -> np.ndarray:
    return np.array(values, np.int64)


def scalar(v, dtype=np.float32) -> np.ndarray:
    return np.array(v, dtype)


# (id, op_type, inputs, attributes, names that are initializers, outputs, opset)
NODE_CASES = [
    ("gemm_transA_alpha_beta", "Gemm", {"a": f32(4, 3), "b": f32(4, 5), "c": f32(5)},
     {"transA": 1, "alpha": 0.5, "beta": 2.0}, ("b", "c"), 1, 17),
    ("gemm_as_linear", "Gemm", {"a": f32(2, 4), "b": f32(3, 4), "c": f32(3)},
     {"transB": 1}, ("b", "c"), 1, 17),
    ("gemm_dynamic_b_no_c", "Gemm", {"a": f32(3, 4), "b": f32(5, 4)},
     {"transB": 1, "alpha": 2.0}, (), 1, 17),
    ("gemm_matrix_c", "Gemm", {"a": f32(2, 3), "b": f32(3, 4), "c": f32(2, 1)},
     {"beta": 0.5}, ("c",), 1, 17),
    ("matmul_batched", "MatMul", {"a": f32(2, 1, 3, 4), "b": f32(3, 4, 5)}, {}, (), 1, 17),
    ("pad_constant", "Pad", {"x": f32(1, 2, 3, 4), "p": i64(0, 0, 1, 2, 0, 1, 0, 3),
                             "v": scalar(1.5)}, {}, ("p", "v"), 1, 17),
    ("pad_reflect", "Pad", {"x": f32(1, 2, 5, 6), "p": i64(0, 0, 2, 1, 0, 0, 1, 2)},
     {"mode": "reflect"}, ("p",), 1, 17),
    ("pad_edge", "Pad", {"x": f32(2, 5, 6), "p": i64(0, 1, 2, 0, 3, 1)},
     {"mode": "edge"}, ("p",), 1, 17),
    ("pad_wrap", "Pad", {"x": f32(1, 2, 5, 6), "p": i64(0, 0, 2, 1, 0, 0, 1, 2)},
     {"mode": "wrap"}, ("p",), 1, 19),
    ("pad_negative_crops", "Pad", {"x": f32(2, 5, 6), "p": i64(0, -1, 2, 0, 1, -2)},
     {}, ("p",), 1, 17),
    ("pad_axes_input", "Pad", {"x": f32(2, 3, 4), "p": i64(1, 2, 3, 0), "v": None,
                               "axes": i64(2, 0)}, {}, ("p", "axes"), 1, 18),
    ("split_sizes", "Split", {"x": f32(2, 7), "s": i64(2, 5)}, {"axis": 1}, ("s",), 2, 17),
    ("split_equal", "Split", {"x": f32(6, 2)}, {}, (), 3, 17),
    ("split_num_outputs", "Split", {"x": f32(2, 7)}, {"axis": -1, "num_outputs": 3}, (), 3, 18),
    ("tile", "Tile", {"x": f32(2, 3), "r": i64(2, 3)}, {}, ("r",), 1, 17),
    ("range_float", "Range", {"s": scalar(1.0), "l": scalar(4.2), "d": scalar(0.5)},
     {}, ("s", "l", "d"), 1, 17),
    ("range_int_negative", "Range", {"s": scalar(10, np.int64), "l": scalar(1, np.int64),
                                     "d": scalar(-3, np.int64)}, {}, ("s", "l", "d"), 1, 17),
    ("expand_bidirectional", "Expand", {"x": f32(3, 1), "s": i64(2, 1, 4)}, {}, ("s",), 1, 17),
    ("reshape_zero_minus1", "Reshape", {"x": f32(2, 3, 4), "s": i64(0, -1)}, {}, ("s",), 1, 17),
    ("reshape_allowzero", "Reshape", {"x": f32(0, 4), "s": i64(4, 0)}, {"allowzero": 1},
     ("s",), 1, 17),
    ("slice_negative_steps", "Slice", {"x": f32(5, 6), "st": i64(-1, 4), "en": i64(-2**63, 0),
                                       "ax": i64(0, 1), "sp": i64(-2, -1)}, {},
     ("st", "en", "ax", "sp"), 1, 17),
    ("slice_clamped", "Slice", {"x": f32(3, 8), "st": i64(1), "en": i64(1000), "ax": i64(-1),
                                "sp": i64(3)}, {}, ("st", "en", "ax", "sp"), 1, 17),
    ("gather_static_negative", "Gather", {"x": f32(5, 4), "i": i64([-1, 0], [2, -3])},
     {}, ("i",), 1, 17),
    ("gather_dynamic_negative", "Gather", {"x": f32(3, 5), "i": i64([-1, 0], [4, -5])},
     {"axis": 1}, (), 1, 17),
    ("gather_scalar", "Gather", {"x": f32(3, 5), "i": scalar(-2, np.int64)}, {"axis": 1},
     ("i",), 1, 17),
    ("gather_one_element", "Gather", {"x": f32(3, 5), "i": i64(2)}, {}, ("i",), 1, 17),
    ("gather_elements", "GatherElements", {"x": f32(3, 4), "i": i64([0, -1], [3, 1], [-4, 2])},
     {"axis": 1}, (), 1, 17),
    ("gather_nd", "GatherND", {"x": f32(2, 3, 4), "i": i64([[0, 1], [1, -1]])}, {}, (), 1, 17),
    ("gather_nd_batch_dims", "GatherND", {"x": f32(2, 3, 4), "i": i64([[2], [0]], [[1], [1]])},
     {"batch_dims": 1}, ("i",), 1, 17),
    ("scatter_nd", "ScatterND", {"x": f32(4, 3), "i": i64([3], [1]), "u": f32(2, 3)},
     {}, ("i",), 1, 17),
    ("unsqueeze", "Unsqueeze", {"x": f32(3, 4), "a": i64(0, -1)}, {}, ("a",), 1, 17),
    ("squeeze_all", "Squeeze", {"x": f32(1, 3, 1)}, {}, (), 1, 17),
    ("squeeze_axes", "Squeeze", {"x": f32(1, 3, 1), "a": i64(-1)}, {}, ("a",), 1, 17),
    ("transpose_default", "Transpose", {"x": f32(2, 3, 4)}, {}, (), 1, 17),
    ("flatten_axis0", "Flatten", {"x": f32(2, 3, 4)}, {"axis": 0}, (), 1, 17),
    ("flatten_negative", "Flatten", {"x": f32(2, 3, 4)}, {"axis": -1}, (), 1, 17),
    ("concat", "Concat", {"a": f32(2, 1), "b": f32(2, 3), "c": f32(2, 2)}, {"axis": -1},
     ("c",), 1, 17),
    ("pow_scalar", "Pow", {"x": np.abs(f32(3, 4)) + 0.1, "y": scalar(2.5)}, {}, ("y",), 1, 17),
    ("div_int_truncates", "Div", {"a": i64(-7, 7, -8, 9), "b": i64(2, -2, 3, 4)}, {}, (), 1, 17),
    ("mod_int", "Mod", {"a": i64(-7, 7, -8, 9), "b": i64(2, -2, 3, -4)}, {}, (), 1, 17),
    ("mod_fmod", "Mod", {"a": f32(6), "b": scalar(0.7)}, {"fmod": 1}, ("b",), 1, 17),
    ("scalar_minus_tensor", "Sub", {"a": scalar(1.0), "b": f32(2, 3)}, {}, ("a",), 1, 17),
    ("where_two_scalars", "Where", {"c": np.array([True, False, True]), "x": scalar(1.0),
                                    "y": scalar(-np.inf)}, {}, ("x", "y"), 1, 17),
    ("clip_min_only", "Clip", {"x": f32(3, 4), "lo": scalar(-0.2), "hi": None}, {},
     ("lo",), 1, 17),
    ("clip_relu6", "Clip", {"x": 4 * f32(3, 4), "lo": scalar(0), "hi": scalar(6)}, {},
     ("lo", "hi"), 1, 17),
    ("hard_sigmoid_custom", "HardSigmoid", {"x": 3 * f32(10)}, {"alpha": 0.3, "beta": 0.4},
     (), 1, 17),
    ("hard_sigmoid_torch", "HardSigmoid", {"x": 4 * f32(10)}, {"alpha": 1 / 6}, (), 1, 17),
    ("hard_swish", "HardSwish", {"x": 4 * f32(10)}, {}, (), 1, 17),
    ("leaky_relu", "LeakyRelu", {"x": f32(10)}, {"alpha": 0.2}, (), 1, 17),
    ("gelu_tanh", "Gelu", {"x": f32(10)}, {"approximate": "tanh"}, (), 1, 20),
    ("gelu_erf", "Gelu", {"x": f32(10)}, {}, (), 1, 20),
    ("erf", "Erf", {"x": f32(10)}, {}, (), 1, 17),
    ("prelu", "PRelu", {"x": f32(2, 3, 4), "s": f32(3, 1)}, {}, ("s",), 1, 17),
    ("selu", "Selu", {"x": f32(10)}, {}, (), 1, 17),
    ("elu", "Elu", {"x": f32(10)}, {"alpha": 0.7}, (), 1, 17),
    ("softplus", "Softplus", {"x": f32(10)}, {}, (), 1, 17),
    ("is_inf", "IsInf", {"x": np.array([1, np.inf, -np.inf, np.nan], np.float32)},
     {"detect_negative": 0}, (), 1, 17),
    ("not_and", "And", {"a": np.array([True, False, True]), "b": np.array([True, True, False])},
     {}, (), 1, 17),
    ("not", "Not", {"a": np.array([True, False])}, {}, (), 1, 17),
    ("equal_int", "Equal", {"a": i64(1, 2, 3), "b": scalar(2, np.int64)}, {}, ("b",), 1, 17),
    ("cast_truncates", "Cast", {"x": np.array([-1.7, -0.2, 0.5, 2.9], np.float32)},
     {"to": onnx.TensorProto.INT64}, (), 1, 17),
    ("round_half_even", "Round", {"x": np.array([0.5, 1.5, 2.5, -0.5, -1.5], np.float32)},
     {}, (), 1, 17),
    ("quantize_uint8", "QuantizeLinear", {"x": 3 * f32(2, 5), "s": scalar(0.02),
                                          "z": scalar(128, np.uint8)}, {}, ("s", "z"), 1, 17),
    ("quantize_int8_per_axis", "QuantizeLinear", {"x": f32(2, 3, 4), "s": np.array(
        [0.01, 0.02, 0.05], np.float32), "z": np.array([0, -3, 5], np.int8)}, {}, ("s", "z"),
     1, 17),
    ("dequantize_int8_weight_per_axis", "DequantizeLinear", {"w": np.arange(-12, 12).astype(
        np.int8).reshape(4, 6), "s": np.array([0.1, 0.2, 0.3, 0.4], np.float32), "z": None},
     {"axis": 0}, ("w", "s"), 1, 17),
    ("dequantize_uint8", "DequantizeLinear", {"q": np.arange(0, 250, 10).astype(np.uint8),
                                              "s": scalar(0.05), "z": scalar(100, np.uint8)},
     {}, ("s", "z"), 1, 17),
    ("max_variadic", "Max", {"a": f32(2, 3), "b": f32(3), "c": f32(2, 1)}, {}, (), 1, 17),
    ("mean_variadic", "Mean", {"a": f32(2, 3), "b": f32(3), "c": f32(2, 1)}, {}, (), 1, 17),
    ("reduce_mean_axes_attr", "ReduceMean", {"x": f32(2, 3, 4)}, {"axes": [1], "keepdims": 0},
     (), 1, 13),
    ("reduce_mean_axes_input", "ReduceMean", {"x": f32(2, 3, 4), "a": i64(-1, 0)}, {},
     ("a",), 1, 18),
    ("reduce_sum_axes_input13", "ReduceSum", {"x": f32(2, 3, 4), "a": i64(1)}, {}, ("a",), 1, 13),
    ("reduce_sum_noop", "ReduceSum", {"x": f32(2, 3)}, {"noop_with_empty_axes": 1}, (), 1, 13),
    ("reduce_max_all", "ReduceMax", {"x": f32(2, 3, 4)}, {}, (), 1, 13),
    ("reduce_min_attr", "ReduceMin", {"x": f32(2, 3, 4)}, {"axes": [0, 2]}, (), 1, 17),
    ("reduce_prod", "ReduceProd", {"x": f32(2, 3, 4), "a": i64(0, 2)}, {"keepdims": 0},
     ("a",), 1, 18),
    ("reduce_l2", "ReduceL2", {"x": f32(2, 3, 4)}, {"axes": [1]}, (), 1, 17),
    ("reduce_logsumexp", "ReduceLogSumExp", {"x": f32(2, 3, 4)}, {"axes": [2]}, (), 1, 17),
    ("argmax_last_index", "ArgMax", {"x": np.array([[1, 3, 3], [2, 2, 0]], np.float32)},
     {"axis": 1, "select_last_index": 1}, (), 1, 17),
    ("argmin_no_keepdims", "ArgMin", {"x": f32(3, 4)}, {"keepdims": 0}, (), 1, 17),
    ("topk", "TopK", {"x": f32(3, 5), "k": i64(2)}, {"axis": 1}, ("k",), 2, 17),
    ("cumsum_exclusive_reverse", "CumSum", {"x": f32(3, 4), "a": scalar(1, np.int64)},
     {"exclusive": 1, "reverse": 1}, ("a",), 1, 17),
    ("trilu_lower", "Trilu", {"x": f32(4, 4), "k": scalar(1, np.int64)}, {"upper": 0},
     ("k",), 1, 17),
    ("einsum", "Einsum", {"a": f32(2, 3, 4), "b": f32(2, 4, 5)},
     {"equation": "bij,bjk->bik"}, (), 1, 17),
    ("softmax_axis1", "Softmax", {"x": f32(2, 3, 4)}, {"axis": 1}, (), 1, 13),
    ("log_softmax", "LogSoftmax", {"x": f32(2, 3, 4)}, {"axis": 0}, (), 1, 17),
    ("layer_norm_axis1", "LayerNormalization", {"x": f32(2, 3, 4), "s": f32(3, 4), "b": f32(3, 4)},
     {"axis": 1, "epsilon": 1e-3}, ("s", "b"), 1, 17),
    ("batch_norm", "BatchNormalization",
     {"x": f32(2, 3, 4, 4), "s": f32(3), "b": f32(3), "m": f32(3), "v": np.abs(f32(3)) + 0.5},
     {"epsilon": 1e-3}, ("s", "b", "m", "v"), 1, 15),
    ("instance_norm", "InstanceNormalization", {"x": f32(2, 3, 5), "s": f32(3), "b": f32(3)},
     {}, ("s", "b"), 1, 17),
    ("nonzero_of_constant", "NonZero", {"x": i64([0, 3], [2, 0])}, {}, ("x",), 1, 17),
    ("dropout_with_mask", "Dropout", {"x": f32(3, 4)}, {}, (), 2, 17),
    ("conv_groups_dilation_asym", "Conv", {"x": f32(1, 4, 9, 10), "w": f32(6, 2, 3, 3),
                                           "b": f32(6)},
     {"group": 2, "dilations": [2, 1], "strides": [2, 1], "pads": [1, 0, 2, 1]}, ("w", "b"), 1, 17),
    ("conv_same_upper", "Conv", {"x": f32(1, 2, 7, 8), "w": f32(3, 2, 3, 2)},
     {"auto_pad": "SAME_UPPER", "strides": [2, 2]}, ("w",), 1, 17),
    ("conv_same_lower", "Conv", {"x": f32(1, 2, 7, 8), "w": f32(3, 2, 4, 3)},
     {"auto_pad": "SAME_LOWER"}, ("w",), 1, 17),
    ("conv_valid_1d", "Conv", {"x": f32(2, 3, 11), "w": f32(4, 3, 3)},
     {"auto_pad": "VALID", "strides": [2]}, ("w",), 1, 17),
    ("conv_3d", "Conv", {"x": f32(1, 2, 4, 5, 5), "w": f32(3, 2, 2, 3, 3)},
     {"pads": [0, 1, 1, 1, 1, 1]}, ("w",), 1, 17),
    ("conv_transpose", "ConvTranspose", {"x": f32(1, 4, 5, 5), "w": f32(4, 3, 3, 3),
                                         "b": f32(3)},
     {"strides": [2, 2], "output_padding": [1, 0], "pads": [1, 1, 1, 1]}, ("w", "b"), 1, 17),
    ("conv_transpose_asym_group", "ConvTranspose", {"x": f32(1, 4, 5, 5), "w": f32(4, 1, 3, 3)},
     {"group": 2, "strides": [2, 1], "pads": [0, 1, 1, 0]}, ("w",), 1, 17),
    ("max_pool_ceil", "MaxPool", {"x": f32(1, 2, 9, 10)},
     {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1], "ceil_mode": 1}, (), 1, 17),
    ("max_pool_ceil_window_in_pad", "MaxPool", {"x": f32(1, 1, 5, 5)},
     {"kernel_shape": [2, 2], "strides": [2, 2], "pads": [1, 1, 1, 1], "ceil_mode": 1}, (), 1, 17),
    ("max_pool_asym_pads", "MaxPool", {"x": f32(1, 2, 7, 8)},
     {"kernel_shape": [3, 2], "strides": [2, 1], "pads": [0, 1, 2, 0]}, (), 1, 17),
    ("max_pool_dilation", "MaxPool", {"x": f32(1, 2, 9, 9)},
     {"kernel_shape": [3, 3], "dilations": [2, 2]}, (), 1, 17),
    ("max_pool_same_upper", "MaxPool", {"x": f32(1, 2, 7, 7)},
     {"kernel_shape": [3, 3], "strides": [2, 2], "auto_pad": "SAME_UPPER"}, (), 1, 17),
    ("max_pool_1d", "MaxPool", {"x": f32(2, 3, 10)}, {"kernel_shape": [3], "strides": [3]},
     (), 1, 17),
    ("avg_pool_exclude_pad", "AveragePool", {"x": f32(1, 2, 7, 7)},
     {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1]}, (), 1, 17),
    ("avg_pool_include_pad", "AveragePool", {"x": f32(1, 2, 7, 7)},
     {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1], "count_include_pad": 1}, (), 1, 17),
    ("avg_pool_ceil_exclude", "AveragePool", {"x": f32(1, 2, 8, 8)},
     {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1], "ceil_mode": 1}, (), 1, 17),
    ("avg_pool_ceil_include", "AveragePool", {"x": f32(1, 2, 8, 8)},
     {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1], "ceil_mode": 1,
          "count_include_pad": 1}, (), 1, 17),
    ("avg_pool_asym_exclude", "AveragePool", {"x": f32(1, 2, 6, 7)},
     {"kernel_shape": [3, 2], "strides": [2, 2], "pads": [0, 0, 2, 1]}, (), 1, 17),
    ("avg_pool_asym_include", "AveragePool", {"x": f32(1, 2, 6, 7)},
     {"kernel_shape": [3, 2], "strides": [2, 2], "pads": [0, 0, 2, 1], "count_include_pad": 1},
     (), 1, 17),
    ("avg_pool_same_upper", "AveragePool", {"x": f32(1, 2, 7, 7)},
     {"kernel_shape": [2, 2], "strides": [2, 2], "auto_pad": "SAME_UPPER"}, (), 1, 17),
    ("max_pool_ceil_asym_pads", "MaxPool", {"x": f32(1, 2, 8, 9)},
     {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [0, 1, 2, 2], "ceil_mode": 1}, (), 1, 17),
    ("avg_pool_ceil_asym_exclude", "AveragePool", {"x": f32(1, 2, 8, 9)},
     {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [0, 1, 2, 2], "ceil_mode": 1}, (), 1, 17),
    ("avg_pool_ceil_asym_include", "AveragePool", {"x": f32(1, 2, 8, 9)},
     {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [0, 1, 2, 2], "ceil_mode": 1,
          "count_include_pad": 1}, (), 1, 17),
    ("global_avg_pool", "GlobalAveragePool", {"x": f32(2, 3, 5, 4)}, {}, (), 1, 17),
    ("global_max_pool", "GlobalMaxPool", {"x": f32(2, 3, 5)}, {}, (), 1, 17),
    ("resize_nearest", "Resize", {"x": f32(1, 2, 3, 4), "r": None, "s": np.array(
        [1, 1, 2, 1.5], np.float32)}, {"coordinate_transformation_mode": "asymmetric",
                                           "nearest_mode": "floor"}, ("s",), 1, 17),
    ("resize_linear_sizes", "Resize", {"x": f32(1, 2, 4, 5), "r": None, "s": None,
                                       "z": i64(1, 2, 7, 3)}, {"mode": "linear"}, ("z",), 1, 17),
    ("resize_linear_align", "Resize", {"x": f32(1, 2, 4, 5), "r": None, "s": np.array(
        [1, 1, 2, 2], np.float32)}, {"mode": "linear",
                                         "coordinate_transformation_mode": "align_corners"},
     ("s",), 1, 17),
    ("resize_cubic", "Resize", {"x": f32(1, 2, 4, 5), "r": None, "s": np.array(
        [1, 1, 2, 1.5], np.float32)}, {"mode": "cubic"}, ("s",), 1, 17),
]


@pytest.mark.parametrize("op,values,attrs,inits,outputs,opset",
                         [c[1:] for c in NODE_CASES], ids=[c[0] for c in NODE_CASES])
def test_single_op(op, values, attrs, inits, outputs, opset):
    model = om.node_model(op, values, attrs, inits=inits, outputs=outputs, opset=opset)
    feeds = {k: v for k, v in values.items() if v is not None and k not in inits}
    check(model, feeds)


def test_tensors_made_at_run_time_follow_the_inputs_device():
    """Constants an op creates (masks, pool divisors, index offsets) live on the inputs'
    device; the meta device stands in for a GPU: mixing it with CPU tensors fails."""
    for _, op, values, attrs, inits, outputs, opset in NODE_CASES:
        model = om.node_model(op, values, attrs, inits=inits, outputs=outputs, opset=opset)
        module = load_onnx(model).to("meta")
        outs = module(*(x.to("meta") for x in module.example_inputs()))
        assert all(o.device.type == "meta" for o in outs if o.numel()), op


# ---------------------------------------------------------------- shape arithmetic folds

def _shape_arithmetic_model(x_shape: list) -> onnx.ModelProto:
    """Reshape/ConstantOfShape/Range/Expand fed by Shape -> Gather -> Mul -> Concat chains."""
    n = helper.make_node
    nodes = [
        n("Shape", ["x"], ["s"]),
        n("Gather", ["s", "zero"], ["d0"]),
        n("Slice", ["s", "one", "three"], ["d12"]),
        n("ReduceProd", ["d12"], ["rest"], keepdims=1),
        n("Unsqueeze", ["d0", "zero_axis"], ["d0_1"]),
        n("Concat", ["d0_1", "rest"], ["new_shape"], axis=0),
        n("Reshape", ["x", "new_shape"], ["flat"]),
        n("Shape", ["flat"], ["flat_shape"]),
        n("ConstantOfShape", ["flat_shape"], ["twos"],
          value=helper.make_tensor("v", onnx.TensorProto.FLOAT, [1], [2.0])),
        n("Mul", ["flat", "twos"], ["y0"]),
        n("Shape", ["x"], ["last"], start=-1),
        n("Squeeze", ["last"], ["last_dim"]),
        n("Constant", [], ["step"], value_int=1),
        n("Range", ["zero", "last_dim", "step"], ["ramp"]),
        n("Cast", ["ramp"], ["ramp_f"], to=onnx.TensorProto.FLOAT),
        n("Expand", ["ramp_f", "s"], ["ramp_x"]),
        n("Div", ["d0", "two"], ["half"]),
        n("Equal", ["half", "one"], ["is_two"]),
        n("Where", ["is_two", "x", "ramp_x"], ["picked"]),
        n("Add", ["picked", "ramp_x"], ["y1"]),
    ]
    inits = {"zero": scalar(0, np.int64), "one": scalar(1, np.int64), "two": scalar(2, np.int64),
             "three": i64(3), "zero_axis": i64(0)}
    inits["one"] = i64(1)
    return om.graph_model(nodes, {"x": x_shape}, inits, ["y0", "y1"], opset=17)


@pytest.mark.parametrize("shape", [(2, 3, 4), (5, 3, 2)])
def test_shape_arithmetic_folds_to_python_ints(shape):
    model = _shape_arithmetic_model(["batch", 3, "n"])  # dynamic dims, fixed by input_shapes
    x = f32(*shape)
    check(model, {"x": x}, input_shapes={"x": shape})
    module = load_onnx(model, {"x": shape})
    ep = torch.export.export(module, (torch.from_numpy(x),), strict=False)
    ops = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    # shape arithmetic never reaches the trace: no sym sizes, no .item(), no int tensors
    assert not {op for op in ops if "sym" in op or "scalar" in op or "arange" in op}, ops
    assert "aten.reshape.default" in ops


# ---------------------------------------------------------------- the module itself

def _weighted_model() -> onnx.ModelProto:
    nodes = [helper.make_node("Reshape", ["x", "shape"], ["x2"]),
             helper.make_node("MatMul", ["x2", "w.weight"], ["h"]),
             helper.make_node("Add", ["h", "1bias"], ["y"])]
    inits = {"shape": i64(-1, 4), "w.weight": f32(4, 3), "1bias": f32(3)}
    return om.graph_model(nodes, {"x": f32(2, 2, 4)}, inits, ["y"])


def test_module_interface_and_trainable_weights():
    module = load_onnx(_weighted_model())
    assert module.input_names == ["x"] and module.output_names == ["y"]
    assert [(s.name, s.shape, s.dtype) for s in module.input_specs] == [
        ("x", (2, 2, 4), torch.float32)]
    # float initializers are parameters under python names; the shape constant was folded
    assert sorted(n for n, _ in module.named_parameters()) == ["v_1bias", "w_weight"]
    assert list(module.named_buffers()) == []
    (x,) = module.example_inputs(seed=3)
    torch.testing.assert_close(x, module.input_specs[0].example(3))
    (y,) = module(x)
    y.sum().backward()
    assert module.w_weight.grad is not None and module.w_weight.grad.abs().sum() > 0
    with pytest.raises(InputError, match="input 'x'"):
        module(torch.zeros(3, 4))


def test_load_accepts_path_bytes_and_proto(tmp_path):
    model = _weighted_model()
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    x = torch.from_numpy(f32(2, 2, 4))
    outs = [load_onnx(m)(x)[0] for m in (model, model.SerializeToString(), path, str(path))]
    for out in outs[1:]:
        torch.testing.assert_close(out, outs[0])


def test_model_local_functions_are_inlined():
    body = [helper.make_node("Relu", ["a"], ["r"]), helper.make_node("Neg", ["r"], ["b"])]
    fn = helper.make_function("local", "NegRelu", ["a"], ["b"], body,
                              [helper.make_opsetid("", 17)])
    model = om.graph_model([helper.make_node("NegRelu", ["x"], ["y"], domain="local")],
                           {"x": f32(3, 4)}, {}, ["y"])
    model.functions.append(fn)
    check(model, {"x": f32(3, 4)})


# ---------------------------------------------------------------- errors

def test_unsupported_op_names_op_node_and_opset():
    model = om.node_model("NonMaxSuppression", {"boxes": f32(1, 4, 4), "scores": f32(1, 1, 4)})
    with pytest.raises(UnsupportedOpError,
                       match=r"NonMaxSuppression node 'the_nonmaxsuppression' "
                             r"\(node #0, opset 17\)"):
        load_onnx(model)


def test_custom_domain_op_is_unsupported():
    model = om.node_model("FusedGelu", {"x": f32(3)}, domain="com.example")
    with pytest.raises(UnsupportedOpError, match=r"com\.example\.FusedGelu node 'the_fusedgelu'"):
        load_onnx(model)


@pytest.mark.parametrize("make_bytes", [
    lambda: b"definitely not a protobuf \xff\xfe\x00\x01" * 3,
    lambda: _weighted_model().SerializeToString()[:60],  # a truncated model
], ids=["garbage", "truncated"])
def test_corrupt_file_is_a_frontend_error(make_bytes, tmp_path):
    path = tmp_path / "broken.onnx"
    path.write_bytes(make_bytes())
    with pytest.raises(FrontendError, match="could not parse .*broken.onnx.* as an ONNX model"):
        load_onnx(path)
    with pytest.raises(FrontendError, match="could not parse the given bytes as an ONNX model"):
        load_onnx(make_bytes())


def test_missing_file_is_a_frontend_error(tmp_path):
    with pytest.raises(FrontendError, match="could not read"):
        load_onnx(tmp_path / "nope.onnx")


def test_old_opset_is_rejected():
    with pytest.raises(FrontendError, match=r"opset 11; .*supports opsets 13\+.*version_converter"):
        load_onnx(om.node_model("Relu", {"x": f32(3)}, opset=11))


def test_checker_failure_is_a_frontend_error():
    model = om.node_model("Relu", {"x": f32(3)})
    model.graph.node[0].input[0] = "undefined_value"
    with pytest.raises(FrontendError, match="Relu node 'the_relu' reads 'undefined_value'"):
        load_onnx(model)


def test_dynamic_dims_need_input_shapes():
    model = om.graph_model([helper.make_node("Relu", ["tokens"], ["y"])],
                           {"tokens": ["batch", 16]}, {}, ["y"])
    with pytest.raises(FrontendError, match=r"input 'tokens' has dynamic shape \['batch', 16\].*"
                                            r"input_shapes=\{'tokens'"):
        load_onnx(model)
    with pytest.raises(FrontendError, match="does not fit"):
        load_onnx(model, {"tokens": (2, 8)})
    with pytest.raises(FrontendError, match=r"\['tokenz'\], which are not inputs"):
        load_onnx(model, {"tokenz": (2, 16)})
    assert load_onnx(model, {"tokens": (2, 16)}).input_specs[0].shape == (2, 16)


@pytest.mark.parametrize("op,values,attrs,inits,opset,match", [
    ("MaxPool", {"x": f32(1, 1, 4, 4)}, {"kernel_shape": [2, 2], "storage_order": 1}, (), 17,
     r"MaxPool node 'the_maxpool' .*storage_order=1"),
    ("Resize", {"x": f32(1, 1, 4, 4), "r": None, "s": np.array([1, 1, 0.5, 0.5], np.float32)},
     {"mode": "area"}, ("s",), 18, r"Resize node 'the_resize' .*mode='area'"),
    ("Resize", {"x": f32(1, 1, 4, 4), "r": None, "s": np.array([1, 1, 2, 2], np.float32)},
     {"coordinate_transformation_mode": "tf_half_pixel_for_nn"}, ("s",), 17,
     "coordinate_transformation_mode, nearest_mode"),
    ("Dropout", {"x": f32(3), "r": scalar(0.5), "t": np.array(True)}, {}, ("r", "t"), 17,
     "training_mode=True"),
    ("LayerNormalization", {"x": f32(2, 3), "s": f32(3)}, {"stash_type": 0}, ("s",), 17,
     r"stash_type=0"),
], ids=["maxpool_storage_order", "resize_area_mode", "resize_nn_mode", "dropout_training",
        "layernorm_stash_type"])
def test_unsupported_attribute_is_named(op, values, attrs, inits, opset, match):
    outputs = 2 if op == "LayerNormalization" else 1
    model = om.node_model(op, values, attrs, inits=inits, opset=opset, outputs=outputs)
    with pytest.raises(UnsupportedOpError, match=match):
        load_onnx(model)


def test_shape_computed_from_data_is_a_frontend_error():
    model = om.node_model("Reshape", {"x": f32(2, 6), "shape": i64(3, 4)})
    with pytest.raises(FrontendError, match=r"Reshape node 'the_reshape'.*input #1 \('shape'\) "
                                            "must be known at load time"):
        load_onnx(model)
    with pytest.raises(FrontendError, match="NonZero node .*depends on tensor values"):
        load_onnx(om.node_model("NonZero", {"x": f32(4)}))
