"""Local rewrites as data: a Rule is a pattern, a check that fails with a reason, a rewrite.

    rule = Rule("conv-bn", match=match_conv_bn, check=check_conv_bn, rewrite=fold_conv_bn)
    g2, misses = apply_rules(g, [rule])

`match(graph, node)` returns a dict of named nodes (or None); `check(graph, m)` returns
None when the rewrite is safe or a sentence saying why not; `rewrite(graph, m)` edits the
(already copied) graph. Misses are kept so `explain` can say why a rule did not fire.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import fx

from graphc.ir import Graph

Match = dict


@dataclass(frozen=True)
class Rule:
    name: str
    match: Callable[[Graph, fx.Node], Match | None]
    check: Callable[[Graph, Match], str | None]
    rewrite: Callable[[Graph, Match], None]


@dataclass(frozen=True)
class Miss:
    """A place where a rule's pattern matched but its check refused, and why."""

    rule: str
    node: str
    reason: str

    def __str__(self) -> str:
        return f"{self.rule} at %{self.node}: {self.reason}"


def apply_rules(g: Graph, rules: list[Rule], max_iters: int | None = None
                ) -> tuple[Graph, list[Miss]]:
    """Apply rules greedily to a fixed point on a copy of g; g itself is left unchanged.

    Each iteration makes one rewrite, so max_iters bounds the rewrites (default: one per node
    of g, enough for rules that remove what they match; a fixed 10 left 42 of MobileNetV2's 52
    batchnorms unfolded). Returns (g, misses) unchanged when no rule fired, so callers can
    tell "changed" cheaply.
    """
    out, misses = None, []
    if max_iters is None:
        max_iters = len(g.gm.graph.nodes) + 1
    for _ in range(max_iters):
        fired, misses = False, []
        for node in list((out or g).gm.graph.nodes):
            for rule in rules:
                m = rule.match(out or g, node)
                if m is None:
                    continue
                reason = rule.check(out or g, m)
                if reason:
                    misses.append(Miss(rule.name, node.name, reason))
                    continue
                if out is None:  # copy lazily, then re-find the matched nodes in the copy
                    out = g.copy()
                    m = _remap(out, m)
                rule.rewrite(out, m)
                fired = True
                break
            if fired:
                break  # the graph changed under the node list: walk it again
        if not fired:
            break
    if out is None:
        return g, misses
    out.gm.graph.eliminate_dead_code()
    out.gm.recompile()
    return out, misses


def _remap(g: Graph, m: Match) -> Match:
    by_name = {n.name: n for n in g.gm.graph.nodes}
    return {k: by_name[v.name] if isinstance(v, fx.Node) else v for k, v in m.items()}


def add_weight(g: Graph, base: str, value: torch.Tensor, trainable: bool = True) -> str:
    """Register `value` on g's module under a fresh name derived from `base`; return it."""
    name = re.sub(r"\W", "_", base)
    stem, i = name, 1
    while hasattr(g.gm, name):
        name, i = f"{stem}_{i}", i + 1
    if trainable and value.is_floating_point():
        g.gm.register_parameter(name, torch.nn.Parameter(value.detach(), requires_grad=True))
    else:
        g.gm.register_buffer(name, value.detach())
    return name


def is_weight(node) -> bool:
    return isinstance(node, fx.Node) and node.op == "get_attr"


def is_constant(node) -> bool:
    """True when node's value depends on weights and literals only, not on a user input."""
    stack, seen = [node], set()
    while stack:
        n = stack.pop()
        if not isinstance(n, fx.Node) or n in seen:
            continue
        if n.op == "placeholder" or (n.op == "call_function" and n.is_impure()):
            return False
        seen.add(n)
        stack.extend(n.all_input_nodes)
    return True


def const_value(g: Graph, node: fx.Node) -> torch.Tensor:
    """Evaluate a constant operand (a weight, possibly permuted or reshaped)."""
    if node.op == "get_attr":
        return g.weight(node)
    args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda n: const_value(g, n))
    with torch.no_grad():
        return node.target(*args, **kwargs)


def only_user(node: fx.Node) -> fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 else None
