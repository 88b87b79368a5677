"""Run a graphc TVM artifact with tvm + numpy only: no graphc, no torch (boards rarely have them).

graphc's save() puts this file into every TVM artifact as __main__.py, so the artifact itself
is the program (Python runs a zip's __main__.py):

    python3 model.graphc --inputs x.npz --save-outputs y.npz     # on the device
    python3 model.graphc --repeat 50 --threads 4                  # latency on random inputs

--inputs: one array per input name (the names in meta.json; `graphc inspect` prints them);
without it, seeded random inputs (normal floats, integers 0..7). --save-outputs writes one
array per output name. --job ARTIFACT INPUTS OUTPUTS (repeatable) runs several artifacts in
one process: importing tvm takes seconds under emulation (qemu-user), once is enough.

Needs `pip install apache-tvm numpy` (the TVM version the model was compiled with; only TVM's
runtime library is loaded). Keep this file standard library + numpy + tvm.runtime.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import zipfile
from pathlib import Path

# graphc's short dtype names (graphc/spec.py) -> numpy's
DTYPES = {"f32": "float32", "f16": "float16", "f64": "float64", "i64": "int64", "i32": "int32",
          "i16": "int16", "i8": "int8", "u8": "uint8", "bool": "bool"}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.threads:
        os.environ["TVM_NUM_THREADS"] = str(args.threads)  # read when TVM's pool starts
    # The compiler library (LLVM, ~240 MB) is not needed to run a built model.
    os.environ.setdefault("TVM_USE_RUNTIME_LIB", "1")
    jobs = args.job or [(args.artifact or _own_zip(), args.inputs, args.save_outputs)]
    for artifact, inputs, outputs in jobs:
        run_one(Path(artifact), inputs, outputs, args.repeat)
    return 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python3 model.graphc", description=__doc__.split("\n")[0])
    p.add_argument("artifact", nargs="?", help="a .graphc file or its unzipped folder "
                   "(default: the artifact this script is inside)")
    p.add_argument("--inputs", help=".npz with one array per input name (default: random)")
    p.add_argument("--save-outputs", metavar="NPZ", help="write the outputs to an .npz")
    p.add_argument("--repeat", type=int, default=0, help="timed runs for the latency (0: none)")
    p.add_argument("--threads", type=int, help="kernel threads (default: TVM_NUM_THREADS)")
    p.add_argument("--job", nargs=3, action="append", metavar=("ARTIFACT", "INPUTS", "OUTPUTS"),
                   help="run ARTIFACT on INPUTS (.npz), write OUTPUTS (.npz); repeatable")
    return p


def _own_zip() -> str:
    here = Path(__file__).parent  # inside a zip, __file__ is "model.graphc/__main__.py"
    if not zipfile.is_zipfile(here):
        sys.exit("board_runner: name the artifact: python3 board_runner.py model.graphc")
    return str(here)


def run_one(artifact: Path, inputs: str | None, outputs: str | None, repeat: int) -> None:
    import numpy as np
    import tvm
    from tvm.runtime.vm import VirtualMachine

    meta = _meta(artifact)
    vm = VirtualMachine(_load_lib(artifact, tvm), tvm.cpu())
    main = vm["main"]
    arrays = _inputs(meta["input_specs"], inputs)
    args = [tvm.runtime.tensor(np.ascontiguousarray(a)) for a in arrays]
    start = time.perf_counter()
    result = main(*args)
    first_ms = (time.perf_counter() - start) * 1e3
    # main returns a tuple of tensors (graphc keeps the outputs flat), or one tensor
    outs = [t.numpy() for t in ([result] if isinstance(result, tvm.runtime.Tensor) else result)]
    names = [s["name"] for s in meta["output_specs"]]
    print(f"{artifact.name}: {meta['target']}; first run {first_ms:.1f} ms")
    for name, o in zip(names, outs):
        print(f"  {name}: {o.dtype}{list(o.shape)} mean {o.mean():.6g} std {o.std():.6g}")
    if outputs:
        np.savez(outputs, **dict(zip(names, outs)))
    if repeat > 0:
        print(f"  latency: median {_median_ms(main, args, repeat):.3f} ms over {repeat} runs")


def _meta(artifact: Path) -> dict:
    if artifact.is_dir():
        meta = json.loads((artifact / "meta.json").read_text())
    else:
        with zipfile.ZipFile(artifact) as zf:
            meta = json.loads(zf.read("meta.json"))
    if meta.get("backend") != "tvm":
        sys.exit(f"board_runner: {artifact} was built by the {meta.get('backend')} backend; "
                 "only TVM artifacts run without graphc")
    return meta


def _load_lib(artifact: Path, tvm):
    """The artifact's runner/lib.so, loaded. dlopen needs a file: a zip's copy goes to a
    temporary folder, removed once loaded (the mapping outlives the file)."""
    if artifact.is_dir():
        return tvm.runtime.load_module(str(artifact / "runner" / "lib.so"))
    with tempfile.TemporaryDirectory(prefix="graphc-") as tmp, zipfile.ZipFile(artifact) as zf:
        lib = Path(tmp) / "lib.so"
        lib.write_bytes(zf.read("runner/lib.so"))
        return tvm.runtime.load_module(str(lib))


def _inputs(specs: list[dict], path: str | None) -> list:
    import numpy as np

    if path is None:
        return [_random(s, seed=i) for i, s in enumerate(specs)]
    data = np.load(path)
    missing = [s["name"] for s in specs if s["name"] not in data]
    if missing:
        sys.exit(f"board_runner: {path} lacks inputs {missing} (has {sorted(data)})")
    arrays = [data[s["name"]] for s in specs]
    for s, a in zip(specs, arrays):
        want = (tuple(s["shape"]), DTYPES.get(s["dtype"], s["dtype"]))
        if (a.shape, str(a.dtype)) != want:
            sys.exit(f"board_runner: input {s['name']!r} is {a.dtype}{list(a.shape)}, the model "
                     f"was compiled for {want[1]}{list(want[0])}")
    return arrays


def _random(spec: dict, seed: int):
    import numpy as np

    rng = np.random.default_rng(seed)
    dtype = DTYPES.get(spec["dtype"], spec["dtype"])
    if dtype.startswith("float"):
        return rng.standard_normal(spec["shape"]).astype(dtype)
    return rng.integers(0, 2 if dtype == "bool" else 8, spec["shape"]).astype(dtype)


def _median_ms(main, args, repeat: int) -> float:
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        main(*args)
        samples.append((time.perf_counter() - start) * 1e3)
    return sorted(samples)[len(samples) // 2]


if __name__ == "__main__":
    sys.exit(main())
