"""tuning_check: a wrong fastest record is deleted from the database; the next correct one
stays and is what compiles would apply."""

from __future__ import annotations

import types

import tvm
from tvm import s_tir, te
from tvm.s_tir import meta_schedule as ms

from graphc.backends.tvm import resolve_target, tuning
from graphc.backends.tvm.tuning_check import check_best_records, kernel_error


def _two_step() -> tvm.IRModule:
    """c = a * 1.0001 + 3 through an intermediate buffer b (blocks "b" and "c")."""
    a = te.placeholder((64,), "float32", name="a")
    b = te.compute((64,), lambda i: a[i] * tvm.tirx.const(1.0001, "float32"), name="b")
    c = te.compute((64,), lambda i: b[i] + tvm.tirx.const(3.0, "float32"), name="c")
    return tvm.IRModule({"main": te.create_prim_func([a, c])})


def _record(workload, db, secs: float, wrong: bool):
    """A record of a correct schedule (vectorize), or a wrong one: the intermediate buffer
    silently narrowed to float16, as a buggy transformation would."""
    sch = s_tir.Schedule(workload)
    if wrong:
        sch.unsafe_set_dtype(sch.get_sblock("b"), 0, "float16")
    sch.vectorize(sch.get_loops(sch.get_sblock("c"))[0])
    target = resolve_target("cpu").target
    return ms.database.TuningRecord(sch.trace, db.commit_workload(workload), [secs], target,
                                    ms.arg_info.ArgInfo.from_prim_func(workload["main"]))


def test_a_wrong_fastest_record_is_deleted_and_the_correct_one_kept(tmp_path):
    target = resolve_target("cpu").target
    workload = _two_step()

    def open_db():
        return tuning.open_database(target, tmp_path, create=True)

    db = open_db()
    good, bad = _record(workload, db, 2e-6, wrong=False), _record(workload, db, 1e-6, wrong=True)
    db.commit_tuning_record(good)
    db.commit_tuning_record(bad)
    assert kernel_error(workload, good, target) < 1e-6
    assert kernel_error(workload, bad, target) > 1e-4  # float16 rounding of ~1e0 values
    record_file = tuning.db_dir(target, tmp_path) / tuning.RECORD_FILE
    task = types.SimpleNamespace(dispatched=[workload], task_name="two_step")
    rejected = check_best_records([task], target, open_db, record_file)
    assert list(rejected) == ["two_step"]
    (best,) = open_db().get_top_k(open_db().commit_workload(workload), 5)
    assert [float(s) for s in best.run_secs] == [2e-6]  # the correct, slower one remains
    assert check_best_records([task], target, open_db, record_file) == {}
