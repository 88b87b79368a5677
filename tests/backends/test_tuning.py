"""MetaSchedule tuning: a tiny search writes the database, later compiles of other models
reuse its records for the same kernels, the database reopens, tune=0 never searches.

The only search in the test suite: a few trials on one small matmul kernel."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from tvm.s_tir import meta_schedule as ms

import graphc
from graphc.backends.tvm import resolve_target, tuning, tuning_db
from graphc.cli import main as cli_main
from graphc.errors import GraphcError

TRIALS = 6


class LinearRelu(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 64)

    def forward(self, x):
        return torch.relu(self.fc(x))


class TwoLayers(nn.Module):
    """Another model whose first kernel (matmul 16x64x64 + bias + relu) is LinearRelu's."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(64, 64), nn.Linear(64, 8)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def _x(seed: int = 0) -> torch.Tensor:
    return torch.randn(16, 64, generator=torch.Generator().manual_seed(seed))


def _check_exact(cm, model, x):
    with torch.no_grad():
        want = model(x)
    got = cm(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """One real search (TRIALS candidates) into a fresh database."""
    db = tmp_path_factory.mktemp("tuning-db")
    torch.manual_seed(0)
    model = LinearRelu().eval()
    cm = graphc.compile(model, (_x(),), target="cpu", tune=TRIALS, tuning_db=db)
    return db, model, cm


def test_search_measures_and_writes_the_database(tuned):
    db, model, cm = tuned
    report = cm.meta["tvm"]["tuning"]
    assert len(report["tasks"]) == 1 and "matmul" in report["tasks"][0]
    assert 1 <= report["trials"] <= TRIALS
    assert report["cost_model"] in ("xgb", "random")
    # The search's own compile applies what it found.
    assert report["applied"] == report["tasks"]
    target = resolve_target("cpu").target
    folder = tuning.db_dir(target, db)
    assert report["db"] == str(folder)
    assert (folder / tuning.RECORD_FILE).stat().st_size > 0
    # The default rules' schedule of the kernel is measured too, into its own database.
    assert set(report["default_ms"]) == set(report["tasks"])
    assert tuning.record_count(target, db) == report["trials"]
    assert tuning.record_count(target, db, defaults=True) == 1
    assert report["records"] == report["trials"] + 1
    _check_exact(cm, model, _x(1))


def test_the_fastest_of_search_and_default_rules_is_applied(tuned):
    db, _, cm = tuned
    target = resolve_target("cpu").target
    candidates = tuning.open_database(target, db)
    defaults = tuning.open_database(target, db, defaults=True)
    workload = candidates.get_all_tuning_records()[0].workload  # the one kernel searched

    def mean_ms(record):
        return sum(map(float, record.run_secs)) / len(record.run_secs) * 1e3

    best_found = mean_ms(candidates.get_top_k(workload, 1)[0])
    (default_ms,) = cm.meta["tvm"]["tuning"]["default_ms"].values()
    assert mean_ms(defaults.get_top_k(defaults.commit_workload(workload.mod), 1)[0]) == \
        pytest.approx(default_ms, rel=1e-3)
    # What the compile queries: both databases, the faster record wins.
    union = ms.database.UnionDatabase(candidates, defaults)
    chosen = union.query_tuning_record(workload.mod, target, "main")
    assert mean_ms(chosen) == pytest.approx(min(best_found, default_ms), rel=1e-3)


def test_another_model_reuses_the_record_without_searching(tuned, monkeypatch):
    db, _, first = tuned
    monkeypatch.setattr(tuning, "search", _no_search)
    torch.manual_seed(1)
    other = TwoLayers().eval()
    cm = graphc.compile(other, (_x(),), target="cpu", tuning_db=db)
    report = cm.meta["tvm"]["tuning"]
    assert report["trials"] == 0 and report["tasks"] == []
    # Only the kernel with LinearRelu's workload is taken from the database; the 64->8 layer
    # is a different workload and goes to the default rules.
    assert len(report["applied"]) == 1 and "relu" in report["applied"][0]
    assert report["records"] == first.meta["tvm"]["tuning"]["records"]
    _check_exact(cm, other, _x(2))


def test_records_are_kept_per_target(tuned, monkeypatch):
    db, model, _ = tuned
    monkeypatch.setattr(tuning, "search", _no_search)
    cpu, x86 = resolve_target("cpu").target, resolve_target("x86").target
    assert tuning.db_dir(cpu, db) != tuning.db_dir(x86, db)
    assert tuning.db_dir(cpu, db) == tuning.db_dir(resolve_target("cpu").target, db)
    cm = graphc.compile(model, (_x(),), target="x86", tuning_db=db)
    assert cm.meta["tvm"]["tuning"]["applied"] == []
    assert tuning.record_count(x86, db) == 0
    _check_exact(cm, model, _x(3))


def test_records_wait_for_a_retune_when_the_rules_change(tuned, monkeypatch, caplog):
    """Default-rule records are kept per rules version; search records compared with other
    rules are not applied (they might be slower than the new rules' schedules)."""
    db, model, _ = tuned
    monkeypatch.setattr(tuning, "search", _no_search)
    monkeypatch.setattr(tuning_db, "rules_fingerprint", lambda: "0123456789")
    cm = graphc.compile(model, (_x(),), target="cpu", tuning_db=db)
    assert cm.meta["tvm"]["tuning"]["applied"] == []
    assert "re-tune" in caplog.text
    _check_exact(cm, model, _x(4))


def test_database_round_trips(tuned):
    db, _, cm = tuned
    target = resolve_target("cpu").target
    folder = tuning.db_dir(target, db)
    # Reopened by MetaSchedule itself, from the folder alone: same records, this target.
    reopened = ms.database.JSONDatabase(work_dir=str(folder), allow_missing=False)
    records = reopened.get_all_tuning_records()
    assert len(records) == cm.meta["tvm"]["tuning"]["trials"] == len(reopened)
    assert all(str(r.target) == str(target) for r in records)
    measured = [r for r in records if r.run_secs]
    assert measured and all(float(s) > 0 for r in measured for s in r.run_secs)
    # The best record's workload is the kernel the search was run on.
    workload = records[0].workload
    assert reopened.has_workload(workload.mod)
    assert len(reopened.get_top_k(workload, 1)) == 1


def test_tune_zero_never_searches(tmp_path, monkeypatch):
    monkeypatch.setattr(tuning, "search", _no_search)
    monkeypatch.setenv(tuning.ENV_DB, str(tmp_path / "from-env"))
    assert tuning.db_root() == tmp_path / "from-env"
    assert tuning.db_root(tmp_path / "arg") == tmp_path / "arg"
    cm = graphc.compile(LinearRelu().eval(), (_x(),), target="cpu")
    report = cm.meta["tvm"]["tuning"]
    assert report["trials"] == 0 and report["applied"] == [] and report["records"] == 0
    assert not (tmp_path / "from-env").exists()  # no search, nothing written


def test_bad_budgets_are_refused(tmp_path):
    x = _x()
    with pytest.raises(GraphcError, match="tune must be"):
        graphc.compile(LinearRelu().eval(), (x,), tune=-1, tuning_db=tmp_path)
    with pytest.raises(GraphcError, match="torch backend"):
        graphc.compile(LinearRelu().eval(), (x,), target="torch", tune=4)
    model = tmp_path / "m.onnx"
    torch.onnx.export(LinearRelu().eval(), (x,), model, dynamo=False)
    assert cli_main(["tune", str(model), "--trials", "0", "--db", str(tmp_path)]) == 2


def test_cli_tune_and_compile_flags_reach_compile(tmp_path, monkeypatch, capsys):
    # The CLI only forwards to graphc.compile (the search itself is covered above); check the
    # flags arrive and that `tune` prints the database it wrote to.
    calls = []
    real_compile = graphc.compile

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real_compile(*args, **{**kwargs, "tune": 0})

    monkeypatch.setattr(graphc, "compile", spy)
    model = tmp_path / "m.onnx"
    torch.onnx.export(LinearRelu().eval(), (_x(),), model, dynamo=False)
    assert cli_main(["tune", str(model), "--trials", "3", "--db", str(tmp_path / "db")]) == 0
    assert calls[-1]["tune"] == 3 and calls[-1]["tuning_db"] == str(tmp_path / "db")
    assert "database: " + str(tmp_path / "db") in capsys.readouterr().out
    out = tmp_path / "m.graphc"
    assert cli_main(["compile", str(model), "--tune", "2", "--tuning-db", str(tmp_path / "d2"),
                     "-o", str(out)]) == 0
    assert calls[-1]["tune"] == 2 and calls[-1]["tuning_db"] == str(tmp_path / "d2")
    assert np.isfinite(graphc.load(out)(_x().numpy())).all()


def _no_search(*args, **kwargs):
    raise AssertionError("tune=0 must not search")


def test_one_search_per_database_at_a_time(tmp_path, caplog):
    import threading
    import time

    target = resolve_target("cpu").target
    events = []

    def second():
        with tuning.db_lock(target, tmp_path, exclusive=True):
            events.append("second in")

    with tuning.db_lock(target, tmp_path, exclusive=True):
        t = threading.Thread(target=second)
        t.start()
        time.sleep(0.3)
        events.append("first out")
    t.join(5)
    assert events == ["first out", "second in"]
    assert "waiting for another process's search" in caplog.text
