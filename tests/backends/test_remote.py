"""cm.benchmark(remote=...) through TVM's RPC on loopback: a local RPC server (a separate
process, as on a board) loads the uploaded library and times it; an ARM-built model is
refused by the x86 remote with a message naming both architectures."""

from __future__ import annotations

import socket

import numpy as np
import pytest
import torch
from torch import nn

import graphc
from graphc.backends.tvm import cross, remote
from graphc.errors import BackendError, GraphcError

LOOPBACK = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server():
    """A TVM RPC server on 127.0.0.1, in its own process; yields 'host:port'."""
    from tvm import rpc

    port = free_port()
    srv = rpc.Server(host=LOOPBACK, port=port, port_end=port + 1, silent=True)
    yield f"{LOOPBACK}:{srv.port}"
    srv.terminate()


def _mlp():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 64)).eval()
    return m, (torch.randn(8, 64),)


def test_parse_remote_spellings():
    assert remote.parse("10.0.0.2:9090") == remote.Remote("10.0.0.2", 9090, None)
    assert str(remote.parse("tracker:9190/rasp4")) == "tracker:9190/rasp4"
    with pytest.raises(BackendError, match="expected 'host:port'"):
        remote.parse("board")


def test_benchmark_on_a_loopback_rpc_server(server):
    m, x = _mlp()
    cm = graphc.compile(m, x, target="cpu")
    stats = cm.benchmark(repeat=5, warmup=1, remote=server)
    assert stats["remote"] == server and stats["repeat"] == 5
    assert 0 < stats["min"] <= stats["median"] <= stats["max"] < 1e3
    local = cm.benchmark(repeat=5, warmup=1)
    # same kernels, same machine: the remote clock measures the model, not the network
    # (a round trip over loopback RPC alone takes longer than this model's ~0.05 ms)
    assert stats["median"] < 20 * local["median"] + 0.5


def test_loaded_artifact_benchmarks_remotely(server, tmp_path):
    m, x = _mlp()
    graphc.compile(m, x, target="x86").save(tmp_path / "m.graphc")
    stats = graphc.load(tmp_path / "m.graphc").benchmark(repeat=3, warmup=0, remote=server)
    assert np.isfinite(stats["median"]) and stats["median"] > 0


def test_shared_weights_are_decoded_on_the_remote(server):
    """The remote VM runs the init function (backends/tvm/decode_once.py) before main:
    without it main would find no decoded weight in the device's tensor cache."""
    from graphc.passes.share_weights import share_weights

    m, x = _mlp()
    s = share_weights(graphc.trace(m, x), bits=4, lowering="decode")
    assert s.op_histogram()["graphc.codebook_decode"] == 2
    stats = graphc.compile(s, target="cpu").benchmark(repeat=3, warmup=1, remote=server)
    assert np.isfinite(stats["median"]) and stats["median"] > 0


@pytest.mark.skipif(cross.host_arch() != "x86_64", reason="needs an x86-64 remote")
def test_arm_model_is_refused_by_an_x86_remote(server):
    m, x = _mlp()
    cm = graphc.compile(m, x, target="arm")
    with pytest.raises(BackendError, match=r"compiled for 'arm' \(aarch64\) but the remote is "
                                           r"x86_64.*target 'arm' for an aarch64 board"):
        cm.benchmark(repeat=1, remote=server)


def test_unreachable_remote_says_how_to_start_a_server():
    m, x = _mlp()
    cm = graphc.compile(m, x, target="cpu")
    with pytest.raises(BackendError, match="cannot reach the RPC server.*tvm.exec.rpc_server"):
        cm.benchmark(repeat=1, remote=f"{LOOPBACK}:{free_port()}")


def test_torch_backend_has_no_remote():
    m, x = _mlp()
    with pytest.raises(GraphcError, match="torch backend cannot run on a remote"):
        graphc.compile(m, x, target="torch").benchmark(repeat=1, remote="h:1")
