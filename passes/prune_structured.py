"""prune-channels: structured pruning that physically removes channels (or attention heads).

    %c = aten.convolution(%x, %w, %b, ...)        w: [64, 32, 3, 3]   (50%)
      ->  %c = aten.convolution(%x, %w, %b, ...)  w: [32, 32, 3, 3], and every coupled
          weight (batchnorm, next layer's input channels, residual partners) sliced alike

The groups of coupled channels come from passes/prune_groups.py; a group's channel score is
the sum, over its layer weights, of the element importance of passes/prune_criteria.py
(weight_scores) summed over the other axes. scope="layer" removes `sparsity` of each group;
scope="global" ranks channels of all groups together (each group's scores divided by their
mean, so wide and narrow layers compare). criterion="sensitivity" scores a channel by the
squared change of the graph's outputs when the channel is removed, to first order, over
calibration batches (no labels): E_r (sum of W * d<r, f>/dW over the entries of the layers
that read the channel)^2 with random +-1 directions r (prune_criteria.output_products).
Those scores share one unit across groups, so scope="global" ranks them unnormalized.
A group always keeps at least `round_to` (>= 1)
channels. The rewrite and report (graph.meta["prune"]) are in passes/prune_slice.py.
"""

from __future__ import annotations

import logging
import math
from typing import Literal

import torch

from graphc.distill_taps import split_item
from graphc.errors import PassError
from graphc.ir import Graph
from graphc.pass_manager import register_pass
from graphc.passes.prune_groups import Dependencies, Group, find_groups
from graphc.passes.prune_slice import apply_pruning, prune_report

log = logging.getLogger("graphc")
CRITERIA = ("l1", "l2", "taylor", "random", "sensitivity")


@register_pass("prune-channels")
def prune_channels(graph: Graph, *, sparsity: float = 0.5, criterion: str = "l1",
                   scope: Literal["layer", "global"] = "layer", include: tuple[str, ...] = (),
                   exclude: tuple[str, ...] = (), unit: Literal["channel", "head"] = "channel",
                   calibration: list | None = None, round_to: int = 1) -> Graph:
    """conv/linear layers -> thinner layers (whole channels or attention heads removed).

    sparsity: fraction of each group's channels to remove (scope="layer") or of all
    prunable channels (scope="global"). criterion: l1, l2, taylor (needs calibration
    batches with labels), random, sensitivity (output change on calibration batches, no
    labels needed; the data-aware choice for embedding models). include / exclude: fnmatch patterns on layer node or
    weight names. unit: "channel", or "head" (only attention heads, [..., heads, d] views).
    round_to: kept channels per group are a multiple of it (8 suits CPU vector widths).
    """
    _check(sparsity, criterion, scope, unit, round_to)
    deps = find_groups(graph, unit)
    groups, skipped = _candidates(deps, include, exclude, unit)
    for row in skipped:
        log.info("prune-channels: group %s (%s) kept: %s", row["group"],
                 ", ".join(row["layers"]), row["skipped"])
    if not groups:
        return graph
    if criterion == "sensitivity":
        scores = _sensitivity(graph, groups, calibration if calibration is not None
                              else graph.meta.get("calibration"))
    else:
        scores = _scores(graph, deps, groups, criterion, calibration)
    keep = _choose(groups, scores, sparsity, scope, round_to,
                   normalize=criterion != "sensitivity")
    if all(len(keep[g.id]) == g.size for g in groups):
        return graph
    out = apply_pruning(graph, deps, keep)
    batches = _inputs(graph, calibration if calibration is not None
                      else graph.meta.get("calibration"))
    opts = {"sparsity": sparsity, "criterion": criterion, "scope": scope, "unit": unit,
            "round_to": round_to}
    out.meta["prune"] = prune_report(graph, out, deps, keep, skipped, opts, batches)
    return out


def _check(sparsity, criterion, scope, unit, round_to) -> None:
    def bad(msg: str):
        raise PassError(f"pass 'prune-channels': {msg}")
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) \
            or not 0 <= sparsity < 1:
        bad(f"sparsity={sparsity!r} must be in [0, 1): the fraction of channels to remove")
    if criterion not in CRITERIA:
        bad(f"criterion={criterion!r} is unknown; choose from {list(CRITERIA)}")
    if scope not in ("layer", "global"):
        bad(f"scope={scope!r} must be 'layer' or 'global'")
    if unit not in ("channel", "head"):
        bad(f"unit={unit!r} must be 'channel' or 'head'")
    if isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1:
        bad(f"round_to={round_to!r} must be an int >= 1")


def _candidates(deps: Dependencies, include, exclude, unit) -> tuple[list[Group], list[dict]]:
    """The groups to prune and the skipped rows; an include pattern that selects only
    unprunable groups (or nothing) is an error, not a silent no-op."""
    for pat in include:
        hits = [g for g in deps.groups if g.matches(pat)]
        if not hits:
            raise PassError(f"pass 'prune-channels': include pattern {pat!r} matches no "
                            "conv/linear layer or weight of the graph")
        if all(g.blocked for g in hits):
            why = "; ".join(f"group of {', '.join('%' + s for s in g.spaces)}: {g.blocked}"
                            for g in hits)
            raise PassError(f"pass 'prune-channels': include pattern {pat!r} selects layers "
                            f"with no prunable channel axis ({why})")
    groups, skipped = [], []
    for g in deps.groups:
        if (include and not any(g.matches(p) for p in include)) or \
                any(g.matches(p) for p in exclude):
            continue
        reason = g.blocked or (None if unit == "channel" or g.unit > 1 else
                               "not attention heads (unit='head' prunes heads only)")
        if reason is None and g.size < 2:
            reason = "a single channel"
        if reason:
            skipped.append({"group": g.id, "layers": g.spaces, "skipped": reason})
        else:
            groups.append(g)
    return groups, skipped


def _scores(graph: Graph, deps: Dependencies, groups: list[Group], criterion: str,
            calibration) -> dict[int, torch.Tensor]:
    """Per group, one importance per channel: element scores summed over each member's
    other axes, summed over the group's layer weights."""
    elem = _weight_scores(graph, criterion, calibration)
    out = {}
    for g in groups:
        s = torch.zeros(g.size, dtype=torch.float64)
        for m in g.members:
            if m.kind != "weight" or m.weight not in elem:
                continue
            e = elem[m.weight].double()
            per = e.sum(dim=[d for d in range(e.dim()) if d != m.axis]) if e.dim() > 1 else e
            sel = m.index >= 0
            s.index_add_(0, m.index[sel], per[sel])
        out[g.id] = s
    return out


def _sensitivity(graph: Graph, groups: list[Group], data) -> dict[int, torch.Tensor]:
    """Per group channel: the mean over probes, summed over batches, of the squared signed
    sum of W * d<r, f>/dW over the channel's entries in its consumers (the weights that read
    it on their input axis: zeroing those removes the channel exactly; its producer rows
    would count the same removal twice). A group without consumers uses all its weights."""
    from graphc.passes.prune_criteria import PROBES, output_products, prunable_weights

    if data is None:
        raise PassError("pass 'prune-channels': criterion 'sensitivity' needs calibration "
                        "batches (inputs only is fine); pass calibration=[...]")
    red = {pw.name: pw.reduction_dim for pw in prunable_weights(graph)}
    readers = {}
    for g in groups:
        ms = [m for m in g.members if m.kind == "weight" and m.weight in red]
        readers[g.id] = [m for m in ms if red[m.weight] == m.axis] or ms
    acc = {g.id: torch.zeros(g.size, dtype=torch.float64) for g in groups}
    for prods in output_products(graph, data):
        for g in groups:
            s = torch.zeros(g.size, dtype=torch.float64)
            for m in readers[g.id]:
                e = prods[m.weight].double()
                per = e.sum(dim=[d for d in range(e.dim()) if d != m.axis]) if e.dim() > 1 else e
                sel = m.index >= 0
                s.index_add_(0, m.index[sel], per[sel])
            acc[g.id] += s.square() / PROBES
    return acc


def _weight_scores(graph, criterion, calibration) -> dict[str, torch.Tensor]:
    try:
        from graphc.passes.prune_criteria import weight_scores
    except ImportError:  # until prune_criteria lands: magnitudes only
        if criterion not in ("l1", "l2"):
            raise PassError(f"pass 'prune-channels': criterion {criterion!r} needs "
                            "graphc.passes.prune_criteria") from None
        p = 1 if criterion == "l1" else 2
        return {k: v.detach().abs() ** p for k, v in graph.weights().items()}
    return weight_scores(graph, criterion, data=calibration)


def _choose(groups: list[Group], scores: dict, sparsity: float, scope: str,
            round_to: int, normalize: bool = True) -> dict[int, list[int]]:
    """{group id: kept channels, sorted}. normalize: divide each group's scores by their
    mean before a global ranking (weight scores of different layers are not comparable)."""
    if scope == "layer":
        counts = {g.id: g.size - math.floor(sparsity * g.size) for g in groups}
    else:
        norm = {g.id: scores[g.id] / scores[g.id].mean().clamp_min(1e-30) if normalize
                else scores[g.id] for g in groups}
        ranked = sorted((float(v), g.id) for g in groups for v in norm[g.id])
        total, removed = len(ranked), {g.id: 0 for g in groups}
        for _, gid in ranked[:math.floor(sparsity * total)]:
            removed[gid] += 1
        counts = {g.id: g.size - removed[g.id] for g in groups}
    keep = {}
    for g in groups:
        k = min(g.size, max(round_to, math.ceil(counts[g.id] / round_to) * round_to))
        top = torch.argsort(scores[g.id], descending=True, stable=True)[:k]
        keep[g.id] = sorted(top.tolist())
    return keep


def _inputs(graph: Graph, data) -> list[tuple]:
    """The input tuples of calibration items (which may carry labels)."""
    if data is None:
        return [tuple(graph.example_inputs)]
    return [tuple(split_item(item, graph)[0]) for item in data]
