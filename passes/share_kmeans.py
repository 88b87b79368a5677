"""1-D k-means for weight sharing: the values of a weight tensor -> 2^bits centroids.

Scalar k-means has structure the general algorithm ignores: sorted, the clusters are
contiguous runs, so one sort up front makes every Lloyd iteration a searchsorted of the
k-1 midpoints plus prefix sums (O(k log n)), not an O(n k) distance table. MiniLM's
11.7M-value embedding clusters into 256 centroids in about a second.

Initialisation at the quantiles (equal-mass bins) puts centroids where the weights are
dense, as trained weights (bell-shaped) want; Lloyd then moves them to the local optimum
of the squared error (1-D Lloyd creeps: 100 iterations left centroids 1e-4 from their
members' mean; an iteration costs microseconds). Deterministic: no random restarts.
"""

from __future__ import annotations

import torch


def kmeans_1d(values: torch.Tensor, k: int, iters: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
    """(centroids f32 [k], ascending; indices int64 with values' shape) minimizing the squared
    error of values ~ centroids[indices]. Fewer than k distinct values: each gets its own
    centroid exactly (the rest repeat the largest and are never used)."""
    flat = values.detach().reshape(-1).to(torch.float64)
    distinct = torch.unique(flat)
    if distinct.numel() <= k:
        c = torch.cat([distinct, distinct[-1:].expand(k - distinct.numel())])
        return c.to(torch.float32), torch.searchsorted(distinct, flat).reshape(values.shape)
    s, _ = torch.sort(flat)
    prefix = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(s, 0)])
    c = torch.quantile(s[:: max(1, s.numel() // 1_000_000)],  # quantile() limits its input
                       (torch.arange(k, dtype=torch.float64) + 0.5) / k)
    for _ in range(iters):
        bounds = torch.searchsorted(s, (c[1:] + c[:-1]) / 2)  # where each run starts
        start = torch.cat([torch.zeros(1, dtype=torch.long), bounds])
        end = torch.cat([bounds, torch.tensor([s.numel()])])
        count = end - start
        mean = (prefix[end] - prefix[start]) / count.clamp(min=1)
        new = torch.where(count > 0, mean, c)  # an empty run keeps its centroid
        if torch.equal(new, c):
            break
        c = new
    idx = torch.bucketize(flat, (c[1:] + c[:-1]) / 2)
    return c.to(torch.float32), idx.reshape(values.shape)


def kmeans_rows(values: torch.Tensor, k: int, iters: int = 1000) -> tuple[torch.Tensor,
                                                                          torch.Tensor]:
    """kmeans_1d on every row of values [R, n] at once: (centroids f32 [R, k], ascending per
    row; indices int64 [R, n]). Same start (quantiles) and Lloyd steps as kmeans_1d, batched:
    a row's runs are found by a batched searchsorted, their sums from per-row prefix sums.
    A row with fewer than k distinct values ends with repeated or unused centroids."""
    v = values.detach().to(torch.float64)
    rows, n = v.shape
    s, _ = torch.sort(v, 1)
    zero = torch.zeros(rows, 1, dtype=torch.float64)
    prefix = torch.cat([zero, torch.cumsum(s, 1)], 1)
    c = torch.quantile(s, (torch.arange(k, dtype=torch.float64) + 0.5) / k, dim=1).T
    c = c.contiguous()
    last = torch.full((rows, 1), n)
    for _ in range(iters):
        bounds = torch.searchsorted(s, ((c[:, 1:] + c[:, :-1]) / 2).contiguous())
        start, end = torch.cat([zero.long(), bounds], 1), torch.cat([bounds, last], 1)
        count = end - start
        mean = (prefix.gather(1, end) - prefix.gather(1, start)) / count.clamp(min=1)
        new = torch.where(count > 0, mean, c)  # an empty run keeps its centroid
        if torch.equal(new, c):
            break
        c = new
    idx = torch.searchsorted(((c[:, 1:] + c[:, :-1]) / 2).contiguous(), v)  # = bucketize
    return c.to(torch.float32), idx
