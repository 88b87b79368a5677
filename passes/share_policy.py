"""Weight-sharing policy: which layers' weights get a codebook, and at how many bits.

    policy = SharePolicy(bits=4, ops=("linear", "embedding"), min_size=4096,
                         overrides=(("fc2*", 8), ("c1*", None)))   # fc2 at 8 bits, c1 float
    plan(graph, policy)   # -> [(Layer, bits)], validated; nothing is changed

Plain data, no rewriting (the mechanism is passes/share_weights.py). Layers are what the
quantizer knows (quant_policy.find_layers): convolutions, linears, embeddings with a
constant weight; matmuls of two computed tensors have no weight to share. Patterns (fnmatch)
match the node name ("addmm_2") or the weight's attribute name ("fc3_weight").
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from graphc.errors import PassError
from graphc.ir import Graph, fetch_attr
from graphc.ops_codebook import BITS
from graphc.passes.quant_policy import Layer, find_layers

OP_CLASSES = ("linear", "conv", "embedding")
PASS = "share-weights"


@dataclass(frozen=True)
class SharePolicy:
    """Defaults: every linear, conv and embedding weight of >= 1024 elements at 4 bits, one
    codebook per weight (shared=True: one codebook for all of them)."""

    bits: int = 4
    ops: tuple[str, ...] = OP_CLASSES
    min_size: int = 1024  # smaller weights (a first conv, a classifier) cost more in error
    include: tuple[str, ...] = ()  # empty: every layer of the selected classes
    exclude: tuple[str, ...] = ()
    shared: bool = False
    overrides: tuple[tuple[str, int | None], ...] = ()  # (pattern, bits or None); first wins
    rows_per_codebook: int = 0  # 0: one codebook per weight; r: one per r rows of it

    def bits_for(self, layer: Layer, size: int) -> int | None:
        """The layer's bit width, or None when the policy leaves it float."""
        for pattern, bits in self.overrides:
            if layer.matches(pattern):
                return bits
        if layer.kind not in self.ops or size < self.min_size:
            return None
        if any(layer.matches(p) for p in self.exclude):
            return None
        if self.include and not any(layer.matches(p) for p in self.include):
            return None
        return self.bits


def check_policy(policy: SharePolicy) -> None:
    """Raise PassError naming the option when the policy asks for something unsupported."""
    choices = [("bits", policy.bits)] + [(f"bits of override '{p}'", b)
                                          for p, b in policy.overrides if b is not None]
    for what, bits in choices:
        if isinstance(bits, bool) or bits not in BITS:
            raise PassError(f"pass '{PASS}': {what}={bits!r} is not supported; choose one of "
                            f"{list(BITS)} (2^bits centroids per codebook)")
    unknown = [k for k in policy.ops if k not in OP_CLASSES]
    if unknown:
        raise PassError(f"pass '{PASS}': ops={list(policy.ops)} names unknown layer classes "
                        f"{unknown}; choose from {list(OP_CLASSES)}")
    if policy.min_size < 0:
        raise PassError(f"pass '{PASS}': min_size={policy.min_size} must be >= 0")
    r = policy.rows_per_codebook
    if isinstance(r, bool) or not isinstance(r, int) or r < 0:
        raise PassError(f"pass '{PASS}': rows_per_codebook={r!r} must be an int >= 0 (0: one "
                        "codebook per weight, 1: one per row)")
    if r and policy.shared:
        raise PassError(f"pass '{PASS}': rows_per_codebook={r} and shared=True contradict "
                        "each other (shared: one codebook across layers); choose one")


def weight_layers(g: Graph) -> list[tuple[Layer, int]]:
    """Every layer with a constant weight read from an attribute, and that weight's size."""
    out = []
    for layer in find_layers(g):
        if layer.weight is None or layer.kind == "matmul" or not hasattr_path(g, layer.weight):
            continue
        out.append((layer, math.prod(fetch_attr(g.gm, layer.weight).shape)))
    return out


def hasattr_path(g: Graph, target: str) -> bool:
    try:
        fetch_attr(g.gm, target)
    except AttributeError:
        return False
    return True


def plan(g: Graph, policy: SharePolicy) -> list[tuple[Layer, int]]:
    """The selected layers and their bit widths; patterns that name no layer raise."""
    check_policy(policy)
    layers = weight_layers(g)
    for option, patterns in (("include", policy.include), ("exclude", policy.exclude),
                             ("overrides", [p for p, _ in policy.overrides])):
        for p in patterns:
            if not any(layer.matches(p) for layer, _ in layers):
                names = ", ".join(f"{lay.node} ({lay.weight})" for lay, _ in layers)
                raise PassError(f"pass '{PASS}': {option} pattern '{p}' matches no layer; "
                                f"layers with a weight: {names or '(none)'}")
    chosen = [(layer, policy.bits_for(layer, size)) for layer, size in layers]
    return [(layer, bits) for layer, bits in chosen if bits is not None]
