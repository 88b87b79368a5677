"""dead-code-elimination and constant-folding: IR before/after, numerics, negative cases."""

import torch

import graphc
from graphc.passes.cleanup import (
    common_subexpression_elimination,
    constant_folding,
    dead_code_elimination,
)
from graphc.passes.fold_pad import RULES as FOLD_PAD_RULES
from graphc.passes.fold_pad import fold_pad
from graphc.rewrite import apply_rules
from graphc.verify import verify
from tests.models.zoo import build


def _with_dead_node(g):
    g = g.copy()
    x = next(n for n in g.gm.graph.nodes if n.op == "placeholder")
    with g.gm.graph.inserting_after(x):
        g.gm.graph.call_function(torch.ops.aten.exp.default, (x,))
    g.gm.recompile()
    return g


def test_dce_removes_unused_nodes_exactly():
    m, x = build("mlp")
    g = _with_dead_node(graphc.trace(m, x))
    before = str(g)
    out = dead_code_elimination(g)
    assert "aten.exp" in before and "aten.exp" not in str(out)
    assert out.stats()["nodes"] == g.stats()["nodes"] - 1
    assert str(g) == before  # input untouched
    verify(out, after="dead-code-elimination")
    torch.testing.assert_close(out(*x)[0], g(*x)[0], rtol=0, atol=0)


def test_dce_returns_the_same_graph_when_nothing_is_dead():
    m, x = build("mlp")
    g = graphc.trace(m, x)
    assert dead_code_elimination(g) is g


def test_constant_folding_precomputes_weight_transposes():
    m, x = build("mlp")
    g = graphc.trace(m, x)
    assert g.op_histogram()["aten.permute"] == 3
    out = constant_folding(g)
    assert out.op_histogram()["aten.permute"] == 0
    assert out.op_histogram()["aten.addmm"] == 3
    assert "%permute: f32[20, 64] = param permute" in str(out)
    assert out.stats()["param_bytes"] == g.stats()["param_bytes"]
    verify(out, after="constant-folding")
    torch.testing.assert_close(out(*x)[0], g(*x)[0], rtol=0, atol=1e-6)


class _Expand(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("bias", torch.randn(1, 64))

    def forward(self, x):
        return x + self.bias.expand(256, 64).clone() + torch.full((256, 64), 2.0)


def test_constant_folding_refuses_folds_that_grow_the_artifact():
    x = (torch.randn(256, 64),)
    g = graphc.trace(_Expand(), x)
    out = constant_folding(g)  # 64 KiB results from 256-byte inputs: not folded
    assert out.op_histogram() == g.op_histogram()
    big = constant_folding(g, max_growth_bytes=1 << 20)
    assert "aten.expand" not in big.op_histogram() and "aten.full" not in big.op_histogram()
    torch.testing.assert_close(big(*x)[0], g(*x)[0], rtol=0, atol=0)


class _Random(torch.nn.Module):
    def forward(self, x):
        return x + torch.rand(4)


def test_constant_folding_keeps_random_ops():
    g = graphc.trace(_Random(), (torch.randn(4),))
    assert constant_folding(g) is g


class _ThreeViews(torch.nn.Module):
    """Views the input once per projection, as HF BERT does for q, k and v; and draws
    two random tensors, which must stay two."""

    def __init__(self):
        super().__init__()
        self.q, self.k = torch.nn.Linear(6, 4), torch.nn.Linear(6, 4)

    def forward(self, x):
        a = self.q(x.view(-1, 6))
        b = self.k(x.view(-1, 6))
        return a + b, torch.rand(3) + torch.rand(3)


def test_cse_merges_repeated_pure_ops_and_keeps_random_ones():
    torch.manual_seed(0)
    g = graphc.trace(_ThreeViews(), (torch.randn(2, 3, 6),))
    h = common_subexpression_elimination(g)
    verify(h, after="common-subexpression-elimination")
    assert g.op_histogram()["aten.view"] == 2 and h.op_histogram()["aten.view"] == 1
    assert h.op_histogram()["aten.rand"] == 2  # random draws are not merged
    x = torch.randn(2, 3, 6)
    torch.testing.assert_close(h(x)[0], g(x)[0], rtol=0, atol=0)
    # both projections now read one node: quantize quantizes it once
    q = graphc.quantize(h, activations="dynamic")
    assert q.op_histogram()["graphc.fake_quant_dynamic"] == 1
    assert common_subexpression_elimination(h) is h  # nothing left to merge


class _TFPadding(torch.nn.Module):
    """Explicit pads as TF-converted models have them: by nothing, symmetric, asymmetric."""

    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Conv2d(3, 4, 3), torch.nn.Conv2d(4, 4, 3, stride=2)

    def forward(self, x):
        x = torch.nn.functional.pad(x, (0, 0, 0, 0))
        x = self.a(torch.nn.functional.pad(x, (1, 1, 1, 1)))
        return self.b(torch.nn.functional.pad(x, (0, 1, 0, 1)))


def test_fold_pad_removes_empty_pads_and_moves_symmetric_ones_into_the_conv():
    torch.manual_seed(0)
    g = graphc.trace(_TFPadding(), (torch.randn(1, 3, 10, 10),))
    h = fold_pad(g)
    verify(h, after="fold-pad")
    assert g.op_histogram()["aten.constant_pad_nd"] == 3
    assert h.op_histogram()["aten.constant_pad_nd"] == 1  # the asymmetric one stays
    assert "aten.convolution(%x, %a_weight, %a_bias, [1, 1], [1, 1]" in str(h)
    x = torch.randn(1, 3, 10, 10)
    torch.testing.assert_close(h(x)[0], g(x)[0], rtol=1e-6, atol=1e-6)
    _, misses = apply_rules(h, FOLD_PAD_RULES)
    assert [m.reason for m in misses] == [
        "asymmetric padding [0, 1, 0, 1]: aten.convolution pads both sides equally"]
