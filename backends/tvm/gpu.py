"""NVIDIA GPUs: the cuda target's architecture, whether a GPU is here, and compiling kernels.

TVM 0.27's CUDA code generator that calls a CUDA compiler lives in libtvm_runtime_cuda.so,
which needs the NVIDIA driver (libcuda.so.1). On a machine without one (CI, this build
host) TVM keeps the kernels as CUDA C source inside the module instead; the CUDA runtime
compiles them when a GPU machine loads the library (CUDAModuleNode::JitCompileFromSource,
through the Python callback `tvm_callback_cuda_compile` in tvm.support.nvcc). So a cuda
artifact built anywhere runs on any NVIDIA GPU that TVM's runtime supports, compiled for
that GPU on first load. `prepare()` registers the callback and picks its compiler.
"""

from __future__ import annotations

import importlib.util
import os
import shutil

import tvm

from graphc.errors import BackendError

# Without a GPU to ask, code is generated for Ampere (A100, RTX 30xx): the schedules use its
# tensor cores, shared memory and fp16 arithmetic; newer GPUs run it (sources are compiled
# for the GPU that loads them). Name another arch in a full target for older GPUs.
DEFAULT_ARCH = "sm_80"
COMPILE_MODE = "TVM_CUDA_COMPILE_MODE"  # tvm.support.nvcc's switch: "nvrtc" or "nvcc"
INSTALL = ("pip install cuda-bindings nvidia-cuda-nvrtc (NVRTC, TVM's default), or put the "
           "CUDA toolkit's nvcc on PATH")


def present(kind: str = "cuda") -> bool:
    """Whether a device of this TVM target kind exists here (False without its driver)."""
    try:
        return bool(tvm.device(kind).exist)
    except Exception:  # noqa: BLE001  (no runtime for the kind at all)
        return False


def cuda_target() -> dict:
    """The "cuda" preset: this machine's GPU when one is visible, else DEFAULT_ARCH."""
    if present("cuda"):
        dev = tvm.cuda()
        return {"kind": "cuda", "arch": "sm_" + dev.compute_version.replace(".", ""),
                "max_shared_memory_per_block": dev.max_shared_memory_per_block,
                "max_threads_per_block": dev.max_threads_per_block,
                "thread_warp_size": dev.warp_size}
    return {"kind": "cuda", "arch": DEFAULT_ARCH}


def compile_mode() -> str | None:
    """The compiler the runtime will use for CUDA sources: $TVM_CUDA_COMPILE_MODE, else NVRTC
    where cuda-bindings is installed, else nvcc where it is on PATH; None: neither."""
    if os.environ.get(COMPILE_MODE):
        return os.environ[COMPILE_MODE]
    if importlib.util.find_spec("cuda") is not None and \
            importlib.util.find_spec("cuda.bindings") is not None:
        return "nvrtc"
    return "nvcc" if shutil.which("nvcc") else None


def prepare() -> None:
    """Before loading or running a CUDA module: register TVM's CUDA-compile callback with a
    compiler that exists here, or say what to install."""
    mode = compile_mode()
    if mode is None:
        raise BackendError(f"cuda: the model's kernels are CUDA source, compiled when the GPU "
                           f"loads them, and no CUDA compiler was found: {INSTALL}")
    os.environ.setdefault(COMPILE_MODE, mode)
    import tvm.support.nvcc  # noqa: F401  (registers tvm_callback_cuda_compile)


def no_gpu_reason(description: str) -> str:
    """The error for running a CUDA model on a machine without a usable GPU."""
    return (f"this model was compiled for {description!r} and this machine has no usable "
            "NVIDIA GPU (tvm.cuda() does not exist: no GPU, or no driver libcuda.so.1): save "
            "it with cm.save('model.graphc') and run it on a GPU machine with graphc, or with "
            "`python3 model.graphc --inputs x.npz` (docs/targets.md, section cuda)")


def device_modules(module, kind: str = "cuda") -> list:
    """The device-code modules (kind "cuda") imported anywhere under a built module."""
    found, stack = [], [module]
    while stack:
        m = stack.pop()
        found += [m] if m.kind == kind else []
        stack.extend(m.imports)
    return found


def source(module) -> str:
    """The CUDA C source of a built module's kernels (what the GPU compiles on load)."""
    return "\n".join(m.inspect_source("") for m in device_modules(module))
