"""The graphc command: compile, inspect, passes, run, demo."""

import subprocess
import sys

import pytest
import torch

from graphc.cli import main
from tests.models.zoo import build


@pytest.fixture(scope="module")
def onnx_file(tmp_path_factory):
    m, x = build("conv_bn_residual")
    path = tmp_path_factory.mktemp("onnx") / "net.onnx"
    torch.onnx.export(m, x, str(path), input_names=["image"], output_names=["logits"],
                      dynamo=False, do_constant_folding=False)  # keep BatchNormalization
    return path


def test_passes_lists_options_and_docs(capsys):
    assert main(["passes"]) == 0
    out = capsys.readouterr().out
    assert "constant-folding(max_growth_bytes: int = 4096)" in out
    assert "fold-batchnorm\n    conv/linear -> inference batchnorm" in out


def test_inspect_onnx(onnx_file, capsys):
    assert main(["inspect", str(onnx_file)]) == 0
    out = capsys.readouterr().out
    assert "inputs:  image: f32[2, 3, 16, 16]" in out
    assert "outputs: logits: f32[2, 10]" in out
    assert "parameters: 3,090 (12,360 bytes)" in out
    assert "aten.convolution" in out and "BatchNormalization" in out


def test_compile_then_run(onnx_file, tmp_path, capsys):
    art, ir = tmp_path / "net.graphc", tmp_path / "ir"
    assert main(["compile", str(onnx_file), "--target", "cpu", "--passes", "fold-batchnorm",
                 "--dump-ir", str(ir), "-o", str(art)]) == 0
    assert art.exists() and (ir / "00-input.txt").exists()
    assert main(["run", str(art), "--repeat", "3", "--save-outputs",
                 str(tmp_path / "o.npz")]) == 0
    out = capsys.readouterr().out
    assert "logits: f32[2, 10]: mean" in out and "latency: median" in out


def test_errors_are_one_line_and_exit_2(tmp_path, capsys):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not an onnx model")
    assert main(["inspect", str(bad)]) == 2
    assert "graphc: error:" in capsys.readouterr().err
    assert main(["compile", str(bad), "--passes", "nope", "-o", str(tmp_path / "x")]) == 2


def test_console_script_is_installed():
    exe = [sys.executable, "-m", "graphc.cli", "passes"]
    res = subprocess.run(exe, capture_output=True, text=True, timeout=120, check=False)
    assert res.returncode == 0 and "dead-code-elimination" in res.stdout
