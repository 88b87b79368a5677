"""TVM lowering of elementwise and reduction ATen ops (lower_aten_math.py, legalize.py's full)
against PyTorch: bit shifts with out-of-range amounts, integer powers that wrap, products,
bitcasts, one-sided integer clamps, sinh/cosh at vector widths, empty split pieces, -inf fills."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import graphc
from graphc.errors import UnsupportedOpError
from tests.models.zoo import Fn


def _check(fn, *args, atol: float = 0.0, rtol: float = 0.0):
    cm = graphc.compile(Fn(fn), args, target="cpu")
    got, want = cm(*args), fn(*args)
    if isinstance(want, torch.Tensor):
        got, want = (got,), (want,)
    for g, w in zip(got, want, strict=True):
        assert g.dtype == w.dtype and g.shape == w.shape
        torch.testing.assert_close(g, w, atol=atol, rtol=rtol, equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.int8, torch.int32, torch.int64, torch.uint8])
def test_shifts_match_torch_out_of_range(dtype):
    bits = torch.iinfo(dtype).bits
    signed = torch.iinfo(dtype).min < 0
    x = torch.tensor([1, 5, 100, 3, 7, 1, 2, 9], dtype=dtype)
    if signed:
        x = x * torch.tensor([1, -1, 1, -1, 1, -1, 1, -1], dtype=dtype)
    # in range, the top bit (overflow), the width, past it, and negative amounts
    amounts = [0, 3, bits - 1, bits, bits + 3, 1, -1 if signed else 2, -7 if signed else 4]
    y = torch.tensor(amounts, dtype=dtype)
    _check(lambda a, b: (a << b, a >> b), x, y)
    _check(lambda a, b: (a << b, a >> b), x.reshape(2, 4), y[:4])  # broadcast


@pytest.mark.parametrize("dtype", [torch.int8, torch.int32, torch.int64, torch.uint8])
def test_integer_pow_wraps_like_torch(dtype):
    signed = torch.iinfo(dtype).min < 0
    x = torch.tensor([2, 3, 5, 1, 0, 7, 3, 2], dtype=dtype)
    y = torch.tensor([3, 5, 40, 9, 0, 13, 1, 63], dtype=dtype)
    if signed:
        x = x * torch.tensor([1, -1, 1, -1, 1, -1, -1, 1], dtype=dtype)
        x2 = torch.tensor([1, -1, -1, 2, 0, -3], dtype=dtype)
        y2 = torch.tensor([-3, -3, -4, -1, -2, -5], dtype=dtype)  # PyTorch's 1, -1, 1, 0, ...
        _check(torch.pow, x2, y2)
    _check(torch.pow, x, y)
    _check(lambda a: a ** 3, x)


def test_prod_dims_dtypes_and_empty():
    x = torch.tensor([[1.5, -2.0, 3.0], [0.5, 4.0, -1.0]])
    _check(lambda a: torch.prod(a, 1, keepdim=True), x, rtol=1e-6)
    _check(lambda a: torch.prod(a, -2), x, rtol=1e-6)
    _check(torch.prod, x, rtol=1e-6)
    _check(lambda a: torch.prod(a, 0), torch.tensor([[3, -2], [100000, 70000]], dtype=torch.int32))
    _check(lambda a: torch.prod(a, 1), torch.zeros(2, 0))  # empty product: 1


def test_bitcast_reinterprets_bits():
    f = torch.tensor([[1.0, -0.0, float("inf"), 3.5e-40]])
    _check(lambda a: a.view(torch.int32), f)
    _check(lambda a: a.view(torch.float64), torch.tensor([1, -1, 2**62], dtype=torch.int64))
    _check(lambda a: a.view(torch.uint8), torch.tensor([-1, 0, 127, -128], dtype=torch.int8))
    _check(lambda a: a.view(torch.uint8), torch.tensor([True, False, True]))


def test_bitcast_to_other_size_or_bool_is_refused():
    with pytest.raises(UnsupportedOpError, match="element size"):
        graphc.compile(Fn(lambda a: a.view(torch.int16)), (torch.zeros(4),), target="cpu")
    with pytest.raises(UnsupportedOpError, match="bool"):
        graphc.compile(Fn(lambda a: a.view(torch.bool)), (torch.zeros(4, dtype=torch.uint8),),
                       target="cpu")


def test_one_sided_integer_clamp():
    x = torch.tensor([-128, -5, 0, 7, 127], dtype=torch.int8)
    bound = torch.tensor([-3, -3, 2, 2, 100], dtype=torch.int8)
    _check(lambda a, b: torch.clamp(a, max=b), x, bound)
    _check(lambda a, b: torch.clamp(a, min=b), x, bound)
    _check(lambda a: torch.clamp(a, min=-4), x)


@pytest.mark.parametrize("n", [3, 16, 17])  # 16: a full vector, where TVM had no rule
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sinh_cosh_vectorized_and_near_zero(n, dtype):
    x = torch.linspace(-3.0, 3.0, n, dtype=dtype)
    tiny = torch.tensor([1e-30, -1e-8, 0.4999, 0.5, -0.5001, 1e-3, 80.0, -80.0] * 2,
                        dtype=dtype)[:n]
    x = torch.cat([x, tiny, torch.tensor([float("inf"), float("nan")], dtype=dtype)])
    eps = torch.finfo(dtype).eps
    _check(lambda a: (torch.sinh(a), torch.cosh(a)), x, rtol=8 * eps, atol=0.0)


def test_sinh_cosh_finite_next_to_float32_overflow():
    # sinh(89) = 2.2e38 < float32 max although exp(89) overflows: PyTorch's own vectorized
    # kernel returns inf there (its scalar one does not), so the reference is math.sinh
    import math

    x = torch.tensor([89.0, -89.0, 89.4, 89.5] * 4)
    cm = graphc.compile(Fn(lambda a: (torch.sinh(a), torch.cosh(a))), (x,), target="cpu")
    sinh, cosh = cm(x)
    for fn, got in ((math.sinh, sinh), (math.cosh, cosh)):
        want = [fn(v) if abs(v) < 89.45 else math.copysign(math.inf, fn(v)) for v in x.tolist()]
        torch.testing.assert_close(got, torch.tensor(want), rtol=1e-6, atol=0.0)


def test_split_with_empty_pieces():
    x = torch.arange(12.0).reshape(3, 4)
    _check(lambda a: torch.split(a, [0, 3, 0, 1], dim=1), x)
    _check(lambda a: torch.split(a, [2, 1], dim=0), x)


def test_full_with_inf_fill_compiles():
    x = torch.randn(2, 3)
    _check(lambda a: torch.maximum(a, torch.full((2, 3), float("-inf"))), x)
    _check(lambda a: a + torch.full((2, 3), float("nan")), x)


def test_max_min_reductions_keep_inf_and_nan():
    # a fully masked attention row: max of -inf must be -inf (TVM reduced from -3.4e38)
    x = torch.tensor([[float("-inf")] * 4, [1.0, float("nan"), 2.0, 3.0], [1.0, 2.0, 3.0, 4.0]])
    _check(lambda a: (a.amax(1), a.amin(1), a.amax(), a.amin((0, 1), keepdim=True)), x)
    _check(lambda a: (-a).amin(1, keepdim=True), x)
    _check(lambda a: (a.amax(0), a.amin(1)), torch.randn(33, 70))


def test_float_remainder_edge_cases():
    inf, nan = float("inf"), float("nan")
    x = torch.tensor([5.0, -5, 5, -5, inf, -inf, nan, 5, 0, -0.0, 7.5, -7.5, 3, 1e30])
    y = torch.tensor([inf, inf, -inf, -inf, 3, 3, 3, nan, 2, 2, 2, -2, 0, 7])
    _check(lambda a, b: (torch.remainder(a, b), torch.remainder(a, -3.0)), x, y)
    _check(torch.remainder, x.double(), y.double())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_log1p_accurate_near_zero(dtype):
    x = torch.tensor([-10.0, -1e-5, 1e-30, 1e-4, -0.9, 3.0, 1e30, -1, float("inf"),
                      float("nan"), 0.2499, -0.25, 0.5], dtype=dtype)
    x = torch.cat([x, torch.linspace(-0.99, 2.0, 97, dtype=dtype)])
    rtol = 2e-7 if dtype == torch.float32 else 5e-16
    _check(torch.log1p, x, rtol=rtol)
    _check(torch.nn.functional.softplus, x[torch.isfinite(x)], rtol=rtol)


def test_process_with_nan_max_reducers_exits_cleanly():
    """legalize.py registers its NaN-propagating max/min with TVM's rfactor. TVM's reducer
    registry is destroyed at exit, after the interpreter: a Python callback it held alone
    corrupted the heap there ("double free or corruption", exit by SIGABRT)."""
    code = ("import torch, graphc\n"
            "from tests.models.zoo import Fn\n"
            "x = torch.randn(4, 64)\n"
            "cm = graphc.compile(Fn(lambda t: t.amax(1)), (x,), target='cpu')\n"
            "assert torch.equal(cm(x), x.amax(1))\n")
    done = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True,
                          text=True, timeout=300, cwd=Path(__file__).resolve().parents[2])
    assert done.returncode == 0, done.stderr[-2000:]
