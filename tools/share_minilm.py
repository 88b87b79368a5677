"""Issue 5's MiniLM weight-sharing measurement: mean embedding cosine to fp32 of the real
all-MiniLM-L6-v2 after `share-weights` (no fine-tuning), per bit width and granularity, and
the saved artifact's size against the fp32 one.

    PYTHONPATH=. flock /tmp/graphc-bench.lock python tools/share_minilm.py \\
        --bits 4,6 --rows-per-codebook 1 --assign data-aware [--artifact]

Evaluation: the 200 real sentences of tests/models/minilm.real_sentences (64 tokens).
Calibration for assign=data-aware: stdlib docstring sentences (tools/factorize_minilm.py),
none of them an evaluation sentence.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch

import graphc
from graphc.passes.share_weights import share_weights
from tests.models.minilm import encoder, real_sentences
from tools.factorize_minilm import batches, doc_sentences


def artifact_bytes(g) -> int:
    with tempfile.TemporaryDirectory() as d:
        graphc.compile(g, target="cpu").save(f"{d}/m.graphc")
        return os.path.getsize(f"{d}/m.graphc")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bits", default="4,6")
    ap.add_argument("--rows-per-codebook", type=int, default=1)
    ap.add_argument("--assign", default="data-aware")
    ap.add_argument("--calib", type=int, default=128, help="calibration sentences")
    ap.add_argument("--lowering", default="decode")
    ap.add_argument("--embeddings-one-codebook", action="store_true",
                    help="rows_per_codebook for linears only; embeddings get one codebook "
                         "(a second share-weights pass): 16 floats per row of a 30522-token "
                         "table cost 1.9 MB at 4 bits")
    ap.add_argument("--artifact", action="store_true", help="also compile and save")
    ap.add_argument("--rate", type=float, default=None,
                    help="share-weights rate= (mean bits per index; needs --assign nearest)")
    args = ap.parse_args()
    evals = real_sentences(200)
    test = batches(evals)
    calib = batches(doc_sentences(set(evals), args.calib))
    enc = encoder()
    g = graphc.trace(enc, test[0])
    with torch.no_grad():
        ref = [enc(*b) for b in test]
    fp32 = artifact_bytes(g) if args.artifact else None
    for bits in (int(b) for b in args.bits.split(",")):
        t0 = time.perf_counter()
        opts = {"bits": bits, "lowering": args.lowering, "rate": args.rate}
        ops = ("linear",) if args.embeddings_one_codebook else ("linear", "conv", "embedding")
        s = share_weights(g, rows_per_codebook=args.rows_per_codebook, assign=args.assign,
                          calibration=calib, ops=ops, **opts)
        rep = dict(s.meta["share-weights"])
        if args.embeddings_one_codebook:
            s = share_weights(s, ops=("embedding",), **opts)
            for key in ("weight_bytes_fp32", "weight_bytes_shared", "codebook_bytes",
                        "index_bytes_at_entropy"):
                rep[key] += s.meta["share-weights"][key]
        with torch.no_grad():
            cos = torch.cat([torch.nn.functional.cosine_similarity(s(*b)[0], r, dim=-1)
                             for b, r in zip(test, ref)])
        print(f"bits={bits} rows_per_codebook={args.rows_per_codebook} assign={args.assign}"
              f"{' (embeddings: one codebook)' if args.embeddings_one_codebook else ''}: "
              f"pass {time.perf_counter() - t0:.1f} s; mean cosine {cos.mean():.4f} (min "
              f"{cos.min():.4f}) over {len(evals)} sentences; weights "
              f"{rep['weight_bytes_fp32']:,} -> {rep['weight_bytes_shared']:,} bytes "
              f"(codebooks {rep['codebook_bytes']:,}; indices at entropy "
              f"{rep['index_bytes_at_entropy']:,})", flush=True)
        if args.artifact:
            b = artifact_bytes(s)
            print(f"  artifact {fp32:,} -> {b:,} bytes ({b / fp32:.3f}x)", flush=True)


if __name__ == "__main__":
    main()
