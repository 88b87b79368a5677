"""dedupe-weights: weights that are one tensor (tied) or equal in value -> one attribute.

    %emb_weight: f32[100, 32] = param emb_weight
    %head_weight: f32[100, 32] = param head_weight        (tied to emb_weight, or equal)
      ->  both reads are %emb_weight; head_weight is gone from the module

torch.export keeps a tied weight (a language model's embedding and output projection, one
nn.Parameter) under one name per module path, and a graph imported from ONNX, or built by
a pass that copied a tensor, can hold the same values twice. Stored once, the artifact
holds them once, and share-weights clusters them once. Equal but untied parameters become
tied: training the result trains one tensor (equal_values=False merges tied ones only).
"""

from __future__ import annotations

import torch

from graphc.ir import Graph, fetch_attr
from graphc.pass_manager import register_pass


def _same_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
            and a.storage_offset() == b.storage_offset() and a.stride() == b.stride())


def _groups(tensors: dict[str, torch.Tensor], equal_values: bool) -> dict[str, tuple[str, str]]:
    """Attribute -> (the attribute it merges into, "tied" or "equal")."""
    merged, kept = {}, []
    for name, t in tensors.items():
        for rep in kept:
            r = tensors[rep]
            if r.shape != t.shape or r.dtype != t.dtype:
                continue
            if _same_storage(r, t):
                merged[name] = (rep, "tied")
                break
            if equal_values and torch.equal(r, t):
                merged[name] = (rep, "equal")
                break
        else:
            kept.append(name)
    return merged


@register_pass("dedupe-weights")
def dedupe_weights(graph: Graph, *, equal_values: bool = True) -> Graph:
    """weights that are one tensor or equal tensors -> one attribute read by every user."""
    tensors = {}
    for n in graph.gm.graph.nodes:
        if n.op == "get_attr" and n.target not in tensors:
            value = graph.weight(n)
            if isinstance(value, torch.Tensor):
                tensors[n.target] = value.detach()
    merged = _groups(tensors, equal_values)
    if not merged:
        return graph
    g = graph.copy()
    for n in g.gm.graph.nodes:
        if n.op == "get_attr" and n.target in merged:
            n.target = merged[n.target][0]
    for name in merged:
        owner, _, attr = name.rpartition(".")
        delattr(fetch_attr(g.gm, owner) if owner else g.gm, attr)  # the copy's module only
    g.gm.recompile()
    saved = sum(tensors[k].numel() * tensors[k].element_size() for k in merged)
    g.meta["dedupe-weights"] = {"merged": [[k, rep, how] for k, (rep, how) in merged.items()],
                                "bytes_saved": saved}
    return g
