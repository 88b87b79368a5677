"""Weights decoded once, when the model loads: the decode functions, the init function, the build.

A shared (lower_codebook.py) or sparse (lower_sparse.py) weight is stored packed in lib.so, and
its layer needs it dense. Its lowering adds a Relax function `*_decode_once_<node>(packed...)
-> flat dense weight` (decode_func) marked with DECODE_ONCE = the weight's name in TVM's
process-wide tensor cache, and calls it in main on the packed constants. decode_chain.py
adds the weight's relayout (reshape, transpose, the kernel's prepack) to it. Then
decode_at_load takes every such call out of main into one init function, the decode
functions inlined (their arguments are constants):

    main:         w = vm.builtin.tensor_cache.get(key)        every call: one lookup
    graphc_init:  w = decode kernel(packed, codebook) ...     once, when the model loads
                  vm.builtin.tensor_cache.update(key, w)      (one pair per weight)

The runners call INIT once, right after they create the VM: runtime.py (graphc.load and a
fresh compile), board_runner.py (tvm + numpy only) and remote.py (an RPC device). build()
compiles INIT (and any decode function still called) to VM bytecode and the rest in the
pipeline's exec_mode (CPUs: "compiled", main as native code). Run once, bytecode costs
nothing measurable, and it is small: a compiled VM function is ~400 bytes of machine code
per builtin call it makes. The decode-once functions this replaced (decoded at the first call,
behind a flag: take, compare, branch, cache read in every call) were compiled functions of
~4.8 kB each, 9.6 kB of the digits CNN's 35 kB of code.

The dense copies live in TVM's cache as long as the process (it has no owner to free them
with); an artifact loaded twice decodes twice into one entry, with equal values.
"""

from __future__ import annotations

import tvm
from tvm import relax
from tvm.relax import vm_build

from graphc.errors import BackendError

DECODE_ONCE = "graphc.decode_once"  # attr of a decode function: its tensor-cache key
BITS = "graphc.decode_bits"  # attr of a one-codebook decode function: its index width
INIT = "graphc_init"  # the executable's load-time function (board_runner.py spells it too)


def decode_func(prim: relax.GlobalVar, key: str, params: list[relax.Var],
                out: relax.TensorType, bits: int | None = None) -> relax.Function:
    """Relax function (params) -> call_tir(prim, params) as the flat dense weight `out`,
    marked as the decoder of the cached weight `key`. bits: (packed indices, one codebook)
    params, whose relayout decode_permute.py may move into the indices."""
    dense = relax.Var("dense", out)
    body = relax.SeqExpr([relax.BindingBlock([relax.VarBinding(
        dense, relax.call_tir(prim, params, out))])], dense)
    attrs = {DECODE_ONCE: key, **({BITS: bits} if bits is not None else {})}
    return relax.Function(params, body, out, is_pure=True,
                          attrs=tvm.ir.make_node("ir.DictAttrs", **attrs))


def substitute(call: relax.Call, subst: dict) -> relax.Call:
    """call with its variable arguments (also inside a call_tir's argument tuple) replaced
    by subst's values (variables or constants)."""
    def arg(a):
        if isinstance(a, relax.Var):
            return subst.get(a, a)
        if isinstance(a, relax.Tuple):
            return relax.Tuple([arg(f) for f in a.fields])
        return a

    return relax.Call(call.op, [arg(a) for a in call.args], call.attrs, call.ty_args)


def decode_funcs(mod: tvm.IRModule) -> dict:
    """GlobalVar -> function, for the module's decode functions."""
    return {gv: f for gv, f in mod.functions_items()
            if isinstance(f, relax.Function) and f.attrs is not None and DECODE_ONCE in f.attrs}


@tvm.transform.module_pass(opt_level=0, name="GraphcDecodeAtLoad")
def decode_at_load(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
    """Each decode call in main -> a tensor-cache read; the calls -> the INIT function."""
    once = decode_funcs(mod)
    if not once or "main" not in [gv.name_hint for gv in mod.get_global_vars()]:
        return mod
    main_gv = mod.get_global_var("main")
    main = mod[main_gv]
    moved: dict[str, relax.Call] = {}  # key -> the decode call, in main's order
    blocks = []
    for block in main.body.blocks:
        bindings = []
        for b in block.bindings:
            call = b.value
            if isinstance(b, relax.VarBinding) and isinstance(call, relax.Call) \
                    and call.op in once:
                key = str(once[call.op].attrs[DECODE_ONCE])
                if not all(isinstance(a, tvm.ir.expr.Constant) for a in call.args):
                    raise BackendError(f"tvm backend: decoded weight {key} is computed from "
                                       "values that are not constants; it cannot be "
                                       "decoded when the model loads")
                moved.setdefault(key, call)
                b = relax.VarBinding(b.var, relax.call_pure_packed(
                    "vm.builtin.tensor_cache.get", tvm.ir.StringImm(key), ty_args=b.var.ty))
            bindings.append(b)
        blocks.append(type(block)(bindings))
    mod[main_gv] = relax.Function(main.params, relax.SeqExpr(blocks, main.body.body),
                                  main.ret_ty, main.is_pure, main.attrs)
    mod[INIT] = _init_func(moved, mod)
    return relax.transform.Normalize()(mod)


def _init_func(calls: dict[str, relax.Call], mod: tvm.IRModule) -> relax.Function:
    """() -> (weights...): every decode function's body, inlined, its result put into the
    tensor cache under its key. Inlined, a decode function leaves no entry, name or
    argument checks in the executable (its arguments are constants). The weights are also
    returned: TVM's memory planner (StaticPlanBlockMemory) assumes a packed call such as
    the cache update keeps nothing, and would decode the next weight into the storage of
    the last; a function's results are never planned."""
    bindings, weights = [], []
    for key, call in calls.items():
        inlined, weight = _inline(mod[call.op], call.args)
        weights.append(weight)
        stored = relax.Var("stored", relax.ObjectType())
        bindings += [*inlined, relax.VarBinding(stored, relax.Call(
            relax.ExternFunc("vm.builtin.tensor_cache.update"),
            [tvm.ir.StringImm(key), weight, relax.prim_value(tvm.tirx.IntImm("bool", 1))],
            ty_args=[relax.ObjectType()]))]
    body = relax.SeqExpr([relax.BindingBlock(bindings)], relax.Tuple(weights))
    attrs = tvm.ir.make_node("ir.DictAttrs", global_symbol=INIT)
    return relax.Function([], body, relax.TupleType([w.ty for w in weights]), is_pure=False,
                          attrs=attrs)


def _inline(func: relax.Function, args) -> tuple[list, relax.Var]:
    """func's bindings on `args` (fresh variables: one function may be inlined twice),
    and the variable holding its result."""
    subst = dict(zip(func.params, args))
    bindings = []
    for b in func.body.blocks[0].bindings:
        var = relax.Var(b.var.name, b.var.ty)
        bindings.append(relax.VarBinding(var, substitute(b.value, subst)))
        subst[b.var] = var
    return bindings, subst[func.body.body]


def run_init(vm) -> None:
    """Decode the executable's weights into the tensor cache (a no-op without INIT)."""
    if vm.module.implements_function(INIT):
        vm[INIT]()


def build(mod: tvm.IRModule, target: tvm.target.Target, exec_mode: str,
          relax_pipeline: tvm.transform.Pass):
    """relax.build(mod, target, exec_mode=..., relax_pipeline=...), except that INIT and the
    decode functions become VM bytecode whatever exec_mode is (main stays exec_mode)."""
    once = {INIT, *(gv.name_hint for gv in decode_funcs(mod))}
    with target:
        mod = relax_pipeline(mod)
    builder = relax.ExecBuilder()
    if exec_mode != "bytecode" and INIT in [gv.name_hint for gv in mod.get_global_vars()]:
        at_load = {gv: f for gv, f in mod.functions_items()
                   if isinstance(f, relax.Function) and gv.name_hint in once}
        vm_build._vmcodegen(builder, tvm.IRModule(at_load), "bytecode")
        mod = tvm.IRModule({gv: f for gv, f in mod.functions_items() if gv not in at_load},
                           attrs=mod.attrs)
    rest = vm_build._vmcodegen(builder, mod, exec_mode)
    attrs = dict(mod.attrs) if mod.attrs else {}
    return vm_build._vmlink(builder, target, vm_build._filter_tir(rest), "default",
                            list(attrs.get("external_mods", [])),
                            dict(attrs.get("const_name_to_constant", {})))
