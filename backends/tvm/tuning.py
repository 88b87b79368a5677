"""MetaSchedule tuning: search schedules for a model's kernels and keep them in a database
that every later compile applies, whatever model the kernels come from.

    graphc.compile(model, (x,), tune=256)        search 256 candidates, then build
    graphc tune model.onnx --trials 256          the same from the command line
    graphc.compile(other_model, (y,))            tune=0: no search, but reuses the records

The database is a MetaSchedule JSONDatabase in a folder per TVM version and target:

    <root>/tvm-<version>/<kind>-<mcpu>-<cores>c-<hash of the target JSON>/
        database_workload.json  database_tuning_record.json     MetaSchedule's candidates
        defaults-<rules hash>_workload.json  ..._tuning_record.json   the default rules'
                                                                   schedules, per rules version

<root> is `tuning_db=`, else $GRAPHC_TUNING_DB, else ~/.cache/graphc/tuning. A record is found
again by the workload's structural hash (the fused TIR kernel, after the optimize phase);
JSONDatabase itself ignores the target when it looks a record up, hence one folder per target.
A search also measures each kernel's default-rule schedule (schedules/) and stores it beside
the candidates; compiles apply the fastest record of the two databases, so a kernel whose
search found nothing better keeps the default rule's schedule.

Modules: tuning_db.py (paths, files, locks), tuning_search.py (the search), tuning_check.py
(wrong candidates). Traps of TVM 0.27 handled in tuning_search.py
(shared/reference/tvm-cpu-study.md, section 3):
  - the default LocalBuilder imports tvm.s_tir.tensor_intrin in every build worker (40-200 s,
    past its 30 s timeout); `_make_fast_build` builds without it.
  - TuneContext imports that module once in this process; its TVMScript parser calls
    inspect.stack() hundreds of times, slow once torch is loaded; `_cheap_inspect_stack`.
  - the cost model: "xgb" (needs xgboost); "random" where xgboost is missing.
"""

from __future__ import annotations

import logging

import tvm
from tvm import relax
from tvm.s_tir import meta_schedule as ms

from .tuning_db import (  # noqa: F401  (re-exported: the database API lives here too)
    DEFAULT_DB,
    ENV_DB,
    RECORD_FILE,
    WORKLOAD_FILE,
    TuningOptions,
    TuningReport,
    db_dir,
    db_lock,
    db_root,
    defaults_files,
    open_database,
    record_count,
    rules_fingerprint,
    target_key,
)
from .tuning_search import run_search

log = logging.getLogger("graphc")


# ---- the schedule-phase step ----------------------------------------------------------------

def tuned_schedules(target: tvm.target.Target, options: TuningOptions | None,
                    report: TuningReport | None = None) -> tvm.transform.Pass:
    """One module pass for the schedule phase: search (options.trials > 0), then schedule every
    kernel the database has a record for (MetaScheduleApplyDatabase marks it
    tirx.is_scheduled, so the default rules after it leave it alone)."""
    options = options or TuningOptions()
    report = report if report is not None else TuningReport()

    @tvm.transform.module_pass(opt_level=0, name="graphc.TunedSchedules")
    def step(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        report.db = str(db_dir(target, options.db))
        if options.trials > 0:
            search(mod, target, options, report)
        with db_lock(target, options.db, exclusive=False):
            database = _applicable(target, options.db)
        if database is None:
            return mod
        report.records = len(database)
        before = _scheduled(mod)
        with database:
            mod = relax.transform.MetaScheduleApplyDatabase()(mod)
        report.applied = sorted(_scheduled(mod) - before)
        if report.applied:
            log.info("tuning: %d kernel(s) scheduled from %s", len(report.applied), report.db)
        return mod

    return step


def _applicable(target: tvm.target.Target, tuning_db):
    """The records a compile may apply: every default-rule record of the current rules, and
    the search records of the kernels whose default schedule was measured beside them under
    these rules. A search record compared with older rules could be slower than what the
    current rules make, so it waits for a re-tune. None: nothing to apply."""
    search_db = open_database(target, tuning_db)
    defaults = open_database(target, tuning_db, defaults=True)
    if defaults is None:
        if search_db is not None:
            log.warning("tuning: %s has no default-rule records for these schedule rules "
                        "(they changed since it was tuned); its search records are not "
                        "applied: re-tune to compare them", db_dir(target, tuning_db))
        return None
    if search_db is None:
        return defaults
    memory = ms.database.MemoryDatabase()
    for db in (defaults, search_db):
        for record in db.get_all_tuning_records():
            if db is defaults or defaults.has_workload(record.workload.mod):
                workload = memory.commit_workload(record.workload.mod)
                memory.commit_tuning_record(ms.database.TuningRecord(
                    record.trace, workload, record.run_secs, record.target, record.args_info))
    return memory


def _scheduled(mod: tvm.IRModule) -> set[str]:
    return {gv.name_hint for gv, f in mod.functions.items()
            if isinstance(f, tvm.tirx.PrimFunc) and f.attrs is not None
            and bool(f.attrs.get("tirx.is_scheduled", False))}


def search(mod: tvm.IRModule, target: tvm.target.Target, options: TuningOptions,
           report: TuningReport) -> None:
    """Run MetaSchedule over `mod`'s kernels with options.trials measured candidates in total,
    committing every measurement to the target's database. Each kernel's default-rule
    schedule is measured too (into the defaults database), so the best record for a kernel is
    never slower, as measured, than what the compile would do without tuning. One search
    per database folder at a time (an exclusive file lock): two would interleave lines in
    its files, and each would measure while the other runs."""
    with db_lock(target, options.db, exclusive=True):
        run_search(mod, target, options, report)
