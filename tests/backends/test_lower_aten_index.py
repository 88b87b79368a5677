"""TVM lowering of index ops (scatter, gather, top-k, grid sampling, pooling indices) against
PyTorch: the kernels TOPI writes as opaque blocks must build, and graphc's own lowerings
(lower_aten_index.py) must match PyTorch on small inputs, duplicates and edge cases."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import tvm
from torch import nn
from tvm import s_tir, te, topi

import graphc
from graphc.backends.tvm.schedules import Guarded
from graphc.backends.tvm.schedules.common import root_blocks
from graphc.backends.tvm.schedules.elementwise import Injective
from graphc.backends.tvm.schedules.layout import wrap_root_block
from graphc.errors import UnsupportedOpError
from tests.models.zoo import Fn

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


# ---- scatter / scatter_reduce / index_put (lower_aten_index.py) ------------------------------

def test_scatter_with_an_index_smaller_than_self():
    # index [2, 2, 1, 1] into self [3, 3, 4, 2] along dim 2: TVM's converter offset the rows
    # by the index's shape and wrote elsewhere (max error ~2 on this input)
    torch.manual_seed(0)
    x, src = torch.randn(3, 3, 4, 2), torch.randn(2, 3, 2, 2)  # src larger than index too
    index = torch.tensor([1, 3, 0, 2]).reshape(2, 2, 1, 1)
    _check(Fn(lambda x, i, s: (torch.scatter(x, 2, i, s), torch.scatter(x, 2, i, -1.5))),
           x, index, src)


@pytest.mark.parametrize("include_self", [True, False])
def test_scatter_reduce_with_duplicates(include_self):
    torch.manual_seed(0)
    x, src = torch.randn(4, 5), torch.randn(2, 4)
    index = torch.tensor([[0, 0, 3, 0], [4, 4, 4, 1]])  # duplicates within each row

    def fn(x, i, s):
        return tuple(torch.scatter_reduce(x, 1, i, s, r, include_self=include_self)
                     for r in ("sum", "prod", "amax", "amin"))
    _check(Fn(fn), x, index, src)


def test_scatter_reduce_integer_without_self():
    x = torch.arange(12, dtype=torch.int32).reshape(3, 4) - 6
    index = torch.tensor([[0, 0], [2, 2], [1, 3]])
    src = torch.tensor([[-9, -7], [5, 8], [-1, -2]], dtype=torch.int32)
    _check(Fn(lambda x, i, s: (torch.scatter_reduce(x, 1, i, s, "amax", include_self=False),
                               torch.scatter_reduce(x, 1, i, s, "amin", include_self=False))),
           x, index, src)


def test_scatter_reduce_mean_is_refused():
    x, index, src = torch.randn(2, 3), torch.tensor([[0, 0], [1, 2]]), torch.randn(2, 2)
    with pytest.raises(UnsupportedOpError, match="scatter_reduce.*mean"):
        _compile(Fn(lambda x, i, s: torch.scatter_reduce(x, 1, i, s, "mean")), x, index, src)


def test_index_put_leading_dims():
    # fewer index tensors than dims (ONNX ScatterND): TVM's converter refused it
    torch.manual_seed(0)
    d, v = torch.randn(4, 3, 2), torch.randn(2, 3, 2)
    _check(Fn(lambda d, i, v: torch.index_put(d, (i,), v)), d, torch.tensor([3, -4]), v)
    _check(Fn(lambda d, i, j, v: torch.index_put(d, (i, j), v, accumulate=True)),
           d, torch.tensor([0, 0, 1]), torch.tensor([2, 2, -1]), torch.randn(3, 2))


def _put_mid(d, i, j, v):
    y = d.clone()
    y[:, i, j] = v
    return y


def _add_apart(d, i, j, v):
    y = d.clone()
    y[i, :, j] += v
    return y


def test_index_and_index_put_with_sliced_dims():
    # index dims replace adjacent indexed dims in place, or go first when apart (torch's
    # layout; TVM's converter got both shapes wrong)
    torch.manual_seed(0)
    d = torch.randn(3, 4, 5, 6)
    i, j = torch.tensor([0, 3, -1]), torch.tensor([[1], [4]])
    _check(Fn(lambda d, i, j: (d[:, i, j] * 1, d[..., j] * 1)), d, i, j)
    _check(Fn(_put_mid), d, i, j, torch.randn(3, 6))
    i, j = torch.tensor([0, 2, 0]), torch.tensor([1, 1, -1])  # duplicates accumulate
    _check(Fn(lambda d, i, j: d[i, :, j] * 1), d, i, j)
    _check(Fn(_add_apart), d, i, j, torch.randn(3, 4, 6))


def test_index_negative_leading():
    # d[i, j] with i = -1: TVM's converter read out of bounds (values ~1e24, no error)
    torch.manual_seed(0)
    d = torch.randn(3, 4, 5)
    _check(Fn(lambda d, i, j: d[i, j] * 1), d, torch.tensor([0, 2, -1]), torch.tensor([[1], [-4]]))


def test_boolean_mask_index_put_is_refused():
    def fn(d, m):
        y = d.clone()
        y[m] = 0.0
        return y
    with pytest.raises(UnsupportedOpError, match="integer index tensors"):
        _compile(Fn(fn), torch.randn(3, 4), torch.rand(3, 4) > 0.5)


# ---- grid sampling -----------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["bilinear", "nearest", "bicubic"])
@pytest.mark.parametrize("align", [False, True])
def test_grid_sample_2d(mode, align):
    torch.manual_seed(0)
    x, grid = torch.randn(2, 3, 5, 4), torch.rand(2, 6, 3, 2) * 2.6 - 1.3  # some outside

    def fn(x, g):
        return tuple(F.grid_sample(x, g, mode, pad, align)
                     for pad in ("zeros", "border", "reflection"))
    _check(Fn(fn), x, grid, atol=1e-4)


@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
def test_grid_sample_3d(mode):
    torch.manual_seed(0)
    x, grid = torch.randn(1, 2, 3, 4, 5), torch.rand(1, 2, 3, 4, 3) * 2.4 - 1.2
    _check(Fn(lambda x, g: (F.grid_sample(x, g, mode, "zeros", False),
                            F.grid_sample(x, g, mode, "border", True))), x, grid, atol=1e-4)


# ---- max pooling indices -----------------------------------------------------------------

def _equal(model: nn.Module, *args):
    got, want = _compile(model, *args)(*args), model(*args)
    for g, w in zip(got, want, strict=True):
        assert g.dtype == w.dtype and g.shape == w.shape
        torch.testing.assert_close(g, w, rtol=0, atol=0, equal_nan=True)
    return want


@pytest.mark.parametrize("args", [
    {"kernel_size": 2},
    {"kernel_size": 3, "stride": 2, "padding": 1, "ceil_mode": True},
    {"kernel_size": (2, 3), "stride": (1, 2), "padding": (1, 0), "dilation": (2, 1)},
])
def test_max_pool2d_indices(args):
    torch.manual_seed(0)
    want = _equal(Fn(lambda x: F.max_pool2d(x, return_indices=True, **args)),
                  torch.randn(2, 3, 7, 8))
    assert want[1].max() > 0  # TVM's converter returned all zeros


def test_max_pool_indices_ties_nan_and_minus_inf():
    # ties -> the first in scan order; NaN is the maximum; a window of -inf still points
    # at one of its own taps
    inf = float("inf")
    x = torch.tensor([[[[1, 1, 2, 2], [1, 1, float("nan"), 2], [-inf] * 4, [-inf] * 4]]])
    _equal(Fn(lambda x: F.max_pool2d(x, 2, return_indices=True)), x)
    _equal(Fn(lambda x: F.max_pool2d(x, 3, 1, 1, return_indices=True)), x[0])  # [C, H, W]


def test_max_pool3d_indices():
    torch.manual_seed(0)
    _equal(Fn(lambda x: F.max_pool3d(x, 2, 1, 1, return_indices=True)),
           torch.randn(1, 2, 3, 4, 5))


def test_max_pool_values_only_keep_the_scheduled_pooling():
    torch.manual_seed(0)
    x = torch.randn(1, 4, 8, 8)
    cm = _compile(Fn(lambda x: F.max_pool2d(x, 2, return_indices=True)[0]), x)
    torch.testing.assert_close(cm(x), F.max_pool2d(x, 2))
