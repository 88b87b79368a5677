"""lib.so is linked without debug info and static symbols (backends/tvm/strip.py), for the
host and for ARM, and still loads and runs (ARM artifacts run under qemu in
test_arm_qemu.py, which loads these stripped libraries too)."""

from __future__ import annotations

import struct
import zipfile

import pytest
import torch
from torch import nn

import graphc
from graphc.backends.tvm import cross


def _mlp():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).eval()
    return m, (torch.randn(3, 16),)


def section_names(elf: bytes) -> list[str]:
    """Section names of a little-endian ELF64 file (x86-64 and aarch64 both are)."""
    assert elf[:5] == b"\x7fELF\x02", "not an ELF64 file"
    shoff, = struct.unpack_from("<Q", elf, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", elf, 0x3A)
    headers = [struct.unpack_from("<IIQQQQ", elf, shoff + i * shentsize) for i in range(shnum)]
    strtab_off = headers[shstrndx][4]
    return [elf[strtab_off + h[0]:elf.index(b"\0", strtab_off + h[0])].decode()
            for h in headers]


def _lib(path) -> bytes:
    with zipfile.ZipFile(path) as zf:
        return zf.read("runner/lib.so")


def _unneeded(names: list[str]) -> list[str]:
    return [n for n in names if n.startswith(".debug") or n in (".symtab", ".strtab")]


def test_host_library_has_no_debug_info_and_still_runs(tmp_path):
    m, x = _mlp()
    cm = graphc.compile(m, x, target="cpu")
    cm.save(tmp_path / "m.graphc")
    names = section_names(_lib(tmp_path / "m.graphc"))
    assert ".text" in names and ".dynsym" in names  # dlsym finds the kernels through .dynsym
    assert _unneeded(names) == [], names
    with torch.no_grad():
        torch.testing.assert_close(graphc.load(tmp_path / "m.graphc")(*x), m(*x),
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(cross.host_arch() != "x86_64", reason="cross-compiles from x86-64")
def test_arm_library_is_stripped_by_the_cross_linker(tmp_path):
    m, x = _mlp()
    graphc.compile(m, x, target="arm").save(tmp_path / "m.graphc")
    lib = _lib(tmp_path / "m.graphc")
    assert lib[18:20] == b"\xb7\x00"  # e_machine: aarch64
    names = section_names(lib)
    assert ".dynsym" in names and _unneeded(names) == [], names
