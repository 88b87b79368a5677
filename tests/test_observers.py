"""Observers against numpy / scipy references on known data."""

import numpy as np
import pytest
import scipy.stats
import torch

from graphc.observers import MSE, OBSERVERS, Entropy, Grid, MinMax, Percentile, qparams
from tests.single_thread import one_torch_thread  # noqa: F401  (autouse fixture)

INT8, UINT8, INT4 = Grid(-127, 127), Grid(0, 255), Grid(-7, 7)


def _feed(obs, x, n=5):
    for chunk in torch.as_tensor(x).chunk(n):
        obs.update(chunk)
    return obs


def test_qparams_symmetric_and_asymmetric():
    s, z = qparams(torch.tensor(-2.0), torch.tensor(1.0), INT8)
    assert s.item() == pytest.approx(2 / 127) and z.item() == 0 and z.dtype == torch.int32
    s, z = qparams(torch.tensor(-1.0), torch.tensor(3.0), UINT8)
    assert s.item() == pytest.approx(4 / 255) and z.item() == 64  # round(1 / (4/255))
    s, z = qparams(torch.tensor(0.5), torch.tensor(2.0), UINT8)  # widened to include 0
    assert s.item() == pytest.approx(2 / 255) and z.item() == 0


def test_minmax_per_tensor_and_per_channel():
    x = torch.randn(6, 4, 3)
    lo, hi = _feed(MinMax(), x, 3).range(INT8)
    assert (lo.item(), hi.item()) == (x.min().item(), x.max().item())
    for axis in (0, 1, 2):
        obs = MinMax(axis=axis)
        obs.update(x)
        lo, hi = obs.range(INT8)
        xn = x.numpy()
        others = tuple(d for d in range(3) if d != axis)
        np.testing.assert_array_equal(lo.numpy(), xn.min(axis=others))
        np.testing.assert_array_equal(hi.numpy(), xn.max(axis=others))


def test_moving_average_minmax_is_an_ema_of_batch_extremes():
    batches = [torch.randn(100) * (i + 1) for i in range(4)]
    obs = OBSERVERS["moving-average"](momentum=0.25)
    lo_ref, hi_ref = batches[0].min().item(), batches[0].max().item()
    for b in batches:
        obs.update(b)
    for b in batches[1:]:
        lo_ref = 0.75 * lo_ref + 0.25 * b.min().item()
        hi_ref = 0.75 * hi_ref + 0.25 * b.max().item()
    lo, hi = obs.range(UINT8)
    assert lo.item() == pytest.approx(lo_ref, rel=1e-6)
    assert hi.item() == pytest.approx(hi_ref, rel=1e-6)


def test_histogram_growth_merges_bins_exactly():
    # first batch sets the range; later ones are 3x wider: the range doubles twice
    batches = [torch.randn(20_000) * 0.5] + [torch.randn(20_000) * 1.5 for _ in range(3)]
    obs = _feed(Percentile(), torch.cat(batches), 1)  # one batch: binned directly
    grown = Percentile()
    for b in batches:
        grown.update(b)
    assert grown.a == pytest.approx(batches[0].abs().max().item() * 4)
    # a reference histogram over the grown range, in the observer's float32 arithmetic
    x = torch.cat(batches).numpy()
    half = np.float32(grown.bins // 2)
    idx = np.clip(np.floor(x / np.float32(grown.a) * half).astype(np.int64) + int(half), 0,
                  grown.bins - 1)
    np.testing.assert_array_equal(grown.hist.numpy(), np.bincount(idx, minlength=grown.bins))
    assert obs.hist.sum().item() == grown.hist.sum().item() == x.size


@pytest.mark.parametrize("p", [99.99, 99.0])
def test_percentile_matches_numpy_within_one_bin(p):
    x = torch.randn(100_000)
    obs = _feed(Percentile(percentile=p), x)
    lo, hi = obs.range(INT8)
    ref_lo, ref_hi = np.percentile(x.numpy(), [100 - p, p])
    width = obs.width  # the histogram's resolution: 2 * max|x| / 4096
    assert abs(lo.item() - ref_lo) <= width and abs(hi.item() - ref_hi) <= width


def _mse(x: np.ndarray, t: float, qmax: int) -> float:
    """Mean squared error of symmetric quantization of x clipped to [-t, t] (numpy)."""
    s = t / qmax
    return float(np.mean((np.clip(np.round(x / s), -qmax, qmax) * s - x) ** 2))


def test_mse_clip_is_near_the_brute_force_optimum_on_laplace_data():
    x = torch.distributions.Laplace(0.0, 1.0).sample((50_000,))
    lo, hi = _feed(MSE(), x).range(INT4)
    t = max(-lo.item(), hi.item())
    xn = x.numpy().astype(np.float64)
    candidates = np.linspace(0.05, np.abs(xn).max(), 4000)
    errs = np.array([_mse(xn, c, 7) for c in candidates])
    best = candidates[errs.argmin()]
    print(f"MSE clip (Laplace b=1, int4): graphc {t:.3f}, numpy brute force {best:.3f}, "
          f"max|x| {np.abs(xn).max():.2f}")
    assert _mse(xn, t, 7) <= errs.min() * 1.005  # within 0.5% of the best MSE
    assert _mse(xn, t, 7) < 0.5 * _mse(xn, np.abs(xn).max(), 7)  # clipping pays at 4 bits


def test_mse_per_channel_on_weights():
    w = torch.randn(6, 64) * torch.linspace(0.1, 2.0, 6)[:, None]
    w[2, 0] = 12.0  # an outlier: clipping it costs more than it saves, the optimum keeps it
    obs = MSE(axis=0)
    obs.update(w)
    lo, hi = obs.range(INT4)
    for c in range(6):
        xc = w[c].numpy().astype(np.float64)
        t = max(-lo[c].item(), hi[c].item())
        cands = np.linspace(0.01, np.abs(xc).max(), 2000)
        best = min(_mse(xc, k, 7) for k in cands)
        assert _mse(xc, t, 7) <= best * 1.01  # 200 candidate clips vs 2000


def _smooth(p: np.ndarray, eps: float = 1e-4):
    """MXNet's _smooth_distribution: eps into empty bins, taken from the others."""
    zeros = (p == 0).astype(np.float64)
    n_zeros = zeros.sum()
    n_nonzeros = p.size - n_zeros
    if n_nonzeros == 0:
        return None
    eps1 = eps * n_zeros / n_nonzeros
    hist = p + eps * zeros - eps1 * (1 - zeros)
    return hist if (hist > 0).all() else None


def _trt_entropy_threshold(x_abs: np.ndarray, bins: int, levels: int) -> float:
    """TensorRT's entropy calibration written out literally (Migacz 2017), with MXNet's
    smoothing and scipy's KL."""
    hist, edges = np.histogram(x_abs, bins=bins, range=(0, x_abs.max()))
    hist = hist.astype(np.float64)
    hist[0] = hist[1]  # the ReLU zero spike, flattened as pytorch-quantization does
    best_kl, best_i = np.inf, bins
    for i in range(levels, bins + 1):
        p = hist[:i].copy()
        p[i - 1] += hist[i:].sum()
        q = np.zeros(i)
        m = i // levels
        for j in range(levels):
            start, stop = j * m, (j + 1) * m if j < levels - 1 else i
            chunk = hist[start:stop]
            if (chunk > 0).any():
                q[start:stop] = np.where(chunk > 0, chunk.sum() / (chunk > 0).sum(), 0)
        p, q = _smooth(p), _smooth(q)
        if p is None or q is None:
            continue
        kl = scipy.stats.entropy(p, q)
        if kl < best_kl:
            best_kl, best_i = kl, i
    return edges[best_i]


def test_entropy_matches_the_tensorrt_algorithm_and_clips_outliers():
    x = torch.relu(torch.randn(40_000))
    x[:5] = 40.0  # five outliers stretch min-max far past the data
    obs = Entropy()
    obs.update(x)
    lo, hi = obs.range(UINT8)
    ref = _trt_entropy_threshold(x.numpy().astype(np.float64), 2048, 256)
    print(f"entropy threshold: graphc {hi.item():.4f}, reference {ref:.4f}")
    assert lo.item() == 0.0
    assert abs(hi.item() - ref) <= obs.hist.width  # same algorithm, float32 vs 64 binning
    assert x[5:].max().item() < hi.item() < 20.0  # covers the bulk, clips the outliers at 40


def test_histogram_observers_refuse_per_channel():
    with pytest.raises(ValueError, match="keeps one histogram per tensor; use 'minmax' or 'mse'"):
        Percentile(axis=0)
    with pytest.raises(ValueError, match="no data was observed"):
        MinMax().range(INT8)
