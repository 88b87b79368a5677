"""MetaSchedule's search over a module's kernels, beside the default rules' schedules.

run_search() is what `tune=N` runs (backends/tvm/tuning.py holds the lock and applies the
records afterwards). Traps of TVM 0.27 handled here (shared/reference/tvm-cpu-study.md,
section 3): see _make_fast_build, _import_tensor_intrin_quickly, _default_cost_model.
"""

from __future__ import annotations

import contextlib
import inspect
import linecache
import logging
import os
import sys
import tempfile
import time

import tvm
from tvm import s_tir
from tvm.ir.utils import derived_object
from tvm.s_tir import meta_schedule as ms

from graphc.errors import BackendError

from .cross import runs_here
from .target import target_config
from .tuning_check import check_best_records
from .tuning_db import RECORD_FILE, TuningOptions, TuningReport, db_dir, open_database

log = logging.getLogger("graphc")


def run_search(mod: tvm.IRModule, target: tvm.target.Target, options: TuningOptions,
               report: TuningReport) -> None:
    """The search behind tuning.search (which holds the database lock): measure the default
    rules' schedules, run MetaSchedule, then delete wrong fastest candidates."""
    start = time.perf_counter()
    tasks = [t for t in ms.relax_integration.extract_tasks(mod, target)
             if not t.mod.attrs.get("tirx.is_scheduled", False)]
    if not tasks:
        log.info("tuning: no kernels to tune")
        return
    cost_model = options.cost_model or _default_cost_model()
    report.cost_model = cost_model
    report.tasks = [t.task_name for t in tasks]
    database = open_database(target, options.db, create=True)
    trials = int(options.trials)
    per_iter = max(1, min(64, trials, max(8, trials // len(tasks))))
    _import_tensor_intrin_quickly()
    builder, runner = _builder(), _runner(options.remote)
    report.default_ms, unmeasurable = measure_default_schedules(
        tasks, target, open_database(target, options.db, create=True, defaults=True), builder,
        runner)
    # A kernel whose default schedule cannot be measured could only be replaced blindly by a
    # candidate that might be slower: it keeps its default schedule, untuned.
    tasks = [t for t in tasks if t.task_name not in unmeasurable]
    if not tasks:
        log.info("tuning: no kernels to tune")
        return
    with tempfile.TemporaryDirectory(prefix="graphc-tune-") as work_dir, \
            _progress(options.progress, trials, len(tasks)) as bar:
        with _quiet_ms_logging():
            contexts, weights = ms.relax_integration.extracted_tasks_to_tune_contexts(
                tasks, work_dir, seed=options.seed)
        counter = _Counter(bar)
        ms.tune.tune_tasks(
            tasks=contexts, task_weights=weights, work_dir=work_dir,
            max_trials_global=trials, max_trials_per_task=trials,
            num_trials_per_iter=per_iter, builder=builder, runner=runner, database=database,
            cost_model=ms.cost_model.CostModel.create(cost_model, num_tuning_cores=_cores()),
            measure_callbacks=[*ms.measure_callback.MeasureCallback.create("default"), counter],
        )
        report.trials = counter.trials
    if runs_here(target_config(target)):
        report.rejected = check_best_records(
            tasks, target, lambda: open_database(target, options.db, create=True),
            db_dir(target, options.db) / RECORD_FILE)
    else:  # the check runs kernels here, beside the unscheduled kernel
        log.warning("tuning: candidates measured on %s were not checked against the "
                    "unscheduled kernels (their code does not run on this machine)",
                    options.remote)
    report.search_seconds = time.perf_counter() - start
    log.info("tuning: %d candidates over %d kernel(s) in %.1f s (cost model %s) -> %s",
             report.trials, len(tasks), report.search_seconds, cost_model, report.db)


def measure_default_schedules(tasks, target: tvm.target.Target, database, builder,
                              runner) -> tuple[dict[str, float], set[str]]:
    """Schedule each task's kernel with the default rules (schedules/), measure it like a
    search candidate and commit it as a tuning record; returns ({task: mean ms}, the tasks
    whose default schedule exists but could not be measured). A schedule whose trace does
    not replay to the same kernel (a rule that edits TIR outside schedule primitives) is
    left out: the database could not reproduce it."""
    from .schedules import default_rules

    rules = default_rules(target)
    seeds = []
    for task in tasks:
        workload = task.dispatched[0]
        sch = _first_schedule(rules, workload["main"], target)
        if sch is None:  # no rule takes it: the default is the unscheduled loop nest, and
            database.commit_workload(workload)  # any search record may replace that
        elif _replays(sch, workload):
            seeds.append((task.task_name, workload, sch))
    args = [_arg_info(sch) for _, _, sch in seeds]
    unmeasurable = {seeds[i][0] for i, a in enumerate(args) if a is None}
    seeds = [s for s, a in zip(seeds, args) if a is not None]
    args = [a for a in args if a is not None]
    if not seeds:
        return {}, unmeasurable
    built = builder.build([ms.builder.BuilderInput(sch.mod, target) for _, _, sch in seeds])
    ok = [i for i, b in enumerate(built) if b.error_msg is None]
    device = "cpu" if target.kind.name == "llvm" else target.kind.name
    futures = runner.run([ms.runner.RunnerInput(built[i].artifact_path, device,
                                                args[i]) for i in ok])
    times = {}
    for i, future in zip(ok, futures):
        result = future.result()
        name, workload, sch = seeds[i]
        if result.error_msg is not None or not result.run_secs:
            log.warning("tuning: default schedule of %s did not run: %s", name, result.error_msg)
            continue
        database.commit_tuning_record(ms.database.TuningRecord(
            sch.trace, database.commit_workload(workload), result.run_secs, target, args[i]))
        times[name] = round(sum(map(float, result.run_secs)) / len(result.run_secs) * 1e3, 7)
    for i, b in enumerate(built):
        if b.error_msg is not None:
            log.warning("tuning: default schedule of %s did not build: %s", seeds[i][0],
                        b.error_msg.splitlines()[-1] if b.error_msg else "")
            unmeasurable.add(seeds[i][0])
    unmeasurable |= {name for name, _, _ in seeds if name not in times}
    return times, unmeasurable


def _arg_info(sch: s_tir.Schedule):
    """The kernel's arguments as measured with its weights already packed, or None where
    MetaSchedule cannot strip the packing: it only removes a layout-rewrite block that is a
    plain copy, and the conv rule's packing pads channels (an if_then_else)."""
    try:
        return ms.arg_info.ArgInfo.from_entry_func(sch.mod, remove_preproc=True)
    except Exception as e:  # noqa: BLE001  (an InternalError, which is no TVMError)
        log.info("tuning: %s keeps its default schedule: %s", sch.mod["main"].attrs.get(
            "global_symbol", "a kernel"), str(e).strip().splitlines()[-1][:120])
        return None


def _first_schedule(rules, func, target):
    for rule in rules:
        sch = rule.apply(func, target, False)
        if isinstance(sch, list):
            sch = sch[0] if sch else None
        if sch is not None:
            return sch
    return None


def _replays(sch, workload: tvm.IRModule) -> bool:
    replay = s_tir.Schedule(workload)
    try:
        sch.trace.apply_to_schedule(replay, remove_postproc=False)
        tvm.ir.assert_structural_equal(replay.mod, sch.mod)
    except Exception:  # noqa: BLE001  (TVM raises ValueError or its own errors)
        return False
    return True


def _default_cost_model() -> str:
    try:
        import xgboost  # noqa: F401
    except ImportError:
        log.warning("tuning: xgboost is not installed; using the random cost model "
                    "(pip install xgboost-cpu for a guided search)")
        return "random"
    return "xgb"


def _cores() -> int:
    return os.cpu_count() or 1


def _builder():
    return ms.builder.LocalBuilder(max_workers=_cores(), timeout_sec=120,
                                   f_build=_make_fast_build())


# seconds an RPC session may take for one batch of candidates (upload, link there, measure)
RPC_SESSION_S = 120


def _runner(remote: str | None):
    """Where candidates run: here (LocalRunner), or on a tracker's device (RPCRunner; the
    builder's tar of object files is linked there by the RPC server's compiler)."""
    if remote is None:
        return ms.runner.LocalRunner()
    from .remote import parse

    where = parse(remote)
    if where.key is None:
        raise BackendError(f"tuning remote {remote!r}: MetaSchedule measures through an RPC "
                           "tracker: give 'tracker-host:port/key' (docs/targets.md, remote)")
    return ms.runner.RPCRunner(rpc_config=ms.runner.RPCConfig(
        tracker_host=where.host, tracker_port=where.port, tracker_key=where.key,
        session_timeout_sec=RPC_SESSION_S), max_workers=1)


def _make_fast_build():
    """MetaSchedule's default_build without its `import tvm.s_tir.tensor_intrin` (40-200 s per
    worker here). Made in a closure so cloudpickle sends it to the workers by value: they
    then need no graphc import."""
    def fast_build(mod, target, _params):
        from tvm.driver import build as tvm_build
        from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

        mod = RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod)
        return tvm_build(mod, target=target)

    return fast_build


def _import_tensor_intrin_quickly() -> None:
    """TuneContext imports tvm.s_tir.tensor_intrin (about 250 TVMScript functions). The parser
    calls inspect.stack() for each, which reads source for every frame and searches
    sys.modules (tens of seconds with torch loaded); a frame walker that reads lines from
    linecache is enough for what the parser looks at."""
    if "tvm.s_tir.tensor_intrin" in sys.modules:
        return
    original = inspect.stack
    inspect.stack = _cheap_inspect_stack
    try:
        import tvm.s_tir.tensor_intrin  # noqa: F401
    finally:
        inspect.stack = original


def _cheap_inspect_stack(context: int = 1) -> list[inspect.FrameInfo]:
    frames = []
    frame = sys._getframe(1)
    while frame is not None:
        filename, lineno = frame.f_code.co_filename, frame.f_lineno
        line = linecache.getline(filename, lineno)
        frames.append(inspect.FrameInfo(frame, filename, lineno, frame.f_code.co_name,
                                        [line] if line else None, 0 if line else None))
        frame = frame.f_back
    return frames


@contextlib.contextmanager
def _quiet_ms_logging():
    """MetaSchedule's logger setup sends every INFO line (per-iteration tables) to stdout when
    its logger has no level; set WARNING first, so the console handler it adds gets WARNING.
    The per-task logs go to files in the temporary work dir. Its setup also lists the logger's
    handlers by name: an unnamed one (a second search in one process, under pytest) makes it
    fail with "'NoneType' object has no attribute 'format'", so those sit out the setup."""
    ms_log = logging.getLogger("tvm.s_tir.meta_schedule")
    ms_log.setLevel(logging.WARNING)
    unnamed = [h for h in ms_log.handlers if h.get_name() is None]
    for handler in unnamed:
        ms_log.removeHandler(handler)
    try:
        yield
    finally:
        ms_log.setLevel(logging.WARNING)  # its setup sets DEBUG; keep the console quiet
        for handler in unnamed:
            ms_log.addHandler(handler)


@derived_object
class _Counter(ms.measure_callback.PyMeasureCallback):
    """Counts measured candidates and moves the progress bar."""

    def __init__(self, bar):
        self.bar, self.trials, self.best = bar, 0, {}

    def apply(self, task_scheduler, task_id, measure_candidates, builder_results,
              runner_results):
        name = task_scheduler.tasks_[task_id].ctx.task_name
        secs = [sum(map(float, r.run_secs)) / len(r.run_secs) for r in runner_results
                if r.run_secs and r.error_msg is None]
        if secs:
            self.best[name] = min(self.best.get(name, float("inf")), *secs)
        self.trials += len(runner_results)
        if self.bar is not None:
            best = self.best.get(name)
            self.bar.advance(len(runner_results),
                             f"{name}: best {best * 1e3:.3f} ms" if best is not None else name)


class _Bar:
    def __init__(self, progress, task_id):
        self.progress, self.task_id = progress, task_id

    def advance(self, n: int, note: str) -> None:
        self.progress.update(self.task_id, advance=n, note=note)


@contextlib.contextmanager
def _progress(enabled: bool, trials: int, n_tasks: int):
    if not enabled:
        yield None
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    columns = (TextColumn(f"tuning {n_tasks} kernel(s)"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn(), TextColumn("{task.fields[note]}"))
    with Progress(*columns, transient=False) as progress:
        yield _Bar(progress, progress.add_task("tune", total=trials, note=""))
