"""graphc.compile end to end: trace -> passes -> TVM CPU, against PyTorch and onnxruntime."""

import numpy as np
import pytest
import torch

import graphc
from tests.models.zoo import MODELS, build

PASSES = "fold-batchnorm, constant-folding, dead-code-elimination"


@pytest.mark.parametrize("name", sorted(MODELS))
def test_compile_with_passes_matches_pytorch(name):
    m, x = build(name)
    cm = graphc.compile(m, x, target="cpu", passes=PASSES, verify=True)
    with torch.no_grad():
        ref = m(*x)
    out = cm(*x)
    assert isinstance(out, torch.Tensor)  # the model returns one tensor, so does cm
    assert (out - ref).abs().max().item() < 1e-4
    steps = [r["step"] for r in cm.meta["passes"]]
    assert steps == ["input", "fold-batchnorm", "constant-folding", "dead-code-elimination"]


def test_numpy_in_numpy_out_and_save_load(tmp_path):
    m, x = build("depthwise_separable")
    cm = graphc.compile(m, x, passes="fold-batchnorm")
    xn = x[0].numpy()
    out = cm(xn)
    assert isinstance(out, np.ndarray) and out.dtype == np.float32
    cm.save(tmp_path / "m.graphc")
    cm2 = graphc.load(tmp_path / "m.graphc")
    np.testing.assert_array_equal(cm2(xn), out)
    assert cm2.meta["passes"][1]["step"] == "fold-batchnorm"


def test_dump_ir_has_every_stage(tmp_path):
    m, x = build("mlp")
    graphc.compile(m, x, passes="constant-folding", dump_ir=tmp_path)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["00-input.svg", "00-input.txt", "01-constant-folding.svg",
                     "01-constant-folding.txt", "02-relax.py", "03-relax-opt.py", "04-tir.py"]
    assert "R.function" in (tmp_path / "02-relax.py").read_text()
    assert "T.prim_func" in (tmp_path / "04-tir.py").read_text()


def test_torch_target_is_the_reference():
    m, x = build("encoder_block")
    cm = graphc.compile(m, x, target="torch", passes=PASSES)
    with torch.no_grad():
        torch.testing.assert_close(cm(*x), m(*x), rtol=1e-5, atol=1e-5)


def test_trace_requires_inputs_for_pytorch_models():
    m, _ = build("mlp")
    with pytest.raises(graphc.FrontendError, match=r"needs example inputs"):
        graphc.trace(m)


def test_non_tensor_inputs_are_rejected():
    m, x = build("mlp")
    with pytest.raises(graphc.FrontendError, match=r"input 1 is a int"):
        graphc.trace(m, (x[0], 3))


class _Branchy(torch.nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # data-dependent Python control flow: untraceable
            return x * 2
        return x - 1


def test_untraceable_model_names_the_line_and_suggests_a_fix():
    with pytest.raises(graphc.FrontendError) as info:
        graphc.trace(_Branchy(), (torch.randn(3),))
    text = str(info.value)
    assert "cannot trace '_Branchy'" in text
    assert "test_api.py:" in text and "if x.sum() > 0:" in text
    assert "torch.where or torch.cond" in text


def test_wrong_input_shape_on_call():
    m, x = build("mlp")
    cm = graphc.compile(m, x)
    with pytest.raises(graphc.InputError, match=r"input 'x' expects x: f32\[4, 20\], got "
                                                 r"x: f32\[5, 20\]"):
        cm(torch.randn(5, 20))


@pytest.mark.parametrize("name", sorted(MODELS))
def test_onnx_models_compile_and_match_onnxruntime(name, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    m, x = build(name)
    path = tmp_path / f"{name}.onnx"
    names = [f"in{i}" for i in range(len(x))]
    # keep BatchNormalization nodes in the file, so fold-batchnorm has work to do
    torch.onnx.export(m, x, str(path), input_names=names, dynamo=False,
                      do_constant_folding=False)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {n: t.numpy() for n, t in zip(names, x)}
    (ref,) = sess.run(None, feeds)
    cm = graphc.compile(path, target="cpu", passes=PASSES, verify=True)
    assert [s.name for s in cm.input_specs] == names
    (out,) = cm(*feeds.values())  # ONNX graphs return a list of outputs, as onnxruntime does
    assert isinstance(out, np.ndarray)
    assert np.abs(out - ref).max() < 1e-4


def test_pass_reports_travel_into_the_artifact(tmp_path):
    m, x = build("mlp")
    q = graphc.quantize(graphc.trace(m, x))
    cm = graphc.compile(q, target="torch")
    assert cm.meta["quantize"]["layers"] == q.meta["quantize"]["layers"]
    assert "calibration" not in cm.meta  # tensors stay behind
