"""ONNX control flow (graphc/frontends/onnx_control.py): If, Loop and Scan expanded at load
time, checked against onnxruntime (eager module and torch.export trace, max abs < 1e-4;
the expansion computes the same float ops in the same order, so errors are ~1e-7), the
planned node list (what the expansion produced), and the refusals."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import graphc
from graphc.errors import UnsupportedOpError
from graphc.frontends.onnx import load_onnx
from tests.frontends.test_onnx import check, ort_run

F, I64, B = TensorProto.FLOAT, TensorProto.INT64, TensorProto.BOOL
RNG = np.random.default_rng(0)


def vi(name, elem, shape):
    return helper.make_tensor_value_info(name, elem, shape)


def model(nodes, inputs, outputs, inits=(), opset=17):
    g = helper.make_graph(nodes, "control", inputs, outputs, list(inits))
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])


def const(name, arr):
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.asarray(arr)))


def planned_ops(module) -> list[str]:
    return [n.op for n in module._plan]


def branches(then_out="t", else_out="e", else_shape=(2, 3)):
    """then: x + w (w an outer initializer), else: x * 2 (or x reshaped by else_shape)."""
    then = helper.make_graph([helper.make_node("Add", ["x", "w"], [then_out])], "then", [],
                             [vi(then_out, F, [2, 3])])
    shape = numpy_helper.from_array(np.array(else_shape, np.int64), "shape")
    two = numpy_helper.from_array(np.array(2.0, np.float32), "two")
    other = helper.make_graph([helper.make_node("Mul", ["x", "two"], ["m"]),
                               helper.make_node("Reshape", ["m", "shape"], [else_out])],
                              "else", [], [vi(else_out, F, list(else_shape))], [two, shape])
    return then, other


# ---------------------------------------------------------------- If

@pytest.mark.parametrize("take", [True, False])
def test_if_with_a_load_time_condition_keeps_only_the_taken_branch(take):
    then, other = branches()
    w = numpy_helper.from_array(RNG.standard_normal((2, 3)).astype(np.float32), "w")
    m = model([const("c", np.array(take)),
               helper.make_node("If", ["c"], ["y"], then_branch=then, else_branch=other)],
              [vi("x", F, [2, 3])], [vi("y", F, [2, 3])], [w])
    x = RNG.standard_normal((2, 3)).astype(np.float32)
    check(m, {"x": x})
    ops = planned_ops(load_onnx(m))
    assert ops == (["Add", "Identity"] if take else ["Mul", "Reshape", "Identity"])


def test_if_with_a_runtime_condition_selects_per_call():
    then, other = branches()
    w = numpy_helper.from_array(RNG.standard_normal((2, 3)).astype(np.float32), "w")
    m = model([helper.make_node("If", ["c"], ["y"], then_branch=then, else_branch=other)],
              [vi("x", F, [2, 3]), vi("c", B, [])], [vi("y", F, [2, 3])], [w])
    x = RNG.standard_normal((2, 3)).astype(np.float32)
    for c in (np.array(True), np.array(False)):
        check(m, {"x": x, "c": c})
    assert planned_ops(load_onnx(m)) == ["Add", "Mul", "Reshape", "Reshape", "Where"]


def test_if_with_a_runtime_condition_and_branches_of_two_shapes_is_refused():
    then, other = branches(else_shape=(3, 2))
    w = numpy_helper.from_array(np.zeros((2, 3), np.float32), "w")
    m = model([helper.make_node("If", ["c"], ["y"], name="pick", then_branch=then,
                                else_branch=other)],
              [vi("x", F, [2, 3]), vi("c", B, [])], [vi("y", F, ["d0", "d1"])], [w])
    with pytest.raises(UnsupportedOpError, match=r"If node 'pick'.*different shapes "
                                                 r"\(\[2, 3\] and \[3, 2\]\)"):
        load_onnx(m)


# ---------------------------------------------------------------- Loop

def loop_body(with_if: bool = False):
    """(i, cond, acc) -> (cond, acc + x * i, acc as a scan output); optionally the add runs
    in a nested If that reads a body value (acc) and an outer value (x)."""
    nodes = [helper.make_node("Cast", ["i"], ["fi"], to=F),
             helper.make_node("Mul", ["x", "fi"], ["xi"]),
             helper.make_node("Identity", ["cond_in"], ["cond_out"]),
             helper.make_node("Identity", ["acc"], ["scan"])]
    if with_if:
        then = helper.make_graph([helper.make_node("Add", ["acc", "xi"], ["sum"])], "then", [],
                                 [vi("sum", F, [3])])
        other = helper.make_graph([helper.make_node("Sub", ["acc", "x"], ["dif"])], "else", [],
                                  [vi("dif", F, [3])])
        nodes += [helper.make_node("Less", ["i", "two"], ["small"]),
                  helper.make_node("If", ["small"], ["acc_out"], then_branch=then,
                                   else_branch=other)]
    else:
        nodes.append(helper.make_node("Add", ["acc", "xi"], ["acc_out"]))
    inits = [numpy_helper.from_array(np.array(2, np.int64), "two")] if with_if else []
    return helper.make_graph(nodes, "body", [vi("i", I64, []), vi("cond_in", B, []),
                                             vi("acc", F, [3])],
                             [vi("cond_out", B, []), vi("acc_out", F, [3]),
                              vi("scan", F, [3])], inits)


@pytest.mark.parametrize("with_if", [False, True])
def test_loop_with_a_load_time_trip_count_unrolls(with_if):
    m = model([const("n", np.array(4, np.int64)), const("a0", np.zeros(3, np.float32)),
               helper.make_node("Loop", ["n", "", "a0"], ["acc", "scans"],
                                body=loop_body(with_if))],
              [vi("x", F, [3])], [vi("acc", F, [3]), vi("scans", F, [4, 3])])
    x = RNG.standard_normal(3).astype(np.float32)
    check(m, {"x": x})
    ops = planned_ops(load_onnx(m))
    assert ops.count("Mul") == 4 and ops.count("Concat") == 1
    assert ops.count("Where") == 0  # each iteration's If condition folds at load time


def test_loop_stops_when_its_condition_turns_false():
    # body: cond_out = i < 2, so iterations 0, 1, 2 run (the condition is checked after each)
    body = loop_body()
    body.node.append(helper.make_node("Less", ["i", "two"], ["cond_out2"]))
    body.initializer.append(numpy_helper.from_array(np.array(2, np.int64), "two"))
    body.output[0].name = "cond_out2"
    m = model([const("n", np.array(10, np.int64)), const("go", np.array(True)),
               const("a0", np.zeros(3, np.float32)),
               helper.make_node("Loop", ["n", "go", "a0"], ["acc", "scans"], body=body)],
              [vi("x", F, [3])], [vi("acc", F, [3]), vi("scans", F, [None, 3])])
    x = RNG.standard_normal(3).astype(np.float32)
    check(m, {"x": x})
    assert tuple(load_onnx(m)(torch.from_numpy(x))[1].shape) == (3, 3)


def test_loop_with_a_runtime_trip_count_is_refused():
    m = model([const("a0", np.zeros(3, np.float32)),
               helper.make_node("Loop", ["n", "", "a0"], ["acc", "scans"], name="steps",
                                body=loop_body())],
              [vi("x", F, [3]), vi("n", I64, [])], [vi("acc", F, [3]), vi("scans", F, ["n", 3])])
    with pytest.raises(UnsupportedOpError, match=r"Loop node 'steps'.*trip count M \('n'\) is "
                                                 "computed from the model's inputs"):
        load_onnx(m)


def test_loop_without_trip_count_or_condition_is_refused():
    m = model([const("a0", np.zeros(3, np.float32)),
               helper.make_node("Loop", ["", "", "a0"], ["acc", "scans"], body=loop_body())],
              [vi("x", F, [3])], [vi("acc", F, [3]), vi("scans", F, ["n", 3])])
    with pytest.raises(UnsupportedOpError, match="runs forever"):
        load_onnx(m)


# ---------------------------------------------------------------- Scan

def test_scan_over_axis_1_in_both_directions_matches_onnxruntime():
    """A running sum over axis 1 of x (read backwards) and a per-step product with y
    (forwards), outputs stacked on axis 1, the second one in reverse."""
    body = helper.make_graph(
        [helper.make_node("Add", ["s", "xt"], ["s_out"]),
         helper.make_node("Mul", ["s_out", "yt"], ["p"]),
         helper.make_node("Identity", ["s_out"], ["o1"])],
        "body", [vi("s", F, [2]), vi("xt", F, [2]), vi("yt", F, [2])],
        [vi("s_out", F, [2]), vi("o1", F, [2]), vi("p", F, [2])])
    m = model([helper.make_node("Scan", ["s0", "x", "y"], ["s", "sums", "prods"], body=body,
                                num_scan_inputs=2, scan_input_axes=[1, 1],
                                scan_input_directions=[1, 0], scan_output_axes=[1, -1],
                                scan_output_directions=[0, 1])],
              [vi("s0", F, [2]), vi("x", F, [2, 5]), vi("y", F, [2, 5])],
              [vi("s", F, [2]), vi("sums", F, [2, 5]), vi("prods", F, [2, 5])])
    feeds = {"s0": RNG.standard_normal(2).astype(np.float32),
             "x": RNG.standard_normal((2, 5)).astype(np.float32),
             "y": RNG.standard_normal((2, 5)).astype(np.float32)}
    check(m, feeds)
    assert planned_ops(load_onnx(m)).count("Gather") == 10


def test_scan_compiles_on_tvm():
    body = helper.make_graph([helper.make_node("Add", ["s", "xt"], ["s_out"]),
                              helper.make_node("Identity", ["s_out"], ["o"])],
                             "body", [vi("s", F, [4]), vi("xt", F, [4])],
                             [vi("s_out", F, [4]), vi("o", F, [4])])
    m = model([helper.make_node("Scan", ["s0", "x"], ["s", "cum"], body=body,
                                num_scan_inputs=1)],
              [vi("s0", F, [4]), vi("x", F, [3, 4])], [vi("s", F, [4]), vi("cum", F, [3, 4])])
    feeds = {"s0": np.zeros(4, np.float32), "x": RNG.standard_normal((3, 4)).astype(np.float32)}
    cm = graphc.compile(m.SerializeToString(), target="cpu")
    got = cm(*(torch.from_numpy(feeds[k]) for k in ("s0", "x")))
    for g, want in zip(got, ort_run(m, feeds)):
        np.testing.assert_allclose(g.numpy(), want, rtol=0, atol=1e-6)
