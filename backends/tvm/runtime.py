"""Running a built TVM module: the Relax VM behind graphc's Runner protocol, and its files.

Saved files (inside the graphc artifact's runner/ folder):
    lib.so        executable.export_library(): kernels + VM bytecode + constants (weights),
                  linked for the target's architecture (cross.py picks the linker)
    runner.json   the target it was built for, to warn before running on a different CPU
and, at the artifact's top level, __main__.py (board_runner.py): `python3 model.graphc`
runs the model with tvm + numpy only, on the device it was built for.

A model built for another architecture (target "arm" on x86), or for a GPU this machine does
not have (target "cuda" without one), gets a ForeignRunner: it saves and shows its code, and
calling it raises an error that says where and how to run it. On a GPU, inputs are copied to
the device and outputs back (gpu.py: CUDA kernels compile when the library loads).
"""

from __future__ import annotations

import json
import os
import threading
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import tvm
from tvm import relax
from tvm.target import codegen

from graphc.compiled import ArtifactError
from graphc.errors import BackendError, GraphcError

from . import cross, decode_once, gpu, runner_source, strip

LIB_FILE = "lib.so"
INFO_FILE = "runner.json"
MAIN_FILE = Path(__file__).with_name("board_runner.py")  # the artifact's __main__.py
ALIGNMENT = 64  # TVM's kernels assume 64-byte aligned buffers; from_dlpack checks it


class _Built:
    """What every TVM runner has: the files save() writes and the generated code."""

    def __init__(self, export: Callable[[Path], None], info: dict, code=None):
        self._export = export
        self.info = info
        self._code = code  # the executable's module tree; None once loaded from a file

    def save(self, directory: Path) -> None:
        self._export(directory / LIB_FILE)
        (directory / INFO_FILE).write_text(json.dumps(self.info))

    def save_library(self, path: Path) -> None:
        """Only lib.so (what an RPC device loads: remote.py)."""
        self._export(path)

    def benchmark_remote(self, inputs, remote: str, **timing) -> dict:
        """Time the model on an RPC device (remote.py); timing: repeat, warmup, number."""
        from .remote import benchmark

        return benchmark(self, inputs, remote, **timing)

    def main_script(self) -> str:
        """The artifact's __main__.py: runs it without graphc or torch (board_runner.py,
        shipped without its docstrings and comments: runner_source.py)."""
        return runner_source.shipped(MAIN_FILE.read_text())

    def source(self, fmt: str = "asm") -> str:
        """The kernels' generated code ("asm" or "ll" for CPU kernels, "cuda" for the GPU
        kernels' CUDA C), for a model compiled in this process."""
        if self._code is None:
            raise GraphcError("source(): only a model compiled in this process has its "
                              "generated code; a loaded artifact holds machine code only")
        if fmt == "cuda":
            return gpu.source(self._code)
        kernels = [m for m in self._code.imports if m.kind == "llvm"]
        return "\n".join(m.inspect_source(fmt) for m in kernels)


class ForeignRunner(_Built):
    """A model built for another machine's architecture: saves, refuses to run."""

    def convert(self, inputs):
        raise BackendError(cross.foreign_reason(self.info["target"], _built_for(self.info)))

    run = outputs = convert


class TVMRunner(_Built):
    """Runs `main` of a Relax VM executable on its device (graphc.compiled.Runner protocol)."""

    def __init__(self, module, export: Callable[[Path], None], info: dict, code=None):
        super().__init__(export, info, code)
        self.device = _device(info)
        self.vm = relax.VirtualMachine(module, self.device)
        decode_once.run_init(self.vm)  # shared / sparse weights: decoded once, here
        self.main = self.vm["main"]  # looked up once: the lookup shows in small benchmarks
        self._threads: int | None = None

    @property
    def num_threads(self) -> int | None:
        """Threads TVM's pool uses for this model's kernels; None: all (TVM_NUM_THREADS)."""
        return self._threads

    @num_threads.setter
    def num_threads(self, n: int | None) -> None:
        if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 1):
            raise GraphcError(f"num_threads must be a positive int or None, got {n!r}")
        if n is not None and n > max_threads():
            warnings.warn(f"num_threads={n}: TVM's thread pool has {max_threads()} threads "
                          "(TVM_NUM_THREADS when TVM started); using that many", stacklevel=3)
        self._threads = n

    def convert(self, inputs):
        return [_to_tvm(x, self.device) for x in inputs]

    def run(self, native_inputs):
        _use_threads(self._threads or 0)
        out = self.main(*native_inputs)
        if self.device.dlpack_device_type() != tvm.cpu().dlpack_device_type():
            self.device.sync()  # GPU kernels run asynchronously: a timed run() must wait
        return out

    def outputs(self, native_outputs):
        # main returns a tuple (the importer keeps the user's output structure flat).
        if isinstance(native_outputs, tvm.runtime.Tensor):
            native_outputs = [native_outputs]
        return [t.numpy() for t in native_outputs]


def runner_from_executable(executable, info: dict) -> _Built:
    """A runner over a freshly built executable (export_library links lib.so on save, with
    the cross linker when the target is another architecture)."""
    config = info["target"]

    def export(path: Path) -> None:
        strip.export_library(executable, path, cross.fcompile(config))  # no debug info

    if not cross.runs_here(config):
        return ForeignRunner(export, info, executable.mod)
    if config.get("kind", "llvm") != "llvm":
        gpu.prepare()  # kernels kept as CUDA source compile when the VM loads them
    return TVMRunner(executable, export, info, executable.mod)


def load_runner(directory: Path) -> TVMRunner:
    """Rebuild a TVMRunner from the files TVMRunner.save wrote (used by graphc.load)."""
    lib, info_file = directory / LIB_FILE, directory / INFO_FILE
    if not lib.is_file() or not info_file.is_file():
        raise ArtifactError(f"tvm backend: artifact lacks {LIB_FILE} or {INFO_FILE}")
    info = json.loads(info_file.read_text())
    data = lib.read_bytes()  # kept to save again: a loaded module cannot be re-exported
    if not cross.runs_here(info.get("target", {})):
        return ForeignRunner(lambda path: Path(path).write_bytes(data), info)
    _warn_if_other_cpu(info)
    if info.get("target", {}).get("kind", "llvm") != "llvm":
        gpu.prepare()  # the CUDA kernels compile as the library loads
    try:
        module = tvm.runtime.load_module(str(lib))
        runner = TVMRunner(module, lambda path: Path(path).write_bytes(data), info)
    except Exception as e:  # dlopen / VM loading errors come as TVM's own error types
        raise ArtifactError(f"tvm backend: cannot load the compiled library: {e}") from e
    return runner


# TVM's thread pool is per calling thread; runtime.config_threadpool(mode, n) sets how many of
# its workers the next kernels use (n = 0: all of them), up to the pool size fixed at start-up
# by TVM_NUM_THREADS. Mode 0 keeps the workers' CPU affinity as TVM set it.
_pool = threading.local()


def _use_threads(n: int) -> None:
    if getattr(_pool, "threads", 0) != n:
        tvm.get_global_func("runtime.config_threadpool")(0, n)
        _pool.threads = n


def max_threads() -> int:
    """The TVM pool's size: TVM_NUM_THREADS (set to the core count by graphc.backends.tvm)."""
    value = os.environ.get("TVM_NUM_THREADS") or os.environ.get("OMP_NUM_THREADS")
    try:
        return max(1, int(value)) if value else max(1, (os.cpu_count() or 2) // 2)
    except ValueError:
        return 1


def _built_for(info: dict) -> str:
    return info.get("preset") or info["target"].get("mtriple") or "another machine"


def _warn_if_other_cpu(info: dict) -> None:
    # An artifact built for "cpu" uses every ISA extension of the build host; on a CPU without
    # them it dies with SIGILL, so say so before the first call.
    built_for = info.get("host_cpu")
    here = codegen.llvm_get_system_cpu()
    if info.get("preset") == "cpu" and built_for and built_for != here:
        warnings.warn(f"graphc artifact was built for CPU {built_for!r} (target 'cpu') and is "
                      f"loaded on {here!r}; if it crashes, recompile with target='x86'",
                      stacklevel=3)


def _device(info: dict) -> tvm.runtime.Device:
    # TVM names the CPU target kind "llvm"; GPU kinds ("cuda") name their device too.
    kind = info["target"].get("kind", "llvm")
    return tvm.cpu() if kind == "llvm" else tvm.device(kind)


def _to_tvm(x, device: tvm.runtime.Device) -> tvm.runtime.Tensor:
    on_cpu = device.dlpack_device_type() == tvm.cpu().dlpack_device_type()
    if isinstance(x, torch.Tensor):
        x = x.detach()
        if x.is_cuda and not on_cpu:
            return tvm.runtime.from_dlpack(x.contiguous())  # already on the GPU: zero copy
        x = x.cpu().contiguous()
        if on_cpu and x.data_ptr() % ALIGNMENT == 0 and x.numel() > 0:
            return tvm.runtime.from_dlpack(x)  # zero copy
        x = x.numpy()
    # reshape: np.ascontiguousarray makes a 0-d array 1-d, which main's shape check refuses
    return tvm.runtime.tensor(np.ascontiguousarray(x).reshape(np.shape(x)), device=device)
