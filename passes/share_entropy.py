"""Entropy-constrained codebooks for share-weights: fewer bits per index in the saved file.

The artifact's members are LZMA-compressed (graphc/compiled.py), so b-bit packed indices
cost about their entropy, not b bits: k-means' 4-bit indices of the digits CNN's fc1 hold
3.52 bits each and LZMA stores them in 3.48. Plain k-means minimizes the squared error
alone and spreads the values over its 2^b cells almost evenly. Entropy-constrained scalar
quantization (ECSQ; Chou, Lookabaugh & Gray 1989; for network weights Choi, El-Khamy & Lee,
"Towards the limit of network quantization", ICLR 2017) minimizes

    sum (w - c[i])^2  +  lam * mean(w^2) * sum -log2 p[i]          p[i]: cell i's share

so a value joins a popular cell unless a rarer one is much closer. Lloyd's two steps become:
assign each value to the cell of least cost (its squared distance plus lam * mean(w^2) times
that cell's code length), then move each centroid to its members' mean and recount. lam = 0
is k-means. A cell that empties stays empty (code length infinite): the codebook keeps
2^b entries, fewer are used. lam is scaled by the weight's mean square so that one lam
trades relative error against bits the same way in every layer (equal slopes: the
rate-distortion optimal split of a bit budget between layers).

1-D structure: each cost is a parabola in w with the same curvature, so a cell is an
interval and cells keep the centroids' order. A cell whose interval is empty given its
alive neighbours is dead; removing every such cell at once is safe (dominated by a subset
is dominated by all), and repeating until none is left gives the lower envelope. With the
values sorted once, a Lloyd step is a searchsorted of k thresholds plus prefix sums, as in
share_kmeans.py, batched over rows (one codebook per group of rows).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

INF = float("inf")


def ecsq_rows(values: torch.Tensor, c: torch.Tensor, idx: torch.Tensor, lam: float,
              scale: float, iters: int = 300) -> tuple[torch.Tensor, torch.Tensor]:
    """values [R, n] and their k-means (centroids [R, k] ascending, indices [R, n]) ->
    entropy-constrained (centroids f32 [R, k], indices int64 [R, n]), one codebook per row.
    scale: the mean square the rate term is measured against (the whole weight's)."""
    v = values.detach().to(torch.float64)
    rows, n = v.shape
    c = c.detach().to(torch.float64).reshape(rows, -1)
    idx = idx.reshape(rows, n)
    if lam <= 0:
        return c.to(torch.float32), idx
    weight = lam * scale
    s, _ = torch.sort(v, 1)
    prefix = torch.cat([torch.zeros(rows, 1, dtype=torch.float64), torch.cumsum(s, 1)], 1)
    count = torch.zeros_like(c, dtype=torch.long).scatter_add_(1, idx, torch.ones_like(idx))
    for _ in range(iters):
        upper = _thresholds(c, count, n, weight)
        end = torch.searchsorted(s, upper.contiguous())  # values below each cell's upper end
        start = torch.cat([torch.zeros(rows, 1, dtype=torch.long), end[:, :-1]], 1)
        new_count = end - start
        mean = (prefix.gather(1, end) - prefix.gather(1, start)) / new_count.clamp(min=1)
        new_c = torch.where(new_count > 0, mean, c)
        done = torch.equal(new_count, count) and torch.equal(new_c, c)
        c, count = new_c, new_count
        if done:
            break
    upper = _thresholds(c, count, n, weight)
    return c.to(torch.float32), torch.searchsorted(upper[:, :-1].contiguous(), v, right=True)


def _thresholds(c: torch.Tensor, count: torch.Tensor, n: int, weight: float) -> torch.Tensor:
    """[R, k] non-decreasing: a value x belongs to the first cell whose threshold exceeds x
    (the last is +inf). Dead cells (empty now, or empty in the envelope) repeat the
    threshold before them, so no value lands in them."""
    rows, k = c.shape
    alive = count > 0
    code = torch.where(alive, -torch.log2(count.clamp(min=1) / n), torch.full_like(c, INF))
    cost = weight * code  # the cell's rate term, added to the squared distance
    while True:
        prev, nxt = _neighbour(alive, -1), _neighbour(alive, 1)
        lo = _boundary(c, cost, prev, torch.arange(k).expand(rows, k), side=-1)
        hi = _boundary(c, cost, torch.arange(k).expand(rows, k), nxt, side=1)
        dominated = alive & (lo >= hi)
        if not dominated.any():
            break
        alive = alive & ~dominated
    hi = torch.where(alive, hi, torch.full_like(hi, -INF))
    return torch.cummax(hi, 1).values  # a dead cell repeats the alive threshold before it


def _neighbour(alive: torch.Tensor, step: int) -> torch.Tensor:
    """[R, k]: index of the nearest alive cell before (step -1) or after (step 1) each cell,
    -1 when there is none."""
    rows, k = alive.shape
    ar = torch.arange(k).expand(rows, k)
    if step < 0:
        marked = torch.where(alive, ar, torch.full_like(ar, -1))
        before = torch.cummax(marked, 1).values
        return torch.cat([torch.full((rows, 1), -1), before[:, :-1]], 1)
    marked = torch.where(alive, k - 1 - ar, torch.full_like(ar, -1)).flip(1)
    after = (k - 1 - torch.cummax(marked, 1).values).flip(1)
    after = torch.where(after > k - 1, torch.full_like(after, -1), after)
    return torch.cat([after[:, 1:], torch.full((rows, 1), -1)], 1)


def _boundary(c, cost, i, j, side: int) -> torch.Tensor:
    """Where cell j's cost parabola crosses cell i's (i < j): x above it prefers j. A missing
    neighbour (-1) gives -inf (side -1) or +inf (side 1)."""
    missing = (i < 0) | (j < 0)
    ci, cj = c.gather(1, i.clamp(min=0)), c.gather(1, j.clamp(min=0))
    ui, uj = cost.gather(1, i.clamp(min=0)), cost.gather(1, j.clamp(min=0))
    gap = (cj - ci).clamp(min=1e-30)  # equal centroids: the cheaper cell takes everything
    b = (ci + cj) / 2 + (uj - ui) / (2 * gap)
    b = torch.nan_to_num(b, nan=INF, posinf=INF, neginf=-INF)
    return torch.where(missing, torch.full_like(b, side * INF), b)


def entropy_bits(idx: torch.Tensor, k: int, per: int | None = None) -> float:
    """Mean bits per index of idx [rows, ...], each codebook's indices (rows r * per to
    (r + 1) * per - 1; per None: all rows share one) coded with their own frequencies."""
    rows = idx.shape[0] if idx.dim() else 1
    flat = idx.reshape(rows, -1)
    group = torch.arange(rows) // (per or max(rows, 1))
    cell = (group[:, None] * k + flat).reshape(-1)
    count = torch.bincount(cell).to(torch.float64)
    size = torch.bincount(group, minlength=int(group.max()) + 1).to(torch.float64) * flat.shape[1]
    p = count / size.repeat_interleave(k)[: count.numel()]
    return float(-(count * torch.log2(p.clamp(min=1e-300))).sum() / flat.numel())


def find_lam(rate_at: Callable[[float], float], rate: float, tol: float = 0.01,
             steps: int = 40) -> float:
    """The smallest lam (to tol bits) whose mean bits per index rate_at(lam) <= rate, by
    doubling then bisection; rate_at is non-increasing in lam (up to Lloyd's local optima)."""
    if rate_at(0.0) <= rate:
        return 0.0
    lo, hi = 0.0, 1e-3
    while rate_at(hi) > rate:
        lo, hi = hi, hi * 2
        if hi > 1e6:
            raise ValueError(f"no lam reaches {rate} bits per index")
    for _ in range(steps):
        mid = (lo + hi) / 2
        got = rate_at(mid)
        if got <= rate:
            hi = mid
            if rate - got <= tol:
                break
        else:
            lo = mid
    return hi
