"""Exact cleanup passes: dead-code elimination and constant folding.

    dead-code-elimination:  %unused = aten.mul(%x, 2) ...   ->  (removed)
    common-subexpression-elimination:  %a = view(%x, s); %b = view(%x, s)  ->  %b uses %a
    constant-folding:       %t = aten.permute(%w, [1, 0])   ->  %t = param t (precomputed)
"""

from __future__ import annotations

import torch
from torch import fx

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
    g, new, env, folded = graph.copy(), fx.Graph(), {}, 0
    for node in graph.gm.graph.nodes:  # rebuild, so folded nodes keep their names
        value = _fold(g, node, env, max_growth_bytes)
        if value is None:
            env[node] = new.node_copy(node, lambda n: env[n])
            continue
        attr = add_weight(g, node.name, value.contiguous(), trainable=False)
        env[node] = new.create_node("get_attr", attr, name=node.name)
        env[node].meta = dict(node.meta)
        folded += 1
    if not folded:
        return graph
    new.eliminate_dead_code()
    return g.with_graph(new)


def _fold(g: Graph, node: fx.Node, env: dict, max_growth: int) -> torch.Tensor | None:
    """The node's value if every input is a weight in the new graph and folding pays."""
    if not _foldable(node) or not all(env[n].op == "get_attr" for n in node.all_input_nodes):
        return None
    args, kwargs = fx.node.map_arg((node.args, node.kwargs),
                                   lambda n: fetch_attr(g.gm, env[n].target))
    with torch.no_grad():
        value = node.target(*args, **kwargs)
    if not isinstance(value, torch.Tensor):
        return None
    consumed = sum(fetch_attr(g.gm, env[n].target).nbytes for n in node.all_input_nodes
                   if len(n.users) == 1)  # an input used elsewhere stays stored anyway
    return value if value.nbytes - consumed <= max_growth else None


def _foldable(node: fx.Node) -> bool:
    if node.op != "call_function" or node.is_impure():
        return False
    # random ops must stay random
    return not (isinstance(node.target, torch._ops.OpOverload)
                and torch.Tag.nondeterministic_seeded in node.target.tags)


@register_pass("common-subexpression-elimination")
def common_subexpression_elimination(graph: Graph) -> Graph:
    """Repeated pure ops on the same inputs -> the first one, reused.

    Exporters repeat cheap ops per consumer: HF BERT views the hidden states once for each
    of q, k and v. Merged, the three projections share one input node, so `quantize`
    quantizes it once instead of three times.
    """
    g, seen, merged = graph.copy(), {}, 0
    for node in list(g.gm.graph.nodes):
        if node.op not in ("call_function", "get_attr") or (
                node.op == "call_function" and not _foldable(node)):
            continue
        key = (node.op, node.target, _hashable(node.args), _hashable(node.kwargs))
        if key not in seen:
            seen[key] = node
            continue
        node.replace_all_uses_with(seen[key])
        g.gm.graph.erase_node(node)
        merged += 1
    if not merged:
        return graph
    g.gm.recompile()
    return g


def _hashable(value):
    """args / kwargs as a hashable key; fx nodes by identity."""
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, *(_hashable(v) for v in value))
    if isinstance(value, dict):
        return tuple(sorted((k, _hashable(v)) for k, v in value.items()))
    if isinstance(value, (torch.dtype, torch.device, torch.memory_format, torch.layout)):
        return str(value)
    return value
