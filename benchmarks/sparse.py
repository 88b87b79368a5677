"""Sparse weights on this CPU: BSR kernel vs graphc's dense kernel, and artifact sizes.

    flock /tmp/graphc-bench.lock python -m benchmarks.sparse linears [--block 1x1]
        MiniLM-size linears (384x1536, 1536x384, 384x384; [out, in]) at 50/80/90/95%
        unstructured sparsity, batch 1 and 32: the sparse-kernel layer against the dense
        layer (and the bitmask-storage layer), compiled alone, timed interleaved in one
        process (passes/sparse_lowering.py: medians of rounds alternating the order)
    flock /tmp/graphc-bench.lock python -m benchmarks.sparse digits [--sparsity 0.8]
        the sklearn-digits CNN (tests/test_qat.py) with its smallest 80% weights zeroed:
        artifact bytes of fp32, the zeroed dense model, and sparsify(mode=storage / auto)

Unstructured zeros are drawn at random (torch), as pruning would leave them.
"""

from __future__ import annotations

import argparse
import os
import tempfile

import torch

import graphc
from graphc.passes.sparse_lowering import time_layer
from graphc.passes.sparsify import sparsify

SHAPES = [(1536, 384), (384, 1536), (384, 384)]  # [out, in]: MiniLM's FFN up, down, attention


def linears(block: tuple[int, int], rounds: int) -> None:
    print(f"block {block}; ms per call, medians of {rounds} interleaved rounds")
    print(f"{'batch':>5} {'out x in':>10} {'sparsity':>8} {'dense':>8} {'sparse':>8} "
          f"{'storage':>8} {'dense/sparse':>12}")
    torch.manual_seed(0)
    for batch in (1, 32):
        for n, k in SHAPES:
            base, bias = torch.randn(n, k), torch.randn(n)
            for s in (0.5, 0.8, 0.9, 0.95):
                w = base.masked_fill(torch.rand(n, k) < s, 0.0)
                d, sp, st = time_layer(w, bias, (batch, k), block, rounds=rounds, per=20)
                print(f"{batch:>5} {n:>5}x{k:<4} {s:>8.2f} {d:>8.4f} {sp:>8.4f} {st:>8.4f} "
                      f"{d / sp:>11.2f}x", flush=True)


def _size(cm) -> int:
    with tempfile.TemporaryDirectory() as d:
        cm.save(f"{d}/m.graphc")
        return os.path.getsize(f"{d}/m.graphc")


def _zero_smallest(g, sparsity: float):
    """A copy whose linear/conv weights have their smallest |w| zeroed, per tensor."""
    out = g.copy()
    for name, p in list(out.gm.named_parameters()):
        if p.dim() >= 2:  # new tensors: the copy shares its parameters with g
            cut = p.detach().abs().reshape(-1).kthvalue(int(sparsity * p.numel())).values
            setattr(out.gm, name, torch.nn.Parameter(p.detach() * (p.detach().abs() > cut)))
    return out


def digits(sparsity: float) -> None:
    from tests.test_qat import _accuracy, _train_digits

    g, _, test = _train_digits()
    z = _zero_smallest(g, sparsity)
    rows = [("fp32", g), (f"{sparsity:.0%} zeros, dense", z)]
    for mode in ("storage", "auto"):
        rows.append((f"sparsify(mode={mode})", sparsify(z, min_sparsity=0.5, mode=mode)))
    fp32 = None
    for label, graph in rows:
        size = _size(graphc.compile(graph, target="cpu"))
        fp32 = fp32 or size
        forms = [(r["layer"], r["form"], r["verdict"])
                 for r in graph.meta.get("sparsify", {}).get("layers", [])]
        print(f"{label:<26} artifact {size:>7} bytes ({size / fp32:.3f}x fp32) "
              f"accuracy {_accuracy(graph, test):.2f}% {forms if forms else ''}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=["linears", "digits"])
    ap.add_argument("--block", default="1x1", help="BSR block RxC (linears)")
    ap.add_argument("--rounds", type=int, default=11)
    ap.add_argument("--sparsity", type=float, default=0.8, help="zeros per weight (digits)")
    args = ap.parse_args()
    if args.what == "linears":
        linears(tuple(int(v) for v in args.block.split("x")), args.rounds)
    else:
        digits(args.sparsity)


if __name__ == "__main__":
    main()
