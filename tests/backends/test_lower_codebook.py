"""TVM lowerings of the codebook ops: decode once (dense weight never in lib.so) and gather."""

import os
import tempfile

import pytest
import torch
from torch import nn

import graphc
from graphc.ops_codebook import pack
from graphc.passes.share_weights import share_weights
from tests.single_thread import one_torch_thread, single_thread  # noqa: F401  (autouse)

Q = torch.ops.graphc


class Codebooked(nn.Module):
    """All three ops at an odd bit width and sizes whose bit count is not a multiple of 8."""

    def __init__(self, bits: int, groups: int = 0, n: int = 96, k: int = 75, vocab: int = 37,
                 dim: int = 19):
        super().__init__()
        self.bits, self.sizes = bits, ([n, k], [vocab, dim])
        # groups > 0: [groups, 2^bits], rows split unevenly (96 = 4 x 20 + 16, 37 = 4 x 8 + 5)
        self.codebook = nn.Parameter(torch.randn(groups, 1 << bits) if groups
                                     else torch.randn(1 << bits))
        self.register_buffer("w", pack(torch.randint(0, 1 << bits, (n, k)), bits))
        self.register_buffer("e", pack(torch.randint(0, 1 << bits, (vocab, dim)), bits))
        self.bias = nn.Parameter(torch.randn(n))

    def forward(self, x, idx):
        args = (self.codebook, self.w, self.bits, self.sizes[0])
        dense = nn.functional.linear(x, Q.codebook_decode(*args), self.bias)
        gathered = Q.codebook_linear(x, *args, self.bias)
        rows = Q.codebook_embedding(self.codebook, self.e, self.bits, self.sizes[1], idx)
        return dense, gathered, rows


def _size(cm) -> int:
    with tempfile.TemporaryDirectory() as d:
        cm.save(f"{d}/m.graphc")
        return os.path.getsize(f"{d}/m.graphc")


@pytest.mark.parametrize("bits, groups", [(3, 0), (4, 0), (3, 5)])
def test_tvm_matches_pytorch_before_and_after_the_first_call_and_after_load(bits, groups):
    m = Codebooked(bits, groups).eval()
    x, idx = torch.randn(3, 5, 75), torch.randint(0, 37, (4, 6))
    cm = graphc.compile(m, (x, idx), target="cpu")
    with torch.no_grad():
        ref = m(x, idx)
    for _ in range(2):  # the first call decodes, the second reads the cached weight
        for got, want in zip(cm(x, idx), ref):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    x2 = torch.randn(3, 5, 75)
    with torch.no_grad(), tempfile.TemporaryDirectory() as d:
        cm.save(f"{d}/m.graphc")
        loaded = graphc.load(f"{d}/m.graphc")
        for got, want in zip(loaded(x2, idx), m(x2, idx)):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_lib_holds_packed_indices_not_the_dense_weight():
    """Constant folding must not decode the weight at compile time: the artifact of a
    512x512 4-bit weight is smaller than its fp32 one by about the 7/8 the packing saves."""
    k = 512
    x = torch.randn(2, k)
    dense = nn.Linear(k, k).eval()
    shared = share_weights(graphc.trace(dense, (x,)), bits=4, lowering="decode")
    assert shared.op_histogram()["graphc.codebook_decode"] == 1
    fp32, packed = _size(graphc.compile(dense, (x,))), _size(graphc.compile(shared))
    saved = k * k * 4 - k * k // 2
    print(f"512x512 linear: artifact {fp32} -> {packed} bytes (packing saves {saved})")
    assert fp32 - packed >= 0.9 * saved


def test_digits_cnn_keeps_accuracy_and_the_artifact_shrinks():
    from tests.test_qat import _accuracy, _train_digits

    with single_thread():
        g, _, test = _train_digits()
    s = share_weights(g, bits=4, lowering="decode")
    cm32, cms = graphc.compile(g, target="cpu"), graphc.compile(s, target="cpu")
    with torch.no_grad():
        deployed = 100.0 * sum(int((cms(xb).argmax(1) == yb).sum()) for xb, yb in test) / 360
    fp32, shared = _accuracy(g, test), _accuracy(s, test)
    a, b = _size(cm32), _size(cms)
    rep = s.meta["share-weights"]
    print(f"digits 4-bit shared: accuracy fp32 {fp32:.2f}, shared {shared:.2f}, on TVM "
          f"{deployed:.2f}; artifact {a} -> {b} bytes ({b / a:.3f}x); weights "
          f"{rep['weight_bytes_fp32']} -> {rep['weight_bytes_shared']} bytes")
    assert shared >= fp32 - 0.5 and abs(deployed - shared) <= 0.3  # one image of 360 at most
    # The file shrinks by most of the bytes the packing saves (measured 0.80 of them): the
    # zip already squeezed ~7% out of the fp32 weights, and the decode kernels add code.
    # The 0.2x the issue asks for is out of reach on this model: the fp32 model's own code,
    # runner and meta are 18 kB zipped (docs/weight-sharing.md), about its 4-bit weights
    # (19 kB, ~17 kB deflated); with both, the file cannot go below ~0.22x.
    assert a - b >= 0.75 * (rep["weight_bytes_fp32"] - rep["weight_bytes_shared"])


class DecodedConvLinear(nn.Module):
    """A conv and a linear on decoded weights: each needs a relayout (the conv's weight
    prepack, the linear's transpose) before its kernel."""

    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(8, 16, 3, padding=1), nn.Linear(16 * 36, 10)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1))


def _kernel_calls(cm, *inputs) -> list[list[str]]:
    """Kernels the VM runs in each of two calls (the VM instrument needs bytecode mode)."""
    calls = []

    def instrument(func, name, before, ret, *args):
        if before and not name.startswith("vm.builtin."):
            calls[-1].append(name)
        return 0

    cm.runner.vm.set_instrument(instrument)
    for _ in range(2):
        calls.append([])
        cm(*inputs)
    return calls


def test_decoded_weights_are_relaid_out_once_not_per_call(monkeypatch):
    """backends/tvm/decode_chain.py: the relayout of a decoded weight (reshape, transpose,
    the kernel's weight prepack) runs on the first call only: it moved into the cached
    decode-once branch. Outputs unchanged."""
    from graphc.backends.tvm import pipeline

    monkeypatch.setattr(pipeline, "EXEC_MODE", "bytecode")
    torch.manual_seed(0)
    m, x = DecodedConvLinear().eval(), torch.randn(2, 8, 6, 6)
    s = share_weights(graphc.trace(m, (x,)), bits=4, lowering="decode", min_size=0)
    assert s.op_histogram()["graphc.codebook_decode"] == 2
    cm = graphc.compile(s, target="cpu")
    first, second = _kernel_calls(cm, x)
    relayout = [k for k in first if "weight_prepack" in k or "transpose" in k]
    print("first call:", first, "\nsecond call:", second)
    assert relayout and not [k for k in second if k in relayout]
    assert len([k for k in second if "decode" in k and "once" not in k]) == 0
    # decode_chain.mark_decoded_layout_free: both kernels read their weight packed, as they
    # would a constant one
    layers = [k for k in second if "matmul" in k or "conv" in k]
    assert len(layers) == 2 and all(k.endswith("_prepacked") for k in layers)
    with torch.no_grad():
        torch.testing.assert_close(cm(x), s(x)[0], rtol=1e-5, atol=1e-5)


def test_two_layouts_of_one_shared_model_do_not_share_a_cache_entry():
    """The tensor cache is process-wide and the cached weight is in its kernels' layout: the
    same shared model built for two CPUs with different vector widths (different packing)
    in one process must not read each other's entries (decode_chain adds a layout hash)."""
    torch.manual_seed(0)
    m, x = DecodedConvLinear().eval(), torch.randn(2, 8, 6, 6)
    s = share_weights(graphc.trace(m, (x,)), bits=4, lowering="decode", min_size=0)
    wide = graphc.compile(s, target="cpu")
    narrow = graphc.compile(s, target={"kind": "llvm", "mcpu": "x86-64", "num-cores": 2})
    with torch.no_grad():
        want = s(x)[0]
    for cm in (wide, narrow, wide, narrow):
        torch.testing.assert_close(cm(x), want, rtol=1e-5, atol=1e-5)
