"""pad_into_conv (backends/tvm/pad_into_conv.py) and the depthwise rule's per-channel pad:
the Relax before/after, numerics against PyTorch (fp32, max error relative to the output's
range < 1e-5: the same products summed in the same order, measured ~1e-7), and pads that
must not fold."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from tvm import relax

import graphc
from graphc.backends.tvm.pad_into_conv import pad_into_conv

TOL = 1e-5


def relax_module(pad_width, pad_value=0.0, groups=4):
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType([1, 4, 9, 9], "float32"))
    w = relax.Var("w", relax.TensorType([4, 4 // groups, 3, 3], "float32"))
    with bb.function("main", [x, w]):
        with bb.dataflow():
            p = bb.emit(relax.op.nn.pad(x, pad_width, "constant", pad_value))
            y = bb.emit_output(relax.op.nn.conv2d(p, w, strides=2, padding=(1, 0, 0, 1),
                                                  groups=groups))
        bb.emit_func_output(y)
    return bb.get()


def calls(mod) -> list[str]:
    return re.findall(r"R\.nn\.(\w+)\(", mod.script())


def test_relax_zero_pad_becomes_the_convs_padding():
    before = relax_module([0, 0, 0, 0, 0, 1, 2, 1])
    after = relax.transform.DeadCodeElimination()(pad_into_conv(before))
    assert calls(before) == ["pad", "conv2d"]
    assert calls(after) == ["conv2d"]
    # (top, left, bottom, right): its own (1, 0, 0, 1) plus the pad's (0, 2, 1, 1)
    assert "padding=[1, 2, 1, 2]" in after.script()


@pytest.mark.parametrize("pad_width, value", [
    ([0, 0, 0, 0, 0, 1, 0, 1], 1.0),      # a non-zero fill is not a conv's padding
    ([0, 0, 1, 0, 0, 1, 0, 1], 0.0),      # a pad of the channel axis changes the shape
])
def test_relax_pads_that_are_not_conv_padding_stay(pad_width, value):
    if pad_width[2]:  # 5 input channels: a dense conv over them
        mod = _dense_after_channel_pad(pad_width)
    else:
        mod = relax_module(pad_width, value)
    assert calls(pad_into_conv(mod)) == ["pad", "conv2d"]


def _dense_after_channel_pad(pad_width):
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType([1, 4, 9, 9], "float32"))
    w = relax.Var("w", relax.TensorType([4, 5, 3, 3], "float32"))
    with bb.function("main", [x, w]):
        with bb.dataflow():
            p = bb.emit(relax.op.nn.pad(x, pad_width, "constant", 0.0))
            y = bb.emit_output(relax.op.nn.conv2d(p, w))
        bb.emit_func_output(y)
    return bb.get()


class PadThenConv(nn.Module):
    """1x1 conv + ReLU6, an explicit pad, then a (depthwise or dense) conv: MobileNetV2's
    expansion -> TF "SAME" pad -> depthwise pattern."""

    def __init__(self, cin, c, pad, stride, k, value=0.0, depthwise=True):
        super().__init__()
        self.expand = nn.Conv2d(cin, c, 1)
        self.conv = nn.Conv2d(c, c, k, stride, groups=c if depthwise else 1)
        self.pad, self.value = pad, value

    def forward(self, x):
        return self.conv(F.pad(F.relu6(self.expand(x)), self.pad, value=self.value))


CASES = {  # cin, channels, size, pad (left, right, top, bottom), stride, kernel, fill, depthwise
    "mobilenet_stride2": (16, 96, 28, [0, 1, 0, 1], 2, 3, 0.0, True),
    "symmetric_stride1": (8, 24, 13, [1, 1, 1, 1], 1, 3, 0.0, True),
    "odd_pads_5x5": (4, 7, 17, [2, 0, 1, 3], 2, 5, 0.0, True),
    "dense": (3, 16, 15, [0, 1, 0, 1], 2, 3, 0.0, False),
    "nonzero_fill": (4, 8, 11, [1, 1, 1, 1], 1, 3, 0.5, True),
}


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("case", CASES)
def test_padded_convs_match_pytorch(case, layout, tmp_path):
    cin, c, hw, pad, stride, k, value, depthwise = CASES[case]
    torch.manual_seed(0)
    model = PadThenConv(cin, c, pad, stride, k, value, depthwise).eval()
    x = torch.randn(1, cin, hw, hw)
    cm = graphc.compile(model, (x,), target=f"cpu+{layout}", dump_ir=tmp_path)
    want = model(x).detach()
    err = float((cm(x) - want).abs().max() / want.abs().max())
    assert err < TOL, err
    tir = next(tmp_path.glob("*-tir.py")).read_text()
    kernels_with_pad = [n for n in re.findall(r"def (\w+)\(", tir) if "pad" in n]
    folded = value == 0.0
    assert bool(kernels_with_pad) != folded, kernels_with_pad  # a pad kernel or tail is left
    if folded and depthwise and layout == "nchw":
        assert _pad_inside_channel_loop(tir)


def _pad_inside_channel_loop(tir: str) -> bool:
    """In the depthwise kernel, one top-level loop (the channels) holds both the padded
    copy and the conv; before, the copy was a loop nest of its own, ahead of the conv's."""
    kernel = next(f for f in tir.split("def ")[1:] if 'T.sblock("group_conv2d_nchw_update' in f)
    lines = kernel.splitlines()
    top = [i for i, line in enumerate(lines) if re.match(r" {8}for ", line)]
    pad = next(i for i, line in enumerate(lines) if 'T.sblock("pad_temp")' in line)
    conv = next(i for i, line in enumerate(lines) if "group_conv2d_nchw_update" in line)
    return len(top) == 1 and top[0] < pad < conv


def test_pads_no_longer_fuse_into_the_producer(tmp_path):
    """Before: the 1x1 conv's kernel wrote its output, then a padded copy ("..._pad" tail)."""
    torch.manual_seed(0)
    cin, c, _, pad, stride, k, _, _ = CASES["mobilenet_stride2"]
    model = PadThenConv(cin, c, pad, stride, k).eval()
    x = torch.randn(1, 16, 28, 28)
    graphc.compile(model, (x,), target="cpu", dump_ir=tmp_path)
    tir = next(tmp_path.glob("*-tir.py")).read_text()
    names = re.findall(r"def (\w+)\(", tir)
    assert [n for n in names if "conv2d" in n] and not [n for n in names if "pad" in n], names
