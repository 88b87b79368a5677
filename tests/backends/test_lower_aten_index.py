"""TVM lowering of index ops (scatter, gather, top-k, grid sampling, pooling indices) against
PyTorch: the kernels TOPI writes as opaque blocks must build, and graphc's own lowerings
(lower_aten_index.py) must match PyTorch on small inputs, duplicates and edge cases."""

from __future__ import annotations

import torch
import tvm
from torch import nn
from tvm import s_tir, te, topi

import graphc
from graphc.backends.tvm.schedules import Guarded
from graphc.backends.tvm.schedules.common import root_blocks
from graphc.backends.tvm.schedules.elementwise import Injective
from graphc.backends.tvm.schedules.layout import wrap_root_block

TOL = 1e-5


def _compile(model: nn.Module, *args):
    return graphc.compile(model.eval(), args, target="cpu")


def _check(model: nn.Module, *args, atol: float = TOL):
    cm = _compile(model, *args)
    got, want = cm(*args), model(*args)
    if isinstance(want, torch.Tensor):
        got, want = (got,), (want,)
    for g, w in zip(got, want, strict=True):
        assert g.dtype == w.dtype and g.shape == w.shape
        torch.testing.assert_close(g, w, atol=atol, rtol=1e-5)


# ---- kernels without a root block (schedules/common.py, schedules/layout.py) ---------------

class TopKAfterLinear(nn.Module):
    """topk is an extern call (one opaque block); the linear before it packs its weight, so
    SplitLayoutRewritePreproc runs over both kernels."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 12)

    def forward(self, x):
        return torch.topk(self.fc(x), 3, dim=1)


class Scatter(nn.Module):
    def forward(self, x, index, src):
        return torch.scatter(x, 1, index, src) * 2.0


def test_topk_builds_next_to_packed_weights():
    torch.manual_seed(0)
    _check(TopKAfterLinear(), torch.randn(5, 16))


def test_scatter_builds_and_matches():
    torch.manual_seed(0)
    x, src = torch.randn(3, 5), torch.randn(3, 2)
    index = torch.tensor([[4, 0], [1, 3], [2, 0]])
    _check(Scatter(), x, index, src)


def test_rules_decline_a_kernel_without_root_block():
    a = te.placeholder((2, 8), name="a")
    func = te.create_prim_func([a, topi.argsort(a, axis=1)])  # one opaque "argsort_cpu" block
    assert root_blocks(s_tir.Schedule(func)) == []
    assert Guarded("injective", Injective()).apply(func, tvm.target.Target("llvm"), False) is None
    wrapped = wrap_root_block(tvm.IRModule({"main": func}))["main"]
    assert wrapped.body.block.name_hint == "root"
    assert len(root_blocks(s_tir.Schedule(wrapped))) == 1
