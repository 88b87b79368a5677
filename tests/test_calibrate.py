"""graphc.calibrate: activation ranges from real batches, observed on the float network."""

import pytest
import torch
import torch.nn.functional as F

import graphc
from graphc.calibrate import static_activation_nodes
from graphc.errors import GraphcError, InputError
from graphc.observers import Grid, Percentile, qparams
from tests.models.zoo import build
from tests.single_thread import one_torch_thread  # noqa: F401  (autouse fixture)

UINT8 = Grid(0, 255)


def _act_qparams(g):
    """{input node name: (scale, zero point)} of every static activation fake-quant."""
    return {n.args[0].name: (g.weight(n.args[1]).item(), g.weight(n.args[2]).item())
            for n in static_activation_nodes(g)}


def _mlp_and_batches():
    m, x = build("mlp")
    g = graphc.trace(m, x)
    batches = [(torch.randn(4, 20) * (1 + i),) for i in range(6)]
    return m, g, batches


def test_minmax_ranges_are_the_float_networks_extremes():
    m, g, batches = _mlp_and_batches()
    q = graphc.calibrate(graphc.quantize(g), batches, observer="minmax")
    xs = torch.cat([b[0] for b in batches])
    with torch.no_grad():  # the float activations each fake-quant sees
        h1 = F.relu(m.fc1(xs))
        h2 = torch.tanh(m.fc2(h1))
    got = _act_qparams(q)
    for name, t in (("x", xs), ("relu", h1), ("tanh", h2)):
        scale, zp = qparams(t.min(), t.max(), UINT8)
        assert got[name] == (scale.item(), zp.item()), name


def test_calibrate_copies_and_leaves_its_input_alone():
    _, g, batches = _mlp_and_batches()
    q = graphc.quantize(g)  # calibrated on the example input only
    before = _act_qparams(q)
    r = graphc.calibrate(q, batches)
    assert r is not q and _act_qparams(q) == before != _act_qparams(r)
    assert r.weights()["fc1_weight"] is q.weights()["fc1_weight"]  # weights shared, not copied
    weight_only = graphc.quantize(g, activations="none")
    assert graphc.calibrate(weight_only, batches) is weight_only  # nothing to calibrate


def test_ranges_do_not_depend_on_the_weight_format():
    # every fake-quant is bypassed while observing, so int4 and int8 weights see the same
    _, g, batches = _mlp_and_batches()
    q8 = graphc.quantize(g, calibration=batches)
    q4 = graphc.quantize(g, calibration=batches, bits=4)
    assert _act_qparams(q8) == _act_qparams(q4)


def test_observer_by_name_or_factory_and_progress_bar():
    _, g, batches = _mlp_and_batches()
    q = graphc.quantize(g)
    by_name = _act_qparams(graphc.calibrate(q, batches, observer="percentile"))
    by_factory = _act_qparams(graphc.calibrate(q, batches, progress=True,
                                               observer=lambda: Percentile(percentile=90.0)))
    minmax = _act_qparams(graphc.calibrate(q, batches))
    # a lower percentile clips harder: smaller steps for every activation
    assert all(by_factory[k][0] < by_name[k][0] <= minmax[k][0] for k in minmax)


def test_bad_observer_and_bad_batches_fail_clearly():
    _, g, batches = _mlp_and_batches()
    q = graphc.quantize(g)
    with pytest.raises(GraphcError, match=r"unknown observer 'kl'; choose from \['entropy', "):
        graphc.calibrate(q, batches, observer="kl")
    with pytest.raises(InputError, match="calibration batch 1 of 'MLP'"):
        graphc.calibrate(q, [batches[0], (torch.randn(5, 20),)])
    with pytest.raises(GraphcError, match="no calibration batches were given"):
        graphc.calibrate(q, [])
