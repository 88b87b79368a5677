"""Issue 6's MiniLM measurement: remove 25% of the attention heads (12 -> 9 per layer) and
25% of the feed-forward channels (1536 -> 1152) of the real all-MiniLM-L6-v2 with
prune-channels, report the embedding cosine to fp32 before and after a short distillation
on real sentences, and the compiled CPU latency against the unpruned model.

    PYTHONPATH=. flock /tmp/graphc-bench.lock python tools/prune_minilm.py \
        --criterion sensitivity --scope global --data pydoc --train 1024 --features \
        --epochs 3 --lr 5e-5

Evaluation: the 200 real sentences of tests/models/minilm.real_sentences. Training and
calibration (the first --calib batches): Python documentation sentences that are not
evaluation sentences (--data pydoc, in-domain) or stdlib docstrings (tools/factorize_minilm.py).
Defaults reproduce the first measurement (l1, per layer, 400 docstrings, 2 epochs at 1e-4).
"""

from __future__ import annotations

import argparse
import statistics
import time

import graphc
from graphc.passes.prune_slice import format_prune_report
from graphc.passes.prune_structured import prune_channels
from tests.models.minilm import encoder, real_sentences
from tools.factorize_minilm import batches, cosine, doc_sentences, pydoc_sentences


def hidden_states(g) -> list[str]:
    """Each encoder layer's output: the last layer norm of every block (shapes kept by
    pruning, so student and teacher nodes match one to one)."""
    norms = [n for n in g.gm.graph.nodes if n.op == "call_function"
             and "layer_norm" in str(n.target)]
    # [embeddings, attention 0, output 0, attention 1, ...]; native_layer_norm is a tuple
    return [next((u.name for u in n.users if u.args[1:] == (0,)), n.name) for n in norms[2::2]]


def distill(args, p, g, train):
    t0 = time.perf_counter()
    feats = hidden_states(p) if args.features else None
    r = graphc.distill(p, g, train, epochs=args.epochs, loss="cosine", lr=args.lr,
                       features=feats)
    print(f"distilled {args.epochs} epoch(s) on {args.train} {args.data} sentences "
          f"(lr {args.lr}{', hidden-state features' if feats else ''}) in "
          f"{time.perf_counter() - t0:.0f} s (loss {r.curve['loss'][0]:.4f} -> "
          f"{r.curve['loss'][-1]:.4f})", flush=True)
    return r.student


def ab_latency(a, b, repeat: int) -> tuple[float, float, float]:
    """Medians (ms) of a and b compiled for cpu, timed alternately in this process (so load
    changes hit both), and the median of the per-pair ratios b / a."""
    ca, cb = graphc.compile(a, target="cpu"), graphc.compile(b, target="cpu")
    ca.benchmark(repeat=3), cb.benchmark(repeat=3)  # warm up both
    ta, tb = [], []
    for _ in range(repeat):
        ta.append(ca.benchmark(repeat=1, warmup=0)["median"])
        tb.append(cb.benchmark(repeat=1, warmup=0)["median"])
    return (statistics.median(ta), statistics.median(tb),
            statistics.median(y / x for x, y in zip(ta, tb)))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--heads", type=float, default=0.25, help="fraction of heads removed")
    ap.add_argument("--ffn", type=float, default=0.25, help="fraction of FFN channels removed")
    ap.add_argument("--criterion", default="l1", help="prune-channels criterion (l1, "
                    "sensitivity: output change on the calibration batches)")
    ap.add_argument("--scope", choices=["layer", "global"], default="layer")
    ap.add_argument("--calib", type=int, default=16, help="calibration batches (of 8)")
    ap.add_argument("--data", choices=["docstrings", "pydoc"], default="docstrings",
                    help="distillation/calibration text (tools/factorize_minilm.py)")
    ap.add_argument("--features", action="store_true",
                    help="also match every layer's hidden state (its last layer norm)")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--train", type=int, default=400)
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--skip-latency", action="store_true")
    args = ap.parse_args()
    evals = real_sentences(200)
    source = pydoc_sentences if args.data == "pydoc" else doc_sentences
    train, test = batches(source(set(evals), args.train)), batches(evals)
    calib = train[:args.calib]
    enc = encoder()
    g = graphc.trace(enc, test[0])
    ref = [g(*b)[0].detach() for b in test]
    t0 = time.perf_counter()
    opts = {"criterion": args.criterion, "scope": args.scope, "calibration": calib}
    h = prune_channels(g, sparsity=args.heads, unit="head", **opts)
    print(format_prune_report(h.meta["prune"]))
    p = prune_channels(h, sparsity=args.ffn, round_to=8, **opts)
    print(format_prune_report(p.meta["prune"]))
    before = cosine(p, ref, test)
    print(f"pruned in {time.perf_counter() - t0:.1f} s; params {g.stats()['params']:,} -> "
          f"{p.stats()['params']:,}; mean cosine to fp32 over {len(evals)} sentences before "
          f"distillation {before:.4f}", flush=True)
    student = p if args.epochs == 0 else distill(args, p, g, train)
    after = cosine(student, ref, test)
    if args.epochs:
        print(f"mean cosine after distillation {after:.4f}", flush=True)
    if not args.skip_latency:
        dense, pruned, ratio = ab_latency(g, student, args.repeat)
        print(f"whole model, batch 8 x seq 64, cpu, {args.repeat} interleaved pairs: "
              f"{dense:.2f} ms -> {pruned:.2f} ms (medians; median pair ratio {ratio:.3f}x)")


if __name__ == "__main__":
    main()
