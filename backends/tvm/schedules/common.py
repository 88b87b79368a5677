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
    """The blocks directly under the function's "root" block; [] when there is none.

    Kernels written with TVM's ir_builder or as an extern call (scatter, scatter_nd, topk,
    sort) have one opaque top block of their own name ("scatter_elements_generic",
    "topk_cpu") instead of "root"; get_sblock("root") raised on them and aborted the build.
    No rule schedules such a kernel, so it stays as TOPI wrote it."""
    body = sch.mod["main"].body
    if not (isinstance(body, s_tir.SBlockRealize) and body.block.name_hint == "root"):
        return []
    return list(sch.get_child_blocks(sch.get_sblock("root")))


def loop_extent(sch: s_tir.Schedule, loop) -> int | None:
    """The loop's trip count, or None when it is symbolic."""
    ext = sch.get(loop).extent
    return int(ext) if isinstance(ext, tirx.IntImm) else None
