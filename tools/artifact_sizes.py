"""Saved artifact sizes, fp32, share-weights(bits=4) and share-weights(bits=4, rate=2.6)
(entropy-constrained codebooks at 2.6 bits per index), each linked with and without the
strip options of backends/tvm/strip.py (debug info and .symtab), plus what is inside.

    PYTHONPATH=. flock /tmp/graphc-bench.lock python tools/artifact_sizes.py --models digits

digits: the trained CNN of tests/test_qat.py; resnet18: benchmarks/models.py (random
weights, 1x3x224x224); minilm: the real all-MiniLM-L6-v2 (batch 8 x 64 tokens). Each model
is compiled once per variant and saved twice, LINK_OPTIONS toggled between the saves.
"""

from __future__ import annotations

import argparse
import copy
import os
import tempfile
import zipfile

import torch

import graphc
from graphc.backends.tvm import strip
from graphc.passes.share_weights import share_weights


def digits():
    from tests.test_qat import _train_digits

    g, _, _ = _train_digits()
    return g


def resnet18():
    from benchmarks.models import resnet18 as case

    c = case()
    return graphc.trace(c.model, c.inputs)


def minilm():
    from tests.models.minilm import encoder, real_sentences, tokenize

    ids, mask = tokenize(real_sentences(8), 64)
    return graphc.trace(encoder(), (ids, mask))


def zeroed(g):
    z = copy.deepcopy(g)  # Graph.copy() would share the tensors with g
    with torch.no_grad():
        for t in [*z.gm.parameters(), *z.gm.buffers()]:
            t.zero_()
    return z


def saved(cm, options: tuple[str, ...]) -> tuple[int, dict]:
    """(file size, {member: compressed size}) of cm saved with these link options."""
    strip.LINK_OPTIONS, keep = options, strip.LINK_OPTIONS
    try:
        with tempfile.TemporaryDirectory() as d:
            cm.save(f"{d}/m.graphc")
            with zipfile.ZipFile(f"{d}/m.graphc") as zf:
                parts = {i.filename: i.compress_size for i in zf.infolist()}
            return os.path.getsize(f"{d}/m.graphc"), parts
    finally:
        strip.LINK_OPTIONS = keep


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["digits"],
                    choices=["digits", "resnet18", "minilm"])
    ap.add_argument("--zeroed", action="store_true",
                    help="also fp32 with every weight zeroed: what is not weights (the zeros "
                         "compress to nothing)")
    # +direct: Winograd (the presets' default for 3x3 convs) stores a conv's weight transformed,
    # 4x its bytes: the fp32 baseline would grow (digits CNN: its 16->32 conv) and flatter
    # every ratio. The shared model's decoded weights are not constants: direct either way.
    ap.add_argument("--target", default="cpu+direct")
    args = ap.parse_args()
    torch.set_num_threads(1)
    for name in args.models:
        g = globals()[name]()
        variants = {"fp32": g,
                    "share-weights(bits=4)": share_weights(g, bits=4, lowering="decode"),
                    "share-weights(bits=4, rate=2.6)": share_weights(g, bits=4, rate=2.6,
                                                                     lowering="decode")}
        if args.zeroed:
            variants["fp32, weights zeroed"] = zeroed(g)
        sizes = {}
        for label, graph in variants.items():
            cm = graphc.compile(graph, target=args.target)
            for opts in ((), strip.LINK_OPTIONS):
                size, parts = saved(cm, opts)
                sizes[label, opts] = size
                print(f"{name} {label} link options {list(opts)}: {size:,} bytes; zipped "
                      f"members {parts}", flush=True)
        for opts in ((), strip.LINK_OPTIONS):
            for label in [v for v in variants if v.startswith("share-weights")]:
                ratio = sizes[label, opts] / sizes["fp32", opts]
                print(f"{name} link options {list(opts)}: {label} / fp32 = {ratio:.4f}")


if __name__ == "__main__":
    main()
