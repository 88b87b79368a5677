"""Link lib.so without what only a debugger reads: debug info and the static symbol table.

TVM's LLVM code generator emits DWARF for every kernel (.debug_info, .debug_loc, ...) and
the linker keeps a full .symtab; neither is read at run time. The runtime finds the
kernels and the packed executable (`__tvm_ffi__library_bin`) with dlsym, which reads the
dynamic symbol table (.dynsym), and `-s` (--strip-all) keeps that one. Measured on the
digits CNN: lib.so 244,800 -> ~215,000 bytes fp32, 168,624 -> ~117,000 bytes with 4-bit
shared weights (the debug info of the decode kernels is a third of that file).

`-s` is a GCC driver flag, so the host's cc and every cross linker of cross.ARCHES
(aarch64-linux-gnu-gcc, ...) take it the same way; export_library passes `options` to the
linker function it is given (or to its default, tvm.support.cc.create_shared).
"""

from __future__ import annotations

from pathlib import Path

LINK_OPTIONS = ("-s",)


def export_library(executable, path: Path | str, fcompile) -> None:
    """executable.export_library(path) linked with LINK_OPTIONS by `fcompile` (None: the
    host's cc; else cross.fcompile's linker for another architecture)."""
    executable.export_library(str(path), fcompile=fcompile, options=list(LINK_OPTIONS))
