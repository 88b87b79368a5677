"""Side-by-side CPU benchmark: PyTorch eager, onnxruntime fp32 and int8, graphc untuned/tuned.

    python benchmarks/run.py [--models resnet18 mobilenet_v2 minilm_l6] [--tuned-db DIR]
                             [--repeat N] [--json out.json]

One process per run; for each model every variant is prepared, checked against PyTorch and
then timed interleaved (measure.py). Prints a table and writes JSON (default
benchmarks/results/latest.json). See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from benchmarks import measure
from benchmarks.models import MODELS

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_JSON = ROOT / "benchmarks" / "results" / "latest.json"
VARIANTS = ("torch", "ort-fp32", "ort-int8", "graphc", "graphc-tuned", "graphc-int8")
BASELINE = "ort-fp32"


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    results = {"meta": _meta(args), "models": []}
    for name in args.models:
        print(f"[{time.strftime('%H:%M:%S')}] {name}: preparing", file=sys.stderr, flush=True)
        results["models"].append(bench_model(name, args))
    results["geomean_vs_" + BASELINE.replace("-", "_")] = _geomeans(results["models"])
    print_table(results)
    if args.json != "-":
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=1) + "\n")
        print(f"wrote {out}")
    return 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", choices=sorted(MODELS), default=list(MODELS))
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    p.add_argument("--tuned-db", metavar="DIR", help="tuning database for 'graphc-tuned' "
                   "(default: $GRAPHC_TUNING_DB or ~/.cache/graphc/tuning, when it has "
                   "records for the model's kernels)")
    p.add_argument("--repeat", type=int, default=20, help="timed rounds per model (default 20)")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls per variant first")
    p.add_argument("--budget-s", type=float, default=90.0,
                   help="stop a model's rounds after this many seconds (at least 3 rounds)")
    p.add_argument("--visit-warmup", type=int, default=1,
                   help="untimed calls each time a variant's turn comes (wakes its threads)")
    p.add_argument("--visit-calls", type=int, default=3,
                   help="timed calls each time a variant's turn comes")
    p.add_argument("--gap-ms", type=float, default=200.0,
                   help="pause before each timed call (lets other runtimes' threads idle)")
    p.add_argument("--json", default=str(DEFAULT_JSON), help="output JSON path ('-': none)")
    return p


def bench_model(name: str, args) -> dict:
    case = MODELS[name]()
    want = set(args.variants)
    variants: list[measure.Variant] = []
    failed: dict[str, str] = {}
    skipped: dict[str, str] = {}
    with torch.no_grad():
        reference = measure._flat(case.model(*case.inputs))

    def add(variant_name: str, make):
        try:
            variant = make()
        except Exception as e:  # noqa: BLE001  (a failing variant is reported, not fatal)
            failed[variant_name] = f"{type(e).__name__}: {str(e)[:400]}"
            print(f"  {variant_name} failed: {failed[variant_name]}", file=sys.stderr)
            return None
        if variant is not None:
            variants.append(variant)
        return variant

    with tempfile.TemporaryDirectory(prefix="graphc-bench-") as tmp, measure.empty_db() as nodb:
        tmp = Path(tmp)
        if "torch" in want:
            add("torch", lambda: measure.torch_eager(case))
        exported: dict[str, Path] = {}

        def make_fp32():
            variant, exported["path"] = measure.ort_fp32(case, tmp)
            return variant if "ort-fp32" in want else None  # int8 alone still needs the export

        if want & {"ort-fp32", "ort-int8"}:
            add("ort-fp32", make_fp32)
        fp32_path = exported.get("path")
        if "ort-int8" in want and fp32_path is not None:
            add("ort-int8", lambda: measure.ort_int8(case, fp32_path, tmp))
        if "graphc" in want:
            add("graphc", lambda: measure.graphc_variant(case, "graphc", nodb, tmp))
        if "graphc-tuned" in want:
            db = _tuned_db(args)
            if db is None:
                skipped["graphc-tuned"] = "no tuning database (--tuned-db or the default)"
            else:
                tuned = add("graphc-tuned", lambda: measure.graphc_variant(
                    case, "graphc-tuned", db, tmp))
                if tuned is not None and not tuned.prepare.get("tuned_kernels"):
                    variants.remove(tuned)
                    skipped["graphc-tuned"] = f"{db} has no records for this model's kernels"
        if "graphc-int8" in want:
            add("graphc-int8", lambda: measure.graphc_variant(case, "graphc-int8", nodb, tmp,
                                                              int8=True))
        if case.quality is not None:
            for v in variants:
                if v.run is not None:
                    v.quality = case.quality(v.run)
        print(f"[{time.strftime('%H:%M:%S')}] {name}: timing {[v.name for v in variants]}",
              file=sys.stderr, flush=True)
        measure.check(variants, reference)
        load: dict = {}
        with measure.other_load(load):
            rounds = measure.interleave(variants, repeat=args.repeat, warmup=args.warmup,
                                        budget_s=args.budget_s, gap_s=args.gap_ms / 1e3,
                                        visit_warmup=args.visit_warmup,
                                        visit_calls=args.visit_calls)
    rows = [{"variant": v.name, **v.stats(), "max_rel_err_vs_torch": v.max_rel_err,
             "prepare": v.prepare, "note": v.note, "artifact_bytes": v.artifact_bytes,
             "quality": v.quality, "samples_ms": [round(s, 4) for s in
                                                                   v.samples_ms]}
            for v in variants]
    base = next((r["median_ms"] for r in rows if r["variant"] == BASELINE), None)
    for r in rows:
        r["ratio_vs_" + BASELINE.replace("-", "_")] = r["median_ms"] / base if base else None
    return {"name": name, "about": case.about, "rounds": rounds, "variants": rows,
            "failed": failed, "skipped": skipped, "load_while_timing": load}


def _tuned_db(args) -> str | None:
    if args.tuned_db:
        return args.tuned_db
    root = Path(os.environ.get("GRAPHC_TUNING_DB") or "~/.cache/graphc/tuning").expanduser()
    return str(root) if root.is_dir() and any(root.rglob("database_tuning_record.json")) else None


def _geomeans(models: list[dict]) -> dict:
    key = "ratio_vs_" + BASELINE.replace("-", "_")
    out = {}
    for variant in VARIANTS:
        ratios = [r[key] for m in models for r in m["variants"]
                  if r["variant"] == variant and r.get(key)]
        if ratios:
            out[variant] = {"geomean": measure.geomean(ratios), "models": len(ratios)}
    return out


def _meta(args) -> dict:
    import onnxruntime
    import tvm

    cpu = next((line.split(":", 1)[1].strip() for line in
                Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "command": " ".join(sys.argv),
            "cpu": cpu, "cores": measure.CORES, "host_cpu_llvm": tvm.target.codegen.
            llvm_get_system_cpu(), "python": platform.python_version(),
            "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
            "tvm": tvm.__version__, "graphc_commit": _git("rev-parse", "--short", "HEAD"),
            "graphc_dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
            "TVM_NUM_THREADS": os.environ.get("TVM_NUM_THREADS"), "passes": measure.PASSES,
            "repeat": args.repeat, "warmup": args.warmup, "budget_s": args.budget_s,
            "gap_ms": args.gap_ms, "visit_warmup": args.visit_warmup,
            "visit_calls": args.visit_calls,
            "memory": "prepare peak RSS = the process's VmHWM during export/quantize/compile, "
                      "reset before each (/proc/self/clear_refs); growth = peak - RSS before"}


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True,
                              check=False).stdout.strip()
    except OSError:
        return ""


def print_table(results: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    key = "ratio_vs_" + BASELINE.replace("-", "_")
    meta = results["meta"]
    table = Table(title=f"graphc side by side: {meta['cpu']}, {meta['cores']} cores, "
                        f"graphc {meta['graphc_commit']}{' (dirty)' if meta['graphc_dirty'] else ''}")
    for col, just in (("model", "left"), ("variant", "left"), ("median ms", "right"),
                      ("p25-p75 ms", "right"), ("min ms", "right"),
                      ("1st call ms", "right"), ("x ORT fp32", "right"),
                      ("max rel err", "right"), ("quality", "right"), ("artifact MB", "right"),
                      ("prepare s", "right"),
                      ("prep. peak RSS MiB (+growth)", "right")):
        table.add_column(col, justify=just)
    for m in results["models"]:
        for i, r in enumerate(m["variants"]):
            prep = r["prepare"]
            rss = (f"{prep['peak_rss_mib']:.0f} ({prep.get('rss_growth_mib', 0):+.0f})"
                   if "peak_rss_mib" in prep else "")
            table.add_row(m["name"] if i == 0 else "", r["variant"], f"{r['median_ms']:.2f}",
                          f"{r['p25_ms']:.2f}-{r['p75_ms']:.2f}", f"{r['min_ms']:.2f}",
                          f"{r['first_call_median_ms']:.2f}" if "first_call_median_ms" in r
                          else "",
                          f"{r[key]:.2f}" if r.get(key) else "-",
                          f"{r['max_rel_err_vs_torch']:.1e}",
                          f"{r['quality']['mean']:.4f}" if r.get("quality") else "",
                          f"{r['artifact_bytes'] / 2**20:.1f}" if r.get("artifact_bytes") else "",
                          f"{prep['seconds']:.1f}" if "seconds" in prep else "", rss)
        for v, why in {**m["failed"], **m["skipped"]}.items():
            table.add_row("", v, "-", "", "", "", "", "", "", "", "", why[:60])
        table.add_section()
    console = Console(width=160)
    console.print(table)
    for variant, g in results[f"geomean_vs_{BASELINE.replace('-', '_')}"].items():
        console.print(f"geomean latency ratio {variant} / ORT fp32: {g['geomean']:.2f} "
                      f"over {g['models']} model(s)")
    for m in results["models"]:
        load = m.get("load_while_timing", {})
        if load.get("other_processes_cpu_fraction", 0) > 0.1:
            console.print(f"[bold red]{m['name']}: other processes used "
                          f"{load['other_processes_cpu_fraction']:.0%} of the CPUs while timing: "
                          "numbers are disturbed (PyTorch's spinning OpenMP threads most)")
    console.print(f"rounds per model: {', '.join(str(m['rounds']) for m in results['models'])}; "
                  "max rel err = max|out - torch| / max|torch| (worst output); quality = "
                  "mean cosine of sentence embeddings to PyTorch fp32 over 200 real sentences "
                  "(MiniLM); prepare = ONNX "
                  "export + session (ORT), quantize + session (int8), graphc.compile (graphc); "
                  + meta["memory"])


if __name__ == "__main__":
    sys.exit(main())
