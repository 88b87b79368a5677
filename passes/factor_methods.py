"""The low-rank decompositions of the factorize pass, one function per method, and their cost.

Every method maps a layer (its weight, input statistics and shapes) and a list of ranks to
Candidates: the factor weights (made on demand), params and FLOPs after, retained energy
and the relative output error on the calibration data. Weights are float64 here; the
pass stores float32. A weight `W` is [out, D]: a linear's [out, in], a conv's
[O, I*kh*kw] (unfold's patch order), so y = p @ W.T + b for an input row or patch p.

| method | op | layers it becomes | error it minimizes |
|---|---|---|---|
| svd | linear | in -> r -> out | weight, Frobenius (Eckart-Young) |
| data-aware | linear | in -> r -> out | output on the calibration data (SVD-LLM) |
| tucker2 | conv | 1x1 I->ri, kxk ri->ro, 1x1 ro->O | weight (HOSVD, Kim et al. 2016) |
| cp | conv | 1x1 I->R, depthwise kxk, 1x1 R->O | weight (CP-ALS, Lebedev et al. 2015) |
| spatial-svd | conv | kx1 I->r, 1xk r->O | weight (Jaderberg et al. 2014) |
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Stats:
    """Second moments of a layer's input rows (patches, for a conv) over calibration data."""

    cov: torch.Tensor   # [D, D] sum of p p^T
    total: torch.Tensor  # [D] sum of p
    rows: int

    def out_norm2(self, w: torch.Tensor, b: torch.Tensor | None) -> float:
        """||P W^T + b||^2 summed over the calibration rows."""
        n2 = float(torch.einsum("od,de,oe->", w, self.cov, w))
        if b is not None:
            n2 += 2 * float(b @ (w @ self.total)) + self.rows * float(b @ b)
        return n2

    def err2(self, dw: torch.Tensor) -> float:
        """||P dW^T||^2: the squared output error of replacing W by W - dW."""
        return float(torch.einsum("od,de,oe->", dw, self.cov, dw))


@dataclass(frozen=True)
class Shape:
    """What the cost of a layer depends on: rows per call (linear) or N, H, W, Ho, Wo."""

    rows: int = 0
    n: int = 0
    hw: tuple[int, int] = (0, 0)
    out_hw: tuple[int, int] = (0, 0)
    kernel: tuple[int, int] = (1, 1)


@dataclass
class Candidate:
    method: str
    rank: int | tuple[int, int]
    params: int  # weights only; the bias is the same before and after
    flops: int  # 2 x multiply-adds
    energy: float  # 1 - ||dM||^2 / ||M||^2 of the matrix the method truncates
    error: float  # relative output error on the calibration data
    make: Callable[[], list[torch.Tensor]]  # the factor weights, first layer first


def dense_cost(w4: torch.Tensor, shape: Shape) -> tuple[int, int]:
    """(params, FLOPs) of the dense layer; w4 is the weight as the op holds it."""
    params = w4.numel()
    if w4.dim() == 2:
        return params, 2 * shape.rows * params
    return params, 2 * shape.n * shape.out_hw[0] * shape.out_hw[1] * params


# ---- linear ------------------------------------------------------------------------------
def svd_family(w: torch.Tensor, stats: Stats, y2: float, shape: Shape, ranks: list[int],
               data_aware: bool) -> list[Candidate]:
    """Truncated SVD of W (plain) or of W C^(1/2) (data-aware), for every rank at once.

    Data-aware: the rank-r W' minimizing ||P (W - W')^T|| is U_r U_r^T W, with U the left
    singular vectors of W C^(1/2) (C = P^T P); its squared error is the sum of the
    discarded singular values squared. No inverse of C is needed, so a rank-deficient C
    (few calibration rows) cannot blow the factors up. Plain: the squared output error of
    dropping component i is s_i^2 v_i^T C v_i."""
    if data_aware:
        evals, evecs = torch.linalg.eigh(stats.cov)
        root = evecs * evals.clamp(min=0).sqrt() @ evecs.T  # C^(1/2), C is PSD
        u, s, _ = torch.linalg.svd(w @ root, full_matrices=False)
        contrib = s ** 2
    else:
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        contrib = s ** 2 * torch.einsum("kd,de,ke->k", vh, stats.cov, vh)
    tail_e, tail_c = _tails(s ** 2), _tails(contrib)
    name = "data-aware" if data_aware else "svd"

    def make(r: int) -> Callable[[], list[torch.Tensor]]:
        if data_aware:  # second layer orthonormal, first one the projected weight
            return lambda: [u[:, :r].T @ w, u[:, :r]]
        root_s = s[:r].sqrt()
        return lambda: [root_s[:, None] * vh[:r], u[:, :r] * root_s]

    return [Candidate(name, r, factor_params(name, w.shape, r),
                      2 * shape.rows * factor_params(name, w.shape, r),
                      1 - float(tail_e[r] / tail_e[0]), _rel(float(tail_c[r]), y2), make(r))
            for r in ranks]


def _tails(x: torch.Tensor) -> torch.Tensor:
    """tails[r] = sum of x[r:], for r = 0..len(x)."""
    return torch.cat([x.flip(0).cumsum(0).flip(0), x.new_zeros(1)])


def _rel(err2: float, y2: float) -> float:
    return (max(err2, 0.0) / max(y2, 1e-30)) ** 0.5


# ---- conv --------------------------------------------------------------------------------
def tucker2_family(w4, stats, y2, shape, ranks) -> list[Candidate]:
    """HOSVD Tucker-2 over the output and input channel modes; ranks are (r_out, r_in)."""
    o, i, kh, kw = w4.shape
    u_out = torch.linalg.svd(w4.reshape(o, -1), full_matrices=False)[0]
    u_in = torch.linalg.svd(w4.transpose(0, 1).reshape(i, -1), full_matrices=False)[0]
    (h, wd), (ho, wo), n = shape.hw, shape.out_hw, shape.n
    out = []
    for ro, ri in ranks:
        a, b = u_out[:, :ro], u_in[:, :ri]
        core = torch.einsum("oihw,or,is->rshw", w4, a, b)
        approx = torch.einsum("rshw,or,is->oihw", core, a, b)
        flops = 2 * n * (h * wd * ri * i + ho * wo * ro * ri * kh * kw + ho * wo * o * ro)

        def make(core=core, a=a, b=b):
            return [b.T[:, :, None, None], core, a[:, :, None, None]]
        out.append(_conv_candidate("tucker2", (ro, ri), factor_params("tucker2", w4.shape,
                                   (ro, ri)), flops, w4, approx, stats, y2, make))
    return out


def cp_family(w4, stats, y2, shape, ranks, iters: int = 60) -> list[Candidate]:
    """CP of W as an [O, I, kh*kw] tensor (ALS); a depthwise kxk conv carries the spatial
    factor, so one rank-R term is a 1x1, a depthwise filter and a 1x1."""
    o, i, kh, kw = w4.shape
    (h, wd), (ho, wo), n = shape.hw, shape.out_hw, shape.n
    out = []
    for r in ranks:
        a, b, c = cp_als(w4.reshape(o, i, kh * kw), r, iters)
        approx = torch.einsum("or,ir,sr->ois", a, b, c).reshape(w4.shape)
        flops = 2 * n * (h * wd * r * i + ho * wo * r * kh * kw + ho * wo * o * r)

        def make(a=a, b=b, c=c):
            return [b.T[:, :, None, None], c.T.reshape(-1, 1, kh, kw), a[:, :, None, None]]
        out.append(_conv_candidate("cp", r, factor_params("cp", w4.shape, r), flops, w4,
                                   approx, stats, y2, make))
    return out


def cp_als(t: torch.Tensor, rank: int, iters: int) -> tuple[torch.Tensor, ...]:
    """Rank-`rank` CP of a 3-way tensor by alternating least squares, started from the
    leading singular vectors of each unfolding (seeded random columns past their rank)."""
    gen = torch.Generator().manual_seed(0)
    dims = t.shape
    unfold = [t.reshape(dims[0], -1), t.permute(1, 0, 2).reshape(dims[1], -1),
              t.permute(2, 0, 1).reshape(dims[2], -1)]
    fs = []
    for m in unfold:
        u = torch.linalg.svd(m, full_matrices=False)[0][:, :rank]
        extra = torch.randn(m.shape[0], rank - u.shape[1], generator=gen, dtype=t.dtype)
        fs.append(torch.cat([u, extra * 0.1], 1))
    specs = ("ois,ir,sr->or", "ois,or,sr->ir", "ois,or,ir->sr")
    for _ in range(iters):
        for k, spec in enumerate(specs):
            x, y = (fs[j] for j in range(3) if j != k)
            gram = (x.T @ x) * (y.T @ y)
            fs[k] = torch.einsum(spec, t, x, y) @ torch.linalg.pinv(gram)
    norms = [f.norm(dim=0).clamp(min=1e-30) for f in fs]
    scale = (norms[0] * norms[1] * norms[2]) ** (1 / 3)  # balanced: no factor dominates
    return tuple(f / nrm * scale for f, nrm in zip(fs, norms))


def spatial_family(w4, stats, y2, shape, ranks) -> list[Candidate]:
    """SVD of W regrouped as [(I, kh), (O, kw)]: a kx1 conv to r channels, then 1xk."""
    o, i, kh, kw = w4.shape
    u, s, vh = torch.linalg.svd(w4.permute(1, 2, 0, 3).reshape(i * kh, o * kw),
                                full_matrices=False)
    (_, wd), (ho, wo), n = shape.hw, shape.out_hw, shape.n
    out = []
    for r in ranks:
        first = (u[:, :r] * s[:r].sqrt()).reshape(i, kh, r).permute(2, 0, 1)[..., None]
        second = (s[:r].sqrt()[:, None] * vh[:r]).reshape(r, o, kw).permute(1, 0, 2)[:, :, None]
        approx = torch.einsum("rihx,oryw->oihw", first, second)
        # the kx1 conv keeps the input width (no padding, stride or dilation along it)
        flops = 2 * n * (ho * wd * r * i * kh + ho * wo * o * r * kw)
        out.append(_conv_candidate("spatial-svd", r, factor_params("spatial-svd", w4.shape, r),
                                   flops, w4, approx, stats, y2, lambda a=first, b=second: [a, b]))
    return out


def _conv_candidate(method, rank, params, flops, w4, approx, stats, y2, make) -> Candidate:
    dw = (w4 - approx).reshape(w4.shape[0], -1)
    energy = 1 - float(dw.square().sum() / w4.square().sum().clamp(min=1e-30))
    return Candidate(method, rank, params, flops, energy, _rel(stats.err2(dw), y2), make)


def factor_params(method: str, w4_shape: tuple[int, ...], rank) -> int:
    """Weights after factorizing at `rank`, without factorizing (ranks are pruned by it).
    w4_shape: [out, in] for a linear, [O, I, kh, kw] for a conv."""
    o, i, kh, kw = (tuple(w4_shape) + (1, 1))[:4]
    if method in ("svd", "data-aware"):
        return rank * (i + o)
    if method == "tucker2":
        ro, ri = rank
        return i * ri + ro * ri * kh * kw + ro * o
    if method == "cp":
        return rank * (i + kh * kw + o)
    return rank * (i * kh + o * kw)  # spatial-svd


# method -> (op class, family builder); the pass and the policy look methods up here
METHODS = {
    "svd": ("linear", lambda w, st, y2, sh, rk: svd_family(w, st, y2, sh, rk, False)),
    "data-aware": ("linear", lambda w, st, y2, sh, rk: svd_family(w, st, y2, sh, rk, True)),
    "tucker2": ("conv", tucker2_family),
    "cp": ("conv", cp_family),
    "spatial-svd": ("conv", spatial_family),
}
