"""Run a graphc TVM artifact with tvm + numpy only: no graphc, no torch (boards rarely have them).

graphc's save() puts this file into every TVM artifact as __main__.py, so the artifact itself
is the program (Python runs a zip's __main__.py):

    python3 model.graphc --inputs x.npz --save-outputs y.npz     # on the device
    python3 model.graphc --repeat 50 --threads 4                  # latency on random inputs

--inputs: one array per input name (the names in meta.json; `graphc inspect` prints them);
without it, seeded random inputs (normal floats, integers 0..7). --save-outputs writes one
array per output name. --job ARTIFACT INPUTS OUTPUTS (repeatable) runs several artifacts in
one process: importing tvm takes seconds under emulation (qemu-user), once is enough.

Before loading lib.so (dlopen runs code), every member is checked against the SHA-256 sums
meta.json records, as graphc.load does: a corrupt or edited artifact is refused, nothing of it
runs. That detects accidents, not malice (sums can be recomputed): run trusted artifacts only.

Needs `pip install apache-tvm numpy` (the TVM version the model was compiled with; only TVM's
runtime library is loaded). Keep this file standard library + numpy + tvm.runtime.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import lzma
import os
import sys
import tempfile
import time
import zipfile
import zlib
from pathlib import Path

INIT = "graphc_init"  # the executable's load-time function (graphc's decode_once.INIT)
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

    meta, members = _meta(artifact)
    vm = VirtualMachine(_load_lib(members, tvm), tvm.cpu())
    if vm.module.implements_function(INIT):
        vm[INIT]()  # shared / sparse weights: decoded once, at load (decode_once.py)
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


def _meta(artifact: Path) -> tuple[dict, dict[str, bytes]]:
    """meta.json and the other members, all checked against their SHA-256 sums."""
    members = _members(artifact)
    if "meta.json" not in members:
        sys.exit(f"board_runner: {artifact} is not a graphc artifact (no meta.json)")
    try:
        meta = json.loads(members.pop("meta.json"))
    except ValueError as e:
        sys.exit(f"board_runner: {artifact}: meta.json is corrupt ({e})")
    _verify(artifact, meta, members)
    if meta.get("backend") != "tvm":
        sys.exit(f"board_runner: {artifact} was built by the {meta.get('backend')} backend; "
                 "only TVM artifacts run without graphc")
    return meta, members


def _members(artifact: Path) -> dict[str, bytes]:
    """Every file of the artifact (a zip, or its unzipped folder) by its member name."""
    try:
        if artifact.is_dir():
            return {f.relative_to(artifact).as_posix(): f.read_bytes()
                    for f in sorted(artifact.rglob("*")) if f.is_file()}
        with zipfile.ZipFile(artifact) as zf:
            names = zf.namelist()
            if len(set(names)) != len(names):
                sys.exit(f"board_runner: {artifact}: a member name appears twice")
            return {n: zf.read(n) for n in names if not n.endswith("/")}
    except (zipfile.BadZipFile, zlib.error, lzma.LZMAError, OSError, EOFError) as e:
        sys.exit(f"board_runner: {artifact} is not a graphc artifact or is corrupt ({e})")


def _verify(artifact: Path, meta: dict, members: dict[str, bytes]) -> None:
    """The checks graphc.load makes (graphc/compiled.py): sums of meta.json and of every
    member, none added or removed. Exits before anything of the artifact is loaded."""
    integrity = meta.get("integrity")
    if not isinstance(integrity, dict) or not isinstance(integrity.get("members"), dict):
        sys.exit(f"board_runner: {artifact}: meta.json has no integrity record "
                 f"(artifact version {meta.get('version')}): recompile with this graphc")
    rest = {k: v for k, v in integrity.items() if k != "meta.json"}
    own = json.dumps({**meta, "integrity": rest}, sort_keys=True).encode()
    if integrity.get("meta.json") != hashlib.sha256(own).hexdigest():
        sys.exit(f"board_runner: {artifact}: member 'meta.json' fails its SHA-256 check")
    expected = integrity["members"]
    extra, missing = sorted(set(members) - set(expected)), sorted(set(expected) - set(members))
    if extra or missing:
        sys.exit(f"board_runner: {artifact}: members added {extra}, missing {missing}")
    for name, data in members.items():
        if hashlib.sha256(data).hexdigest() != expected[name]:
            sys.exit(f"board_runner: {artifact}: member {name!r} fails its SHA-256 check "
                     "(corrupt or edited); not loaded")


def _load_lib(members: dict[str, bytes], tvm):
    """The artifact's verified runner/lib.so, loaded. dlopen needs a file: the bytes checked
    by _verify (not the file again) go to a temporary folder, removed once loaded."""
    with tempfile.TemporaryDirectory(prefix="graphc-") as tmp:
        lib = Path(tmp) / "lib.so"
        lib.write_bytes(members["runner/lib.so"])
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
