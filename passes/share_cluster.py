"""One weight -> its codebook(s) and indices, for share-weights.

    km = Clusters(w, bits, rows_per_codebook=0)   # one codebook: k-means over all values
    km = Clusters(w, bits, rows_per_codebook=1)   # one per row (output channel)
    km.at(0.0)                                    # (codebook, indices): k-means' own
    km.at(lam), km.rate(lam)                      # entropy-constrained (share_entropy.py)
    codebooks(w, bits, 1, h=H)                    # k-means, data-aware indices (share_assign)

A weight's rows are its first axis (a linear's outputs, a conv's output channels, an
embedding's tokens). G = ceil(rows / rows_per_codebook) codebooks over consecutive rows,
each taking ceil(rows / G) of them (graphc/ops_codebook.py: row r reads codebook
r // ceil(rows / G)), so the last one may hold fewer. k-means runs once per weight; the
rate search of share-weights(rate=...) refines that start at many lam.
"""

from __future__ import annotations

import torch

from graphc.passes.factor_layers import find_layers, gather_stats
from graphc.passes.share_assign import assign
from graphc.passes.share_entropy import ecsq_rows, entropy_bits
from graphc.passes.share_kmeans import kmeans_1d, kmeans_rows


def groups_of(rows: int, rows_per_codebook: int) -> tuple[int, int]:
    """(number of codebooks, rows each) for a weight of `rows` rows (0: one codebook)."""
    if rows_per_codebook <= 0 or rows_per_codebook >= rows:
        return 1, rows
    g = -(-rows // rows_per_codebook)
    return g, -(-rows // g)


class Clusters:
    """A weight's k-means, per codebook: parts of values [R, n] (one codebook per row of a
    part: all rows of one group, flattened), their centroids [R, k] and indices [R, n]."""

    def __init__(self, w: torch.Tensor, bits: int, rows_per_codebook: int = 0):
        self.k, self.shape = 1 << bits, w.shape
        rows = w.shape[0] if w.dim() else 1
        self.groups, per = groups_of(rows, rows_per_codebook)
        self.scale = float(w.detach().to(torch.float64).pow(2).mean())
        if self.groups == 1:
            c, idx = kmeans_1d(w, self.k)
            self.parts = [(w.detach().reshape(1, -1), c[None], idx.reshape(1, -1))]
        else:
            self.parts = _grouped(w.detach().reshape(rows, -1), self.k, per)

    def at(self, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(codebook f32 [k] or [G, k], indices int64 of w's shape) at rate weight lam."""
        cents, idxs = zip(*(ecsq_rows(v, c, i, lam, self.scale) for v, c, i in self.parts))
        idx = torch.cat([i.reshape(-1) for i in idxs]).reshape(self.shape)
        return (cents[0][0] if self.groups == 1 else torch.cat(cents)), idx

    def rate(self, lam: float) -> float:
        """Mean bits per index at lam: each codebook's indices at their entropy."""
        bits = sum(entropy_bits(ecsq_rows(v, c, i, lam, self.scale)[1], self.k, per=1)
                   * v.numel() for v, c, i in self.parts)
        return bits / sum(v.numel() for v, _, _ in self.parts)


def codebooks(w: torch.Tensor, bits: int, rows_per_codebook: int = 0,
              h: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(codebook f32 [2^bits] or [G, 2^bits], indices int64 of w's shape) by k-means. h: the
    second moments [D, D] of the inputs w [rows, D...] multiplies, for data-aware indices."""
    km = Clusters(w, bits, rows_per_codebook)
    centroids, idx = km.at(0.0)
    if h is not None:
        rows = w.shape[0]
        _, per = groups_of(rows, rows_per_codebook)
        per_row = (centroids[None].expand(rows, km.k) if km.groups == 1
                   else centroids.repeat_interleave(per, 0)[:rows])
        idx = assign(w.reshape(rows, -1), per_row, h).reshape(w.shape)
    return centroids, idx


def _grouped(w2: torch.Tensor, k: int, per: int) -> list[tuple]:
    """k-means per group of `per` rows (the last group may be short): parts as in Clusters."""
    full = w2.shape[0] // per * per
    parts = [w2[:full].reshape(-1, per * w2.shape[1])] if full else []
    if full < w2.shape[0]:
        parts.append(w2[full:].reshape(1, -1))
    return [(values, *kmeans_rows(values, k)) for values in parts]


def input_moments(g, weights: list[str], batches: list[tuple]) -> dict[str, torch.Tensor]:
    """Weight attribute -> mean second moments [D, D] of its layer's inputs (rows or conv
    patches) on the calibration batches, for weights read by exactly one linear or conv."""
    layers, _ = find_layers(g, ("linear", "conv"), (), ())
    readers: dict[str, list] = {}
    for lay in layers:
        readers.setdefault(lay.base, []).append(lay)
    single = [lays[0] for w, lays in readers.items() if w in weights and len(lays) == 1]
    if not single:
        return {}
    stats = gather_stats(g, single, batches)
    return {lay.base: stats[lay.node].cov / max(stats[lay.node].rows, 1) for lay in single}
