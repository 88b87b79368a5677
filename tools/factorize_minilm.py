"""Issue 5's MiniLM measurement: factorize the feed-forward layers of the real all-MiniLM-L6-v2
to 0.75x their params (plain and data-aware SVD), report the embedding cosine to fp32 before
and after a short distillation on real sentences, and the compiled CPU latency of the
factorized layers and of the whole model against the unfactorized ones.

    PYTHONPATH=. flock /tmp/graphc-bench.lock python tools/factorize_minilm.py [--epochs 2]

Evaluation: the 200 real sentences of tests/models/minilm.real_sentences (as the int8 test).
Training and calibration: sentences from the docstrings of Python's standard library,
a different text with none of the evaluation sentences in it.
"""

from __future__ import annotations

import argparse
import importlib
import re
import time

import torch

import graphc
from graphc.passes.factor_report import format_factor_report
from graphc.passes.factorize import factorize
from tests.models.minilm import encoder, real_sentences, tokenize

FFN = ["*intermediate_dense_weight", "*output_dense_weight"]  # not attention_output_dense
EXCLUDE = ["*attention_output_dense_weight"]
SEQ, BATCH = 64, 8
MODULES = ["argparse", "collections", "csv", "datetime", "decimal", "email", "fractions",
           "functools", "glob", "heapq", "inspect", "json", "logging", "os", "pathlib",
           "random", "re", "shutil", "socket", "string", "subprocess", "tarfile", "textwrap",
           "threading", "typing", "unittest", "urllib.request", "zipfile", "statistics",
           "sqlite3", "pickle", "queue", "sched", "selectors", "tempfile", "difflib"]


def doc_sentences(exclude: set[str], n: int) -> list[str]:
    """n prose sentences (6-40 words) from stdlib docstrings, none of them in `exclude`."""
    seen: dict[str, None] = {}
    for name in MODULES:
        mod = importlib.import_module(name)
        docs = [mod.__doc__] + [getattr(v, "__doc__", None) for k, v in
                                sorted(vars(mod).items()) if callable(v) and not k.startswith("_")]
        for doc in (d for d in docs if isinstance(d, str)):
            for s in re.split(r"(?<=[a-z]\.)\s+(?=[A-Z])", re.sub(r"\s+", " ", doc)):
                if 6 <= len(s.split()) <= 40 and re.fullmatch(r"[A-Za-z ,;:'\-()]+\.", s) \
                        and s not in exclude:
                    seen.setdefault(s)
    if len(seen) < n:
        raise SystemExit(f"only {len(seen)} docstring sentences, {n} asked")
    return list(seen)[:n]


def pydoc_sentences(exclude: set[str], n: int) -> list[str]:
    """n sentences of the Python documentation (pydoc_data.topics, the evaluation text's
    source) that are not evaluation sentences: those real_sentences' filter rejects (code,
    digits, brackets, other lengths) and the ones past its first 200. In-domain text."""
    from pydoc_data.topics import topics

    seen: dict[str, None] = {}
    for key in sorted(topics):
        text = re.sub(r"\s+", " ", topics[key])
        for s in re.split(r"(?<=[a-z]\.) (?=[A-Z])", text):
            if 5 <= len(s.split()) <= 60 and s not in exclude:
                seen.setdefault(s)
    if len(seen) < n:
        raise SystemExit(f"only {len(seen)} pydoc sentences, {n} asked")
    return list(seen)[:n]


def batches(sentences: list[str]) -> list[tuple]:
    ids, mask = tokenize(sentences, SEQ)
    return [(ids[i:i + BATCH], mask[i:i + BATCH]) for i in range(0, len(sentences), BATCH)]


def cosine(g, ref, data) -> float:
    with torch.no_grad():
        return torch.cat([torch.nn.functional.cosine_similarity(g(*b)[0], r, dim=-1)
                          for b, r in zip(data, ref)]).mean().item()


def latency(g, repeat: int) -> float:
    return graphc.compile(g, target="cpu").benchmark(repeat=repeat)["median"]


def layer_latency(rows: int, d_in: int, d_out: int, rank: int, repeat: int) -> tuple:
    """(dense ms, factorized ms) of one linear at `rows` rows, as the pass rewrites it."""
    torch.manual_seed(0)
    g = graphc.trace(torch.nn.Linear(d_in, d_out), (torch.randn(rows, d_in),))
    f = factorize(g, rank=rank, require_saving=False)
    return latency(g, repeat), latency(f, repeat)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--lr", type=float, default=2e-5)
    ap.add_argument("--factors-only", action="store_true", help="train only the factors")
    ap.add_argument("--train", type=int, default=400)
    ap.add_argument("--data", choices=["docstrings", "pydoc"], default="docstrings",
                    help="distillation/calibration text: stdlib docstrings, or pydoc sentences "
                         "that are not evaluation sentences (in-domain)")
    ap.add_argument("--multiple", type=int, default=8, help="ranks are multiples of this")
    ap.add_argument("--calib", type=int, default=16, help="calibration batches")
    ap.add_argument("--ratio", type=float, default=0.75)
    ap.add_argument("--repeat", type=int, default=30)
    ap.add_argument("--skip-latency", action="store_true")
    ap.add_argument("--layer-rows", default=f"{BATCH * SEQ},128",
                    help="row counts at which single layers are timed")
    ap.add_argument("--methods", default="svd,data-aware")
    ap.add_argument("--features", action="store_true",
                    help="also match every factorized layer's output to the teacher's")
    args = ap.parse_args()
    evals = real_sentences(200)
    source = pydoc_sentences if args.data == "pydoc" else doc_sentences
    train = batches(source(set(evals), args.train))
    test = batches(evals)
    enc = encoder()
    g = graphc.trace(enc, test[0])
    with torch.no_grad():
        ref = [enc(*b) for b in test]
    results = {}
    for method in args.methods.split(","):
        t0 = time.perf_counter()
        f = factorize(g, method=method, ratio=args.ratio, include=FFN, exclude=EXCLUDE,
                      calibration=train[:args.calib], multiple=args.multiple)
        rep = f.meta["factorize"]
        print(format_factor_report(rep))
        before = cosine(f, ref, test)
        print(f"{method}: factorized in {time.perf_counter() - t0:.1f} s; FFN params "
              f"{rep['params_after'] / rep['params_before']:.3f}x; mean cosine to fp32 over "
              f"{len(evals)} sentences before fine-tuning {before:.4f}", flush=True)
        results[method] = (f, None, rep)
        if args.epochs == 0:  # --epochs 0: no distillation
            continue
        t0 = time.perf_counter()
        r = graphc.distill(f, g, train, epochs=args.epochs, loss="cosine", lr=args.lr,
                           trainable=["*_weight_in", "*_weight_out"] if args.factors_only
                           else None,
                           features=[r["layer"] for r in rep["layers"]] if args.features
                           else None)
        after = cosine(r.student, ref, test)
        print(f"{method}: distilled {args.epochs} epoch(s) on {args.train} {args.data} sentences "
              f"in {time.perf_counter() - t0:.0f} s (loss {r.curve['loss'][0]:.4f} -> "
              f"{r.curve['loss'][-1]:.4f}); mean cosine after {after:.4f}", flush=True)
        results[method] = (f, r.student, rep)
    if args.skip_latency:
        return
    f, _, rep = results[args.methods.split(",")[-1]]
    dense_ms, fact_ms = latency(g, args.repeat), latency(f, args.repeat)
    print(f"whole model, batch {BATCH} x seq {SEQ}, cpu: {dense_ms:.2f} ms -> {fact_ms:.2f} ms "
          f"({fact_ms / dense_ms:.3f}x)")
    shapes = sorted({(r["params_before"], r["rank"]) for r in rep["layers"]})
    for layer in rep["layers"]:
        print(f"  {layer['layer']}: rank {layer['rank']}")
    for rows in (int(r) for r in args.layer_rows.split(",")):
        for d_in, d_out in ((384, 1536), (1536, 384)):
            for rank in sorted({r for p, r in shapes}):
                d, fct = layer_latency(rows, d_in, d_out, rank, args.repeat)
                print(f"layer {d_in}->{d_out} rank {rank}, {rows} rows: {d:.3f} ms -> "
                      f"{fct:.3f} ms ({fct / d:.3f}x)", flush=True)


if __name__ == "__main__":
    main()
