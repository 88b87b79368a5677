"""Target presets: a short name -> a TVM target (as a dict), or a full TVM target passed through.

    "cpu"   this host: LLVM's name for the host CPU as mcpu, so LLVM may use every ISA
            extension it has (AVX2/FMA, AVX-512, ...). Artifacts may not run on older CPUs.
    "x86"   any x86-64 machine from about 2009 on (x86-64-v2: SSE4.2, POPCNT; no AVX).
    "arm"   64-bit ARM (aarch64, armv8-a + NEON), cross-compiled: any aarch64 Linux board.

A preset takes feature suffixes from its `features` row: "arm+dotprod" (sdot/udot, armv8.2-a
on: Cortex-A55/A76 and later), "arm+dotprod+i8mm" (usdot too, armv8.6-a on: Cortex-A510/X2,
Neoverse V1/N2, Graviton 3). Where an artifact runs is decided by its triple (cross.py).

    "cuda"  an NVIDIA GPU: this machine's GPU when one is visible, else sm_80 (Ampere) code
            (gpu.py). "cuda+fp16" computes in float16 with float32 accumulation; a suffix
            in a preset's `options` sets a compile option instead of an LLVM attribute.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field

import tvm
from tvm.target import codegen

from graphc.errors import BackendError


def _cores() -> int:
    # num-cores drives TVM's parallel schedule rules; the runtime thread count is separate
    # (TVM_NUM_THREADS, set in graphc.backends.tvm.__init__).
    return os.cpu_count() or 1


def _host_cpu() -> dict:
    return {"kind": "llvm", "mcpu": codegen.llvm_get_system_cpu(), "num-cores": _cores()}


def _generic_x86() -> dict:
    return {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "x86-64-v2",
            "num-cores": _cores()}


# The build host's core count says nothing about the board; 4 is the common count of ARM
# boards (Raspberry Pi 4/5, Jetson Orin Nano, RK3588's big cluster). It only shapes how the
# schedules split work; the thread count is the board's TVM_NUM_THREADS.
ARM_CORES = 4


def _generic_arm() -> dict:
    return {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "generic",
            "mattr": ["+neon"], "num-cores": ARM_CORES}


@dataclass(frozen=True)
class Preset:
    describe: str  # one line for users and for CompiledModel.target
    make: Callable[[], dict]  # builds the TVM target dict when the preset is used
    # "+name" suffixes the preset takes -> LLVM mattr entries they add
    features: dict[str, tuple[str, ...]] = field(default_factory=dict)
    # "+name" suffixes that change how graphc compiles, not the TVM target -> options
    options: dict[str, dict] = field(default_factory=dict)
    defaults: dict = field(default_factory=dict)  # options before any suffix


def _cuda() -> dict:
    from .gpu import cuda_target  # imported late: only CUDA targets need the GPU probe

    return cuda_target()


# conv layout (nhwc.py): NHWC by default ("auto": unless ConvertLayout would leave transposes
# between convs), measured faster on MobileNetV2 and ResNet-18; "+nhwc" / "+nchw" force one
# 3x3 stride-1 convs in NHWC (winograd.py): Winograd by default, "+direct" keeps them direct
CPU_OPTIONS = {"nhwc": {"layout": "NHWC"}, "nchw": {"layout": "NCHW"},
               "direct": {"winograd": False}}
CPU_DEFAULTS = {"layout": "auto", "winograd": True}

PRESETS: dict[str, Preset] = {
    "cpu": Preset("this host's CPU", _host_cpu, options=CPU_OPTIONS, defaults=CPU_DEFAULTS),
    "x86": Preset("generic x86-64 (x86-64-v2)", _generic_x86, options=CPU_OPTIONS,
                  defaults=CPU_DEFAULTS),
    "arm": Preset("64-bit ARM (aarch64, armv8-a + NEON), cross-compiled", _generic_arm, {
        "dotprod": ("+dotprod",),  # sdot/udot: int8 dot products, 4 per int32 lane
        # usdot (u8 x s8) and the smmla family; every i8mm core (armv8.6-a) has dotprod too
        "i8mm": ("+dotprod", "+i8mm"),
    }, options=CPU_OPTIONS, defaults=CPU_DEFAULTS),
    "cuda": Preset("NVIDIA GPU (CUDA)", _cuda, options={
        # ToMixedPrecision: matmul/conv inputs in float16, their accumulators in float32
        "fp16": {"precision": "float16"},
    }),
}


@dataclass(frozen=True)
class ResolvedTarget:
    target: tvm.target.Target
    description: str  # readable, stored in CompiledModel.target and in saved artifacts
    preset: str | None  # the preset name, None for a target given in full
    options: dict = field(default_factory=dict)  # from the preset's option suffixes


def resolve_target(spec) -> ResolvedTarget:
    """A preset name, a TVM target dict or JSON string, or a tvm.target.Target -> ResolvedTarget."""
    if isinstance(spec, tvm.target.Target):
        return ResolvedTarget(spec, _summary(spec), None)
    if isinstance(spec, str) and spec.split("+")[0] in PRESETS:
        config, options = _preset_config(spec)
        target = _make(config, spec)
        describe = PRESETS[spec.split("+")[0]].describe
        return ResolvedTarget(target, f"{spec}: {describe} [{_summary(target)}]", spec, options)
    if isinstance(spec, str) and spec.lstrip().startswith("{"):
        try:
            spec = json.loads(spec)
        except ValueError as e:
            raise BackendError(f"tvm backend: target JSON does not parse: {e}") from e
    if isinstance(spec, dict):
        target = _make(spec, json.dumps(spec))
        return ResolvedTarget(target, _summary(target), None)
    names = ", ".join(f"{k!r} ({p.describe}{_suffixes(p)})" for k, p in PRESETS.items())
    raise BackendError(f"tvm backend: unknown target {spec!r}; use a preset ({names}) or a "
                       'full TVM target as a dict, e.g. {"kind": "llvm", "mcpu": "znver3"}')


def _suffixes(preset: Preset) -> str:
    names = [*preset.features, *preset.options]
    return "; takes " + ", ".join("+" + f for f in names) if names else ""


def _preset_config(spec: str) -> tuple[dict, dict]:
    """"arm+dotprod+i8mm" -> (the arm preset's dict with the features' mattr entries added,
    compile options); "cuda+fp16" -> (the cuda dict, {"precision": "float16"})."""
    name, *suffixes = spec.split("+")
    preset = PRESETS[name]
    config, options = preset.make(), dict(preset.defaults)
    for suffix in suffixes:
        if suffix in preset.options:
            options.update(preset.options[suffix])
            continue
        if suffix not in preset.features:
            known = ", ".join(f"{name}+{f}" for f in [*preset.features, *preset.options])
            raise BackendError(f"tvm backend: target {spec!r}: preset {name!r} has no feature "
                               f"{suffix!r} (known: {known or 'none'})")
        attrs = config.setdefault("mattr", [])
        attrs.extend(a for a in preset.features[suffix] if a not in attrs)
    return config, options


def _make(config: dict, what: str) -> tvm.target.Target:
    try:
        return tvm.target.Target(config)
    except Exception as e:  # TVM raises ValueError or its own FFI errors for bad configs
        raise BackendError(f"tvm backend: invalid target {what}: {e}") from e


def target_config(target: tvm.target.Target) -> dict:
    """The target as plain JSON-serializable Python (export() returns TVM Map/Array objects)."""
    return _plain(target.export())


def _plain(v):
    if isinstance(v, dict) or hasattr(v, "items"):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, list | tuple) or (hasattr(v, "__len__") and not isinstance(v, str)):
        return [_plain(x) for x in v]
    return v if isinstance(v, bool | int | float | str | None) else str(v)


def _summary(target: tvm.target.Target) -> str:
    # The interesting fields only (kind, triple, cpu, cores), in a stable order.
    cfg = target_config(target)
    keys = ("kind", "mtriple", "mcpu", "mattr", "num-cores", "arch")
    return " ".join(f"{k}={_fmt(cfg[k])}" if k != "kind" else str(cfg[k])
                    for k in keys if cfg.get(k) not in (None, "", (), []))


def _fmt(v) -> str:
    return ",".join(map(str, v)) if isinstance(v, list | tuple) else str(v)
