"""prune: the least important weights of conv and linear layers -> exact zeros, kept zero by
a mask through fine-tuning.

    %permute = aten.permute(%fc1_weight, [1, 0])
      ->  %fc1_weight_masked = aten.mul(%fc1_weight, %fc1_weight_mask)    (mask: a buffer)
          %permute = aten.permute(%fc1_weight_masked, [1, 0])

structure: "unstructured" (any entry), "N:M" such as "2:4" (N of every M consecutive
weights along the input axis survive: the pattern sparse tensor cores and sparse CPU
kernels use), or "channels" (whole output channels, delegated to
passes/prune_structured.py). Importance per entry: passes/prune_criteria.py; masks and
folding: passes/prune_masks.py; the iterative API with schedules, fine-tuning and
rewinding: graphc/prune_iter.py. The report is graph.meta["prune-unstructured"]
(prune-channels writes graph.meta["prune"]).
"""

from __future__ import annotations

import fnmatch
import logging
import re
from collections.abc import Callable
from typing import Literal

import torch

from graphc.errors import PassError
from graphc.ir import Graph
from graphc.pass_manager import register_pass
from graphc.passes.prune_criteria import (
    CRITERIA,
    PrunableWeight,
    effective_weight,
    prunable_weights,
    weight_scores,
)
from graphc.passes.prune_masks import NORMALIZERS, apply_masks, global_masks, layer_masks, nm_masks

log = logging.getLogger("graphc")
REPORT_KEY = "prune-unstructured"  # "prune" is prune-channels' report
DEFAULT_SPARSITY = 0.8


@register_pass("prune")
def prune(graph: Graph, *, sparsity: float | None = None,
          criterion: Literal["l1", "l2", "taylor", "random", "sensitivity"] = "l1",
          scope: Literal["layer", "global"] = "layer", structure: str = "unstructured",
          normalize: Literal["lamp", "mean", "none"] = "lamp",
          include: tuple[str, ...] = (), exclude: tuple[str, ...] = (), seed: int = 0,
          calibration: list | None = None, loss: Callable | None = None) -> Graph:
    """conv/linear weights -> masked weights with the least important entries exactly 0.

    sparsity: fraction of zeros (default 0.8; N:M structures imply 1 - N/M). criterion: l1,
    l2, taylor (|w dL/dw| over `calibration` items, inputs or (inputs, labels); `loss`:
    fn(outputs[, labels]), default cross-entropy), random (seeded baseline), sensitivity
    (first-order output change over `calibration` inputs, no labels). scope: layer
    (each weight at `sparsity`) or global (one threshold over all, scores normalized per
    layer by `normalize`: lamp, mean, none). structure: unstructured, N:M (e.g. 2:4, along
    the input axis), channels. include / exclude: fnmatch patterns on layer node or weight
    names. Masks stay through training; fold-prune-masks makes them plain zeros.
    """
    nm = _check(sparsity, criterion, scope, structure, normalize)
    if structure == "channels":
        return _channels(graph, sparsity, criterion, scope, include, exclude, calibration)
    target = 1 - nm[0] / nm[1] if nm else (DEFAULT_SPARSITY if sparsity is None else sparsity)
    pws = [pw for pw in prunable_weights(graph) if _selected(pw, include, exclude)]
    if not pws:
        log.info("prune: no prunable weight selected in '%s'", graph.name)
        return graph
    data = calibration if calibration is not None else graph.meta.get("calibration")
    scores = weight_scores(graph, criterion, data, loss, seed=seed, weights=pws)
    old = {pw.name: _old_mask(graph, pw) for pw in pws}
    by_name = {pw.name: pw for pw in pws}
    if nm:
        masks = nm_masks(scores, old, by_name, *nm)
    elif scope == "global":
        masks = global_masks(scores, old, target, normalize)
    else:
        masks = layer_masks(scores, old, target)
    if all(torch.equal(m, old[k]) if old[k] is not None else bool(m.all())
           for k, m in masks.items()):
        return graph  # nothing newly pruned (sparsity 0, or already there)
    out = graph.copy()
    apply_masks(out, masks, by_name)
    out.meta[REPORT_KEY] = prune_report(graph, out, pws, target, criterion, scope,
                                        structure, normalize)
    return out


def _check(sparsity, criterion, scope, structure, normalize) -> tuple[int, int] | None:
    """Validate the options; return (N, M) for an N:M structure."""
    def bad(msg: str):
        raise PassError(f"pass 'prune': {msg}")
    if sparsity is not None and (isinstance(sparsity, bool) or not isinstance(
            sparsity, (int, float)) or not 0 <= sparsity < 1):
        bad(f"sparsity={sparsity!r} must be a fraction of zeros in [0, 1) (0.8: 80% zeros)")
    if criterion not in CRITERIA:
        bad(f"criterion={criterion!r} is unknown; choose from {list(CRITERIA)}")
    if scope not in ("layer", "global"):
        bad(f"scope={scope!r} is unknown; choose from ['layer', 'global']")
    if normalize not in NORMALIZERS:
        bad(f"normalize={normalize!r} is unknown; choose from {list(NORMALIZERS)}")
    if structure in ("unstructured", "channels"):
        return None
    m = re.fullmatch(r"(\d+):(\d+)", str(structure))
    if not m or not 0 < int(m[1]) < int(m[2]):
        bad(f"structure={structure!r} is unknown; choose 'unstructured', 'channels' or N:M "
            "with 0 < N < M, e.g. '2:4'")
    n, mm = int(m[1]), int(m[2])
    if sparsity is not None and abs(sparsity - (1 - n / mm)) > 1e-9:
        bad(f"structure='{structure}' keeps {n} of every {mm} weights (sparsity "
            f"{1 - n / mm:g}); sparsity={sparsity} contradicts it: leave sparsity out")
    if scope != "layer":
        bad(f"structure='{structure}' prunes within each group of {mm}; scope='{scope}' "
            "does not apply")
    return n, mm


def _channels(graph, sparsity, criterion, scope, include, exclude, calibration) -> Graph:
    try:  # another module (and engineer) owns structured pruning
        from graphc.passes.prune_structured import prune_channels
    except ImportError as e:
        raise PassError("pass 'prune': structure='channels' needs "
                        "graphc.passes.prune_structured, which this install lacks") from e
    given = {} if sparsity is None else {"sparsity": sparsity}  # else prune-channels' default
    return prune_channels(graph, criterion=criterion, scope=scope, include=include,
                          exclude=exclude, calibration=calibration, **given)


def _selected(pw: PrunableWeight, include, exclude) -> bool:
    names = [pw.name, *pw.nodes]

    def hit(patterns) -> bool:
        return any(fnmatch.fnmatchcase(n, p) for p in patterns for n in names)
    return not hit(exclude) and (not include or hit(include))


def _old_mask(graph: Graph, pw: PrunableWeight) -> torch.Tensor | None:
    return None if pw.mask is None else graph.gm.get_buffer(pw.mask)


# ---- report -------------------------------------------------------------------------------
def prune_report(before: Graph, after: Graph, pws: list[PrunableWeight], target: float,
                 criterion: str, scope: str, structure: str, normalize: str) -> dict:
    """JSON-safe: options, per layer params / nonzero before and after / sparsity, totals."""
    rows, after_pws = [], {pw.name: pw for pw in prunable_weights(after)}
    for pw in pws:
        nz0 = int(effective_weight(before, pw).count_nonzero())
        nz1 = int(effective_weight(after, after_pws[pw.name]).count_nonzero())
        numel = int(torch.Size(pw.shape).numel())
        rows.append({"layer": pw.node, "op": pw.op, "weight_name": pw.name, "params": numel,
                     "nonzero_before": nz0, "nonzero_after": nz1,
                     "sparsity": round(1 - nz1 / max(numel, 1), 6)})
    total = sum(r["params"] for r in rows)
    nz1 = sum(r["nonzero_after"] for r in rows)
    return {"structure": structure, "criterion": criterion, "scope": scope,
            "normalize": normalize if scope == "global" else None, "target": target,
            "layers": rows, "params": total,
            "nonzero_before": sum(r["nonzero_before"] for r in rows), "nonzero_after": nz1,
            "sparsity": round(1 - nz1 / max(total, 1), 6),
            "graph_params": before.stats()["params"] - _mask_params(before),
            "graph_nonzero_after": _graph_nonzero(after)}


def _mask_params(g: Graph) -> int:
    masks = g.meta.get("prune_masks", {})
    return sum(g.gm.get_buffer(m).numel() for m in masks.values())


def _graph_nonzero(g: Graph) -> int:
    """Nonzero entries of the model's weights (masks applied, mask buffers not counted)."""
    masks = g.meta.get("prune_masks", {})
    total = 0
    for name, t in g.weights().items():
        if name in masks.values():
            continue
        total += int((t * g.gm.get_buffer(masks[name]) if name in masks else t).count_nonzero())
    return total


def format_prune_report(meta: dict) -> str:
    """graph.meta["prune-unstructured"] as lines: one per layer, then the totals."""
    norm = f", normalize={meta['normalize']}" if meta["normalize"] else ""
    head = (f"prune ({meta['structure']}, {meta['criterion']}, scope={meta['scope']}{norm}, "
            f"target {meta['target']:.3f})")
    lines = [head]
    for r in meta["layers"]:
        lines.append(f"  {r['layer']} ({r['weight_name']}, {r['op']}): nonzero "
                     f"{r['nonzero_before']:,} -> {r['nonzero_after']:,} of {r['params']:,} "
                     f"(sparsity {r['sparsity']:.3f})")
    lines.append(f"  pruned layers: nonzero {meta['nonzero_before']:,} -> "
                 f"{meta['nonzero_after']:,} of {meta['params']:,} (sparsity "
                 f"{meta['sparsity']:.3f}); whole graph {meta['graph_nonzero_after']:,} "
                 f"nonzero of {meta['graph_params']:,} params")
    return "\n".join(lines)
