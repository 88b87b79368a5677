"""Side-by-side measurement: variants of one model prepared, then timed interleaved.

A *variant* is one way to run the model (PyTorch eager, onnxruntime fp32 / int8, graphc
untuned / tuned). Each is prepared once (export, quantize, compile: timed, with the process's
peak RSS), checked against PyTorch once, then all are timed round-robin in one process: each
round calls every variant once, in an order rotated every round, with a short pause before
each call so one runtime's spinning worker threads do not eat into the next one's time.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import resource
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

CORES = os.cpu_count() or 1
PASSES = "fold-batchnorm, constant-folding, dead-code-elimination"


@dataclass
class Variant:
    name: str
    call: Callable[[], Any]  # one inference on the bound inputs (what is timed)
    outputs: Callable[[], list[np.ndarray]]  # one inference, outputs as numpy (for errors)
    prepare: dict = field(default_factory=dict)  # seconds / peak RSS of export or compile
    note: str = ""
    samples_ms: list[float] = field(default_factory=list)
    first_ms: list[float] = field(default_factory=list)  # each visit's first (warm-up) call
    max_rel_err: float | None = None
    run: Callable[[tuple], list[np.ndarray]] | None = None  # inference on other inputs
    artifact_bytes: int | None = None  # the deployable file: .onnx, or the .graphc zip
    quality: dict | None = None  # the case's task metric (MiniLM: cosine to fp32)

    def stats(self) -> dict:
        ms = np.asarray(self.samples_ms)
        if ms.size == 0:
            return {}
        out = {"median_ms": float(np.median(ms)), "min_ms": float(ms.min()),
               "p25_ms": float(np.percentile(ms, 25)), "p75_ms": float(np.percentile(ms, 75)),
               "n": int(ms.size)}
        if self.first_ms:
            out["first_call_median_ms"] = float(np.median(self.first_ms))
        return out


# ---- memory ---------------------------------------------------------------------------------

def _status_mib(field_name: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark (VmHWM) of this process (Linux >= 4.0)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


@contextlib.contextmanager
def track(result: dict):
    """Fill `result` with seconds, the process RSS before, and its peak RSS during the block
    (VmHWM after resetting it; without /proc, ru_maxrss: the peak since process start)."""
    reset = _reset_peak_rss()
    before = _status_mib("VmRSS")
    start = time.perf_counter()
    try:
        yield result
    finally:
        result["seconds"] = round(time.perf_counter() - start, 3)
        peak = _status_mib("VmHWM") if reset else None
        if peak is None:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            result["peak_is_since_start"] = True
        result["peak_rss_mib"] = round(peak, 1)
        if before is not None:
            result["rss_before_mib"] = round(before, 1)
            result["rss_growth_mib"] = round(peak - before, 1)


# ---- variants -------------------------------------------------------------------------------

def _np(x) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def _flat(out) -> list[np.ndarray]:
    return [_np(o) for o in out] if isinstance(out, (tuple, list)) else [_np(out)]


def torch_eager(case) -> Variant:
    torch.set_num_threads(CORES)
    model, inputs = case.model, case.inputs

    def call():
        with torch.no_grad():
            return model(*inputs)

    return Variant("torch", call, lambda: _flat(call()), note=f"torch {torch.__version__}, "
                   f"{torch.get_num_threads()} threads, no_grad")


def export_onnx(case, folder: Path) -> Path:
    """torch.onnx.export (TorchScript exporter, opset 17) of the case into folder."""
    path = folder / f"{case.name}.onnx"
    with torch.no_grad():
        torch.onnx.export(case.model, case.inputs, str(path), input_names=case.input_names,
                          opset_version=17, dynamo=False)
    return path


def _ort_session(path: Path):
    import onnxruntime as ort

    opts = ort.SessionOptions()  # graph optimizations: ORT's default level (ORT_ENABLE_ALL)
    opts.intra_op_num_threads = CORES
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _ort_variant(name: str, session, case, note: str, prepare: dict, path: Path) -> Variant:
    feeds = {n: _np(x) for n, x in zip(case.input_names, case.inputs)}

    def call():
        return session.run(None, feeds)

    def run(inputs):
        return _flat(session.run(None, {n: _np(x) for n, x in zip(case.input_names, inputs)}))

    return Variant(name, call, lambda: _flat(call()), prepare=prepare, note=note, run=run,
                   artifact_bytes=_file_bytes(path))


def _file_bytes(path: Path) -> int:
    """The model file and its external-data files (an .onnx over 2 GB keeps weights apart)."""
    return sum(f.stat().st_size for f in path.parent.glob(path.name + "*"))


def ort_fp32(case, folder: Path) -> tuple[Variant, Path]:
    import onnxruntime as ort

    prep: dict = {}
    with track(prep):
        path = export_onnx(case, folder)
        session = _ort_session(path)
    note = f"onnxruntime {ort.__version__}, {CORES} intra-op threads, export + session"
    return _ort_variant("ort-fp32", session, case, note, prep, path), path


def ort_int8(case, fp32_path: Path, folder: Path) -> Variant:
    import onnxruntime as ort
    from onnxruntime.quantization import QuantType, quantize_dynamic

    prep: dict = {}
    with track(prep):
        path = folder / f"{case.name}.int8.onnx"
        quantize_dynamic(str(fp32_path), str(path), weight_type=QuantType.QInt8)
        session = _ort_session(path)
    note = f"onnxruntime {ort.__version__} quantize_dynamic (s8 weights), quantize + session"
    return _ort_variant("ort-int8", session, case, note, prep, path)


def graphc_variant(case, name: str, tuning_db: str | os.PathLike, folder: Path,
                   int8: bool = False) -> Variant:
    import graphc

    prep: dict = {}
    with track(prep):
        # int8_graph ran PASSES already, before quantizing
        model, passes = (int8_graph(case), ()) if int8 else (case.model, PASSES)
        cm = graphc.compile(model, case.inputs, target="cpu", passes=passes,
                            tuning_db=tuning_db)
    inputs, path = case.inputs, folder / f"{case.name}.{name}.graphc"
    cm.save(path)
    tvm_meta = cm.meta.get("tvm", {})
    applied = tvm_meta.get("tuning", {}).get("applied", [])
    prep["phase_seconds"] = tvm_meta.get("phase_seconds", {})
    prep["tuned_kernels"] = len(applied)
    note = f"{cm.target}; {len(applied)} kernel(s) from the tuning database"
    def run(xs):
        return _flat(cm(*xs))

    return Variant(name, lambda: cm(*inputs), lambda: run(inputs), prepare=prep, note=note,
                   run=run, artifact_bytes=path.stat().st_size)


def int8_graph(case):
    """The case quantized the way its kind is usually deployed, folded to integer ops:
    transformers: int8 weights, dynamic uint8 inputs on every linear, int8 embedding tables
    (onnxruntime's quantize_dynamic does the same); CNNs: static uint8 inputs calibrated on
    CALIBRATION_IMAGES random images (their weights are random too)."""
    import graphc
    from graphc.passes.fold_fake_quant import fold_fake_quant

    # CSE first: HF BERT views the hidden states once per q/k/v projection; merged, each
    # input is quantized once (MiniLM: 24 instead of 36 dynamic quantizations)
    g = graphc.run_pipeline(graphc.trace(case.model, case.inputs),
                            PASSES + ", common-subexpression-elimination")[0]
    if case.int8 == "dynamic":
        q = graphc.quantize(g, activations="dynamic", ops=("linear", "embedding"),
                            calibration=[case.inputs])
    else:
        gen = torch.Generator().manual_seed(1)
        batches = [tuple(torch.randn(x.shape, generator=gen) for x in case.inputs)
                   for _ in range(CALIBRATION_IMAGES)]
        q = graphc.quantize(g, calibration=batches)
    return fold_fake_quant(q)


CALIBRATION_IMAGES = 4


# ---- errors and timing ------------------------------------------------------------------------

def max_rel_err(got: list[np.ndarray], want: list[np.ndarray]) -> float:
    """max |got - want| / max |want| over each output, the worst output."""
    if len(got) != len(want):
        raise ValueError(f"{len(got)} outputs, expected {len(want)}")
    errs = []
    for g, w in zip(got, want):
        g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
        scale = float(np.abs(w).max()) or 1.0
        errs.append(float(np.abs(g.reshape(w.shape) - w).max()) / scale)
    return max(errs)


def check(variants: list[Variant], reference: list[np.ndarray]) -> None:
    for v in variants:
        v.max_rel_err = max_rel_err(v.outputs(), reference)


def _cpu_jiffies() -> tuple[float, float] | None:
    """(busy, steal) seconds of all CPUs together, from /proc/stat."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except OSError:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, fields[:8])
    hz = os.sysconf("SC_CLK_TCK")
    return (user + nice + system + irq + softirq) / hz, steal / hz


def _own_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


@contextlib.contextmanager
def other_load(result: dict):
    """Fill `result` with the CPU time other processes used during the block, as a fraction
    of all cores (0.5 on 2 cores: one core busy elsewhere), and the hypervisor's steal."""
    cpu0, own0, t0 = _cpu_jiffies(), _own_cpu(), time.perf_counter()
    try:
        yield result
    finally:
        cpu1, own1, wall = _cpu_jiffies(), _own_cpu(), time.perf_counter() - t0
        if cpu0 and cpu1 and wall > 0:
            others = (cpu1[0] - cpu0[0]) - (own1 - own0)
            result["other_processes_cpu_fraction"] = round(max(others, 0) / (wall * CORES), 3)
            result["steal_fraction"] = round((cpu1[1] - cpu0[1]) / (wall * CORES), 3)


def interleave(variants: list[Variant], *, repeat: int, warmup: int, budget_s: float,
               gap_s: float, visit_warmup: int = 1, visit_calls: int = 3,
               min_rounds: int = 3) -> int:
    """Time the variants round-robin, each round in a random order (seeded); returns the
    number of rounds. On each visit a variant makes `visit_warmup` untimed calls, then
    `visit_calls` timed ones, so what is timed is its steady state (its thread pool awake),
    not the first call after another runtime had the cores. Stops after `repeat` rounds, or
    earlier once `budget_s` is spent and at least `min_rounds` are done."""
    for v in variants:
        for _ in range(warmup):
            v.call()
    rng = random.Random(0)
    start, rounds = time.perf_counter(), 0
    for _ in range(repeat):
        for v in rng.sample(variants, len(variants)):
            time.sleep(gap_s)
            for i in range(visit_warmup):
                t0 = time.perf_counter()
                v.call()
                if i == 0:  # reported apart: the call that wakes the runtime's threads
                    v.first_ms.append((time.perf_counter() - t0) * 1e3)
            for _ in range(visit_calls):
                t0 = time.perf_counter()
                v.call()
                v.samples_ms.append((time.perf_counter() - t0) * 1e3)
        rounds += 1
        if rounds >= min_rounds and time.perf_counter() - start > budget_s:
            break
    return rounds


def geomean(values: list[float]) -> float | None:
    values = [v for v in values if v and v > 0 and math.isfinite(v)]
    return math.exp(sum(map(math.log, values)) / len(values)) if values else None


def empty_db() -> tempfile.TemporaryDirectory:
    """A tuning database folder with no records: 'untuned' must not pick up any records."""
    return tempfile.TemporaryDirectory(prefix="graphc-bench-nodb-")
