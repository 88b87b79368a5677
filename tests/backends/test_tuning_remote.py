"""Tuning against a device behind a TVM RPC tracker (GRAPHC_TUNING_REMOTE=host:port/key):
the search's runner is MetaSchedule's RPCRunner with that tracker, and a tiny search on
loopback (a local tracker and an RPC server registered under a key) measures through it and
fills the database. Cross targets are refused without a remote, with the variable named."""

from __future__ import annotations

import socket

import pytest
import torch
from torch import nn
from tvm.s_tir import meta_schedule as ms

import graphc
from graphc.backends.tvm import tuning_db, tuning_search
from graphc.errors import BackendError

LOOPBACK = "127.0.0.1"
KEY = "loopback"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def test_remote_option_configures_the_rpc_runner(monkeypatch):
    assert isinstance(tuning_search._runner(None), ms.runner.LocalRunner)
    runner = tuning_search._runner("10.1.2.3:9190/rasp4")
    assert isinstance(runner, ms.runner.RPCRunner)
    cfg = runner.rpc_config
    assert (cfg.tracker_host, cfg.tracker_port, cfg.tracker_key) == ("10.1.2.3", 9190, "rasp4")
    with pytest.raises(BackendError, match="through an RPC tracker.*host:port/key"):
        tuning_search._runner("10.1.2.3:9090")  # a server, not a tracker
    monkeypatch.setenv(tuning_db.ENV_REMOTE, "t:9190/k")
    assert tuning_db.TuningOptions(trials=1).remote == "t:9190/k"


def test_cross_target_tuning_without_a_remote_names_the_variable(monkeypatch):
    monkeypatch.delenv(tuning_db.ENV_REMOTE, raising=False)
    model = nn.Linear(8, 8).eval()
    with pytest.raises(BackendError, match="cannot be measured here.*GRAPHC_TUNING_REMOTE"):
        graphc.compile(model, (torch.randn(2, 8),), target="arm", tune=2)


@pytest.fixture
def tracker_with_device():
    """A tracker on loopback and an RPC server registered with it under KEY."""
    pytest.importorskip("tornado", reason="TVM's RPC tracker needs tornado (pip install tornado)")
    from tvm import rpc
    from tvm.rpc.tracker import Tracker

    port = _free_port()
    tracker = Tracker(host=LOOPBACK, port=port, port_end=port + 1, silent=True)
    port = _free_port()
    server = rpc.Server(host=LOOPBACK, port=port, port_end=port + 1, key=KEY, silent=True,
                        tracker_addr=(LOOPBACK, tracker.port))
    yield f"{LOOPBACK}:{tracker.port}/{KEY}"
    server.terminate()
    tracker.terminate()


def test_tiny_search_measures_through_the_tracker(tracker_with_device, monkeypatch, tmp_path):
    monkeypatch.setenv(tuning_db.ENV_REMOTE, tracker_with_device)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32), nn.ReLU()).eval()
    x = torch.randn(8, 32)
    cm = graphc.compile(model, (x,), target="cpu", tune=4, tuning_db=tmp_path, verbose=False)
    report = cm.meta["tvm"]["tuning"]
    assert report["trials"] >= 1 and report["tasks"]
    assert report["default_ms"]  # the default schedule was measured on the remote too
    torch.testing.assert_close(cm(x), model(x), rtol=1e-5, atol=1e-5)
