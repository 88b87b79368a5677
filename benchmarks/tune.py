"""Tune the benchmark models into one database, then benchmark with it:

    python benchmarks/tune.py --db /tmp/graphc-db --trials resnet18=400 mobilenet_v2=600
    python benchmarks/run.py --tuned-db /tmp/graphc-db

Each model is compiled exactly as benchmarks/run.py compiles its `graphc` variant (same
passes, same inputs), with `tune=N`: MetaSchedule searches N candidates over the model's
kernels and stores them, plus each kernel's default-rule schedule, in the database. The
wall-clock seconds per model and in total are printed and written to `--json`, since the
issue's budget is "under 30 minutes on 2 cores for the three models together".
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.measure import PASSES
from benchmarks.models import MODELS


def _budgets(items: list[str]) -> dict[str, int]:
    out = {}
    for item in items:
        name, sep, n = item.partition("=")
        if not sep or name not in MODELS or not n.isdigit():
            raise SystemExit(f"--trials {item!r}: expected MODEL=N with MODEL in {list(MODELS)}")
        out[name] = int(n)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--db", required=True, help="tuning database folder (created if missing)")
    p.add_argument("--trials", nargs="+", required=True, metavar="MODEL=N")
    p.add_argument("--json", default="-", help="write the timings here ('-': do not)")
    args = p.parse_args()

    import graphc

    rows, start = [], time.perf_counter()
    for name, trials in _budgets(args.trials).items():
        case = MODELS[name]()
        t0 = time.perf_counter()
        cm = graphc.compile(case.model, case.inputs, target="cpu", passes=PASSES,
                            tuning_db=args.db, tune=trials)
        tuning = cm.meta.get("tvm", {}).get("tuning", {})
        rows.append({"model": name, "trials": trials, "seconds": time.perf_counter() - t0,
                     "tasks": len(tuning.get("tasks", [])),
                     "applied": len(tuning.get("applied", []))})
        print(f"{name}: {trials} trials over {rows[-1]['tasks']} kernels in "
              f"{rows[-1]['seconds']:.0f} s; {rows[-1]['applied']} kernels use a record",
              flush=True)
    total = time.perf_counter() - start
    print(f"total {total:.0f} s ({total / 60:.1f} min)")
    if args.json != "-":
        Path(args.json).write_text(json.dumps({"db": args.db, "models": rows,
                                               "total_seconds": total}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
