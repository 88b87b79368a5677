"""quantize(max_error=...): sensitivity per layer and the budget met by keeping layers."""

import pytest
import torch

import graphc
from graphc.passes.quant_mixed import relative_error
from tests.models.zoo import build
from tests.single_thread import one_torch_thread  # noqa: F401  (autouse fixture)


@pytest.fixture(scope="module")
def cnn():
    torch.manual_seed(0)
    m, x = build("conv_bn_residual")
    g = graphc.run_pipeline(graphc.trace(m, x), "fold-batchnorm")[0]
    batches = [(torch.randn(2, 3, 16, 16),) for _ in range(6)]
    return g, batches, [g(*b) for b in batches]


def _kept(q):
    return q.meta["quantize"]["kept"]


def test_sensitivity_is_the_error_with_that_layer_alone(cnn):
    g, batches, ref = cnn
    rep = graphc.quantize(g, calibration=batches, bits=4).meta["quantize"]
    for row in rep["layers"][:2]:
        alone = graphc.quantize(g, calibration=batches, bits=4, include=(row["layer"],))
        assert relative_error(alone, batches, ref) == pytest.approx(row["error_alone"],
                                                                    rel=1e-12)


def test_int4_budget_is_met_by_keeping_the_most_sensitive_layers_at_int8(cnn):
    g, batches, ref = cnn
    e4 = graphc.quantize(g, calibration=batches, bits=4).meta["quantize"]["output_error"]
    e8 = graphc.quantize(g, calibration=batches, bits=8).meta["quantize"]["output_error"]
    budget = (e4 * e8) ** 0.5  # between all-int4 and all-int8
    q = graphc.quantize(g, calibration=batches, bits=4, max_error=budget)
    rep = q.meta["quantize"]
    achieved = relative_error(q, batches, ref)  # measured here, not taken from the report
    print(f"mixed precision: all-int4 {e4:.2e}, all-int8 {e8:.2e}, budget {budget:.2e}, "
          f"achieved {achieved:.2e} keeping {rep['kept']}")
    assert achieved == pytest.approx(rep["output_error"], rel=1e-12) and achieved <= budget
    kept = _kept(q)
    assert kept and set(kept.values()) == {"int8"} and len(kept) < len(rep["layers"])
    by_sensitivity = sorted(rep["layers"], key=lambda r: -r["error_alone"])
    assert set(kept) == {r["layer"] for r in by_sensitivity[:len(kept)]}  # greedy order
    bits = {r["layer"]: r["bits"] for r in rep["layers"]}
    assert all(bits[n] == 8 for n in kept) and sorted(set(bits.values())) == [4, 8]
    for node in q.gm.graph.nodes:  # the IR agrees: kept layers' weights on the int8 grid
        if node.name in bits and node.target is torch.ops.aten.convolution.default:
            assert node.args[1].args[-1] == (127 if bits[node.name] == 8 else 7)
    sizes = [graphc.quantize(g, calibration=batches, bits=b).meta["quantize"]
             ["weight_bytes_quantized"] for b in (4, 8)]
    assert sizes[0] < rep["weight_bytes_quantized"] < sizes[1]


def test_a_budget_below_int8_error_falls_back_to_float(cnn):
    g, batches, ref = cnn
    e8 = graphc.quantize(g, calibration=batches, bits=8).meta["quantize"]["output_error"]
    q = graphc.quantize(g, calibration=batches, bits=8, max_error=e8 / 3)
    assert relative_error(q, batches, ref) <= e8 / 3
    assert "fp32" in _kept(q).values()
    floats = [r for r in q.meta["quantize"]["layers"] if r["kept"] == "fp32"]
    assert all(r["weight"] == "fp32" and r["activation"] == "fp32" for r in floats)


def test_a_budget_already_met_changes_nothing(cnn):
    g, batches, _ = cnn
    plain = graphc.quantize(g, calibration=batches, bits=8)
    loose = graphc.quantize(g, calibration=batches, bits=8, max_error=1.0)
    assert _kept(loose) == {} and str(loose) == str(plain)
