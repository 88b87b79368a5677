"""What every CPU schedule rule shares: the mark it leaves, which kernels it may take, and
the two questions rules ask of a schedule (its root blocks, a loop's constant extent)."""

from __future__ import annotations

import tvm
from tvm import s_tir, tirx

RULE_MARK = "graphc.schedule"  # block annotation naming the rule that scheduled a kernel


def cpu_kernel(func, target: tvm.target.Target) -> bool:
    """A TIR function on an LLVM CPU target: what the graphc rules schedule."""
    return target.kind.name == "llvm" and isinstance(func, tirx.PrimFunc)


def root_blocks(sch: s_tir.Schedule) -> list:
    return list(sch.get_child_blocks(sch.get_sblock("root")))


def loop_extent(sch: s_tir.Schedule, loop) -> int | None:
    """The loop's trip count, or None when it is symbolic."""
    ext = sch.get(loop).extent
    return int(ext) if isinstance(ext, tirx.IntImm) else None
