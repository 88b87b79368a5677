"""target="cuda" on an NVIDIA GPU: outputs against PyTorch (fp32 and fp16) and against the
CPU's int8 result, the artifact round trip, and the benchmark. Skipped without a GPU (CI has
none); run on a GPU machine with `pytest -m gpu` (docs/targets.md, section cuda)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import graphc
from graphc.backends.tvm import gpu
from graphc.passes.fold_fake_quant import fold_fake_quant
from tests.models.zoo import build

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not gpu.present(), reason="no NVIDIA GPU (tvm.cuda() does not "
                                 "exist); see docs/targets.md, section cuda")]

FP32_TOL = 1e-4   # relative to the largest reference value, as the ARM tests
FP16_TOL = 2e-2   # float16 operands (11-bit mantissa), float32 accumulation


def _rel_err(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-12))


@pytest.mark.parametrize("name", ["conv_bn_residual", "encoder_block"])
def test_fp32_matches_pytorch(name):
    model, inputs = build(name)
    cm = graphc.compile(model, inputs, target="cuda")
    want = model(*inputs).detach().numpy()
    got = cm(*inputs).numpy()
    assert _rel_err(got, want) < FP32_TOL
    got_np = cm(*(x.numpy() for x in inputs))  # numpy in, numpy out, on the GPU too
    assert isinstance(got_np, np.ndarray) and _rel_err(got_np, want) < FP32_TOL


@pytest.mark.parametrize("name", ["conv_bn_residual", "encoder_block"])
def test_fp16_is_close_to_fp32(name):
    model, inputs = build(name)
    want = model(*inputs).detach().numpy()
    err = _rel_err(graphc.compile(model, inputs, target="cuda+fp16")(*inputs).numpy(), want)
    print(f"{name}: cuda+fp16 max error relative to fp32 PyTorch {err:.2e}")
    assert err < FP16_TOL


def _int8(name: str):
    model, inputs = build(name)
    g = graphc.trace(model, inputs)
    if name == "conv_bn_residual":
        g, _ = graphc.pipeline.run_pipeline(g, "fold-batchnorm")
        q = graphc.quantize(g, calibration=[(torch.randn_like(inputs[0]),) for _ in range(4)])
    else:
        q = graphc.quantize(g, activations="dynamic")
    return fold_fake_quant(q), inputs


@pytest.mark.parametrize("name", ["conv_bn_residual", "encoder_block"])
def test_int8_folded_matches_the_cpu_int8_result(name):
    """Integer matmuls are exact on both; the float epilogues may round in another order."""
    f, inputs = _int8(name)
    want = graphc.compile(f, target="cpu")(*inputs).numpy()
    got = graphc.compile(f, target="cuda")(*inputs).numpy()
    assert _rel_err(got, want) < 1e-5


def test_artifact_round_trip_and_benchmark_on_the_gpu(tmp_path):
    model, inputs = build("conv_bn_residual")
    cm = graphc.compile(model, inputs, target="cuda")
    cm.save(tmp_path / "m.graphc")
    loaded = graphc.load(tmp_path / "m.graphc")
    np.testing.assert_allclose(loaded(*inputs).numpy(), cm(*inputs).numpy(), rtol=0, atol=0)
    stats = loaded.benchmark(repeat=5, warmup=2)
    assert 0 < stats["min"] <= stats["median"] <= stats["max"]
