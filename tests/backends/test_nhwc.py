"""target "cpu+nhwc" (backends/tvm/nhwc.py): float convs run in NHWC with transposes only at
the model's edges; the outputs match PyTorch; a graph ConvertLayout cannot carry stays NCHW.
Plain "cpu" does so too ("auto"); "cpu+nchw" and target dicts never."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import graphc
from graphc.errors import GraphcError
from tests.backends.test_schedules_conv import compile_with_tir, conv_kernels


class InvertedResidual(nn.Module):
    """MobileNetV2's block on odd sizes: 1x1 expand, 3x3 depthwise, 1x1 project, residual."""

    def __init__(self, c=13, expand=3, stride=1):
        super().__init__()
        self.expand = nn.Conv2d(c, c * expand, 1)
        self.dw = nn.Conv2d(c * expand, c * expand, 3, stride, 1, groups=c * expand)
        self.project = nn.Conv2d(c * expand, c, 1)
        self.stride = stride

    def forward(self, x):
        y = self.project(F.relu6(self.dw(F.relu6(self.expand(x)))))
        return y + x if self.stride == 1 else y


class Dense(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(5, 8, 3, padding=1), nn.Conv2d(8, 8, 3, 2, groups=2)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def _transposes(funcs: dict[str, str]) -> list[str]:
    return [n for n in funcs if n.startswith("transpose") or "_transpose" in n]


@pytest.mark.parametrize("stride", [1, 2])
def test_block_runs_nhwc_with_edge_transposes_only(stride):
    torch.manual_seed(0)
    model = InvertedResidual(stride=stride).eval()
    x = torch.randn(1, 13, 11, 11)
    cm, ref, funcs = compile_with_tir(model, (x,), "cpu+nhwc")
    kernels = conv_kernels(funcs)
    assert len(kernels) == 3 and all("conv2d_nhwc" in t for t in kernels.values()), list(kernels)
    assert sum('"conv2d.nhwc_depthwise"' in t for t in kernels.values()) == 1
    assert len(_transposes(funcs)) == 2, _transposes(funcs)  # the input's and the output's
    got = cm(x)
    assert float((got - ref).abs().max()) < 1e-4 * float(ref.abs().max())


@pytest.mark.parametrize("model", ["InvertedResidual", "Dense"])
def test_default_cpu_target_runs_convs_in_nhwc(model):
    torch.manual_seed(0)
    model = {"InvertedResidual": InvertedResidual, "Dense": Dense}[model]().eval()
    x = torch.randn(1, 13 if isinstance(model, InvertedResidual) else 5, 11, 11)
    cm, ref, funcs = compile_with_tir(model, (x,), "cpu")
    assert all("conv2d_nhwc" in t for t in conv_kernels(funcs).values())
    assert len(_transposes(funcs)) == 2, _transposes(funcs)
    assert float((cm(x) - ref).abs().max()) < 1e-4 * float(ref.abs().max())


@pytest.mark.parametrize("model, target", [
    (InvertedResidual, "cpu+nchw"),
    (InvertedResidual, {"kind": "llvm", "mcpu": "znver3", "num-cores": 2}),
    (Dense, "x86+nchw"),
])
def test_nchw_kept(model, target):
    torch.manual_seed(0)
    x = torch.randn(1, 13 if model is InvertedResidual else 5, 11, 11)
    cm, ref, funcs = compile_with_tir(model().eval(), (x,), target)
    assert all("conv2d_nchw" in t for t in conv_kernels(funcs).values())
    assert not _transposes(funcs)
    assert float((cm(x) - ref).abs().max()) < 1e-4 * float(ref.abs().max())


class ChannelCumsum(nn.Module):
    """cumsum over channels between two convs: TVM's ConvertLayout has no layout rule for it."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(4, 8, 3, padding=1, groups=4)
        self.b = nn.Conv2d(8, 8, 3, padding=1, groups=8)

    def forward(self, x):
        return self.b(torch.cumsum(self.a(x), dim=1))


@pytest.mark.parametrize("target, level", [("cpu+nhwc", logging.WARNING), ("cpu", logging.INFO)])
def test_graph_that_would_need_more_transposes_stays_nchw(caplog, target, level):
    """Asked for ("+nhwc"), the fallback warns; chosen by the default policy, it only logs."""
    torch.manual_seed(0)
    model = ChannelCumsum().eval()
    x = torch.randn(1, 4, 9, 9)
    with caplog.at_level(logging.INFO, logger="graphc.backends.tvm.nhwc"):
        cm, ref, funcs = compile_with_tir(model, (x,), target)
    if all("conv2d_nhwc" in t for t in conv_kernels(funcs).values()):
        pytest.skip("this TVM's ConvertLayout carries cumsum: nothing to fall back from")
    assert [r.levelno for r in caplog.records if "the model stays NCHW" in r.message] == [level]
    assert all("conv2d_nchw" in t for t in conv_kernels(funcs).values())
    assert float((cm(x) - ref).abs().max()) < 1e-4 * float(ref.abs().max())


def test_unknown_option_is_refused():
    with pytest.raises(GraphcError, match=r"cpu\+nhwc"):
        graphc.compile(InvertedResidual().eval(), (torch.randn(1, 13, 5, 5),), target="cpu+nchw16c")
