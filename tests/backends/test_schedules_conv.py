"""The conv2d schedule rule (backends/tvm/schedules/conv.py, conv_nhwc.py) on odd shapes, for
an AVX-512 and an AVX2 target, with the graph in NCHW and converted to NHWC (nhwc.py): every
conv kernel is scheduled by the expected variant of the rule, and the compiled model matches
PyTorch."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from graphc.backends.tvm import build
from graphc.backends.tvm.schedules.isa import isa_of
from graphc.backends.tvm.target import resolve_target
from graphc.spec import TensorSpec
from tests.models.zoo import randomize_batchnorm

# this host, convs kept NCHW (the preset's default runs them in NHWC); an
# AVX-512 CPU (checked below), else the test says so
AVX512 = "cpu+nchw"
AVX2 = {"kind": "llvm", "mcpu": "znver3", "num-cores": 2}
TARGETS = {"avx512": AVX512, "avx2": AVX2}
# the graph converted to NHWC (backends/tvm/nhwc.py): AVX-512, and x86-64-v2's 4-lane SSE
# (+direct: the 3x3 stride-1 convs too, which the presets otherwise run as Winograd)
NHWC_TARGETS = {"avx512+nhwc": "cpu+nhwc+direct", "sse+nhwc": "x86+nhwc+direct"}


class ConvEpilogue(nn.Module):
    """One conv and the epilogues FuseOps fuses into its kernel."""

    def __init__(self, ic, oc, k, stride=1, pad=0, groups=1, dilation=1, bias=True,
                 epi=("bn", "relu")):
        super().__init__()
        self.conv = nn.Conv2d(ic, oc, k, stride, pad, dilation, groups, bias=bias)
        self.bn = nn.BatchNorm2d(oc)
        self.epi = epi

    def forward(self, x):
        y = self.conv(x)
        for e in self.epi:
            if e == "bn":
                y = self.bn(y)
            elif e == "relu":
                y = F.relu(y)
            elif e == "relu6":
                y = F.relu6(y)
            elif e == "residual":  # needs oc == ic and the same spatial size
                y = y + x
            elif e == "pad":  # the next layer's explicit padding (TF-style "same")
                y = F.pad(y, (0, 1, 0, 1))
        return y


# id -> (ic, oc, k, stride, pad, groups, dilation, input (n, h, w), epilogue, variant)
CASES = {
    "3x3_prime_channels_odd_hw": (5, 7, 3, 1, 1, 1, 1, (1, 11, 9), ("bn", "relu"), "channel_vector"),
    "3x3_stride2": (8, 13, 3, 2, 1, 1, 1, (1, 15, 15), ("bn", "relu6"), "channel_vector"),
    "3x3_64ch_residual": (64, 64, 3, 1, 1, 1, 1, (1, 14, 14), ("bn", "residual", "relu"),
                          "channel_vector"),
    "3x3_dilated_batch2": (6, 32, 3, 1, 2, 1, 2, (2, 10, 12), ("relu",), "channel_vector"),
    "7x7_stem_stride2": (3, 16, 7, 2, 3, 1, 1, (1, 23, 23), ("bn", "relu"), "channel_vector"),
    "5x5_prime_oc_over_64": (4, 97, 5, 1, 2, 1, 1, (1, 9, 9), (), "channel_vector"),
    "1x1_pointwise": (16, 24, 1, 1, 0, 1, 1, (1, 16, 16), ("bn", "relu6"), "pointwise"),
    "1x1_many_inputs": (72, 40, 1, 1, 0, 1, 1, (1, 7, 7), ("bn",), "channel_vector"),
    "1x1_stride2": (6, 10, 1, 2, 0, 1, 1, (1, 9, 9), ("bn",), "channel_vector"),
    "1x1_spatial_1x1": (32, 16, 1, 1, 0, 1, 1, (1, 1, 1), ("relu",), "channel_vector"),
    "3x3_on_1x1_input": (8, 24, 3, 1, 1, 1, 1, (1, 1, 1), ("relu",), "channel_vector"),
    "grouped": (8, 32, 3, 1, 1, 4, 1, (1, 9, 11), ("bn", "relu"), "channel_vector"),
    "depthwise": (12, 12, 3, 1, 1, 12, 1, (1, 10, 10), ("bn", "relu6"), "depthwise"),
    "depthwise_stride2_odd": (17, 17, 3, 2, 1, 17, 1, (1, 13, 13), ("bn", "relu6"),
                              "depthwise"),
    "depthwise_wide_row": (16, 16, 3, 1, 1, 16, 1, (1, 5, 37), ("relu",), "depthwise"),
    # MobileNetV2's stride-2 layers after TF "same" padding: whole row vectors (strided.py)
    "depthwise_stride2_mnv2": (24, 24, 3, 2, 0, 24, 1, (1, 33, 33), ("bn", "relu6"),
                               "depthwise"),
    # a row of 34 outputs: vectors with a predicated tail, so the plain strided loads
    "depthwise_stride2_tail": (8, 8, 3, 2, 0, 8, 1, (1, 5, 69), ("relu",), "depthwise"),
    "depthwise_multiplier2": (6, 12, 3, 1, 1, 6, 1, (1, 8, 8), ("relu",), "channel_vector"),
    "conv_then_pad_tail": (8, 16, 3, 1, 1, 1, 1, (1, 12, 12), ("bn", "relu6", "pad"),
                           "channel_vector"),
}


def compile_with_tir(model, inputs, target):
    """Build through the TVM backend, keeping the scheduled TIR as text."""
    ep = torch.export.export(model, inputs).run_decompositions()
    with torch.no_grad():
        out = model(*inputs)
    names = ep.graph_signature.user_inputs
    dumps = {}
    cm = build(ep, input_specs=[TensorSpec.of(n, t) for n, t in zip(names, inputs)],
               output_specs=[TensorSpec.of("out", out)], single_output=True, target=target,
               dump=lambda stage, text: dumps.__setitem__(stage, text))
    return cm, out, split_funcs(dumps["tir"])


def split_funcs(script: str) -> dict[str, str]:
    """TVMScript of a module -> {PrimFunc name: its text}."""
    parts = re.split(r"\n    @T\.prim_func[^\n]*\n    def ", script)
    return {p.split("(", 1)[0]: p for p in parts[1:]}


def conv_kernels(funcs: dict[str, str]) -> dict[str, str]:
    return {n: t for n, t in funcs.items() if re.search(r'T\.sblock\("(group_)?conv2d_n', t)}


def nhwc_variant(variant: str) -> str:
    return "nhwc_depthwise" if variant == "depthwise" else "nhwc_channel_vector"


@pytest.mark.parametrize("isa", [*TARGETS, *NHWC_TARGETS])
@pytest.mark.parametrize("case", list(CASES))
def test_conv_rule(case, isa):
    ic, oc, k, stride, pad, groups, dil, (n, h, w), epi, variant = CASES[case]
    if isa in NHWC_TARGETS:
        variant = nhwc_variant(variant)
    torch.manual_seed(0)
    model = randomize_batchnorm(ConvEpilogue(ic, oc, k, stride, pad, groups, dil, epi=epi))
    x = torch.randn(n, ic, h, w)
    cm, ref, funcs = compile_with_tir(model, (x,), {**TARGETS, **NHWC_TARGETS}[isa])
    kernels = conv_kernels(funcs)
    assert len(kernels) == 1, f"expected one conv kernel, got {list(kernels)}"
    (name, text), = kernels.items()
    assert '"tirx.is_scheduled": True' in text, f"{name} left unscheduled"
    assert f'"graphc.schedule": "conv2d.{variant}"' in text, f"{name}: not the {variant} rule"
    got = cm(x)
    err = float((got - ref).abs().max())
    assert got.shape == ref.shape and err < 1e-4 * max(1.0, float(ref.abs().max())), err


def test_the_targets_differ():
    """The two targets really exercise both tile tables (an AVX-512 host is assumed: this is
    the machine the tables were measured on)."""
    isa512 = isa_of(resolve_target(AVX512).target)
    isa2 = isa_of(resolve_target(AVX2).target)
    assert isa2.f32_lanes == 8 and not isa2.avx512
    if not isa512.avx512:
        pytest.skip("host CPU has no AVX-512: the 'cpu' target covers AVX2 only")
    assert isa512.f32_lanes == 16


def test_weights_are_packed_at_compile_time():
    """The channel-vector kernel reads a [OC/t, IC, KH, KW, t] weight that FoldConstant
    produced: no repacking kernel is left to run per call."""
    torch.manual_seed(0)
    model = ConvEpilogue(16, 64, 3, 1, 1, epi=("relu",)).eval()
    x = torch.randn(1, 16, 14, 14)
    cm, ref, funcs = compile_with_tir(model, (x,), AVX512)
    (text,) = conv_kernels(funcs).values()
    assert not [n for n in funcs if "weight_prepack" in n], "the repacking kernel survived"
    assert re.search(r"T\.Buffer\(\((T\.int64\(\d+\), ){4}T\.int64\(\d+\)\), \"float32\"\)", text)
    assert float((cm(x) - ref).abs().max()) < 1e-4


@pytest.mark.parametrize("isa", list(TARGETS))
def test_stride2_depthwise_reads_whole_vectors(isa):
    """A stride-2 depthwise row that divides into vectors reads its taps with two vector
    loads and a shuffle (strided.py); a row with a tail keeps the lane-by-lane loads."""
    torch.manual_seed(0)
    texts = {}
    for width in (33, 69):  # 16 outputs per row, then 34
        model = ConvEpilogue(8, 8, 3, 2, 0, 8, epi=("relu6",)).eval()
        x = torch.randn(1, 8, 5, width)
        cm, ref, funcs = compile_with_tir(model, (x,), TARGETS[isa])
        (texts[width],) = conv_kernels(funcs).values()
        assert float((cm(x) - ref).abs().max()) < 1e-5
    assert "T.Shuffle" in texts[33]
    assert "T.Shuffle" not in texts[69]
