"""Issue 6's ResNet-18 measurement: prune 50% of the channels of every prunable group of the
ResNet-18 layout (benchmarks/models.py, random weights, batch 1, 224x224), check that the
pruned graph gives the same outputs in PyTorch and compiled for this CPU, and time the
compiled pruned model against the compiled unpruned one (interleaved A/B, medians).

    PYTHONPATH=. flock /tmp/graphc-bench.lock python tools/prune_resnet.py [--rounds 15]
    PYTHONPATH=. flock /tmp/graphc-bench.lock python tools/prune_resnet.py --model digits

--model digits does the same for the sklearn-digits CNN of tests/test_qat.py (batch 40),
pruned and then distilled 3 epochs against the unpruned graph, and prints both accuracies.

Both graphs get fold-batchnorm after pruning, so the comparison is between the models a user
deploys. Random weights: this measures speed and numerics, not accuracy.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

import graphc
from benchmarks.models import resnet18
from graphc.passes.prune_groups import find_groups, format_groups
from graphc.passes.prune_slice import format_prune_report
from graphc.passes.prune_structured import prune_channels


def timed(cm, native, calls: int) -> float:
    """Median ms of `calls` runs after one untimed run (the steady state)."""
    cm.runner.run(native)
    samples = []
    for _ in range(calls):
        t = time.perf_counter()
        cm.runner.run(native)
        samples.append((time.perf_counter() - t) * 1e3)
    return statistics.median(samples)


def digits(sparsity: float, round_to: int):
    from tests.test_qat import _accuracy, _train_digits

    g, train, test = _train_digits()
    p = prune_channels(g, sparsity=sparsity, round_to=round_to)
    s = graphc.distill(p, g, train, epochs=3, lr=3e-3, progress=False).student
    s.meta["prune"] = p.meta["prune"]
    print(f"digits accuracy (360 held-out): unpruned {_accuracy(g, test):.2f}, pruned "
          f"{_accuracy(p, test):.2f}, pruned + distilled {_accuracy(s, test):.2f}")
    return g, s, g.example_inputs


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--round-to", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--calls", type=int, default=5)
    ap.add_argument("--groups", action="store_true", help="print the dependency groups")
    ap.add_argument("--model", choices=["resnet18", "digits"], default="resnet18")
    args = ap.parse_args()

    if args.model == "digits":
        g, p, x = digits(args.sparsity, args.round_to)
    else:
        case = resnet18()
        g, x = graphc.trace(case.model, case.inputs, name="resnet18"), case.inputs
        p = prune_channels(g, sparsity=args.sparsity, round_to=args.round_to)
    if args.groups:
        print(format_groups(find_groups(g)))
    print(format_prune_report(p.meta["prune"]))
    base, pruned = (graphc.run_pipeline(x, "fold-batchnorm")[0] for x in (g, p))
    cms = {"unpruned": graphc.compile(base, target="cpu"),
           "pruned": graphc.compile(pruned, target="cpu")}

    with torch.no_grad():
        ref = p(*x)[0]
    got = torch.as_tensor(np.asarray(cms["pruned"](*x)))
    err = float((got - ref).abs().max() / ref.abs().max())
    print(f"pruned graph, TVM vs PyTorch: max |diff| / max |y| = {err:.2e}")

    natives = {k: cm.runner.convert([t for t in x]) for k, cm in cms.items()}
    times: dict[str, list[float]] = {k: [] for k in cms}
    for r in range(args.rounds):  # interleaved, alternating which goes first
        for k in (list(cms) if r % 2 == 0 else list(cms)[::-1]):
            times[k].append(timed(cms[k], natives[k], args.calls))
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"cpu latency (median of {args.rounds} interleaved rounds x {args.calls} calls): "
          f"unpruned {med['unpruned']:.2f} ms, pruned {med['pruned']:.2f} ms, "
          f"ratio {med['pruned'] / med['unpruned']:.3f}x")
    assert err < 1e-4, "TVM and PyTorch disagree on the pruned graph"


if __name__ == "__main__":
    main()
