"""The pooling, row- and full-reduction and injective schedule rules
(backends/tvm/schedules/pool.py, reduction.py, elementwise.py) on odd shapes for an AVX-512 and an AVX2 target, and whole
small models in which no kernel is left unscheduled."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.backends.test_schedules_conv import TARGETS, compile_with_tir
from tests.models import zoo


class Op(nn.Module):
    def __init__(self, fn, *modules):
        super().__init__()
        self.fn, self.mods = fn, nn.ModuleList(modules)

    def forward(self, *xs):
        return self.fn(self, *xs)


# id -> (forward(self, *xs), modules, input shapes, the rule's mark in the main kernel)
CASES = {
    "maxpool_3x3_s2_pad": (lambda s, x: F.max_pool2d(x, 3, 2, 1), (), [(1, 5, 13, 11)],
                           "pool2d"),
    "maxpool_2x2_wide": (lambda s, x: F.max_pool2d(x, 2), (), [(2, 3, 8, 40)], "pool2d"),
    "maxpool_ceil": (lambda s, x: F.max_pool2d(x, 3, 2, ceil_mode=True), (), [(1, 4, 10, 10)],
                     "pool2d"),
    "avgpool_no_pad_count": (lambda s, x: F.avg_pool2d(x, 3, 2, 1, count_include_pad=False),
                             (), [(1, 7, 9, 9)], "pool2d"),
    "avgpool_1x1_out": (lambda s, x: F.avg_pool2d(x, 5), (), [(1, 3, 5, 5)], "pool2d"),
    "softmax_odd_rows": (lambda s, x: x.softmax(-1), (), [(3, 5, 37)], "row_reduction"),
    "softmax_vector_rows": (lambda s, x: x.softmax(-1), (), [(2, 4, 64)], "row_reduction"),
    "softmax_masked": (lambda s, x: x.masked_fill(x > 1.0, float("-inf")).softmax(-1), (),
                       [(2, 3, 48)], "row_reduction"),
    "layernorm_odd": (lambda s, x: s.mods[0](x), (nn.LayerNorm(45),), [(3, 7, 45)],
                      "row_reduction"),
    "layernorm_384": (lambda s, x: s.mods[0](x), (nn.LayerNorm(384),), [(2, 9, 384)],
                      "row_reduction"),
    "global_avg_pool": (lambda s, x: F.adaptive_avg_pool2d(x, 1), (), [(2, 19, 7, 7)],
                        "row_reduction"),
    "sum_last_axis": (lambda s, x: x.sum(-1) * 2.0, (), [(6, 100)], "row_reduction"),
    "min_all_odd": (lambda s, x: x.min(), (), [(7, 13)], "full_reduction"),
    "max_all": (lambda s, x: x.max(), (), [(3, 64)], "full_reduction"),
    "abs_sum_all_prime": (lambda s, x: x.abs().sum(), (), [(1, 17, 19)], "full_reduction"),
    "transpose": (lambda s, x: x.transpose(1, 2).contiguous() * 2.0, (), [(2, 17, 3, 33)],
                  "injective"),
    "to_channels_last": (lambda s, x: x.permute(0, 2, 3, 1).contiguous(), (), [(2, 3, 5, 32)],
                         "injective"),
    "to_channels_last_odd_row": (lambda s, x: x.permute(0, 2, 3, 1).contiguous(), (),
                                 [(1, 3, 4, 29)], "injective"),
    "pad_then_scale": (lambda s, x: F.pad(x, (0, 1, 2, 0)) * 1.5, (), [(1, 3, 9, 7)],
                       "injective"),
    "gelu": (lambda s, x: F.gelu(x), (), [(7, 129)], "injective"),
    "add_relu_broadcast": (lambda s, x, y: torch.relu(x + y), (), [(2, 5, 11), (5, 1)],
                           "injective"),
    "embedding_gather": (lambda s, i: s.mods[0](i) * 2.0, (nn.Embedding(50, 24),), "ids",
                         "injective"),
    "tiny_elementwise": (lambda s, x: x * 3.0 + 1.0, (), [(3,)], "injective"),
}


def _inputs(shapes):
    if shapes == "ids":
        return (torch.randint(0, 50, (3, 11)),)
    return tuple(torch.randn(*s) for s in shapes)


@pytest.mark.parametrize("isa", list(TARGETS))
@pytest.mark.parametrize("case", list(CASES))
def test_rule(case, isa):
    fn, modules, shapes, mark = CASES[case]
    torch.manual_seed(0)
    model = Op(fn, *modules).eval()
    xs = _inputs(shapes)
    cm, ref, funcs = compile_with_tir(model, xs, TARGETS[isa])
    marked = [n for n, t in funcs.items() if f'"graphc.schedule": "{mark}"' in t]
    assert marked, f"no kernel scheduled by the {mark} rule: {list(funcs)}"
    unscheduled = [n for n, t in funcs.items() if '"tirx.is_scheduled": True' not in t]
    assert not unscheduled, f"left unscheduled: {unscheduled}"
    got = cm(*xs)
    err = float((got - ref).abs().max())
    assert got.shape == ref.shape and err < 1e-4 * max(1.0, float(ref.abs().max())), err


def test_narrow_transpose_loads_rows_not_gathers():
    """NCHW -> NHWC of a 3-channel image: contiguous vector loads along each row (no
    index divided by 3 per lane, which made every lane a gather)."""
    x = torch.randn(1, 3, 6, 32)
    cm, ref, funcs = compile_with_tir(Op(lambda s, x: x.permute(0, 2, 3, 1).contiguous()).eval(),
                                      (x,), "cpu")
    (tir,) = funcs.values()
    assert "T.vectorized" in tir and "% T.int64(3)" not in tir and "// T.int64(3)" not in tir
    assert torch.equal(cm(x), ref)


@pytest.mark.parametrize("name", ["conv_bn_residual", "depthwise_separable", "encoder_block",
                                  "mlp"])
def test_no_kernel_left_unscheduled(name):
    """Every PrimFunc of a whole small model is scheduled by some rule, and the model still
    matches PyTorch."""
    model, inputs = zoo.build(name)
    cm, ref, funcs = compile_with_tir(model, inputs, "cpu")
    assert funcs
    unscheduled = [n for n, t in funcs.items() if '"tirx.is_scheduled": True' not in t]
    assert not unscheduled, f"left unscheduled: {unscheduled}"
    err = float((cm(*inputs) - ref).abs().max())
    assert err < 1e-4 * max(1.0, float(ref.abs().max())), err
