"""Pruning masks: chosen from scores (per layer, global, N:M), kept in the graph as
`aten.mul(weight, mask)` with the mask a buffer, and folded into the weight at the end.

    %fc1_weight = param fc1_weight                     %fc1_weight = param fc1_weight
    %permute = aten.permute(%fc1_weight, [1, 0])  ->   %fc1_weight_mask = buffer fc1_weight_mask
                                                       %fc1_weight_masked = aten.mul(%fc1_weight,
                                                                                     %fc1_weight_mask)
                                                       %permute = aten.permute(%fc1_weight_masked, ...)

Training (graphc.distill, graphc.qat.train) updates parameters only, and the gradient of a
masked entry is 0, so pruned entries stay exactly 0 however long one fine-tunes. Masks only
grow: an entry pruned once scores below every live entry when pruning again.
`fold-prune-masks` replaces weight * mask by one weight with exact zeros (for lowering).
"""

from __future__ import annotations

import torch

from graphc.errors import PassError
from graphc.ir import Graph, fetch_attr
from graphc.pass_manager import register_pass
from graphc.passes.prune_criteria import MASKS_META, PrunableWeight, is_mask_mul, set_attr
from graphc.rewrite import add_weight
from graphc.verify import propagate

aten = torch.ops.aten
DEAD = -1.0  # the score of an entry pruned before: below every real score (all are >= 0)


def _with_dead(score: torch.Tensor, old: torch.Tensor | None) -> torch.Tensor:
    return score if old is None else torch.where(old == 0, DEAD, score)


def _keep_all_but(flat: torch.Tensor, k: int) -> torch.Tensor:
    """A 0/1 mask of flat's shape with exactly the k lowest entries 0 (ties: first wins)."""
    mask = torch.ones_like(flat)
    if k > 0:
        mask[torch.argsort(flat, stable=True)[:k]] = 0
    return mask


def layer_masks(scores: dict, old: dict, sparsity: float) -> dict[str, torch.Tensor]:
    """Each weight at exactly round(sparsity * numel) zeros (more if its old mask had more)."""
    out = {}
    for name, s in scores.items():
        s = _with_dead(s, old.get(name))
        k = max(round(sparsity * s.numel()), int((s == DEAD).sum()))
        out[name] = _keep_all_but(s.flatten(), k).reshape(s.shape)
    return out


def _lamp(s: torch.Tensor) -> torch.Tensor:
    """LAMP (Lee et al. 2021): s_u / sum of the scores >= s_u; every layer's largest is 1,
    so a global threshold can never empty a layer."""
    flat = s.flatten()
    order = torch.argsort(flat, stable=True)
    tail = flat[order].flip(0).cumsum(0).flip(0)  # sum of this and every larger score
    out = torch.empty_like(flat)
    out[order] = flat[order] / tail.clamp_min(torch.finfo(flat.dtype).tiny)
    return out.reshape(s.shape)


NORMALIZERS = {
    "none": lambda s: s,
    "mean": lambda s: s / s[s > 0].mean() if (s > 0).any() else s,
    "lamp": _lamp,
}


def global_masks(scores: dict, old: dict, sparsity: float, normalize: str) -> dict:
    """One threshold over every weight's normalized scores; exactly round(sparsity * total)
    zeros in all (more if the old masks had more)."""
    names = list(scores)
    normed = []
    for n in names:
        live = scores[n] if old.get(n) is None else scores[n] * old[n]
        normed.append(_with_dead(NORMALIZERS[normalize](live.double()), old.get(n)).flatten())
    flat = torch.cat(normed)
    k = max(round(sparsity * flat.numel()), int((flat == DEAD).sum()))
    mask, out, at = _keep_all_but(flat, k), {}, 0
    for n in names:
        size = scores[n].numel()
        out[n] = mask[at:at + size].reshape(scores[n].shape).to(scores[n].dtype)
        at += size
    return out


def nm_masks(scores: dict, old: dict, weights: dict[str, PrunableWeight], n: int, m: int
             ) -> dict[str, torch.Tensor]:
    """In every group of m consecutive weights along the reduction (input) axis, the n most
    important kept. A conv's groups run along its input channels at each (kh, kw)."""
    out = {}
    for name, s in scores.items():
        pw = weights[name]
        dim = pw.reduction_dim
        if dim is None or s.shape[dim] % m:
            why = ("its input axis cannot be traced through the ops before it" if dim is None
                   else f"its reduction axis (dim {dim} of {list(s.shape)}) has {s.shape[dim]} "
                        f"entries, not a multiple of {m}")
            raise PassError(f"pass 'prune': structure='{n}:{m}' cannot prune weight "
                            f"'{name}' of %{pw.node} ({pw.op}): {why}; leave it out with "
                            f"exclude=['{pw.node}']")
        last = _with_dead(s, old.get(name)).movedim(dim, -1)
        groups = last.reshape(-1, m)
        drop = torch.argsort(groups, dim=1, stable=True)[:, :m - n]
        mask = torch.ones_like(groups).scatter_(1, drop, 0)
        out[name] = mask.reshape(last.shape).movedim(-1, dim).contiguous()
    return out


# ---- the graph -----------------------------------------------------------------------------
def apply_masks(g: Graph, masks: dict[str, torch.Tensor], weights: dict[str, PrunableWeight]
                ) -> None:
    """On the copy g: zero the pruned entries of each weight (a new tensor: the input graph
    keeps its own) and make the graph multiply it by its mask buffer."""
    names = dict(g.meta.get(MASKS_META, {}))  # a new dict: meta is copied shallowly
    graph = g.gm.graph
    for name, mask in masks.items():
        w = fetch_attr(g.gm, name)
        mask = mask.to(w.dtype)
        set_attr(g.gm, name, torch.nn.Parameter((w.detach() * mask).contiguous(),
                                                 requires_grad=w.requires_grad))
        if weights[name].mask:  # pruned before: the multiply is there, renew its mask
            set_attr(g.gm, weights[name].mask, mask)
            continue
        names[name] = add_weight(g, f"{name}_mask", mask, trainable=False)
        for node in [n for n in graph.nodes if n.op == "get_attr" and n.target == name]:
            with graph.inserting_after(node):
                m = graph.get_attr(names[name])
            with graph.inserting_after(m):
                mul = graph.create_node("call_function", aten.mul.Tensor, (node, m),
                                        name=f"{node.name}_masked")
            node.replace_all_uses_with(mul, delete_user_cb=lambda u, mul=mul: u is not mul)
    g.meta[MASKS_META] = names
    g.gm.recompile()
    propagate(g)


@register_pass("fold-prune-masks")
def fold_prune_masks(graph: Graph) -> Graph:
    """aten.mul(weight, mask) -> one weight with exact zeros (run before lowering)."""
    masks = graph.meta.get(MASKS_META)
    if not masks:
        return graph
    g = graph.copy()
    graph_ = g.gm.graph
    for node in list(graph_.nodes):
        if not (node.op == "call_function" and node.target is aten.mul.Tensor
                and is_mask_mul(node, masks)):
            continue
        w_node, m_node = node.args
        w = fetch_attr(g.gm, w_node.target)
        folded = (w.detach() * fetch_attr(g.gm, m_node.target)).contiguous()
        set_attr(g.gm, str(w_node.target), torch.nn.Parameter(folded, w.requires_grad))
        node.replace_all_uses_with(w_node)
        graph_.erase_node(node)
    graph_.eliminate_dead_code()
    for mask in masks.values():
        if not any(n.op == "get_attr" and n.target == mask for n in graph_.nodes):
            delattr(g.gm, mask)
    g.meta = {k: v for k, v in g.meta.items() if k != MASKS_META}
    g.gm.recompile()
    return g

