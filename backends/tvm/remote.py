"""Measuring a compiled model on another machine through TVM's RPC, as TVM users measure on
boards: the board runs `python -m tvm.exec.rpc_server`, this side uploads the model's
library, loads it there, runs the Relax VM there and times it with the remote
time_evaluator (the clock is the board's; the network is outside the timed region).

    cm.benchmark(remote="192.168.1.7:9090")            an RPC server, directly
    cm.benchmark(remote="tracker-host:9190/rasp4")     a device of key rasp4 from a tracker

Works for models this machine cannot run (target "arm" measured on an aarch64 board). A
library for another architecture than the remote's is refused before uploading.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tvm import rpc

from graphc.errors import BackendError

from . import cross
from .decode_once import INIT

TIMEOUT_S = 60  # a session waiting longer for its device than this is likely misconfigured


@dataclass(frozen=True)
class Remote:
    host: str
    port: int
    key: str | None  # None: an RPC server; else the device key to request from a tracker

    def __str__(self) -> str:
        return f"{self.host}:{self.port}" + (f"/{self.key}" if self.key else "")


def parse(spec: str) -> Remote:
    """'host:port' (an RPC server) or 'host:port/key' (a tracker and a device key)."""
    address, _, key = str(spec).partition("/")
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise BackendError(f"remote {spec!r}: expected 'host:port' (an RPC server) or "
                           "'host:port/key' (an RPC tracker and a device key)")
    return Remote(host, int(port), key or None)


def connect(remote: Remote) -> rpc.RPCSession:
    """A session on the remote device; errors say how to start the server or tracker."""
    try:
        if remote.key is None:
            return rpc.connect(remote.host, remote.port, session_timeout=0)
        tracker = rpc.connect_tracker(remote.host, remote.port)
        return tracker.request(remote.key, priority=1, session_timeout=0)
    except Exception as e:  # socket errors, TVM errors, tracker refusals
        what = "RPC tracker" if remote.key else "RPC server"
        raise BackendError(f"remote {remote}: cannot reach the {what} ({type(e).__name__}: "
                           f"{e}); on the device run `python -m tvm.exec.rpc_server --host "
                           "0.0.0.0 --port 9090` (docs/targets.md, section remote)") from e


def remote_arch(session: rpc.RPCSession) -> str | None:
    """The remote's CPU architecture ('x86_64', 'aarch64'), where its TVM can say (a full TVM
    has LLVM's host triple; a runtime-only TVM does not: then None)."""
    try:
        triple = session.get_function("target.llvm_get_system_triple")()
    except Exception:  # noqa: BLE001  (no such function on a runtime-only TVM)
        return None
    return cross.target_arch({"mtriple": str(triple)})


def check_arch(info: dict, description: str, arch: str | None, remote: Remote) -> None:
    """Refuse a library for another architecture than the remote's, before uploading it."""
    config = cross.cpu_part(info["target"])
    built = cross.target_arch(config) or cross.host_arch()
    if arch is not None and built != arch:
        raise BackendError(f"remote {remote}: the model was compiled for {description!r} "
                           f"({built}) but the remote is {arch}: compile for the remote's "
                           f"architecture (target 'arm' for an aarch64 board, 'x86' for x86-64)")


def benchmark(runner, inputs: list, remote: str, *, repeat: int, warmup: int,
              number: int) -> dict:
    """Upload the runner's library to `remote`, run it there on `inputs` (numpy arrays) and
    time main there: the statistics of CompiledModel.benchmark, in ms per call."""
    where = parse(remote)
    session = connect(where)
    check_arch(runner.info, runner.info.get("preset") or "its target", remote_arch(session),
               where)
    with tempfile.TemporaryDirectory(prefix="graphc-remote-") as tmp:
        lib = Path(tmp) / "model.so"
        runner.save_library(lib)
        session.upload(str(lib))
    try:
        module = session.load_module("model.so")
    except Exception as e:  # dlopen errors come back as TVM errors
        raise BackendError(f"remote {where}: the device could not load the model's library "
                           f"({e}); was it compiled for this device's architecture?") from e
    return _time(session, module, runner.info, inputs, repeat, warmup, number) | {
        "remote": str(where)}


def _time(session, module, info: dict, inputs: list, repeat: int, warmup: int,
          number: int) -> dict:
    from tvm import relax

    kind = info["target"].get("kind", "llvm")
    device = session.cpu() if kind == "llvm" else session.device(kind)
    vm = relax.VirtualMachine(module, device)
    if vm.module.implements_function(INIT):  # decode shared / sparse weights, as at load
        vm.set_input(INIT)
        vm.invoke_stateful(INIT)
    vm.set_input("main", *[_tensor(x, device) for x in inputs])
    # invoke_stateful: main's tuple result stays on the device (returning it over RPC fails)
    if warmup > 0:
        vm.time_evaluator("invoke_stateful", device, number=1, repeat=warmup)("main")
    timer = vm.time_evaluator("invoke_stateful", device, number=number, repeat=repeat)
    ms = np.asarray([float(r) * 1e3 for r in timer("main").results])
    return {"median": float(np.median(ms)), "mean": float(ms.mean()), "min": float(ms.min()),
            "max": float(ms.max()), "p90": float(np.percentile(ms, 90)),
            "std": float(ms.std()), "repeat": repeat, "number": number}


def _tensor(x, device):
    from tvm.runtime import tensor

    return tensor(np.ascontiguousarray(x), device=device)
