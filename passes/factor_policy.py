"""Rank selection for the factorize pass: candidate ranks per layer and method, and the
four ways to choose among them. Plain data in, choices out; no graph rewriting.

| mode | option | per layer |
|---|---|---|
| fixed | rank=r | rank r (Tucker-2: min(r, O) x min(r, I)) |
| energy | energy=e | cheapest candidate (FLOPs) keeping >= e of the truncated matrix's energy |
| error budget | max_error=x | cheapest candidate whose relative output error is <= x |
| ratio | ratio=q | whole model: params of the factorized layers <= q x dense, least error |

Only candidates that cut both the layer's params and its FLOPs are kept (unless the pass
is told require_saving=False); a layer with none is left dense, with the reason. With
method="auto" the candidates of every method for the layer's op class compete.
"""

from __future__ import annotations

from graphc.errors import PassError
from graphc.passes.factor_layers import Layer
from graphc.passes.factor_methods import METHODS, Candidate, Stats, dense_cost, factor_params

CONV_CANDIDATES = 12  # conv candidates cost a reconstruction each (CP: an ALS run): thin them


def methods_for(method: str, kind: str) -> list[str]:
    if method == "auto":
        return [m for m, (k, _) in METHODS.items() if k == kind]
    return [method] if METHODS[method][0] == kind else []


def max_rank(method: str, lay: Layer) -> int:
    """The largest rank the method allows on this layer ("rank larger than the matrix")."""
    if lay.kind == "linear":
        return min(lay.w.shape)
    o, i, kh, kw = lay.w4.shape
    return {"tucker2": max(o, i), "cp": o * i, "spatial-svd": min(i * kh, o * kw)}[method]


def rank_grid(method: str, lay: Layer, multiple: int, rank: int, require_saving: bool) -> list:
    """Candidate ranks: `rank` alone, or the multiples of `multiple` whose params undercut
    the dense layer (all multiples up to the full rank when require_saving is False)."""
    dims = tuple(lay.w4.shape) if lay.w4 is not None else tuple(lay.w.shape)
    if rank:
        if rank > max_rank(method, lay):
            raise PassError(
                f"pass 'factorize': rank={rank} is larger than %{lay.node} ({lay.op}) allows "
                f"for method '{method}': its weight is {list(dims)}, so the rank is at most "
                f"{max_rank(method, lay)}; lower rank or exclude=['{lay.node}']")
        return [_tucker_pair(rank, dims) if method == "tucker2" else rank]
    top = max_rank(method, lay)
    ranks = [r for r in range(multiple, top + 1, multiple)] or [top]
    if method == "tucker2":
        ranks = list(dict.fromkeys(_tucker_pair(r, dims, multiple) for r in ranks
                                   if r <= dims[0]))
    dense = lay.w.numel()
    if require_saving:
        ranks = [r for r in ranks if factor_params(method, dims, r) < dense]
    if lay.kind == "conv" and len(ranks) > CONV_CANDIDATES:
        step = len(ranks) / CONV_CANDIDATES
        ranks = [ranks[int(k * step)] for k in range(CONV_CANDIDATES)]
    return ranks


def _tucker_pair(r: int, dims, multiple: int = 0) -> tuple[int, int]:
    """(r_out, r_in): a fixed rank clipped to each mode; on the grid, r_in scales with I/O."""
    o, i = dims[0], dims[1]
    if not multiple:
        return min(r, o), min(r, i)
    ri = max(multiple, round(r * i / o / multiple) * multiple)
    return min(r, o), min(ri, i)


def candidates(lay: Layer, stats: Stats, method: str, multiple: int, rank: int,
               require_saving: bool) -> list[Candidate]:
    """Every candidate of every method that applies, measured; unprofitable ones dropped
    when require_saving."""
    y2 = stats.out_norm2(lay.w, lay.bias)
    params, flops = dense_cost(lay.w4 if lay.w4 is not None else lay.w, lay.shape)
    out = []
    for m in methods_for(method, lay.kind):
        ranks = rank_grid(m, lay, multiple, rank, require_saving)
        if ranks:
            w = lay.w4 if lay.kind == "conv" else lay.w
            out += METHODS[m][1](w, stats, y2, lay.shape, ranks)
    if require_saving:
        out = [c for c in out if c.params < params and c.flops < flops]
    return out


def choose_each(cands: list[Candidate], mode: str, value: float) -> Candidate | str:
    """Modes rank / energy / max_error for one layer: the choice, or why there is none."""
    if mode == "rank":
        return min(cands, key=lambda c: c.error)
    ok = [c for c in cands if (c.energy >= value if mode == "energy" else c.error <= value)]
    if not ok:
        best = max(cands, key=lambda c: c.energy) if mode == "energy" else \
            min(cands, key=lambda c: c.error)
        got = f"energy {best.energy:.4f}" if mode == "energy" else f"error {best.error:.2e}"
        return (f"no rank that cuts its cost meets {mode}={value} (best: {got} at rank "
                f"{best.rank}, {best.method})")
    return min(ok, key=lambda c: (c.flops, c.error))


def choose_ratio(per_layer: dict[str, list[Candidate]], dense: dict[str, int], ratio: float
                 ) -> dict[str, Candidate]:
    """Whole-model params budget over the layers being factorized: start each at its
    smallest candidate, then repeatedly spend params where they cut the squared relative
    output error most per param, while the total stays <= ratio x their dense params."""
    fronts = {k: _frontier(v) for k, v in per_layer.items()}
    at = dict.fromkeys(fronts, 0)
    budget = ratio * sum(dense.values())
    used = sum(f[0].params for f in fronts.values())
    if used > budget:
        raise PassError(f"pass 'factorize': ratio={ratio} is below what the smallest ranks "
                        f"give ({used / sum(dense.values()):.3f} of the params of the "
                        "factorized layers); raise ratio, lower multiple or exclude layers")
    while True:
        best, gain = None, 0.0
        for k, f in fronts.items():
            if at[k] + 1 < len(f):
                c0, c1 = f[at[k]], f[at[k] + 1]
                step = (c0.error ** 2 - c1.error ** 2) / max(c1.params - c0.params, 1)
                if used + c1.params - c0.params <= budget and step > gain:
                    best, gain = k, step
        if best is None:
            break
        used += fronts[best][at[best] + 1].params - fronts[best][at[best]].params
        at[best] += 1
    return {k: f[at[k]] for k, f in fronts.items()}


def _frontier(cands: list[Candidate]) -> list[Candidate]:
    """The candidates with params rising and error strictly falling (the Pareto front)."""
    out: list[Candidate] = []
    for c in sorted(cands, key=lambda c: (c.params, c.error)):
        if not out or c.error < out[-1].error:
            out.append(c)
    return out
