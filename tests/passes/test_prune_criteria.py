"""criterion="sensitivity": the squared output change of removing a weight entry or a channel,
estimated from random output directions, checked against the change measured by removing it;
a dead channel that weight magnitude keeps and sensitivity removes; heads; bad input."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import graphc
from graphc.errors import PassError
from graphc.passes.prune import prune
from graphc.passes.prune_criteria import weight_scores
from graphc.passes.prune_structured import prune_channels
from graphc.verify import verify
from tests.models.zoo import build
from tests.single_thread import one_torch_thread  # noqa: F401  (autouse fixture)

REPEAT = 400  # batches (x 4 probes): the estimate's relative std is <= sqrt(2 / 1600) = 3.5%


class TwoLayer(nn.Module):
    """relu(fc1 x) -> fc2: the output is linear in each hidden channel, so the first-order
    change of removing one is its exact change."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 12), nn.Linear(12, 3)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(x)))


def _two_layer():
    torch.manual_seed(0)
    m = TwoLayer()
    with torch.no_grad():  # spread the channels' effects so the ranking is unambiguous
        m.fc2.weight.mul_(torch.logspace(-1, 1, 12))
    x = torch.randn(16, 6)
    return m, x, graphc.trace(m, (x,))


def _removal_effect(m, x) -> torch.Tensor:
    """Per hidden channel: sum over samples of |out - out with the channel removed|^2."""
    with torch.no_grad():
        ref, h = m(x), F.relu(m.fc1(x))
        return torch.stack([(ref - (m.fc2(h * (torch.arange(12) != c)))).square().sum()
                            for c in range(12)])


def test_channel_scores_estimate_the_output_change_of_removing_them():
    from graphc.passes.prune_groups import find_groups
    from graphc.passes.prune_structured import _sensitivity

    m, x, g = _two_layer()
    grp = next(gr for gr in find_groups(g).groups if "addmm" in gr.spaces)
    est = _sensitivity(g, [grp], [(x,)] * REPEAT)[grp.id] / REPEAT
    exact = _removal_effect(m, x).double()
    assert exact.min() > 0  # every channel is active on some sample (else both are 0)
    torch.testing.assert_close(est, exact, rtol=0.2, atol=0)
    p = prune_channels(g, sparsity=0.5, criterion="sensitivity", calibration=[(x,)] * 8)
    verify(p, after="prune-channels")
    kept = {tuple(r.tolist()) for r in p.weights()["fc1_weight"]}
    top = exact.argsort(descending=True)[:6]
    assert kept == {tuple(g.weights()["fc1_weight"][c].tolist()) for c in top}


def test_entry_scores_estimate_the_output_change_of_zeroing_them():
    torch.manual_seed(0)
    lin = nn.Linear(5, 4, bias=False)
    x = torch.randn(8, 5)
    g = graphc.trace(lin, (x,))
    est = weight_scores(g, "sensitivity", data=[(x,)] * REPEAT)["weight"] / REPEAT
    exact = lin.weight.detach().square() * x.square().sum(0)  # zeroing W[o, i]: W[o,i] x_i
    torch.testing.assert_close(est, exact, rtol=0.2, atol=0)
    x[:, 0] = 0  # an input that is always 0: its weights change nothing, whatever their size
    with torch.no_grad():
        lin.weight[:, 0] = 10.0
    g = graphc.trace(lin, (x,))
    w = prune(g, sparsity=0.25, criterion="sensitivity", calibration=[(x,)]).weights()
    eff = w["weight"] * w["weight_mask"]
    assert int((eff == 0).sum()) == 5 and not eff[:, 0].any()


def test_a_dead_channel_is_removed_though_its_weights_are_the_largest():
    m, x, _ = _two_layer()
    with torch.no_grad():  # channel 11: the biggest weights, never active on the data
        m.fc1.weight[11] = 5 * m.fc1.weight[11].sign()
        m.fc1.bias[11] = -100.0
        m.fc2.weight[:, 11] = 5.0
    g = graphc.trace(m, (x,))
    rows = {c: tuple(m.fc1.weight[c].tolist()) for c in range(12)}
    kept_l1 = {tuple(r.tolist()) for r in prune_channels(g, sparsity=0.25).weights()["fc1_weight"]}
    kept_s = {tuple(r.tolist()) for r in prune_channels(
        g, sparsity=0.25, criterion="sensitivity", calibration=[(x,)]).weights()["fc1_weight"]}
    assert rows[11] in kept_l1 and rows[11] not in kept_s


def test_heads_and_global_scope_on_an_encoder_block():
    m, inputs = build("encoder_block")
    g = graphc.trace(m, inputs)
    calib = [inputs] * 4
    h = prune_channels(g, sparsity=0.25, unit="head", criterion="sensitivity",
                       calibration=calib)
    verify(h, after="prune-channels")
    assert h.weights()["proj_weight"].shape == (32, 24)  # 4 heads of 8 -> 3
    p = prune_channels(h, sparsity=0.5, criterion="sensitivity", scope="global",
                       calibration=calib)
    assert p.meta["prune"]["options"]["criterion"] == "sensitivity"
    torch.testing.assert_close(p(*inputs)[0], p.gm(*inputs)[0])  # runs, same both ways
    again = prune_channels(g, sparsity=0.25, unit="head", criterion="sensitivity",
                           calibration=calib)
    assert torch.equal(again.weights()["proj_weight"], h.weights()["proj_weight"])  # seeded


def test_sensitivity_needs_calibration_inputs():
    g = _two_layer()[2]
    with pytest.raises(PassError, match="prune-channels.*'sensitivity' needs calibration"):
        prune_channels(g, criterion="sensitivity")
    with pytest.raises(PassError, match="'sensitivity' needs data"):
        weight_scores(g, "sensitivity")
    with pytest.raises(PassError, match="'sensitivity' got empty data"):
        weight_scores(g, "sensitivity", data=[])
