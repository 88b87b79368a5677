"""upsample with scale factors on TVM (backends/tvm/lower_aten_resize.py): PyTorch's pixel
mapping (1/scale) where it differs from TVM's size ratio, against PyTorch (fp32, max abs
error < 1e-5: the same two-tap interpolation), and the refusals."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import graphc
from graphc.errors import UnsupportedOpError


class Interp(nn.Module):
    def __init__(self, **kw):
        super().__init__()
        self.kw = kw

    def forward(self, x):
        return F.interpolate(x, **self.kw)


def run(x, **kw):
    model = Interp(**kw).eval()
    cm = graphc.compile(model, (x,), target="cpu")
    return cm(x), model(x)


@pytest.mark.parametrize("kw", [
    {"scale_factor": 0.6, "mode": "bilinear"},                # ONNX downsample_scales_linear
    {"scale_factor": (0.6, 1.7), "mode": "bilinear"},
    {"scale_factor": 2.5, "mode": "bilinear"},
    {"scale_factor": 0.6, "mode": "nearest"},
    {"scale_factor": (1.7, 0.45), "mode": "nearest"},
    {"scale_factor": 2.0, "mode": "bilinear"},                 # whole ratio: TVM's own rule
    {"size": (5, 7), "mode": "bilinear"},
    {"scale_factor": 0.6, "mode": "bilinear", "align_corners": True},
    {"scale_factor": 0.6, "mode": "bicubic"},  # torch.export decomposes it into index math
])
def test_upsample_matches_pytorch(kw):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 9, 11)
    got, want = run(x, **kw)
    assert got.shape == want.shape
    assert float((got - want).abs().max()) < 1e-5


def test_onnx_downsample_scales_linear_case():
    x = torch.arange(1, 9, dtype=torch.float32).reshape(1, 1, 2, 4)
    got, want = run(x, scale_factor=0.6, mode="bilinear")
    # ONNX's expected output for this case: [[[[2.6666665, 4.3333331]]]]
    torch.testing.assert_close(got, torch.tensor([[[[2.6666665, 4.3333331]]]]))
    torch.testing.assert_close(got, want)


def test_antialiased_downscaling_is_refused():
    x = torch.randn(1, 2, 9, 11)
    with pytest.raises(UnsupportedOpError, match="downscales with antialias=True"):
        run(x, scale_factor=0.5, mode="bilinear", antialias=True)


def test_antialiased_upscaling_keeps_tvms_rule():
    x = torch.randn(1, 2, 5, 6)
    got, want = run(x, scale_factor=2.0, mode="bilinear", antialias=True)
    assert float((got - want).abs().max()) < 1e-5
