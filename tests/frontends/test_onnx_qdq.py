"""QDQ import: onnxruntime-quantized ONNX models -> graphc fake-quant graphs.

Small torch nets, exported to ONNX and quantized by onnxruntime's quantize_static
(QuantFormat.QDQ, uint8 activations, int8 weights per channel / per tensor), import as
fake-quant graphs: the ops are counted against the file's Q/DQ nodes, and the graph runs
against onnxruntime. Tolerance: both outputs end in Q -> DQ, so they differ by whole
output steps (the output scale). onnxruntime's reference execution (optimizations off)
runs the same float32 ops on the same grid values, so a step can flip only where an
intermediate lies within float rounding of a tie: bound 1 step on at most 1 % of the
outputs (measured: identical in every case). Its fused integer kernels (optimizations
on) round some intermediates differently from its own reference: bound that difference
plus a step (measured: CNN identical; attention up to 2 steps on ~25 % of the outputs,
element for element what onnxruntime's kernels differ from its reference).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import onnxruntime.quantization as oq
import pytest
import torch
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType
from torch import nn

import graphc
from graphc.errors import UnsupportedOpError
from graphc.passes.quant_policy import QuantPolicy, plan
from graphc.verify import verify
from tests.models import onnx_models as om

PT, PC = "graphc.fake_quant_per_tensor", "graphc.fake_quant_per_channel"
FQ_TARGETS = (torch.ops.graphc.fake_quant_per_tensor.default,
              torch.ops.graphc.fake_quant_per_channel.default)
# each layer op's weight operand and its output-channel axis (passes/quant_policy.py)
WEIGHT_ARG = {"aten.convolution": (1, 0), "aten.addmm": (2, 1), "aten.mm": (1, 1)}


def small_cnn() -> nn.Module:
    """conv + relu + pool twice, then a linear: on 8x8 sklearn digits."""
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(16 * 2 * 2, 10))


class Attention(nn.Module):
    """One attention head and an MLP: linears on 3-D inputs export as MatMul + Add."""

    def __init__(self, d: int = 16):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.ff = nn.Linear(d, 4)

    def forward(self, x):
        att = torch.softmax(self.q(x) @ self.k(x).transpose(1, 2) / 4.0, dim=-1)
        return self.ff(torch.relu(self.o(att @ self.v(x))))


class _Batches(CalibrationDataReader):
    def __init__(self, batches: list[np.ndarray]):
        self.it = iter([{"x": b} for b in batches])

    def get_next(self):
        return next(self.it, None)


def _data(net: str) -> tuple[list[np.ndarray], np.ndarray]:
    """Four calibration batches and a held-out test batch: sklearn digits, or random."""
    if net == "cnn":
        from sklearn.datasets import load_digits

        digits = (load_digits().images / 16.0).astype(np.float32)[:, None]
        return [digits[32 * i:32 * i + 32] for i in range(4)], digits[1000:1032]
    batches = np.random.default_rng(0).standard_normal((5, 8, 6, 16)).astype(np.float32)
    return list(batches[:4]), batches[4]


@pytest.fixture(scope="module")
def qmodel(tmp_path_factory):
    """(net, per_channel, format, dynamo) -> the path of the net exported to ONNX and
    quantized by onnxruntime; each made once for the module. The float file is beside it."""
    cache = {}

    def get(net: str, per_channel: bool, fmt=QuantFormat.QDQ, dynamo: bool = False) -> str:
        if (net, per_channel, fmt, dynamo) not in cache:
            torch.manual_seed(0)
            calib, test = _data(net)
            fp32 = tmp_path_factory.mktemp(net) / f"{net}.onnx"
            om.export(small_cnn() if net == "cnn" else Attention(), (torch.from_numpy(test),),
                      ["x"], fp32, dynamo=dynamo)
            q8 = str(fp32.with_suffix(f".{per_channel}.{fmt.name}.onnx"))
            oq.quantize_static(str(fp32), q8, _Batches(calib), quant_format=fmt,
                               per_channel=per_channel, activation_type=QuantType.QUInt8,
                               weight_type=QuantType.QInt8)
            cache[net, per_channel, fmt, dynamo] = q8
        return cache[net, per_channel, fmt, dynamo]
    return get


def ort_run(path: str, x: np.ndarray, optimize: bool) -> np.ndarray:
    """optimize: onnxruntime's fused integer kernels; else its reference, op by op in float."""
    opts, level = ort.SessionOptions(), ort.GraphOptimizationLevel
    opts.graph_optimization_level = level.ORT_ENABLE_ALL if optimize else level.ORT_DISABLE_ALL
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"]).run(
        None, {"x": x})[0]


def _load(path: str) -> tuple[onnx.GraphProto, dict[str, np.ndarray]]:
    graph = onnx.load(path).graph
    return graph, {t.name: onnx.numpy_helper.to_array(t) for t in graph.initializer}


def qdq_counts(path: str) -> tuple[int, int, int]:
    """The fake-quants a QDQ file should import as: (activation, per-tensor weight,
    per-channel weight). An activation pair gives one fake-quant for its readers, and one
    more per MatMul with a weight, which fake-quantizes the rows it reads itself."""
    model, inits = _load(path)
    q_out = {n.output[0] for n in model.node if n.op_type == "QuantizeLinear"}
    weights = {n.output[0] for n in model.node if n.op_type == "DequantizeLinear"
               and n.input[0] in inits and inits[n.input[0]].dtype != np.int32}
    outputs, acts, per_tensor, per_channel = {o.name for o in model.output}, 0, 0, 0
    for n in model.node:
        if n.op_type == "DequantizeLinear" and n.input[0] in q_out:
            users = [u for u in model.node if n.output[0] in u.input]
            matmuls = sum(u.op_type == "MatMul" and u.input[1] in weights for u in users)
            acts += matmuls + (matmuls < len(users) or n.output[0] in outputs)
        elif n.output[0] in weights:  # int32 DQs are biases, folded to float
            per_channel += inits[n.input[1]].size > 1
            per_tensor += inits[n.input[1]].size == 1
    return acts, per_tensor, per_channel


def _output_scale(path: str) -> float:
    model, inits = _load(path)
    return float(inits[next(n for n in model.node if n.output[0] == model.output[0].name)
                       .input[1]])


# (net, per_channel, dynamo exporter): the torchscript exporter is faster; one dynamo case
CASES = [(net, pc, False) for net in ("cnn", "attention") for pc in (True, False)]
CASES += [("cnn", True, True)]
IDS = [f"{net}-{'per_channel' if pc else 'per_tensor'}{'-dynamo' * dyn}" for net, pc, dyn in CASES]


@pytest.mark.parametrize("net,per_channel,dynamo", CASES, ids=IDS)
def test_qdq_model_imports_as_fake_quant(net, per_channel, dynamo, qmodel):
    path = qmodel(net, per_channel, dynamo=dynamo)
    g = graphc.trace(path)
    verify(g)
    acts, w_tensor, w_channel = qdq_counts(path)
    assert (w_channel > 0) == per_channel and acts >= 5
    hist = g.op_histogram()
    assert hist[PT] == acts + w_tensor and hist[PC] == w_channel, hist
    # no real quantize / dequantize arithmetic is left
    assert not {"aten.round", "aten._to_copy", "aten.clamp"} & set(hist), hist
    for node in g.nodes:
        if node.target in FQ_TARGETS:  # scale f32 [] / [C], zero point i32, both weights
            scale, zp = (g.weight(a) for a in node.args[1:3])
            assert all(a.op == "get_attr" for a in node.args[1:3]) and zp.dtype == torch.int32
            assert scale.shape == zp.shape and scale.dim() == (node.target in FQ_TARGETS[1:])
            assert isinstance(scale, nn.Parameter) and scale.dtype == torch.float32  # QAT
        arg_axis = WEIGHT_ARG.get(str(node.target).removesuffix(".default"))
        if arg_axis:  # fake-quants on the weight and the input, as the op reads them
            w, x = node.args[arg_axis[0]], node.args[arg_axis[0] - 1]
            assert w.target in FQ_TARGETS and x.target == FQ_TARGETS[0]
            assert w.args[0].op == "get_attr"
            if per_channel:
                assert w.args[3] == arg_axis[1] and (w.args[4], w.args[5]) == (-128, 127)
    # so the quantize pass finds no conv / linear left to quantize (attention's bmm: yes)
    assert {layer.kind for layer, _ in plan(g, QuantPolicy())} <= {"matmul"}


@pytest.mark.parametrize("net,per_channel,dynamo", CASES, ids=IDS)
def test_qdq_model_matches_onnxruntime(net, per_channel, dynamo, qmodel):
    path = qmodel(net, per_channel, dynamo=dynamo)
    g = graphc.trace(path)
    x = _data(net)[1]
    with torch.no_grad():
        got = g(torch.from_numpy(x))[0].numpy().astype(np.float64)
    step = _output_scale(path)
    reference, integer = ort_run(path, x, optimize=False), ort_run(path, x, optimize=True)
    assert np.abs(reference).max() > 20 * step  # the output spans many steps
    steps = np.abs(got - reference) / step  # bounds: see the module docstring
    assert steps.max() <= 1.001 and (steps > 0.5).mean() <= 0.01, steps.max()
    int_steps = np.abs(got - integer) / step
    ort_steps = np.abs(reference.astype(np.float64) - integer) / step
    assert int_steps.max() <= max(ort_steps.max(), 1.0) + 1.001, ort_steps.max()
    print(f"{net} per_channel={per_channel} dynamo={dynamo}, step {step:.3g}: vs onnxruntime "
          f"reference max {steps.max():.2f} steps ({(steps > 0.5).sum()}/{steps.size} differ),"
          f" vs its integer kernels {int_steps.max():.2f} ({(int_steps > 0.5).sum()} differ; "
          f"reference vs kernels {ort_steps.max():.2f})")


@pytest.mark.skipif("fold-fake-quant" not in graphc.PASSES, reason="no fold-fake-quant pass")
@pytest.mark.parametrize("net", ["cnn", "attention"])
def test_fold_fake_quant_folds_every_layer(net, qmodel):
    """The import is what fold-fake-quant consumes: every conv / linear becomes integer."""
    path = qmodel(net, True)
    g = graphc.trace(path)
    layers = sum(g.op_histogram()[op] for op in WEIGHT_ARG)
    folded, _ = graphc.run_pipeline(g, "fold-fake-quant", check=True)
    assert not set(WEIGHT_ARG) & set(folded.op_histogram()) and layers >= 3
    x = torch.from_numpy(_data(net)[1])
    with torch.no_grad():  # the same grid values, integer arithmetic: at most a step apart
        diff = (folded(x)[0] - g(x)[0]).abs().max().item()
    assert diff <= 1.001 * _output_scale(path), diff


# ---------------------------------------------------------------- hand-built graphs

N, F32 = onnx.helper.make_node, np.float32
INT4 = onnx.helper.tensor_dtype_to_np_dtype(onnx.TensorProto.INT4)
F8 = onnx.helper.tensor_dtype_to_np_dtype(onnx.TensorProto.FLOAT8E4M3FN)


def _model(nodes, inits, opset=17, shape=(2, 3, 4, 4)) -> onnx.ModelProto:
    model = om.graph_model(nodes, {"x": list(shape)}, inits, ["y"], opset)
    model.ir_version = 10 if opset >= 21 else model.ir_version  # int4 needs IR 10
    return model


def _check_against_ort(model: onnx.ModelProto, tmp_path) -> graphc.Graph:
    path = str(tmp_path / "model.onnx")
    onnx.save(model, path)
    x = np.random.default_rng(0).standard_normal((2, 3, 4, 4)).astype(F32)
    g = graphc.trace(path)
    with torch.no_grad():
        got = g(torch.from_numpy(x))[0].numpy()
    # float32 accumulation order only: these graphs do not requantize their output
    np.testing.assert_allclose(got, ort_run(path, x, optimize=False), rtol=0, atol=1e-5)
    return g


def test_int4_weights_per_channel_activation_negative_axis(tmp_path):
    """opset 21: int4 weights (grid -8..7), a per-channel activation, axis -3, no zero point."""
    w = np.random.default_rng(1).integers(-8, 8, (5, 3, 3, 3)).astype(INT4)
    inits = {"s_x": np.array([0.02, 0.03, 0.05], F32), "z_x": np.array([3, 0, 250], np.uint8),
             "w_q": w, "s_w": np.linspace(0.01, 0.05, 5, dtype=F32)}
    nodes = [N("QuantizeLinear", ["x", "s_x", "z_x"], ["xq"], axis=-3),
             N("DequantizeLinear", ["xq", "s_x", "z_x"], ["xd"], axis=-3),
             N("DequantizeLinear", ["w_q", "s_w"], ["w"], axis=0),
             N("Conv", ["xd", "w"], ["y"], pads=[1, 1, 1, 1])]
    g = _check_against_ort(_model(nodes, inits, opset=21), tmp_path)
    fq = [(node.args[3:], tuple(g.weight(node.args[2]).shape)) for node in g.nodes
          if node.target == FQ_TARGETS[1]]
    assert sorted(fq) == [((0, -8, 7), (5,)), ((1, 0, 255), (3,))]  # axis -3 -> 1 (rank 4)


def test_mismatched_pair_is_a_real_quantize_and_dequantize(tmp_path, caplog):
    """A Q -> DQ pair with different scales (a requantization) keeps ONNX's arithmetic."""
    inits = {"s1": np.array(0.02, F32), "s2": np.array(0.03, F32), "z": np.array(128, np.uint8)}
    nodes = [N("QuantizeLinear", ["x", "s1", "z"], ["xq"]),
             N("DequantizeLinear", ["xq", "s2", "z"], ["y"])]
    g = _check_against_ort(_model(nodes, inits), tmp_path)
    assert g.op_histogram()[PT] == 0 and g.op_histogram()["aten.round"] == 1
    assert "different scales or zero points" in caplog.text


def _unsupported(case: str) -> tuple[list, int, tuple, str]:
    """(nodes, opset, input shape, expected message) of a graph the import refuses."""
    return {
        "q_feeds_reshape": ([N("QuantizeLinear", ["x", "s", "z"], ["xq"], name="q"),
                             N("Reshape", ["xq", "flat"], ["r"], name="flatten"),
                             N("DequantizeLinear", ["r", "s", "z"], ["w"])], 17, (4, 3),
                            r"Reshape node 'flatten'.* QuantizeLinear node 'q'.*QuantFormat.QDQ"),
        "block_size": ([N("DequantizeLinear", ["w_q", "s_b"], ["w"], axis=1, block_size=3)],
                       21, (2, 4), "block_size=3"),
        "float8": ([N("QuantizeLinear", ["x", "s", "z8"], ["xq"]),
                    N("DequantizeLinear", ["xq", "s", "z8"], ["w"])], 21, (4, 3), "float8"),
        "computed_scale": ([N("ReduceMax", ["x"], ["s_x"], keepdims=0),
                            N("DequantizeLinear", ["w_q", "s_x"], ["w"])], 17, (2, 4),
                           "scale 's_x' is computed at run time"),
    }[case]


@pytest.mark.parametrize("case", ["q_feeds_reshape", "block_size", "float8", "computed_scale"])
def test_unsupported_graphs_are_refused(case):
    nodes, opset, shape, match = _unsupported(case)
    inits = {"s": np.array(0.02, F32), "z": np.array(128, np.uint8), "w_q": np.ones((4, 3),
             np.int8), "s_b": np.full((4, 1), 0.1, F32), "z8": np.zeros((), F8),
             "flat": np.array([4, 3], np.int64)}
    nodes.append(N("MatMul", ["x", "w"], ["y"]))
    with pytest.raises(UnsupportedOpError, match=match):
        graphc.trace(_model(nodes, inits, opset, shape))


@pytest.mark.parametrize("fmt", ["QOperator", "dynamic"])
def test_integer_formats_are_refused(fmt, qmodel, tmp_path):
    if fmt == "QOperator":
        path, match = qmodel("cnn", True, QuantFormat.QOperator), r"QLinearConv node .*QOperator"
    else:
        fp32, path = tmp_path / "linear.onnx", str(tmp_path / "linear_dynamic.onnx")
        om.export(nn.Linear(16, 4), (torch.randn(2, 16),), ["x"], fp32, dynamo=False)
        oq.quantize_dynamic(str(fp32), path)
        match = r"DynamicQuantizeLinear node .*dynamic-quantization"
    with pytest.raises(UnsupportedOpError, match=f"{match}.*quant_format=QuantFormat.QDQ"):
        graphc.trace(path)
