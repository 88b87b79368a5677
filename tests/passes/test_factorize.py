"""factorize: IR before/after, exact full-rank numerics, truncation error against theory,
each rank selection mode, skipped layers, bad options, fine-tuning the factors."""

import pytest
import torch

import graphc
from graphc.distill_taps import tap_graph
from graphc.errors import PassError
from graphc.passes.factor_methods import Shape, Stats, cp_family
from graphc.passes.factor_report import format_factor_report
from graphc.passes.factorize import factorize
from graphc.verify import verify
from tests.models.zoo import build
from tests.single_thread import one_torch_thread  # noqa: F401  (autouse fixture)


@pytest.fixture
def mlp():
    m, x = build("mlp")
    g = graphc.trace(m, x)
    return m, g, [(torch.randn(4, 20),) for _ in range(16)]  # 64 rows: C is full rank


@pytest.fixture(scope="module")
def cnn():
    torch.manual_seed(0)
    m, x = build("conv_bn_residual")
    g = graphc.run_pipeline(graphc.trace(m, x), "fold-batchnorm")[0]
    return g, [(torch.randn(2, 3, 16, 16),) for _ in range(4)]


def _layer_io(g, node, batches):
    """(inputs, outputs) of one node over the batches, as rows."""
    xname = next(n for n in g.gm.graph.nodes if n.name == node).args[1].name
    gm = tap_graph(g, [xname, node], "test")
    outs = [gm(*b)[1:] for b in batches]
    return torch.cat([o[0] for o in outs]).double(), torch.cat([o[1] for o in outs]).double()


def test_printed_ir_and_op_counts_before_and_after(mlp):
    _, g, cal = mlp
    before = str(g)
    f = factorize(g, rank=8, include=["fc1*"], calibration=cal)
    verify(f, after="factorize")
    assert str(g) == before  # the input graph is untouched
    assert g.op_histogram() == {"aten.permute": 3, "aten.addmm": 3, "aten.relu": 1,
                                "aten.tanh": 1}
    assert f.op_histogram() == {"aten.permute": 4, "aten.addmm": 3, "aten.mm": 1,
                                "aten.relu": 1, "aten.tanh": 1}
    lines = str(f).splitlines()
    assert lines[1] == "  # 10 ops, 2981 params (11924 bytes)"  # 1280 -> 8 x (20 + 64)
    assert [ln for ln in lines if ln.startswith(("  %fc1_weight", "  %addmm:", "  %addmm_"))
            ][:6] == [
        "  %fc1_weight_in: f32[8, 20] = param fc1_weight_in",
        "  %fc1_weight_out: f32[64, 8] = param fc1_weight_out",
        "  %addmm_in_t: f32[20, 8] = aten.permute(%fc1_weight_in, [1, 0])",
        "  %addmm_in: f32[4, 8] = aten.mm(%x, %addmm_in_t)",
        "  %addmm_out_t: f32[8, 64] = aten.permute(%fc1_weight_out, [1, 0])",
        "  %addmm: f32[4, 64] = aten.addmm(%fc1_bias, %addmm_in, %addmm_out_t)",
    ]
    assert "fc1_weight" not in dict(f.gm.named_parameters())  # the dense weight is gone
    assert "fc1_weight" in dict(g.gm.named_parameters())


@pytest.mark.parametrize("method", ["svd", "data-aware"])
def test_full_rank_linear_factors_reproduce_the_layer(mlp, method):
    _, g, cal = mlp
    f = factorize(g, method=method, rank=20, include=["fc1*"], require_saving=False,
                  calibration=cal)
    x = torch.randn(4, 20)
    torch.testing.assert_close(f(x)[0], g(x)[0], rtol=1e-5, atol=1e-6)
    assert f.meta["factorize"]["layers"][0]["error"] < 1e-6


@pytest.mark.parametrize("method, rank", [("tucker2", 16), ("spatial-svd", 24)])
def test_full_rank_conv_factors_reproduce_the_layer(cnn, method, rank):
    g, cal = cnn  # convolution_4: 16 x 8 x 3x3, stride 2, padding 1
    f = factorize(g, method=method, rank=rank, include=["convolution_4"], require_saving=False,
                  calibration=cal)
    assert f.op_histogram()["aten.convolution"] == 5 + (2 if method == "tucker2" else 1)
    torch.testing.assert_close(f(*cal[0])[0], g(*cal[0])[0], rtol=1e-5, atol=1e-5)


def test_cp_recovers_a_weight_of_low_cp_rank():
    """A conv weight that is a sum of 4 rank-1 terms: CP at rank 4 finds it, rank 2 cannot."""
    gen = torch.Generator().manual_seed(0)
    a, b, c = (torch.randn(n, 4, generator=gen, dtype=torch.float64) for n in (12, 6, 9))
    w4 = torch.einsum("or,ir,sr->ois", a, b, c).reshape(12, 6, 3, 3)
    stats = Stats(torch.eye(54, dtype=torch.float64), torch.zeros(54, dtype=torch.float64), 54)
    y2 = stats.out_norm2(w4.reshape(12, -1), None)
    c2, c4 = cp_family(w4, stats, y2, Shape(n=1, hw=(5, 5), out_hw=(5, 5)), [2, 4])
    assert c4.error < 1e-6 and c4.energy > 1 - 1e-10
    assert c2.error > 0.05
    first, depthwise, last = c4.make()
    assert (first.shape, depthwise.shape, last.shape) == ((4, 6, 1, 1), (4, 1, 3, 3),
                                                         (12, 4, 1, 1))


def test_truncation_errors_match_the_discarded_singular_values(mlp):
    m, g, cal = mlp
    x, y = _layer_io(g, "addmm_1", cal)  # fc2: 64 -> 32; x: 64 rows
    w = m.fc2.weight.detach().double()
    s = torch.linalg.svd(w).S
    plain = factorize(g, method="svd", rank=8, include=["fc2*"], calibration=cal)
    w8 = plain.weights()["fc2_weight_out"].double() @ plain.weights()["fc2_weight_in"].double()
    # Eckart-Young: the weight error of plain SVD is the norm of the discarded values
    assert torch.linalg.norm(w - w8).item() == pytest.approx(s[8:].norm().item(), rel=1e-5)
    # data-aware: the output error on the calibration rows is the norm of the discarded
    # singular values of W C^(1/2), C = X^T X
    aware = factorize(g, method="data-aware", rank=8, include=["fc2*"], calibration=cal)
    evals, evecs = torch.linalg.eigh(x.T @ x)
    sigma = torch.linalg.svd(w @ (evecs * evals.clamp(min=0).sqrt() @ evecs.T)).S
    y_aware = _layer_io(aware, "addmm_1", cal)[1]
    assert torch.linalg.norm(y_aware - y).item() == pytest.approx(sigma[8:].norm().item(),
                                                                  rel=1e-4)
    y_plain = _layer_io(plain, "addmm_1", cal)[1]
    for f, y_f in ((plain, y_plain), (aware, y_aware)):  # the report's error is measured
        rel = (torch.linalg.norm(y_f - y) / torch.linalg.norm(y)).item()
        assert f.meta["factorize"]["layers"][0]["error"] == pytest.approx(rel, rel=1e-4)
    print(f"fc2 rank 8, output error on calibration data: plain SVD "
          f"{plain.meta['factorize']['layers'][0]['error']:.3f}, data-aware "
          f"{aware.meta['factorize']['layers'][0]['error']:.3f}")
    assert torch.linalg.norm(y_aware - y) < torch.linalg.norm(y_plain - y)


def test_energy_picks_the_smallest_rank_that_keeps_it(mlp):
    m, g, cal = mlp
    f = factorize(g, method="svd", energy=0.8, multiple=4, include=["fc2*"], calibration=cal)
    row = f.meta["factorize"]["layers"][0]
    s2 = torch.linalg.svd(m.fc2.weight.detach().double()).S ** 2
    kept = lambda r: (s2[:r].sum() / s2.sum()).item()
    r = row["rank"]
    assert r % 4 == 0 and kept(r) >= 0.8 > kept(r - 4)
    assert row["energy"] == pytest.approx(kept(r), rel=1e-9)


def test_max_error_picks_the_cheapest_rank_within_the_budget(mlp):
    _, g, cal = mlp
    budget = 0.2
    f = factorize(g, method="data-aware", max_error=budget, multiple=4, include=["fc2*"],
                  calibration=cal)
    r = f.meta["factorize"]["layers"][0]["rank"]
    errs = {k: factorize(g, method="data-aware", rank=k, include=["fc2*"], calibration=cal)
            .meta["factorize"]["layers"][0]["error"] for k in (r - 4, r)}
    assert errs[r] <= budget < errs[r - 4]


def test_ratio_bounds_the_params_of_the_factorized_layers(cnn):
    g, cal = cnn
    for ratio in (0.3, 0.6):
        rep = factorize(g, ratio=ratio, multiple=2, calibration=cal).meta["factorize"]
        got = rep["params_after"] / rep["params_before"]
        print(f"ratio={ratio}: {got:.3f}, methods {[r['method'] for r in rep['layers']]}")
        assert ratio - 0.1 < got <= ratio
        assert rep["graph_params"][1] < rep["graph_params"][0]
    # the budget goes where it cuts the summed squared layer errors most (on this random
    # net the whole-model error is not monotone in it: layer errors partly cancel)
    objective = [sum(r["error"] ** 2 for r in factorize(g, ratio=q, multiple=2, calibration=cal)
                     .meta["factorize"]["layers"]) for q in (0.3, 0.6)]
    assert objective[1] < 0.9 * objective[0]


def test_layers_not_worth_factorizing_are_skipped_with_the_reason(mlp):
    _, g, cal = mlp
    f = factorize(g, rank=8, exclude=["addmm_2"], calibration=cal)
    assert not f.meta["factorize"]["skipped"]
    f = factorize(g, energy=0.5, calibration=cal)  # fc3 is 5 x 32: rank 8 costs more
    (row,) = f.meta["factorize"]["skipped"]
    assert row["layer"] == "addmm_2" and row["skipped"].startswith("not worth it")
    text = format_factor_report(f.meta["factorize"])
    assert "skipped addmm_2 (aten.addmm): not worth it" in text and "fc1_weight" in text
    assert factorize(g, energy=0.5, include=["addmm_2"], calibration=cal) is g  # unchanged


def test_grouped_convs_are_skipped():
    m, x = build("depthwise_separable")
    g = graphc.run_pipeline(graphc.trace(m, x), "fold-batchnorm")[0]
    f = factorize(g, method="tucker2", rank=4, include=["convolution"], multiple=2)
    assert f is g  # the depthwise conv is grouped: nothing to do


BAD = [
    ({"rank": 100}, "rank=100 is larger than %addmm \\(aten.addmm\\) allows for method 'svd'"),
    ({"ratio": 0.0}, "ratio=0.0 must be in \\(0, 1\\]"),
    ({"ratio": 1.5}, "ratio=1.5 must be in \\(0, 1\\]"),
    ({"energy": 2.0}, "energy=2.0 must be in \\(0, 1\\]"),
    ({"method": "qr"}, "method='qr' is unknown; choose from \\['auto', 'svd'"),
    ({"rank": 8, "ratio": 0.5}, "give one of rank, energy, ratio, max_error"),
    ({"multiple": 0}, "multiple=0 must be an int >= 1"),
    ({"ops": ["attention"]}, "ops=\\['attention'\\] names unknown op classes"),
    ({"ratio": 0.01}, "ratio=0.01 is below what the smallest ranks give"),
]


@pytest.mark.parametrize("kwargs, message", BAD)
def test_bad_options_are_rejected(mlp, kwargs, message):
    _, g, cal = mlp
    with pytest.raises(PassError, match="pass 'factorize': " + message):
        factorize(g, method="svd" if "method" not in kwargs else kwargs.pop("method"),
                  calibration=cal, **kwargs)


def test_pipeline_strings_take_the_same_options(mlp):
    _, g, _ = mlp
    f, records = graphc.run_pipeline(g, "factorize(method=svd, ratio=0.6), quantize",
                                     check=True)
    assert f.op_histogram()["aten.mm"] == 2 and records[1].changed
    with pytest.raises(PassError, match="option method='qr' must be one of"):
        graphc.run_pipeline(g, "factorize(method=qr)")


def test_factors_are_trainable_weights_and_compile(mlp):
    m, g, cal = mlp
    f = factorize(g, rank=8, exclude=["addmm_2"], calibration=cal)
    params = dict(f.gm.named_parameters())
    assert params["fc1_weight_in"].requires_grad and params["fc2_weight_out"].requires_grad
    r = graphc.distill(f, m, [b[0] for b in cal], epochs=3, loss="mse", lr=3e-3,
                       trainable=["*_in", "*_out"])
    ep = r.student.meta["distill"]["epoch_losses"]
    assert ep[-1] < 0.7 * ep[0]
    cm = graphc.compile(r.student, target="cpu")
    torch.testing.assert_close(cm(*cal[0]), r.student(*cal[0])[0], rtol=1e-5, atol=1e-5)


def test_digits_cnn_at_half_the_params_loses_at_most_one_point_after_distillation():
    """Issue 5: the sklearn digits CNN, its factorized layers at 0.5x their params, then a
    short distillation (2 epochs) from the float model."""
    from tests.test_qat import _accuracy, _train_digits

    g, train, test = _train_digits()
    f = factorize(g, ratio=0.5, calibration=[(xb,) for xb, _ in train[:10]])
    rep = f.meta["factorize"]
    assert rep["params_after"] <= 0.5 * rep["params_before"]
    r = graphc.distill(f, g, train, epochs=2, lr=1e-3, temperature=4.0)
    fp32, before, after = _accuracy(g, test), _accuracy(f, test), _accuracy(r.student, test)
    print(format_factor_report(rep))
    print(f"digits: fp32 {fp32:.2f}, factorized {before:.2f}, distilled {after:.2f}")
    assert after >= fp32 - 1.0
