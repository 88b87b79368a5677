"""Sparse-weight ops: what `sparsify` rewrites layers with exactly-zero weights into.

    graphc::bsr_linear(Tensor x, Tensor data, Tensor indices, Tensor indptr, int[] shape,
                       Tensor? bias) -> Tensor
        x [..., K] @ W.T (+ bias), W [N, K] (nn.Linear's layout) in block-sparse rows (BSR)
        with blocks of R x C = data.shape[1:]: block row i (rows i*R .. i*R+R-1 of W) holds
        the blocks indptr[i] .. indptr[i+1]-1; block j is data[j], at columns
        indices[j]*C .. indices[j]*C+C-1. (1, 1) blocks are CSR. A block may hold explicit
        zeros (a block is stored when any of its R*C entries is non-zero).
    graphc::sparse_decode(Tensor values, Tensor mask, int[] shape) -> Tensor
        the dense weight of `shape`: element i (row-major) is the next value of `values` when
        bit i of `mask` is set, else 0. mask is the little-endian bit stream of the non-zero
        pattern (byte j holds elements 8j .. 8j+7), so a weight at sparsity s is stored in
        n/8 + 4*(1-s)*n bytes instead of 4n.

Both ops are differentiable in their float values (data, values) with the sparsity pattern
fixed: fine-tuning a pruned model keeps its zeros. TVM lowerings: backends/tvm/lower_sparse.py.
"""

from __future__ import annotations

import math

import numpy as np
import torch

_NS = "graphc"


# ---- formats ----------------------------------------------------------------------------
def to_bsr(w: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, ...]:
    """Dense [N, K] -> (data f32 [nnzb, R, C], indices i32 [nnzb], indptr i32 [N/R + 1]):
    every R x C block with a non-zero entry is stored."""
    r, c = block
    n, k = w.shape
    blocks = w.reshape(n // r, r, k // c, c).permute(0, 2, 1, 3)  # [N/R, K/C, R, C]
    keep = (blocks != 0).flatten(2).any(-1)                         # [N/R, K/C]
    rows, cols = keep.nonzero(as_tuple=True)                        # row-major order
    indptr = torch.zeros(n // r + 1, dtype=torch.int32)
    indptr[1:] = keep.sum(1).cumsum(0).to(torch.int32)
    return blocks[rows, cols].contiguous(), cols.to(torch.int32), indptr


def bsr_dense(data, indices, indptr, shape) -> torch.Tensor:
    """The dense [N, K] weight of a BSR triple."""
    nnzb, r, c = data.shape
    n, k = shape
    rows = torch.repeat_interleave(torch.arange(n // r), (indptr[1:] - indptr[:-1]).long(),
                                   output_size=nnzb)
    blocks = data.new_zeros(n // r, k // c, r, c)
    blocks = blocks.index_put((rows, indices.long()), data)
    return blocks.permute(0, 2, 1, 3).reshape(n, k)


def bsr_bytes(data, indices, indptr) -> int:
    return 4 * data.numel() + 4 * indices.numel() + 4 * indptr.numel()


def to_masked(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense -> (values f32 [nnz] in row-major order, mask u8 [ceil(n/8)])."""
    flat = w.detach().reshape(-1)
    nz = (flat != 0).numpy()
    mask = torch.from_numpy(np.packbits(nz, bitorder="little"))
    return flat[torch.from_numpy(nz)].clone(), mask


def mask_bits(mask: torch.Tensor, n: int) -> torch.Tensor:
    """The first n bits of a little-endian mask as a bool tensor."""
    return torch.from_numpy(np.unpackbits(mask.numpy(), count=n, bitorder="little")).bool()


def masked_bytes(values, mask) -> int:
    return 4 * values.numel() + mask.numel()


# ---- bsr_linear -------------------------------------------------------------------------
def _check_bsr(data, indices, indptr, shape, op: str) -> None:
    torch._check(data.dim() == 3 and len(shape) == 2, lambda: (
        f"{op}: data must be [nnzb, R, C] and shape [N, K], got {tuple(data.shape)}, {shape}"))
    r, c = data.shape[1], data.shape[2]
    torch._check(shape[0] % r == 0 and shape[1] % c == 0, lambda: (
        f"{op}: blocks {r}x{c} do not tile a weight of {list(shape)}"))
    torch._check(indptr.shape[0] == shape[0] // r + 1 and indices.shape[0] == data.shape[0],
                 lambda: f"{op}: indptr {tuple(indptr.shape)} / indices "
                         f"{tuple(indices.shape)} do not match data {tuple(data.shape)}")


@torch.library.custom_op(f"{_NS}::bsr_linear", mutates_args=())
def bsr_linear(x: torch.Tensor, data: torch.Tensor, indices: torch.Tensor,
               indptr: torch.Tensor, shape: list[int], bias: torch.Tensor | None
               ) -> torch.Tensor:
    """x @ W.T (+ bias), W [N, K] in BSR."""
    y = x @ bsr_dense(data, indices, indptr, shape).T
    return y if bias is None else y + bias


@bsr_linear.register_fake
def _(x, data, indices, indptr, shape, bias):
    _check_bsr(data, indices, indptr, shape, "bsr_linear")
    torch._check(x.shape[-1] == shape[1], lambda: f"bsr_linear: x {tuple(x.shape)} @ W.T, "
                                                  f"W {list(shape)}: sizes differ")
    return x.new_empty((*x.shape[:-1], shape[0]))


def _setup_bsr(ctx, inputs, output):
    x, data, indices, indptr, shape, bias = inputs
    ctx.save_for_backward(x, data, indices, indptr)
    ctx.shape, ctx.has_bias = shape, bias is not None


def _backward_bsr(ctx, grad):
    x, data, indices, indptr = ctx.saved_tensors
    n, k = ctx.shape
    _, r, c = data.shape
    g2, x2 = grad.reshape(-1, n), x.reshape(-1, k)
    gw = (g2.T @ x2).reshape(n // r, r, k // c, c).permute(0, 2, 1, 3)
    rows = torch.repeat_interleave(torch.arange(n // r), (indptr[1:] - indptr[:-1]).long(),
                                   output_size=data.shape[0])
    grad_data = gw[rows, indices.long()]  # only the stored blocks learn
    w = bsr_dense(data, indices, indptr, ctx.shape)
    return grad @ w, grad_data, None, None, None, g2.sum(0) if ctx.has_bias else None


bsr_linear.register_autograd(_backward_bsr, setup_context=_setup_bsr)


# ---- sparse_decode ----------------------------------------------------------------------
@torch.library.custom_op(f"{_NS}::sparse_decode", mutates_args=())
def sparse_decode(values: torch.Tensor, mask: torch.Tensor, shape: list[int]) -> torch.Tensor:
    """The dense weight: values scattered to the set bits of mask, zeros elsewhere."""
    n = math.prod(shape)
    out = values.new_zeros(n)
    out[mask_bits(mask, n)] = values
    return out.reshape(shape)


@sparse_decode.register_fake
def _(values, mask, shape):
    torch._check(mask.dtype == torch.uint8 and mask.shape[0] == -(-math.prod(shape) // 8),
                 lambda: f"sparse_decode: mask {tuple(mask.shape)} {mask.dtype} must be "
                         f"uint8 [ceil(n/8)] for a weight of {list(shape)}")
    return values.new_empty(shape)


def _setup_decode(ctx, inputs, output):
    _values, mask, shape = inputs
    ctx.save_for_backward(mask)
    ctx.shape = shape


def _backward_decode(ctx, grad):
    (mask,) = ctx.saved_tensors
    return grad.reshape(-1)[mask_bits(mask, grad.numel())], None, None


sparse_decode.register_autograd(_backward_decode, setup_context=_setup_decode)

SPARSE_OPS = (torch.ops.graphc.bsr_linear.default, torch.ops.graphc.sparse_decode.default)
