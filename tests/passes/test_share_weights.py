"""share-weights (k-means codebooks, packed indices) and dedupe-weights, in PyTorch."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import graphc
from graphc.ops_codebook import BITS, decode_reference, pack, packed_length, unpack
from graphc.passes.dedupe_weights import dedupe_weights
from graphc.passes.share_kmeans import kmeans_1d
from graphc.passes.share_weights import share_weights
from tests.models.zoo import build

Q = torch.ops.graphc


@pytest.mark.parametrize("bits", BITS)
def test_pack_round_trip_every_width(bits):
    for n in (1, 7, 13, 1003):  # 1003 * b is not a multiple of 8 for odd b
        idx = torch.randint(0, 1 << bits, (n,))
        packed = pack(idx, bits)
        assert packed.dtype == torch.uint8 and packed.numel() == packed_length(n, bits)
        assert packed.numel() == -(-n * bits // 8) + 1  # b bits each, plus the pad byte
        assert torch.equal(unpack(packed, bits, torch.arange(n)), idx)


def test_pack_rejects_indices_outside_the_width():
    with pytest.raises(ValueError, match="outside the 3-bit range"):
        pack(torch.tensor([0, 8]), 3)


def test_reference_ops_equal_dense_decode():
    bits, cb = 3, torch.randn(8)
    idx = torch.randint(0, 8, (24, 10))
    packed = pack(idx, bits)
    w = decode_reference(cb, packed, bits, [24, 10])
    assert torch.equal(w, cb[idx])
    x, b = torch.randn(2, 5, 10), torch.randn(24)
    assert torch.equal(Q.codebook_linear(x, cb, packed, bits, [24, 10], b), x @ w.T + b)
    rows = torch.randint(0, 24, (3, 4))
    assert torch.equal(Q.codebook_embedding(cb, packed, bits, [24, 10], rows), w[rows])


def test_kmeans_is_lloyd_optimal_and_exact_on_few_values():
    x = torch.randn(20000)
    c, i = kmeans_1d(x, 16)
    assert torch.all(c[1:] > c[:-1])
    for j in range(16):  # each centroid is the mean of its members (a Lloyd fixed point)
        torch.testing.assert_close(c[j], x[i == j].mean(), rtol=1e-5, atol=1e-6)
    few = torch.tensor([0.5, -1.0, 0.5, 2.0])
    c, i = kmeans_1d(few, 4)
    assert torch.equal(c[i], few)  # 3 distinct values, 4 centroids: lossless


def test_mlp_ir_before_after_and_error_shrinks_with_bits():
    m, x = build("mlp")
    g = graphc.trace(m, x)
    s = share_weights(g, bits=4, min_size=0, lowering="decode")
    print("before:", dict(g.op_histogram()), "\nafter:", dict(s.op_histogram()), "\n", s)
    assert s.op_histogram()["graphc.codebook_decode"] == 3
    assert s.op_histogram()["aten.addmm"] == 3
    assert "fc1_weight" not in dict(s.gm.named_parameters())  # the float weight is gone
    assert s.weights()["fc1_weight_packed"].dtype == torch.uint8
    ref = g(*x)[0]
    errors = []
    for bits in (2, 4, 8):
        out = share_weights(g, bits=bits, min_size=0, lowering="decode")(*x)[0].detach()
        errors.append(float((out - ref).norm() / ref.norm()))
    print("MLP output rel error at 2/4/8 bits:", errors)
    assert errors[0] > errors[1] > errors[2] and errors[2] < 0.01
    assert torch.equal(g(*x)[0], ref)  # the input graph is untouched


def test_nothing_selected_returns_the_input():
    m, x = build("mlp")
    g = graphc.trace(m, x)
    assert share_weights(g, min_size=10**6) is g


def test_gather_form_and_report():
    m, x = build("mlp")
    g = graphc.trace(m, x)
    s = share_weights(g, bits=5, min_size=0, lowering="gather")
    assert s.op_histogram()["graphc.codebook_linear"] == 3 and "aten.addmm" not in s.op_histogram()
    d = share_weights(g, bits=5, min_size=0, lowering="decode")
    torch.testing.assert_close(s(*x)[0], d(*x)[0], rtol=1e-5, atol=1e-6)
    rep = s.meta["share-weights"]
    assert [r["lowering"] for r in rep["layers"]] == ["gather"] * 3
    assert rep["weight_bytes_shared"] < rep["weight_bytes_fp32"] * 5 / 32 + 3 * 32 * 4 + 16


def test_shared_codebook_is_one_parameter():
    m, x = build("mlp")
    s = share_weights(graphc.trace(m, x), bits=4, min_size=0, shared=True, lowering="decode")
    books = {n for n, _ in s.gm.named_parameters() if n.endswith("codebook")}
    assert books == {"shared4_codebook"} and s.meta["share-weights"]["codebooks"] == 1


@pytest.mark.parametrize("option, message", [
    ("bits=0", "bits=0 is not supported; choose one of [2, 3, 4, 5, 6, 7, 8]"),
    ("bits=9", "bits=9 is not supported"),
    ("include=[nope]", "include pattern 'nope' matches no layer; layers with a weight: addmm"),
    ("ops=[attention]", "unknown layer classes ['attention']"),
])
def test_bad_options_are_rejected(option, message):
    m, x = build("mlp")
    with pytest.raises(graphc.PassError, match=r"pass 'share-weights': .*" + message.replace(
            "[", r"\[").replace("]", r"\]").replace("(", r"\(")):
        graphc.run_pipeline(graphc.trace(m, x), f"share-weights({option})")


def test_gather_on_a_conv_names_the_node():
    m, x = build("conv_bn_residual")
    with pytest.raises(graphc.PassError, match=r"lowering=gather, but %convolution.* cannot "
                                               r"gather: no in-kernel gather lowering"):
        share_weights(graphc.trace(m, x), min_size=0, lowering="gather")


class TiedLM(nn.Module):
    """Embedding and output projection share one parameter; b is an untied copy of a."""

    def __init__(self):
        super().__init__()
        self.emb, self.head = nn.Embedding(100, 32), nn.Linear(32, 100, bias=False)
        self.head.weight = self.emb.weight
        self.a, self.b = nn.Linear(32, 32), nn.Linear(32, 32)
        self.b.weight.data.copy_(self.a.weight.data)

    def forward(self, i):
        return self.head(self.b(self.a(self.emb(i))))


def test_dedupe_and_tied_weights_stored_once():
    i = torch.randint(0, 100, (2, 7))
    g = graphc.trace(TiedLM(), (i,))
    d = dedupe_weights(g)
    print(d)
    assert d.meta["dedupe-weights"]["merged"] == [["b_weight", "a_weight", "equal"]]
    assert d.stats()["param_bytes"] == g.stats()["param_bytes"] - 32 * 32 * 4
    assert torch.equal(d(i)[0], g(i)[0])
    assert dedupe_weights(d) is d
    s = share_weights(d, bits=4, min_size=0, lowering="gather")
    arg = {Q.codebook_linear.default: 2, Q.codebook_embedding.default: 1}  # the packed one
    packed = {str(n.args[arg[n.target]].target) for n in s.nodes if n.target in arg}
    assert packed == {"head_weight_packed", "a_weight_packed"}  # emb + head read one buffer


def test_centroid_gradients_are_member_sums_and_finetuning_helps():
    m, x = build("mlp")
    g = graphc.trace(m, x)
    s = share_weights(g, bits=2, min_size=0, lowering="gather")
    cb = s.gm.get_parameter("fc2_weight_codebook")
    s.gm(*x)[0].square().sum().backward()
    # reference: dL/dW through a dense copy of the shared weights, summed per centroid
    idx = unpack(s.weights()["fc2_weight_packed"], 2, torch.arange(64 * 32)).reshape(32, 64)
    m.fc2.weight.data = cb.detach()[idx].clone()
    for name in ("fc1", "fc3"):
        ci = unpack(s.weights()[f"{name}_weight_packed"], 2, torch.arange(
            getattr(m, name).weight.numel())).reshape(getattr(m, name).weight.shape)
        getattr(m, name).weight.data = s.gm.get_parameter(f"{name}_weight_codebook").detach()[ci]
    m.zero_grad()
    m(*x).square().sum().backward()
    want = torch.zeros(4).index_add_(0, idx.reshape(-1), m.fc2.weight.grad.reshape(-1))
    torch.testing.assert_close(cb.grad, want, rtol=1e-5, atol=1e-5)

    torch.manual_seed(1)
    data = [(xi, g(xi)[0].detach()) for xi in (torch.randn(4, 20) for _ in range(16))]

    def mse(h):
        with torch.no_grad():
            return sum(F.mse_loss(h(xi)[0], yi).item() for xi, yi in data) / len(data)

    t = graphc.qat.train(s, data, F.mse_loss, epochs=10, lr=3e-3)
    print(f"2-bit MLP, centroid fine-tuning: MSE {mse(s):.2e} -> {mse(t):.2e}")
    # 4 centroids per layer bound what training can recover: measured 2.55e-3 -> 1.81e-3
    assert mse(t) < 0.8 * mse(s)
    assert torch.equal(t.weights()["fc2_weight_packed"], s.weights()["fc2_weight_packed"])
