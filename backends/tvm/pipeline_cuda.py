"""The TVM CUDA pipeline: the same four phases as pipeline.py, with GPU pass lists.

    import     as for CPUs (lower.py; graphc:: ops lower to the same Relax ops)
    optimize   Relax: decompose for inference, [fp16: ToMixedPrecision], legalize with TVM's
               own rules, fold, fuse                                         dump "relax-opt"
    schedule   dlight's GPU rules (TVM's relax/backend/cuda/pipeline.py)    dump "tir"
    build      Relax VM lowering with CUDA graph capture available, TIR -> CUDA C + LLVM host

pipeline.py picks this module's lists for targets of kind "cuda" (its PHASES table).
"""

from __future__ import annotations

import tvm
from tvm import relax
from tvm.s_tir import dlight

from graphc.errors import BackendError

from .decode_once import decode_at_load

# The CPU build compiles main to one TIR function; that mode has not been tried on a GPU
# here (no GPU in CI), so CUDA keeps the VM's bytecode, as TVM's own CUDA pipeline does.
EXEC_MODE = "bytecode"

# options["precision"] -> passes that set it. ToMixedPrecision casts the inputs of matmuls
# and convolutions to float16 and keeps their accumulators (out_dtype) in float32; the ops
# between them follow their inputs' dtype, and main's signature stays float32.
PRECISIONS = {
    "float32": list,
    "float16": lambda: [relax.transform.ToMixedPrecision(out_dtype="float32")],
}

# dlight's GPU rules in TVM's order: Matmul (shared-memory tiles; fp16 / int8 tensor cores
# on sm_70+ when every dimension exceeds 64), GEMV (matrix x vector: batch-1 linears),
# Reduction and GeneralReduction (softmax, layer norm, pooling: one row per thread block),
# Fallback (anything else: flat thread binding, so no kernel runs on one GPU thread).
GPU_RULES = [dlight.gpu.Matmul, dlight.gpu.GEMV, dlight.gpu.Reduction,
             dlight.gpu.GeneralReduction, dlight.gpu.Fallback]


def optimize_passes(target: tvm.target.Target, options: dict | None = None) -> list:
    """Relax -> fused Relax calling unscheduled TIR kernels. graphc's CPU legalizations
    (legalize.py: fast_erf / fast_exp in place of libm calls) are left out: on the GPU, erff
    and expf are device intrinsics, and dlight's reduction rules expect TVM's softmax."""
    precision = (options or {}).get("precision", "float32")
    if precision not in PRECISIONS:
        raise BackendError(f"cuda: unknown precision {precision!r} (known: "
                           f"{', '.join(PRECISIONS)})")
    return [
        relax.transform.DecomposeOpsForInference(),
        relax.transform.CanonicalizeBindings(),
        *PRECISIONS[precision](),
        relax.backend.DispatchSampling(),
        relax.backend.DispatchSortScan(),
        relax.transform.LegalizeOps(),
        relax.transform.AnnotateTIROpPattern(),
        relax.transform.FoldConstant(),
        relax.transform.FuseOps(),
        relax.transform.FuseTIR(),
        relax.transform.DeadCodeElimination(),
    ]


def schedule_passes(target: tvm.target.Target, tuning=None, report=None) -> list:
    """Every kernel gets a GPU schedule: Fallback takes whatever the others decline (a kernel
    without thread binding would run on the host CPU, on GPU pointers). Lowering rules leave
    their kernels unscheduled for non-CPU targets (im2col.py), so this list sees them all.
    tuning / report: pipeline.py's signature; the CUDA search is refused before this."""
    # decoded weights (codebook, sparse): decoded by the init function when the model loads
    return [dlight.ApplyDefaultSchedule(*(r() for r in GPU_RULES)), decode_at_load,
            relax.transform.DeadCodeElimination()]


def build_passes(target: tvm.target.Target) -> list:
    """TVM's CUDA dataflow-lower and finalize lists (relax/backend/cuda/pipeline.py)."""
    return [
        relax.transform.RewriteDataflowReshape(),
        relax.transform.ToNonDataflow(),
        relax.transform.RemovePurityChecking(),
        relax.transform.CallTIRRewrite(),
        relax.transform.StaticPlanBlockMemory(),
        # captures static launch sequences as CUDA graphs when the PassContext config
        # relax.backend.use_cuda_graph is set; a no-op otherwise
        relax.transform.RewriteCUDAGraph(),
        relax.transform.LowerAllocTensor(),
        relax.transform.KillAfterLastUse(),
        relax.transform.LowerRuntimeBuiltin(),
        relax.transform.ComputePrimValue(),
        relax.transform.VMShapeLower(),
        relax.transform.AttachGlobalSymbol(),
    ]
