"""quantize: IR before/after, each scheme's ops and grids, numerics, selection, bad options."""

import pytest
import torch
from torch import nn

import graphc
from graphc.errors import PassError
from graphc.ops_quant import FAKE_QUANT_OPS
from graphc.passes.quant_mixed import relative_error, sqnr_db
from graphc.passes.quant_report import format_quant_report
from graphc.verify import verify
from tests.models.zoo import build
from tests.single_thread import one_torch_thread  # noqa: F401  (autouse fixture)

FQ = torch.ops.graphc
PT, PC, DYN = "graphc.fake_quant_per_tensor", "graphc.fake_quant_per_channel", \
    "graphc.fake_quant_dynamic"


def _tiny():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(3, 2), nn.ReLU(), nn.Linear(2, 2))
    return graphc.trace(m, (torch.randn(4, 3),))


def _mlp(n_batches=6):
    m, x = build("mlp")
    g = graphc.trace(m, x)
    return g, [(torch.randn(4, 20),) for _ in range(n_batches)]


def test_printed_ir_before_and_after():
    g = _tiny()
    assert "%addmm: f32[4, 2] = aten.addmm(%_0_bias, %input_1, %permute)" in str(g)
    q = graphc.quantize(g)
    verify(q, after="quantize")
    assert str(q).splitlines()[6:17] == [
        "  %input_1_act_scale: f32[] = param input_1_act_scale",
        "  %input_1_act_zp: i32[] = param input_1_act_zp",
        ("  %input_1_q: f32[4, 3] = graphc.fake_quant_per_tensor(%input_1, %input_1_act_scale, "
         "%input_1_act_zp, 0, 255)"),
        "  %permute: f32[3, 2] = aten.permute(%_0_weight, [1, 0])",
        "  %_0_weight_scale: f32[2] = param 0_weight_scale",
        "  %_0_weight_zp: i32[2] = param 0_weight_zp",
        ("  %_0_weight_q: f32[3, 2] = graphc.fake_quant_per_channel(%permute, %_0_weight_scale, "
         "%_0_weight_zp, 1, -127, 127)"),
        "  %addmm: f32[4, 2] = aten.addmm(%_0_bias, %input_1_q, %_0_weight_q)",
        "  %relu: f32[4, 2] = aten.relu(%addmm)",
        "  %relu_act_scale: f32[] = param relu_act_scale",
        "  %relu_act_zp: i32[] = param relu_act_zp",
    ]
    assert "%addmm_1: f32[4, 2] = aten.addmm(%_2_bias, %relu_q, %_2_weight_q)" in str(q)
    assert g.op_histogram()[PT] == 0  # the input graph is untouched


# options -> (per-tensor, per-channel, dynamic) op counts on the MLP's 3 linears, and the
# (qmin, qmax) grids of the weight and input fake-quants
SCHEMES = [
    ({}, (3, 3, 0), (-127, 127), (0, 255)),
    ({"per_channel": False}, (6, 0, 0), (-127, 127), (0, 255)),
    ({"bits": 4}, (3, 3, 0), (-7, 7), (0, 255)),
    ({"symmetric": False}, (3, 3, 0), (0, 255), (0, 255)),
    ({"act_symmetric": True}, (3, 3, 0), (-127, 127), (-127, 127)),
    ({"activations": "dynamic"}, (0, 3, 3), (-127, 127), (0, 255)),
    ({"activations": "none"}, (0, 3, 0), (-127, 127), None),
]


@pytest.mark.parametrize("options, counts, w_grid, a_grid", SCHEMES)
def test_each_scheme_inserts_its_ops_and_grids(options, counts, w_grid, a_grid):
    g, batches = _mlp()
    q = graphc.quantize(g, calibration=batches, **options)
    verify(q, after="quantize")
    hist = q.op_histogram()
    assert (hist[PT], hist[PC], hist[DYN]) == counts
    for lin in (n for n in q.gm.graph.nodes if n.target is torch.ops.aten.addmm.default):
        w, x = lin.args[2], lin.args[1]
        assert tuple(w.args[-2:]) == w_grid
        if a_grid:
            assert tuple(x.args[-2:]) == a_grid
        else:
            assert x.target not in FAKE_QUANT_OPS
        if options.get("symmetric", True):
            assert (q.weight(w.args[2]) == 0).all()  # symmetric: zero point 0


def _weight_error_bound(q):
    """Every weight fake-quant: |fq(w) - w| <= scale / 2 per element (min-max covers w)."""
    nodes = [n for n in q.gm.graph.nodes if n.target in FAKE_QUANT_OPS]
    assert len(nodes) == 3  # weight-only: one per linear
    for n in nodes:
        w = q.weight(n.args[0].args[0]).detach().T  # permute(w, [1, 0])
        scale = q.weight(n.args[1]).detach()
        args = (w, scale, q.weight(n.args[2]), *n.args[3:])
        err = (n.target(*args) - w).abs()
        bound = scale / 2 if scale.dim() == 0 else (scale / 2).reshape(
            [-1 if d == n.args[3] else 1 for d in range(w.dim())])
        assert (err <= bound * (1 + 1e-5)).all()


@pytest.mark.parametrize("options", [{}, {"per_channel": False}, {"symmetric": False},
                                     {"bits": 4}])
def test_weight_error_is_at_most_half_a_step(options):
    g, batches = _mlp()
    _weight_error_bound(graphc.quantize(g, calibration=batches, activations="none", **options))


def test_output_sqnr_per_scheme():
    """Measured on the MLP (3 linears) over 6 random batches; stated in the docs."""
    g, batches = _mlp()
    ref = [g(*b) for b in batches]

    def sqnr(**kw):
        q = graphc.quantize(g, calibration=batches, **kw)
        db = sqnr_db(relative_error(q, batches, ref))
        assert db == pytest.approx(q.meta["quantize"]["sqnr_db"], abs=1e-9)  # report agrees
        return db

    w8, w4 = sqnr(activations="none"), sqnr(activations="none", bits=4)
    w8a8 = sqnr()
    print(f"MLP SQNR: int8 weights {w8:.1f} dB, int4 weights {w4:.1f} dB, "
          f"int8 weights + uint8 inputs {w8a8:.1f} dB")
    # rounding noise ~ step^2: int8's step is 7/127 of int4's, 25.2 dB less noise
    assert 22.0 < w8 - w4 < 28.0
    assert w8a8 > 38.0 and w8a8 < w8  # the inputs' rounding adds noise


def test_layer_selection_by_class_pattern_and_exclusion():
    m, x = build("encoder_block")
    g = graphc.trace(m, x)
    q = graphc.quantize(g)
    assert q.op_histogram()[PC] == 4  # qkv, proj, ff1, ff2
    bmm = next(n for n in q.gm.graph.nodes if n.name == "bmm")
    assert all(a.target is FQ.fake_quant_per_tensor.default for a in bmm.args)  # q and k
    only_linear = graphc.quantize(g, ops=("linear",), exclude=("ff*",))
    layers = [r["layer"] for r in only_linear.meta["quantize"]["layers"]]
    assert layers == ["addmm", "addmm_1"]  # ff1 / ff2 excluded by weight name
    assert [r["layer"] for r in graphc.quantize(g, include=("bmm_1", "addmm_3"))
            .meta["quantize"]["layers"]] == ["bmm_1", "addmm_3"]


def test_shared_input_is_quantized_once():
    m, x = build("conv_bn_residual")
    g = graphc.run_pipeline(graphc.trace(m, x), "fold-batchnorm")[0]
    q = graphc.quantize(g, ops=("conv",))
    relu_q = [n for n in q.gm.graph.nodes if n.name == "relu_2_q"]
    assert len(relu_q) == 1 and len(relu_q[0].users) == 2  # conv down + conv b2


def test_pipeline_string_and_calibration_from_graph_meta():
    g, batches = _mlp()
    g.meta["calibration"] = batches
    out, records = graphc.run_pipeline(g, "quantize(bits=4, exclude=['fc3*'], observer=mse)",
                                       check=True)  # verifies the IR and that g is untouched
    direct = graphc.quantize(g, calibration=batches, bits=4, exclude=("fc3*",),
                             observer="mse")
    assert str(out) == str(direct)
    assert records[-1].changed and out.op_histogram()[PC] == 2
    assert graphc.quantize(g, ops=("matmul",)) is g  # nothing selected: unchanged


def test_runs_through_torch_export_and_the_torch_backend():
    g, batches = _mlp()
    q = graphc.quantize(g, calibration=batches)
    cm = graphc.compile(q, target="torch")
    x = batches[0][0]
    torch.testing.assert_close(cm(x), q(x)[0], rtol=0, atol=0)


def test_report_counts_bytes_as_if_stored_in_bits():
    g, batches = _mlp()
    meta = graphc.quantize(g, calibration=batches)
    rep = meta.meta["quantize"]
    w = {k: v.numel() for k, v in g.weights().items()}
    weights = w["fc1_weight"] + w["fc2_weight"] + w["fc3_weight"]
    biases = w["fc1_bias"] + w["fc2_bias"] + w["fc3_bias"]
    assert rep["weight_bytes_fp32"] == 4 * (weights + biases)
    # int8 weights + one float32 scale per output channel (= bias count) + float32 biases
    assert rep["weight_bytes_quantized"] == weights + 4 * biases + 4 * biases
    row = rep["layers"][0]
    assert (row["layer"], row["class"], row["weight"], row["activation"], row["bits"]) == \
        ("addmm", "linear", "int8 sym per-ch", "uint8 asym static", 8)
    text = format_quant_report(rep)
    assert "addmm (fc1_weight)" in text and "fold-fake-quant" in text


class _BmmWeight(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(2, 3, 4))

    def forward(self, x):
        return torch.bmm(x, self.w)


@pytest.mark.parametrize("options, message", [
    ({"bits": 3}, "pass 'quantize': bits=3 is not supported for weights; choose one of [4, 8]"),
    ({"act_bits": 4}, "act_bits=4 is not supported for activations; choose one of [8]"),
    ({"observer": "kl"}, "observer='kl' is not supported; choose from ['entropy', "),
    ({"weight_observer": "entropy"}, ("weight_observer='entropy' is not supported; choose "
                                     "from ['minmax', 'mse']")),
    ({"activations": "sometimes"}, ("activations='sometimes' is not supported; choose from "
                                   "['static', 'dynamic', 'none']")),
    ({"ops": ("attention",)}, "names unknown op classes ['attention']; choose from"),
    ({"max_error": -0.1}, "max_error=-0.1 must be >= 0"),
])
def test_bad_options_fail_naming_pass_and_option(options, message):
    g, _ = _mlp()
    with pytest.raises(PassError, match=message.replace("[", r"\[").replace("]", r"\]")):
        graphc.quantize(g, **options)


def test_per_channel_on_an_op_without_a_channel_axis_fails_clearly():
    g = graphc.trace(_BmmWeight(), (torch.randn(2, 5, 3),))
    with pytest.raises(PassError, match=r"per_channel=True, but %bmm \(aten.bmm\) has no "
                                        r"single output-channel axis .* exclude=\['bmm'\]"):
        graphc.quantize(g)
    q = graphc.quantize(g, per_channel=False)  # the suggested fix works
    assert q.op_histogram()[PT] == 2


def test_transposed_conv_channels_and_grouped_refusal():
    m = nn.Sequential(nn.ConvTranspose2d(3, 4, 2), nn.ReLU())
    g = graphc.trace(m, (torch.randn(1, 3, 5, 5),))
    q = graphc.quantize(g, activations="none")
    fq = next(n for n in q.gm.graph.nodes if n.target is FQ.fake_quant_per_channel.default)
    w, scale = m[0].weight.detach(), q.weight(fq.args[1])
    assert fq.args[3] == 1 and scale.shape == (4,)  # w: [in, out, kh, kw]
    torch.testing.assert_close(scale, w.abs().amax(dim=(0, 2, 3)) / 127)
    grouped = graphc.trace(nn.ConvTranspose2d(4, 4, 2, groups=2), (torch.randn(1, 4, 5, 5),))
    with pytest.raises(PassError, match=r"%convolution \(aten.convolution\) has no single "):
        graphc.quantize(grouped)
    assert graphc.quantize(grouped, per_channel=False).op_histogram()[PT] == 2


class _Embed(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.fc = nn.Embedding(10, 6), nn.Linear(6, 3)

    def forward(self, ids):
        return self.fc(self.emb(ids))


def test_embedding_is_weight_only_per_row():
    m = _Embed()
    g = graphc.trace(m, (torch.tensor([[1, 2, 9], [0, 0, 5]]),))
    q = graphc.quantize(g)
    emb = next(n for n in q.gm.graph.nodes if n.target is torch.ops.aten.embedding.default)
    fq, ids = emb.args[0], emb.args[1]
    assert fq.target is FQ.fake_quant_per_channel.default and fq.args[3] == 0
    assert ids.op == "placeholder"  # indices are not quantized
    w, scale = m.emb.weight.detach(), q.weight(fq.args[1])
    torch.testing.assert_close(scale, w.abs().amax(dim=1) / 127)
    row = q.meta["quantize"]["layers"][0]
    assert (row["class"], row["activation"]) == ("embedding", "-")
    assert graphc.quantize(g, ops=("linear",)).op_histogram()[PC] == 1


def test_quantizing_twice_changes_nothing():
    g, batches = _mlp()
    q = graphc.quantize(g, calibration=batches)
    assert graphc.quantize(q, calibration=batches) is q


def test_pipeline_rejects_a_bad_activation_mode():
    g, _ = _mlp()
    with pytest.raises(PassError, match=r"activations='sometimes' must be one of \['static', "):
        graphc.run_pipeline(g, "quantize(activations=sometimes)")
