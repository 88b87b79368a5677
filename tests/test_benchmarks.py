"""Smoke test of the benchmark harness (benchmarks/run.py) on a tiny model: every variant
prepared, checked against PyTorch, timed interleaved, written as JSON. No timing asserts."""

from __future__ import annotations

import json

import torch
from torch import nn

from benchmarks import measure, run
from benchmarks.models import MODELS, Case


def _tiny() -> Case:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).eval()
    reference = model(torch.ones(1, 3, 16, 16))

    def quality(run) -> dict:  # any task metric: here, agreement on one fixed input
        out = torch.as_tensor(run((torch.ones(1, 3, 16, 16),))[0])
        return {"mean": float((out - reference).abs().max().detach())}

    return Case("tiny", model, (torch.randn(1, 3, 16, 16),), ["x"], "tiny conv net",
                quality=quality)


def test_harness_runs_every_variant_and_writes_json(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(MODELS, "tiny", _tiny)
    out = tmp_path / "r.json"
    assert run.main(["--models", "tiny", "--variants", "torch", "ort-fp32", "ort-int8", "graphc",
                     "graphc-tuned", "graphc-int8", "--tuned-db", str(tmp_path / "empty-db"), "--repeat", "4",
                     "--warmup", "1", "--gap-ms", "0", "--visit-calls", "2", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    (model,) = result["models"]
    rows = {r["variant"]: r for r in model["variants"]}
    assert set(rows) == {"torch", "ort-fp32", "ort-int8", "graphc", "graphc-int8"}
    assert "graphc-tuned" in model["skipped"]  # the database has no records
    for name, r in rows.items():
        assert r["n"] == len(r["samples_ms"]) == 8, name  # 4 rounds x 2 timed calls
        assert r["min_ms"] <= r["median_ms"], name
    assert rows["ort-fp32"]["ratio_vs_ort_fp32"] == 1.0
    assert rows["torch"]["max_rel_err_vs_torch"] == 0.0
    assert rows["graphc"]["max_rel_err_vs_torch"] < 1e-5
    assert rows["ort-fp32"]["max_rel_err_vs_torch"] < 1e-5
    assert rows["graphc"]["prepare"]["seconds"] > 0 and rows["graphc"]["prepare"]["peak_rss_mib"] > 0
    assert result["geomean_vs_ort_fp32"]["graphc"]["models"] == 1
    # every deployable file is measured (this model's few weights make no size difference;
    # tests/test_minilm.py checks int8 against fp32 on a real one), int8 errors are int8's
    assert all(r["artifact_bytes"] > 1000 for name, r in rows.items() if name != "torch")
    assert 1e-5 < rows["graphc-int8"]["max_rel_err_vs_torch"] < 0.1
    assert rows["graphc"]["quality"]["mean"] < 1e-5 and rows["torch"]["quality"] is None
    assert rows["graphc-int8"]["quality"]["mean"] > 1e-5
    assert 0 <= model["load_while_timing"]["other_processes_cpu_fraction"] <= 1
    assert "graphc" in capsys.readouterr().out


def test_measure_helpers():
    assert measure.geomean([2.0, 8.0]) == 4.0
    assert measure.max_rel_err([torch.ones(3).numpy() * 1.5], [torch.ones(3).numpy() * 2]) == 0.25
    calls = []
    variants = [measure.Variant(n, lambda n=n: calls.append(n), list) for n in "abc"]
    assert measure.interleave(variants, repeat=6, warmup=0, budget_s=1e9, gap_s=0,
                              visit_warmup=1, visit_calls=2) == 6
    visits = [calls[i:i + 3] for i in range(0, 54, 3)]  # 1 untimed + 2 timed calls a visit
    assert all(len(set(v)) == 1 for v in visits) and len(calls) == 54
    rounds = [[v[0] for v in visits[i:i + 3]] for i in range(0, 18, 3)]
    assert all(sorted(r) == list("abc") for r in rounds)  # every variant once per round
    assert len({tuple(r) for r in rounds}) > 1  # in varying orders
    for v in variants:  # two timed samples a visit, the visit's first call reported apart
        assert len(v.samples_ms) == 12 and len(v.first_ms) == 6
        assert "first_call_median_ms" in v.stats()
    stats = {}
    with measure.track(stats):
        sum(range(1000))
    assert stats["seconds"] >= 0 and stats["peak_rss_mib"] > 0
