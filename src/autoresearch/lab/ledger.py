"""The ledger: every trial of a workspace in one SQLite database, and results.tsv beside it.

SQLite in WAL mode, so a reader (status, report, dashboard) never blocks the loop. Rows are only
ever added or completed, never deleted: a discarded trial's diff stays here after git forgets it.
results.tsv is rewritten from the database after every change, in the reference's exact format.

One Ledger is shared by the lab's threads (one per trial slot): every method holds its lock. It
also knows the record as it last wrote it (a digest and an in-memory copy), so that a write by
anyone else (an unsandboxed trainer, an agent with a shell) is found, undone, and reported by
`untouched()`, however many trials the lab is running at the time.
"""
from __future__ import annotations

import functools
import hashlib
import json
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from autoresearch.errors import UserError
from autoresearch.harness.storage import atomic_path

from .outcomes import FINISHED, Failure, Kind, Status, legacy_failure

SCHEMA_VERSION = 2
RESULTS_HEADER = "commit\tval_bpb\tmemory_gb\tstatus\tdescription"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS trials (
    id INTEGER PRIMARY KEY,
    kind TEXT NOT NULL,              -- outcomes.Kind
    commit_sha TEXT,
    parent_sha TEXT,
    proposer TEXT NOT NULL,
    description TEXT NOT NULL,
    diff TEXT NOT NULL DEFAULT '',
    seed INTEGER,
    status TEXT NOT NULL,            -- outcomes.Status
    failure TEXT,                    -- outcomes.Failure, for a crash
    reason TEXT NOT NULL DEFAULT '',  -- for people: what happened, in words
    decision TEXT NOT NULL DEFAULT '{}',   -- JSON: rule, sigma, threshold, delta, why
    val_bpb REAL,                    -- the harness's measurement: the number that decides
    trainer_summary TEXT NOT NULL DEFAULT '{}',  -- JSON: what train.py printed, for information
    training_seconds REAL,           -- measured by the lab, not by the trainer
    total_seconds REAL,
    total_tokens_m REAL,
    num_steps INTEGER,
    mfu_percent REAL,
    peak_vram_mb REAL,
    hardware TEXT NOT NULL DEFAULT '{}',
    device_class TEXT,               -- the class of device it ran on: runs compare only within one
    tokens_per_second REAL,          -- training tokens served per second of the lab's clock
    sandboxed INTEGER,               -- 1: in the sandbox; 0: the user chose to run unsandboxed
    proposer_usage TEXT NOT NULL DEFAULT '{}',  -- JSON: what proposing cost (LLM tokens, dollars, seconds)
    log_path TEXT NOT NULL DEFAULT '',
    started_at REAL NOT NULL,
    ended_at REAL
);
"""


class LedgerVersionError(UserError):
    """The ledger was written by a newer autoresearch than this one."""


def check_schema_version(version, path: Path) -> None:
    """Refuses a ledger whose schema is newer than this autoresearch knows (or is not a number at all)."""
    try:
        newer = version is not None and int(version) > SCHEMA_VERSION
    except (TypeError, ValueError):
        newer = True
    if newer:
        raise LedgerVersionError(
            f"{path} was written by a newer autoresearch (ledger schema {version}, this one knows "
            f"{SCHEMA_VERSION}). Upgrade autoresearch to read it."
        )


# Columns added since schema 1, with their SQL types, for upgrading an older ledger in place.
ADDED_COLUMNS = {"failure": "TEXT", "device_class": "TEXT", "tokens_per_second": "REAL", "sandboxed": "INTEGER"}

# What a row of an older ledger without the column reads as; other missing columns read as None.
ROW_DEFAULTS = {"description": "", "diff": "", "reason": "", "proposer": "", "log_path": "", "kind": "candidate",
                "status": "running", "started_at": 0.0}


@dataclass
class Trial:
    id: int
    kind: str
    commit_sha: str | None
    parent_sha: str | None
    proposer: str
    description: str
    diff: str
    seed: int | None
    status: str
    failure: str | None
    reason: str
    decision: dict
    val_bpb: float | None
    trainer_summary: dict
    training_seconds: float | None
    total_seconds: float | None
    total_tokens_m: float | None
    num_steps: int | None
    mfu_percent: float | None
    peak_vram_mb: float | None
    hardware: dict
    device_class: str | None
    tokens_per_second: float | None
    sandboxed: bool | None
    proposer_usage: dict
    log_path: str
    started_at: float
    ended_at: float | None
    _json_fields = ("decision", "trainer_summary", "hardware", "proposer_usage")

    @property
    def values(self) -> list[float]:
        """The val_bpb runs its decision rests on (several when it was re-run), else its own one, else none."""
        runs = [v for v in (self.decision or {}).get("values") or [] if isinstance(v, (int, float))]
        return runs or ([self.val_bpb] if self.val_bpb is not None else [])

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> "Trial":
        """A Trial from a row, tolerant of columns an older ledger lacks or a newer one adds (the
        report reads ledgers of other versions)."""
        values = {k: row[k] for k in row.keys() if k in cls.__dataclass_fields__}
        for key in cls._json_fields:
            try:
                values[key] = json.loads(values.get(key) or "{}")
            except (TypeError, json.JSONDecodeError):
                values[key] = {}
        for name in cls.__dataclass_fields__:
            if not name.startswith("_"):
                values.setdefault(name, ROW_DEFAULTS.get(name))
        for name, named in (("kind", Kind), ("status", Status), ("failure", Failure)):
            if values[name] in named._value2member_map_:  # a newer ledger's unknown value stays text
                values[name] = named(values[name])
        if values["failure"] is None and values["status"] == Status.CRASH:  # an older ledger, read only
            values["failure"] = legacy_failure(values["reason"])
        if values["sandboxed"] is not None:
            values["sandboxed"] = bool(values["sandboxed"])
        return cls(**values)

    @property
    def short_sha(self) -> str:
        return (self.commit_sha or "0000000")[:7]


def _locked(method):
    @functools.wraps(method)
    def locked(self, *args, **kwargs):
        with self._lock:
            return method(self, *args, **kwargs)
    return locked


def _writes(method):
    """A write of the lab's: first the record is checked to be as the lab left it (else put back, and
    the finding kept for `untouched`), then written, then remembered as the lab's."""
    @functools.wraps(method)
    def write(self, *args, **kwargs):
        with self._lock:
            self._check()
            try:
                return method(self, *args, **kwargs)
            finally:
                self._remember()
    return write


class Ledger:
    def __init__(self, path: Path, results_tsv: Path | None = None):
        self.path = Path(path)
        self.results_tsv = results_tsv
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._digest: str | None = None  # of the record as the lab last wrote it
        self._copy: sqlite3.Connection | None = None  # ... and that record itself
        self._tampered = False  # someone else wrote it since the last untouched()
        self.db = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")  # a finished trial survives a power cut
        self.db.executescript(_SCHEMA)
        version = self.get_meta("schema_version")
        if version is None:
            self.set_meta("schema_version", SCHEMA_VERSION)
        else:
            check_schema_version(version, self.path)
            if int(version) < SCHEMA_VERSION:
                self._upgrade()
        self._remember()

    def _upgrade(self) -> None:
        """Bring a ledger of an older schema up to this one, in one transaction: add the new columns and
        name the failure of every old crash from the words its reason starts with."""
        present = {row[1] for row in self.db.execute("PRAGMA table_info(trials)")}
        self.db.execute("BEGIN IMMEDIATE")
        try:
            for name, sql_type in ADDED_COLUMNS.items():
                if name not in present:
                    self.db.execute(f"ALTER TABLE trials ADD COLUMN {name} {sql_type}")
            for trial_id, reason in self.db.execute(
                    "SELECT id, reason FROM trials WHERE status = 'crash' AND failure IS NULL").fetchall():
                self.db.execute("UPDATE trials SET failure = ? WHERE id = ?", (legacy_failure(reason), trial_id))
            self.db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('schema_version', ?)",
                            (json.dumps(SCHEMA_VERSION),))
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise

    @_locked
    def close(self) -> None:
        self.db.close()
        if self._copy is not None:
            self._copy.close()

    # --- meta: workspace-wide values such as the noise floor -----------------------------------
    @_locked
    def get_meta(self, key: str, default=None):
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else default

    @_writes
    def set_meta(self, key: str, value) -> None:
        self.db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, json.dumps(value)))

    # --- trials ---------------------------------------------------------------------------------
    @_writes
    def begin(self, *, kind: str, proposer: str, description: str, commit_sha: str | None,
              parent_sha: str | None, diff: str, seed: int | None) -> int:
        cur = self.db.execute(
            "INSERT INTO trials (kind, commit_sha, parent_sha, proposer, description, diff, seed, status, "
            "started_at) VALUES (?, ?, ?, ?, ?, ?, ?, 'running', ?)",
            (kind, commit_sha, parent_sha, proposer, description, diff, seed, time.time()),
        )
        if self.results_tsv is not None and not self.results_tsv.exists():  # a running row adds no line
            self._write_tsv()
        return cur.lastrowid

    @_writes
    def update(self, trial_id: int, **fields) -> None:
        for key in Trial._json_fields:
            if key in fields:
                fields[key] = json.dumps(fields[key], sort_keys=True)
        if fields.get("status") in FINISHED and "ended_at" not in fields:
            fields["ended_at"] = time.time()
        unknown = set(fields) - set(Trial.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown trial fields: {sorted(unknown)}")
        assignments = ", ".join(f"{k} = ?" for k in fields)
        self.db.execute(f"UPDATE trials SET {assignments} WHERE id = ?", (*fields.values(), trial_id))
        row = self.db.execute("SELECT status FROM trials WHERE id = ?", (trial_id,)).fetchone()
        if "status" in fields or (row is not None and row["status"] != Status.RUNNING):  # else its line is absent
            self._write_tsv()

    @_locked
    def trial(self, trial_id: int) -> Trial:
        row = self.db.execute("SELECT * FROM trials WHERE id = ?", (trial_id,)).fetchone()
        if row is None:
            raise KeyError(trial_id)
        return Trial.from_row(row)

    @_locked
    def trials(self, *, kind: str | None = None, status: str | None = None) -> list[Trial]:
        query, args = "SELECT * FROM trials WHERE 1=1", []
        if kind:
            query, args = query + " AND kind = ?", [*args, kind]
        if status:
            query, args = query + " AND status = ?", [*args, status]
        return [Trial.from_row(r) for r in self.db.execute(query + " ORDER BY id", args)]

    # --- guarding the record ----------------------------------------------------------------------
    @_locked
    def content(self) -> list:
        """Every row of every table: what nobody but the lab may change."""
        return [list(map(tuple, self.db.execute(f"SELECT * FROM {table} ORDER BY 1"))) for table in ("meta", "trials")]

    def _fingerprint(self) -> str:
        return hashlib.sha256(repr(self.content()).encode()).hexdigest()

    def _remember(self) -> None:
        self._digest = self._fingerprint()
        copy = sqlite3.connect(":memory:", check_same_thread=False)
        self.db.backup(copy)
        if self._copy is not None:
            self._copy.close()
        self._copy = copy

    def _check(self) -> None:
        if self._digest is not None and self._fingerprint() != self._digest:
            self._copy.backup(self.db)
            self._write_tsv()
            self._tampered = True

    @_locked
    def untouched(self) -> bool:
        """Whether the record is as the lab last wrote it, and has been since the last call. If not, it
        has been put back as the lab wrote it, and the answer is False (once)."""
        self._check()
        tampered, self._tampered = self._tampered, False
        return not tampered

    # --- results.tsv ----------------------------------------------------------------------------
    @_locked
    def results_rows(self) -> list[str]:
        """One line per finished trial, in the reference's format, whose statuses are keep, discard and
        crash only: crash rows carry 0.000000 and 0.0, an empty proposal reads as a discard, and a trial
        that will be run again (stopped, lost) has no line yet."""
        lines = [RESULTS_HEADER]
        for t in self.trials():
            if t.status in (Status.RUNNING, Status.STOPPED, Status.LOST):
                continue
            crashed = t.status == Status.CRASH or (t.status != Status.EMPTY and t.val_bpb is None)
            bpb = 0.0 if crashed or t.val_bpb is None else t.val_bpb
            mem = 0.0 if crashed else (t.peak_vram_mb or 0.0) / 1024
            status = Status.CRASH if crashed else Status.DISCARD if t.status == Status.EMPTY else t.status
            description = " ".join(t.description.split())  # no tabs or newlines inside a field
            lines.append(f"{t.short_sha}\t{bpb:.6f}\t{mem:.1f}\t{status}\t{description}")
        return lines

    @_locked
    def _write_tsv(self) -> None:
        if self.results_tsv is None:
            return
        with atomic_path(self.results_tsv) as tmp:
            tmp.write_text("\n".join(self.results_rows()) + "\n")
