"""tools/onnx_conformance.py: its classification, and a bounded run against the expected list.

The whole suite takes minutes (tools/onnx_conformance.py, README "ONNX conformance");
CI runs the first case of every op on the torch backend (the frontend) and a fixed
handful through TVM, and fails on a regression or on a listed failure that now passes.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from graphc.errors import FrontendError, UnsupportedOpError

ROOT = Path(__file__).resolve().parents[2]
TOOL = ROOT / "tools" / "onnx_conformance.py"
EXPECTED = ROOT / "tools" / "onnx_conformance_expected.txt"
# a fixed TVM subset: elementwise, conv, pooling, reductions, gather/scatter, attention, loss
TVM_CASES = (r"^test_(add_bcast|relu|conv_with_strides_padding|maxpool_2d_pads|"
             r"reduce_max_default_axes_keepdim_example|gather_elements_0|scatter_elements_with_axis|"
             r"attention_3d_gqa|sce_mean_weight|layer_normalization_4d_axis_negative_1|"
             r"lstm_defaults|resize_upsample_scales_linear|top_k)$")


@pytest.fixture(scope="module")
def tool():
    spec = importlib.util.spec_from_file_location("onnx_conformance", TOOL)
    module = importlib.util.module_from_spec(spec)
    sys.modules["onnx_conformance"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _model(op, in_type=TensorProto.FLOAT, domain="", **attrs):
    x = helper.make_tensor_value_info("x", in_type, [2])
    y = helper.make_tensor_value_info("y", in_type, [2])
    node = helper.make_node(op, ["x"], ["y"], domain=domain, **attrs)
    opsets = [helper.make_opsetid("", 17)] + ([helper.make_opsetid(domain, 1)] if domain else [])
    return helper.make_model(helper.make_graph([node], "g", [x], [y]), opset_imports=opsets)


def test_filter_names_the_reason(tool):
    assert tool.filter_reason(_model("Relu")) is None
    assert tool.filter_reason(_model("Relu", TensorProto.FLOAT16)) == "dtype float16"
    assert tool.filter_reason(_model("Cast", to=TensorProto.BFLOAT16)) == "dtype bfloat16"
    assert tool.filter_reason(_model("Normalizer", domain="ai.onnx.ml")) == "domain ai.onnx.ml"


def test_compare_checks_shape_dtype_and_values(tool):
    a = np.array([1.0, 2.0], np.float32)
    assert tool.compare([a], [a.copy()], 1e-3, 1e-7) is None
    assert "dtype float64" in tool.compare([a.astype(np.float64)], [a], 1e-3, 1e-7)
    assert "shape [1, 2]" in tool.compare([a[None]], [a], 1e-3, 1e-7)
    assert "Mismatched" in tool.compare([a + 0.01], [a], 1e-3, 1e-7)
    assert "1 outputs, expected 2" in tool.compare([a], [a, a], 1e-3, 1e-7)


def test_refusal_is_graphcs_own_error(tool):
    assert tool._is_refusal(UnsupportedOpError("no rule"))
    wrapped = FrontendError("failed at load time")
    wrapped.__cause__ = RuntimeError("torch")
    assert not tool._is_refusal(wrapped)  # a foreign failure graphc merely wrapped: a crash
    assert not tool._is_refusal(ValueError("x"))


def test_check_reports_regressions_and_stale_entries(tool):
    results = [{"name": "a", "status": "pass", "detail": ""},
               {"name": "b", "status": "wrong", "detail": "output 0"},
               {"name": "c", "status": "pass", "detail": ""}]
    problems = tool.check(results, {"c": "unsupported"})
    assert problems[0].startswith("REGRESSION b: wrong")
    assert problems[1].startswith("NOW PASSES c")
    assert tool.check(results[:1], {}) == []


def test_shape_inputs_are_frozen_and_data_is_not(tool):
    cases, _ = tool.collect()
    case = next(c for c in cases if c.name == "test_reshape_reordered_all_dims")
    frozen = tool.freeze_static_inputs(case)
    assert frozen.frozen == ["shape"] and len(frozen.inputs) == 1
    assert [i.name for i in frozen.model.graph.input] == ["data"]
    onnx.checker.check_model(frozen.model)


def test_expected_list_round_trip(tool, tmp_path):
    path = tmp_path / "expected.txt"
    path.write_text("# header\nold_case tvm crash some reason\nkept torch wrong why\n")
    tool.write_expected(str(path), [{"name": "old_case", "status": "pass", "detail": ""},
                                    {"name": "new", "status": "unsupported", "detail": "no\nrule"}],
                        "tvm")
    assert tool.read_expected(str(path), "tvm") == {"new": "unsupported"}
    assert tool.read_expected(str(path), "torch") == {"kept": "wrong"}


def _run(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(TOOL), "--jobs", "2", "--check", str(EXPECTED), *args]
    return subprocess.run(cmd, check=False, capture_output=True, text=True, cwd=ROOT,
                          timeout=600)


@pytest.mark.slow
def test_first_case_of_every_op_on_torch_is_as_expected():
    out = _run("--backend", "torch", "--one-per-op")
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert "check: all" in out.stdout


@pytest.mark.slow
def test_fixed_subset_through_tvm_is_as_expected():
    out = _run("--backend", "tvm", "--cases", TVM_CASES)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert "check: all 1" in out.stdout  # 10+ cases ran
