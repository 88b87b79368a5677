"""Which machine a built model runs on, and the linker that makes its shared library.

A target's LLVM triple names the architecture of the code (the "cpu" preset and targets
without a triple are this host's). Code for another architecture cannot run here: the
runner says so instead of crashing, and export_library links it with that architecture's
cross linker from the ARCHES table.
"""

from __future__ import annotations

import platform
import shutil
from dataclasses import dataclass

from graphc.errors import BackendError


@dataclass(frozen=True)
class Arch:
    machines: tuple[str, ...]  # platform.machine() names of hosts that run this code
    cross_cc: str              # the GCC driver that links for it on another host
    package: str               # where cross_cc comes from (Debian/Ubuntu package)


# triple's first component -> the architecture
ARCHES: dict[str, Arch] = {
    "x86_64": Arch(("x86_64", "amd64", "AMD64"), "x86_64-linux-gnu-gcc",
                   "gcc-x86-64-linux-gnu"),
    "aarch64": Arch(("aarch64", "arm64"), "aarch64-linux-gnu-gcc", "gcc-aarch64-linux-gnu"),
}


def target_arch(config: dict) -> str | None:
    """'aarch64' for mtriple aarch64-linux-gnu; None when the target has no triple (the
    host's)."""
    triple = config.get("mtriple") or ""
    return triple.split("-")[0] or None


def host_arch() -> str:
    machine = platform.machine()
    return next((name for name, a in ARCHES.items() if machine in a.machines), machine)


def runs_here(config: dict) -> bool:
    """Whether code built for the target config (target_config(target)) runs on this host."""
    if config.get("kind", "llvm") != "llvm":  # a GPU: runs where one is (gpu.py)
        from .gpu import present

        return present(config["kind"])
    return _native(config)


def _native(config: dict) -> bool:
    arch = target_arch(config)
    return arch is None or arch == host_arch()


def cpu_part(config: dict) -> dict:
    # A GPU target's CPU code (kernel launches, the VM) is its host target's.
    return config if config.get("kind", "llvm") == "llvm" else (config.get("host") or {})


def foreign_reason(config: dict, description: str) -> str:
    """The error for running a model built for another architecture, saying what to do."""
    if config.get("kind", "llvm") != "llvm":
        from .gpu import no_gpu_reason

        return no_gpu_reason(description)
    return (f"this model was compiled for {description!r} ({target_arch(config)}) and cannot "
            f"run on this {host_arch()} host: save it with cm.save('model.graphc'), copy the "
            "file to the device and run `python3 model.graphc --inputs x.npz` there (needs "
            "`pip install apache-tvm numpy`; see docs/targets.md)")


def fcompile(config: dict):
    """export_library's fcompile for the target: None (the host's cc) for native code, the
    cross linker's driver for another architecture."""
    config = cpu_part(config)
    if _native(config):
        return None
    arch = target_arch(config)
    if arch not in ARCHES:
        raise BackendError(f"tvm backend: no cross linker known for triple "
                           f"{config.get('mtriple')!r}; add a row to "
                           "graphc.backends.tvm.cross.ARCHES")
    cc = ARCHES[arch].cross_cc
    if shutil.which(cc) is None:
        raise BackendError(f"tvm backend: linking for {arch} needs the cross linker {cc!r}, "
                           f"which is not on PATH: apt-get install {ARCHES[arch].package}")
    from tvm.support import cc as tvm_cc

    return tvm_cc.cross_compiler(cc)
