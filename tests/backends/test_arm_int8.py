"""AArch64 integer kernels: the dot-product instruction table, the instructions in the
generated assembly for each "arm" feature set, and the exact signed-activation shift that
dotprod's sdot needs (checked on this host). Running them: test_arm_qemu.py."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

import graphc
from graphc.backends.tvm import lower_quant
from graphc.backends.tvm.schedules.intrin import dot_intrin, signed_activations
from graphc.backends.tvm.schedules.isa import isa_of
from graphc.backends.tvm.target import resolve_target
from graphc.passes.fold_fake_quant import fold_fake_quant
from tests.single_thread import one_torch_thread  # noqa: F401  (autouse fixture)

ZEN4 = {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "znver4", "num-cores": 2}
HASWELL = {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "haswell", "num-cores": 2}
DOTS = ("sdot", "udot", "usdot")


def _folded_mlp():
    """Two int8 linears (u8 activations x s8 weights) on calibrated static ranges."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 20)).eval()
    x = torch.randn(5, 64)
    q = graphc.quantize(graphc.trace(m, (x,)), calibration=[(torch.randn(5, 64),)
                                                            for _ in range(3)])
    f = fold_fake_quant(q)
    assert f.op_histogram()["graphc.qlinear"] == 2
    return f, x


def _count(asm: str) -> dict[str, int]:
    return {op: len(re.findall(rf"^\s*{op}\s", asm, re.MULTILINE)) for op in DOTS}


@pytest.mark.parametrize("target, a, b, family", [
    (ZEN4, "uint8", "int8", "vnni_u8s8"),
    (ZEN4, "int8", "int8", "vnni_i16"),
    (HASWELL, "uint8", "int8", "avx2_i16"),
    ("x86", "uint8", "int8", None),              # SSE only: no exact dot instruction
    ("arm", "uint8", "int8", None),              # plain NEON
    ("arm+dotprod", "uint8", "int8", None),      # sdot is s8 x s8: the lowering shifts x
    ("arm+dotprod", "int8", "int8", "neon_sdot"),
    ("arm+dotprod", "uint8", "uint8", "neon_udot"),
    ("arm+i8mm", "uint8", "int8", "neon_usdot"),
    ("arm+i8mm", "int8", "int8", "neon_sdot"),
])
def test_dot_instruction_table(target, a, b, family):
    intrin = dot_intrin(isa_of(resolve_target(target).target), a, b)
    assert (intrin.family if intrin else None) == family


@pytest.mark.parametrize("target, shift", [
    (ZEN4, False), (HASWELL, False), ("arm", False), ("arm+dotprod", True), ("arm+i8mm", False),
])
def test_signed_activations_only_where_sdot_is_the_only_dot(target, shift):
    assert signed_activations(isa_of(resolve_target(target).target)) is shift


@pytest.mark.parametrize("target, present, absent", [
    ("arm", (), DOTS),
    ("arm+dotprod", ("sdot",), ("udot", "usdot")),
    ("arm+dotprod+i8mm", ("usdot",), ("sdot", "udot")),
])
def test_int8_linear_assembly_uses_the_dot_instructions(target, present, absent, tmp_path):
    f, _ = _folded_mlp()
    cm = graphc.compile(f, target=target, dump_ir=tmp_path)
    counts = _count(cm.runner.source("asm"))
    assert all(counts[op] > 0 for op in present), counts
    assert all(counts[op] == 0 for op in absent), counts
    tir = next(tmp_path.glob("*-tir.py")).read_text()
    marks = re.findall(r'"graphc.schedule": "(int8[^"]*)"', tir)
    assert len(marks) == (2 if present else 0), marks


def test_signed_shift_is_exact_on_this_host(monkeypatch, tmp_path):
    """The dotprod lowering (x - 128 as int8, zero point - 128) forced on the host's target:
    the int8 x int8 kernels give the same bits as the u8 x s8 ones."""
    f, x = _folded_mlp()
    want = graphc.compile(f, target="cpu", dump_ir=tmp_path / "plain")(x)
    monkeypatch.setattr(lower_quant, "signed_activations", lambda isa, weights_first=False: True)
    got = graphc.compile(f, target="cpu", dump_ir=tmp_path / "signed")(x)
    shift = "- T.int16(128)"  # in the quantize kernel that feeds the matmuls
    assert shift not in next((tmp_path / "plain").glob("*-tir.py")).read_text()
    assert shift in next((tmp_path / "signed").glob("*-tir.py")).read_text()
    assert torch.equal(got, want)


def test_signed_shift_is_exact_for_convs_on_this_host(monkeypatch):
    """The same shift on qconv2d's W @ cols lowering (s8 weights on the left): equal bits."""
    from tests.passes.test_fold_fake_quant import _convnet

    g, batches = _convnet()
    f = fold_fake_quant(graphc.quantize(g, calibration=batches))
    x = batches[0][0]
    want = graphc.compile(f, target="cpu")(x)
    monkeypatch.setattr(lower_quant, "signed_activations", lambda isa, weights_first=False: True)
    assert torch.equal(graphc.compile(f, target="cpu")(x), want)


@pytest.mark.parametrize("target,want", [("arm+dotprod", "sdot"), ("arm+i8mm", "sdot"),
                                         ("arm", None)])
def test_int8_conv_uses_the_dot_instruction(target, want):
    """A dense int8 conv (W @ cols) reaches sdot where the target has it (activations shifted
    to s8: s8 weights x u8 pixels has no instruction), and no dot instruction otherwise."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 16, 3, padding=1), nn.ReLU()).eval()
    batches = [(torch.randn(1, 4, 8, 8),) for _ in range(2)]
    g = graphc.trace(model, batches[0])
    f = fold_fake_quant(graphc.quantize(g, calibration=batches))
    asm = graphc.compile(f, target=target).runner.source("asm")
    found = {i for i in ("sdot", "udot", "usdot") if re.search(rf"\b{i}\b", asm)}
    assert found == ({want} if want else set()), found
