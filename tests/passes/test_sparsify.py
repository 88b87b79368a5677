"""sparsify: sparse kernels where measured faster, bitmask storage otherwise."""

import pytest
import torch
from torch import nn

import graphc
from graphc.errors import PassError
from graphc.passes.sparsify import sparsify
from tests.single_thread import one_torch_thread  # noqa: F401  (autouse)


def _zero(layer: nn.Module, sparsity: float, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    w = layer.weight.data
    w[torch.rand(w.shape, generator=g) < sparsity] = 0


class Net(nn.Module):
    """A conv, two sparse linears, and a dense head the pass must leave alone."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc1, self.fc2, self.head = nn.Linear(128, 64), nn.Linear(64, 32), nn.Linear(32, 10)
        for layer in (self.conv, self.fc1, self.fc2):
            _zero(layer, 0.8)

    def forward(self, x):
        h = torch.relu(self.conv(x)).mean((2, 3)).repeat(1, 16)
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(h)))))


@pytest.fixture(scope="module")
def net():
    m = Net().eval()
    x = torch.randn(2, 3, 6, 6)
    return m, x, graphc.trace(m, (x,))


def test_storage_ir_before_after_and_exact_outputs(net):
    m, x, g = net
    s = sparsify(g, mode="storage")
    print("before:\n", g, "\nafter:\n", s)
    hist = s.op_histogram()
    assert hist["graphc.sparse_decode"] == 3 and "graphc.bsr_linear" not in hist
    # linears decode W.T (the permute is gone), the conv its own layout
    assert hist["aten.permute"] == g.op_histogram()["aten.permute"] - 2
    text = str(s)
    assert "fc1_weight_values_t" in text and "conv_weight_values" in text
    assert "fc1_weight:" not in text and "head_weight" in text  # dense weights dropped / kept
    with torch.no_grad():
        torch.testing.assert_close(s(x)[0], m(x), rtol=1e-6, atol=1e-6)
    rows = {r["layer"]: r for r in s.meta["sparsify"]["layers"]}
    assert set(rows) == {"convolution", "addmm", "addmm_1"}
    for r in rows.values():
        assert r["form"] == "storage" and r["verdict"] == "smaller, not faster"
        assert 0.75 < r["sparsity"] < 0.85
        assert r["bytes_after"] < 0.3 * r["bytes_before"]  # 0.2 * 4 + 1/8 of 4 bytes
    assert g.op_histogram().get("graphc.sparse_decode") is None  # the input is untouched


def test_kernel_ir_and_compiled_outputs(net):
    m, x, g = net
    s = sparsify(g, mode="kernel", block=(4, 1))
    print(s)
    hist = s.op_histogram()
    # the conv has no kernel form: it is stored
    assert hist["graphc.bsr_linear"] == 2 and hist["graphc.sparse_decode"] == 1
    rows = {r["layer"]: r for r in s.meta["sparsify"]["layers"]}
    assert rows["addmm"]["form"] == "kernel" and rows["addmm"]["block"] == [4, 1]
    assert rows["addmm"]["verdict"] == "not measured (mode=kernel)"
    assert rows["convolution"]["form"] == "storage"
    with torch.no_grad():
        want = m(x)
        torch.testing.assert_close(s(x)[0], want, rtol=1e-5, atol=1e-5)
        cm = graphc.compile(s)
        torch.testing.assert_close(cm(x), want, rtol=1e-5, atol=1e-5)


def test_min_sparsity_skips_denser_layers(net):
    _, _, g = net
    s = sparsify(g, mode="storage", min_sparsity=0.9)
    assert s is g  # nothing reaches 90%: unchanged
    m = Net().eval()
    _zero(m.fc2, 0.95, seed=1)
    g2 = graphc.trace(m, (torch.randn(2, 3, 6, 6),))
    s = sparsify(g2, mode="storage", min_sparsity=0.9)
    report = s.meta["sparsify"]
    assert [r["layer"] for r in report["layers"]] == ["addmm_1"]
    assert {r["layer"] for r in report["skipped"]} >= {"addmm", "convolution"}


def test_auto_keeps_the_kernel_only_where_measured_faster():
    """Batch 32 on 384-wide layers: at 95% zeros the kernel ran 2.6-2.9x faster than the
    dense layer here, at 50% 0.7-0.8x (benchmarks/sparse.py), so at 40% slower still: both
    far from the 5% margin (at 50% one CI run, sharing its 2 cores with a benchmark,
    measured the kernel faster)."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(384, 384), nn.ReLU(), nn.Linear(384, 384)).eval()
    _zero(m[0], 0.95)
    _zero(m[2], 0.4)
    x = torch.randn(32, 384)
    s = sparsify(graphc.trace(m, (x,)), mode="auto", min_sparsity=0.3)
    rows = {r["layer"]: r for r in s.meta["sparsify"]["layers"]}
    print({k: (r["dense_ms"], r["kernel_ms"], r["storage_ms"], r["verdict"])
           for k, r in rows.items()})
    assert rows["addmm"]["form"] == "kernel" and rows["addmm"]["verdict"] == "faster"
    assert rows["addmm"]["kernel_ms"] < rows["addmm"]["dense_ms"]
    assert rows["addmm_1"]["form"] == "storage"
    assert rows["addmm_1"]["verdict"] == "smaller, not faster"
    with torch.no_grad():
        torch.testing.assert_close(graphc.compile(s)(x), m(x), rtol=1e-5, atol=1e-5)


def test_compile_pipeline_string_carries_the_report(net):
    m, x, _ = net
    cm = graphc.compile(m, (x,), passes="sparsify(mode=storage, ops=linear)")
    rows = cm.meta["sparsify"]["layers"]
    assert [r["layer"] for r in rows] == ["addmm", "addmm_1"]
    with torch.no_grad():
        torch.testing.assert_close(cm(x), m(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("options, message", [
    ({"min_sparsity": 0.0}, r"min_sparsity=0.0 must be in \(0, 1\]"),
    ({"min_sparsity": 1.5}, r"min_sparsity=1.5 must be in \(0, 1\]"),
    ({"block": (8,)}, r"block=\(8,\) must be two ints"),
    ({"block": (0, 1)}, r"block=\(0, 1\) must be two ints"),
    ({"ops": ("embedding",)}, r"unknown classes \['embedding'\]"),
    # fc1's weight is [64, 128]: its rows divide by 8, its 128 columns not by 3
    ({"block": (8, 3), "mode": "kernel"},
     (r"block=\(8, 3\) does not divide the weight fc1_weight \[64, 128\] of %addmm "
      r"\(aten.addmm\): its 128 columns are not a multiple of 3")),
])
def test_bad_options_are_rejected(net, options, message):
    _, _, g = net
    with pytest.raises(PassError, match=message):
        sparsify(g, **options)


def test_bad_option_in_a_pipeline_string(net):
    m, x, _ = net
    with pytest.raises(PassError, match="sparsify.*min_sparsity=2"):
        graphc.compile(m, (x,), passes="sparsify(min_sparsity=2)")
