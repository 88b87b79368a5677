"""target="cuda" without a GPU (as in CI): the preset and its fp16 option, building with
dlight's GPU schedules, the generated CUDA C (kernels, thread binding, shared memory, fp16
types, int8 operands with int32 accumulators), nvcc accepting it, and a model that saves
but refuses to run here. Running on a GPU is tests/backends/test_cuda_gpu.py."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest
import torch

import graphc
from graphc.backends.tvm import gpu
from graphc.backends.tvm.target import resolve_target, target_config
from graphc.errors import BackendError
from graphc.passes.fold_fake_quant import fold_fake_quant
from tests.models.zoo import build

KERNEL = re.compile(r'extern "C" __global__ void (?:__launch_bounds__\(\d+\) )?(\w+)\((.*?)\) \{')


def _kernels(source: str) -> dict[str, str]:
    """kernel name -> its parameter list and body (up to the next kernel)."""
    starts = list(KERNEL.finditer(source))
    return {m.group(1): source[m.start():(starts[i + 1].start() if i + 1 < len(starts)
                                          else len(source))]
            for i, m in enumerate(starts)}


def _matmuls(source: str) -> dict[str, str]:
    return {k: v for k, v in _kernels(source).items() if "matmul" in k}


@pytest.fixture(scope="module")
def mlp():
    return build("mlp")


def test_cuda_preset_and_fp16_option():
    plain, half = resolve_target("cuda"), resolve_target("cuda+fp16")
    cfg = target_config(plain.target)
    assert cfg["kind"] == "cuda" and cfg["arch"].startswith("sm_")
    if not gpu.present():
        assert cfg["arch"] == gpu.DEFAULT_ARCH
    assert plain.options == {} and half.options == {"precision": "float16"}
    assert half.description.startswith("cuda+fp16: NVIDIA GPU")
    with pytest.raises(BackendError, match=r"no feature 'int4'.*known: cuda\+fp16"):
        resolve_target("cuda+int4")


def test_cuda_build_uses_gpu_schedules(mlp):
    model, inputs = mlp
    cm = graphc.compile(model, inputs, target="cuda")
    src = cm.runner.source("cuda")
    kernels = _kernels(src)
    assert len(kernels) >= 3 and all("threadIdx" in body for body in kernels.values())
    matmuls = _matmuls(src)
    assert len(matmuls) == 3  # the three linears, each with its bias/activation fused
    for body in matmuls.values():  # dlight's Matmul: 2-D thread tiles, staged in shared memory
        assert "__shared__" in body and "threadIdx.y" in body and "float* __restrict__" in body


def test_fp16_option_computes_in_half_and_accumulates_in_float(mlp):
    model, inputs = mlp
    cm = graphc.compile(model, inputs, target="cuda+fp16")
    assert cm.input_specs[0].dtype == torch.float32  # the signature stays float32
    for name, body in _matmuls(cm.runner.source("cuda")).items():
        assert re.search(r"__shared__ alignas\(\d+\) half ", body), name
        assert re.search(r"float2? matmul_intermediate\w*_local", body), name  # accumulator


def test_int8_folded_model_builds_integer_matmuls():
    model, inputs = build("mlp")
    f = fold_fake_quant(graphc.quantize(graphc.trace(model, inputs), activations="dynamic"))
    assert f.op_histogram()["graphc.qlinear"] == 3
    src = graphc.compile(f, target="cuda").runner.source("cuda")
    matmuls = _matmuls(src)
    assert len(matmuls) == 3
    for name, body in matmuls.items():  # u8 activations x s8 weights, int32 accumulators
        assert "uchar* __restrict__" in body and "signed char* __restrict__" in body, name
        assert re.search(r"int2? matmul_intermediate\w*_local", body), name
        assert "float" in body  # the dequantizing epilogue, fused


def test_int8_conv_copies_scheduled_for_cpus_run_on_gpu_threads():
    """qconv2d's im2col kernel, which the lowering schedules itself for CPUs (parallel,
    vectorized), must be a GPU kernel on CUDA, or it would run on the host over device
    pointers."""
    model, (x,) = build("conv_bn_residual")
    g, _ = graphc.pipeline.run_pipeline(graphc.trace(model, (x,)), "fold-batchnorm")
    f = fold_fake_quant(graphc.quantize(g, calibration=[(torch.randn_like(x),)]))
    kernels = _kernels(graphc.compile(f, target="cuda").runner.source("cuda"))
    im2col = [body for name, body in kernels.items() if "im2col" in name]
    assert len(im2col) >= 3 and all("threadIdx.x" in body for body in im2col)


def test_cuda_model_saves_and_refuses_to_run_without_a_gpu(mlp, tmp_path):
    if gpu.present():
        pytest.skip("this machine has a GPU: tests/backends/test_cuda_gpu.py runs the model")
    model, inputs = mlp
    cm = graphc.compile(model, inputs, target="cuda")
    with pytest.raises(BackendError, match="compiled for 'cuda' and this machine has no usable "
                                           "NVIDIA GPU.*cm.save"):
        cm(*inputs)
    with pytest.raises(BackendError, match="no usable NVIDIA GPU"):
        cm.benchmark(repeat=1)
    cm.save(tmp_path / "m.graphc")
    loaded = graphc.load(tmp_path / "m.graphc")
    assert loaded.target == cm.target and loaded.meta["tvm"]["target"]["kind"] == "cuda"
    with pytest.raises(BackendError, match="no usable NVIDIA GPU"):
        loaded(*inputs)


def test_tuning_is_refused_for_cuda(mlp):
    model, inputs = mlp
    with pytest.raises(BackendError, match="CPU targets only.*tune=0"):
        graphc.compile(model, inputs, target="cuda", tune=4)


@pytest.mark.parametrize("name, target", [("conv_bn_residual", "cuda"),
                                          ("encoder_block", "cuda+fp16")])
def test_nvcc_compiles_the_generated_kernels(name, target, tmp_path):
    """The CUDA C that a GPU compiles on load is valid for the target's arch."""
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc not found: install the CUDA toolkit (or pip install "
                    "nvidia-cuda-nvcc and put its bin/ on PATH)")
    model, inputs = build(name)
    cm = graphc.compile(model, inputs, target=target)
    source = tmp_path / "kernels.cu"
    source.write_text(cm.runner.source("cuda"))
    arch = cm.meta["tvm"]["target"]["arch"]
    proc = subprocess.run(["nvcc", "--cubin", "-arch", arch, "-o", str(tmp_path / "k.cubin"),
                           str(source)], capture_output=True, text=True, timeout=240,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "k.cubin").stat().st_size > 1000
