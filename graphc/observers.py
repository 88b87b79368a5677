"""Observers: stream statistics of the tensors calibration feeds them, then pick a range.

    obs = OBSERVERS["percentile"]()          # or MinMax(axis=0) for per-channel weights
    for x in batches: obs.update(x)
    lo, hi = obs.range(Grid(0, 255))         # clipping range for that integer grid
    scale, zero_point = qparams(lo, hi, Grid(0, 255))

The histogram observers (percentile, mse, entropy) keep one fixed-size histogram, not the
tensors they saw, so calibration memory does not grow with the data. The histogram spans
[-a, a]; when a batch exceeds it, `a` doubles and pairs of bins merge, which is exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from graphc.ops_quant import fq_reference


@dataclass(frozen=True)
class Grid:
    """An integer grid [qmin, qmax]; signed grids are symmetric (zero point 0)."""

    qmin: int
    qmax: int

    @property
    def symmetric(self) -> bool:
        return self.qmin < 0


def qparams(lo: torch.Tensor, hi: torch.Tensor, grid: Grid):
    """Clipping range -> (float32 scale, int32 zero point), widened to include 0."""
    lo = torch.clamp(torch.as_tensor(lo, dtype=torch.float32), max=0)
    hi = torch.clamp(torch.as_tensor(hi, dtype=torch.float32), min=0)
    if grid.symmetric:
        scale = torch.clamp(torch.maximum(-lo, hi) / grid.qmax, min=1e-8)
        return scale, torch.zeros_like(scale, dtype=torch.int32)
    scale = torch.clamp((hi - lo) / (grid.qmax - grid.qmin), min=1e-8)
    zp = torch.clamp(torch.round(grid.qmin - lo / scale), grid.qmin, grid.qmax)
    return scale, zp.to(torch.int32)


def fake_quant(x: torch.Tensor, lo, hi, grid: Grid) -> torch.Tensor:
    """x quantized and dequantized with the range (lo, hi): what the observers score."""
    return fq_reference(x, *qparams(lo, hi, grid), grid.qmin, grid.qmax)


class Observer:
    """Base: `update(x)` per batch, then `range(grid)` -> (lo, hi) tensors."""

    def __init__(self, axis: int | None = None):
        self.axis = axis
        self.lo = self.hi = None

    def _minmax(self, x: torch.Tensor):
        x = x.detach().float()
        if self.axis is None:
            return x.min(), x.max()
        flat = x.movedim(self.axis, 0).reshape(x.shape[self.axis], -1)
        return flat.min(dim=1).values, flat.max(dim=1).values

    def update(self, x: torch.Tensor) -> None:
        lo, hi = self._minmax(x)
        self.lo = lo if self.lo is None else torch.minimum(self.lo, lo)
        self.hi = hi if self.hi is None else torch.maximum(self.hi, hi)

    def range(self, grid: Grid):
        if self.lo is None:
            raise ValueError(f"{type(self).__name__}: no data was observed")
        return self.lo, self.hi


class MinMax(Observer):
    """The smallest and largest value seen."""


class MovingAverageMinMax(Observer):
    """Exponential moving average of each batch's min and max (robust to one odd batch)."""

    def __init__(self, axis: int | None = None, momentum: float = 0.1):
        super().__init__(axis)
        self.momentum = momentum

    def update(self, x: torch.Tensor) -> None:
        lo, hi = self._minmax(x)
        if self.lo is None:
            self.lo, self.hi = lo, hi
            return
        m = self.momentum
        self.lo, self.hi = (1 - m) * self.lo + m * lo, (1 - m) * self.hi + m * hi


class _Histogram(Observer):
    """A 4096-bin histogram over [-a, a] (per tensor), plus the exact min and max."""

    bins = 4096

    def __init__(self, axis: int | None = None):
        if axis is not None:
            raise ValueError(f"observer '{type(self).__name__}' keeps one histogram per tensor; "
                             "use 'minmax' or 'mse' for per-channel ranges")
        super().__init__(None)
        self.hist, self.a = torch.zeros(self.bins, dtype=torch.float64), 0.0

    def update(self, x: torch.Tensor) -> None:
        super().update(x)
        x = x.detach().float().flatten()
        amax = max(float(x.abs().max()), 1e-12)
        if self.a == 0.0:
            self.a = amax
        while amax > self.a:  # double the range: bins 2i and 2i+1 of the middle half merge
            merged = self.hist.reshape(-1, 2).sum(1)
            self.hist = torch.zeros_like(self.hist)
            self.hist[self.bins // 4: 3 * self.bins // 4] = merged
            self.a *= 2
        half = self.bins // 2
        idx = torch.clamp(torch.floor(x / self.a * half).long() + half, 0, self.bins - 1)
        self.hist += torch.bincount(idx, minlength=self.bins).double()

    @property
    def width(self) -> float:
        return 2 * self.a / self.bins

    def centers(self) -> torch.Tensor:
        return (torch.arange(self.bins, dtype=torch.float64) + 0.5) * self.width - self.a

    def quantile(self, q: float) -> float:
        """The q-quantile, interpolated linearly inside its bin."""
        cdf = torch.cumsum(self.hist, 0) / self.hist.sum()
        i = int(torch.searchsorted(cdf, torch.tensor(q, dtype=torch.float64)).clamp(max=self.bins
                                                                                    - 1))
        prev = float(cdf[i - 1]) if i else 0.0
        frac = (q - prev) / max(float(cdf[i]) - prev, 1e-300)
        return -self.a + (i + min(max(frac, 0.0), 1.0)) * self.width

    def abs_hist(self) -> torch.Tensor:
        """Histogram of |x| over [0, a] in bins/2 bins."""
        half = self.bins // 2
        return self.hist[half:] + self.hist[:half].flip(0)


class Percentile(_Histogram):
    """Clip to the (100 - p)-th and p-th percentiles: ignores the rarest outliers."""

    name = "percentile"

    def __init__(self, axis: int | None = None, percentile: float = 99.99):
        super().__init__(axis)
        self.p = percentile

    def range(self, grid: Grid):
        super().range(grid)
        lo, hi = self.quantile(1 - self.p / 100), self.quantile(self.p / 100)
        return torch.tensor(max(lo, float(self.lo))), torch.tensor(min(hi, float(self.hi)))


class MSE(Observer):
    """The range (alpha * lo, alpha * hi) minimizing squared error, rounding and clipping both.

    Per tensor it scores the histogram; per channel (weights, observed once) it scores the
    values themselves, one alpha per channel.
    """

    def __init__(self, axis: int | None = None, steps: int = 200):
        super().__init__(axis)
        self.steps = steps
        self.hist = _Histogram() if axis is None else None
        self.values: list[torch.Tensor] = []

    def update(self, x: torch.Tensor) -> None:
        super().update(x)
        if self.hist is not None:
            self.hist.update(x)
        else:
            self.values.append(x.detach().float().movedim(self.axis, 0).flatten(1))

    def range(self, grid: Grid):
        lo, hi = super().range(grid)
        alphas = torch.arange(1, self.steps + 1, dtype=torch.float64) / self.steps
        if self.hist is not None:  # all alphas at once: [steps, bins]
            c, w = self.hist.centers(), self.hist.hist
            q = fake_quant(c, alphas[:, None] * lo.double(), alphas[:, None] * hi.double(), grid)
            best = alphas[(w * (c - q) ** 2).sum(1).argmin()].float()
        else:
            x = torch.cat(self.values, 1)
            err = torch.stack([((x - fake_quant(x, a * lo[:, None], a * hi[:, None], grid))
                                ** 2).sum(1) for a in alphas.float()])
            best = alphas.float()[err.argmin(0)]
        return best * lo, best * hi


class Entropy(Observer):
    """TensorRT's entropy calibration: the |x| threshold whose quantized histogram has the
    least KL divergence from the clipped one (Migacz, "8-bit inference with TensorRT")."""

    def __init__(self, axis: int | None = None):
        super().__init__(axis)
        self.hist = _Histogram(axis)

    def update(self, x: torch.Tensor) -> None:
        super().update(x)
        self.hist.update(x)

    def range(self, grid: Grid):
        lo, hi = super().range(grid)
        levels = grid.qmax - grid.qmin + 1
        if grid.symmetric or lo < 0:  # |x| gets half the grid's levels
            levels = (levels + 1) // 2
        hist = self.hist.abs_hist()
        # ReLU outputs pile up in bin 0; that spike would dominate the divergence and pull
        # the threshold far in (NVIDIA's pytorch-quantization flattens it the same way)
        hist[0] = hist[1]
        t = kl_threshold_bins(hist, levels) * self.hist.width
        return torch.clamp(lo, min=-t), torch.clamp(hi, max=t)


def kl_threshold_bins(hist: torch.Tensor, levels: int) -> int:
    """How many leading bins of `hist` to keep: argmin over i of KL(P_i || Q_i), where P_i
    is hist[:i] with the outliers added to its last bin and Q_i is hist[:i] merged into
    `levels` groups and spread back evenly over each group's non-empty bins. Both are
    smoothed (MXNet / onnxruntime): without it, any empty bin under P's outlier mass
    makes the divergence infinite and far outliers would force the full range."""
    h = hist.numpy()
    best, best_i = float("inf"), h.size
    for i in range(levels, h.size + 1):  # numpy: this loop runs ~2000 times on small arrays
        kept = h[:i]
        p = kept.copy()
        p[-1] += h[i:].sum()
        group = np.minimum(np.arange(i) // (i // levels), levels - 1)
        nonzero = kept > 0
        sums = np.bincount(group, weights=kept, minlength=levels)
        counts = np.bincount(group, weights=nonzero, minlength=levels)
        q = np.where(nonzero, sums[group] / np.maximum(counts[group], 1), 0.0)
        p, q = _smooth(p), _smooth(q)
        if p is None or q is None:
            continue
        kl = _kl(p / p.sum(), q / q.sum())
        if kl < best:
            best, best_i = kl, i
    return best_i


def _smooth(counts: np.ndarray, eps: float = 1e-4) -> np.ndarray | None:
    """Give empty bins `eps`, taken evenly from the others; None if that is impossible."""
    zeros = counts == 0
    n_zero, n_nonzero = int(zeros.sum()), int(counts.size - zeros.sum())
    if n_nonzero == 0:
        return None
    out = counts + np.where(zeros, eps, -eps * n_zero / n_nonzero)
    return out if (out > 0).all() else None


def _kl(p: np.ndarray, q: np.ndarray) -> float:
    return float((p * np.log(p / q)).sum())


# name -> observer class; each takes `axis` (None: one range per tensor)
OBSERVERS: dict[str, type[Observer]] = {
    "minmax": MinMax,
    "moving-average": MovingAverageMinMax,
    "percentile": Percentile,
    "mse": MSE,
    "entropy": Entropy,
}
