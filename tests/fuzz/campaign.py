"""A long fuzz campaign that keeps going after a failure and counts what it ran.

    PYTHONPATH=. python -m tests.fuzz.campaign --examples 2000 --seed 1 --out fuzz-log/

pytest (tests/fuzz/test_fuzz.py with GRAPHC_FUZZ_EXAMPLES) stops at the first failure and
shrinks it; this runner instead records every distinct failure (first line of the message
as the key, the full message with the program for the first occurrence) and prints, at the
end and every --every examples, how many graphs ran, how many passes changed them, how
many TVM compiles agreed and which refusals were met. Failures go to OUT/failures.txt.
"""

from __future__ import annotations

import argparse
import collections
import json
import time
import traceback
from pathlib import Path

from hypothesis import HealthCheck, given, settings

from tests.fuzz.check import check_exact
from tests.fuzz.gen import describe, programs
from tests.fuzz.lossy import check_lossy

LOSSY_KINDS = ("linear", "conv2d", "matmul", "unary", "binary", "batchnorm", "embedding",
               "layout", "reduce", "pool", "concat")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--mode", choices=["exact", "lossy"], default="exact")
    ap.add_argument("--max-ops", type=int, default=8)
    ap.add_argument("--no-tvm", action="store_true")
    ap.add_argument("--every", type=int, default=50)
    ap.add_argument("--out", default="fuzz-log")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stats = {"graphs": 0, "failures": collections.Counter(), "coverage": collections.Counter(),
             "t0": time.time()}
    strategy = (programs(max_ops=args.max_ops) if args.mode == "exact"
                else programs(max_ops=args.max_ops, kinds=LOSSY_KINDS))
    check = check_exact if args.mode == "exact" else check_lossy

    @settings(max_examples=args.examples, deadline=None, database=None,
              phases=["generate"], suppress_health_check=list(HealthCheck))
    @given(strategy)
    def run(prog):
        stats["graphs"] += 1
        try:
            for k, v in check(prog, tvm=not args.no_tvm).items():
                stats["coverage"][f"{k}: {v}" if isinstance(v, str) else k] += bool(v)
        except Exception as e:  # noqa: BLE001  (every failure is recorded, none stops the run)
            key = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
            if not stats["failures"][key]:
                with open(out / "failures.txt", "a") as f:
                    f.write(f"=== {key}\n{e}\n{describe(prog)}\n{traceback.format_exc()}\n")
            stats["failures"][key] += 1
        if stats["graphs"] % args.every == 0:
            _summary(stats, out)

    run._hypothesis_internal_use_seed = args.seed  # a reproducible campaign per seed
    run()
    _summary(stats, out)


def _summary(stats, out: Path):
    s = {"graphs": stats["graphs"], "seconds": round(time.time() - stats["t0"]),
         "failures": dict(stats["failures"]), "coverage": dict(stats["coverage"])}
    (out / "summary.json").write_text(json.dumps(s, indent=1))
    print(json.dumps(s), flush=True)


if __name__ == "__main__":
    main()
