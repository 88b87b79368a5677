"""The TVM backend: ExportedProgram -> Relax -> TIR -> LLVM, wrapped as a CompiledModel."""

import os

# TVM's thread pool reads TVM_NUM_THREADS when it first starts. Without it TVM used 1 thread
# on the 2-vCPU build machine (it halves the core count, assuming hyper-threads). The pool
# starts lazily, so setting it before the first kernel runs is enough.
os.environ.setdefault("TVM_NUM_THREADS", str(os.cpu_count() or 1))

from . import (  # noqa: F401  (register the graphc:: op lowerings)
    lower_aten,
    lower_aten_index,
    lower_aten_math,
    lower_aten_resize,
    lower_codebook,
    lower_quant,
    lower_sparse,
)
from .lower import LOWERINGS, register_lowering
from .pipeline import build
from .target import PRESETS, resolve_target

__all__ = ["LOWERINGS", "PRESETS", "build", "register_lowering", "resolve_target"]
