"""Iterative pruning: raise the sparsity step by step, and after each step either fine-tune
the surviving weights or rewind them to an early checkpoint and retrain (lottery tickets).

    r = graphc.prune_iteratively(g, batches, target_sparsity=0.8, steps=4, schedule="cubic",
                                 epochs=2, rewind="none", evaluate=lambda h: accuracy(h))
    r.graph              # pruned and trained (masks still in; fold-prune-masks before lowering)
    r.steps              # per step: sparsity (target and measured), train loss, evaluation

Each step prunes with the `prune` pass at the schedule's sparsity (masks only grow, so a
weight pruned once stays pruned), then trains: `train(graph) -> graph` if given, else
graphc.distill against the teacher (default: the graph as given) for `epochs` on `data`.
rewind: "none" (fine-tune from the current weights), "init" (the weights of the graph as
given) or a checkpoint (a Graph or a {parameter name: tensor} dict, e.g. weights saved early
in training, Frankle et al. 2020): the surviving weights, and every other parameter the
checkpoint has, are reset to it before training.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import NamedTuple

import torch

from graphc.distill import distill
from graphc.errors import PassError
from graphc.ir import Graph
from graphc.passes.prune import REPORT_KEY, prune
from graphc.passes.prune_criteria import (
    MASKS_META,
    effective_weight,
    prunable_weights,
    set_attr,
)
from graphc.passes.prune_schedule import sparsity_schedule


class Pruned(NamedTuple):
    graph: Graph       # the pruned, trained graph (masks in place)
    steps: list[dict]  # step 0 (as given), then one record per pruning step


def prune_iteratively(graph: Graph, data: Iterable, *, target_sparsity: float = 0.8,
                      steps: int = 4, schedule: str = "cubic", train: Callable | None = None,
                      epochs: int = 1, lr: float = 3e-4, rewind="none", teacher=None,
                      evaluate: Callable | None = None, distill_options: dict | None = None,
                      **prune_options) -> Pruned:
    """Prune `graph` to `target_sparsity` in `steps` (schedule: cubic, linear, geometric),
    training after each step; returns Pruned(graph, per-step records).

    data: items of inputs or (inputs, labels), for distillation and the taylor criterion.
    train: fn(graph) -> trained graph (default: graphc.distill(graph, teacher, data,
    epochs=epochs, lr=lr, **distill_options); epochs=0 skips training). rewind: "none",
    "init" or a checkpoint Graph / state dict. evaluate: fn(graph) -> number or dict,
    recorded per step. prune_options: the prune pass's (criterion, scope, include, ...).
    """
    items = list(data)
    ckpt = _checkpoint(graph, rewind)
    _check_options(prune_options, epochs, train)
    if prune_options.get("criterion") == "taylor":
        prune_options.setdefault("calibration", items)
    teacher = graph if teacher is None else teacher
    g = graph
    records = [_record(0, 0.0, g, None, evaluate)]
    for k, s in enumerate(sparsity_schedule(target_sparsity, steps, schedule,
                                            _masked(graph)), start=1):
        g = prune(g, sparsity=s, **prune_options)
        if ckpt is not None:
            g = rewind_to(g, ckpt)
        loss = None
        if train is not None:
            g = _checked(train(g), g)
        elif epochs:
            g = distill(g, teacher, items, epochs=epochs, lr=lr, progress=False,
                        **(distill_options or {})).student
            loss = g.meta["distill"]["epoch_losses"][-1]
        records.append(_record(k, s, g, loss, evaluate))
    return Pruned(g, records)


def _check_options(prune_options: dict, epochs, train) -> None:
    structure = prune_options.get("structure", "unstructured")
    if structure != "unstructured":
        raise PassError(f"prune_iteratively: structure={structure!r}; schedules apply to "
                        "unstructured sparsity (N:M has one sparsity: use graphc.passes.prune."
                        "prune then graphc.distill)")
    if "sparsity" in prune_options:
        raise PassError("prune_iteratively: give target_sparsity (the schedule sets each "
                        "step's sparsity), not sparsity")
    if train is None and (isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0):
        raise PassError(f"prune_iteratively: epochs={epochs!r} must be an int >= 0")


def _checkpoint(graph: Graph, rewind) -> dict[str, torch.Tensor] | None:
    if isinstance(rewind, str):
        if rewind not in ("none", "init"):
            raise PassError(f"prune_iteratively: rewind={rewind!r} is unknown; give 'none', "
                            "'init', or a checkpoint (a Graph or a state dict)")
        rewind = None if rewind == "none" else graph
    if rewind is None:
        return None
    state = dict(rewind.gm.named_parameters()) if isinstance(rewind, Graph) else dict(rewind)
    state = {k: v.detach().clone() for k, v in state.items()}
    for pw in prunable_weights(graph):
        if pw.name not in state:
            raise PassError(f"prune_iteratively: the rewind checkpoint has no '{pw.name}' "
                            f"(weight of %{pw.node}); it has {sorted(state)[:8]}")
        if tuple(state[pw.name].shape) != pw.shape:
            raise PassError(f"prune_iteratively: checkpoint '{pw.name}' is "
                            f"{list(state[pw.name].shape)}, the graph's is {list(pw.shape)}")
    return state


def rewind_to(g: Graph, state: dict[str, torch.Tensor]) -> Graph:
    """A copy of g whose parameters are the checkpoint's, masked where g is pruned."""
    out, masks = g.copy(), g.meta.get(MASKS_META, {})
    for name, p in g.gm.named_parameters():
        if name in state:
            value = state[name].to(p.dtype)
            if name in masks:
                value = value * g.gm.get_buffer(masks[name])
            set_attr(out.gm, name, torch.nn.Parameter(value.clone(), p.requires_grad))
    return out


def _checked(trained, before: Graph) -> Graph:
    if not isinstance(trained, Graph):
        raise PassError(f"prune_iteratively: train() returned {type(trained).__name__}; it "
                        "must return the trained graphc.Graph")
    if trained.meta.get(MASKS_META) != before.meta.get(MASKS_META):
        raise PassError("prune_iteratively: train() returned a graph without the prune "
                        "masks; train the graph it is given (graphc.qat.train, graphc.distill)")
    return trained


def _masked(g: Graph) -> float:
    """The fraction of all prunable weights' entries that masks hold at 0."""
    masks = g.meta.get(MASKS_META, {})
    pws = prunable_weights(g)
    total = sum(torch.Size(pw.shape).numel() for pw in pws)
    return sum(int((g.gm.get_buffer(masks[pw.name]) == 0).sum()) for pw in pws
               if pw.name in masks) / max(total, 1)


def _sparsity(g: Graph) -> float:
    """Zeros over all prunable weights' entries (masks applied)."""
    pws = prunable_weights(g)
    total = sum(torch.Size(pw.shape).numel() for pw in pws)
    zeros = sum(int((effective_weight(g, pw) == 0).sum()) for pw in pws)
    return zeros / max(total, 1)


def _record(step: int, target: float, g: Graph, loss, evaluate) -> dict:
    rec = {"step": step, "target": target, "sparsity": _sparsity(g), "train_loss": loss}
    if REPORT_KEY in g.meta and step:
        rec["layers"] = {r["weight_name"]: r["sparsity"] for r in g.meta[REPORT_KEY]["layers"]}
    if evaluate is not None:
        rec["eval"] = evaluate(g)
    return rec
