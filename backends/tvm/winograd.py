"""Relax: a stride-1 3x3 conv2d in NHWC with a constant weight -> Winograd F(m x m, 3 x 3).

    y = conv2d(x, w)        ->   V = winograd_input(x)       [a*a, P, C]    opaque
    (NHWC, OHWI, 3x3,            M = winograd_matmul(V, U)   [a*a, P, K]    U constant
     stride 1, groups 1)         y = winograd_output(M)      [N, H, W, K]   epilogue fuses

with a = m + 2 (the tile plus the kernel's halo) and P = N*tH*tW output tiles of m x m
pixels. The a*a independent [P, C] x [C, K] products run through the matmul rule
(schedules/matmul.py) with U = G w G^T packed at compile time.

Why: ResNet's 3x3 convs run at ~93% of the FMA peak directly (schedules/conv_nhwc.py), so
only fewer multiplies make them faster. Per output pixel and channel pair the direct conv
does 9 multiply-adds, F(2x2) 16/4 = 4, F(4x4) 36/16 = 2.25; the transforms are O(C + K)
per pixel, not O(C*K). The cost: U holds a*a/9 times the weight (1.8x for F(2x2), 4x for
F(4x4)), so only layers whose tiles outnumber the weight's growth take it (choose_tile), and
the transforms' rounding: with F(4x4)'s +-5 and 1/24 coefficients a 3x3 conv's fp32 result
is ~1e-6 relative off instead of ~1e-7 (tests/backends/test_winograd.py measures both).

FuseOps fuses the conv's epilogue (bias, ReLU, residual add) into the output transform,
which the winograd rule (schedules/winograd.py) schedules. The input transform is scheduled
here and opaque, so no producer is inlined into it (each input pixel is read by up to four
tiles).
"""

from __future__ import annotations

import logging

import numpy as np
import tvm
from tvm import relax, s_tir, te, tirx
from tvm.relax.expr_functor import PyExprMutator, mutator

from .schedules.isa import isa_of
from .schedules.winograd import per_tile

log = logging.getLogger("graphc")

CONV = tvm.ir.Op.get("relax.nn.conv2d")
# relax's OpPatternKind. The output transform is marked like a conv (out-elementwise
# fusable), not injective: FuseOps then gives the residual add after it to it, as to a direct
# conv; as injective, its batch-norm arithmetic went into the other branch's 1x1 conv's
# kernel instead (ResNet-18's downsample blocks: 66 us -> 5.4 ms, no rule fitted it).
OPAQUE, OUT_EWISE = 8, 4

# m -> (B^T, G, A^T) of F(m, 3) (Lavin & Gray, arXiv:1509.09308; interpolation points
# 0, +-1, (+-2,) infinity): y = A^T [(G g) * (B^T d)] is the correlation of an (m+2)-long
# d with a 3-tap g. The 2-D transform applies each on both axes.
TRANSFORMS = {
    2: ([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]],
        [[1, 0, 0], [1 / 2, 1 / 2, 1 / 2], [1 / 2, -1 / 2, 1 / 2], [0, 0, 1]],
        [[1, 1, 1, 0], [0, 1, -1, -1]]),
    4: ([[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0],
         [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]],
        [[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
         [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]],
        [[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]]),
}

# Below these sizes a conv stays direct. Fewer channels: the [P, C] x [C, K] products are
# too thin for the matmul rule's micro-kernel. Fewer tiles: the weight, a*a/9 times larger
# transformed, is read for too few rows. Basic block (two convs + BN + ReLU + residual),
# direct / F(2x2) / F(4x4) ms, /tmp/s8/bench_block.py on 2 Zen 4 cores:
#   64ch 56x56: 2.61 / 1.83 / 1.11     128ch 28x28: 2.37 / 1.21 / 0.75
#   256ch 14x14: 4.37 / 2.19 / 1.81    512ch 7x7: 2.58 / 2.07 / 2.52 (4 tiles of 4x4, 16 of 2x2)
MIN_CHANNELS = 16
MIN_TILES = 16
TILES = (4, 2)  # the tiles choose_tile tries, largest first


def choose_tile(n: int, oh: int, ow: int, c: int, k: int, tiles=None) -> int | None:
    """The Winograd tile m for a conv with n images of oh x ow outputs, c -> k channels: the
    largest in `tiles` that leaves at least MIN_TILES tiles (matmul rows), or None."""
    if min(c, k) < MIN_CHANNELS:
        return None
    return next((m for m in tiles or TILES if m in TRANSFORMS
                 and n * -(-oh // m) * -(-ow // m) >= MIN_TILES), None)


def weight_transform(w_ohwi: np.ndarray, m: int) -> np.ndarray:
    """U[xi, nu, c, k] = (G w[k, :, :, c] G^T)[xi, nu], in float64 then the weight's dtype,
    as [a*a, C, K]: the right operand of the a*a matmuls."""
    g = np.asarray(TRANSFORMS[m][1], np.float64)
    u = np.einsum("xi,kijc,yj->xyck", g, w_ohwi.astype(np.float64), g)
    a = m + 2
    return u.reshape(a * a, w_ohwi.shape[3], w_ohwi.shape[0]).astype(w_ohwi.dtype)


def _i64(shape) -> list:
    """Shapes as int64, as Relax's own legalized kernels have them: FuseTIR maps a fused
    kernel's buffers onto one another and rejects an int32 shape meeting an int64 one."""
    return [tirx.IntImm("int64", int(d)) for d in shape]


def _combine(rows, index, term, dtype):
    """sum_t rows[r][t] * term(t) for the r that `index` picks: a Select chain over r, each
    arm a sum over the nonzero coefficients only. The schedules unroll `index`, and the
    simplifier then keeps one arm: no multiplies by 0 or 1 reach the machine code."""
    def arm(row):
        expr = None
        for t, coef in enumerate(row):
            if coef == 0:
                continue
            v = term(t)
            v = v if coef == 1 else -v if coef == -1 else v * tirx.const(float(coef), dtype)
            expr = v if expr is None else expr + v
        return expr
    arms = [arm(r) for r in rows]
    out = arms[-1]
    for r in range(len(rows) - 2, -1, -1):
        out = tirx.Select(index == r, arms[r], out)
    return out


def input_compute(shape, dtype, m: int, pad_top: int, pad_left: int, oh: int, ow: int):
    """V[xi*a + nu, (n*tH + ty)*tW + tx, c] = (B^T d B)[xi, nu] of the a x a input patch d of
    tile (ty, tx), zero outside the input (the conv's padding)."""
    n, h, w, c = shape
    a, bt = m + 2, TRANSFORMS[m][0]
    th, tw = -(-oh // m), -(-ow // m)
    x = te.placeholder(_i64(shape), dtype, name="x")

    def patch(b, ty, tx, i, j, ch):
        y, xx = ty * m + i - pad_top, tx * m + j - pad_left
        inside = tirx.all(y >= 0, y < h, xx >= 0, xx < w)
        return tirx.if_then_else(inside, x[b, y, xx, ch], tirx.const(0, dtype))

    rows = te.compute(_i64((a, a, n, th, tw, c)), lambda xi, j, b, ty, tx, ch: _combine(
        bt, xi, lambda i: patch(b, ty, tx, i, j, ch), dtype), name="winograd_rows")
    # the flat indices split back in the schedule (schedule_input), so no div/mod remains
    v = te.compute(_i64((a * a, n * th * tw, c)), lambda e, p, ch: _combine(
        bt, e % a, lambda j: rows[e // a, j, p // (th * tw), p // tw % th, p % tw, ch], dtype),
        name="winograd_input")
    return te.create_prim_func([x, v]).without_attr("global_symbol")


def output_compute(n: int, oh: int, ow: int, k: int, dtype, m: int):
    """y[n, y, x, k] = (A^T M A)[y % m, x % m] of tile (y // m, x // m), M as [a*a, P, K]."""
    a, at = m + 2, TRANSFORMS[m][2]
    th, tw = -(-oh // m), -(-ow // m)
    prod = te.placeholder(_i64((a * a, n * th * tw, k)), dtype, name="M")
    rows = te.compute(_i64((m, a, n, th, tw, k)), lambda i, nu, b, ty, tx, ch: _combine(
        at, i, lambda xi: prod[xi * a + nu, (b * th + ty) * tw + tx, ch], dtype),
        name="winograd_out_rows")
    y = te.compute(_i64((n, oh, ow, k)), lambda b, yy, xx, ch: _combine(
        at, xx % m, lambda nu: rows[yy % m, nu, b, yy // m, xx // m, ch], dtype),
        name="winograd_output")
    return te.create_prim_func([prod, y]).without_attr("global_symbol")


def matmul_compute(a2: int, p: int, c: int, k: int, dtype):
    """M[e, p, k] = sum_c V[e, p, c] * U[e, c, k]: the rule-table's batch matmul."""
    v = te.placeholder(_i64((a2, p, c)), dtype, name="V")
    u = te.placeholder(_i64((a2, c, k)), dtype, name="U")
    r = te.reduce_axis((tirx.IntImm("int64", 0), tirx.IntImm("int64", c)), "c")
    out = te.compute(_i64((a2, p, k)), lambda e, i, j: te.sum(v[e, i, r] * u[e, r, j], axis=r),
                     name="matmul")
    return te.create_prim_func([v, u, out]).without_attr("global_symbol")


def schedule_input(func: tirx.PrimFunc, lanes: int) -> tirx.PrimFunc:
    """Parallel over tiles; per tile and channel vector, the a x a patch's two 1-D transforms
    unrolled on registers (B^T's coefficients are constants in the code)."""
    sch = s_tir.Schedule(func)
    v, rows = sch.get_sblock("winograd_input"), sch.get_sblock("winograd_rows")
    a, _, n, th, tw, _ = (int(d) for d in sch.get(rows).writes[0].source.shape)
    e, p, ch = sch.get_loops(v)
    xi, nu = sch.split(e, [a, a])
    b, ty, tx = sch.split(p, [n, th, tw])
    per_tile(sch, rows, v, (b, ty, tx), (xi, nu), ch, lanes)
    return sch.mod["main"].with_attr("tirx.is_scheduled", True)


def _const_weight(expr, bindings: dict) -> np.ndarray | None:
    """The value of a conv's weight when it is a constant (directly or through a binding)."""
    while isinstance(expr, relax.Var) and expr in bindings:
        expr = bindings[expr]
    return expr.value.numpy() if isinstance(expr, tvm.ir.expr.Constant) else None


def _plan(call: relax.Call, bindings: dict) -> tuple[int, np.ndarray] | None:
    """(m, weight) when `call` is a conv2d Winograd applies to and pays for, else None."""
    if not (isinstance(call.op, tvm.ir.Op) and call.op.same_as(CONV)):
        return None
    a, x = call.attrs, call.args[0]
    layouts = (str(a.data_layout), str(a.kernel_layout), str(a.out_layout or a.data_layout))
    if layouts != ("NHWC", "OHWI", "NHWC") or int(a.groups) != 1 or \
            any(int(s) != 1 for s in (*a.strides, *a.dilation)) or \
            str(x.ty.dtype) != "float32" or (a.out_dtype and str(a.out_dtype) != "float32"):
        return None
    w = _const_weight(call.args[1], bindings)
    if w is None or w.shape[1:3] != (3, 3):
        return None
    n, oh, ow, k = (int(d) for d in call.ty.shape)
    m = choose_tile(n, oh, ow, w.shape[3], k)
    return None if m is None else (m, w)


@mutator
class _Rewrite(PyExprMutator):
    def __init__(self, mod: tvm.IRModule, bindings: dict, lanes: int):
        super().__init__(mod)
        self.bindings, self.lanes, self.count = bindings, lanes, 0

    def visit_call_(self, call):
        call = super().visit_call_(call)
        plan = _plan(call, self.bindings)
        return call if plan is None else self._winograd(call, *plan)

    def _winograd(self, call: relax.Call, m: int, w: np.ndarray) -> relax.Expr:
        bb, x, dtype = self.builder_, call.args[0], "float32"
        n, h, wd, c = (int(d) for d in x.ty.shape)
        _, oh, ow, k = (int(d) for d in call.ty.shape)
        pad_top, pad_left = (int(p) for p in call.attrs.padding[:2])
        a, tiles = m + 2, n * -(-oh // m) * -(-ow // m)
        fin = schedule_input(input_compute((n, h, wd, c), dtype, m, pad_top, pad_left, oh, ow),
                             self.lanes)
        v = bb.emit(relax.call_tir(bb.add_func(fin.with_attr("op_pattern", OPAQUE),
                                               "winograd_input"),
                                   [x], relax.TensorType([a * a, tiles, c], dtype)))
        u = relax.const(weight_transform(w, m))
        prod = bb.emit(relax.call_tir(bb.add_func(matmul_compute(a * a, tiles, c, k, dtype),
                                                  "winograd_matmul"),
                                      [v, u], relax.TensorType([a * a, tiles, k], dtype)))
        fout = output_compute(n, oh, ow, k, dtype, m).with_attr("op_pattern", OUT_EWISE)
        self.count += 1
        return relax.call_tir(bb.add_func(fout, "winograd_output"), [prod], call.ty)


@tvm.transform.module_pass(opt_level=0, name="graphc.Winograd")
def winograd(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
    """conv2d 3x3 stride 1 (NHWC, constant weight) -> Winograd input transform, matmul with
    the transformed weight, output transform; other convs unchanged."""
    target = tvm.target.Target.current(allow_none=True)
    lanes = isa_of(target).f32_lanes if target is not None else 4
    funcs = [f for f in mod.functions.values() if isinstance(f, relax.Function)]
    # var -> bound value: how _plan sees through a binding to a constant weight
    bindings = {b.var: b.value for f in funcs if isinstance(f.body, relax.SeqExpr)
                for block in f.body.blocks for b in block.bindings
                if isinstance(b, relax.VarBinding)}
    rw = _Rewrite(mod, bindings, lanes)
    for gv, func in mod.functions_items():
        if isinstance(func, relax.Function):
            rw.builder_.update_func(gv, rw.visit_expr(func))
    if rw.count:
        log.debug("winograd: %d conv2d rewritten", rw.count)
    return relax.transform.DeadCodeElimination()(rw.builder_.get()) if rw.count else mod


def winograd_passes(options: dict) -> list:
    """The Winograd phase for a target's options: the CPU presets' default unless "+direct";
    a target dict keeps every conv direct."""
    return [winograd] if options.get("winograd", False) else []
