"""Structured pruning, the rewrite and its report: slice every member weight along its axis,
rewrite the shape constants (view / expand sizes, a depthwise conv's groups), re-propagate
shapes, and record per group the channels, params and FLOPs before and after.
"""

from __future__ import annotations

import math

import torch
from rich.table import Table

from graphc.ir import Graph, fetch_attr
from graphc.passes.prune_groups import Dependencies
from graphc.passes.quant_mixed import reference, relative_error
from graphc.report import render
from graphc.verify import propagate

aten = torch.ops.aten


def apply_pruning(graph: Graph, deps: Dependencies, keep: dict[int, list[int]]) -> Graph:
    """A copy of `graph` keeping, in each group of `keep`, the listed channels only."""
    kept = torch.tensor([gid not in keep or k in keep[gid] for gid, k in deps.owner] + [True])
    out = graph.copy()
    by_weight: dict[str, list] = {}
    for (w, axis), cls in deps.cls.items():
        by_weight.setdefault(w, []).append((axis, kept[cls]))  # cls -1 -> the last True
    for w, cuts in by_weight.items():
        t = fetch_attr(out.gm, w)
        new = t.detach()
        for axis, mask in cuts:
            new = new.index_select(axis, mask.nonzero().flatten())
        _set_attr(out.gm, w, t, new.contiguous())
    nodes = {n.name: n for n in out.gm.graph.nodes}
    for (name, arg, pos), cls in deps.consts.items():
        n, count = nodes[name], int(kept[cls].sum())
        args = list(n.args)
        if pos is None:
            args[arg] = count
        else:
            sizes = list(args[arg])
            sizes[pos] = count
            args[arg] = sizes
        n.args = tuple(args)
    out.gm.recompile()
    return propagate(out)


def _set_attr(gm: torch.nn.Module, target: str, old: torch.Tensor, value: torch.Tensor):
    *path, leaf = target.split(".")
    mod = gm
    for part in path:
        mod = getattr(mod, part)
    delattr(mod, leaf)
    if isinstance(old, torch.nn.Parameter):
        mod.register_parameter(leaf, torch.nn.Parameter(value, old.requires_grad))
    else:
        mod.register_buffer(leaf, value)


# ---- cost ---------------------------------------------------------------------------------
def _shape(n) -> tuple[int, ...]:
    return tuple(int(s) for s in n.meta["val"].shape)


def _contracted(n) -> int:
    """Multiply-adds per output element of a layer node (0 for other ops)."""
    if n.target is aten.convolution.default:
        return math.prod(_shape(n.args[1])[1:])
    if n.target in (aten.addmm.default, aten.mm.default, aten.bmm.default):
        return _shape(n.args[-2 if n.target is not aten.mm.default else 0])[-1]
    if n.target is aten.linear.default:
        return _shape(n.args[0])[-1]
    return 0


def node_flops(g: Graph) -> dict[str, int]:
    """2 x multiply-adds of every conv / linear / batched product node, by name."""
    return {n.name: 2 * math.prod(_shape(n)) * _contracted(n) for n in g.gm.graph.nodes
            if n.op == "call_function" and _contracted(n)}


def prune_report(before: Graph, after: Graph, deps: Dependencies, keep: dict,
                 skipped: list[dict], options: dict, batches: list[tuple]) -> dict:
    f0, f1 = node_flops(before), node_flops(after)
    rows = []
    for grp in deps.groups:
        if grp.id not in keep:
            continue
        weights = sorted({m.weight for m in grp.members})
        sites = sorted({s for m in grp.members if m.kind == "weight" for s in m.sites})
        rows.append({
            "group": grp.id, "layers": grp.spaces, "unit": grp.unit,
            "members": [f"{m.weight}[{m.axis}]" for m in grp.members],
            "channels_before": grp.size, "channels_after": len(keep[grp.id]),
            "params_before": sum(fetch_attr(before.gm, w).numel() for w in weights),
            "params_after": sum(fetch_attr(after.gm, w).numel() for w in weights),
            "flops_before": sum(f0.get(s, 0) for s in sites),
            "flops_after": sum(f1.get(s, 0) for s in sites)})
    ev = batches[:8]
    return {"structure": "channels", "options": options, "groups": rows, "skipped": skipped,
            "graph_params": [before.stats()["params"], after.stats()["params"]],
            "graph_flops": [sum(f0.values()), sum(f1.values())],
            "output_error": relative_error(after, ev, reference(before, ev)),
            "eval_batches": len(ev)}


def format_prune_report(meta: dict) -> str:
    """graph.meta["prune"] of prune-channels as a table, then the skipped groups."""
    t = Table()
    for col in ("group", "layers", "channels", "params", "FLOPs"):
        t.add_column(col, justify="left" if col in ("group", "layers") else "right")
    for r in meta["groups"]:
        unit = f" heads of {r['unit']}" if r["unit"] > 1 else ""
        t.add_row(str(r["group"]), ", ".join(r["layers"]),
                  f"{r['channels_before']} -> {r['channels_after']}{unit}",
                  _ratio(r["params_before"], r["params_after"]),
                  _ratio(r["flops_before"], r["flops_after"]))
    opts = ", ".join(f"{k}={v}" for k, v in meta["options"].items())
    lines = [f"prune-channels ({opts})", render(t)]
    lines += [f"skipped group {s['group']} ({', '.join(s['layers'])}): {s['skipped']}"
              for s in meta["skipped"]]
    (p0, p1), (f0, f1) = meta["graph_params"], meta["graph_flops"]
    lines.append(f"graph params {_ratio(p0, p1)}, FLOPs {_ratio(f0, f1)}; output error "
                 f"{meta['output_error']:.2e} on {meta['eval_batches']} batch(es)")
    return "\n".join(lines)


def _ratio(a: int, b: int) -> str:
    return f"{a:,} -> {b:,} ({b / max(a, 1):.2f}x)"
