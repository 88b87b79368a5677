"""convert-nhwc: a Relax pass that runs a CNN's float convolutions in NHWC (the CPU presets'
default; "cpu+nchw" keeps NCHW).

PyTorch hands graphc NCHW. For depthwise convs NCHW is the wrong layout on a CPU: a channel's
plane is only HxW, so at MobileNetV2's 14x14 and 7x7 layers vectors along a row are short
and half their lanes idle (onnxruntime converts the whole model to NCHWc for this). In NHWC
the channels are innermost, every conv kernel vectorizes over them (schedules/conv_nhwc.py),
and TVM's ConvertLayout carries the layout through the elementwise ops, adds, pads and means
between convs, so the transposes are left at the model's input and output only.

    before  conv2d(x: NCHW, w: OIHW) -> clip -> conv2d ...
    after   permute_dims(x) -> conv2d(NHWC, OHWI) -> maximum/minimum -> conv2d ... -> permute_dims

The default on the CPU presets ("auto"), measured against NCHW on the 2-core Zen 4 (after
convs from 0.1 MFLOP run parallel): MobileNetV2 4.20 vs 4.69 ms (per kernel, us: depthwise
960ch 7x7 24 vs 55, 96ch 112x112 stride 2 174 vs 275; 1x1 convs within 10% either way; the
input transpose 0.027 ms); ResNet-18 per layer against onnxruntime 0.85-1.04x in NHWC,
0.90-1.61x in NCHW (the 56x56 3x3 convs 1.2-1.3x, the stride-2 max pool 536 vs 157 us).
"+nhwc" and "+nchw" force either layout; a target given in full (a dict) compiles in the
layout the model has.

When the conversion would leave more than the boundary transposes (an op ConvertLayout
cannot carry puts a transpose pair around each use), the module stays NCHW: a warning when
"+nhwc" asked for NHWC, an INFO log under the default.
"""

from __future__ import annotations

import logging

import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

log = logging.getLogger(__name__)

DESIRED = {"relax.nn.conv2d": ["NHWC", "OHWI"]}


@mutator
class _ClipToMinMax(PyExprMutator):
    """clip(x, lo, hi) -> minimum(maximum(x, lo), hi): TVM 0.27's clip has no layout
    inference, so ConvertLayout would wrap every ReLU6 in a transpose pair; maximum and
    minimum with a scalar carry any layout. Same values (both legalize to max/min)."""

    def visit_call_(self, call):
        call = super().visit_call_(call)
        if not (isinstance(call.op, tvm.ir.Op) and call.op.name == "relax.clip"):
            return call
        x, lo, hi = call.args
        dtype = str(x.ty.dtype)
        if not dtype.startswith("float"):
            return call
        lo, hi = (relax.const(float(v.value), dtype) for v in (lo, hi))
        return relax.op.minimum(relax.op.maximum(x, lo), hi)


def _map_functions(mod: tvm.IRModule, visit) -> tvm.IRModule:
    out = tvm.IRModule(dict(mod.functions), attrs=mod.attrs)
    for gv, func in mod.functions.items():
        if isinstance(func, relax.Function):
            out[gv] = visit(func)
    return out


def _calls(mod: tvm.IRModule, name: str, keep=lambda call: True) -> list[relax.Call]:
    found = []

    def visit(e):
        if isinstance(e, relax.Call) and isinstance(e.op, tvm.ir.Op) and e.op.name == name \
                and keep(e):
            found.append(e)

    for func in mod.functions.values():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func, visit)
    return found


def _is_float_nchw(call: relax.Call) -> bool:
    return str(call.args[0].ty.dtype).startswith("float") and call.attrs.data_layout == "NCHW"


def _per_call_transposes(mod: tvm.IRModule) -> int:
    """permute_dims whose input depends on a function's parameters: those run per call. One
    of a constant is folded at compile time, and one of a decoded weight (share-weights,
    sparsify) runs once, when the model loads (decode_once.py)."""
    count = 0
    for func in mod.functions.values():
        if not isinstance(func, relax.Function) or not isinstance(func.body, relax.SeqExpr):
            continue
        runtime = set(func.params)
        for block in func.body.blocks:
            for b in block.bindings:
                if not any(v in runtime for v in relax.analysis.free_vars(b.value)):
                    continue
                runtime.add(b.var)
                v = b.value
                count += isinstance(v, relax.Call) and isinstance(v.op, tvm.ir.Op) and \
                    v.op.name == "relax.permute_dims"
    return count


def _boundary(mod: tvm.IRModule) -> int:
    """Transposes a converted main may need: at most one per input and one per output."""
    main = mod["main"]
    ret = main.ret_ty
    outs = len(ret.fields) if isinstance(ret, relax.TupleType) else 1
    return len(main.params) + outs


def convert(mod: tvm.IRModule, forced: bool) -> tvm.IRModule:
    """float conv2d NCHW -> conv2d NHWC, transposes at the model's edges."""
    if not _calls(mod, "relax.nn.conv2d", _is_float_nchw):
        return mod
    before = _per_call_transposes(mod)
    converted = _map_functions(mod, _ClipToMinMax(mod).visit_expr)
    converted = tvm.transform.Sequential([
        relax.transform.ConvertLayout(DESIRED),
        relax.transform.Normalize(),
        relax.transform.FoldConstant(),
        # an input used by a conv and a residual add is transposed once, not once per use
        relax.transform.EliminateCommonSubexpr(),
    ])(converted)
    added = _per_call_transposes(converted) - before
    if added > _boundary(mod):
        # asked for ("+nhwc"): a warning; chosen by the default policy: the user asked nothing
        log.log(logging.WARNING if forced else logging.INFO,
                "%s: converting to NHWC would add %d transposes (an op TVM's ConvertLayout "
                "cannot carry sits between convs); the model stays NCHW",
                "cpu+nhwc" if forced else "NHWC", added)
        return mod
    return converted


@tvm.transform.module_pass(opt_level=0, name="graphc.ConvertNHWC")
def convert_nhwc(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
    """float conv2d NCHW -> conv2d NHWC, transposes at the model's edges."""
    return convert(mod, forced=True)


@tvm.transform.module_pass(opt_level=0, name="graphc.ConvertNHWCAuto")
def convert_nhwc_auto(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
    """float conv2d NCHW -> conv2d NHWC, or unchanged (logged, no warning) where it cannot."""
    return convert(mod, forced=False)


# the target's "layout" option -> the layout phase of optimize_passes
LAYOUT_PASSES = {"NHWC": [convert_nhwc], "auto": [convert_nhwc_auto], "NCHW": []}


def layout_passes(options: dict) -> list:
    """The layout phase for a target's options: "+nhwc" NHWC, "+nchw" NCHW, the CPU presets'
    default "auto" NHWC where it carries through the graph; a target dict keeps the model's."""
    return LAYOUT_PASSES[options.get("layout", "NCHW")]
