"""fold-batchnorm: IR before/after, numerics against PyTorch, and the cases it must refuse."""

import pytest
import torch
from torch import nn

import graphc
from graphc.passes.fold_batchnorm import fold_batchnorm, fold_batchnorm_rules
from graphc.rewrite import apply_rules
from graphc.verify import verify
from tests.models.zoo import build, randomize_batchnorm

BN_OP = "aten._native_batch_norm_legit_no_training"


def _fold_and_check(model, x, expect_bn_left=0):
    g = graphc.trace(model, x)
    n_bn = g.op_histogram()[BN_OP]
    out = fold_batchnorm(g)
    verify(out, after="fold-batchnorm")
    assert out.op_histogram()[BN_OP] == expect_bn_left
    assert g.op_histogram()[BN_OP] == n_bn  # input untouched
    with torch.no_grad():
        ref = model(*x)
    # Folding reassociates one multiply per weight: float32 rounding, not approximation.
    torch.testing.assert_close(out(*x)[0], ref, rtol=1e-5, atol=1e-5)
    return g, out


@pytest.mark.parametrize("name, folds", [("conv_bn_residual", 5), ("depthwise_separable", 2)])
def test_folds_every_conv_bn(name, folds):
    m, x = build(name)
    g, out = _fold_and_check(m, x)
    assert g.op_histogram()[BN_OP] == folds
    assert out.op_histogram()["aten.convolution"] == g.op_histogram()["aten.convolution"]
    assert out.stats()["nodes"] == g.stats()["nodes"] - 2 * folds  # bn + getitem each
    # a conv without bias gains one: params grow by the bias, not by the bn tensors
    assert out.stats()["params"] < g.stats()["params"]


def test_printed_ir_before_and_after():
    m = randomize_batchnorm(nn.Sequential(nn.Conv2d(2, 3, 1), nn.BatchNorm2d(3)))
    g, out = _fold_and_check(m, (torch.randn(1, 2, 4, 4),))
    assert f"= {BN_OP}(%convolution, %_1_weight, %_1_bias, %_1_running_mean, " in str(g)
    assert str(out).splitlines()[2:] == [
        "  %convolution_folded_weight: f32[3, 2, 1, 1] = param convolution_folded_weight",
        "  %convolution_folded_bias: f32[3] = param convolution_folded_bias",
        ("  %convolution: f32[1, 3, 4, 4] = aten.convolution(%input_1, "
         "%convolution_folded_weight, %convolution_folded_bias, [1, 1], [0, 0], [1, 1], False, "
         "[0, 0], 1)"),
        "  return (%convolution)",
        "}",
    ]


@pytest.mark.parametrize("bias", [True, False])
def test_linear_then_batchnorm1d(bias):
    m = randomize_batchnorm(nn.Sequential(nn.Linear(6, 5, bias=bias), nn.BatchNorm1d(5)))
    _, out = _fold_and_check(m, (torch.randn(3, 6),))
    assert out.op_histogram()["aten.addmm"] == 1 and "aten.mm" not in out.op_histogram()


def test_conv1d_and_grouped_conv():
    m = randomize_batchnorm(nn.Sequential(nn.Conv1d(4, 8, 3, groups=2), nn.BatchNorm1d(8)))
    _fold_and_check(m, (torch.randn(2, 4, 9),))


class _SharedConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x):
        c = self.conv(x)
        return self.bn(c) + c  # the conv output is needed un-normalized too


def test_refuses_when_the_conv_output_has_other_users():
    m = randomize_batchnorm(_SharedConv())
    x = (torch.randn(1, 3, 6, 6),)
    g = graphc.trace(m, x)
    out, misses = apply_rules(g, fold_batchnorm_rules)
    assert out is g and fold_batchnorm(g) is g
    bn = next(n.name for n in g.gm.graph.nodes if "batch_norm" in str(n.target))
    assert [str(mi) for mi in misses] == [
        f"conv-bn at %{bn}: %convolution has other users, folding would change them"]


def test_refuses_transposed_convolution():
    m = randomize_batchnorm(nn.Sequential(nn.ConvTranspose2d(3, 4, 2), nn.BatchNorm2d(4)))
    g = graphc.trace(m, (torch.randn(1, 3, 5, 5),))
    out, misses = apply_rules(g, fold_batchnorm_rules)
    assert out is g and "transposed convolution is not folded" in misses[0].reason


def test_training_mode_batchnorm_is_not_matched():
    # BatchNorm in training mode uses batch statistics: not foldable, must not match.
    m = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)).eval()
    g = graphc.trace(m, (torch.randn(2, 3, 4, 4),))
    assert fold_batchnorm(g) is not g  # sanity: eval mode folds
    f = torch.nn.functional

    class Train(nn.Module):
        def forward(self, x):
            return f.batch_norm(x, torch.zeros(3), torch.ones(3), training=True)

    g2 = graphc.trace(Train(), (torch.randn(2, 3, 4, 4),))
    assert fold_batchnorm(g2) is g2


def test_folds_every_batchnorm_of_a_deep_net():
    # One rewrite per apply_rules iteration: a fixed cap of 10 once left the rest unfolded.
    layers = []
    for _ in range(14):
        layers += [nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)]
    m = randomize_batchnorm(nn.Sequential(*layers))
    _fold_and_check(m, (torch.randn(1, 4, 6, 6),))
