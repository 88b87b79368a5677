"""backends/tvm/decode_permute.py: a decoded weight's relayout without relayout kernels."""

import numpy as np
import pytest
import torch
from torch import nn

import graphc
from graphc.backends.tvm.decode_permute import _gather, _swapped_axes
from graphc.ops_codebook import pack
from tests.backends.test_lower_codebook import _kernel_calls
from tests.single_thread import one_torch_thread, single_thread  # noqa: F401  (autouse)

Q = torch.ops.graphc


class Relaid(nn.Module):
    """A 3-bit [4, 8, 8] codebook weight, moved (or changed) before a linear reads it."""

    def __init__(self, how: str):
        super().__init__()
        self.how = how
        self.codebook = nn.Parameter(torch.randn(8))
        self.register_buffer("w", pack(torch.randint(0, 8, (4, 8, 8)), 3))

    def forward(self, x):
        w = Q.codebook_decode(self.codebook, self.w, 3, [4, 8, 8])
        w = w.permute(1, 0, 2) if self.how == "gather" else w.abs()
        return nn.functional.linear(x, w.reshape(32, 8))


def _compiled(how, monkeypatch):
    from graphc.backends.tvm import pipeline

    monkeypatch.setattr(pipeline, "EXEC_MODE", "bytecode")  # for _kernel_calls
    torch.manual_seed(0)
    m, x = Relaid(how).eval(), torch.randn(3, 8)
    cm = graphc.compile(m, (x,), target="cpu")
    with torch.no_grad():
        torch.testing.assert_close(cm(x), m(x), rtol=1e-5, atol=1e-5)
    return cm, x


def test_a_gather_that_is_no_transpose_is_done_on_the_indices(monkeypatch, tmp_path):
    """permute(1, 0, 2), then the linear's transpose and prepack: no [nb, nr, nc] axis swap,
    so the indices are stored gathered and the init function runs the decode kernel only."""
    cm, x = _compiled("gather", monkeypatch)
    init, first, _ = _kernel_calls(cm, x)
    print("init:", init, "call:", first)
    assert init == ["codebook_decode3"] and first == ["matmul1_prepacked"]
    cm.save(tmp_path / "m.graphc")
    with torch.no_grad():
        torch.testing.assert_close(graphc.load(tmp_path / "m.graphc")(x), cm(x))


def test_arithmetic_on_a_decoded_weight_keeps_its_kernels(monkeypatch):
    """abs() leaves the position probes as they are (they are positive), so only the check
    against the chain's result on the weight itself tells it is no relayout."""
    cm, x = _compiled("abs", monkeypatch)
    init, _, _ = _kernel_calls(cm, x)
    print("init:", init)
    assert any("abs" in k for k in init)


@pytest.mark.parametrize("shape, perm, dims", [
    ((64, 512), (1, 0), (1, 512, 64)),               # a linear's transpose
    ((32, 144), (1, 0), (1, 144, 32)),               # a conv's prepack, one block
    ((2, 16, 72), (0, 2, 1), (2, 72, 16)),           # the same, blocks of 16 channels
    ((6, 5), (0, 1), (30, 1, 1)),                    # as packed
])
def test_swapped_axes_of_transposes(shape, perm, dims):
    src = np.arange(np.prod(shape)).reshape(shape).transpose(perm).reshape(-1)
    assert _swapped_axes(src) == dims


@pytest.mark.parametrize("shape, perm", [((4, 8, 8), (1, 0, 2)), ((3, 4, 5), (2, 1, 0))])
def test_other_gathers_are_no_swapped_axes(shape, perm):
    src = np.arange(np.prod(shape)).reshape(shape).transpose(perm).reshape(-1)
    assert _swapped_axes(src) is None
    assert _swapped_axes(src[::-1].copy()) is None


def test_positions_with_padding_or_fractions_are_no_gather():
    moved = np.arange(1, 11, dtype=np.float32)[::-1].copy()
    assert np.array_equal(_gather(moved, 10), np.arange(10)[::-1])
    assert _gather(np.concatenate([moved, [0, 0]]).astype(np.float32), 10) is None  # padding
    assert _gather(moved + 0.5, 10) is None
    assert _gather(moved * 2, 10) is None  # outside the weight
