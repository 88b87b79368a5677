"""target="arm" on an x86 host, without emulation: preset spelling, cross-linked artifacts that
save but refuse to run here, and the artifact's own runner (__main__.py) on the host.
Running ARM artifacts under qemu is tests/backends/test_arm_qemu.py."""

from __future__ import annotations

import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch
from torch import nn

import graphc
from graphc.backends.tvm import cross
from graphc.backends.tvm.target import resolve_target, target_config
from graphc.errors import BackendError, GraphcError

pytestmark = pytest.mark.skipif(cross.host_arch() != "x86_64",
                                reason="these tests cross-compile from an x86-64 host")

ELF_MACHINE = {b"\xb7\x00": "aarch64", b"\x3e\x00": "x86_64"}  # e_machine, little endian


def _mlp():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).eval()
    return m, (torch.randn(3, 16),)


def _elf_machine(path) -> str:
    with zipfile.ZipFile(path) as zf:
        head = zf.read("runner/lib.so")[:20]
    assert head[:4] == b"\x7fELF"
    return ELF_MACHINE.get(head[18:20], repr(head[18:20]))


@pytest.mark.parametrize("spec, mattr", [
    ("arm", ["+neon"]),
    ("arm+dotprod", ["+neon", "+dotprod"]),
    ("arm+dotprod+i8mm", ["+neon", "+dotprod", "+i8mm"]),
    ("arm+i8mm", ["+neon", "+dotprod", "+i8mm"]),  # i8mm cores all have dotprod
])
def test_arm_presets_and_feature_suffixes(spec, mattr):
    resolved = resolve_target(spec)
    cfg = target_config(resolved.target)
    assert cfg["mtriple"] == "aarch64-linux-gnu" and list(cfg["mattr"]) == mattr
    assert resolved.description.startswith(f"{spec}: 64-bit ARM")
    assert not cross.runs_here(cfg)


def test_unknown_feature_and_suffix_on_plain_presets_are_errors():
    with pytest.raises(BackendError,
                       match=r"no feature 'sve'.*arm\+dotprod, arm\+i8mm, arm\+nhwc"):
        resolve_target("arm+sve")
    with pytest.raises(BackendError, match=r"preset 'x86' has no feature 'avx2'.*known: x86\+nhwc"):
        resolve_target("x86+avx2")


def test_arm_model_saves_an_aarch64_artifact_and_refuses_to_run_here(tmp_path):
    m, x = _mlp()
    cm = graphc.compile(m, x, target="arm")
    with pytest.raises(BackendError, match="compiled for 'arm' .aarch64. and cannot run on this "
                                           "x86_64 host.*python3 model.graphc"):
        cm(*x)
    with pytest.raises(BackendError, match="cannot run"):
        cm.benchmark(repeat=1)
    cm.save(tmp_path / "m.graphc")
    assert _elf_machine(tmp_path / "m.graphc") == "aarch64"
    loaded = graphc.load(tmp_path / "m.graphc")  # loads (no dlopen), saves again, won't run
    assert loaded.target == cm.target
    with pytest.raises(BackendError, match="cannot run"):
        loaded(*x)
    loaded.save(tmp_path / "again.graphc")
    assert _elf_machine(tmp_path / "again.graphc") == "aarch64"


def test_full_target_dict_with_an_aarch64_triple_cross_compiles(tmp_path):
    m, x = _mlp()
    cm = graphc.compile(m, x, target={"kind": "llvm", "mtriple": "aarch64-linux-gnu",
                                      "mcpu": "cortex-a72", "num-cores": 4})
    cm.save(tmp_path / "m.graphc")
    assert _elf_machine(tmp_path / "m.graphc") == "aarch64"
    assert "ldr" in cm.runner.source("asm")  # aarch64 assembly, not x86's "mov"/"vmov"


def test_missing_cross_linker_says_what_to_install(tmp_path, monkeypatch):
    m, x = _mlp()
    cm = graphc.compile(m, x, target="arm")
    monkeypatch.setattr(cross.shutil, "which", lambda name: None)
    with pytest.raises(BackendError, match="aarch64-linux-gnu-gcc.*apt-get install "
                                           "gcc-aarch64-linux-gnu"):
        cm.save(tmp_path / "m.graphc")
    assert not (tmp_path / "m.graphc").exists()


def test_tuning_for_another_architecture_is_refused():
    m, x = _mlp()
    with pytest.raises(BackendError, match="cannot be measured here"):
        graphc.compile(m, x, target="arm", tune=4)


def test_source_only_for_models_compiled_in_this_process(tmp_path):
    m, x = _mlp()
    cm = graphc.compile(m, x, target="x86")
    assert "vmov" not in cm.runner.source("asm")  # x86-64-v2: SSE only
    cm.save(tmp_path / "m.graphc")
    with pytest.raises(GraphcError, match="only a model compiled in this process"):
        graphc.load(tmp_path / "m.graphc").runner.source()


def test_artifact_runs_as_a_program_without_graphc(tmp_path):
    """`python3 model.graphc` (its __main__.py) on this host, with graphc and torch blocked."""
    m, x = _mlp()
    cm = graphc.compile(m, x, target="x86")
    cm.save(tmp_path / "m.graphc")
    np.savez(tmp_path / "in.npz", **{cm.input_specs[0].name: x[0].numpy()})
    block = ("import sys, runpy; sys.modules['torch'] = sys.modules['graphc'] = None; "
             "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", block, str(tmp_path / "m.graphc"),
                           "--inputs", str(tmp_path / "in.npz"),
                           "--save-outputs", str(tmp_path / "out.npz"), "--repeat", "2"],
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "latency: median" in proc.stdout
    out = np.load(tmp_path / "out.npz")[cm.output_specs[0].name]
    assert np.array_equal(out, cm(x[0].numpy()))
