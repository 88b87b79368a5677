"""The `graphc` command: compile, tune, inspect, passes, run, demo.

    graphc compile model.onnx --target cpu --passes "fold-batchnorm" --dump-ir ir/ -o m.graphc
    graphc tune model.onnx --trials 256 [--db DIR]     (MetaSchedule; later compiles reuse it)
    graphc inspect model.onnx        graphc passes        graphc run m.graphc        graphc demo
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from graphc.errors import GraphcError


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except GraphcError as e:
        print(f"graphc: error: {e}", file=sys.stderr)
        return 2


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="graphc", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(required=True, metavar="COMMAND")
    c = sub.add_parser("compile", help="compile an ONNX model into a .graphc artifact")
    c.add_argument("model", help="path to an .onnx file")
    c.add_argument("--target", default="cpu", help="cpu, x86, torch, or a TVM target JSON")
    c.add_argument("--passes", default="", help='pipeline, e.g. "fold-batchnorm, constant-folding"')
    c.add_argument("--dump-ir", metavar="DIR", help="write numbered IR dumps of every stage")
    c.add_argument("--input-shape", action="append", default=[], metavar="NAME=D0,D1,...",
                   help="static shape for an input with dynamic dims (repeatable)")
    c.add_argument("--verify", action="store_true", help="check the IR after every pass")
    c.add_argument("--tune", type=int, default=0, metavar="N",
                   help="search N schedule candidates with MetaSchedule first (default 0)")
    c.add_argument("--tuning-db", metavar="DIR", help="tuning database folder "
                   "(default $GRAPHC_TUNING_DB or ~/.cache/graphc/tuning)")
    c.add_argument("-o", "--output", required=True, help="artifact path (.graphc)")
    c.set_defaults(func=_compile)
    t = sub.add_parser("tune", help="search kernel schedules (MetaSchedule) into the tuning "
                       "database that every later compile applies")
    t.add_argument("model", help="path to an .onnx file")
    t.add_argument("--trials", type=int, required=True, metavar="N",
                   help="candidates to measure, over all the model's kernels")
    t.add_argument("--db", metavar="DIR", help="tuning database folder "
                   "(default $GRAPHC_TUNING_DB or ~/.cache/graphc/tuning)")
    t.add_argument("--target", default="cpu", help="cpu, x86, or a TVM target JSON")
    t.add_argument("--passes", default="", help="the pipeline the model will be compiled with "
                   "(passes change the kernels)")
    t.add_argument("--input-shape", action="append", default=[], metavar="NAME=D0,D1,...")
    t.add_argument("-o", "--output", help="also write the tuned artifact (.graphc)")
    t.set_defaults(func=_tune)
    i = sub.add_parser("inspect", help="op histogram, parameters and specs of a model")
    i.add_argument("model")
    i.add_argument("--input-shape", action="append", default=[], metavar="NAME=D0,D1,...")
    i.add_argument("--print-ir", action="store_true", help="also print the traced IR")
    i.set_defaults(func=_inspect)
    ps = sub.add_parser("passes", help="list registered passes with options and docs")
    ps.set_defaults(func=_passes)
    r = sub.add_parser("run", help="run a .graphc artifact on seeded random inputs")
    r.add_argument("artifact")
    r.add_argument("--inputs", help=".npz with one array per input name (default: random)")
    r.add_argument("--save-outputs", metavar="NPZ", help="write the outputs to an .npz")
    r.add_argument("--repeat", type=int, default=20, help="timed runs for the latency")
    r.add_argument("--threads", type=int, metavar="N", help="kernel threads (default: all cores)")
    r.set_defaults(func=_run)
    d = sub.add_parser("demo", help="compile a small built-in CNN and show what each pass did")
    d.add_argument("--target", default="cpu")
    d.set_defaults(func=_demo)
    return p


def _shapes(items: list[str]) -> dict[str, tuple[int, ...]] | None:
    out = {}
    for item in items:
        name, eq, dims = item.partition("=")
        try:
            out[name] = tuple(int(d) for d in dims.split(","))
        except ValueError:
            raise GraphcError(f"--input-shape '{item}': expected NAME=D0,D1,...") from None
        if not eq:
            raise GraphcError(f"--input-shape '{item}': expected NAME=D0,D1,...")
    return out or None


def _compile(args) -> None:
    import graphc

    cm = graphc.compile(args.model, target=args.target, passes=args.passes,
                        dump_ir=args.dump_ir, verify=args.verify,
                        input_shapes=_shapes(args.input_shape), tune=args.tune,
                        tuning_db=args.tuning_db)
    print(cm.report())
    cm.save(args.output)
    print(f"wrote {args.output}" + (f"; IR dumps in {args.dump_ir}/" if args.dump_ir else ""))


def _tune(args) -> None:
    import graphc

    if args.trials < 1:
        raise GraphcError("graphc tune: --trials must be at least 1")
    cm = graphc.compile(args.model, target=args.target, passes=args.passes,
                        input_shapes=_shapes(args.input_shape), tune=args.trials,
                        tuning_db=args.db)
    t = cm.meta["tvm"]["tuning"]
    print(f"tuned {len(t['tasks'])} kernel(s) with {t['trials']} trials in "
          f"{t['search_seconds']:.1f} s (cost model {t['cost_model']}); "
          f"{len(t['applied'])} kernel(s) now scheduled from the database")
    print(f"database: {t['db']} ({t['records']} records)")
    if args.output:
        cm.save(args.output)
        print(f"wrote {args.output}")


def _inspect(args) -> None:
    import graphc
    from graphc.report import inspect_text

    g = graphc.trace(args.model, input_shapes=_shapes(args.input_shape))
    print(inspect_text(g, source=args.model))
    if args.print_ir:
        print(g)


def _passes(args) -> None:
    from graphc.pass_manager import PASSES

    for name in sorted(PASSES):
        info = PASSES[name]
        print(info.signature())
        for line in info.doc.splitlines():
            print(f"    {line}")
        print()


def _run(args) -> None:
    import graphc

    cm = graphc.load(args.artifact)
    if args.threads is not None:
        cm.num_threads = args.threads
    if args.inputs:
        data = np.load(args.inputs)
        inputs = [data[s.name] for s in cm.input_specs]
    else:
        inputs = [s.example(seed=i).numpy() for i, s in enumerate(cm.input_specs)]
    outs = cm(*inputs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    for spec, o in zip(cm.output_specs, outs):
        print(f"{spec}: mean {o.mean():.6g}, std {o.std():.6g}, first {o.ravel()[:4].tolist()}")
    stats = cm.benchmark(repeat=args.repeat)
    print(f"latency: median {stats['median']:.3f} ms over {args.repeat} runs ({cm.target})")
    if args.save_outputs:
        np.savez(args.save_outputs, **{s.name: o for s, o in zip(cm.output_specs, outs)})


def _demo(args) -> None:
    from graphc.demo import run_demo

    run_demo(target=args.target)


if __name__ == "__main__":
    sys.exit(main())
