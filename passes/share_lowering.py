"""How each shared layer runs: decode the dense weight once, or gather inside the kernel.

    decode   graphc.codebook_decode feeds the layer's own op; the backend rebuilds the dense
             weight when the model loads and keeps it (a storage win: the file holds b-bit
             indices; memory and speed at run time are the float model's).
    gather   graphc.codebook_linear / codebook_embedding: the kernel reads the codebook on
             every call, no dense weight exists (a memory-traffic win, if the decode costs
             less than the bytes it saves).

`auto` compiles both forms of each layer alone on the target, at the layer's real input
shape, and keeps gather only when it is at least 5% faster; the reason (both medians) goes in the report. Layers of one
signature are timed once per process. Convolutions, and linears whose weight is not
nn.Linear's [out, in] attribute, have no gather form and always decode.
"""

from __future__ import annotations

import torch
from torch import fx, nn

from graphc.errors import PassError
from graphc.ops_codebook import pack

aten, Q = torch.ops.aten, torch.ops.graphc
_TIMINGS: dict[tuple, tuple[float, float]] = {}  # signature -> (decode ms, gather ms)
# gather must beat decode by this factor: decode runs the tuned float kernels, and a win
# inside timing noise (a few percent between runs here) is no win
GATHER_MARGIN = 0.95


def gather_reason(node: fx.Node) -> str | None:
    """None when the layer has a gather form, else why not."""
    if node.target is aten.embedding.default:
        return None
    if node.target in (aten.addmm.default, aten.mm.default):
        w = node.args[-1]
        if node.kwargs or not (w.target is aten.permute.default and list(w.args[1]) == [1, 0]
                               and w.args[0].op == "get_attr"):
            return "the weight operand is not permute(weight [out, in]) (or beta/alpha set)"
        return None
    if node.target is aten.linear.default:
        return None if node.args[1].op == "get_attr" else "the weight is computed"
    return f"no in-kernel gather lowering for {node.target}"


def gather_form(node: fx.Node) -> tuple[fx.Node, fx.Node | None]:
    """(the activation or indices operand, the bias or None) of a gather-capable layer."""
    if node.target is aten.embedding.default:
        return node.args[1], None
    if node.target is aten.addmm.default:
        return node.args[1], node.args[0]
    if node.target is aten.mm.default:
        return node.args[0], None
    return node.args[0], node.args[2] if len(node.args) > 2 else None


def choose_lowering(g, chosen, lowering: str, target: str,
                    groups: dict[str, int] | None = None) -> dict[str, tuple[str, str]]:
    """Layer node name -> (mode, reason). groups: weight -> its number of codebooks (the
    per-row kernels index one more table, so they are timed as they will run)."""
    nodes = {n.name: n for n in g.gm.graph.nodes}
    out = {}
    for layer, bits in chosen:
        node = nodes[layer.node]
        reason = gather_reason(node)
        if reason is not None:
            if lowering == "gather":
                raise PassError(f"pass 'share-weights': lowering=gather, but %{node.name} "
                                f"({layer.op}) cannot gather: {reason}; use lowering=auto or "
                                f"exclude=['{node.name}']")
            out[layer.node] = ("decode", reason)
        elif lowering != "auto":
            out[layer.node] = (lowering, f"lowering={lowering}")
        else:
            out[layer.node] = _measured(g, node, bits, target,
                                        (groups or {}).get(layer.weight, 1))
    return out


def _measured(g, node: fx.Node, bits: int, target: str, groups: int) -> tuple[str, str]:
    sig = _signature(g, node, bits, target) + (groups,)
    if sig not in _TIMINGS:
        _TIMINGS[sig] = tuple(_time(sig, mode) for mode in ("decode", "gather"))
    decode, gather = _TIMINGS[sig]
    mode = "gather" if gather < GATHER_MARGIN * decode else "decode"
    return mode, f"measured on {target}: gather {gather:.3f} ms, decode {decode:.3f} ms"


def _signature(g, node: fx.Node, bits: int, target: str) -> tuple:
    x, bias = gather_form(node)
    wnode = node.args[0] if node.target is aten.embedding.default else (
        node.args[1] if node.target is aten.linear.default else node.args[-1].args[0])
    shape = tuple(g.weight(wnode).shape)
    xval = x.meta["val"]
    return (str(node.target), tuple(xval.shape), str(xval.dtype), shape, bias is not None,
            bits, target)


class _Layer(nn.Module):
    """One shared layer alone, in either form, with random indices (timing does not depend
    on their values)."""

    def __init__(self, sig: tuple, mode: str):
        super().__init__()
        op, _, _, shape, has_bias, bits, _, groups = sig
        self.embedding, self.mode, self.bits, self.shape = "embedding" in op, mode, bits, list(
            shape)
        self.codebook = nn.Parameter(torch.randn(groups, 1 << bits) if groups > 1
                                     else torch.randn(1 << bits))
        self.register_buffer("packed", pack(torch.randint(0, 1 << bits, shape), bits))
        self.bias = nn.Parameter(torch.randn(shape[0])) if has_bias else None

    def forward(self, x):
        args = (self.codebook, self.packed, self.bits, self.shape)
        if self.mode == "gather":
            if self.embedding:
                return Q.codebook_embedding(*args, x)
            return Q.codebook_linear(x, *args, self.bias)
        w = Q.codebook_decode(*args)
        return (nn.functional.embedding(x, w) if self.embedding
                else nn.functional.linear(x, w, self.bias))


def _time(sig: tuple, mode: str) -> float:
    import graphc

    _, xshape, xdtype, shape, _, _, target, _ = sig
    if "int" in xdtype:
        x = torch.randint(0, shape[0], xshape)
    else:
        x = torch.randn(xshape)
    cm = graphc.compile(_Layer(sig, mode).eval(), (x,), target=target)
    return cm.benchmark(repeat=30, warmup=3)["median"]
