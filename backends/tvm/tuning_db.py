"""The tuning database: where records live, which records a compile may read, and locking.

See backends/tvm/tuning.py for the layout. TuningOptions / TuningReport are the schedule
phase's options and record of what tuning did.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import tvm
from tvm.s_tir import meta_schedule as ms

from graphc.errors import BackendError

from .target import target_config

log = logging.getLogger("graphc")

ENV_DB = "GRAPHC_TUNING_DB"
# "tracker-host:port/key": candidates are measured on a device of that key from a TVM RPC
# tracker (tuning_search._runner) instead of on this machine, e.g. for target "arm"
ENV_REMOTE = "GRAPHC_TUNING_REMOTE"
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
    remote: str | None = field(default_factory=lambda: os.environ.get(ENV_REMOTE) or None)


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
