"""Check tuned schedules against the kernel they schedule before any compile applies them.

MetaSchedule trusts its transformations; TVM 0.27 does not always deserve it. Tuning
MobileNetV2 (500 trials) stored, for 2 of its 51 kernels (conv + bias + ReLU6 with a padded
input), a fastest candidate whose output was wrong by 65-69% of its range: compiles
applying that database gave the whole model a 3.9e-2 relative error. So after a search,
the best search record of every kernel is built and run on random inputs next to the
unscheduled kernel; a record that disagrees is deleted from the database and the next
best is checked, so the database never holds a fastest record that computes something else.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import tvm
from tvm import s_tir
from tvm.s_tir import meta_schedule as ms

log = logging.getLogger("graphc")

TOLERANCE = 1e-4  # of the largest reference magnitude: float reassociation, not a bug
MAX_TRIES = 5  # records dropped per kernel before giving up on its candidates


def kernel_error(workload: tvm.IRModule, record, target: tvm.target.Target) -> float:
    """Max |scheduled - unscheduled| / max |unscheduled| over every buffer of the kernel,
    run on the same random inputs (floats N(0, 1), integers 0: safe indices)."""
    sch = s_tir.Schedule(workload)
    record.trace.apply_to_schedule(sch, remove_postproc=False)
    rng = np.random.default_rng(0)
    args = []
    for info in ms.arg_info.ArgInfo.from_prim_func(workload["main"]):
        shape, dtype = [int(s) for s in info.shape], str(info.dtype)
        args.append(rng.standard_normal(shape).astype(dtype) if "float" in dtype
                    else np.zeros(shape, dtype))
    results = []
    for mod in (workload, sch.mod):
        tensors = [tvm.runtime.tensor(a.copy(), tvm.cpu()) for a in args]
        tvm.compile(mod, target=target)["main"](*tensors)
        results.append([t.numpy().astype(np.float64) for t in tensors])
    err = 0.0
    for want, got in zip(*results):
        scale = max(float(np.abs(want).max(initial=0.0)), 1e-12)
        err = max(err, float(np.abs(got - want).max(initial=0.0)) / scale)
    return err


def check_best_records(tasks, target: tvm.target.Target, open_db, record_file: Path
                       ) -> dict[str, float]:
    """For each tuning task, check its best search record, deleting wrong ones from
    record_file; returns {task name: error} for every record deleted."""
    rejected: dict[str, float] = {}
    database = open_db()
    for task in tasks:
        workload = task.dispatched[0]
        if not database.has_workload(workload):
            continue
        records = database.get_top_k(database.commit_workload(workload), 10**6)  # fastest first
        for i, record in enumerate(records):
            err = kernel_error(workload, record, target)
            if err <= TOLERANCE:
                break
            rejected[task.task_name] = err
            # after MAX_TRIES wrong ones, distrust the rest: the kernel keeps its default
            drop = [record] if i + 1 < MAX_TRIES else records[i:]
            log.warning("tuning: the fastest candidate for %s computes wrong results (max error "
                        "%.2g of the output range); %d record(s) deleted from the database",
                        task.task_name, err, len(drop))
            _drop_records(record_file, drop)
            if len(drop) > 1:
                break
        database = open_db()
    return rejected


def _drop_records(record_file: Path, records) -> None:
    """Delete the lines of record_file holding `records`, each matched by its measured times
    and its trace length (the file is MetaSchedule's JSON lines: [workload index, [trace,
    run_secs, target, args]])."""
    keys = [([float(s) for s in r.run_secs], len(r.trace.insts)) for r in records]
    lines = record_file.read_text().splitlines()
    keep = [line for line in lines if not any(_same(json.loads(line), *k) for k in keys)]
    if len(lines) - len(keep) < len(records):
        raise RuntimeError(f"tuning: could not find the wrong records in {record_file}")
    record_file.write_text("".join(line + "\n" for line in keep))


def _same(line, secs: list[float], n_insts: int) -> bool:
    trace, run_secs = line[1][0], line[1][1]
    return (len(run_secs) == len(secs) and all(abs(a - b) < 1e-15 for a, b in
                                               zip(run_secs, secs))
            and len(trace[0]) == n_insts)
