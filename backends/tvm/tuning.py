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

Traps of TVM 0.27 handled here (shared/reference/tvm-cpu-study.md, section 3):
  - the default LocalBuilder imports tvm.s_tir.tensor_intrin in every build worker (40-200 s,
    past its 30 s timeout); `_make_fast_build` builds without it.
  - TuneContext imports that module once in this process; its TVMScript parser calls
    inspect.stack() hundreds of times, slow once torch is loaded; `_cheap_inspect_stack`.
  - the cost model: "xgb" (needs xgboost); "random" where xgboost is missing.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import linecache
import logging
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import tvm
from tvm import relax, s_tir
from tvm.ir.utils import derived_object
from tvm.s_tir import meta_schedule as ms

from graphc.errors import BackendError

from .target import target_config
from .tuning_check import check_best_records

log = logging.getLogger("graphc")

ENV_DB = "GRAPHC_TUNING_DB"
DEFAULT_DB = Path("~/.cache/graphc/tuning")
WORKLOAD_FILE = "database_workload.json"
RECORD_FILE = "database_tuning_record.json"
# The default rules' schedules, measured like candidates; a separate JSONDatabase, because
# MetaSchedule's search would take them from its own database as seeds and cannot replay
# rule-made traces through its postprocessors. Its files carry a fingerprint of the rules'
# source: a record is a replayed trace, so once the rules change, an old record would bring
# back the old rule's schedule (and its old time would be compared with the search's).
SCHEDULES_DIR = Path(__file__).resolve().parent / "schedules"


def rules_fingerprint() -> str:
    """A hash of the schedule rules' source files (backends/tvm/schedules/*.py)."""
    digest = hashlib.sha256()
    for path in sorted(SCHEDULES_DIR.glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:10]


def defaults_files() -> tuple[str, str]:
    """(workload file, record file) of the default rules' database, for these rules."""
    stem = f"defaults-{rules_fingerprint()}"
    return f"{stem}_workload.json", f"{stem}_tuning_record.json"


@dataclass
class TuningOptions:
    """What the schedule phase does with MetaSchedule. trials=0: apply records, never search."""

    trials: int = 0
    db: str | os.PathLike | None = None  # root folder; None: $GRAPHC_TUNING_DB or the default
    cost_model: str | None = None  # "xgb" / "random"; None: xgb when xgboost is installed
    progress: bool = True  # a rich progress bar while searching
    seed: int | None = None


@dataclass
class TuningReport:
    """What the tuning step did, for CompiledModel.meta["tvm"]["tuning"]."""

    db: str = ""
    records: int = 0  # records for this target (candidates + default schedules) when applied
    tasks: list[str] = field(default_factory=list)  # kernels searched (trials > 0)
    default_ms: dict[str, float] = field(default_factory=dict)  # their default-rule times
    trials: int = 0  # candidates measured by the search
    cost_model: str | None = None
    search_seconds: float = 0.0
    applied: list[str] = field(default_factory=list)  # kernels scheduled from the database
    rejected: dict[str, float] = field(default_factory=dict)  # wrong fastest candidates' errors

    def row(self) -> dict:
        return {"db": self.db, "records": self.records, "tasks": self.tasks,
                "default_ms": self.default_ms, "trials": self.trials, "cost_model": self.cost_model,
                "search_seconds": round(self.search_seconds, 2), "applied": self.applied,
                "rejected": self.rejected}


# ---- where records live ---------------------------------------------------------------------

def db_root(tuning_db: str | os.PathLike | None = None) -> Path:
    """The database root: the argument, else $GRAPHC_TUNING_DB, else ~/.cache/graphc/tuning."""
    root = tuning_db if tuning_db is not None else os.environ.get(ENV_DB) or DEFAULT_DB
    return Path(root).expanduser()


def target_key(target: tvm.target.Target) -> str:
    """A folder name for `target`: readable fields plus a hash of its full JSON, so records
    are only ever applied to the exact target they were measured on."""
    cfg = target_config(target)
    text = json.dumps(cfg, sort_keys=True)
    digest = hashlib.sha256(text.encode()).hexdigest()[:10]
    parts = [str(cfg.get("kind", "target")), str(cfg.get("mcpu") or "generic"),
             f"{cfg.get('num-cores', 0)}c"]
    return "-".join(p.replace("/", "_") for p in parts) + f"-{digest}"


def db_dir(target: tvm.target.Target, tuning_db=None) -> Path:
    """The folder holding `target`'s records under the database root."""
    return db_root(tuning_db) / f"tvm-{tvm.__version__}" / target_key(target)


def open_database(target: tvm.target.Target, tuning_db=None, *, create: bool = False,
                  defaults: bool = False):
    """The JSONDatabase for `target` (defaults=True: the default rules' measured schedules),
    or None when it has no records and create is False."""
    folder = db_dir(target, tuning_db)
    workload_file, record_file = defaults_files() if defaults else (WORKLOAD_FILE, RECORD_FILE)
    records = folder / record_file
    if not create and (not records.is_file() or records.stat().st_size == 0):
        return None
    if create:
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise BackendError(f"tuning: cannot create the tuning database folder {folder}: {e}; "
                               f"pass tuning_db= or set ${ENV_DB} to a writable folder") from e
    return ms.database.JSONDatabase(path_workload=str(folder / workload_file),
                                    path_tuning_record=str(records), allow_missing=True)


def record_count(target: tvm.target.Target, tuning_db=None, *, defaults: bool = False) -> int:
    """Number of tuning records stored for `target` (0 when there is no database)."""
    db = open_database(target, tuning_db, defaults=defaults)
    return 0 if db is None else len(db)


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


# ---- the search -----------------------------------------------------------------------------

def search(mod: tvm.IRModule, target: tvm.target.Target, options: TuningOptions,
           report: TuningReport) -> None:
    """Run MetaSchedule over `mod`'s kernels with options.trials measured candidates in total,
    committing every measurement to the target's database. Each kernel's default-rule
    schedule is measured too (into the defaults database), so the best record for a kernel is
    never slower, as measured, than what the compile would do without tuning. One search
    per database folder at a time (an exclusive file lock): two would interleave lines in
    its files, and each would measure while the other runs."""
    with db_lock(target, options.db, exclusive=True):
        _search(mod, target, options, report)


@contextlib.contextmanager
def db_lock(target: tvm.target.Target, tuning_db, *, exclusive: bool):
    """A lock on the target's database folder: exclusive for a search, shared for reads."""
    import fcntl

    folder = db_dir(target, tuning_db)
    if not exclusive and not folder.is_dir():
        yield
        return
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "a") as f:
        mode = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
        try:
            fcntl.flock(f, mode | fcntl.LOCK_NB)
        except BlockingIOError:
            log.warning("tuning: waiting for another process's search in %s", folder)
            fcntl.flock(f, mode)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _search(mod: tvm.IRModule, target: tvm.target.Target, options: TuningOptions,
            report: TuningReport) -> None:
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
    builder, runner = _builder(), ms.runner.LocalRunner()
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
    report.rejected = check_best_records(
        tasks, target, lambda: open_database(target, options.db, create=True),
        db_dir(target, options.db) / RECORD_FILE)
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
    The per-task logs go to files in the temporary work dir."""
    ms_log = logging.getLogger("tvm.s_tir.meta_schedule")
    ms_log.setLevel(logging.WARNING)
    try:
        yield
    finally:
        ms_log.setLevel(logging.WARNING)  # its setup sets DEBUG; keep the console quiet


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
