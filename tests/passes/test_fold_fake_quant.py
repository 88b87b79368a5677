"""fold-fake-quant: IR before/after, int8 storage, numerics against the fake-quant graph in
PyTorch and on TVM (integer kernels in the lowered TIR), and what it refuses, with reasons."""

import re

import pytest
import torch
from torch import nn

import graphc
from graphc.backends.tvm.schedules.isa import isa_of
from graphc.backends.tvm.target import resolve_target
from graphc.passes.fold_fake_quant import RULES, fold_fake_quant
from graphc.passes.quant_report import format_quant_report, measure_deployed
from graphc.rewrite import apply_rules
from graphc.verify import verify
from tests.single_thread import one_torch_thread  # noqa: F401  (autouse fixture)

PT, DYN = "graphc.fake_quant_per_tensor", "graphc.fake_quant_dynamic"


def _tiny():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(3, 2), nn.ReLU(), nn.Linear(2, 2))
    return graphc.trace(m, (torch.randn(4, 3),))


class ConvNet(nn.Module):
    """Padded, strided, grouped (depthwise) and 1x1 convs, then a linear: odd sizes."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 12, 3, padding=1)
        self.dw = nn.Conv2d(12, 12, 3, stride=2, padding=1, groups=12)
        self.pw = nn.Conv2d(12, 7, 1, bias=False)
        self.fc = nn.Linear(7 * 5 * 5, 13)

    def forward(self, x):
        x = torch.relu(self.dw(torch.relu(self.c1(x))))
        return self.fc(torch.relu(self.pw(x)).flatten(1))


def _convnet():
    torch.manual_seed(0)
    g = graphc.trace(ConvNet().eval(), (torch.randn(2, 3, 9, 9),))
    return g, [(torch.randn(2, 3, 9, 9),) for _ in range(4)]


def _max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b).abs().max() / b.abs().max()).detach())


def test_printed_ir_before_and_after():
    q = graphc.quantize(_tiny())
    f = fold_fake_quant(q)
    verify(f, after="fold-fake-quant")
    lines = str(f).splitlines()
    assert lines[4:12] == [
        "  %input_1_act_scale: f32[] = param input_1_act_scale",
        "  %input_1_act_zp: i32[] = param input_1_act_zp",
        ("  %input_1_u8: u8[4, 3] = graphc.quantize(%input_1, %input_1_act_scale, "
        "%input_1_act_zp, 0, 255)"),
        "  %_0_weight_int8: i8[3, 2] = param _0_weight_int8",
        "  %_0_weight_int8_scale: f32[2] = param _0_weight_int8_scale",
        "  %_0_weight_int8_sum: i32[2] = param _0_weight_int8_sum",
        ("  %qaddmm: f32[4, 2] = graphc.qlinear(%input_1_u8, %input_1_act_scale, "
        "%input_1_act_zp, %_0_weight_int8, %_0_weight_int8_scale, %_0_weight_int8_sum, "
        "%_0_bias)"),
        "  %relu: f32[4, 2] = aten.relu(%qaddmm)",
    ]
    hist = f.op_histogram()
    assert hist["graphc.qlinear"] == 2 and hist[PT] == 0 and "aten.addmm" not in hist
    assert f.meta["fold-fake-quant"] == {"left": []}
    assert q.op_histogram()[PT] == 2 and "graphc.qlinear" not in q.op_histogram()  # untouched


def test_weights_are_stored_as_int8_on_their_grid():
    q = graphc.quantize(_convnet()[0], bits=4, calibration=_convnet()[1])
    f = fold_fake_quant(q)
    ints = {k: v for k, v in f.weights().items() if k.endswith("_int8")}
    assert len(ints) == 4 and all(v.dtype == torch.int8 for v in ints.values())
    assert all(int(v.abs().max()) <= 7 for v in ints.values())  # int4 values, int8 storage
    assert not any(v.dtype == torch.float32 and v.dim() >= 2 for v in f.weights().values())
    assert f.stats()["param_bytes"] < 0.3 * q.stats()["param_bytes"]


@pytest.mark.parametrize("options", [{}, {"per_channel": False}, {"bits": 4},
                                     {"act_symmetric": True}])
def test_convnet_folded_equals_fake_quant_in_pytorch(options):
    g, batches = _convnet()
    q = graphc.quantize(g, calibration=batches, **options)
    f = fold_fake_quant(q)
    hist = f.op_histogram()
    assert hist["graphc.qconv2d"] == 3 and hist["graphc.qlinear"] == 1
    assert hist["aten.constant_pad_nd"] == 2  # padded with the zero point, not with 0
    for (x,) in batches:
        # integer accumulation is exact; only the final scaling rounds differently
        assert _max_rel(f(x)[0], q(x)[0]) < 1e-5


def test_dynamic_inputs_fold_and_quantize_once_per_input():
    torch.manual_seed(0)
    m = nn.ModuleDict({"a": nn.Linear(16, 5), "b": nn.Linear(16, 3)})

    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.m = m

        def forward(self, x):
            return self.m["a"](x), self.m["b"](x)

    g = graphc.trace(TwoHeads(), (torch.randn(6, 16),))
    q = graphc.quantize(g, activations="dynamic")
    f = fold_fake_quant(q)
    hist = f.op_histogram()
    assert hist["graphc.quantize_dynamic"] == 1 and hist["graphc.qlinear"] == 2
    x = torch.randn(6, 16) * 3
    for a, b in zip(f(x), q(x)):
        assert _max_rel(a, b) < 1e-5


def test_embedding_folds_to_int8_rows():
    torch.manual_seed(0)
    emb = nn.Embedding(50, 8)
    g = graphc.trace(emb, (torch.randint(0, 50, (3, 4)),))
    f = fold_fake_quant(graphc.quantize(g))
    assert f.op_histogram()["graphc.qembedding"] == 1
    idx = torch.randint(0, 50, (3, 4))
    assert torch.equal(f(idx)[0], graphc.quantize(g)(idx)[0])


@pytest.mark.parametrize("options, reason", [
    ({"symmetric": False}, "asymmetric weights"),
    ({"activations": "none"}, "weight-only"),
])
def test_refusals_keep_the_fake_quant_and_say_why(options, reason):
    q = graphc.quantize(_tiny(), **options)
    f = fold_fake_quant(q)
    assert f.op_histogram()["graphc.qlinear"] == 0
    assert f is q  # nothing folded: the input graph comes back
    _, misses = apply_rules(q, RULES)
    assert len(misses) == 2 and all(reason in m.reason for m in misses)


def test_dynamic_conv_input_is_left_with_its_reason():
    g, _batches = _convnet()
    f = fold_fake_quant(graphc.quantize(g, activations="dynamic"))
    hist = f.op_histogram()
    assert hist["graphc.qconv2d"] == 0 and hist["graphc.qlinear"] == 1 and hist[DYN] == 3
    assert all("dynamic input ranges on a convolution" in m for m in f.meta["fold-fake-quant"]
               ["left"])


# ---- on TVM -------------------------------------------------------------------------------

def test_tvm_runs_the_folded_convnet_in_integers(tmp_path):
    g, batches = _convnet()
    f = fold_fake_quant(graphc.quantize(g, calibration=batches))
    cm = graphc.compile(f, target="cpu", dump_ir=tmp_path)
    for (x,) in batches:
        assert _max_rel(cm(x), f(x)[0]) < 1e-5
    tir = next(tmp_path.glob("*-tir.py")).read_text()
    # the convolutions and the matmul read int8 / uint8 buffers and accumulate in int32
    assert '"int8"' in tir and '"uint8"' in tir
    assert 'T.Cast("int32"' in tir
    # every integer kernel is scheduled: the depthwise conv by the conv rule; the dense convs
    # as W @ cols matmuls (im2col for the 3x3 one) and the linear by the int8 dot-product rule
    marks = re.findall(r'"graphc.schedule": "([^"]*)"', tir)
    assert sum(m.startswith("conv2d") for m in marks) == 1
    dots = [m.split()[2] for m in marks if m.startswith("int8")]
    assert len(dots) == 3 and len(re.findall(r"\n    def im2col", tir)) == 1
    if isa_of(resolve_target("cpu").target).vnni:
        assert sorted(dots) == ["graphc_vnni_s8u8_int8_uint8"] * 2 + [
            "graphc_vnni_u8s8_uint8_int8"]


def test_tvm_runs_dynamic_linear_and_leftover_fake_quant():
    g, batches = _convnet()
    f = fold_fake_quant(graphc.quantize(g, activations="dynamic"))  # convs stay fake-quant
    cm = graphc.compile(f, target="cpu")
    for (x,) in batches:
        assert _max_rel(cm(x), f(x)[0]) < 1e-5


@pytest.mark.parametrize("options", [{}, {"per_channel": False, "act_symmetric": True}])
def test_tvm_emulates_unfolded_fake_quant_in_float(options):
    g, batches = _convnet()
    q = graphc.quantize(g, calibration=batches, **options)  # not folded: fake-quant ops
    cm = graphc.compile(q, target="cpu")
    for (x,) in batches:
        assert _max_rel(cm(x), q(x)[0]) < 1e-5


def test_report_measures_the_deployed_artifacts_and_latency():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 64)).eval()
    g = graphc.trace(m, (torch.randn(8, 256),))
    q = graphc.quantize(g, activations="dynamic")
    d = measure_deployed(g, fold_fake_quant(q), target="cpu", repeat=5)
    (fp32, int8), (t0, t1) = d["artifact_bytes"], d["latency_ms"]
    assert int8 < 0.5 * fp32  # 164k weights: int8 storage shows through the code's size
    assert t0 > 0 and t1 > 0
    text = format_quant_report(q.meta["quantize"], d)
    assert f"artifact {fp32:,} -> {int8:,} bytes" in text and "latency" in text


def test_dilated_qconv2d_reference_runs_in_pytorch():
    """PyTorch has no integer dilated conv on CPU: the reference computes the int8 sums in
    float64 (exact) and matches an int64 computation done by hand."""
    from graphc.ops_qint import qconv2d

    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (1, 3, 9, 9), generator=g).to(torch.uint8)
    w = torch.randint(-128, 128, (4, 3, 3, 3), generator=g).to(torch.int8)
    one, zero = torch.tensor(1.0), torch.tensor(0)
    got = qconv2d(x, one, zero, w, torch.ones(4), w.sum((1, 2, 3)).float(), None,
                  [1, 1], [2, 2], 1)
    cols = torch.stack([x[0, :, i:i + 5:2, j:j + 5:2].long()
                        for i in range(5) for j in range(5)])  # [25, 3, 3, 3]
    want = torch.einsum("pchw,ochw->op", cols, w.long()).reshape(1, 4, 5, 5)
    assert torch.equal(got, want.float())
