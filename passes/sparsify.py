"""sparsify: linear/conv weights with exact zeros -> a sparse kernel, or compressed storage.

    %permute = aten.permute(%fc1_weight, [1, 0])          fc1_weight: f32[64, 512], 90% zeros
    %addmm = aten.addmm(%fc1_bias, %x, %permute)
      ->  (kernel)   %addmm = graphc.bsr_linear(%x, %fc1_weight_data, %fc1_weight_indices,
                                                %fc1_weight_indptr, [64, 512], %fc1_bias)
          (storage)  %fc1_weight_t = graphc.sparse_decode(%fc1_weight_values,
                                                          %fc1_weight_mask, [512, 64])
                     %addmm = aten.addmm(%fc1_bias, %x, %fc1_weight_t)

The zeros come from pruning (passes/prune*.py fold their masks into the weights). A layer
whose weight has at least `min_sparsity` zeros gets one of two forms (graphc/ops_sparse.py):

    kernel    BSR with `block` = (R, C) blocks (C = 1 = CSR-like); the TVM kernel multiplies
              only the stored blocks (backends/tvm/lower_sparse.py). Linears in nn.Linear's
              [out, in] layout only.
    storage   the weight as a bitmask + its non-zero values, decoded to the dense weight once
              at the first call; the dense kernel runs. A weight read through permute(W) is
              stored transposed, so the matmul reads the decoded weight directly (no per-call
              transpose). Every layer class, convs included.

mode=auto times both (and the dense layer) on `target` and keeps the kernel only when it is
faster (passes/sparse_lowering.py); kernel / storage force a form (convs always store).
graph.meta["sparsify"]["layers"] has, per layer: sparsity, form, measured ms, bytes before
and after, and the verdict: "faster" or "smaller, not faster".
"""

from __future__ import annotations

import fnmatch
import logging
from dataclasses import dataclass
from typing import Literal

import torch
from torch import fx

from graphc.errors import PassError
from graphc.ir import Graph, fetch_attr, op_name
from graphc.ops_sparse import bsr_bytes, masked_bytes, to_bsr, to_masked
from graphc.pass_manager import register_pass
from graphc.passes.cleanup import dead_code_elimination
from graphc.passes.sparse_lowering import KERNEL_MARGIN, choose, time_layer
from graphc.rewrite import add_weight
from graphc.verify import propagate

aten, Q = torch.ops.aten, torch.ops.graphc
log = logging.getLogger("graphc")
PASS = "pass 'sparsify'"


@dataclass(frozen=True)
class OpInfo:
    kind: str                # "linear" or "conv"
    x_arg: int
    w_arg: int
    bias_arg: int | None
    transposed: bool         # the op reads permute(W, [1, 0]) of an [out, in] weight


LAYER_OPS = {
    aten.addmm.default: OpInfo("linear", 1, 2, 0, True),    # addmm(b, x, permute(W))
    aten.mm.default: OpInfo("linear", 0, 1, None, True),    # mm(x, permute(W))
    aten.linear.default: OpInfo("linear", 0, 1, 2, False),  # linear(x, W, b)
    aten.convolution.default: OpInfo("conv", 0, 1, 2, False),
}


@dataclass
class Layer:
    node: fx.Node
    info: OpInfo
    weight: str              # the attribute holding W ([out, in] for linears)
    w: torch.Tensor
    sparsity: float

    @property
    def kernel_reason(self) -> str | None:
        """None when the BSR kernel can replace the layer, else why not."""
        if self.info.kind != "linear":
            return "no sparse kernel for convolutions (stored compressed)"
        if self.node.target is aten.addmm.default and self.node.kwargs:
            return "addmm with beta/alpha"
        x = self.node.args[self.info.x_arg].meta.get("val")
        if x is None or x.dtype != torch.float32:
            return "the input is not float32"
        return None


@register_pass("sparsify")
def sparsify(graph: Graph, *, min_sparsity: float = 0.5, block: tuple[int, ...] = (1, 1),
             mode: Literal["auto", "kernel", "storage"] = "auto",
             ops: tuple[str, ...] = ("linear", "conv"), include: tuple[str, ...] = (),
             exclude: tuple[str, ...] = (), target: str = "cpu") -> Graph:
    """weights with exact zeros -> BSR sparse kernels where faster, else bitmask storage.

    min_sparsity: fraction of zeros (0, 1] a weight needs. block: BSR block (R, C), e.g.
    (1, 1) CSR-like, (4, 1), (8, 1); must divide the weight of every layer that may get
    the kernel. mode: auto (time dense, kernel and storage on `target`; the kernel only
    where faster), kernel, storage. ops / include / exclude: layer classes and fnmatch
    patterns on node or weight names.
    """
    block = _check(min_sparsity, block, ops)
    layers, skipped = _find(graph, tuple(ops), tuple(include), tuple(exclude), min_sparsity)
    if not layers:
        log.info("sparsify: no layer of '%s' has %.0f%% zeros", graph.name, 100 * min_sparsity)
        return graph
    g = graph.copy()
    rows = [_decide(lay, mode, block, target) for lay in layers]
    nodes = {n.name: n for n in g.gm.graph.nodes}
    for lay, row in zip(layers, rows):
        if row["form"] == "kernel":
            _kernel(g, nodes[lay.node.name], lay, block, row)
    for weight in dict.fromkeys(lay.weight for lay in layers):
        _store_remaining(g, weight)
    g.gm.recompile()
    out = propagate(dead_code_elimination(g))
    out.meta["sparsify"] = _summary(rows, skipped, mode, block, min_sparsity)
    for r in rows:
        log.info("sparsify: %%%s %.0f%% zeros -> %s (%s)%s", r["layer"], 100 * r["sparsity"],
                 r["form"], r["verdict"], f"; {r['note']}" if "note" in r else "")
    return out


def _check(min_sparsity, block, ops) -> tuple[int, int]:
    if isinstance(min_sparsity, bool) or not isinstance(min_sparsity, (int, float)) \
            or not 0 < min_sparsity <= 1:
        raise PassError(f"{PASS}: min_sparsity={min_sparsity!r} must be in (0, 1] (the "
                        "fraction of a weight's entries that are exactly zero)")
    if len(block) != 2 or any(isinstance(b, bool) or not isinstance(b, int) or b < 1
                              for b in block):
        raise PassError(f"{PASS}: block={block!r} must be two ints >= 1 (rows, cols), e.g. "
                        "(1, 1) or (8, 1)")
    unknown = [k for k in ops if k not in ("linear", "conv")]
    if unknown:
        raise PassError(f"{PASS}: ops={list(ops)} names unknown classes {unknown}; choose "
                        "from ['linear', 'conv']")
    return int(block[0]), int(block[1])


def _weight_attr(node: fx.Node, info: OpInfo) -> str | None:
    """The attribute of W ([out, in] for linears, as stored), or None when not a plain read."""
    w = node.args[info.w_arg]
    if info.transposed:
        if not (isinstance(w, fx.Node) and w.target is aten.permute.default
                and list(w.args[1]) == [1, 0]):
            return None
        w = w.args[0]
    return str(w.target) if isinstance(w, fx.Node) and w.op == "get_attr" else None


def _find(g: Graph, ops, include, exclude, min_sparsity) -> tuple[list[Layer], list[dict]]:
    layers, skipped = [], []
    for n in g.gm.graph.nodes:
        info = LAYER_OPS.get(n.target) if n.op == "call_function" else None
        weight = _weight_attr(n, info) if info is not None else None
        if weight is None or info.kind not in ops:
            continue
        if any(fnmatch.fnmatchcase(n.name, p) or fnmatch.fnmatchcase(weight, p)
               for p in exclude) or (include and not any(
                   fnmatch.fnmatchcase(n.name, p) or fnmatch.fnmatchcase(weight, p)
                   for p in include)):
            continue
        w = fetch_attr(g.gm, weight).detach()
        sparsity = float((w == 0).sum()) / max(w.numel(), 1)
        if sparsity < min_sparsity:
            skipped.append({"layer": n.name, "op": op_name(n), "sparsity": sparsity,
                            "skipped": f"{100 * sparsity:.1f}% zeros < min_sparsity"})
            continue
        layers.append(Layer(n, info, weight, w, sparsity))
    return layers, skipped


def _decide(lay: Layer, mode: str, block, target: str) -> dict:
    """The layer's report row: form, measured times, bytes, verdict."""
    reason = lay.kernel_reason
    if reason is None and mode != "storage":
        _check_block(lay, block)
    row = {"layer": lay.node.name, "op": op_name(lay.node), "weight": lay.weight,
           "shape": list(lay.w.shape), "sparsity": round(lay.sparsity, 4),
           "dense_ms": None, "kernel_ms": None, "storage_ms": None,
           "bytes_before": 4 * lay.w.numel(), "bytes_storage": _storage_bytes(lay.w)}
    if reason is None:
        row["bytes_kernel"] = bsr_bytes(*to_bsr(lay.w, block))
    if reason is not None or mode == "storage":
        row.update(form="storage", reason=reason or "mode=storage")
    elif mode == "kernel":
        row.update(form="kernel", reason="mode=kernel")
    else:
        bias = _bias(lay)
        x_shape = tuple(lay.node.args[lay.info.x_arg].meta["val"].shape)
        dense, kernel, storage = time_layer(lay.w, bias, x_shape, block, target)
        row.update(dense_ms=round(dense, 4), kernel_ms=round(kernel, 4),
                   storage_ms=round(storage, 4), form=choose(dense, kernel),
                   reason=f"measured on {target}")
    row["bytes_after"] = row["bytes_kernel" if row["form"] == "kernel" else "bytes_storage"]
    row["verdict"] = _verdict(row)
    if row["form"] == "storage" and row["storage_ms"] is not None \
            and row["storage_ms"] > row["dense_ms"] / KERNEL_MARGIN:
        # not faster may also be slower: a decoded weight is no compile-time constant
        row["note"] = f"storage measured {row['storage_ms'] / row['dense_ms']:.2f}x the dense time"
    return row


def _verdict(row: dict) -> str:
    if row["form"] == "storage":
        return "smaller, not faster"
    if row["kernel_ms"] is None:
        return "not measured (mode=kernel)"
    return "faster"


def _check_block(lay: Layer, block) -> None:
    n, k = lay.w.shape
    bad = [f"its {d} {what} are not a multiple of {b}"
           for d, b, what in ((n, block[0], "rows"), (k, block[1], "columns")) if d % b]
    if bad:
        raise PassError(
            f"{PASS}: block={tuple(block)} does not divide the weight {lay.weight} [{n}, {k}] "
            f"of %{lay.node.name} ({op_name(lay.node)}): {' and '.join(bad)}; use a block "
            f"that divides both, mode=storage, or exclude=['{lay.node.name}']")


def _storage_bytes(w: torch.Tensor) -> int:
    return masked_bytes(*to_masked(w))


def _bias(lay: Layer) -> torch.Tensor | None:
    """The bias to time the layer with (a computed one by zeros: timing ignores values)."""
    i = lay.info.bias_arg
    b = lay.node.args[i] if i is not None and len(lay.node.args) > i else None
    if b is None:
        return None
    if b.op != "get_attr":
        return torch.zeros(lay.w.shape[0])
    return fetch_attr(lay.node.graph.owning_module, str(b.target)).detach()


# ---- rewriting ----------------------------------------------------------------------------
def _first(graph: fx.Graph) -> fx.Node:
    return next(n for n in graph.nodes if n.op != "placeholder")


def _kernel(g: Graph, node: fx.Node, lay: Layer, block, row: dict) -> None:
    """The layer node -> bsr_linear over three new weights (data is trainable)."""
    data, indices, indptr = to_bsr(lay.w, block)
    names = [add_weight(g, f"{lay.weight}_data", data),
             add_weight(g, f"{lay.weight}_indices", indices, trainable=False),
             add_weight(g, f"{lay.weight}_indptr", indptr, trainable=False)]
    graph = g.gm.graph
    with graph.inserting_before(_first(graph)):
        attrs = [graph.get_attr(name) for name in names]
    i = lay.info.bias_arg
    bias = node.args[i] if i is not None and len(node.args) > i else None
    with graph.inserting_before(node):
        new = graph.call_function(Q.bsr_linear.default, (node.args[lay.info.x_arg], *attrs,
                                                         list(lay.w.shape), bias))
    new.meta = dict(node.meta)
    node.replace_all_uses_with(new)
    graph.erase_node(node)
    new.name = node.name  # the report and later passes still find the layer by its name
    row["block"] = list(block)


def _store_remaining(g: Graph, weight: str) -> None:
    """Reads of the weight that no kernel replaced -> sparse_decode of the bitmask storage
    (permute(W, [1, 0]) reads decode W.T, stored transposed); then drop the dense weight."""
    graph = g.gm.graph
    reads = [n for n in graph.nodes if n.op == "get_attr" and n.target == weight]
    w = fetch_attr(g.gm, weight).detach()
    transposed = [u for n in reads for u in n.users if u.target is aten.permute.default
                  and list(u.args[1]) == [1, 0]]
    plain = [n for n in reads if any(u not in transposed for u in n.users)]
    for form, users in (("t", transposed), ("", plain)):
        if users:
            _decode(g, weight, w.T.contiguous() if form else w, users, form)
    for n in reads:
        if not n.users:
            graph.erase_node(n)
    if not any(n.op == "get_attr" and n.target == weight for n in graph.nodes):
        owner, _, name = weight.rpartition(".")
        delattr(fetch_attr(g.gm, owner) if owner else g.gm, name)  # the copy's module only


def _decode(g: Graph, weight: str, w: torch.Tensor, users: list[fx.Node], form: str) -> None:
    """One sparse_decode node of w; each user (a permute of W, or a read of W) -> it."""
    values, mask = to_masked(w)
    suffix = f"_{form}" if form else ""
    names = [add_weight(g, f"{weight}_values{suffix}", values),
             add_weight(g, f"{weight}_mask{suffix}", mask, trainable=False)]
    graph = g.gm.graph
    with graph.inserting_before(_first(graph)):
        attrs = [graph.get_attr(name) for name in names]
    with graph.inserting_after(attrs[-1]):
        dec = graph.call_function(Q.sparse_decode.default, (*attrs, list(w.shape)))
    dec.name = f"{names[0].removesuffix(suffix).removesuffix('_values')}_{form or 'w'}"
    for u in users:  # a read of W, or permute(W, [1, 0]) (when the decode already is W.T)
        u.replace_all_uses_with(dec)
        if u.op != "get_attr":
            graph.erase_node(u)


def _summary(rows, skipped, mode, block, min_sparsity) -> dict:
    before = sum(r["bytes_before"] for r in rows)
    after = sum(r["bytes_after"] for r in rows)
    return {"layers": rows, "skipped": skipped, "mode": mode, "block": list(block),
            "min_sparsity": min_sparsity, "weight_bytes_before": before,
            "weight_bytes_after": after}
