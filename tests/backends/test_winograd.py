"""Winograd F(m x m, 3x3) for NHWC 3x3 stride-1 convs (backends/tvm/winograd.py): the transform
tables are exact, the rewrite replaces exactly the convs it should (IR before/after), the
compiled model matches PyTorch on odd shapes with a tolerance per tile size, the output
transform kernel carries the fused epilogue, and "+direct" keeps every conv direct."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from graphc.backends.tvm import winograd as W
from tests.backends.test_schedules_conv import compile_with_tir, conv_kernels
from tests.models.zoo import randomize_batchnorm

# max |out - ref| / max |ref| of the blocks below. Direct fp32 convs: 1.6e-7 - 4.3e-7.
# F(2x2)'s coefficients are +-1 and 1/2: 1.1e-7 - 2.8e-7 measured. F(4x4)'s +-5, 8 and 1/24
# cost about one digit: 6.4e-7 - 1.7e-6. Each bound is ~3x the worst measured error.
TOLERANCE = {2: 1e-6, 4: 5e-6}


@pytest.mark.parametrize("m", sorted(W.TRANSFORMS))
def test_transform_tables_compute_a_correlation(m):
    """y = A^T [(G g) * (B^T d)] is the 3-tap correlation of d (1-D), to float64 rounding."""
    bt, g, at = (np.asarray(t, np.float64) for t in W.TRANSFORMS[m])
    rng = np.random.default_rng(m)
    for _ in range(5):
        d, taps = rng.standard_normal(m + 2), rng.standard_normal(3)
        want = np.correlate(d, taps, mode="valid")
        np.testing.assert_allclose(at @ ((g @ taps) * (bt @ d)), want, rtol=0, atol=1e-12)


def test_weight_transform_shape_and_values():
    """U is [a*a, C, K] with U[xi*a + nu, c, k] = (G w[k, :, :, c] G^T)[xi, nu]."""
    w = np.random.default_rng(0).standard_normal((5, 3, 3, 7)).astype(np.float32)  # OHWI
    g = np.asarray(W.TRANSFORMS[2][1])
    u = W.weight_transform(w, 2)
    assert u.shape == (16, 7, 5) and u.dtype == np.float32
    np.testing.assert_allclose(u[1 * 4 + 2, 3, 4], (g @ w[4, :, :, 3] @ g.T)[1, 2], rtol=1e-6)


@pytest.mark.parametrize(("n", "oh", "ow", "c", "k", "want"), [
    (1, 56, 56, 64, 64, 4), (1, 14, 14, 256, 256, 4),  # 196 / 16 tiles of 4x4
    (1, 7, 7, 512, 512, 2),     # 4 tiles of 4x4 are too few; 16 of 2x2
    (4, 7, 7, 512, 512, 4),     # a batch of 4: 16 tiles of 4x4
    (1, 3, 3, 64, 64, None),    # 4 tiles of 2x2: direct
    (1, 56, 56, 8, 64, None),   # 8 input channels: direct
])
def test_choose_tile(n, oh, ow, c, k, want):
    assert W.choose_tile(n, oh, ow, c, k) == want


class Residual(nn.Module):
    """conv -> BN -> ReLU -> conv -> BN -> + x -> ReLU: ResNet's basic block (pad=0: the
    residual left out; a slice of x would keep the model NCHW, nhwc.py)."""

    def __init__(self, c, pad=1, bias=False):
        super().__init__()
        self.a, self.b = nn.Conv2d(c, c, 3, 1, pad, bias=bias), nn.Conv2d(c, c, 3, 1, pad)
        self.bn_a, self.bn_b = nn.BatchNorm2d(c), nn.BatchNorm2d(c)

    def forward(self, x):
        y = torch.relu(self.bn_a(self.a(x)))
        y = self.bn_b(self.b(y))
        return torch.relu(y + x if y.shape == x.shape else y)  # unpadded: no residual


def _kernels(funcs: dict[str, str]) -> dict[str, list[str]]:
    kinds = ("winograd_input", "winograd_matmul", "winograd_output")
    return {k: [n for n in funcs if k in n] for k in kinds}


def _rel_err(got, ref) -> float:
    return float((got - ref).abs().max() / ref.abs().max())


@pytest.mark.parametrize("m", [2, 4])
@pytest.mark.parametrize(("c", "hw", "batch", "pad"), [
    (17, (9, 11), 2, 1),   # a prime channel count (not a vector multiple), odd rows: partial tiles
    (32, (13, 13), 1, 0),  # no padding: the output shrinks by 2 each conv
    (64, (8, 8), 1, 1),    # whole tiles
])
def test_residual_block_matches_pytorch(monkeypatch, m, c, hw, batch, pad):
    monkeypatch.setattr(W, "TILES", (m,))
    monkeypatch.setattr(W, "MIN_TILES", 1)
    torch.manual_seed(0)
    model = randomize_batchnorm(Residual(c, pad))
    x = torch.randn(batch, c, *hw)
    cm, ref, funcs = compile_with_tir(model, (x,), "cpu")
    kernels = _kernels(funcs)
    # both convs rewritten (equal shapes share the input and matmul kernels), none left direct
    assert all(kernels.values()) and len(kernels["winograd_output"]) == 2, kernels
    assert conv_kernels(funcs) == {}
    # the epilogue (BN arithmetic, the residual add, ReLU) is fused into the output transform
    # and the winograd rule scheduled that kernel; the input transform is scheduled by itself
    outs = [funcs[n] for n in kernels["winograd_output"]]
    assert all('"winograd.output"' in t for t in outs)
    assert any("T.max" in t for t in outs) and all("T.parallel" in t for t in outs)
    assert all("T.vectorized" in funcs[n] for n in kernels["winograd_input"])
    assert _rel_err(cm(x), ref) < TOLERANCE[m]


def test_resnet_basic_block_sizes_pick_the_tiles():
    """Default policy on ResNet-18's layer1 shape: F(4x4); matches PyTorch."""
    torch.manual_seed(0)
    model = randomize_batchnorm(Residual(64))
    x = torch.randn(1, 64, 56, 56)
    cm, ref, funcs = compile_with_tir(model, (x,), "cpu")
    assert _kernels(funcs)["winograd_matmul"]
    assert any("T.Buffer((T.int64(36), T.int64(196), T.int64(64))" in t  # 6x6 patches, 14x14 tiles
               for n, t in funcs.items() if "winograd_input" in n)
    assert _rel_err(cm(x), ref) < TOLERANCE[4]


class Mixed(nn.Module):
    """Convs Winograd must leave alone: stride 2, dilation 2, groups 2, 5x5, 8 channels, and
    a weight that is an input, not a constant."""

    def __init__(self):
        super().__init__()
        self.s2 = nn.Conv2d(32, 32, 3, 2, 1)
        self.dil = nn.Conv2d(32, 32, 3, 1, 2, dilation=2)
        self.grp = nn.Conv2d(32, 32, 3, 1, 1, groups=2)
        self.k5 = nn.Conv2d(32, 32, 5, 1, 2)
        self.narrow = nn.Conv2d(32, 8, 3, 1, 1)

    def forward(self, x, w):
        y = self.k5(self.grp(self.dil(self.s2(x))))
        return self.narrow(F.conv2d(y, w, padding=1))


def test_convs_winograd_does_not_fit_stay_direct():
    torch.manual_seed(0)
    model = Mixed().eval()
    x, w = torch.randn(1, 32, 20, 20), torch.randn(32, 32, 3, 3) * 0.1
    cm, ref, funcs = compile_with_tir(model, (x, w), "cpu")
    assert all(v == [] for v in _kernels(funcs).values()), _kernels(funcs)
    assert len(conv_kernels(funcs)) == 6
    assert _rel_err(cm(x, w), ref) < 1e-5


def test_direct_option_keeps_3x3_convs_direct():
    torch.manual_seed(0)
    model = randomize_batchnorm(Residual(32))
    x = torch.randn(1, 32, 16, 16)
    cm, ref, funcs = compile_with_tir(model, (x,), "cpu+direct")
    assert all(v == [] for v in _kernels(funcs).values())
    assert len(conv_kernels(funcs)) == 2
    assert _rel_err(cm(x), ref) < 1e-6
