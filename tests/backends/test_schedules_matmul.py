"""The matmul-family schedule rules (backends/tvm/schedules/matmul.py, int8.py): each takes
its op class, packs constant weights at compile time, and stays exact on odd shapes, for an
AVX2 (znver3) and an AVX-512 (znver4) target. Kernels are built from Relax directly so every
shape and dtype is reachable; one torch model checks the path through graphc.compile."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
import tvm
from torch import nn
from tvm import relax, te
from tvm.s_tir import dlight
from tvm.target import codegen

import graphc
from graphc.backends.tvm import pipeline
from graphc.backends.tvm.schedules import default_rules, layout
from graphc.backends.tvm.schedules.common import RULE_MARK as MARK

AVX2 = {"kind": "llvm", "mcpu": "znver3", "num-cores": 2}
AVX512 = {"kind": "llvm", "mcpu": "znver4", "num-cores": 2}


def _host_has(feature: str) -> bool:
    host = tvm.target.Target({"kind": "llvm", "mcpu": codegen.llvm_get_system_cpu()})
    return bool(codegen.target_has_features(feature, host))


TARGETS = [
    pytest.param(AVX2, id="avx2", marks=pytest.mark.skipif(
        not _host_has("avx2"), reason="host cannot run AVX2 code")),
    pytest.param(AVX512, id="avx512", marks=pytest.mark.skipif(
        not _host_has("avx512f"), reason="host cannot run AVX-512 code")),
]


@pytest.fixture(autouse=True)
def _empty_tuning_db(tmp_path, monkeypatch):
    # Tuned records would replace the rules under test.
    monkeypatch.setenv("GRAPHC_TUNING_DB", str(tmp_path / "tuning"))


# ---- helpers ------------------------------------------------------------------------------

def build(make, config: dict, with_asm: bool = False):
    """A Relax function built by `make(bb)`, through graphc's optimize and schedule phases
    and the build -> (scheduled IRModule, VirtualMachine[, the kernels' assembly])."""
    bb = relax.BlockBuilder()
    make(bb)
    mod = bb.get()
    tgt = tvm.target.Target(config)
    with tvm.transform.PassContext(opt_level=3), tgt:
        mod = tvm.transform.Sequential(pipeline.optimize_passes(tgt))(mod)
        mod = tvm.transform.Sequential(pipeline.schedule_passes(tgt))(mod)
        ex = tvm.compile(mod, tgt, relax_pipeline=tvm.transform.Sequential(
            pipeline.build_passes(tgt)))
    vm = relax.VirtualMachine(ex, tvm.cpu())
    if with_asm:
        return mod, vm, ex.mod.imports[0].inspect_source("asm")
    return mod, vm


def dense_fn(w: np.ndarray, x_shape: tuple, epilogue: str = "", bias=None):
    """x[x_shape] @ W (a constant), then the epilogue ops; a residual is a second input."""

    def make(bb):
        x = relax.Var("x", relax.TensorType(x_shape, str(w.dtype)))
        params = [x]
        if "residual" in epilogue:
            params.append(relax.Var("r", relax.TensorType((*x_shape[:-1], w.shape[1]),
                                                          "float32")))
        with bb.function("main", params):
            with bb.dataflow():
                y = bb.emit(relax.op.matmul(x, relax.const(w)))
                if bias is not None:
                    y = bb.emit(relax.op.add(y, relax.const(bias)))
                if "gelu" in epilogue:
                    y = bb.emit(relax.op.nn.gelu(y))
                if "relu" in epilogue:
                    y = bb.emit(relax.op.nn.relu(y))
                if "residual" in epilogue:
                    y = bb.emit(relax.op.add(y, params[1]))
                out = bb.emit_output(y)
            bb.emit_func_output(out)

    return make


def matmul_kernels(mod) -> dict[str, tvm.tirx.PrimFunc]:
    return {gv.name_hint: f for gv, f in mod.functions.items()
            if isinstance(f, tvm.tirx.PrimFunc) and MARK in f.script()}


def packed_constants(mod) -> list[np.ndarray]:
    """The constants main passes to `*_prepacked` kernels (the packed weights)."""
    found = []

    def visit(e):
        if isinstance(e, relax.Call) and e.op.same_as(tvm.ir.Op.get("relax.call_tir")) \
                and e.args[0].name_hint.endswith("_prepacked"):
            found.extend(a.value.numpy() for a in e.args[1].fields
                         if isinstance(a, tvm.ir.expr.Constant) and a.value.numpy().ndim >= 3)

    relax.analysis.post_order_visit(mod["main"].body, visit)
    return found


def assert_close(out: np.ndarray, ref: np.ndarray) -> None:
    scale = max(1.0, float(np.abs(ref).max()))
    assert out.shape == ref.shape
    assert np.abs(out - ref).max() / scale < 1e-4


def assert_panels(packed: np.ndarray, w: np.ndarray) -> None:
    """packed[j0, k, l] == w[k, j0*cols + l], zero past N: the micro-kernel's panels."""
    panels, k, cols = packed.shape
    assert k == w.shape[0] and panels * cols >= w.shape[1] > (panels - 1) * cols
    full = np.zeros((k, panels * cols), w.dtype)
    full[:, :w.shape[1]] = w
    np.testing.assert_array_equal(packed, full.reshape(k, panels, cols).transpose(1, 0, 2))


# ---- fp32 dense / linear ------------------------------------------------------------------

DENSE = [  # (M, K, N, epilogue): primes, 1, non-multiples of 8 and 16
    (1, 1, 1, "bias"),
    (7, 13, 29, "bias"),
    (5, 3, 17, "bias gelu"),
    (64, 32, 33, "relu"),
    (31, 64, 128, ""),
    (13, 37, 100, "bias residual"),
    (130, 384, 96, "bias"),
]


@pytest.mark.parametrize("config", TARGETS)
@pytest.mark.parametrize("m,k,n,epilogue", DENSE)
def test_dense_scheduled_packed_and_exact(config, m, k, n, epilogue):
    rng = np.random.default_rng(m * 1000 + n)
    w = rng.standard_normal((k, n)).astype("float32")
    bias = rng.standard_normal(n).astype("float32") if "bias" in epilogue else None
    mod, vm = build(dense_fn(w, (m, k), epilogue, bias), config)

    kernels = matmul_kernels(mod)
    assert len(kernels) == 1, "the epilogue must stay in the matmul's kernel"
    (name, func), = kernels.items()
    assert func.attrs["tirx.is_scheduled"]
    assert name.endswith("_prepacked") and "packed" in func.script()
    assert "_weight_prepack" not in mod["main"].script(), "weights repacked per call"
    packed = packed_constants(mod)
    assert len(packed) == 1
    assert_panels(packed[0], w)

    x = rng.standard_normal((m, k)).astype("float32")
    r = rng.standard_normal((m, n)).astype("float32")
    ref = torch.from_numpy(x @ w + (bias if bias is not None else 0))
    ref = torch.nn.functional.gelu(ref) if "gelu" in epilogue else ref
    ref = torch.relu(ref) if "relu" in epilogue else ref
    ref = (ref + torch.from_numpy(r) if "residual" in epilogue else ref).numpy()
    args = [x, r] if "residual" in epilogue else [x]
    out = vm["main"](*[tvm.runtime.tensor(a) for a in args]).numpy()
    assert_close(out, ref)


@pytest.mark.parametrize("config", TARGETS)
def test_dense_on_3d_input(config):
    # x[B, S, K] @ W without a reshape: a batch loop over a broadcast weight, packed once
    rng = np.random.default_rng(5)
    w = rng.standard_normal((7, 19)).astype("float32")
    mod, vm = build(dense_fn(w, (3, 5, 7)), config)
    assert len(matmul_kernels(mod)) == 1 and len(packed_constants(mod)) == 1
    x = rng.standard_normal((3, 5, 7)).astype("float32")
    assert_close(vm["main"](tvm.runtime.tensor(x)).numpy(), x @ w)


def test_tile_follows_isa():
    # 16 fp32 lanes and 32 registers on AVX-512 -> a wider micro-kernel than AVX2's 8 lanes.
    w = np.ones((64, 192), "float32")
    marks = {}
    for name, config in (("avx2", AVX2), ("avx512", AVX512)):
        bb = relax.BlockBuilder()
        dense_fn(w, (32, 64))(bb)
        tgt = tvm.target.Target(config)
        with tvm.transform.PassContext(opt_level=3), tgt:
            mod = tvm.transform.Sequential(pipeline.optimize_passes(tgt))(bb.get())
            mod = tvm.transform.Sequential(pipeline.schedule_passes(tgt))(mod)
        (func,) = matmul_kernels(mod).values()
        marks[name] = re.search(rf'"{MARK}": "matmul (\d+)x(\d+)x(\d+)', func.script()).groups()
    assert marks["avx2"][2] == "8" and marks["avx512"][2] == "16"


# ---- fp32 batch-matmul (attention: both operands are activations) ---------------------------

BMM = [(1, 7, 13, 29), (3, 9, 5, 33), (5, 17, 31, 16), (4, 128, 32, 128)]


@pytest.mark.parametrize("config", TARGETS)
@pytest.mark.parametrize("b,m,k,n", BMM)
def test_batch_matmul_exact(config, b, m, k, n):
    def make(bb):
        x = relax.Var("x", relax.TensorType((b, m, k), "float32"))
        y = relax.Var("y", relax.TensorType((b, k, n), "float32"))
        with bb.function("main", [x, y]):
            with bb.dataflow():
                out = bb.emit_output(relax.op.matmul(x, y))
            bb.emit_func_output(out)

    mod, vm = build(make, config)
    (func,) = matmul_kernels(mod).values()
    assert "packed" not in re.search(rf'"{MARK}": "([^"]*)"', func.script()).group(1)
    rng = np.random.default_rng(b * m)
    x = rng.standard_normal((b, m, k)).astype("float32")
    y = rng.standard_normal((b, k, n)).astype("float32")
    out = vm["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(y)).numpy()
    assert_close(out, x @ y)


@pytest.mark.parametrize("config", TARGETS)
def test_transposed_activation_repacked_per_call(config):
    # Q @ K^T with the transpose inside the kernel: K's j axis is not innermost, so the rule
    # packs it per call (no constant to fold) instead of gathering each vector.
    b, m, n, k = 3, 7, 19, 5
    q = te.placeholder((b, m, k), name="q")
    kt = te.placeholder((b, n, k), name="kt")
    r = te.reduce_axis((0, k), name="r")
    c = te.compute((b, m, n), lambda z, i, j: te.sum(q[z, i, r] * kt[z, j, r], axis=r),
                   name="matmul")
    tgt = tvm.target.Target(config)
    with tgt:
        mod = dlight.ApplyDefaultSchedule(*default_rules(tgt))(
            tvm.IRModule({"main": te.create_prim_func([q, kt, c])}))
    text = mod.script()
    assert MARK in text and layout.PREPROC not in text
    packed = re.search(r"kt_\w+ = T.sblock_alloc_buffer\(\(([^)]*)\)", text)
    assert packed and len(packed.group(1).split(",")) == 4  # [b, N/cols, K, cols]
    lib = tvm.compile(mod, tgt)
    rng = np.random.default_rng(3)
    qa = rng.standard_normal((b, m, k)).astype("float32")
    ka = rng.standard_normal((b, n, k)).astype("float32")
    out = tvm.runtime.tensor(np.zeros((b, m, n), "float32"))
    lib["main"](tvm.runtime.tensor(qa), tvm.runtime.tensor(ka), out)
    assert_close(out.numpy(), qa @ ka.transpose(0, 2, 1))


def test_epilogue_through_a_reshape_stays_a_separate_nest():
    # an epilogue reading the result through a reshape cannot share the tile loops: the
    # rule still tiles the matmul (copy-out block) and leaves that epilogue after it
    m, k, n = 10, 24, 20
    a, w = te.placeholder((m, k), name="a"), te.placeholder((k, n), name="w")
    r = te.reduce_axis((0, k), name="r")
    c = te.compute((m, n), lambda i, j: te.sum(a[i, r] * w[r, j], axis=r), name="matmul")
    d = te.compute((m * n // 4, 4), lambda p, q: c[(p * 4 + q) // n, (p * 4 + q) % n] + 1.0,
                   name="T_reshape_add")
    tgt = tvm.target.Target(AVX2)
    with tgt:
        mod = dlight.ApplyDefaultSchedule(*default_rules(tgt))(
            tvm.IRModule({"main": te.create_prim_func([a, w, d])}))
    assert MARK in mod.script()
    rng = np.random.default_rng(4)
    aa, ww = (rng.standard_normal(s).astype("float32") for s in ((m, k), (k, n)))
    out = tvm.runtime.tensor(np.zeros((m * n // 4, 4), "float32"))
    tvm.compile(mod, tgt)["main"](tvm.runtime.tensor(aa), tvm.runtime.tensor(ww), out)
    assert_close(out.numpy(), (aa @ ww).reshape(-1, 4) + 1)


# ---- int8 x int8 -> int32 -------------------------------------------------------------------

def _ints(rng, shape, dtype):
    info = np.iinfo(dtype)  # the full range: u8 x s8 pair sums overflow int16 (no saturation)
    return rng.integers(info.min, info.max + 1, shape).astype(dtype)


INT8 = [  # (x dtype, w dtype, M, K, N)
    ("uint8", "int8", 1, 1, 1),
    ("uint8", "int8", 13, 37, 29),
    ("int8", "int8", 7, 61, 50),
    ("uint8", "uint8", 5, 6, 17),
    ("int8", "uint8", 33, 130, 64),
]
# the instruction each (ISA, dtypes) must reach, checked in the assembly
INSTRUCTION = {("avx512", ("uint8", "int8")): "vpdpbusd", ("avx512", ("int8", "uint8")): "vpdpbusd",
               ("avx512", None): "vpdpwssd",
               ("avx2", None): "vpmaddwd"}


@pytest.mark.parametrize("config", TARGETS)
@pytest.mark.parametrize("xdt,wdt,m,k,n", INT8)
def test_int8_dense_exact_with_dot_instructions(config, xdt, wdt, m, k, n):
    rng = np.random.default_rng(m + k + n)
    w = _ints(rng, (k, n), wdt)

    def make(bb):
        x = relax.Var("x", relax.TensorType((m, k), xdt))
        with bb.function("main", [x]):
            with bb.dataflow():
                out = bb.emit_output(relax.op.matmul(x, relax.const(w), out_dtype="int32"))
            bb.emit_func_output(out)

    mod, vm, asm = build(make, config, with_asm=True)
    (func,) = matmul_kernels(mod).values()
    mark = re.search(rf'"{MARK}": "([^"]*)"', func.script()).group(1)
    assert mark.startswith("int8") and mark.endswith("packed")
    assert "_weight_prepack" not in mod["main"].script()
    isa = "avx512" if config is AVX512 else "avx2"
    want = INSTRUCTION.get((isa, (xdt, wdt)), INSTRUCTION[(isa, None)])
    assert re.search(rf"\b{want}\b", asm), f"{want} not in the kernel"

    x = _ints(rng, (m, k), xdt)
    out = vm["main"](tvm.runtime.tensor(x)).numpy()
    np.testing.assert_array_equal(out, x.astype(np.int64) @ w.astype(np.int64))


@pytest.mark.parametrize("config", TARGETS)
def test_int8_batch_matmul_and_dequant_epilogue(config):
    # activations on both sides (nothing to pack), odd batch, and a float epilogue fused in
    b, m, k, n = 3, 9, 21, 19
    rng = np.random.default_rng(1)
    scale = rng.uniform(0.01, 0.1, n).astype("float32")

    def make(bb):
        x = relax.Var("x", relax.TensorType((b, m, k), "uint8"))
        y = relax.Var("y", relax.TensorType((b, k, n), "int8"))
        with bb.function("main", [x, y]):
            with bb.dataflow():
                acc = bb.emit(relax.op.matmul(x, y, out_dtype="int32"))
                f = bb.emit(relax.op.astype(acc, "float32"))
                out = bb.emit_output(relax.op.multiply(f, relax.const(scale)))
            bb.emit_func_output(out)

    mod, vm = build(make, config)
    (name,) = matmul_kernels(mod)
    assert "multiply" in name, "the dequantizing epilogue must be fused into the int8 kernel"
    x, y = _ints(rng, (b, m, k), "uint8"), _ints(rng, (b, k, n), "int8")
    out = vm["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(y)).numpy()
    ref = (x.astype(np.int64) @ y.astype(np.int64)).astype(np.float32) * scale
    assert_close(out, ref)


# ---- through graphc.compile ---------------------------------------------------------------

class Block(nn.Module):
    """Linear layers with odd sizes, GELU and a residual, as a transformer MLP has them."""

    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(19, 37), nn.Linear(37, 19)

    def forward(self, x):
        return x + self.down(nn.functional.gelu(self.up(x)))


def test_linear_model_through_compile(tmp_path):
    torch.manual_seed(0)
    model, x = Block().eval(), torch.randn(3, 5, 19)
    cm = graphc.compile(model, (x,), target="cpu", dump_ir=tmp_path)
    with torch.no_grad():
        ref = model(x)
    assert (cm(x) - ref).abs().max().item() < 1e-4 * max(1.0, ref.abs().max().item())
    (tir,) = tmp_path.glob("*-tir.py")
    text = tir.read_text()
    # both linears (bias+GELU, bias+residual fused in) run on the rule, on packed weights
    assert text.count(f'"{MARK}": "matmul') >= 2 and text.count("packed") >= 2


def test_rule_is_ahead_of_dlight():
    names = [type(r.rule).__name__ for r in default_rules(tvm.target.Target(AVX512))]
    assert names.index("MatmulRule") < names.index("Reduction")
    assert names.index("Int8MatmulRule") < names.index("Reduction")
