"""How each sparse layer runs: the sparse kernel, or the dense kernel on a weight stored compressed.

    kernel    graphc.bsr_linear: the BSR kernel (backends/tvm/lower_sparse.py) multiplies
              only the stored blocks; wins when there are few enough of them
    storage   graphc.sparse_decode feeds the layer's own op: the file holds a bitmask and
              the non-zero values, the dense weight is rebuilt once at load and
              the tuned dense kernel runs ("smaller, not faster")

`auto` compiles the layer alone both ways on the target, with its real weight (a sparse
kernel's time depends on where the non-zeros are) and at its real input shape, times the two
interleaved (medians of rounds that alternate which goes first) and keeps the kernel only
when it is at least 5% faster; both medians go in the report.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from torch import nn

from graphc.ops_sparse import to_bsr, to_masked

Q = torch.ops.graphc
# the kernel must beat the dense layer by this factor: a win inside the timing noise of
# this shared machine (a few percent between runs) is no win
KERNEL_MARGIN = 0.95


class DenseLayer(nn.Module):
    """y = x @ W.T (+ b), as the graph had it (the dense kernel, weights packed)."""

    def __init__(self, w: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.weight = nn.Parameter(w.detach().clone())
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())

    def forward(self, x):
        return nn.functional.linear(x, self.weight, self.bias)


class SparseLayer(nn.Module):
    """The same layer through graphc.bsr_linear."""

    def __init__(self, w: torch.Tensor, bias: torch.Tensor | None, block: tuple[int, int]):
        super().__init__()
        data, indices, indptr = to_bsr(w.detach(), block)
        self.data = nn.Parameter(data)
        self.register_buffer("indices", indices)
        self.register_buffer("indptr", indptr)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())
        self.shape = list(w.shape)

    def forward(self, x):
        return Q.bsr_linear(x, self.data, self.indices, self.indptr, self.shape, self.bias)


class StorageLayer(nn.Module):
    """The same layer on a bitmask-stored W.T, decoded once (what the storage form runs)."""

    def __init__(self, w: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        values, mask = to_masked(w.detach().T.contiguous())
        self.values = nn.Parameter(values)
        self.register_buffer("mask", mask)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())
        self.shape = [w.shape[1], w.shape[0]]

    def forward(self, x):
        y = x @ Q.sparse_decode(self.values, self.mask, self.shape)
        return y if self.bias is None else y + self.bias


def interleaved(calls, rounds: int = 9, per: int = 10) -> list[float]:
    """Median ms per call of each callable: every round visits each once (1 untimed call,
    then `per` timed), the order reversed every other round."""
    samples: list[list[float]] = [[] for _ in calls]
    for r in range(rounds):
        order = range(len(calls)) if r % 2 == 0 else reversed(range(len(calls)))
        for i in order:
            calls[i]()
            start = time.perf_counter()
            for _ in range(per):
                calls[i]()
            samples[i].append((time.perf_counter() - start) * 1e3 / per)
    return [float(np.median(s)) for s in samples]


def time_layer(w: torch.Tensor, bias: torch.Tensor | None, x_shape: tuple[int, ...],
               block: tuple[int, int], target: str = "cpu", rounds: int = 9,
               per: int = 10) -> tuple[float, float, float]:
    """(dense, sparse-kernel, storage) ms of one linear layer compiled alone for `target`."""
    import graphc

    x = torch.randn(x_shape)
    runners = [graphc.compile(m.eval(), (x,), target=target).runner
               for m in (DenseLayer(w, bias), SparseLayer(w, bias, block),
                         StorageLayer(w, bias))]
    natives = [r.convert([x]) for r in runners]
    dense, kernel, storage = interleaved(
        [lambda r=r, n=n: r.run(n) for r, n in zip(runners, natives)], rounds, per)
    return dense, kernel, storage


def choose(dense_ms: float, sparse_ms: float) -> str:
    return "kernel" if sparse_ms < KERNEL_MARGIN * dense_ms else "storage"
