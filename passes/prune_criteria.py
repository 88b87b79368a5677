"""Which weights can be pruned, and how important each of their entries is.

    weight_scores(g, "l1")                      {"fc1_weight": |W|, ...}
    weight_scores(g, "taylor", data=batches)    {"fc1_weight": sum over batches |W * dL/dW|}
    weight_scores(g, "sensitivity", data=xs)    {"fc1_weight": E_r sum (W * d<r, f(x)>/dW)^2}

A prunable weight is a get_attr parameter that reaches the weight operand of a layer op in
PRUNE_OPS through layout ops only (permute / t / transpose, and the mask multiply that
`prune` inserts). Scores have the parameter's shape (not the permuted operand's) and are
computed on the effective weight W * mask, so an entry pruned earlier scores 0.
Structured pruning (passes/prune_structured.py) builds on this module: keep its API.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx

from graphc.distill_taps import split_item
from graphc.errors import GraphcError, PassError
from graphc.ir import Graph, fetch_attr, op_name

aten = torch.ops.aten
CRITERIA = ("l1", "l2", "taylor", "random", "sensitivity")
PROBES = 4  # random output directions per batch (sensitivity): averages out the noise of r
MASKS_META = "prune_masks"  # graph.meta[MASKS_META]: {weight attr: mask buffer attr}

# op -> (computed input arg, weight arg, the weight operand's reduction (input) axis)
PRUNE_OPS = {
    aten.convolution.default: (0, 1, 1),   # [O, I/groups, kh, kw]; transposed: axis 0
    aten.addmm.default: (1, 2, 0),         # addmm(b, x, W^T): operand [in, out]
    aten.mm.default: (0, 1, 0),
    aten.linear.default: (0, 1, 1),        # linear(x, W, b): W [out, in]
    aten.matmul.default: (0, 1, -2),
}
# layout ops a weight may pass through: op -> operand axis d comes from input axis f(node, d)
LAYOUT_OPS: dict = {
    aten.permute.default: lambda n, d: n.args[1][d],
    aten.t.default: lambda n, d: 1 - d,
    aten.transpose.int: lambda n, d: _swap(d, *n.args[1:3]),
}


def _swap(d: int, a: int, b: int) -> int:
    return b if d == a else a if d == b else d


@dataclass
class PrunableWeight:
    name: str                 # the parameter's attribute name (key of every dict here)
    node: str                 # the first layer node that reads it
    op: str                   # that node's op, e.g. "aten.addmm"
    shape: tuple[int, ...]
    reduction_dim: int | None  # the parameter axis the layer sums over (None: not traceable)
    mask: str | None = None   # the mask buffer multiplying it, if pruned already
    nodes: list[str] = field(default_factory=list)  # every layer node that reads it


def prunable_weights(graph: Graph) -> list[PrunableWeight]:
    """The prunable weights of `graph`, in graph order, each once (tied weights too)."""
    masks = graph.meta.get(MASKS_META, {})
    found: dict[str, PrunableWeight] = {}
    for n in graph.gm.graph.nodes:
        spec = PRUNE_OPS.get(n.target) if n.op == "call_function" else None
        if spec is None or len(n.args) <= spec[1] or not isinstance(n.args[spec[1]], fx.Node):
            continue
        x_arg, w_arg, axis = spec
        if n.target is aten.convolution.default and n.args[6]:
            axis = 0  # transposed conv weight: [I, O/groups, kh, kw]
        src = _source(n.args[w_arg], axis, masks)
        if src is None or (isinstance(n.args[x_arg], fx.Node) and _source(n.args[x_arg], 0, {})):
            continue  # the weight is computed, or both operands are weights
        attr, dim = src
        w = fetch_attr(graph.gm, attr)
        if not isinstance(w, torch.Tensor) or not w.is_floating_point():
            continue
        if attr not in found:
            found[attr] = PrunableWeight(attr, n.name, op_name(n), tuple(w.shape),
                                         None if dim is None else dim % w.dim(), masks.get(attr))
        found[attr].nodes.append(n.name)
    return list(found.values())


def _source(node: fx.Node, axis: int | None, masks: dict) -> tuple[str, int | None] | None:
    """(attribute, parameter axis of the operand's `axis`) of the get_attr a weight operand
    comes from through layout ops and mask multiplies, or None."""
    while node.op != "get_attr":
        if node.op != "call_function":
            return None
        if node.target is aten.mul.Tensor and is_mask_mul(node, masks):
            node = node.args[0]
            continue
        if len(node.all_input_nodes) != 1:
            return None
        if node.target in LAYOUT_OPS and axis is not None:
            rank = len(node.meta["val"].shape) if "val" in node.meta else None
            axis = LAYOUT_OPS[node.target](node, axis % rank if rank else axis)
        elif node.target not in LAYOUT_OPS:
            axis = None  # a view / reshape: the values are there, the axis is lost
        node = node.args[0]
        if not isinstance(node, fx.Node):
            return None
    return str(node.target), axis


def is_mask_mul(node: fx.Node, masks: dict) -> bool:
    w, m = node.args[0], node.args[1]
    return (isinstance(w, fx.Node) and isinstance(m, fx.Node) and w.op == "get_attr"
            and m.op == "get_attr" and masks.get(str(w.target)) == str(m.target))


def effective_weight(graph: Graph, pw: PrunableWeight) -> torch.Tensor:
    """W * mask (W itself when not pruned yet), detached."""
    w = fetch_attr(graph.gm, pw.name).detach()
    return w * fetch_attr(graph.gm, pw.mask) if pw.mask else w


def weight_scores(graph: Graph, criterion: str, data: Iterable | None = None,
                  loss: Callable | None = None, *, seed: int = 0,
                  weights: list[PrunableWeight] | None = None) -> dict[str, torch.Tensor]:
    """{weight attribute: importance tensor of the parameter's shape} for every prunable
    weight (or those in `weights`). Higher is more important.

    l1: |w|. l2: w^2. taylor: |w * dL/dw| summed over `data` (items: inputs, or (inputs,
    labels)), L = cross-entropy with the labels, or loss(outputs[, labels]) when `loss` is
    given. random: uniform noise from `seed` (a baseline). sensitivity: no labels, no loss:
    E_r (w * d<r, f(x)>/dw)^2 over `data` with random +-1 directions r (seeded), an unbiased
    estimate of the squared change of the outputs f(x) when w is zeroed, to first order
    (output_products). Pruned entries score 0 (all criteria).
    """
    if criterion not in CRITERIA:
        raise PassError(f"prune: criterion={criterion!r} is unknown; choose from "
                        f"{list(CRITERIA)}")
    pws = prunable_weights(graph) if weights is None else weights
    eff = {pw.name: effective_weight(graph, pw).float() for pw in pws}
    if criterion == "l1":
        return {k: w.abs() for k, w in eff.items()}
    if criterion == "l2":
        return {k: w.square() for k, w in eff.items()}
    if criterion == "random":
        gen = torch.Generator().manual_seed(seed)
        return {k: torch.rand(w.shape, generator=gen) * (w != 0) for k, w in eff.items()}
    if criterion == "sensitivity":
        acc = {k: torch.zeros_like(w) for k, w in eff.items()}
        for prods in output_products(graph, data, seed=seed, weights=pws):
            for k, v in prods.items():
                acc[k] += v.square() / PROBES
        return acc
    return _taylor(graph, pws, eff, data, loss)


def _taylor(graph, pws, eff, data, loss) -> dict[str, torch.Tensor]:
    if data is None:
        raise PassError("prune: criterion 'taylor' needs data (batches of inputs, or "
                        "(inputs, labels)) to compute dL/dw; pass data=... or calibration=...")
    items = list(data)
    if not items:
        raise PassError("prune: criterion 'taylor' got empty data; give at least one batch")
    g, params = _leaf_copy(graph, pws)
    acc = {k: torch.zeros_like(w) for k, w in eff.items()}
    for item in items:
        inputs, labels = _split(item, g, "taylor")
        out = g.gm(*inputs)
        out = out[0] if isinstance(out, (tuple, list)) and len(out) == 1 else out
        value = _loss(out, labels, loss)
        grads = torch.autograd.grad(value, list(params.values()), allow_unused=True)
        for (name, _), grad in zip(params.items(), grads):
            if grad is not None:
                acc[name] += (eff[name] * grad.float()).abs()
    return acc


def _split(item, g: Graph, criterion: str):
    """(inputs, labels or None) of one data item, errors named after the criterion."""
    try:
        return split_item(item, g)
    except GraphcError as e:
        raise PassError(f"prune ({criterion}): {e}") from e


def _leaf_copy(graph: Graph, pws) -> tuple[Graph, dict[str, torch.nn.Parameter]]:
    g = graph.copy()  # own leaf tensors: the input graph's parameters get no .grad
    params = {pw.name: torch.nn.Parameter(fetch_attr(graph.gm, pw.name).detach().clone())
              for pw in pws}
    for name, p in params.items():
        set_attr(g.gm, name, p)
    return g, params


def output_products(graph: Graph, data: Iterable | None, *, probes: int = PROBES,
                    seed: int = 0, weights: list[PrunableWeight] | None = None):
    """Per batch of `data` and per probe: {weight: W * dL/dW (signed)}, L = sum of <r, out>
    over the float outputs with r a fresh random +-1 tensor of each output's shape.

    Why: removing a unit changes the outputs by about J*a (first order). Summed over the
    unit's entries, W * dL/dW is r . (J*a), and E_r[(r . v)^2] = |v|^2 for independent +-1
    entries, so squares of these sums (averaged over probes, summed over batches) estimate
    the squared output change without labels or a teacher loss (a distillation loss to the
    unpruned model itself has zero gradient there). Per sample r are independent, so one
    backward per probe covers a whole batch. Labels in the items are ignored.
    """
    if data is None:
        raise PassError("prune: criterion 'sensitivity' needs data (batches of inputs) to "
                        "compute output gradients; pass data=... or calibration=...")
    items = list(data)
    if not items:
        raise PassError("prune: criterion 'sensitivity' got empty data; give at least one "
                        "batch")
    pws = prunable_weights(graph) if weights is None else weights
    g, params = _leaf_copy(graph, pws)
    eff = {pw.name: effective_weight(graph, pw).float() for pw in pws}
    gen = torch.Generator().manual_seed(seed)
    for item in items:
        inputs, _ = _split(item, g, "sensitivity")
        outs = g.gm(*inputs)
        outs = [o for o in (outs if isinstance(outs, (tuple, list)) else [outs])
                if isinstance(o, torch.Tensor) and o.is_floating_point()]
        for k in range(probes):
            dirs = [torch.randint(0, 2, o.shape, generator=gen).to(o.dtype) * 2 - 1
                    for o in outs]
            value = sum((o * r).sum() for o, r in zip(outs, dirs))
            grads = torch.autograd.grad(value, list(params.values()), allow_unused=True,
                                        retain_graph=k + 1 < probes)
            yield {name: eff[name] * grad.float() for name, grad in zip(params, grads)
                   if grad is not None}


def _loss(out, labels, loss) -> torch.Tensor:
    if loss is not None:
        return loss(out) if labels is None else loss(out, labels)
    if labels is None:
        raise PassError("prune: criterion 'taylor' got items without labels and no loss; "
                        "give (inputs, labels) items (cross-entropy) or loss=fn(outputs)")
    return F.cross_entropy(out, labels)


def set_attr(gm: torch.nn.Module, target: str, value: torch.Tensor) -> None:
    *path, leaf = target.split(".")
    mod = gm
    for part in path:
        mod = getattr(mod, part)
    if isinstance(value, torch.nn.Parameter):
        mod.register_parameter(leaf, value)
    else:
        mod.register_buffer(leaf, value)
