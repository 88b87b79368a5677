"""The combined compression pipeline `factorize, share-weights, quantize` (issue 5): runs
through graphc.compile, every step is recorded, and each pass's report reaches the
compiled model's meta (and the saved artifact)."""

import torch
from torch import nn

import graphc

PIPELINE = ("factorize(method=data-aware, ratio=0.5), "
            "share-weights(bits=4, min_size=0, lowering=decode), quantize(bits=8)")


def _model():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(),
                      nn.Linear(128, 10)).eval()
    return m, (torch.randn(16, 64),)


def test_factorize_share_quantize_runs_and_reports_each_step(tmp_path):
    m, x = _model()
    cm = graphc.compile(m, x, target="cpu", passes=PIPELINE)
    print(cm.report())
    rows = cm.meta["passes"]
    assert [r["step"].split("(")[0] for r in rows] == ["input", "factorize", "share-weights",
                                                       "quantize"]
    assert all(r["changed"] for r in rows[1:])
    sizes = [r["param_bytes"] for r in rows]
    assert sizes[1] < sizes[0] and sizes[2] < 0.25 * sizes[1], sizes
    fact, share = cm.meta["factorize"], cm.meta["share-weights"]
    assert fact["layers"] and fact["params_after"] <= 0.5 * fact["params_before"]
    # share-weights clustered the factors the pass before made
    shared = {r["weight"] for r in share["layers"]}
    assert any(w.endswith("_in") for w in shared) and any(w.endswith("_out") for w in shared)
    with torch.no_grad():
        ref = m(*x)
    got = cm(*x)
    rel = float((got - ref).norm() / ref.norm())
    print(f"relative output error after the three passes: {rel:.4f}")
    assert rel < 0.3  # lossy thrice over, on a random (untrained) model
    cm.save(tmp_path / "m.graphc")
    loaded = graphc.load(tmp_path / "m.graphc")
    assert loaded.meta["factorize"]["params_after"] == fact["params_after"]
    torch.testing.assert_close(loaded(*x), got, rtol=1e-5, atol=1e-5)
