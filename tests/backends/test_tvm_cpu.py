"""The TVM CPU backend against PyTorch: numerics, the CompiledModel shell, artifacts, targets,
IR dumps and the lowering registry. Tiny shapes; each model is compiled once per module."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import zipfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import tvm
from torch import nn
from tvm import relax

import graphc
from graphc.backends import torch_backend
from graphc.backends.tvm import LOWERINGS, PRESETS, build, register_lowering
from graphc.backends.tvm.lower import op_key
from graphc.compiled import ArtifactError, CompiledModel, load_compiled
from graphc.errors import BackendError, GraphcError, InputError, UnsupportedOpError
from graphc.pipeline import PassRecord
from graphc.spec import TensorSpec
from tests.models.zoo import randomize_batchnorm

TOL = 1e-4  # fp32, against PyTorch eager


# ---- models -------------------------------------------------------------------------------

class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(16, 32), nn.Linear(32, 32), nn.Linear(32, 4)

    def forward(self, x):
        return self.fc3(torch.tanh(self.fc2(F.relu(self.fc1(x)))))


class ConvNet(nn.Module):
    """conv + batchnorm + residual + relu + max/avg pooling."""

    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c2, self.b2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        y = F.relu(self.b1(self.c1(x)))
        y = F.max_pool2d(F.relu(y + self.b2(self.c2(y))), 2)
        return self.fc(F.adaptive_avg_pool2d(y, 1).flatten(1))


class DepthwiseSeparable(nn.Module):
    def __init__(self, c: int = 8):
        super().__init__()
        self.dw, self.bn1 = nn.Conv2d(c, c, 3, padding=1, groups=c), nn.BatchNorm2d(c)
        self.pw, self.bn2 = nn.Conv2d(c, 2 * c, 1), nn.BatchNorm2d(2 * c)

    def forward(self, x):
        return F.relu6(self.bn2(self.pw(F.relu6(self.bn1(self.dw(x))))))


class Encoder(nn.Module):
    """Multi-head attention with a key padding mask, layernorm, GELU MLP, softmax."""

    def __init__(self):
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, activation="gelu",
                                                batch_first=True)

    def forward(self, x, pad_mask):
        return self.layer(x, src_key_padding_mask=pad_mask)


class TwoHeads(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 6)

    def forward(self, x):
        y = self.fc(x)
        return y.relu(), y.sum(dim=1)


def _pad_mask() -> torch.Tensor:
    mask = torch.zeros(2, 6, dtype=torch.bool)
    mask[1, 4:] = True
    return mask


MODELS = {
    "mlp": (MLP, lambda: (torch.randn(4, 16),)),
    "convnet": (ConvNet, lambda: (torch.randn(2, 3, 16, 16),)),
    "depthwise": (DepthwiseSeparable, lambda: (torch.randn(2, 8, 12, 12),)),
    "encoder": (Encoder, lambda: (torch.randn(2, 6, 32), _pad_mask())),
    "two_heads": (TwoHeads, lambda: (torch.randn(3, 8),)),
}


def export(model: nn.Module, inputs: tuple):
    """What graphc hands the backend: a core-ATen ExportedProgram and its specs."""
    ep = torch.export.export(model, inputs).run_decompositions()
    out = model(*inputs)
    outs = out if isinstance(out, tuple) else (out,)
    names = ep.graph_signature.user_inputs
    return ep, {"input_specs": [TensorSpec.of(n, t) for n, t in zip(names, inputs)],
                "output_specs": [TensorSpec.of(f"out{i}", t) for i, t in enumerate(outs)],
                "single_output": not isinstance(out, tuple)}


def compile_model(model, inputs, **kwargs) -> CompiledModel:
    ep, specs = export(model, inputs)
    return build(ep, **specs, **kwargs)


@pytest.fixture(scope="module")
def compiled():
    """name -> (model, inputs, CompiledModel), compiled lazily once for the module."""
    cache = {}

    def get(name):
        if name not in cache:
            torch.manual_seed(0)
            factory, make_inputs = MODELS[name]
            model, inputs = randomize_batchnorm(factory()), make_inputs()
            cache[name] = (model, inputs, compile_model(model, inputs))
        return cache[name]

    return get


def max_err(a, b) -> float:
    return float((torch.as_tensor(a) - torch.as_tensor(b)).abs().max())


# ---- numerics and the call convention -----------------------------------------------------

@pytest.mark.parametrize("name", ["mlp", "convnet", "depthwise", "encoder"])
def test_matches_pytorch(compiled, name):
    model, inputs, cm = compiled(name)
    with torch.no_grad():
        ref = model(*inputs)
    out = cm(*inputs)
    assert isinstance(out, torch.Tensor) and out.shape == ref.shape and out.dtype == ref.dtype
    assert ref.abs().max() > 0.1  # a real signal, not all zeros
    assert max_err(out, ref) < TOL


def test_numpy_in_numpy_out(compiled):
    model, (x,), cm = compiled("mlp")
    out = cm(x.numpy())
    assert isinstance(out, np.ndarray) and out.dtype == np.float32
    assert max_err(out, model(x).detach()) < TOL


def test_tuple_outputs_keep_order(compiled):
    model, inputs, cm = compiled("two_heads")
    assert not cm.single_output
    outs = cm(*inputs)
    refs = model(*inputs)
    assert isinstance(outs, tuple) and len(outs) == 2
    for out, ref in zip(outs, refs):
        assert out.shape == ref.shape and max_err(out, ref.detach()) < TOL


def test_bad_inputs_name_the_input(compiled):
    _, (x, mask), cm = compiled("encoder")
    with pytest.raises(InputError, match="'x'.*f32\\[2, 6, 32\\].*f32\\[2, 5, 32\\]"):
        cm(x[:, :5], mask)
    with pytest.raises(InputError, match="'pad_mask'.*bool.*i64"):
        cm(x, mask.long())
    with pytest.raises(InputError, match="expected 2 inputs \\(x, pad_mask\\), got 1"):
        cm(x)
    with pytest.raises(InputError, match="'pad_mask' must be a torch.Tensor or numpy.ndarray"):
        cm(x, mask.tolist())


def test_weights_are_copied_at_compile_time(compiled):
    model, (x,), cm = compiled("mlp")
    before = cm(x)
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():  # TVM's importer would share this memory via DLPack
        for p in model.parameters():
            p.mul_(3.0)
    try:
        assert torch.equal(cm(x), before)
    finally:
        model.load_state_dict(saved)


def test_signature_mismatch_is_a_backend_error():
    model, inputs = MLP().eval(), (torch.randn(4, 16),)
    ep, specs = export(model, inputs)
    specs["output_specs"] = [TensorSpec("out0", (4, 5), torch.float32)]
    with pytest.raises(BackendError, match="differs from the graph's specs"):
        build(ep, **specs)


# ---- artifacts ----------------------------------------------------------------------------

def test_save_load_round_trip(compiled, tmp_path):
    _, inputs, cm = compiled("encoder")
    cm.meta["passes"] = [{"pass": "input", "seconds": 0.5, "nodes": 3}]
    path = tmp_path / "enc.graphc"
    cm.save(path)
    loaded = load_compiled(path)
    assert loaded.input_specs == cm.input_specs and loaded.output_specs == cm.output_specs
    assert (loaded.target, loaded.backend) == (cm.target, "tvm")
    # wall-clock timings stay out of the file (it is reproducible); the rest round-trips
    assert loaded.meta["passes"] == [{"pass": "input", "nodes": 3}]
    assert loaded.meta["tvm"]["target"] == cm.meta["tvm"]["target"]
    assert torch.equal(loaded(*inputs), cm(*inputs))
    loaded.save(tmp_path / "again.graphc")  # a loaded model can be saved again
    assert torch.equal(load_compiled(tmp_path / "again.graphc")(*inputs), cm(*inputs))


def test_load_in_a_fresh_process(compiled, tmp_path):
    _, (x,), cm = compiled("mlp")
    cm.save(tmp_path / "mlp.graphc")
    np.save(tmp_path / "x.npy", x.numpy())
    script = textwrap.dedent(f"""
        import numpy as np, tvm
        from graphc.compiled import load_compiled
        cm = load_compiled({str(tmp_path / "mlp.graphc")!r})
        np.save({str(tmp_path / "y.npy")!r}, cm(np.load({str(tmp_path / "x.npy")!r})))
        print("threads", tvm.runtime.num_threads())
    """)
    env = {k: v for k, v in os.environ.items() if k != "TVM_NUM_THREADS"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=env, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert np.array_equal(np.load(tmp_path / "y.npy"), cm(x.numpy()))
    # graphc.backends.tvm sets TVM_NUM_THREADS itself (TVM alone used 1 thread here)
    assert f"threads {os.cpu_count()}" in proc.stdout


def test_corrupt_or_foreign_files_fail_cleanly(compiled, tmp_path):
    _, _, cm = compiled("mlp")
    good = tmp_path / "good.graphc"
    cm.save(good)
    cases = {"random.graphc": os.urandom(4096),
             "truncated.graphc": good.read_bytes()[: good.stat().st_size // 2]}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
    with zipfile.ZipFile(tmp_path / "foreign.graphc", "w") as zf:
        zf.writestr("hello.txt", "not graphc")
    with zipfile.ZipFile(tmp_path / "badlib.graphc", "w") as zf, zipfile.ZipFile(good) as src:
        zf.writestr("meta.json", src.read("meta.json"))
        zf.writestr("runner/runner.json", src.read("runner/runner.json"))
        zf.writestr("runner/lib.so", b"\x7fELF garbage")
    with zipfile.ZipFile(tmp_path / "future.graphc", "w") as zf, zipfile.ZipFile(good) as src:
        zf.writestr("meta.json", json.dumps({**json.loads(src.read("meta.json")), "version": 99}))
    expected = {"random": "not a graphc artifact or is corrupt", "truncated": "corrupt",
                "foreign": "no meta.json", "badlib": r"'runner/lib.so' fails its SHA-256 check",
                "future": "artifact version 99"}
    for stem, message in expected.items():
        with pytest.raises(ArtifactError, match=message) as info:
            load_compiled(tmp_path / f"{stem}.graphc")
        assert isinstance(info.value, GraphcError)
    with pytest.raises(FileNotFoundError):
        load_compiled(tmp_path / "missing.graphc")


def test_meta_must_be_json(compiled, tmp_path):
    _, _, cm = compiled("mlp")
    cm = CompiledModel(cm.runner, input_specs=cm.input_specs, output_specs=cm.output_specs,
                       single_output=True, target=cm.target, backend="tvm",
                       meta={"bad": object()})
    with pytest.raises(GraphcError, match="JSON-serializable"):
        cm.save(tmp_path / "x.graphc")
    assert not list(tmp_path.iterdir())  # no half-written file left behind


# ---- targets ------------------------------------------------------------------------------

@pytest.mark.parametrize("target", [
    "cpu", "x86", {"kind": "llvm", "mcpu": "x86-64-v3", "num-cores": 2},
    '{"kind": "llvm", "num-cores": 1}', tvm.target.Target({"kind": "llvm"}),
], ids=["cpu", "x86", "dict", "json", "Target"])
def test_targets_compile_and_match(target):
    torch.manual_seed(0)
    model, x = MLP().eval(), torch.randn(4, 16)
    cm = compile_model(model, (x,), target=target)
    assert max_err(cm(x), model(x).detach()) < TOL
    assert cm.target.startswith("llvm") or cm.target.split(":")[0] in PRESETS


def test_cpu_preset_names_the_host_cpu():
    from graphc.backends.tvm.target import resolve_target

    resolved = resolve_target("cpu")
    assert resolved.target.attrs["mcpu"] == tvm.target.codegen.llvm_get_system_cpu()
    assert resolved.target.attrs["num-cores"] == os.cpu_count()
    assert "mcpu=x86-64-v2" in resolve_target("x86").description


def test_unknown_target_lists_presets():
    model, x = MLP().eval(), torch.randn(4, 16)
    with pytest.raises(BackendError, match="unknown target 'tpu'.*'cpu'.*'x86'"):
        compile_model(model, (x,), target="tpu")
    with pytest.raises(BackendError, match="invalid target"):
        compile_model(model, (x,), target={"kind": "no-such-kind"})


# ---- dumps, schedules, lowering rules -----------------------------------------------------

def test_dump_receives_the_three_stages():
    torch.manual_seed(0)
    stages = []
    model, inputs = Encoder().eval(), (torch.randn(2, 6, 32), _pad_mask())
    compile_model(model, inputs, dump=lambda stage, text: stages.append((stage, text)))
    assert [s for s, _ in stages] == ["relax", "relax-opt", "tir"]
    text = dict(stages)
    assert "R.function" in text["relax"] and "R.nn.gelu" in text["relax"]
    assert "R.call_tir" in text["relax-opt"] and "T.prim_func" in text["relax-opt"]
    assert "T.prim_func" in text["tir"] and "R.function" not in text["tir"]
    assert "tirx.is_scheduled" in text["tir"]  # dlight scheduled the matmuls and reductions
    assert "T.erf" not in text["tir"]  # GELU uses fast_erf (legalize.py), not scalar libm erf


def test_convolutions_get_the_conv_rule():
    # dlight's rules made convs slower (see schedules/__init__.py); the conv2d rule takes them.
    torch.manual_seed(0)
    funcs = {}

    def keep_tir(stage, text):
        if stage == "tir":
            funcs.update(_split_prim_funcs(text))

    compile_model(randomize_batchnorm(ConvNet()), (torch.randn(2, 3, 16, 16),), dump=keep_tir)
    conv = [body for name, body in funcs.items() if "conv" in name]
    others = [body for name, body in funcs.items() if "matmul" in name]
    assert conv and all("is_scheduled" in body and '"graphc.schedule": "conv2d.' in body
                        for body in conv)
    assert others and all("is_scheduled" in body for body in others)


def _split_prim_funcs(text: str) -> dict[str, str]:
    parts = text.split("@T.prim_func")[1:]
    return {p.split("def ", 1)[1].split("(", 1)[0]: p for p in parts}


def test_unsupported_aten_op_names_op_and_node():
    class Digamma(nn.Module):
        def forward(self, x):
            return torch.digamma(x).relu()

    with pytest.raises(UnsupportedOpError, match="no lowering for aten.digamma.default at "
                                                  "node %digamma; register one with "
                                                  "graphc.backends.tvm.register_lowering"):
        compile_model(Digamma(), (torch.rand(3, 4) + 1,))


@torch.library.custom_op("graphc_test::scale_add", mutates_args=())
def scale_add(x: torch.Tensor, y: torch.Tensor, alpha: float) -> torch.Tensor:
    return x * alpha + y


@scale_add.register_fake
def _(x, y, alpha):
    return torch.empty_like(x)


@torch.library.custom_op("graphc_test::relu", mutates_args=())
def not_relu(x: torch.Tensor) -> torch.Tensor:
    return x * 2  # same short name as aten.relu.default, different meaning


@not_relu.register_fake
def _(x):
    return torch.empty_like(x)


class CustomOps(nn.Module):
    def forward(self, x, y):
        return torch.ops.graphc_test.relu(torch.ops.graphc_test.scale_add(x, y, 3.0)).tanh()


def test_lowering_registry_for_custom_ops(monkeypatch):
    monkeypatch.setattr("graphc.backends.tvm.lower.LOWERINGS", dict(LOWERINGS))
    from graphc.backends.tvm import lower

    inputs = (torch.randn(3, 5), torch.randn(3, 5))
    # graphc_test::relu must not fall through to TVM's aten.relu rule (same short name)
    with pytest.raises(UnsupportedOpError, match="graphc_test.scale_add.default at node "
                                                  "%scale_add"):
        compile_model(CustomOps(), inputs)

    @register_lowering("graphc_test::scale_add")
    def _(node, importer):
        x, y = importer.env[node.args[0]], importer.env[node.args[1]]
        alpha = relax.const(node.args[2], x.ty.dtype)
        return importer.block_builder.emit(relax.op.add(relax.op.multiply(x, alpha), y))

    with pytest.raises(UnsupportedOpError, match="graphc_test.relu.default at node %relu"):
        compile_model(CustomOps(), inputs)

    @register_lowering(torch.ops.graphc_test.relu)
    def _(node, importer):
        x = importer.env[node.args[0]]
        return importer.block_builder.emit(relax.op.multiply(x, relax.const(2.0, x.ty.dtype)))

    assert set(lower.LOWERINGS) >= {"graphc_test.scale_add.default", "graphc_test.relu.default"}
    cm = compile_model(CustomOps(), inputs)
    assert max_err(cm(*inputs), CustomOps()(*inputs)) < TOL


def test_op_key_spellings():
    assert op_key("graphc::int8_linear") == "graphc.int8_linear.default"
    assert op_key("graphc::int8_linear.out") == "graphc.int8_linear.out"
    assert op_key("graphc.int8_linear") == "graphc.int8_linear.default"
    assert op_key(torch.ops.aten.relu) == "aten.relu.default"
    assert op_key(torch.ops.aten.add.Tensor) == "aten.add.Tensor"
    with pytest.raises(BackendError):
        op_key("relu")


# ---- benchmark, report, the torch backend -------------------------------------------------

def test_benchmark_stats(compiled):
    _, _, cm = compiled("mlp")
    stats = cm.benchmark(repeat=20, warmup=2, number=3)
    assert {"median", "mean", "min", "max", "p90", "std"} <= set(stats)
    assert 0 < stats["min"] <= stats["median"] <= stats["p90"] <= stats["max"] < 1000
    assert stats["std"] >= 0 and stats["repeat"] == 20 and stats["number"] == 3


def test_report_renders_pass_rows(compiled):
    _, _, cm = compiled("mlp")
    cm.meta["passes"] = [
        PassRecord("input", 0.0, 12, 1024, 4096, 0.0, 0.0, False).row(),
        PassRecord("fold-batchnorm", 0.0123, 9, 1000, 4000, 1.5e-7, 2e-7, True).row(),
    ]
    text = cm.report()
    assert "fold-batchnorm" in text and "1.50e-07" in text and "4,096" in text
    assert "backend=tvm" in text


def test_torch_backend_runs_and_saves(tmp_path):
    torch.manual_seed(0)
    model, inputs = Encoder().eval(), (torch.randn(2, 6, 32), _pad_mask())
    ep, specs = export(model, inputs)
    cm = torch_backend.build(ep, **specs)
    ref = model(*inputs).detach()
    assert max_err(cm(*inputs), ref) < 1e-6
    assert isinstance(cm(*(t.numpy() for t in inputs)), np.ndarray)
    cm.save(tmp_path / "t.graphc")
    assert torch.equal(load_compiled(tmp_path / "t.graphc")(*inputs), cm(*inputs))
    unsaveable = torch_backend.build(model, **specs)
    with pytest.raises(GraphcError, match="use target='cpu'"):
        unsaveable.save(tmp_path / "u.graphc")


def test_transposed_3d_convolution_is_refused_by_name():
    model = torch.nn.ConvTranspose3d(2, 3, 3).eval()
    x = torch.randn(1, 2, 4, 4, 4)
    with pytest.raises(UnsupportedOpError, match=r"%convolution .*transposed convolution over "
                                                 r"3 spatial dims"):
        graphc.compile(model, (x,), target="cpu")
