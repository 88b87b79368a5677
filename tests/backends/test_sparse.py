"""Sparse-weight ops (graphc/ops_sparse.py) in PyTorch and on TVM (backends/tvm/lower_sparse.py)."""

import os
import tempfile

import pytest
import torch
from torch import nn

import graphc
from graphc.ops_sparse import bsr_dense, mask_bits, to_bsr, to_masked
from graphc.passes.sparsify import sparsify
from tests.single_thread import one_torch_thread  # noqa: F401  (autouse)

Q = torch.ops.graphc


def _sparse_weight(n: int, k: int, sparsity: float, seed: int = 0) -> torch.Tensor:
    """Random zeros, plus an all-zero row and a dense row (the kernels' edge cases)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    w[torch.rand(n, k, generator=g) < sparsity] = 0
    w[1] = 0
    if n > 3:
        w[3] = torch.randn(k, generator=g)
    return w


class BSR(nn.Module):
    def __init__(self, w, block, bias=True):
        super().__init__()
        data, indices, indptr = to_bsr(w, block)
        self.data = nn.Parameter(data)
        self.register_buffer("indices", indices)
        self.register_buffer("indptr", indptr)
        self.bias = nn.Parameter(torch.randn(w.shape[0])) if bias else None
        self.shape = list(w.shape)

    def forward(self, x):
        return Q.bsr_linear(x, self.data, self.indices, self.indptr, self.shape, self.bias)


@pytest.mark.parametrize("block", [(1, 1), (4, 1), (2, 3)])
def test_bsr_round_trip_and_reference(block):
    w = _sparse_weight(36, 21, 0.8)
    data, indices, indptr = to_bsr(w, block)
    assert data.shape[1:] == block and indptr.shape == (36 // block[0] + 1,)
    assert indptr[1 // block[0] + 1] - indptr[1 // block[0]] < 21 // block[1] + (block[0] > 1)
    assert torch.equal(bsr_dense(data, indices, indptr, [36, 21]), w)
    x, b = torch.randn(2, 5, 21), torch.randn(36)
    torch.testing.assert_close(Q.bsr_linear(x, data, indices, indptr, [36, 21], b),
                               x @ w.T + b, rtol=1e-5, atol=1e-5)


def test_gradients_reach_only_the_stored_values():
    w = _sparse_weight(12, 10, 0.7)
    x = torch.randn(4, 10)
    data, indices, indptr = to_bsr(w, (1, 1))
    data.requires_grad_()
    Q.bsr_linear(x, data, indices, indptr, [12, 10], None).square().sum().backward()
    dense = w.clone().requires_grad_()
    (x @ dense.T).square().sum().backward()
    torch.testing.assert_close(data.grad.reshape(-1), dense.grad[w != 0], rtol=1e-5, atol=1e-5)
    values, mask = to_masked(w)
    values.requires_grad_()
    (x @ Q.sparse_decode(values, mask, [12, 10]).T).square().sum().backward()
    torch.testing.assert_close(values.grad, dense.grad[w != 0], rtol=1e-5, atol=1e-5)


def test_bitmask_storage_round_trip():
    w = _sparse_weight(7, 9, 0.9)  # 63 elements: the mask's last byte is partial
    values, mask = to_masked(w)
    assert mask.dtype == torch.uint8 and mask.numel() == 8 and values.numel() == (w != 0).sum()
    assert torch.equal(mask_bits(mask, 63), (w != 0).reshape(-1))
    assert torch.equal(Q.sparse_decode(values, mask, [7, 9]), w)


# batch 1 (the gemv kernel), batch > 1 not a multiple of the row tile, 3-D inputs
@pytest.mark.parametrize("block, x_shape, bias", [
    ((1, 1), (1, 21), True), ((1, 1), (5, 21), False), ((1, 1), (2, 19, 21), True),
    ((4, 1), (1, 21), False), ((4, 1), (33, 21), True), ((2, 3), (3, 21), True)])
def test_tvm_bsr_linear_matches_dense_torch(block, x_shape, bias):
    w = _sparse_weight(36, 21, 0.8)
    m = BSR(w, block, bias).eval()
    x = torch.randn(x_shape)
    cm = graphc.compile(m, (x,))
    want = x @ w.T + (m.bias.detach() if bias else 0)
    torch.testing.assert_close(cm(x), want, rtol=1e-5, atol=1e-5)


def test_tvm_all_zero_weight_gives_the_bias():
    m = BSR(torch.zeros(8, 5), (1, 1)).eval()
    x = torch.randn(3, 5)
    assert m.data.shape[0] == 0
    torch.testing.assert_close(graphc.compile(m, (x,))(x), m.bias.detach().expand(3, 8))


def _size(cm) -> int:
    with tempfile.TemporaryDirectory() as d:
        cm.save(f"{d}/m.graphc")
        return os.path.getsize(f"{d}/m.graphc")


def test_artifact_shrinks_with_storage_and_kernel_and_runs_after_load():
    """An 80%-sparse 512x512 linear: the zip already compresses the zeros of the dense file
    (LZMA, graphc/compiled.py: ~0.24x of the fp32 weight, close to the entropy of 80% zeros
    and 20% floats), the bitmask + values file must still be smaller."""
    torch.manual_seed(0)
    lin = nn.Linear(512, 512).eval()
    lin.weight.data = _sparse_weight(512, 512, 0.8)
    x = torch.randn(2, 512)
    g = graphc.trace(lin, (x,))
    dense = _size(graphc.compile(g))
    sizes = {}
    for mode in ("storage", "kernel"):
        cm = graphc.compile(sparsify(g, mode=mode))
        sizes[mode] = _size(cm)
        with tempfile.TemporaryDirectory() as d:
            cm.save(f"{d}/m.graphc")
            loaded = graphc.load(f"{d}/m.graphc")
            for _ in range(2):  # decoded at load: both calls read the cached weight
                torch.testing.assert_close(loaded(x), lin(x), rtol=1e-5, atol=1e-5)
    print(f"512x512 linear, 80% zeros: artifact dense {dense}, storage {sizes['storage']}, "
          f"kernel {sizes['kernel']} bytes; fp32 weight {512 * 512 * 4}")
    # storage: 0.2 * 4 + 1/8 bytes per weight raw; measured 0.92x of the dense file (0.85x
    # when the zip only deflated: deflate codes the zeros less well than LZMA)
    assert sizes["storage"] < 0.95 * dense
    assert sizes["kernel"] < dense  # CSR: 8 bytes per non-zero, deflates a little
