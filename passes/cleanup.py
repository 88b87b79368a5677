"""Exact cleanup passes: dead-code elimination and constant folding.

    dead-code-elimination:  %unused = aten.mul(%x, 2) ...   ->  (removed)
    constant-folding:       %t = aten.permute(%w, [1, 0])   ->  %t = param t (precomputed)
"""

from __future__ import annotations

import torch
import torch.fx as fx

from graphc.ir import Graph, fetch_attr
from graphc.pass_manager import register_pass
from graphc.rewrite import add_weight


@register_pass("dead-code-elimination")
def dead_code_elimination(graph: Graph) -> Graph:
    """Nodes whose results nobody uses -> removed (side-effecting ops are kept)."""
    g = graph.copy()
    if not g.gm.graph.eliminate_dead_code():
        return graph
    g.gm.recompile()
    return g


@register_pass("constant-folding")
def constant_folding(graph: Graph, *, max_growth_bytes: int = 4096) -> Graph:
    """Ops whose inputs are all weights or literals -> one precomputed weight.

    A fold that would make the stored weights grow by more than `max_growth_bytes` (an
    expand or a full() of a big shape) is skipped: it would make the artifact bigger.
    """
    g, folded = graph.copy(), 0
    for node in list(g.gm.graph.nodes):
        if not _foldable(g, node):
            continue
        args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda n: fetch_attr(g.gm, n.target))
        with torch.no_grad():
            value = node.target(*args, **kwargs)
        if not isinstance(value, torch.Tensor) or _growth(g, node, value) > max_growth_bytes:
            continue
        with g.gm.graph.inserting_before(node):
            const = g.gm.graph.get_attr(add_weight(g, node.name, value.contiguous(), False))
        const.meta = dict(node.meta)
        node.replace_all_uses_with(const)
        g.gm.graph.erase_node(node)
        folded += 1
    if not folded:
        return graph
    g.gm.graph.eliminate_dead_code()
    g.gm.recompile()
    return g


def _foldable(g: Graph, node: fx.Node) -> bool:
    if node.op != "call_function" or node.is_impure():
        return False
    if isinstance(node.target, torch._ops.OpOverload) and (
            torch.Tag.nondeterministic_seeded in node.target.tags):
        return False  # random ops must stay random
    return all(n.op == "get_attr" for n in node.all_input_nodes)


def _growth(g: Graph, node: fx.Node, value: torch.Tensor) -> int:
    consumed = sum(fetch_attr(g.gm, n.target).nbytes for n in node.all_input_nodes
                   if len(n.users) == 1)  # an input used elsewhere stays stored anyway
    return value.nbytes - consumed
