"""share-weights with per-row codebooks (rows_per_codebook) and data-aware indices
(assign="data-aware"), in PyTorch; their TVM lowerings are in
tests/backends/test_lower_codebook.py (a [5, 2^bits] codebook over uneven row groups)."""

import re

import pytest
import torch
from torch import nn

import graphc
from graphc.errors import PassError
from graphc.ops_codebook import pack
from graphc.passes.share_cluster import groups_of
from graphc.passes.share_kmeans import kmeans_1d, kmeans_rows
from graphc.passes.share_weights import share_weights

Q = torch.ops.graphc


def test_grouped_reference_ops_read_each_rows_codebook_and_sum_gradients_per_group():
    bits, rows, cols = 3, 10, 6
    cb = torch.randn(3, 8, requires_grad=True)  # 3 codebooks over 10 rows: 4 + 4 + 2
    idx = torch.randint(0, 8, (rows, cols))
    packed = pack(idx, bits)
    group = torch.arange(rows) // 4
    want = cb.detach()[group[:, None], idx]
    w = Q.codebook_decode(cb, packed, bits, [rows, cols])
    assert torch.equal(w.detach(), want)
    x = torch.randn(2, cols)
    assert torch.equal(Q.codebook_linear(x, cb, packed, bits, [rows, cols], None).detach(),
                       x @ want.T)
    tokens = torch.tensor([[9, 0, 4]])
    assert torch.equal(Q.codebook_embedding(cb, packed, bits, [rows, cols], tokens).detach(),
                       want[tokens])
    upstream = torch.randn(rows, cols)
    (w * upstream).sum().backward()
    expect = torch.zeros(3, 8).index_put_((group[:, None].expand(rows, cols), idx), upstream,
                                          accumulate=True)
    torch.testing.assert_close(cb.grad, expect)


def test_kmeans_rows_equals_kmeans_1d_on_each_row_and_groups_split_rows_evenly():
    v = torch.randn(6, 500)
    c, i = kmeans_rows(v, 16)
    for r in range(6):
        c1, i1 = kmeans_1d(v[r], 16)
        torch.testing.assert_close(c[r], c1, rtol=0, atol=1e-6)
        assert torch.equal(i[r], i1)
    assert groups_of(10, 4) == (3, 4) and groups_of(10, 6) == (2, 5)  # 5 + 5, not 6 + 4
    assert groups_of(10, 0) == (1, 10) and groups_of(10, 1) == (10, 1)


def _mlp():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(48, 64), nn.ReLU(), nn.Linear(64, 8)).eval()
    with torch.no_grad():  # rows of very different ranges: what one codebook fits badly
        m[0].weight.mul_(torch.logspace(-2, 0, 64)[:, None])
    return m, _inputs(4)


def _inputs(n: int) -> list[tuple]:
    """Correlated, anisotropic inputs (as a trained model's activations): what data-aware
    indices exploit. One fixed mixing matrix; fresh samples on every call."""
    mix = torch.randn(48, 48, generator=torch.Generator().manual_seed(1)) * \
        torch.logspace(-1, 1, 48)[:, None]
    return [(torch.randn(32, 48) @ mix,) for _ in range(n)]


def _out_error(g, m, data) -> float:
    with torch.no_grad():
        return float(sum((g(*x)[0] - m(*x)).norm() ** 2 for x in data) /
                     sum(m(*x).norm() ** 2 for x in data)) ** 0.5


def test_per_row_codebooks_cut_the_error_and_count_their_bytes():
    m, data = _mlp()
    g = graphc.trace(m, data[0])
    one = share_weights(g, bits=3, min_size=0, lowering="decode")
    rows = share_weights(g, bits=3, min_size=0, lowering="decode", rows_per_codebook=1)
    print(rows)
    assert re.search(r"f32\[64, 8\] = param \S*0_weight_codebook", str(rows))  # [rows, 2^3]
    e1, er = (s.meta["share-weights"]["layers"][0]["rel_error"] for s in (one, rows))
    assert er < 0.6 * e1, (e1, er)  # measured 0.52x
    rep = rows.meta["share-weights"]
    assert rep["codebooks"] == 64 + 8 and rep["codebook_bytes"] == 4 * 8 * (64 + 8)
    assert rep["weight_bytes_shared"] == rep["codebook_bytes"] + 3 * 48 * 64 // 8 + 1 + \
        -(-3 * 64 * 8 // 8) + 1
    test = _inputs(2)
    assert _out_error(rows, m, test) < _out_error(one, m, test)


def test_data_aware_indices_cut_the_output_error_on_held_out_inputs():
    m, data = _mlp()
    g = graphc.trace(m, data[0])
    opts = {"bits": 3, "min_size": 0, "lowering": "decode", "rows_per_codebook": 1}
    near = share_weights(g, **opts)
    aware = share_weights(g, assign="data-aware", calibration=data, **opts)
    test = _inputs(4)
    en, ea = _out_error(near, m, test), _out_error(aware, m, test)
    print(f"output error: nearest {en:.4f}, data-aware {ea:.4f}")
    assert ea < 0.8 * en
    # same codebooks, other indices: the weight error can only grow (nearest is optimal)
    wn, wa = (s.meta["share-weights"]["layers"][0]["rel_error"] for s in (near, aware))
    assert wa >= wn


@pytest.mark.parametrize("options, message", [
    ({"rows_per_codebook": -1}, r"rows_per_codebook=-1 must be an int >= 0"),
    ({"rows_per_codebook": 1, "shared": True}, r"contradict each other"),
    ({"assign": "hessian"}, r"assign='hessian' is unknown"),
    ({"assign": "data-aware", "shared": True}, r"does not combine with shared=True"),
])
def test_bad_granularity_options_are_rejected(options, message):
    m, data = _mlp()
    with pytest.raises(PassError, match=message):
        share_weights(graphc.trace(m, data[0]), **options)
