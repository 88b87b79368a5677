"""ONNX backend node tests through graphc: pass / wrong result / unsupported / crash counts.

    python tools/onnx_conformance.py --backend tvm --jobs 2 --json out.json
    python tools/onnx_conformance.py --backend torch --check tools/onnx_conformance_expected.txt

The cases are the `expect()` definitions the installed onnx package ships
(onnx.backend.test.case.node); their inputs and outputs are generated in memory, so
the wheel's data directory is not needed. Each case is traced by graphc's ONNX
frontend (graphc.trace) and built for a backend: `tvm` (graphc.compile, target
"cpu"), `torch` (the traced graph run by PyTorch: isolates frontend bugs from TVM's)
or `ort` (onnxruntime on the raw model: a check of this harness, not of graphc).

Ordinary dtypes (the rest are filtered out, with the reason printed): every graph
input and output is a tensor of float32/float64/int8/int16/int32/int64/uint8/bool,
every dtype attribute (Cast's `to`, ...) names one of those, every node is in the
default ONNX domain (no ai.onnx.ml, no training ops), and no node draws random numbers.

graphc compiles for static shapes, so an input that the frontend must know at load
time (a Reshape's shape, a Slice's starts, a TopK's k: the op's `static` inputs in
graphc/frontends/onnx_ops*.py) is made an initializer holding the test's value, as in
an exported model. Such cases are counted ('frozen'); --no-freeze runs them as given.
Cases written for an opset below 13 (which graphc refuses, telling the user to run
onnx.version_converter) are converted to opset 13 first, as that message says; a case
the converter cannot convert stays as it is, and graphc's refusal counts.

Outcomes: pass (shape, dtype and values match, np.testing.assert_allclose with the
case's rtol/atol: 1e-3/1e-7 for all node tests), wrong (any mismatch), unsupported
(graphc refused with one of its own errors, graphc.errors, not caused by a foreign
exception), crash (anything else: a foreign exception, a signal, a timeout). Each case
runs in its own forked process, so a crash or a hang cannot take the run down.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import re
import select
import signal
import sys
import time
import traceback
import warnings
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx.version_converter
from onnx import TensorProto

ORDINARY = {TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.INT8, TensorProto.INT16,
            TensorProto.INT32, TensorProto.INT64, TensorProto.UINT8, TensorProto.BOOL}
RANDOM_OPS = {"Bernoulli", "Multinomial", "RandomNormal", "RandomNormalLike", "RandomUniform",
              "RandomUniformLike"}
_INTEGER = {TensorProto.INT64, TensorProto.INT32}
DTYPE_ATTRS = ("to", "dtype", "output_dtype", "stash_type")
STATUSES = ("pass", "wrong", "unsupported", "crash")


@dataclass
class Case:
    name: str
    op: str  # the op the case tests (an expanded function test: its function's op)
    model: onnx.ModelProto
    inputs: list
    outputs: list
    rtol: float
    atol: float
    frozen: list[str] = field(default_factory=list)
    converted: bool = False  # upgraded to MIN_OPSET with onnx.version_converter


def collect() -> tuple[list[Case], collections.Counter]:
    """All node test cases with ordinary dtypes, and a count of the others by reason."""
    from onnx.backend.test.case import node

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the case definitions overflow casts on purpose
        tests = node.collect_testcases()
    op_of = {t.name: t.model.graph.node[0].op_type for t in tests if len(t.model.graph.node) == 1}
    cases, skipped = [], collections.Counter()
    for t in tests:
        reason = filter_reason(t.model)
        if reason:
            skipped[reason] += 1
            continue
        base = re.sub(r"_expanded(_ver\d+)?$", "", t.name)
        g = t.model.graph
        inputs, outputs = (_as_declared(arrs, vis) for arrs, vis in
                           zip(t.data_sets[0], (g.input, g.output)))
        cases.append(Case(t.name, op_of.get(base, t.model.graph.node[0].op_type), t.model,
                          inputs, outputs, t.rtol, t.atol))
    return cases, skipped


def _as_declared(arrays, value_infos) -> list[np.ndarray]:
    """Test arrays in the graph's declared dtypes (a few cases hold numbers as objects)."""
    out = []
    for arr, vi in zip(arrays, value_infos):
        arr = onnx.numpy_helper.to_array(arr) if isinstance(arr, TensorProto) else arr
        dtype = onnx.helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type)
        out.append(np.asarray(arr).astype(dtype) if np.asarray(arr).dtype == object else arr)
    return out


def _type_reason(tp: onnx.TypeProto) -> str | None:
    kind = tp.WhichOneof("value")
    if kind != "tensor_type":
        return f"{kind or 'untyped'} values"
    return _dtype_reason(tp.tensor_type.elem_type)


def _dtype_reason(elem: int) -> str | None:
    if elem in ORDINARY:
        return None
    name = re.sub(r"^(float[48]|u?int[24]).*", r"\1*", TensorProto.DataType.Name(elem).lower())
    return f"dtype {name}"


def filter_reason(model: onnx.ModelProto) -> str | None:
    """Why a case is outside the ordinary-dtype suite, or None."""
    g = model.graph
    for vi in list(g.input) + list(g.output):
        if r := _type_reason(vi.type):
            return r
    for n in g.node:
        if n.domain not in ("", "ai.onnx"):
            return f"domain {n.domain}"
        if n.op_type in RANDOM_OPS:
            return "random output"
        for a in n.attribute:
            if a.name in DTYPE_ATTRS and a.type == onnx.AttributeProto.INT and (
                    r := _dtype_reason(a.i)):
                return r
            if a.type == onnx.AttributeProto.TENSOR and (r := _dtype_reason(a.t.data_type)):
                return r
    return None


# graphc unrolls loops at load time (graphc/frontends/onnx_control.py): a Loop's trip count
# and condition must be known then, like a Reshape's shape
CONTROL_STATIC = {"Loop": (0, 1)}


def _static_slots(op_type: str, table: dict) -> tuple[int, ...]:
    return CONTROL_STATIC.get(op_type, getattr(table.get(op_type), "static", ()))


def _all_nodes(g: onnx.GraphProto):
    for n in g.node:
        yield n
        for a in n.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                yield from _all_nodes(a.g)


def freeze_static_inputs(case: Case) -> Case:
    """Make graph inputs that feed a graphc `static` op input initializers (see docstring).

    A shape input may reach the static slot through shape arithmetic (an expanded
    function: Sub, Div, Concat, ...): the walk goes back through producers, stopping at
    Shape and Size (their value is the data's shape, not the data); there it freezes
    integer inputs only, never a data tensor (a Resize's float scales feed it directly).
    """
    from graphc.frontends.onnx_ops import op_table

    g = case.model.graph
    feeds = {vi.name: i for i, vi in enumerate(g.input)}
    integer = {vi.name for vi in g.input if vi.type.tensor_type.elem_type in _INTEGER}
    nodes = list(_all_nodes(g))  # control-flow bodies too: they read outer values by name
    producer = {out: n for n in nodes for out in n.output}
    direct = [n.input[i] for n in nodes for i in _static_slots(n.op_type, op_table())
              if i < len(n.input) and n.input[i]]
    todo, seen, static = list(direct), set(), set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        if name in feeds and (name in integer or name in direct):
            static.add(name)
        elif name in producer and producer[name].op_type not in ("Shape", "Size"):
            todo += [i for i in producer[name].input if i]
            todo += [o.name for a in producer[name].attribute  # an If's value: its branches'
                     if a.type == onnx.AttributeProto.GRAPH for o in a.g.output]
    if not static:
        return case
    model = onnx.ModelProto()
    model.CopyFrom(case.model)
    keep = [vi for vi in model.graph.input if vi.name not in static]
    del model.graph.input[:]
    model.graph.input.extend(keep)
    for name in sorted(static, key=feeds.get):
        arr = case.inputs[feeds[name]]
        model.graph.initializer.append(onnx.numpy_helper.from_array(np.asarray(arr), name))
    inputs = [x for vi, x in zip(g.input, case.inputs) if vi.name not in static]
    return dataclasses.replace(case, model=model, inputs=inputs,
                               frozen=sorted(static, key=feeds.get))


def upgrade_opset(case: Case) -> Case:
    """An opset < 13 case converted to opset 13, as graphc's refusal tells users to do."""
    from graphc.frontends.onnx import MIN_OPSET

    opset = next((o.version for o in case.model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset >= MIN_OPSET:
        return case
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = onnx.version_converter.convert_version(case.model, MIN_OPSET)
    except Exception:  # noqa: BLE001  not convertible: graphc's own refusal is the outcome
        return case
    return dataclasses.replace(case, model=model, converted=True)


def _run_backend(case: Case, backend: str) -> list[np.ndarray]:
    inputs = [np.asarray(x) for x in case.inputs]
    if backend == "ort":
        import onnxruntime as ort

        sess = ort.InferenceSession(case.model.SerializeToString(),
                                    providers=["CPUExecutionProvider"])
        return sess.run(None, dict(zip([i.name for i in case.model.graph.input], inputs)))
    import torch

    import graphc

    g = graphc.trace(case.model, tuple(torch.from_numpy(x.copy()) for x in inputs), name="case")
    if backend == "torch":  # the traced IR itself, as passes see it
        with torch.no_grad():
            out = g.gm(*(torch.from_numpy(x.copy()) for x in inputs))
        out = [o.numpy() for o in (out if isinstance(out, (tuple, list)) else [out])]
    else:
        cm = graphc.lower(g, target="cpu")
        cm.num_threads = 1
        out = cm(*inputs)
    return list(out) if isinstance(out, (tuple, list)) else [out]


def warm_up(backend: str) -> None:
    """Trace (and build) a one-node model in the parent, so forked children start warm.

    One thread: the parent must not start thread pools that a fork would not copy.
    """
    if backend == "ort":
        import onnxruntime  # noqa: F401

        return
    import torch

    import graphc

    torch.set_num_threads(1)
    x = onnx.helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])
    y = onnx.helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])
    model = onnx.helper.make_model(
        onnx.helper.make_graph([onnx.helper.make_node("Relu", ["x"], ["y"])], "w", [x], [y]),
        opset_imports=[onnx.helper.make_opsetid("", 17)])
    g = graphc.trace(model)
    if backend == "tvm":
        graphc.lower(g, target="cpu")


def compare(got: list, want: list, rtol: float, atol: float) -> str | None:
    """None if the outputs match as the onnx backend runner checks them, else why not."""
    if len(got) != len(want):
        return f"{len(got)} outputs, expected {len(want)}"
    for i, (g, w) in enumerate(zip(got, want)):
        g, w = np.asarray(g), np.asarray(w)
        if g.shape != w.shape:
            return f"output {i}: shape {list(g.shape)}, expected {list(w.shape)}"
        if g.dtype != w.dtype:
            return f"output {i}: dtype {g.dtype}, expected {w.dtype}"
        try:
            np.testing.assert_allclose(g, w, rtol=rtol, atol=atol)
        except AssertionError as e:
            lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
            return f"output {i}: " + "; ".join(lines[1:4])
    return None


def _is_refusal(e: BaseException) -> bool:
    """graphc's own clear error (not a foreign exception it wrapped)."""
    from graphc.errors import GraphcError

    cause = e.__cause__
    return isinstance(e, GraphcError) and (cause is None or isinstance(cause, GraphcError))


def run_case(case: Case, backend: str) -> dict:
    rec = {"name": case.name, "op": case.op, "frozen": case.frozen, "converted": case.converted}
    try:
        why = compare(_run_backend(case, backend), case.outputs, case.rtol, case.atol)
        rec.update(status="wrong" if why else "pass", detail=why or "")
    except Exception as e:  # noqa: BLE001  every failure is an outcome to classify
        rec["status"] = "unsupported" if _is_refusal(e) else "crash"
        rec["detail"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
        if rec["status"] == "crash" and os.environ.get("GRAPHC_CONFORMANCE_TRACE"):
            traceback.print_exc()
    return rec


def run_all(cases: list[Case], backend: str, jobs: int, timeout: float, progress: bool) -> list:
    """Each case in a forked child (isolates segfaults, hangs and memory); results by JSON."""
    pending, running, results = list(range(len(cases)))[::-1], {}, []
    while pending or running:
        while pending and len(running) < jobs:
            i = pending.pop()
            r, w = os.pipe()
            pid = os.fork()
            if pid == 0:  # child
                os.close(r)
                data = json.dumps(run_case(cases[i], backend)).encode()
                with os.fdopen(w, "wb") as f:
                    f.write(data)
                os._exit(0)
            os.close(w)
            running[r] = (pid, i, time.monotonic(), bytearray())
        ready, _, _ = select.select(list(running), [], [], 1.0)
        for fd in ready:
            chunk = os.read(fd, 1 << 16)
            if chunk:
                running[fd][3].extend(chunk)
                continue
            results.append(_reap(cases, running.pop(fd), fd))
            if progress:
                print(f"[{len(results)}/{len(cases)}] {results[-1]['status']:11s} "
                      f"{results[-1]['name']}", file=sys.stderr, flush=True)
        for fd, (pid, i, start, _) in list(running.items()):
            if time.monotonic() - start > timeout:
                os.kill(pid, signal.SIGKILL)  # its pipe closes: reaped above next round
                running[fd] = (pid, i, -1e18, running[fd][3])
    return sorted(results, key=lambda r: r["name"])


def _reap(cases: list[Case], entry, fd: int) -> dict:
    pid, i, start, data = entry
    os.close(fd)
    _, status = os.waitpid(pid, 0)
    if data:
        return json.loads(data)
    case = cases[i]
    why = "timeout" if start < 0 else f"died: {os.waitstatus_to_exitcode(status)}"
    return {"name": case.name, "op": case.op, "frozen": case.frozen,
            "converted": case.converted, "status": "crash", "detail": why}


def summarize(results: list, skipped: collections.Counter, backend: str) -> str:
    counts = collections.Counter(r["status"] for r in results)
    n = len(results)
    lines = [f"filtered out (not ordinary dtypes): {sum(skipped.values())}"]
    lines += [f"  {k}: {v}" for k, v in skipped.most_common()]
    frozen = sum(bool(r["frozen"]) for r in results)
    converted = sum(r["converted"] for r in results)
    lines.append(f"ordinary-dtype cases: {n} ({frozen} with shape inputs frozen as constants, "
                 f"{converted} converted from opsets < 13)")
    lines.append(f"backend {backend}: " + ", ".join(f"{s} {counts[s]}" for s in STATUSES)
                 + f"  ->  pass rate {100 * counts['pass'] / max(n, 1):.1f}%")
    for status in STATUSES[1:]:
        ops = collections.Counter(r["op"] for r in results if r["status"] == status)
        if ops:
            lines.append(f"{status} by op: " + ", ".join(f"{o} {c}" for o, c in
                                                         sorted(ops.items(), key=lambda t:
                                                                (-t[1], t[0]))))
    return "\n".join(lines)


def _expected_lines(path: str) -> list[list[str]]:
    """[name, backend, status, reason] per entry of an expected-failure list."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        rows = [line.split(None, 3) for line in f if line.strip() and not line.startswith("#")]
    return [r + [""] * (4 - len(r)) for r in rows]


def read_expected(path: str, backend: str) -> dict[str, str]:
    """case name -> expected status on `backend`; a case not listed is expected to pass."""
    return {name: status for name, b, status, _ in _expected_lines(path) if b == backend}


def write_expected(path: str, results: list, backend: str) -> None:
    """Replace `backend`'s entries for the cases run with this run's failures."""
    ran = {r["name"] for r in results}
    rows = [r for r in _expected_lines(path) if r[1] != backend or r[0] not in ran]
    rows += [[r["name"], backend, r["status"], " ".join(r["detail"].split())[:200]]
             for r in results if r["status"] != "pass"]
    with open(path, "w") as f:
        f.write("# ONNX node tests graphc is expected to fail: tools/onnx_conformance.py --check.\n"
                "# Regenerate: --write-expected PATH (replaces that backend's lines).\n"
                "# case  backend  status  reason\n")
        f.writelines(" ".join(r).rstrip() + "\n" for r in sorted(rows, key=lambda r: r[:2]))


def check(results: list, expected: dict[str, str]) -> list[str]:
    """Regressions (expected to pass, did not) and stale entries (listed as failing, passed)."""
    problems = []
    for r in results:
        want = expected.get(r["name"], "pass")
        if want == "pass" and r["status"] != "pass":
            problems.append(f"REGRESSION {r['name']}: {r['status']}: {r['detail']}")
        elif want != "pass" and r["status"] == "pass":
            problems.append(f"NOW PASSES {r['name']} (listed as {want}): remove it from the list")
    return problems


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--backend", choices=("tvm", "torch", "ort"), default="tvm")
    p.add_argument("--ops", help="comma-separated op types to run (the case's op)")
    p.add_argument("--cases", help="a regex on case names to run")
    p.add_argument("--one-per-op", action="store_true",
                   help="only the first case (by name) of each op: a fixed, bounded subset")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per case")
    p.add_argument("--no-freeze", action="store_true", help="keep shape inputs as inputs")
    p.add_argument("--json", help="write every case's outcome here")
    p.add_argument("--check", metavar="EXPECTED", help="exit 1 on a regression or a stale entry")
    p.add_argument("--write-expected", metavar="PATH", help="write the failures as a list")
    p.add_argument("--progress", action="store_true")
    args = p.parse_args(argv)

    cases, skipped = collect()
    if args.ops:
        cases = [c for c in cases if c.op in set(args.ops.split(","))]
    if args.cases:
        cases = [c for c in cases if re.search(args.cases, c.name)]
    if args.one_per_op:
        first = {}
        for c in sorted(cases, key=lambda c: c.name):
            first.setdefault(c.op, c)
        cases = list(first.values())
    cases = [upgrade_opset(c) for c in cases]
    if not args.no_freeze:
        cases = [freeze_static_inputs(c) for c in cases]
    warm_up(args.backend)
    start = time.monotonic()
    results = run_all(cases, args.backend, max(args.jobs, 1), args.timeout, args.progress)
    print(summarize(results, skipped, args.backend))
    print(f"time: {time.monotonic() - start:.0f} s with {args.jobs} jobs")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"backend": args.backend, "results": results,
                       "filtered": dict(skipped)}, f, indent=1)
    if args.write_expected:
        write_expected(args.write_expected, results, args.backend)
    if args.check:
        problems = check(results, read_expected(args.check, args.backend))
        print("\n".join(problems) or f"check: all {len(results)} cases as expected")
        return 1 if problems else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
