"""TVM lowerings of the codebook ops: decode once (dense weight never in lib.so) and gather."""

import os
import subprocess
import sys
import tempfile
import zipfile

import numpy as np
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


def _lib_bytes(cm) -> int:
    """lib.so's size before the zip compresses it."""
    with tempfile.TemporaryDirectory() as d:
        cm.save(f"{d}/m.graphc")
        with zipfile.ZipFile(f"{d}/m.graphc") as zf:
            return zf.getinfo("runner/lib.so").file_size


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
    """Constant folding must not decode the weight at compile time: lib.so of a 512x512
    4-bit weight is smaller than its fp32 one by about the 7/8 the packing saves (before
    the zip's compression, which also shrinks the fp32 weights a little)."""
    k = 512
    x = torch.randn(2, k)
    dense = nn.Linear(k, k).eval()
    shared = share_weights(graphc.trace(dense, (x,)), bits=4, lowering="decode")
    assert shared.op_histogram()["graphc.codebook_decode"] == 1
    fp32, packed = _lib_bytes(graphc.compile(dense, (x,))), _lib_bytes(graphc.compile(shared))
    saved = k * k * 4 - k * k // 2
    print(f"512x512 linear: lib.so {fp32} -> {packed} bytes (packing saves {saved})")
    assert fp32 - packed >= 0.9 * saved


def test_digits_cnn_keeps_accuracy_and_the_artifact_shrinks():
    from tests.test_qat import _accuracy, _train_digits

    with single_thread():
        g, _, test = _train_digits()
    # +direct: with Winograd (the preset's default) the fp32 file would hold its 16->32 conv's
    # weight transformed, 4x its bytes, and flatter the ratio (tools/artifact_sizes.py too)
    cm32 = graphc.compile(g, target="cpu+direct")
    fp32, a = _accuracy(g, test), _size(cm32)
    sizes = {}
    for rate in (None, 2.6):
        s = share_weights(g, bits=4, lowering="decode", rate=rate)
        cms = graphc.compile(s, target="cpu+direct")
        with torch.no_grad():
            deployed = 100.0 * sum(int((cms(xb).argmax(1) == yb).sum()) for xb, yb in test) / 360
        shared, b = _accuracy(s, test), _size(cms)
        rep = s.meta["share-weights"]
        print(f"digits 4-bit shared, rate {rate}: accuracy fp32 {fp32:.2f}, shared {shared:.2f}, "
              f"on TVM {deployed:.2f}; artifact {a} -> {b} bytes ({b / a:.3f}x); weights "
              f"{rep['weight_bytes_fp32']} -> {rep['weight_bytes_shared']} bytes, indices at "
              f"entropy {rep['index_bytes_at_entropy']}")
        assert shared >= fp32 - 0.5 and abs(deployed - shared) <= 0.3  # one image of 360
        sizes[rate] = b
        if rate is None:
            # The file shrinks by most of the bytes the packing saves (measured 0.83 of them:
            # LZMA with lp=2 stores the fp32 weights in ~0.87 of their bytes, and decoding
            # adds ~0.8 kB of code)
            assert a - b >= 0.8 * (rep["weight_bytes_fp32"] - rep["weight_bytes_shared"])
    # Measured: k-means' 4-bit indices 0.242x, 2.6 bits per index (entropy-constrained, 16
    # centroids) 0.213x. compiled.LZMA_PROPS moved both: the shared lib.so lost 0.5 kB
    # (lc=0), the fp32 one 12.3 kB (lp=2); with zipfile's own LZMA they read 0.223x, 0.197x.
    # The 0.2x at 4-bit k-means is out of reach on this 38k-parameter model: the
    # code, runner and meta both files carry are 13.8 kB zipped, near the 16.6 kB the
    # indices take at their entropy (docs/weight-sharing.md).
    assert sizes[None] <= 0.245 * a
    assert sizes[2.6] <= 0.216 * a


class DecodedConvLinear(nn.Module):
    """A conv and a linear on decoded weights: each needs a relayout (the conv's weight
    prepack, the linear's transpose) before its kernel."""

    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(8, 16, 3, padding=1), nn.Linear(16 * 36, 10)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1))


def _kernel_calls(cm, *inputs) -> list[list[str]]:
    """Kernels the VM runs in its init function (backends/tvm/decode_once.py, run again
    here), then in each of two calls (the VM instrument needs bytecode mode)."""
    from graphc.backends.tvm.decode_once import INIT

    calls = [[]]

    def instrument(func, name, before, ret, *args):
        if before and not name.startswith("vm.builtin."):
            calls[-1].append(name)
        return 0

    cm.runner.vm.set_instrument(instrument)
    cm.runner.vm[INIT]()
    for _ in range(2):
        calls.append([])
        cm(*inputs)
    return calls


def test_decoded_weights_are_decoded_and_relaid_out_at_load_not_per_call(monkeypatch):
    """backends/tvm/decode_chain.py + decode_once.py + decode_permute.py: the decode of a
    weight and its relayout (reshape, transpose, the kernel's weight prepack) run in the
    init function the runner calls at load; the calls of main run neither. The conv's
    relayout is a gather the decode kernel does itself (no relayout kernel at all); the
    linear's prepack pads N = 10 to its tile, so its relayout kernels stay. Outputs
    unchanged."""
    from graphc.backends.tvm import pipeline

    monkeypatch.setattr(pipeline, "EXEC_MODE", "bytecode")
    torch.manual_seed(0)
    m, x = DecodedConvLinear().eval(), torch.randn(2, 8, 6, 6)
    s = share_weights(graphc.trace(m, (x,)), bits=4, lowering="decode", min_size=0)
    assert s.op_histogram()["graphc.codebook_decode"] == 2
    cm = graphc.compile(s, target="cpu")
    init, first, second = _kernel_calls(cm, x)
    print("init:", init, "\nfirst call:", first, "\nsecond call:", second)
    decode = [k for k in init if k.startswith("codebook_decode")]
    relayout = [k for k in init if k not in decode]
    assert len(decode) == 2 and len(set(decode)) == 2  # any-size decode + the fc's own
    assert relayout and all("matmul" in k or "transpose" in k for k in relayout)
    for call in (first, second):
        assert not [k for k in call if k in init]
    # decode_chain.mark_decoded_layout_free: both kernels read their weight packed, as they
    # would a constant one
    layers = [k for k in second if "matmul" in k or "conv" in k]
    assert first == second
    assert len(layers) == 2 and all(k.endswith("_prepacked") for k in layers)
    with torch.no_grad():
        torch.testing.assert_close(cm(x), s(x)[0], rtol=1e-5, atol=1e-5)


def test_board_runner_decodes_at_load(tmp_path):
    """The artifact's own __main__.py (tvm + numpy, no graphc) calls the init function too:
    without it, main would find no decoded weight in the tensor cache."""
    m = Codebooked(3, 5).eval()
    x, idx = torch.randn(3, 5, 75), torch.randint(0, 37, (4, 6))
    graphc.compile(m, (x, idx), target="cpu").save(tmp_path / "m.graphc")
    np.savez(tmp_path / "in.npz", x=x.numpy(), idx=idx.numpy())
    proc = subprocess.run([sys.executable, str(tmp_path / "m.graphc"), "--inputs",
                           str(tmp_path / "in.npz"), "--save-outputs", str(tmp_path / "out.npz")],
                          capture_output=True, text=True, timeout=120, check=False,
                          env={**os.environ, "PYTHONPATH": ""})
    assert proc.returncode == 0, proc.stderr[-800:]
    out = np.load(tmp_path / "out.npz")
    with torch.no_grad():
        want = m(x, idx)
    for name, w in zip(sorted(out.files), want):
        np.testing.assert_allclose(out[name], w.numpy(), rtol=1e-5, atol=1e-5)


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
