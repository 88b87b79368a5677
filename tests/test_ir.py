"""Graph IR: deterministic printing, copying, stats, and the verifier's invariants."""

import operator

import pytest
import torch

import graphc
from graphc.errors import VerifyError
from graphc.verify import verify
from tests.models.zoo import MODELS, build


def test_print_is_deterministic_and_shows_op_shape_dtype():
    m, x = build("mlp")
    a, b = str(graphc.trace(m, x)), str(graphc.trace(m, x))
    assert a == b
    assert "graph MLP(x: f32[4, 20]) -> (out0: f32[4, 5]) {" in a
    assert "%fc1_weight: f32[64, 20] = param fc1_weight" in a
    assert "%relu: f32[4, 64] = aten.relu(%addmm)" in a
    assert a.rstrip().endswith("return (%addmm_2)\n}") or "return (%addmm_2)" in a


@pytest.mark.parametrize("name", sorted(MODELS))
def test_trace_matches_pytorch_and_verifies(name):
    m, x = build(name)
    g = graphc.trace(m, x)
    verify(g)
    with torch.no_grad():
        ref = m(*x)
    torch.testing.assert_close(g(*x)[0], ref, rtol=0, atol=1e-6)
    assert g.single_output


def test_copy_shares_weights_but_not_the_graph():
    m, x = build("mlp")
    g = graphc.trace(m, x)
    c = g.copy()
    assert c.gm.graph is not g.gm.graph
    assert c.weights()["fc1_weight"] is g.weights()["fc1_weight"]
    relu = next(n for n in c.gm.graph.nodes if n.name == "relu")
    relu.target = torch.ops.aten.sigmoid.default
    assert "aten.relu(%addmm)" in str(g) and "aten.sigmoid(%addmm)" in str(c)


def test_stats_count_each_tensor_once():
    m, x = build("mlp")
    st = graphc.trace(m, x).stats()
    expected = sum(p.numel() for p in m.parameters())
    assert st["params"] == expected and st["param_bytes"] == 4 * expected


def _dangling(g):
    g = g.copy()
    x = next(n for n in g.gm.graph.nodes if n.op == "placeholder")
    with g.gm.graph.inserting_after(x):
        g.gm.graph.call_function(torch.ops.aten.neg.default, (x,))
    return g


def _missing_attr(g):
    g = g.copy()
    n = next(n for n in g.gm.graph.nodes if n.op == "get_attr")
    n.target = "no_such_weight"
    return g


def _changed_output(g):
    g = g.copy()
    out = g.gm.graph.output_node()
    last = out.args[0][0]
    with g.gm.graph.inserting_before(out):
        s = g.gm.graph.call_function(torch.ops.aten.sum.dim_IntList, (last, [1]))
    out.args = ((s,),)
    g.gm.recompile()
    return g


@pytest.mark.parametrize("breaker, message", [
    (_dangling, r"dangling node %neg\w* \(aten.neg\) has no users"),
    (_missing_attr, r"names missing attribute 'no_such_weight'"),
    (_changed_output, r"output out0 .* changed from out0: f32\[4, 5\] to out0: f32\[4\]"),
])
def test_verifier_names_the_broken_node(breaker, message):
    m, x = build("mlp")
    g = graphc.trace(m, x)
    verify(g)
    with pytest.raises(VerifyError, match=message):
        verify(breaker(g), after="my-pass")


def test_verifier_reports_shape_errors_at_the_node():
    m, x = build("mlp")
    g = graphc.trace(m, x).copy()
    perm = next(n for n in g.gm.graph.nodes if n.name == "permute_1")
    perm.args = (perm.args[0], [0, 1])  # [4, 64] @ [32, 64]: shapes no longer line up
    with pytest.raises(VerifyError, match=r"at node %addmm_1 \(aten.addmm\)"):
        verify(g, after="bad")


def test_graph_call_checks_inputs():
    m, x = build("mlp")
    g = graphc.trace(m, x)
    with pytest.raises(graphc.InputError, match=r"input 'x' expects x: f32\[4, 20\]"):
        g(torch.randn(3, 20))


def test_getitem_and_multi_output_ops_print():
    m, x = build("conv_bn_residual")
    text = str(graphc.trace(m, x))
    assert "(f32[2, 8, 16, 16], f32[0], f32[0]) = aten._native_batch_norm_legit_no_training" in text
    assert "getitem(%_native_batch_norm_legit_no_training, 0)" in text
    assert operator.getitem  # getitem nodes print by name, not as a python object
