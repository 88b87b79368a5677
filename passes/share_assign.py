"""Data-aware index assignment for share-weights (`assign="data-aware"`).

k-means picks each weight's nearest centroid, which minimizes the weight error. What matters
is the layer's output error on real inputs, ||X (W - Ŵ)ᵀ||², weighted by H = XᵀX (the
second moments of the layer's inputs on calibration data). Following GPTQ (Frantar et al.
2023), with a fixed codebook in place of GPTQ's uniform grid: columns are assigned one at
a time, and each column's rounding error is pushed onto the columns not yet assigned
through the Cholesky factor of H⁻¹, so later columns compensate for earlier ones. The
codebooks stay the k-means ones; only the indices change.

Measured on MiniLM (docs/weight-sharing.md): 4 bits, one codebook per row, mean embedding
cosine 0.967 (nearest) -> 0.984 (data-aware).
"""

from __future__ import annotations

import torch

BLOCK = 128  # columns updated together (GPTQ's lazy batch): same result, fewer big matmuls
DAMP = 0.01  # H += DAMP * mean(diag H) * I: keeps the Cholesky defined for rank-deficient H


def assign(w: torch.Tensor, centroids: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """Indices [R, D] into each row's centroids [R, k] (ascending) for weight w [R, D],
    minimizing the output error under input second moments h [D, D] (GPTQ order)."""
    w = w.detach().to(torch.float64).clone()
    c = centroids.detach().to(torch.float64)
    h = h.detach().to(torch.float64).clone()
    dead = torch.diag(h) == 0  # inputs that are always zero: their weights do not matter
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += DAMP * torch.diag(h).mean() * torch.eye(len(h), dtype=h.dtype)
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    idx = torch.empty(w.shape, dtype=torch.long)
    for a in range(0, w.shape[1], BLOCK):
        b = min(a + BLOCK, w.shape[1])
        err = _assign_block(w, c, u, idx, a, b)
        w[:, b:] -= err @ u[a:b, b:]
    return idx


def _assign_block(w, c, u, idx, a: int, b: int) -> torch.Tensor:
    """Assign columns a..b-1 in place (w's block is updated as it goes); their scaled errors."""
    block = w[:, a:b]
    err = torch.zeros_like(block)
    for j in range(b - a):
        col = block[:, j]
        pick = (c - col[:, None]).abs().argmin(1)
        idx[:, a + j] = pick
        e = (col - c.gather(1, pick[:, None])[:, 0]) / u[a + j, a + j]
        block[:, j:] -= e[:, None] * u[a + j, a + j:b][None, :]
        err[:, j] = e
    return err
