"""Default CPU schedules, no search: an ordered table of rules, one per op class.

Every TIR kernel the Relax pipeline produces is offered to the rules in order; the first
rule that returns a schedule wins (dlight's ApplyDefaultSchedule). A kernel no rule takes
stays an unscheduled loop nest. Each op class lives in its own module and adds one row.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import tvm
from tvm import s_tir
from tvm.s_tir import dlight

from .common import root_blocks
from .conv import Conv2D
from .elementwise import Injective
from .int8 import Int8MatmulRule
from .matmul import MatmulRule
from .pool import Pool2D
from .reduction import FullReduction, RowReduction
from .winograd import WinogradOutput

log = logging.getLogger("graphc")


class Guarded(dlight.ScheduleRule):
    """A rule that declines kernels whose block names contain a `skip` key, and whose
    failures are logged with the kernel's name instead of aborting the build."""

    def __init__(self, name: str, rule: dlight.ScheduleRule, skip: dict[str, str] | None = None):
        self.name, self.rule, self.skip = name, rule, skip or {}

    def apply(self, func, target, tunable):
        names = block_names(func)
        if not names:  # no root block (an extern call, an ir_builder kernel): no rule fits
            return None
        if any(key in n for key in self.skip for n in names):
            return None
        try:
            return self.rule.apply(func, target, tunable)
        except Exception as e:  # noqa: BLE001  (a rule bug on an odd shape must not break the build)
            log.warning("schedule rule %s failed on kernel with blocks %s: %s: %s",
                        self.name, names, type(e).__name__, e)
            return None


def block_names(func: tvm.tirx.PrimFunc) -> list[str]:
    sch = s_tir.Schedule(func)
    return [sch.get(b).name_hint for b in root_blocks(sch)]


# (name, factory, kernels to skip: block-name substring -> the measurement that decided it).
# Order matters: specific op classes first, generic fallbacks last.
RULES: list[tuple[str, Callable[[], dlight.ScheduleRule], dict[str, str]]] = [
    # NCHW conv2d + fused epilogue (conv.py): 3x3 64ch 56x56 ~1.1x onnxruntime's time,
    # ResNet-18 ~1.0x; replaces leaving convs unscheduled (dlight.reduction's skip below).
    ("conv2d", Conv2D, {}),
    # the Winograd output transform + the conv's epilogue (winograd.py)
    ("winograd", WinogradOutput, {}),
    ("matmul", MatmulRule, {}),
    ("matmul.int8", Int8MatmulRule, {}),
    # max/avg pool2d: window taps accumulate on vectors of output columns (pool.py); before
    # dlight.reduction, which would take avg pooling as a row reduction. Max pool 3x3/2 of
    # 64x112x112: 0.24-0.30 ms (onnxruntime 0.16; unscheduled it was a serial loop).
    ("pool2d", Pool2D, {}),
    ("dlight.gemv", dlight.cpu.GEMV, {}),
    # softmax, layer norm, mean over trailing axes: rows in parallel, reductions vectorized
    # through rfactor (reduction.py); dlight's scalar Reduction stays as the fallback.
    # Layer norm 1024x384: dlight 0.46 -> 0.28 ms (onnxruntime 0.20); softmax 12x128x128:
    # dlight 0.39 -> 0.10-0.15 ms with legalize.py's fast_exp (onnxruntime 0.05).
    ("row_reduction", RowReduction, {}),
    # min / max / sum of a whole tensor (dynamic quantization's range): vector partials.
    ("full_reduction", FullReduction, {}),
    # dlight's Reduction treats a convolution as a row reduction: small conv net 4.7 -> 7.8
    # ms, depthwise-separable block 0.29 -> 3.3 ms; matmul kernels gain ~2x from it.
    ("dlight.reduction", dlight.cpu.Reduction,
     {"conv": "slower than the unscheduled loop nest"}),
    # Last: any all-spatial kernel (copies, transposes, pads, elementwise chains) becomes a
    # parallel loop over vectors, so no kernel stays a serial scalar loop (elementwise.py).
    ("injective", Injective, {}),
]


def default_rules(target: tvm.target.Target) -> list[dlight.ScheduleRule]:
    """The rule instances for `target`, in table order."""
    return [Guarded(name, make(), skip) for name, make, skip in RULES]
