"""QAT through a fake-quant Graph: straight-through gradients, learned scales, and a real
task (sklearn digits) where int8 PTQ and int4 + QAT keep the float accuracy."""

import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

import graphc
from graphc.qat import scale_names
from tests.models.zoo import build
from tests.single_thread import one_torch_thread, single_thread  # noqa: F401  (autouse)


def test_weight_gradients_are_straight_through():
    # weight-only int4: every weight is inside its min-max range, so dL/dW through the
    # fake-quant graph equals the float network's gradient at the quantized weights
    m, x = build("mlp")
    q = graphc.quantize(graphc.trace(m, x), bits=4, activations="none")
    q.gm(*x)[0].square().sum().backward()
    ref = build("mlp")[0]
    with torch.no_grad():
        for lin, node in zip((ref.fc1, ref.fc2, ref.fc3), ("fc1", "fc2", "fc3")):
            fq = next(n for n in q.gm.graph.nodes if n.name == f"{node}_weight_q")
            lin.weight.copy_(fq.target(q.weight(fq.args[0].args[0]).T,
                                       *(q.weight(a) for a in fq.args[1:3]), *fq.args[3:]).T)
    ref(*x).square().sum().backward()
    for name in ("fc1", "fc2", "fc3"):
        torch.testing.assert_close(q.gm.get_parameter(f"{name}_weight").grad,
                                   getattr(ref, name).weight.grad, rtol=1e-6, atol=1e-7)


def test_train_learns_weights_and_scales_on_a_copy():
    m, x = build("mlp")
    g = graphc.trace(m, x)
    q = graphc.quantize(g, bits=4)
    before = {k: v.detach().clone() for k, v in q.gm.named_parameters()}
    torch.manual_seed(1)
    xs = [torch.randn(4, 20) for _ in range(16)]
    data = [(xi, g(xi)[0].detach()) for xi in xs]  # distil the float model into int4

    def mse(h):
        with torch.no_grad():
            return sum(F.mse_loss(h(xi)[0], yi).item() for xi, yi in data) / len(data)

    t = graphc.qat.train(q, data, F.mse_loss, epochs=6, lr=3e-4)
    print(f"QAT, int4 MLP distilled from fp32: MSE {mse(q):.2e} -> {mse(t):.2e}")
    assert mse(t) < 0.5 * mse(q)
    after = dict(t.gm.named_parameters())
    assert all(torch.equal(v, before[k]) for k, v in q.gm.named_parameters())  # q untouched
    assert torch.equal(g.weights()["fc1_weight"], m.fc1.weight)  # nor is the float graph
    changed = {k for k in before if not torch.equal(after[k], before[k])}
    scales = scale_names(t)
    assert {"fc1_weight_scale", "x_act_scale"} <= scales
    assert scales <= changed and "fc1_weight" in changed  # LSQ scales and weights both learn


# ---- real data: sklearn's 8x8 digits -------------------------------------------------------
B = 40  # the graph is traced at this batch size (static shapes)


class DigitsCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(1, 16, 3, padding=1), nn.Conv2d(16, 32, 3, padding=1)
        self.fc1, self.fc2 = nn.Linear(32 * 4 * 4, 64), nn.Linear(64, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.c2(F.relu(self.c1(x)))), 2)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


@pytest.fixture(scope="module")
def digits():
    """A CNN trained here (~2 s): 1400 training images, 360 held out."""
    with single_thread():  # module-scoped: set up outside the per-test fixture
        return _train_digits()


def _train_digits():
    torch.manual_seed(0)
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0
    y = torch.tensor(d.target)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    train = [(x[i:i + B], y[i:i + B]) for i in range(0, 1400, B)]
    test = [(x[i:i + B], y[i:i + B]) for i in range(1437, 1797, B)]
    m = DigitsCNN()
    opt = torch.optim.Adam(m.parameters(), 3e-3)
    for _ in range(15):
        for xb, yb in train:
            opt.zero_grad()
            F.cross_entropy(m(xb), yb).backward()
            opt.step()
    return graphc.trace(m, (train[0][0],)), train, test


def _accuracy(g, test) -> float:
    with torch.no_grad():
        right = sum(int((g(xb)[0].argmax(1) == yb).sum()) for xb, yb in test)
    return 100.0 * right / sum(len(yb) for _, yb in test)


def test_digits_int8_ptq_and_int4_qat_keep_accuracy(digits):
    g, train, test = digits
    calib = [(xb,) for xb, _ in train[:10]]  # 400 training images
    fp32 = _accuracy(g, test)
    int8 = _accuracy(graphc.quantize(g, calibration=calib), test)
    q4 = graphc.quantize(g, calibration=calib, bits=4)
    int4_ptq = _accuracy(q4, test)
    int4_qat = _accuracy(graphc.qat.train(q4, train, epochs=2, lr=3e-4), test)
    print(f"digits held-out accuracy (360 images): fp32 {fp32:.2f}, int8 PTQ {int8:.2f}, "
          f"int4-weight PTQ {int4_ptq:.2f}, int4-weight + QAT (2 epochs) {int4_qat:.2f}")
    assert fp32 >= 95.0  # the model really learned the task
    assert int8 >= fp32 - 0.5
    assert int4_qat >= fp32 - 1.0


def test_digits_int8_folded_on_tvm_keeps_the_fake_quant_accuracy(digits):
    """The deployed int8 model (folded to integer kernels, compiled for this CPU) classifies
    the held-out digits as the fake-quant graph does, within PTQ's 0.5-point budget of fp32."""
    from graphc.passes.fold_fake_quant import fold_fake_quant

    g, train, test = digits
    q = graphc.quantize(g, calibration=[(xb,) for xb, _ in train[:10]])
    cm = graphc.compile(fold_fake_quant(q), target="cpu")
    with torch.no_grad():
        right = sum(int((cm(xb).argmax(1) == yb).sum()) for xb, yb in test)
    deployed = 100.0 * right / sum(len(yb) for _, yb in test)
    print(f"digits int8 folded on TVM: {deployed:.2f} (fake-quant {_accuracy(q, test):.2f}, "
          f"fp32 {_accuracy(g, test):.2f})")
    assert abs(deployed - _accuracy(q, test)) <= 0.3  # at most one image of 360 flips
    assert deployed >= _accuracy(g, test) - 0.5
