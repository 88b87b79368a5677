"""The TVM CPU pipeline: ExportedProgram -> CompiledModel, as four named phases.

    import     TVM's PyTorch importer + graphc's lowering rules (lower.py)    dump "relax"
    optimize   Relax: decompose for inference, legalize to TIR, fold, fuse     dump "relax-opt"
    schedule   tuned schedules from the MetaSchedule database (tuning.py), then
               the default rule table, one rule per op class (schedules/)    dump "tir"
    build      Relax VM lowering (main compiled to TIR, not bytecode; the load-time init
               function of decode_once.py to bytecode), TIR -> LLVM codegen

Each phase is a list of passes (like TVM's relax/backend/*/pipeline.py), so a later target or
a tuned schedule replaces one list, not the driver. PHASES names, per TVM target kind, the
module with the kind's lists: this one for CPUs, pipeline_cuda.py for NVIDIA GPUs.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable
from contextlib import contextmanager

import torch
import tvm
from tvm import relax
from tvm.s_tir import dlight

from graphc.compiled import CompiledModel
from graphc.errors import BackendError, GraphcError
from graphc.spec import TensorSpec

from . import cross, decode_once
from .decode_chain import cache_decoded_chains, mark_decoded_layout_free
from .legalize import LEGALIZATIONS
from .lower import import_program
from .nhwc import layout_passes
from .pad_into_conv import pad_into_conv
from .runtime import runner_from_executable
from .schedules import default_rules, layout
from .target import resolve_target, target_config
from .tuning import TuningOptions, TuningReport, tuned_schedules
from .winograd import winograd_passes

Dump = Callable[[str, str], None]

# TVM target kind -> the module (relative to this package) whose optimize_passes,
# schedule_passes, build_passes and EXEC_MODE that kind compiles with
PHASES = {"llvm": ".pipeline", "cuda": ".pipeline_cuda"}

# exec_mode="compiled": main becomes one compiled function instead of VM bytecode
# (MobileNetV2 4.98 -> 4.87 ms, MiniLM 14.8 -> 14.7 ms; ~240 and ~1100 calls)
EXEC_MODE = "compiled"


def optimize_passes(target: tvm.target.Target, options: dict | None = None) -> list:
    """Relax -> fused Relax calling unscheduled TIR kernels."""
    return [
        # batch_norm (inference) becomes elementwise arithmetic that FuseOps fuses into the
        # conv before it (as the conv's epilogue) and FoldConstant partly folds (sqrt(var+eps)).
        relax.transform.DecomposeOpsForInference(),
        relax.transform.CanonicalizeBindings(),
        pad_into_conv,  # before FuseOps would fuse each pad into its producer's kernel
        *layout_passes(options or {}),  # conv layout: NHWC unless the target says NCHW (nhwc.py)
        *winograd_passes(options or {}),  # 3x3 stride-1 NHWC convs -> Winograd (winograd.py)
        relax.backend.DispatchSampling(),
        relax.backend.DispatchSortScan(),
        relax.transform.LegalizeOps(customize_legalize_map=LEGALIZATIONS),
        relax.transform.AnnotateTIROpPattern(),
        relax.transform.FoldConstant(),
        relax.transform.FuseOps(),
        relax.transform.FuseTIR(),
        relax.transform.DeadCodeElimination(),
    ]


def schedule_passes(target: tvm.target.Target, tuning: TuningOptions | None = None,
                    report: TuningReport | None = None) -> list:
    """Schedules for the TIR kernels: records from the tuning database (after a search when
    tuning.trials > 0), then the default rule table (schedules/), one rule per op class, for
    the kernels still unscheduled; kernels no rule takes stay unscheduled loop nests."""
    # layout.before/after_schedule: rules may repack constant weights into their kernel's
    # layout; these Relax passes fold that repacking into the constants at compile time.
    return [
        *layout.before_schedule(),
        mark_decoded_layout_free,  # decoded weights get packed like constant ones
        tuned_schedules(target, tuning, report),
        dlight.ApplyDefaultSchedule(*default_rules(target)),
        *layout.after_schedule(),
        # decoded weights (codebook, sparse) are not constants: their relayout moves into
        # the decode functions instead of running per call
        cache_decoded_chains,
        decode_once.decode_at_load,  # decoded by the init function; main reads the cache
        relax.transform.DeadCodeElimination(),
    ]


def build_passes(target: tvm.target.Target) -> list:
    """Relax -> VM-ready Relax: explicit memory, planned buffers, lowered shapes (the
    dataflow-lower and finalize lists of TVM's cpu_generic pipeline)."""
    return [
        relax.transform.RewriteDataflowReshape(),
        relax.transform.ToNonDataflow(),
        relax.transform.RemovePurityChecking(),
        relax.transform.CallTIRRewrite(),
        relax.transform.StaticPlanBlockMemory(),
        relax.transform.LowerAllocTensor(),
        relax.transform.KillAfterLastUse(),
        relax.transform.LowerRuntimeBuiltin(),
        relax.transform.ComputePrimValue(),
        relax.transform.VMShapeLower(),
        relax.transform.AttachGlobalSymbol(),
    ]


def build(ep: torch.export.ExportedProgram, *, input_specs: list[TensorSpec],
          output_specs: list[TensorSpec], single_output: bool, target="cpu",
          dump: Dump | None = None, tuning: TuningOptions | None = None) -> CompiledModel:
    """Compile a core-ATen ExportedProgram for a CPU target with TVM. tuning: the MetaSchedule
    search budget and database (tuning.py); None applies the default database's records."""
    resolved = resolve_target(target)
    tgt = resolved.target
    phases = _phases(tgt)
    _check_tuning(tuning, resolved)
    seconds: dict[str, float] = {}
    tuned = TuningReport()
    with _phase("import", seconds, tgt):
        mod = import_program(ep, tgt)
        _check_signature(mod, input_specs, output_specs)
    _dump(dump, "relax", mod.script)
    # tirx.disable_assert: the only AssertStmts left by then are the argument checks that
    # MakePackedAPI wraps around every kernel (graphc's own TIR has none). The kernels are
    # called only by main, whose inputs are checked by the VM (check_tensor_info, match_shape)
    # and before that by CompiledModel / the board runner; the checks were half of lib.so's
    # code (digits CNN: .text 37.6 -> 20.4 kB fp32).
    with tvm.transform.PassContext(opt_level=3, config={"tirx.disable_assert": True}), tgt:
        with _phase("optimize", seconds, tgt):
            mod = tvm.transform.Sequential(phases.optimize_passes(tgt, resolved.options))(mod)
        _dump(dump, "relax-opt", mod.script)
        with _phase("schedule", seconds, tgt):
            mod = tvm.transform.Sequential(phases.schedule_passes(tgt, tuning, tuned))(mod)
        _dump(dump, "tir", lambda: _tir_script(mod))
        with _phase("build", seconds, tgt):
            executable = decode_once.build(mod, tgt, phases.EXEC_MODE,
                                           tvm.transform.Sequential(phases.build_passes(tgt)))
    info = {"target": target_config(tgt), "preset": resolved.preset,
            "host_cpu": tvm.target.codegen.llvm_get_system_cpu(), "options": resolved.options}
    meta = {"tvm": {"version": tvm.__version__, "phase_seconds": seconds, **info,
                    "tuning": tuned.row()}}
    return CompiledModel(runner_from_executable(executable, info), input_specs=input_specs,
                         output_specs=output_specs, single_output=single_output,
                         target=resolved.description, backend="tvm", meta=meta)


def _phases(target: tvm.target.Target):
    kind = target.kind.name
    if kind not in PHASES:
        raise BackendError(f"tvm backend: no pipeline for target kind {kind!r} (known: "
                           f"{', '.join(PHASES)}); add a row to pipeline.PHASES")
    return importlib.import_module(PHASES[kind], __package__)


def _check_tuning(tuning: TuningOptions | None, resolved) -> None:
    if tuning is not None and tuning.trials > 0 and resolved.target.kind.name != "llvm":
        raise BackendError(f"tune: graphc searches schedules for CPU targets only; target "
                           f"{resolved.description!r} uses dlight's GPU rules: compile with "
                           "tune=0")
    # A search measures candidate kernels by running them: another architecture's need a
    # device of that architecture behind an RPC tracker (tuning.remote).
    if tuning is not None and tuning.trials > 0 and tuning.remote is None and not \
            cross.runs_here(target_config(resolved.target)):
        raise BackendError(f"tune: target {resolved.description!r} does not run on this "
                           f"{cross.host_arch()} host, so its kernels cannot be measured here; "
                           "compile with tune=0 (the default schedules), or measure on the "
                           "device: GRAPHC_TUNING_REMOTE=tracker-host:port/key (docs/targets.md)")


@contextmanager
def _phase(name: str, seconds: dict, target: tvm.target.Target):
    """Time a phase; turn TVM's errors into a BackendError that names the phase."""
    start = time.perf_counter()
    try:
        yield
    except GraphcError:
        raise
    except Exception as e:
        raise BackendError(f"tvm backend: phase '{name}' failed for target {target}: "
                           f"{type(e).__name__}: {e}") from e
    seconds[name] = round(time.perf_counter() - start, 4)


def _dump(dump: Dump | None, stage: str, text: Callable[[], str]) -> None:
    # Printing TVMScript of a large model takes seconds: only when someone listens.
    if dump is not None:
        dump(stage, text())


def _tir_script(mod: tvm.IRModule) -> str:
    prim_funcs = {gv: f for gv, f in mod.functions.items() if isinstance(f, tvm.tirx.PrimFunc)}
    return tvm.IRModule(prim_funcs).script()


def _check_signature(mod: tvm.IRModule, input_specs: list[TensorSpec],
                     output_specs: list[TensorSpec]) -> None:
    # The importer's view of the program must agree with graphc's specs, or the runner would
    # read outputs in the wrong order; catch it at build time with both sides named.
    main = mod["main"]
    ret = main.ret_ty  # TVM 0.27 renamed struct_info to ty (TupleType, TensorType)
    outs = list(ret.fields) if isinstance(ret, tvm.ir.TupleType) else [ret]
    got_in = [_type(p.ty) for p in main.params]
    got_out = [_type(t) for t in outs]
    want_in = [(tuple(s.shape), _dtype(s.dtype)) for s in input_specs]
    want_out = [(tuple(s.shape), _dtype(s.dtype)) for s in output_specs]
    if got_in != want_in or got_out != want_out:
        raise BackendError(f"tvm backend: imported signature {got_in} -> {got_out} differs from "
                           f"the graph's specs {want_in} -> {want_out}")


def _type(t) -> tuple:
    shape = tuple(int(d) for d in t.shape) if getattr(t, "shape", None) is not None else None
    return shape, str(getattr(t, "dtype", t))


def _dtype(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
