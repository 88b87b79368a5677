"""TVM runtime threads: all cores by default, `num_threads` really changes the pool's thread
count, and results do not depend on it (bitwise)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import graphc
from graphc.errors import GraphcError

CORES = os.cpu_count() or 1


class ConvMLP(nn.Module):
    """A conv (parallel over channels) and a matmul big enough to be split across threads."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.fc1, self.fc2 = nn.Linear(16 * 16 * 16, 256), nn.Linear(256, 10)

    def forward(self, x):
        y = F.relu(self.conv(x)).flatten(1)
        return self.fc2(torch.tanh(self.fc1(y)))


@pytest.fixture(scope="module")
def compiled():
    torch.manual_seed(0)
    model = ConvMLP().eval()
    x = torch.randn(4, 3, 16, 16)
    return model, x, graphc.compile(model, (x,), target="cpu")


@pytest.mark.skipif(CORES < 2, reason="needs 2 cores")
def test_results_are_bitwise_identical_across_thread_counts(compiled):
    model, x, cm = compiled
    outs = {}
    for n in (1, CORES, 1, None):
        cm.num_threads = n
        assert cm.num_threads == n
        outs[n] = cm(x).numpy()
    for n, out in outs.items():
        np.testing.assert_array_equal(out, outs[1], err_msg=f"num_threads={n}")
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(outs[None]), model(x), rtol=1e-4, atol=1e-4)


def test_num_threads_is_validated(compiled):
    _, _, cm = compiled
    for bad in (0, -2, 1.5, True, "2"):
        with pytest.raises(GraphcError, match="num_threads"):
            cm.num_threads = bad
    cm.num_threads = None
    torch_cm = graphc.compile(ConvMLP().eval(), (torch.randn(1, 3, 16, 16),), target="torch")
    with pytest.raises(GraphcError, match="thread"):
        torch_cm.num_threads = 1


_PROBE = textwrap.dedent("""
    import sys, tvm, torch, graphc
    from graphc.backends.tvm.runtime import max_threads
    from tests.backends.test_threads import ConvMLP
    n = None if sys.argv[1] == "default" else int(sys.argv[1])
    x = torch.randn(1, 3, 16, 16)
    cm = graphc.compile(ConvMLP().eval(), (x,), target="cpu", num_threads=n)
    cm(x)
    print(tvm.runtime.num_threads(), max_threads())
""")


@pytest.mark.skipif(CORES < 2, reason="needs 2 cores")
@pytest.mark.parametrize("request_threads", ["default", "1"])
def test_pool_thread_count_in_a_fresh_process(request_threads):
    # A fresh process without TVM_NUM_THREADS: graphc.backends.tvm sets it to the core count
    # (TVM alone would use half the cores here), and num_threads=1 lowers what the pool uses.
    env = {k: v for k, v in os.environ.items() if k not in ("TVM_NUM_THREADS", "OMP_NUM_THREADS")}
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = subprocess.run([sys.executable, "-c", _PROBE, request_threads], env=env, cwd=root,
                         check=False, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    used, pool = map(int, out.stdout.split()[-2:])
    assert pool == CORES
    assert used == (CORES if request_threads == "default" else 1)
