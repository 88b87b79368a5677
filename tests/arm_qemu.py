"""Running graphc's ARM artifacts under qemu-aarch64 user-mode emulation, for the tests.

The emulated machine is an aarch64 Python from tools/arm_sysroot.sh (Debian arm64 packages
+ the aarch64 apache-tvm and numpy wheels, no torch, no graphc): the artifact's own
__main__.py runs it, as on a board. Several artifacts share one emulated process (--job):
importing tvm under qemu takes ~4 s.

Missing pieces skip the tests, unless GRAPHC_REQUIRE_ARM is set (CI sets it), then they fail.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

SYSROOT = Path(os.environ.get("GRAPHC_ARM_SYSROOT",
                              Path.home() / ".cache" / "graphc" / "arm64-sysroot"))
PYTHON = SYSROOT / "usr" / "bin" / "python3.11"
REQUIRE = "GRAPHC_REQUIRE_ARM"


def missing() -> list[str]:
    """What the ARM tests need and this machine lacks, with how to get it."""
    need = []
    if shutil.which("qemu-aarch64") is None:
        need.append("qemu-aarch64 (apt-get install qemu-user)")
    if shutil.which("aarch64-linux-gnu-gcc") is None:
        need.append("aarch64-linux-gnu-gcc (apt-get install gcc-aarch64-linux-gnu)")
    if not PYTHON.is_file() or not (SYSROOT / "site-packages" / "tvm").is_dir():
        need.append(f"an aarch64 Python sysroot at {SYSROOT} (tools/arm_sysroot.sh)")
    return need


def require() -> None:
    """Skip (or fail, under GRAPHC_REQUIRE_ARM) when something is missing."""
    need = missing()
    if need and os.environ.get(REQUIRE):
        pytest.fail(f"{REQUIRE} is set but this machine lacks: {'; '.join(need)}")
    if need:
        pytest.skip(f"ARM emulation unavailable: {'; '.join(need)}")


def run_jobs(jobs: list[tuple[Path, dict[str, np.ndarray]]], workdir: Path, cpu: str = "max",
             timeout: int = 300) -> tuple[list[dict[str, np.ndarray]], str]:
    """Run each (artifact, inputs by name) in one emulated aarch64 process on qemu's `cpu`
    model; returns each job's outputs by name, and the process's stdout."""
    args = []
    for n, (artifact, inputs) in enumerate(jobs):
        np.savez(workdir / f"in{n}.npz", **inputs)
        args += ["--job", str(artifact), str(workdir / f"in{n}.npz"), str(workdir / f"out{n}.npz")]
    env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(SYSROOT / "site-packages"),
           "TVM_NUM_THREADS": "1"}  # one emulated core: the host's others stay free
    cmd = ["qemu-aarch64", "-cpu", cpu, "-L", str(SYSROOT), str(PYTHON), str(jobs[0][0]), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout,
                          check=False)
    if proc.returncode != 0:
        raise AssertionError(f"qemu run failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n"
                             f"{proc.stderr[-3000:]}")
    outs = []
    for n in range(len(jobs)):
        with np.load(workdir / f"out{n}.npz") as data:
            outs.append({k: data[k] for k in data.files})
    return outs, proc.stdout
