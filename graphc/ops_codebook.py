"""Codebook (weight-sharing) ops: what `share-weights` rewrites layers into.

A shared weight is a float32 codebook of 2^bits centroids and one index per weight element,
packed at `bits` bits into a uint8 stream, so the stored model really is ~bits/32 the size.

    graphc::codebook_decode(Tensor codebook, Tensor packed, int bits, int[] shape) -> Tensor
        the dense weight: codebook[unpack(packed)].reshape(shape)
    graphc::codebook_linear(Tensor x, Tensor codebook, Tensor packed, int bits, int[] shape,
                            Tensor? bias) -> Tensor
        shape [N, K] (nn.Linear's layout): x [..., K] @ W.T + bias, W gathered from the
        codebook inside the kernel; an embedding tied to an output projection shares its
        packed indices with it
    graphc::codebook_embedding(Tensor codebook, Tensor packed, int bits, int[] shape,
                               Tensor indices) -> Tensor
        shape [V, D]: the rows W[indices], decoding only those rows

Codebook layout: [2^bits] (one codebook for the whole weight) or [G, 2^bits] (G codebooks
over the weight's rows, i.e. its first axis: row r of an N-row weight reads codebook
r // ceil(N / G); G = N is one codebook per output channel). Per-row codebooks follow each
row's own value range, which one codebook per tensor cannot (MiniLM at 4 bits: mean
embedding cosine 0.947 -> 0.967), for 4 * 2^bits bytes per row.

Packing: element i of the flattened (row-major) index tensor occupies bits [i*b, i*b + b)
of a little-endian bit stream; byte j holds stream bits [8j, 8j + 8). Fields may straddle
two bytes (b = 3, 5, 6, 7), so a reader takes the 16-bit window (p[j] | p[j+1] << 8) >>
(i*b % 8); one trailing pad byte keeps that read in bounds for the last element.

The codebook is a trainable parameter; the indices are fixed. Each op's codebook gradient
is the sum of the gradients of every weight element that points at the centroid
(centroid fine-tuning, Han et al. 2016). TVM lowerings: backends/tvm/lower_codebook.py.
"""

from __future__ import annotations

import math

import numpy as np
import torch

_NS = "graphc"
BITS = tuple(range(2, 9))


def packed_length(n: int, bits: int) -> int:
    """Bytes holding n fields of `bits` bits, plus the pad byte for the 16-bit window read."""
    return (n * bits + 7) // 8 + 1


def pack(indices: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer indices in [0, 2^bits) -> uint8 [packed_length(n, bits)] (any shape in)."""
    if bits not in BITS:
        raise ValueError(f"pack: bits={bits} must be one of {list(BITS)}")
    idx = indices.reshape(-1).to(torch.int64).numpy()
    if idx.size and (idx.min() < 0 or idx.max() >= 1 << bits):
        raise ValueError(f"pack: indices span [{idx.min()}, {idx.max()}], outside the "
                         f"{bits}-bit range [0, {(1 << bits) - 1}]")
    out = np.zeros(packed_length(idx.size, bits), np.uint8)
    stream = np.zeros(idx.size * bits, np.uint8)
    for j in range(bits):  # bit j of element i goes to stream position i*bits + j
        stream[j::bits] = (idx >> j) & 1
    packed = np.packbits(stream, bitorder="little")
    out[:packed.size] = packed
    return torch.from_numpy(out)


def unpack(packed: torch.Tensor, bits: int, positions: torch.Tensor) -> torch.Tensor:
    """The fields at element `positions` (int64, any shape) as int64 indices."""
    start = positions * bits
    byte = start >> 3
    p = packed.to(torch.int64)
    window = p[byte] | (p[byte + 1] << 8)
    return (window >> (start & 7)) & ((1 << bits) - 1)


def rows_per_codebook(codebook: torch.Tensor, shape) -> int:
    """How many consecutive weight rows share one codebook row (all of them for [2^bits])."""
    return shape[0] if codebook.dim() == 1 else -(-shape[0] // codebook.shape[0])


def _flat_index(codebook, packed, bits: int, shape, positions: torch.Tensor) -> torch.Tensor:
    """Indices into codebook.reshape(-1) of the elements at `positions` of the weight."""
    fields = unpack(packed, bits, positions)
    if codebook.dim() == 1:
        return fields
    row = positions // (math.prod(shape) // shape[0])
    return row // rows_per_codebook(codebook, shape) * (1 << bits) + fields


def decode_reference(codebook, packed, bits: int, shape) -> torch.Tensor:
    flat = _flat_index(codebook, packed, bits, shape, torch.arange(math.prod(shape)))
    return codebook.reshape(-1)[flat].reshape(shape)


def _codebook_grad(codebook, packed, bits, shape, grad_w: torch.Tensor, positions=None):
    """Sum of the element gradients into each centroid."""
    if positions is None:
        positions = torch.arange(grad_w.numel())
    idx = _flat_index(codebook, packed, bits, shape, positions.reshape(-1))
    flat = torch.zeros(codebook.numel(), dtype=codebook.dtype)
    return flat.index_add_(0, idx, grad_w.reshape(-1).to(codebook.dtype)).reshape(
        codebook.shape)


def _check_codebook(codebook, bits: int, shape, op: str) -> None:
    torch._check(codebook.shape[-1] == 1 << bits and codebook.dim() in (1, 2), lambda: (
        f"{op}: codebook {tuple(codebook.shape)} must be [2^bits] or [G, 2^bits] "
        f"(bits={bits})"))
    torch._check(codebook.dim() == 1 or codebook.shape[0] <= shape[0], lambda: (
        f"{op}: {codebook.shape[0]} codebooks for a weight of {shape[0]} rows"))


# ---- codebook_decode ------------------------------------------------------------------
@torch.library.custom_op(f"{_NS}::codebook_decode", mutates_args=())
def codebook_decode(codebook: torch.Tensor, packed: torch.Tensor, bits: int,
                    shape: list[int]) -> torch.Tensor:
    """The dense weight codebook[unpack(packed)] of `shape`."""
    return decode_reference(codebook, packed, bits, shape)


@codebook_decode.register_fake
def _(codebook, packed, bits, shape):
    _check_codebook(codebook, bits, shape, "codebook_decode")
    return codebook.new_empty(shape)


def _setup_decode(ctx, inputs, output):
    codebook, packed, bits, _shape = inputs
    ctx.save_for_backward(codebook, packed)
    ctx.bits, ctx.shape = bits, _shape


def _backward_decode(ctx, grad):
    codebook, packed = ctx.saved_tensors
    return _codebook_grad(codebook, packed, ctx.bits, ctx.shape, grad), None, None, None


codebook_decode.register_autograd(_backward_decode, setup_context=_setup_decode)


# ---- codebook_linear ------------------------------------------------------------------
@torch.library.custom_op(f"{_NS}::codebook_linear", mutates_args=())
def codebook_linear(x: torch.Tensor, codebook: torch.Tensor, packed: torch.Tensor, bits: int,
                    shape: list[int], bias: torch.Tensor | None) -> torch.Tensor:
    """x @ W.T (+ bias), W [N, K] gathered from the codebook."""
    y = x @ decode_reference(codebook, packed, bits, shape).T
    return y if bias is None else y + bias


@codebook_linear.register_fake
def _(x, codebook, packed, bits, shape, bias):
    _check_codebook(codebook, bits, shape, "codebook_linear")
    torch._check(x.shape[-1] == shape[1], lambda: f"codebook_linear: x {tuple(x.shape)} @ "
                                                  f"W.T, W {tuple(shape)}: sizes differ")
    return x.new_empty((*x.shape[:-1], shape[0]))


def _setup_linear(ctx, inputs, output):
    x, codebook, packed, bits, shape, bias = inputs
    ctx.save_for_backward(x, codebook, packed)
    ctx.bits, ctx.shape, ctx.has_bias = bits, shape, bias is not None


def _backward_linear(ctx, grad):
    x, codebook, packed = ctx.saved_tensors
    w = decode_reference(codebook, packed, ctx.bits, ctx.shape)
    g2, x2 = grad.reshape(-1, grad.shape[-1]), x.reshape(-1, x.shape[-1])
    grad_cb = _codebook_grad(codebook, packed, ctx.bits, ctx.shape, g2.T @ x2)
    grad_bias = g2.sum(0) if ctx.has_bias else None
    return grad @ w, grad_cb, None, None, None, grad_bias


codebook_linear.register_autograd(_backward_linear, setup_context=_setup_linear)


# ---- codebook_embedding ---------------------------------------------------------------
def _row_positions(indices: torch.Tensor, dim: int) -> torch.Tensor:
    return indices.to(torch.int64).unsqueeze(-1) * dim + torch.arange(dim)


@torch.library.custom_op(f"{_NS}::codebook_embedding", mutates_args=())
def codebook_embedding(codebook: torch.Tensor, packed: torch.Tensor, bits: int,
                       shape: list[int], indices: torch.Tensor) -> torch.Tensor:
    """Rows W[indices] of a [V, D] table, decoding only the rows asked for."""
    flat = _flat_index(codebook, packed, bits, shape, _row_positions(indices, shape[1]))
    return codebook.reshape(-1)[flat]


@codebook_embedding.register_fake
def _(codebook, packed, bits, shape, indices):
    _check_codebook(codebook, bits, shape, "codebook_embedding")
    return codebook.new_empty((*indices.shape, shape[1]))


def _setup_embedding(ctx, inputs, output):
    codebook, packed, bits, shape, indices = inputs
    ctx.save_for_backward(codebook, packed, indices)
    ctx.bits, ctx.shape = bits, shape


def _backward_embedding(ctx, grad):
    codebook, packed, indices = ctx.saved_tensors
    positions = _row_positions(indices, ctx.shape[1])
    grad_cb = _codebook_grad(codebook, packed, ctx.bits, ctx.shape, grad, positions)
    return grad_cb, None, None, None, None


codebook_embedding.register_autograd(_backward_embedding, setup_context=_setup_embedding)

CODEBOOK_OPS = (torch.ops.graphc.codebook_decode.default,
                torch.ops.graphc.codebook_linear.default,
                torch.ops.graphc.codebook_embedding.default)
