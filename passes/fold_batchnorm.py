"""fold-batchnorm: conv/linear followed by inference batchnorm -> one conv/linear.

    %c = aten.convolution(%x, %w, %b, ...); %bn = _native_batch_norm_legit_no_training(%c, ...)
    %y = getitem(%bn, 0)                     ->  %y = aten.convolution(%x, %w', %b', ...)

with s = gamma / sqrt(var + eps), w' = w * s (per output channel), b' = (b - mean) * s + beta.
Handles convolution (any groups, 1-3 spatial dims, not transposed), addmm (linear with
bias) and mm (linear without bias) followed by BatchNorm1d. Refuses, with a reason, when
the producer has other users or the batchnorm parameters are not constant weights.
"""

from __future__ import annotations

import logging
import operator

import torch
from torch import fx

from graphc.ir import Graph
from graphc.pass_manager import register_pass
from graphc.rewrite import Rule, add_weight, apply_rules, is_weight, only_user

aten = torch.ops.aten
log = logging.getLogger("graphc")
BN = aten._native_batch_norm_legit_no_training.default


def _match(g: Graph, node: fx.Node):
    """getitem(batchnorm(producer, ...), 0) where producer is a conv or linear."""
    if node.op != "call_function" or node.target is not BN:
        return None
    producer = node.args[0]
    if not isinstance(producer, fx.Node) or producer.target not in _PRODUCERS:
        return None
    outs = [u for u in node.users if u.target is operator.getitem and u.args[1] == 0]
    return {"bn": node, "producer": producer, "out": outs[0] if outs else None}


def _check(g: Graph, m) -> str | None:
    bn, producer = m["bn"], m["producer"]
    if m["out"] is None or len(bn.users) != 1:
        return "batchnorm's mean/var outputs are used; only its normalized output may be"
    if only_user(producer) is not bn:
        return f"%{producer.name} has other users, folding would change them"
    for name, arg in zip(("weight", "bias", "running_mean", "running_var"), bn.args[1:5]):
        if arg is not None and not is_weight(arg):
            return f"batchnorm {name} (%{arg}) is computed, not a constant weight"
    return _PRODUCERS[producer.target].check(producer)


def _rewrite(g: Graph, m) -> None:
    bn, producer, out = m["bn"], m["producer"], m["out"]
    gamma, beta, mean, var = (g.weight(a) if a is not None else None for a in bn.args[1:5])
    eps = bn.args[6]
    scale = (gamma if gamma is not None else torch.ones_like(var)) / torch.sqrt(var + eps)
    shift = beta if beta is not None else torch.zeros_like(mean)
    _PRODUCERS[producer.target].fold(g, producer, scale.detach(), shift.detach(), mean.detach())
    out.replace_all_uses_with(producer)
    g.gm.graph.erase_node(out)
    g.gm.graph.erase_node(bn)


class _Conv:
    """aten.convolution(x, w, b, stride, padding, dilation, transposed, out_pad, groups)."""

    @staticmethod
    def check(node: fx.Node) -> str | None:
        if node.args[6]:
            return "transposed convolution is not folded (output channels are dim 1)"
        w, b = node.args[1], node.args[2]
        if not is_weight(w) or (b is not None and not is_weight(b)):
            return "convolution weight/bias is computed, not a constant weight"
        return None

    @staticmethod
    def fold(g: Graph, node: fx.Node, scale, shift, mean) -> None:
        w = g.weight(node.args[1])
        b = g.weight(node.args[2]) if node.args[2] is not None else torch.zeros_like(mean)
        new_w = w.detach() * scale.reshape(-1, *([1] * (w.dim() - 1)))
        new_b = (b.detach() - mean) * scale + shift
        _set_weights(g, node, 1, new_w, 2, new_b)


class _Linear:
    """addmm(b, x, permute(w, [1, 0])) or mm(x, permute(w, [1, 0])): linear in core ATen."""

    @staticmethod
    def check(node: fx.Node) -> str | None:
        wt = node.args[-1]
        if not (isinstance(wt, fx.Node) and wt.target is aten.permute.default
                and is_weight(wt.args[0]) and only_user(wt) is node):
            return "linear weight is not permute(constant) used only here"
        if node.target is aten.addmm.default and not is_weight(node.args[0]):
            return "linear bias is computed, not a constant weight"
        return None

    @staticmethod
    def fold(g: Graph, node: fx.Node, scale, shift, mean) -> None:
        wt = node.args[-1]
        w = g.weight(wt.args[0])  # [out, in]
        has_bias = node.target is aten.addmm.default
        b = g.weight(node.args[0]) if has_bias else torch.zeros_like(mean)
        new_w = w.detach() * scale[:, None]
        new_b = (b.detach() - mean) * scale + shift
        if not has_bias:  # mm(x, wT) -> addmm(b', x, wT)
            node.target, node.args = aten.addmm.default, (None, *node.args)
        _set_weights(g, wt, 0, new_w, None, None)
        _set_weights(g, node, None, None, 0, new_b)


def _set_weights(g: Graph, node: fx.Node, wi, w, bi, b) -> None:
    """Point node.args[wi] / node.args[bi] at fresh weights holding w / b."""
    args = list(node.args)
    for i, value, suffix in ((wi, w, "weight"), (bi, b, "bias")):
        if i is None:
            continue
        with g.gm.graph.inserting_before(node):
            args[i] = g.gm.graph.get_attr(add_weight(g, f"{node.name}_folded_{suffix}", value))
    node.args = tuple(args)


_PRODUCERS = {aten.convolution.default: _Conv, aten.addmm.default: _Linear,
              aten.mm.default: _Linear}

fold_batchnorm_rules = [Rule("conv-bn", _match, _check, _rewrite)]


@register_pass("fold-batchnorm")
def fold_batchnorm(graph: Graph) -> Graph:
    """conv/linear -> inference batchnorm  =>  one conv/linear with rescaled weights."""
    g, misses = apply_rules(graph, fold_batchnorm_rules)
    for miss in misses:  # why a pattern was left alone: `graphc explain` shows these too
        log.info("fold-batchnorm: %s", miss)
    return g
