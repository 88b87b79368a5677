"""Lossy passes on fuzzed graphs: their stated bounds, honest reports, and TVM agreement.

quantize (int8, weights symmetric per channel, activations static per tensor, calibrated on
the very inputs it is checked on). The bound is the quantizer's own: every fake-quant node
moves each element by at most scale / 2 (round to nearest), for a weight that is at most
max|w_c| / 254 per output channel c (scale = max|w_c| / 127), for an activation
(max - min) / 510, and nothing is clipped since the min/max observer saw these inputs.
Each fake-quant node is run on its real input and checked against that bound. The output
error cannot be bounded tighter than by the product of layer gains, so for it the check is
honesty: the report's output_error must be the ||y_q - y|| / ||y|| measured here.
fold-fake-quant (integer kernels) must then agree with the fake-quant graph, and TVM with
PyTorch on the folded graph, to float tolerance.

factorize and share-weights: their reported whole-model error must be what is measured,
share-weights may use at most 2^bits values per codebook, and TVM must run what PyTorch
runs (codebook decode/gather kernels, factor chains) to float tolerance.
"""

from __future__ import annotations

import math

import torch
from torch import fx

import graphc
from graphc.errors import PassError
from graphc.ops_quant import FAKE_QUANT_OPS
from graphc.pipeline import run_pipeline
from tests.fuzz.check import Mismatch, compare, outputs, reference, refused, run_tvm
from tests.fuzz.gen import describe
from tests.fuzz.ops import Program

_FQ = {op for op, kind in FAKE_QUANT_OPS.items() if kind != "dynamic"}


def _values(g: graphc.Graph, x) -> dict:
    """Every node's value on inputs x (an fx Interpreter that remembers)."""
    env = {}

    class Keep(fx.Interpreter):
        def run_node(self, n):
            env[n] = super().run_node(n)
            return env[n]

    with torch.no_grad():
        Keep(g.gm).run(*x)
    return env


def check_fake_quant_bounds(g: graphc.Graph, x, prog: Program) -> int:
    """Each fake-quant node moves its input by at most scale / 2; returns how many checked."""
    env, checked = _values(g, x), 0
    for n in g.gm.graph.nodes:
        if n.op != "call_function" or n.target not in _FQ:
            continue
        v, out, scale = env[n.args[0]], env[n], env[n.args[1]].double()
        if n.target is torch.ops.graphc.fake_quant_per_channel.default:
            axis = n.args[3] % v.dim()
            scale = scale.reshape([-1 if d == axis else 1 for d in range(v.dim())])
        err = (out.double() - v.double()).abs()
        # half a step, plus float32 rounding of (q - zp) * scale at the value's magnitude
        bound = scale / 2 * (1 + 1e-5) + v.double().abs() * 2 ** -22
        if bool((err > bound).any()):
            worst = (err - bound).argmax()
            raise Mismatch(f"quantize: {n.name} moves an element by {err.flatten()[worst]:.3g}, "
                           f"more than half its scale {scale.expand_as(err).flatten()[worst]:.3g}"
                           f"\n{describe(prog)}")
        checked += 1
    return checked


@torch.no_grad()
def _rel_error(g, x, ref) -> float:
    num = den = 0.0
    for y, y0 in zip(outputs(g(*x)), ref):
        num += float(((y.double() - y0.double()) ** 2).sum())
        den += float((y0.double() ** 2).sum())
    return math.sqrt(num / max(den, 1e-300))


def _honest(name: str, reported: float, measured: float, prog: Program):
    if not math.isclose(reported, measured, rel_tol=1e-4, abs_tol=1e-9):
        raise Mismatch(f"{name}: reports output error {reported:.6g}, measured {measured:.6g}"
                       f"\n{describe(prog)}")


def check_lossy(prog: Program, tvm: bool = True) -> dict:
    model, x, _ = reference(prog)
    g = graphc.trace(model, x)
    g0 = g.run_example()
    ran = {}
    with torch.no_grad():
        q, _ = run_pipeline(g, [("quantize", {"calibration": [x]})], check=True)
    ran["quantize"] = q is not g
    if q is not g:
        ran["fake-quant nodes"] = check_fake_quant_bounds(q, x, prog)
        _honest("quantize", q.meta["quantize"]["output_error"], _rel_error(q, x, g0), prog)
        f, _ = run_pipeline(q, ["fold-fake-quant"], check=True)
        ran["fold-fake-quant"] = f is not q
        with torch.no_grad():
            fq_ref = outputs(q(*x))
        compare(f(*x), fq_ref, "fold-fake-quant vs fake-quant graph", prog)
        if tvm:
            ran["TVM (int8)"] = run_tvm(f, x, outputs(f(*x)), "TVM (int8)", prog)
    fac, _ = run_pipeline(g, [("factorize", {"calibration": [x], "require_saving": False,
                                             "multiple": 1, "energy": 0.9})], check=True)
    ran["factorize"] = fac is not g
    if fac is not g:
        _honest("factorize", fac.meta["factorize"]["output_error"], _rel_error(fac, x, g0), prog)
        if tvm:
            ran["TVM (factorized)"] = run_tvm(fac, x, outputs(fac(*x)), "TVM (factorized)", prog)
    lowering = "gather" if prog.seed % 2 else "decode"
    try:
        sw, _ = run_pipeline(g, [("share-weights", {"bits": 3, "min_size": 16,
                                                    "lowering": lowering})], check=True)
    except PassError as e:  # gather is refused for weights it cannot read in place
        if not refused(e):
            raise
        ran["share-weights"] = f"refused: {str(e).splitlines()[0]}"
        return ran
    ran["share-weights"] = sw is not g
    if sw is not g:
        _codebooks_fit(sw, 3, prog)
        if tvm:
            ran["TVM (shared)"] = run_tvm(sw, x, outputs(sw(*x)), "TVM (shared)", prog)
    return ran


def _codebooks_fit(g: graphc.Graph, bits: int, prog: Program):
    for row in g.meta["share-weights"]["layers"]:
        book = row.get("codebook")
        if book is None:
            continue
        t = g.weights().get(book)
        if t is not None and t.shape[-1] > 2 ** bits:
            raise Mismatch(f"share-weights: codebook {book} has {t.shape[-1]} entries for "
                           f"{bits} bits\n{describe(prog)}")
