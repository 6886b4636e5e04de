"""Read-only access to a workspace: its config, its ledger, its trial logs, and what follows from them.

Everything here reads; nothing writes. The ledger is opened through SQLite's read-only URI
(`file:...?mode=ro`), so a report, the status view or the dashboard can never take a write lock,
never block the loop (the ledger is in WAL mode: readers and the writer do not wait for each other)
and never change a byte of it. Where SQLite still answers `database is locked` (a writer holding
an exclusive lock, a ledger not in WAL mode), the read is retried for a while and then refused
with a message that says so.

From the lab it takes the workspace, the ledger's `Trial` record and schema check and the time
limits, none of which imports numpy or torch, so `autoresearch status` starts at once.
"""
from __future__ import annotations

import json
import math
import re
import sqlite3
import statistics
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

from autoresearch.errors import UserError
from autoresearch.lab.ledger import LedgerVersionError, Trial, check_schema_version
from autoresearch.lab.limits import evaluation_limit, trainer_limit
from autoresearch.lab.workspace import Workspace, WorkspaceError

RETRY_SECONDS = 10.0  # how long a read waits out a locked ledger before giving up


class ReportError(UserError):
    """A workspace or ledger the report cannot read; the message says why and what to do."""


class LedgerTooNew(ReportError, LedgerVersionError):
    """The ledger was written by a newer autoresearch than this one."""


class LedgerBusy(ReportError):
    """The ledger stayed locked for longer than the retries allow."""


# --- the workspace ---------------------------------------------------------------------------------
def find_workspace(path: str | Path | None = None) -> Workspace:
    """The workspace at `path`, or the one containing the current directory (as the lab finds it)."""
    try:
        return Workspace.open(Path(path).expanduser() if path else None)
    except WorkspaceError as e:
        raise ReportError(str(e)) from None


# --- the ledger, read only -------------------------------------------------------------------------
def _is_busy(error: sqlite3.OperationalError) -> bool:
    text = str(error).lower()
    return "locked" in text or "busy" in text


@dataclass
class LedgerData:
    trials: list[Trial]
    meta: dict
    read_at: float = field(default_factory=time.time)


def read_ledger(path: Path, retry_seconds: float = RETRY_SECONDS) -> LedgerData:
    """Every trial and meta value, read in one read-only transaction (a consistent snapshot).

    A missing ledger reads as empty (the workspace has not run anything yet)."""
    path = Path(path)
    if not path.exists():
        return LedgerData([], {})
    uri = f"file:{quote(str(path.resolve()))}?mode=ro"
    deadline = time.monotonic() + retry_seconds
    delay = 0.05
    while True:
        try:
            return _read_once(uri, path)
        except sqlite3.OperationalError as e:
            if not _is_busy(e):
                raise ReportError(f"The ledger {path} cannot be read: {e}.") from None
            if time.monotonic() >= deadline:
                raise LedgerBusy(
                    f"The ledger {path} stayed locked for {retry_seconds:g}s (the loop may be writing to it, or "
                    "another program holds it). Nothing was changed; try again in a moment."
                ) from None
            time.sleep(delay)
            delay = min(delay * 2, 0.5)
        except sqlite3.DatabaseError as e:
            raise ReportError(f"{path} is not a readable ledger ({e}).") from None


def _read_once(uri: str, path: Path) -> LedgerData:
    db = sqlite3.connect(uri, uri=True, timeout=1.0, isolation_level=None, check_same_thread=False)
    try:
        db.row_factory = sqlite3.Row
        db.execute("BEGIN")  # one snapshot for meta and trials
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        meta = {}
        if "meta" in tables:
            for key, value in db.execute("SELECT key, value FROM meta"):
                try:
                    meta[key] = json.loads(value)
                except (TypeError, json.JSONDecodeError):
                    meta[key] = value
        try:
            check_schema_version(meta.get("schema_version"), path)
        except LedgerVersionError as e:
            raise LedgerTooNew(str(e)) from None
        trials = []
        if "trials" in tables:
            trials = [Trial.from_row(r) for r in db.execute("SELECT * FROM trials ORDER BY id")]
        db.execute("COMMIT")
        return LedgerData(trials, meta)
    finally:
        db.close()


def ledger_stamp(path: Path) -> tuple:
    """Changes whenever the ledger's content may have changed (the database and its WAL file)."""
    stamp = []
    for p in (path, path.with_name(path.name + "-wal")):
        try:
            st = p.stat()
            stamp.append((st.st_size, st.st_mtime_ns))
        except OSError:
            stamp.append(None)
    return tuple(stamp)


# --- progress lines of train.py ----------------------------------------------------------------------
PROGRESS_PREFIX = "train step="
_NUMBER = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


def parse_progress_line(line: str) -> dict | None:
    """`train step=12 progress_pct=4.0 loss=3.2 ...` -> {"step": 12, "progress_pct": 4.0, ...}."""
    line = line.strip()
    if not line.startswith(PROGRESS_PREFIX):
        return None
    point = {}
    for token in line[len("train "):].split():
        key, eq, value = token.partition("=")
        if not eq:
            continue
        if _NUMBER.match(value):
            number = float(value)
            point[key] = int(number) if key in ("step", "epoch") and number.is_integer() else number
        elif value.lower() in ("nan", "inf", "-inf"):
            point[key] = None  # not JSON; the curve skips it
        else:
            point[key] = value
    return point if isinstance(point.get("step"), int) else None


def read_tail(path: Path, nbytes: int) -> str | None:
    """The last `nbytes` of a (growing) log file as text, without reading the rest; None if unreadable."""
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            f.seek(max(0, f.tell() - nbytes))
            return f.read().decode(errors="replace")
    except OSError:
        return None


def last_progress(log_path: Path, tail_bytes: int = 65536) -> dict | None:
    """The last progress line of a train.log, read from its end only."""
    text = read_tail(log_path, tail_bytes)
    if text is None:
        return None
    for line in reversed(text.splitlines()):
        point = parse_progress_line(line)
        if point:
            return point
    return None


class LogFollower:
    """The progress points of one growing train.log, read incrementally (only the new bytes)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.offset = 0
        self.points: list[dict] = []
        self._partial = b""
        self.ino = None

    def poll(self) -> list[dict]:
        try:
            st = self.path.stat()
        except OSError:
            return self.points
        if st.st_size < self.offset or (self.ino is not None and st.st_ino != self.ino):
            self.offset, self.points, self._partial = 0, [], b""  # rewritten: start over
        self.ino = st.st_ino
        if st.st_size == self.offset:
            return self.points
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                chunk = f.read()
        except OSError:
            return self.points
        self.offset += len(chunk)
        data = self._partial + chunk
        *lines, self._partial = data.split(b"\n")
        for raw in lines:
            point = parse_progress_line(raw.decode(errors="replace"))
            if point:
                self.points.append(point)
        return self.points


def downsample(points: list, limit: int = 1500) -> list:
    if len(points) <= limit:
        return points
    stride = len(points) / limit
    picked = [points[int(i * stride)] for i in range(limit)]
    picked[-1] = points[-1]
    return picked


# --- crash reasons -------------------------------------------------------------------------------------
def crash_group(reason: str) -> str:
    """The kind of a crash: the words before the reason's first colon (`timeout`, `causality
    violation`, `exit`, `OOM`, `tampering`, `rejected edit`, `over budget`, ...)."""
    reason = " ".join((reason or "").split())
    if not reason:
        return "no reason recorded"
    head, colon, _ = reason.partition(":")
    if colon and 0 < len(head.split()) <= 4:
        return head.strip()
    return " ".join(reason.split()[:3])


def crash_detail(reason: str) -> str:
    """What follows the group name: for `exit: train.py exited with code 1: ZeroDivisionError: ...`,
    `code 1: ZeroDivisionError: ...`."""
    reason = " ".join((reason or "").split())
    head, colon, rest = reason.partition(":")
    rest = rest.strip() if colon and len(head.split()) <= 4 else reason
    return re.sub(r"^train\.py exited with ", "", rest)


# --- what the ledger says, derived -------------------------------------------------------------------
def fmean(values):
    return statistics.fmean(values) if values else None


@dataclass
class KeptChange:
    trial: Trial
    delta: float | None  # mean(best before) - mean(this): positive is an improvement
    values: list[float]
    best_before: list[float]
    se: float | None  # standard error of delta from sigma and the two run counts

    @property
    def z(self) -> float | None:
        return self.delta / self.se if self.delta is not None and self.se else None

    @property
    def mean(self) -> float | None:
        return fmean(self.values)

    @property
    def mean_before(self) -> float | None:
        return fmean(self.best_before)


@dataclass
class Analysis:
    ws: Workspace
    trials: list[Trial]
    meta: dict
    read_at: float

    def __post_init__(self):
        t = self.trials
        self.finished = [x for x in t if x.status != "running"]
        self.running = [x for x in t if x.status == "running"]
        # A row left `running` by a lab that died (kill -9, reboot) until `autoresearch run` resumes.
        limit = self.longest_trial_seconds
        self.stale_running = [x for x in self.running if x.started_at and self.read_at - x.started_at > limit]
        self.live_running = [x for x in self.running if x not in self.stale_running]
        self.baseline_runs = [x for x in t if x.kind == "baseline" and x.status == "keep" and x.val_bpb is not None]
        self.baseline_values = [x.val_bpb for x in self.baseline_runs]
        self.baseline_commit = self.ws.config.get("base_commit") or (
            self.baseline_runs[0].commit_sha if self.baseline_runs else None)
        sigma = self.meta.get("sigma")
        self.sigma = float(sigma) if isinstance(sigma, (int, float)) else None
        self.candidates = [x for x in t if x.kind == "candidate"]
        self.finished_candidates = [x for x in self.candidates if x.status != "running"]
        self.kept_candidates = [x for x in self.candidates if x.status == "keep"]
        self.crashes = [x for x in t if x.status == "crash"]
        self._replay()

    # The lab's rule for the best: the commit of the last kept row; its value is the mean of every
    # kept row of that commit (baseline seeds, reruns, drift checks included).
    def _replay(self) -> None:
        kept: dict[str, list[float]] = {}
        best_commit = None
        self.running_best: dict[int, float | None] = {}
        self.best_before: dict[int, tuple[str | None, list[float]]] = {}
        self.kept_changes: list[KeptChange] = []
        for x in self.trials:
            if x.kind == "candidate":
                self.best_before[x.id] = (best_commit, list(kept.get(best_commit, [])))
            if x.status == "keep" and x.val_bpb is not None:
                key = x.commit_sha or ""
                kept.setdefault(key, []).append(x.val_bpb)
                best_commit = key
            self.running_best[x.id] = fmean(kept[best_commit]) if best_commit is not None else None
        self.best_commit = best_commit
        self.best_values = list(kept.get(best_commit, [])) if best_commit is not None else []
        for x in self.kept_candidates:
            _, before = self.best_before.get(x.id, (None, []))
            values = x.values
            before = [v for v in (x.decision.get("best_values") or before) if isinstance(v, (int, float))]
            delta = x.decision.get("delta")
            if not isinstance(delta, (int, float)):
                delta = fmean(before) - fmean(values) if before and values else None
            sigma = x.decision.get("sigma") if isinstance(x.decision.get("sigma"), (int, float)) else self.sigma
            se = sigma * math.sqrt(1 / len(before) + 1 / len(values)) if sigma and before and values else None
            self.kept_changes.append(KeptChange(x, delta, values, before, se))
        self.kept_changes.sort(key=lambda k: -(k.delta if k.delta is not None else -math.inf))

    # --- the workspace, as far as its config can be read ---------------------------------------------
    @property
    def time_budget(self) -> float | None:
        """Training seconds per trial; None where the config names no budget or profile this version knows."""
        try:
            return self.ws.time_budget
        except (KeyError, ValueError):
            return None

    @property
    def longest_trial_seconds(self) -> float:
        """Longer than any trial the lab lets run: the trainer's kill limit, then the evaluation's."""
        trainer = trainer_limit(self.time_budget or 300.0, self.ws.config.get("grace_seconds"))
        return trainer + evaluation_limit(trainer)

    def log_path(self, trial: Trial) -> Path:
        """The trial's train.log: in its folder here (the workspace may have moved since the ledger
        recorded an absolute path), else where the ledger says."""
        here = self.ws.trial_dir(trial.id) / "train.log"
        if here.exists() or not trial.log_path:
            return here
        return Path(trial.log_path)

    # --- headline numbers -------------------------------------------------------------------------
    @property
    def baseline_mean(self) -> float | None:
        return fmean(self.baseline_values)

    @property
    def best_mean(self) -> float | None:
        return fmean(self.best_values)

    @property
    def improvement(self) -> float | None:
        if self.baseline_mean is None or self.best_mean is None:
            return None
        return self.baseline_mean - self.best_mean

    @property
    def improvement_se(self) -> float | None:
        """Standard error of baseline mean - best mean: sigma * sqrt(1/n_baseline + 1/n_best).
        Zero runs of difference when the best is the baseline itself."""
        if self.sigma is None or not self.baseline_values or not self.best_values:
            return None
        if self.best_commit == self.baseline_commit:
            return 0.0
        return self.sigma * math.sqrt(1 / len(self.baseline_values) + 1 / len(self.best_values))

    @property
    def keep_rate(self) -> float | None:
        return len(self.kept_candidates) / len(self.finished_candidates) if self.finished_candidates else None

    @property
    def span_seconds(self) -> float | None:
        if not self.trials:
            return None
        start = min(x.started_at for x in self.trials)
        ends = [x.ended_at for x in self.finished if x.ended_at] + ([self.read_at] if self.running else [])
        return max(ends) - start if ends else None

    @property
    def trials_per_hour(self) -> float | None:
        span = self.span_seconds
        return len(self.finished) / (span / 3600) if span and span > 0 and self.finished else None

    @property
    def compute_seconds(self) -> float:
        """Wall time of every finished trial (training, evaluation and the lab's checks)."""
        total = 0.0
        for x in self.finished:
            if x.ended_at and x.started_at:
                total += max(0.0, x.ended_at - x.started_at)
            elif x.total_seconds:
                total += x.total_seconds
        return total

    @property
    def hardware(self) -> dict:
        """The hardware most trials were measured on ({} when none was recorded)."""
        seen = Counter(json.dumps(x.hardware, sort_keys=True) for x in self.trials if x.hardware)
        return json.loads(seen.most_common(1)[0][0]) if seen else {}

    @property
    def accelerator(self) -> str:
        """`GPU` or `CPU`: what the compute hours are counted in."""
        device = self.hardware.get("device")
        if device in ("cuda", "mps", "xpu", "rocm"):
            return "GPU"
        if device == "cpu" or self.ws.config.get("profile") == "cpu":
            return "CPU"
        return "GPU"

    @property
    def hardware_text(self) -> str:
        hw = self.hardware
        if not hw:
            return "not recorded yet"
        name = hw.get("gpu") or hw.get("cpu") or hw.get("device", "?")
        parts = [f"{name} ({hw.get('device', '?')})"]
        for key in ("torch", "cuda", "driver", "python"):
            if hw.get(key):
                parts.append(f"{key} {hw[key]}")
        return ", ".join(parts)

    def crash_groups(self) -> list[tuple[str, list[Trial]]]:
        groups: dict[str, list[Trial]] = {}
        for x in self.crashes:
            groups.setdefault(crash_group(x.reason), []).append(x)
        return sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0]))

    def counts(self) -> dict:
        return {s: sum(x.status == s for x in self.trials) for s in ("keep", "discard", "crash", "running")}

    def kinds(self) -> dict:
        return dict(Counter(x.kind for x in self.trials))

    def delta_of(self, trial: Trial) -> float | None:
        """How much better than the best before it a candidate measured (positive: better)."""
        if trial.val_bpb is None:
            return None
        delta = trial.decision.get("delta")
        if isinstance(delta, (int, float)):
            return float(delta)
        _, before = self.best_before.get(trial.id, (None, []))
        return fmean(before) - trial.val_bpb if before else None


def load(workspace: str | Path | None = None, retry_seconds: float = RETRY_SECONDS) -> Analysis:
    ws = workspace if isinstance(workspace, Workspace) else find_workspace(workspace)
    data = read_ledger(ws.ledger_path, retry_seconds)
    return Analysis(ws, data.trials, data.meta, data.read_at)


def duration(seconds: float | None) -> str:
    if seconds is None or math.isnan(seconds):
        return "-"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{(seconds % 3600) // 60:02d}m"
