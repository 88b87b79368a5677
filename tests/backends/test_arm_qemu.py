"""ARM artifacts run: compiled here for target="arm" (aarch64), saved, executed by their own
__main__.py under qemu-aarch64 with an aarch64 Python that has only tvm and numpy, and
compared with PyTorch (fp32) or with the same folded int8 graph compiled for this x86 host
(int8: equal). The artifacts share two emulated processes (tests/arm_qemu.py): the fp32
"arm" ones on a Cortex-A53 (armv8.0: no dot product, proving the generic preset needs none),
the int8 ones on qemu's "max" CPU (dotprod and i8mm). ~35 s, most of it compiling."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import graphc
from graphc.passes.fold_fake_quant import fold_fake_quant
from tests import arm_qemu
from tests.models.zoo import build
from tests.single_thread import one_torch_thread  # noqa: F401  (autouse fixture)

pytestmark = pytest.mark.slow

FP32 = ["conv_bn_residual", "encoder_block"]
INT8_TARGETS = ["arm", "arm+dotprod", "arm+dotprod+i8mm"]
TOL = 1e-4  # fp32 relative to the largest reference value


def _int8_conv():
    """conv_bn_residual with batchnorm folded, quantized (static, calibrated) and folded to
    integer ops: qconv2d and qlinear."""
    model, (x,) = build("conv_bn_residual")
    g = graphc.trace(model, (x,))
    g, _ = graphc.pipeline.run_pipeline(g, "fold-batchnorm")
    calib = [(torch.randn_like(x),) for _ in range(4)]
    f = fold_fake_quant(graphc.quantize(g, calibration=calib))
    hist = f.op_histogram()
    assert hist["graphc.qconv2d"] >= 4 and hist["graphc.qlinear"] == 1
    return f, (x,)


def _int8_encoder():
    """The transformer block with dynamic int8 activations (as MiniLM's benchmark): four
    qlinears, the matmuls that take sdot/usdot."""
    model, inputs = build("encoder_block")
    f = fold_fake_quant(graphc.quantize(graphc.trace(model, inputs), activations="dynamic"))
    assert f.op_histogram()["graphc.qlinear"] == 4
    return f, inputs


INT8 = {"conv": _int8_conv, "encoder": _int8_encoder}


def _named(cm, inputs) -> dict[str, np.ndarray]:
    return {s.name: t.numpy() for s, t in zip(cm.input_specs, inputs)}


@pytest.fixture(scope="module")
def board(tmp_path_factory):
    """Compile every case, run them under qemu; {case: (outputs, expected)}."""
    arm_qemu.require()
    work = tmp_path_factory.mktemp("arm")
    fp32_jobs, expected = [], {}
    for name in FP32:
        model, inputs = build(name)
        cm = graphc.compile(model, inputs, target="arm")
        cm.save(work / f"{name}.graphc")
        fp32_jobs.append((work / f"{name}.graphc", _named(cm, inputs)))
        expected[name] = model(*inputs).detach().numpy()
    int8_jobs, int8_names = [], []
    for model_name, make in INT8.items():
        f, inputs = make()
        x86 = graphc.compile(f, target="cpu")(*inputs).numpy()
        for target in INT8_TARGETS:
            name = f"int8-{model_name}-{target}"
            cm = graphc.compile(f, target=target)
            cm.save(work / f"{name}.graphc")
            int8_jobs.append((work / f"{name}.graphc", _named(cm, inputs)))
            int8_names.append(name)
            expected[name] = x86
    fp32_out, log_a = arm_qemu.run_jobs(fp32_jobs, work, cpu="cortex-a53")
    int8_out, log_b = arm_qemu.run_jobs(int8_jobs, work, cpu="max")
    print(log_a + log_b)
    names = FP32 + int8_names
    results = {n: (next(iter(o.values())), expected[n]) for n, o in zip(names, fp32_out + int8_out)}
    results["jobs"] = dict(zip(int8_names, int8_jobs))
    return results


@pytest.mark.parametrize("name", FP32)
def test_fp32_model_on_arm_matches_pytorch(board, name):
    got, want = board[name]
    assert got.shape == want.shape and got.dtype == want.dtype
    assert np.abs(got - want).max() / np.abs(want).max() < TOL


@pytest.mark.parametrize("target", INT8_TARGETS)
def test_int8_conv_net_on_arm_equals_x86(board, target):
    got, want = board[f"int8-conv-{target}"]
    assert np.array_equal(got, want), np.abs(got - want).max()


def test_int8_encoder_on_arm_is_exact(board):
    """The block ends in float layer norms whose sums run in another order on 4 NEON lanes
    than on 16 AVX-512 lanes, so against x86 it agrees to float rounding (a flipped int8
    rounding inside would be ~1e-2); the ARM variants share those float kernels and differ
    only in the integer dot products (sdot after the shift, usdot, none): bit-equal."""
    results = [board[f"int8-encoder-{t}"] for t in INT8_TARGETS]
    for got, want in results:
        assert np.abs(got - want).max() / np.abs(want).max() < 1e-5
    assert all(np.array_equal(got, results[0][0]) for got, _ in results)


def test_dotprod_artifact_needs_a_dotprod_core(board, tmp_path):
    """The same artifact on an emulated Cortex-A53 (armv8.0): sdot is an illegal instruction
    there, so the runs above did execute the dot-product kernels."""
    with pytest.raises(AssertionError, match="Illegal instruction"):
        arm_qemu.run_jobs([board["jobs"]["int8-conv-arm+dotprod"]], tmp_path, cpu="cortex-a53")
