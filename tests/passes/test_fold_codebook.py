"""fold-fake-quant after share-weights (passes/fold_codebook.py): the int8 weight stays b-bit
indices with one int8 codebook row per output channel, bit-exact to folding the dense weight."""

import torch
from torch import nn

import graphc
from graphc.passes.fold_fake_quant import fold_fake_quant
from graphc.passes.share_weights import share_weights
from tests.single_thread import one_torch_thread  # noqa: F401  (autouse fixture)


class Net(nn.Module):
    """A padded conv, nn.Linear-style addmm, and odd sizes (37 rows, 5x5 pixels)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.fc1, self.fc2 = nn.Linear(16 * 25, 37), nn.Linear(37, 10)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(torch.relu(self.conv(x)).flatten(1))))


def _graphs(rows_per_codebook: int = 0):
    torch.manual_seed(0)
    x = torch.randn(4, 3, 5, 5)
    g = graphc.trace(Net().eval(), (x,))
    s = share_weights(g, bits=4, min_size=0, lowering="decode",
                      rows_per_codebook=rows_per_codebook)
    calib = [(torch.randn(4, 3, 5, 5),) for _ in range(4)]
    return x, graphc.quantize(s, calibration=calib)


def _dense_fold(q, monkeypatch):
    """The same fold with the codebook path off (the dense int8 weights)."""
    import graphc.passes.fold_fake_quant as ffq

    with monkeypatch.context() as m:
        m.setattr(ffq, "codebook_int8", lambda *a, **k: None)
        return fold_fake_quant(q)


def test_int8_codebook_keeps_the_indices_and_is_bit_exact(monkeypatch):
    for rows in (0, 4):  # one codebook per weight; one per 4 rows
        x, q = _graphs(rows)
        f, dense = fold_fake_quant(q), _dense_fold(q, monkeypatch)
        hist, dense_hist = f.op_histogram(), dense.op_histogram()
        print(rows, dict(hist))
        # every layer folded to an integer op, each reading a decoded int8 codebook weight
        assert hist["graphc.qconv2d"] == 1 and hist["graphc.qlinear"] == 2
        assert hist["graphc.codebook_decode"] == 3 and "graphc.codebook_decode" not in dense_hist
        codebooks = [t for n, t in f.weights().items() if n.endswith("_codebook_int8")]
        assert len(codebooks) == 3 and all(t.dtype == torch.int8 and t.shape[1] == 16
                                           for t in codebooks)
        # b-bit indices + 16 bytes per channel instead of a dense int8 copy
        assert f.stats()["param_bytes"] < 0.7 * dense.stats()["param_bytes"]
        with torch.no_grad():
            torch.testing.assert_close(f(x)[0], dense(x)[0], rtol=0, atol=0)


def test_tvm_runs_the_int8_codebook_graph_like_pytorch():
    x, q = _graphs()
    f = fold_fake_quant(q)
    cm = graphc.compile(f, target="cpu")
    with torch.no_grad():
        want = f(x)[0]
    for _ in range(2):  # decoded on the first call, cached after
        torch.testing.assert_close(cm(x), want, rtol=1e-5, atol=1e-5)


def test_a_decoded_weight_that_is_not_a_pure_relayout_folds_densely():
    """Negative case: an op that changes values between the decode and the fake-quant (here
    a scaling the graph applies to the decoded weight) leaves no per-row int8 codebook that
    reproduces the int8 weight: the fold falls back to a dense int8 weight."""
    _, q = _graphs()
    gm = q.gm
    dec = next(n for n in gm.graph.nodes if n.target is torch.ops.graphc.codebook_decode.default)
    with gm.graph.inserting_after(dec):
        scaled = gm.graph.call_function(torch.ops.aten.mul.Tensor, (dec, 1.5))
    dec.replace_all_uses_with(scaled)
    scaled.args = (dec, 1.5)
    gm.recompile()
    f = fold_fake_quant(q)
    assert f.op_histogram()["graphc.codebook_decode"] == 2  # the other two layers keep theirs
