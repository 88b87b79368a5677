"""One weight -> its codebook(s) and indices, for share-weights.

    codebooks(w, bits, rows_per_codebook=0)          # one codebook: k-means over all values
    codebooks(w, bits, rows_per_codebook=1)          # one per row (output channel)
    codebooks(w, bits, rows_per_codebook=1, h=H)     # and data-aware indices (share_assign)

A weight's rows are its first axis (a linear's outputs, a conv's output channels, an
embedding's tokens). G = ceil(rows / rows_per_codebook) codebooks over consecutive rows,
each taking ceil(rows / G) of them (graphc/ops_codebook.py: row r reads codebook
r // ceil(rows / G)), so the last one may hold fewer.
"""

from __future__ import annotations

import torch

from graphc.passes.factor_layers import find_layers, gather_stats
from graphc.passes.share_assign import assign
from graphc.passes.share_kmeans import kmeans_1d, kmeans_rows


def groups_of(rows: int, rows_per_codebook: int) -> tuple[int, int]:
    """(number of codebooks, rows each) for a weight of `rows` rows (0: one codebook)."""
    if rows_per_codebook <= 0 or rows_per_codebook >= rows:
        return 1, rows
    g = -(-rows // rows_per_codebook)
    return g, -(-rows // g)


def codebooks(w: torch.Tensor, bits: int, rows_per_codebook: int = 0,
              h: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(codebook f32 [2^bits] or [G, 2^bits], indices int64 of w's shape). h: the second
    moments [D, D] of the inputs w [rows, D...] multiplies, for data-aware indices."""
    k, rows = 1 << bits, w.shape[0]
    g, per = groups_of(rows, rows_per_codebook)
    if g == 1:
        centroids, idx = kmeans_1d(w, k)
        per_row = centroids[None].expand(rows, k)
    else:
        centroids, idx = _grouped(w.reshape(rows, -1), k, per)
        per_row = centroids.repeat_interleave(per, 0)[:rows]
    if h is not None:
        idx = assign(w.reshape(rows, -1), per_row, h)
    return centroids, idx.reshape(w.shape)


def _grouped(w2: torch.Tensor, k: int, per: int) -> tuple[torch.Tensor, torch.Tensor]:
    """k-means per group of `per` rows (the last group may be short): [G, k], [rows, D]."""
    full = w2.shape[0] // per * per
    parts = [(w2[:full].reshape(-1, per * w2.shape[1]), per)] if full else []
    if full < w2.shape[0]:
        parts.append((w2[full:].reshape(1, -1), w2.shape[0] - full))
    cents, idxs = [], []
    for values, n_rows in parts:
        c, i = kmeans_rows(values, k)
        cents.append(c)
        idxs.append(i.reshape(-1, w2.shape[1]))
    return torch.cat(cents), torch.cat(idxs)


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
