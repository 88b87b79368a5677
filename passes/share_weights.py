"""share-weights: float weights -> k-means codebooks + indices packed at b bits.

    %fc1_weight: f32[64, 512] = param fc1_weight
    %permute = aten.permute(%fc1_weight, [1, 0])
    %addmm = aten.addmm(%fc1_bias, %x, %permute)
      ->  (decode)  %fc1_weight_cb = graphc.codebook_decode(%fc1_weight_codebook,
                                                            %fc1_weight_packed, 4, [64, 512])
                    %permute = aten.permute(%fc1_weight_cb, [1, 0])
                    %addmm = aten.addmm(%fc1_bias, %x, %permute)
          (gather)  %addmm = graphc.codebook_linear(%x, %fc1_weight_codebook,
                                                    %fc1_weight_packed, 4, [64, 512], %fc1_bias)

Each selected weight (passes/share_policy.py) is clustered by 1-D k-means
(passes/share_kmeans.py) into 2^bits centroids, a float32 parameter (so centroid
fine-tuning is plain training: the op's gradient sums the members of each centroid), and
one index per element, packed at `bits` bits into a uint8 buffer (graphc/ops_codebook.py).
The float weight is dropped. A weight read by several layers (tied) is clustered once.

Lowering per layer (passes/share_lowering.py): `decode` rebuilds the dense weight once, when
the model loads; `gather` reads the codebook inside the layer's kernel on every call
(linears in nn.Linear's [out, in] layout and embeddings); `auto` times both on `target`.
The choice and its reason are in graph.meta["share-weights"]["layers"].

Granularity and indices (passes/share_cluster.py): `rows_per_codebook=0` clusters the whole
weight into one codebook; `rows_per_codebook=r` gives every r rows (output channels) their
own codebook, a [G, 2^bits] parameter. `assign="data-aware"` picks the indices of linear and
conv weights against their inputs' second moments on calibration data (passes/share_assign.py,
GPTQ with a codebook) instead of the nearest centroid.
"""

from __future__ import annotations

import logging
from typing import Literal

import torch
from torch import fx

from graphc.calibrate import as_batches
from graphc.errors import PassError
from graphc.ir import Graph, fetch_attr
from graphc.ops_codebook import pack, packed_length
from graphc.pass_manager import register_pass
from graphc.passes.cleanup import dead_code_elimination
from graphc.passes.share_cluster import Clusters, codebooks, input_moments
from graphc.passes.share_entropy import entropy_bits, find_lam
from graphc.passes.share_lowering import choose_lowering, gather_form
from graphc.passes.share_policy import OP_CLASSES, SharePolicy, plan
from graphc.rewrite import add_weight
from graphc.verify import propagate

Q = torch.ops.graphc
log = logging.getLogger("graphc")


@register_pass("share-weights")
def share_weights(graph: Graph, *, bits: int = 4, ops: tuple[str, ...] = OP_CLASSES,
                  min_size: int = 1024, include: tuple[str, ...] = (),
                  exclude: tuple[str, ...] = (), shared: bool = False,
                  lowering: Literal["auto", "decode", "gather"] = "auto",
                  target: str = "cpu", policy: SharePolicy | None = None,
                  rows_per_codebook: int = 0,
                  assign: Literal["nearest", "data-aware"] = "nearest",
                  rate: float | None = None, calibration: list | None = None) -> Graph:
    """float linear/conv/embedding weights -> k-means codebook + b-bit packed indices.

    bits: 2..8 (2^bits centroids). ops / min_size / include / exclude: which layers.
    shared: one codebook for all selected weights of a bit width. rows_per_codebook: 0 (one
    codebook per weight) or r (one per r rows). assign: nearest centroid, or data-aware
    (output error on the calibration data; linears and convs). rate: mean bits per index
    in the saved (LZMA-compressed) artifact, 0 < rate < bits: entropy-constrained codebooks
    (passes/share_entropy.py), one lam for all weights. lowering: decode (dense
    weight rebuilt once at load), gather (codebook read inside the kernel), or
    auto (both timed on `target`, the faster kept). policy: a SharePolicy (Python only),
    replacing the selection options. calibration: input batches (Python API), else
    graph.meta["calibration"], else the example inputs.
    """
    policy = policy or SharePolicy(bits, tuple(ops), min_size, tuple(include), tuple(exclude),
                                   shared, rows_per_codebook=rows_per_codebook)
    _check_assign(assign, policy)
    _check_rate(rate, assign, policy)
    chosen = plan(graph, policy)
    if not chosen:
        return graph
    g = graph.copy()
    weights = _weights_bits(chosen)
    moments = {}
    if assign == "data-aware":
        once = [w for w in weights if sum(lay.weight == w for lay, _ in chosen) == 1]
        moments = input_moments(graph, once, as_batches(
            graph, calibration if calibration is not None else graph.meta.get("calibration")))
    straddling = sorted(set(weights.values()) - {2, 4, 8})
    if rate is not None and straddling:
        log.warning("share-weights: rate=%s with %s-bit indices: they straddle bytes, and the "
                    "artifact's LZMA stores them at well above their entropy (6 bits: 1.3x); "
                    "bits 2, 4 or 8 store at about it", rate, straddling)
    books = _cluster(g, weights, policy, moments, rate)
    modes = choose_lowering(g, chosen, lowering, target,
                            {w: b.groups for w, b in books.items()})
    report = []
    for layer, _ in chosen:
        mode, reason = modes[layer.node]
        if mode == "gather":
            _gather(g, _node(g, layer.node), books[layer.weight])
        report.append(_row(g, layer, books[layer.weight], mode, reason))
    for weight, book in books.items():
        _decode_remaining(g, weight, book)
    g.gm.recompile()
    out = propagate(dead_code_elimination(g))
    out.meta["share-weights"] = _summary(report, books, policy)
    return out


def _weights_bits(chosen) -> dict[str, int]:
    """Weight attribute -> bits; a tied weight read by layers of different widths gets the
    widest (the more precise) of them."""
    out: dict[str, int] = {}
    for layer, bits in chosen:
        out[layer.weight] = max(bits, out.get(layer.weight, 0))
    return out


class Book:
    """One weight's codebook attribute, indices, packed buffer, clustering error and the
    entropy of its indices (what they cost in the LZMA-compressed artifact)."""

    def __init__(self, g: Graph, weight: str, codebook: str, indices: torch.Tensor, bits: int):
        self.weight, self.codebook, self.bits = weight, codebook, bits
        self.shape = list(indices.shape)
        dense = fetch_attr(g.gm, weight).detach()
        cb = fetch_attr(g.gm, codebook).detach()
        self.groups = 1 if cb.dim() == 1 else cb.shape[0]
        approx = _dense(cb, indices)
        self.rel_error = float((approx - dense).norm() / dense.norm().clamp(min=1e-30))
        rows = self.shape[0] if self.shape else 1
        self.entropy = entropy_bits(indices, 1 << bits, per=-(-rows // self.groups))
        self.packed = add_weight(g, f"{weight}_packed", pack(indices, bits), trainable=False)


def _check_assign(assign: str, policy: SharePolicy) -> None:
    if assign not in ("nearest", "data-aware"):
        raise PassError(f"pass 'share-weights': assign={assign!r} is unknown; choose "
                        "'nearest' (k-means) or 'data-aware' (output error on calibration data)")
    if assign == "data-aware" and policy.shared:
        raise PassError("pass 'share-weights': assign='data-aware' picks indices per layer; "
                        "it does not combine with shared=True")


def _check_rate(rate, assign: str, policy: SharePolicy) -> None:
    if rate is None:
        return
    widest = max([policy.bits] + [b for _, b in policy.overrides if b is not None])
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 < rate < widest:
        raise PassError(f"pass 'share-weights': rate={rate!r} must be a number of bits per "
                        f"index with 0 < rate < bits ({widest}); leave it unset for k-means")
    if assign == "data-aware":
        raise PassError("pass 'share-weights': rate= picks indices by their entropy and "
                        "assign='data-aware' by the layer's output error; choose one")


def _cluster(g: Graph, weights: dict[str, int], policy: SharePolicy,
             moments: dict[str, torch.Tensor], rate: float | None) -> dict[str, Book]:
    """k-means per weight (or per group of its rows), or once over all weights of one bit
    width (shared); then, with a rate, entropy-constrained at one lam for all of them."""
    if not policy.shared:
        plans = [(f"{w}_codebook", [w], Clusters(fetch_attr(g.gm, w).detach(), bits,
                                                  policy.rows_per_codebook))
                 for w, bits in weights.items() if w not in moments]
    else:
        plans = []
        for bits in sorted(set(weights.values())):
            names = [w for w in weights if weights[w] == bits]
            values = torch.cat([fetch_attr(g.gm, w).detach().reshape(-1) for w in names])
            plans.append((f"shared{bits}_codebook", names, Clusters(values, bits)))
    lam = _lam_for(plans, rate)
    books = {w: _own_book(g, w, weights[w], policy.rows_per_codebook, h)
             for w, h in moments.items() if w in weights}
    for cb_name, names, km in plans:
        centroids, idx = km.at(lam)
        cb = add_weight(g, cb_name, centroids, trainable=True)
        start = 0
        for w in names:
            shape = fetch_attr(g.gm, w).shape
            books[w] = Book(g, w, cb, idx.reshape(-1)[start:start + shape.numel()].reshape(
                shape), weights[w])
            start += shape.numel()
    return {w: books[w] for w in weights}


def _lam_for(plans: list, rate: float | None) -> float:
    """The one rate weight that brings the mean bits per index of all plans to `rate`."""
    if rate is None or not plans:
        return 0.0
    total = sum(km.shape.numel() for _, _, km in plans)

    def mean_rate(lam: float) -> float:
        return sum(km.rate(lam) * km.shape.numel() for _, _, km in plans) / total

    return find_lam(mean_rate, rate)


def _own_book(g: Graph, weight: str, bits: int, rows_per_codebook: int, h) -> Book:
    centroids, idx = codebooks(fetch_attr(g.gm, weight).detach(), bits, rows_per_codebook, h)
    cb = add_weight(g, f"{weight}_codebook", centroids, trainable=True)
    return Book(g, weight, cb, idx, bits)


def _dense(codebook: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    if codebook.dim() == 1:
        return codebook[indices]
    per = -(-indices.shape[0] // codebook.shape[0])
    rows = torch.arange(indices.shape[0]) // per
    return codebook[rows.reshape(-1, *[1] * (indices.dim() - 1)), indices]


def _node(g: Graph, name: str) -> fx.Node:
    return next(n for n in g.gm.graph.nodes if n.name == name)


def _attrs(g: Graph, book: Book) -> tuple[fx.Node, fx.Node]:
    graph = g.gm.graph
    first = next(n for n in graph.nodes if n.op != "placeholder")
    with graph.inserting_before(first):
        return graph.get_attr(book.codebook), graph.get_attr(book.packed)


def _gather(g: Graph, node: fx.Node, book: Book) -> None:
    """The layer node -> codebook_linear / codebook_embedding on the packed indices."""
    x, bias = gather_form(node)
    cb, packed = _attrs(g, book)
    graph = g.gm.graph
    with graph.inserting_before(node):
        if node.target is torch.ops.aten.embedding.default:
            new = graph.call_function(Q.codebook_embedding.default,
                                      (cb, packed, book.bits, book.shape, x))
        else:
            new = graph.call_function(Q.codebook_linear.default,
                                      (x, cb, packed, book.bits, book.shape, bias))
    new.meta = dict(node.meta)
    node.replace_all_uses_with(new)
    graph.erase_node(node)
    new.name = node.name  # the report and later passes still find the layer by its name


def _decode_remaining(g: Graph, weight: str, book: Book) -> None:
    """Every other read of the float weight -> one codebook_decode; then drop the weight."""
    graph = g.gm.graph
    reads = [n for n in graph.nodes if n.op == "get_attr" and n.target == weight]
    if any(n.users for n in reads):
        cb, packed = _attrs(g, book)
        with graph.inserting_after(packed):
            dec = graph.call_function(Q.codebook_decode.default,
                                      (cb, packed, book.bits, book.shape))
        dec.name = f"{weight}_cb"
        for n in reads:
            n.replace_all_uses_with(dec)
    for n in reads:
        graph.erase_node(n)
    owner, _, name = weight.rpartition(".")
    delattr(fetch_attr(g.gm, owner) if owner else g.gm, name)  # the copy's module only


def _row(g: Graph, layer, book: Book, mode: str, reason: str) -> dict:
    n = int(torch.tensor(book.shape).prod())
    return {"layer": layer.node, "op": layer.op, "class": layer.kind, "weight": layer.weight,
            "bits": book.bits, "codebooks": book.groups, "params": n,
            "rel_error": book.rel_error, "entropy_bits": book.entropy, "lowering": mode,
            "reason": reason}


def _summary(rows: list[dict], books: dict[str, Book], policy: SharePolicy) -> dict:
    fp32 = sum(4 * r for r in {b.weight: _numel(b) for b in books.values()}.values())
    codebooks = {b.codebook: b.groups << b.bits for b in books.values()}
    packed = sum(packed_length(_numel(b), b.bits) for b in books.values())
    entropy = sum(b.entropy * _numel(b) for b in books.values()) / 8
    return {"layers": rows, "shared": policy.shared,
            "rows_per_codebook": policy.rows_per_codebook, "weight_bytes_fp32": fp32,
            "weight_bytes_shared": packed + 4 * sum(codebooks.values()),
            "codebook_bytes": 4 * sum(codebooks.values()),
            "index_bytes_at_entropy": round(entropy),
            "codebooks": sum(b.groups for b in {b.codebook: b for b in books.values()}.values())}


def _numel(book: Book) -> int:
    return int(torch.tensor(book.shape).prod()) if book.shape else 1

