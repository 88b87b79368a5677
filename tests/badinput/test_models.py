"""Malformed models and calls: each input of the corpus with the error it must produce.

ONNX: truncated file, random bytes, a protobuf that is not a model, a missing initializer,
a cycle, a dynamic shape without input_shapes, an old opset, an unsupported op. PyTorch: an
untraceable model, no example inputs, input_shapes given to it, not a model at all. Calls of
a Graph and a CompiledModel with the wrong count, shape, dtype or kind of inputs.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import helper, numpy_helper

import graphc
from graphc.errors import FrontendError, InputError, UnsupportedOpError
from tests.models import onnx_models as om
from tests.test_api import _Branchy


def f32(*shape):
    return np.random.default_rng(0).standard_normal(shape).astype(np.float32)


def _weighted() -> onnx.ModelProto:
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
             helper.make_node("Relu", ["h"], ["y"], name="act")]
    return om.graph_model(nodes, {"x": f32(2, 4)}, {"w": f32(4, 3)}, ["y"])


def _missing_initializer() -> onnx.ModelProto:
    model = _weighted()
    del model.graph.initializer[:]  # 'w' is read by MatMul 'mm' but defined nowhere
    return model


def _cycle() -> onnx.ModelProto:
    nodes = [helper.make_node("Relu", ["b"], ["a"], name="first"),
             helper.make_node("Add", ["a", "x"], ["b"], name="second"),
             helper.make_node("Neg", ["a"], ["y"], name="out")]
    graph = helper.make_graph(nodes, "cyclic", [helper.make_tensor_value_info("x", 1, [3])],
                              [helper.make_tensor_value_info("y", 1, [3])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


ONNX_CASES = {
    # name: (model bytes or proto, error class, message regex)
    "truncated": (lambda: _weighted().SerializeToString()[:40], FrontendError,
                  r"could not parse .* as an ONNX model"),
    "random-bytes": (lambda: np.random.default_rng(1).bytes(512), FrontendError,
                     r"could not parse .* as an ONNX model"),
    "tensor-not-model": (lambda: numpy_helper.from_array(f32(8), "t").SerializeToString(),
                         FrontendError, r"could not parse .* as an ONNX model"),
    "graph-not-model": (lambda: _weighted().graph.SerializeToString(), FrontendError,
                        r"could not parse .* as an ONNX model"),
    "empty-file": (lambda: b"", FrontendError, r"could not parse .*: it has no graph or opset"),
    "missing-initializer": (_missing_initializer, FrontendError,
                            (r"MatMul node 'mm' reads 'w', which is no graph input, "
                            r"initializer or node output \(a missing initializer\?\)")),
    "cycle": (_cycle, FrontendError,
              r"nodes form a cycle: Add 'second' -> Relu 'first' -> Add 'second'"),
    "dynamic-shape": (lambda: om.graph_model([helper.make_node("Relu", ["ids"], ["y"])],
                                             {"ids": ["batch", 16]}, {}, ["y"]),
                      FrontendError, (r"input 'ids' has dynamic shape \['batch', 16\].*"
                                     r"input_shapes=\{'ids'")),
    "old-opset": (lambda: om.node_model("Relu", {"x": f32(3)}, opset=9), FrontendError,
                  r"opset 9; .*supports opsets 13\+.*convert_version"),
    "unsupported-op": (lambda: om.node_model("NonMaxSuppression",
                                             {"boxes": f32(1, 4, 4), "scores": f32(1, 1, 4)}),
                       UnsupportedOpError, r"NonMaxSuppression node 'the_nonmaxsuppression'"),
}


@pytest.mark.parametrize("case", sorted(ONNX_CASES))
def test_bad_onnx_file(case, tmp_path):
    make, error, regex = ONNX_CASES[case]
    model = make()
    data = model if isinstance(model, bytes) else model.SerializeToString()
    path = tmp_path / f"{case}.onnx"
    path.write_bytes(data)
    with pytest.raises(error, match=regex):  # a file, as users have it
        graphc.compile(path, target="torch")
    with pytest.raises(error, match=regex):  # the same bytes in memory
        graphc.trace(data)


def test_missing_onnx_file_names_the_path(tmp_path):
    with pytest.raises(FrontendError, match=r"could not read '.*nope\.onnx'"):
        graphc.trace(tmp_path / "nope.onnx")


def test_untraceable_model_names_the_model_the_line_and_why():
    """Through compile (tests/test_api.py checks graphc.trace with the same model)."""
    with pytest.raises(FrontendError, match=r"(?s)cannot trace '_Branchy': .*data-dependent.*"
                                            r"test_api\.py:\d+ in forward: if x\.sum\(\) > 0"
                                            r".*torch\.where or torch\.cond"):
        graphc.compile(_Branchy(), (torch.randn(3),), target="torch")


@pytest.mark.parametrize("model, inputs, kwargs, regex", [
    (torch.nn.Linear(4, 2), None, {}, r"a PyTorch model needs example inputs"),
    (torch.nn.Linear(4, 2), (torch.randn(1, 4),), {"input_shapes": {"x": (8, 4)}},
     r"input_shapes is for ONNX inputs with dynamic dims"),
    (torch.nn.Linear(4, 2), (torch.randn(1, 4), 3), {}, r"input 1 is a int"),
    (None, None, {}, r"cannot trace a NoneType"),
    ({"weight": torch.ones(2)}, None, {}, r"cannot trace a dict"),
], ids=["no-inputs", "input-shapes-on-torch", "non-tensor-input", "none", "state-dict"])
def test_bad_model_or_trace_arguments(model, inputs, kwargs, regex):
    with pytest.raises(FrontendError, match=regex):
        graphc.trace(model, inputs, **kwargs)


# ---- calls --------------------------------------------------------------------------------
class _Two(torch.nn.Module):
    def forward(self, x, mask):
        return x.masked_fill(mask, 0.0).sum(-1)


@pytest.fixture(scope="module")
def callables():
    x, mask = torch.randn(2, 5), torch.rand(2, 5) > 0.5
    g = graphc.trace(_Two(), (x, mask))
    return g, graphc.compile(g, target="cpu"), (x, mask)


CALLS = {
    # name: (inputs from the good (x, mask), regex)
    "count": (lambda x, m: (x,), r"expected 2 inputs \(x, mask\), got 1"),
    "too-many": (lambda x, m: (x, m, m), r"expected 2 inputs \(x, mask\), got 3"),
    "shape": (lambda x, m: (x[:, :4], m), r"input 'x' expects x: f32\[2, 5\], got x: f32\[2, 4\]"),
    "rank": (lambda x, m: (x[None], m), r"input 'x' expects x: f32\[2, 5\], got x: f32\[1, 2, 5\]"),
    "dtype": (lambda x, m: (x.double(), m), r"input 'x' expects x: f32\[2, 5\], got x: f64"),
    "mask-dtype": (lambda x, m: (x, m.long()), (r"input 'mask' expects mask: bool\[2, 5\], "
                                               r"got mask: i64\[2, 5\]")),
    "list": (lambda x, m: (x, m.tolist()), r"input 'mask' must be a torch\.Tensor"),
}


@pytest.mark.parametrize("case", sorted(CALLS))
@pytest.mark.parametrize("which", ["graph", "compiled"])
def test_bad_call_names_the_input(callables, which, case):
    g, cm, (x, mask) = callables
    make, regex = CALLS[case]
    fn = g if which == "graph" else cm
    with pytest.raises(InputError, match=regex):
        fn(*make(x, mask))


def test_graph_refuses_numpy_compiled_model_takes_it(callables):
    g, cm, (x, mask) = callables
    with pytest.raises(InputError, match=r"graph '_Two': input 'x' must be a torch\.Tensor, "
                                         r"got numpy\.ndarray"):
        g(x.numpy(), mask)
    np.testing.assert_allclose(cm(x.numpy(), mask.numpy()), g(x, mask)[0].numpy(), rtol=1e-5)
    with pytest.raises(InputError, match=r"input 'x' expects x: f32\[2, 5\], got x: f64"):
        cm(x.numpy().astype(np.float64), mask.numpy())
