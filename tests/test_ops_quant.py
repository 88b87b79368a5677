"""graphc::fake_quant_* ops: exact values, the STE and LSQ gradients, export, opcheck."""

import pytest
import torch

import graphc
from graphc.ops_quant import dynamic_qparams
from tests.single_thread import one_torch_thread  # noqa: F401  (autouse fixture)

FQ = torch.ops.graphc
I32 = torch.int32


def _per_tensor(x, scale, zp, qmin, qmax):
    return FQ.fake_quant_per_tensor(x, scale, torch.tensor(zp, dtype=I32), qmin, qmax)


def test_per_tensor_values_and_gradients_by_hand():
    # scale 0.5, grid [-4, 3]: x/s = [-6, -0.52, 0, 0.48, 1.52, 10]
    x = torch.tensor([-3.0, -0.26, 0.0, 0.24, 0.76, 5.0], requires_grad=True)
    s = torch.tensor(0.5, requires_grad=True)
    y = _per_tensor(x, s, 0, -4, 3)
    assert y.tolist() == [-2.0, -0.5, 0.0, 0.0, 1.0, 1.5]  # -6 -> -4, 10 -> 3 clamped
    y.backward(torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0]))
    # STE: the upstream gradient where x lands inside the grid, 0 where it was clamped
    assert x.grad.tolist() == [0.0, 2.0, 3.0, 4.0, 5.0, 0.0]
    # LSQ: qmin - zp (below), round(v) - v (inside), qmax - zp (above), weighted by grad
    d = [-4.0, -1 + 0.52, 0.0, 0 - 0.48, 2 - 1.52, 3.0]
    expect = sum(g * di for g, di in zip([1, 2, 3, 4, 5, 6], d))
    assert s.grad.item() == pytest.approx(expect, abs=1e-6)


def test_asymmetric_zero_point_shifts_the_grid():
    # grid [0, 255], zero point 10, scale 0.1: representable range is [-1.0, 24.5]
    x = torch.tensor([-2.0, -1.0, 0.04, 0.06, 30.0], requires_grad=True)
    s = torch.tensor(0.1, requires_grad=True)
    y = _per_tensor(x, s, 10, 0, 255)
    torch.testing.assert_close(y, torch.tensor([-1.0, -1.0, 0.0, 0.1, 24.5]), rtol=0,
                               atol=1e-6)
    y.sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0]
    # below: qmin - zp = -10; inside: round(v) - v for v = -10, 0.4, 0.6; above: 245
    d = [-10.0, 0.0, -0.4, 0.4, 245.0]  # (-1.0 lands exactly on qmin: inside)
    assert s.grad.item() == pytest.approx(sum(d), abs=1e-4)


def test_per_channel_uses_each_channels_scale_and_reduces_its_gradient():
    w = torch.tensor([[0.30, -0.70, 2.0], [0.03, 0.05, -0.2]], requires_grad=True)
    s = torch.tensor([0.25, 0.01], requires_grad=True)
    zp = torch.zeros(2, dtype=I32)
    y = FQ.fake_quant_per_channel(w, s, zp, 0, -7, 7)
    torch.testing.assert_close(y, torch.tensor([[0.25, -0.75, 1.75], [0.03, 0.05, -0.07]]),
                               rtol=0, atol=1e-7)
    y.sum().backward()
    assert w.grad.tolist() == [[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]]
    # channel 0: (1 - 1.2) + (-3 + 2.8) + 7; channel 1: (3 - 3) + (5 - 5) + (-7)
    torch.testing.assert_close(s.grad, torch.tensor([6.6, -7.0]), rtol=0, atol=1e-5)
    # the axis may be any dim: channels along dim 1 of the transpose give the same result
    y_t = FQ.fake_quant_per_channel(w.detach().T.contiguous(), s.detach(), zp, 1, -7, 7)
    assert torch.equal(y_t, y.detach().T)


def test_error_is_at_most_half_a_step_inside_the_range():
    x = torch.randn(10_000) * 3
    scale = torch.tensor(x.abs().max().item() / 127)
    err = _per_tensor(x, scale, 0, -127, 127) - x
    assert err.abs().max().item() <= scale.item() / 2 * (1 + 1e-5)  # float32 division slack
    # rounding noise is uniform on [-s/2, s/2]: power s^2/12 (within 5% on 10k samples)
    assert err.pow(2).mean().item() == pytest.approx(scale.item() ** 2 / 12, rel=0.05)
    sqnr = 10 * torch.log10(x.pow(2).sum() / err.pow(2).sum()).item()
    print(f"int8 per-tensor SQNR on N(0, 9), full range: {sqnr:.1f} dB")


def test_dynamic_measures_its_own_range():
    x = torch.tensor([-1.0, 0.5, 3.0], requires_grad=True)
    scale, zp = dynamic_qparams(x, 0, 255)
    assert scale.item() == pytest.approx(4.0 / 255) and zp.item() == round(1.0 / (4 / 255))
    y = FQ.fake_quant_dynamic(x, 0, 255)
    assert (y - x).abs().max().item() <= scale.item() / 2 + 1e-7
    y.sum().backward()
    assert x.grad.tolist() == [1.0, 1.0, 1.0]  # nothing is clamped: straight through
    s_sym, z_sym = dynamic_qparams(x, -127, 127)
    assert s_sym.item() == pytest.approx(3.0 / 127) and z_sym.item() == 0


class _FQModule(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(4, 3))
        self.ws = torch.nn.Parameter(torch.full((4,), 0.02))
        self.register_buffer("wz", torch.zeros(4, dtype=I32))
        self.xs = torch.nn.Parameter(torch.tensor(0.05))
        self.register_buffer("xz", torch.tensor(3, dtype=I32))

    def forward(self, x):
        xq = FQ.fake_quant_per_tensor(x, self.xs, self.xz, 0, 255)
        wq = FQ.fake_quant_per_channel(self.w, self.ws, self.wz, 0, -127, 127)
        return xq @ wq.T + FQ.fake_quant_dynamic(x, 0, 255).sum()


def test_survives_export_and_traces_into_a_graph_that_trains():
    m, x = _FQModule(), torch.randn(2, 3)
    ep = torch.export.export(m, (x,), strict=False)
    names = [str(n.target) for n in ep.graph.nodes if n.op == "call_function"]
    assert "graphc.fake_quant_per_tensor.default" in names
    assert "graphc.fake_quant_per_channel.default" in names
    g = graphc.trace(m, (x,))
    graphc.verify(g)
    hist = g.op_histogram()
    assert (hist["graphc.fake_quant_per_tensor"], hist["graphc.fake_quant_per_channel"],
            hist["graphc.fake_quant_dynamic"]) == (1, 1, 1)
    assert "= graphc.fake_quant_per_channel(%w, %ws, %wz, 0, -127, 127)" in str(g)
    torch.testing.assert_close(g(x)[0], m(x), rtol=0, atol=0)
    g.gm(x)[0].sum().backward()
    grads = {n: p.grad for n, p in g.gm.named_parameters()}
    assert grads["ws"] is not None and grads["ws"].abs().sum() > 0
    assert grads["xs"] is not None and grads["w"].abs().sum() > 0


def test_fake_impl_rejects_a_scale_of_the_wrong_length():
    class Bad(torch.nn.Module):
        def forward(self, x):
            return FQ.fake_quant_per_channel(x, torch.ones(3), torch.zeros(3, dtype=I32), 0,
                                             -127, 127)

    with pytest.raises(Exception, match=r"scale has shape \(3,\), expected \[5\]"):
        torch.export.export(Bad(), (torch.randn(5, 2),), strict=False)


@pytest.mark.parametrize("op, args", [
    (FQ.fake_quant_per_tensor, lambda: (torch.randn(3, 4, requires_grad=True),
                                        torch.tensor(0.1, requires_grad=True),
                                        torch.tensor(4, dtype=I32), 0, 255)),
    (FQ.fake_quant_per_channel, lambda: (torch.randn(3, 4, requires_grad=True),
                                         torch.rand(4, requires_grad=True) + 0.05,
                                         torch.zeros(4, dtype=I32), 1, -7, 7)),
    (FQ.fake_quant_dynamic, lambda: (torch.randn(3, 4, requires_grad=True), -127, 127)),
])
def test_opcheck(op, args):
    """torch.library's own consistency checks: schema, fake impl, autograd registration."""
    torch.library.opcheck(op, args())
