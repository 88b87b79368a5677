"""The fuzzer's oracles: a Program through graphc (trace, passes, TVM) against PyTorch eager.

Float tolerance, per output: max|a - b| <= FLOAT_TOL * max(1, max|ref|) + 10 * noise, where
noise is how much PyTorch's own fp32 result moves under fp32-sized errors: the larger of
its distance to the same program in float64 and to a run with every op's result multiplied
by (1 + 2^-24 * randn), one rounding error each. The generator keeps activations near unit
scale (weights 1/sqrt(fan_in), inputs randn) and reductions to a few hundred terms, so
reordered fp32 sums (TVM's tiling, batchnorm folded into weights, precomputed constants)
differ by ~sqrt(K) * 2^-24 per reduction: far below 1e-4 of the output's scale, which
every real bug found (a wrong index or window, garbage memory) exceeds by orders of
magnitude. The noise term covers ill-conditioned programs: the fuzzer found a layernorm of
a constant (log_softmax of x - x), where eager's mean is exactly the constant and TVM's
is one rounding off, divided by sqrt(eps): 1.1e-4 apart, both right. A backend cannot be
asked to be ten times closer to eager than eager is to itself under one rounding per op.
Integers must match exactly, and every output must keep
its dtype and shape.
"""

from __future__ import annotations

import copy

import torch

import graphc
from graphc.errors import PassError, UnsupportedOpError
from graphc.pipeline import run_pipeline
from tests.fuzz.gen import describe
from tests.fuzz.ops import FuzzModel, Program, make_inputs

FLOAT_TOL = 1e-4

# Every registered pass is in exactly one of these (test_fuzz checks it), so a new pass
# has to say how the fuzzer checks it.
EXACT = ("dead-code-elimination", "constant-folding", "common-subexpression-elimination",
         "dedupe-weights", "fold-batchnorm", "fold-pad", "fold-prune-masks")
LOSSY = ("quantize", "fold-fake-quant", "factorize", "share-weights")  # checked in lossy.py
PRUNING = ("prune", "prune-channels", "sparsify")  # other engineers' work in progress


class Mismatch(AssertionError):
    pass


def refused(e: Exception) -> bool:
    """A clear refusal (an unsupported op or option, named), not a crash or a wrong result.

    run_one wraps unexpected exceptions inside a pass as "pass 'x' failed: TypeError: ...":
    those are bugs, not refusals."""
    return isinstance(e, (PassError, UnsupportedOpError)) and " failed: " not in str(e)


def outputs(result) -> tuple:
    return tuple(result) if isinstance(result, (tuple, list)) else (result,)


def max_error(got, ref) -> float:
    return (got.double() - ref.double()).abs().max().item() if ref.numel() else 0.0


def compare(got, ref, where: str, prog: Program | None = None, tol: float = FLOAT_TOL,
            noise=None):
    """Raise Mismatch naming the stage and the program when got differs from ref.

    noise: per output, max|ref - ref in float64| (reference() computes it), or None."""
    got = outputs(got)
    noise = noise or [0.0] * len(ref)
    ctx = f"\n{describe(prog)}" if prog is not None else ""
    if len(got) != len(ref):
        raise Mismatch(f"{where}: {len(got)} outputs, expected {len(ref)}{ctx}")
    for k, (a, b) in enumerate(zip(got, ref)):
        a = torch.as_tensor(a)
        if a.dtype != b.dtype or tuple(a.shape) != tuple(b.shape):
            raise Mismatch(f"{where}: output {k} is {a.dtype}{list(a.shape)}, expected "
                           f"{b.dtype}{list(b.shape)}{ctx}")
        if not b.dtype.is_floating_point:
            if not torch.equal(a, b):
                bad = (a != b).nonzero()[0].tolist()
                raise Mismatch(f"{where}: integer output {k} differs at {bad}: {a[tuple(bad)]} "
                               f"!= {b[tuple(bad)]}{ctx}")
            continue
        err, scale = max_error(a, b), max(1.0, b.abs().max().item() if b.numel() else 0.0)
        if not err <= tol * scale + 10 * noise[k]:  # also catches NaN
            raise Mismatch(f"{where}: output {k} max|err| {err:.3g} > {tol:g} * {scale:.3g}"
                           f" + 10 * {noise[k]:.3g}{ctx}")


class Reference(tuple):
    """PyTorch eager's outputs, with .noise: per output, max|fp32 - float64|."""

    noise: list


def reference(prog: Program):
    model = FuzzModel(prog).eval()
    x = make_inputs(prog)
    with torch.no_grad():
        ref = Reference(outputs(model(*x)))
        model64 = copy.deepcopy(model).double()
        ref64 = outputs(model64(*(t.double() if t.is_floating_point() else t for t in x)))
        model.jitter = torch.Generator().manual_seed(prog.seed)
        jittered = outputs(model(*x))
        model.jitter = None
    ref.noise = [max(max_error(a, b), max_error(a, c)) if a.is_floating_point() else 0.0
                 for a, b, c in zip(ref, ref64, jittered)]
    return model, x, ref


def check_exact(prog: Program, passes=EXACT, tvm: bool = True) -> dict:
    """Trace, each exact pass alone and all in a row, and TVM, against PyTorch eager.

    Returns what ran ({stage: changed?}) so callers can count coverage."""
    model, x, ref = reference(prog)
    g = graphc.trace(model, x)
    compare(g(*x), ref, "trace", prog, noise=ref.noise)
    ran = {}
    for name in passes:
        out, _ = run_pipeline(g, [name], check=True)  # check: verify IR, no input mutation
        compare(out(*x), ref, f"pass {name}", prog, noise=ref.noise)
        ran[name] = out is not g
    chain, _ = run_pipeline(g, list(passes), check=True)
    compare(chain(*x), ref, "all exact passes", prog, noise=ref.noise)
    if tvm:
        for label, graph in (("TVM (no passes)", g), ("TVM (exact passes)", chain)):
            if label == "TVM (exact passes)" and graph is g:
                continue
            ran[label] = run_tvm(graph, x, ref, label, prog)
    return ran


def run_tvm(g: graphc.Graph, x, ref, label: str, prog: Program) -> str:
    """Compile g for this CPU and compare; 'ok', or the refusal's message (a clear refusal
    is allowed, a crash or a wrong result is not)."""
    try:
        cm = graphc.lower(g, target="cpu")
    except Exception as e:
        if refused(e):
            return f"refused: {str(e).splitlines()[0]}"
        raise
    compare(cm(*x), ref, label, prog, noise=getattr(ref, "noise", None))
    return "ok"
