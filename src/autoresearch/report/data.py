"""Read-only access to a workspace: its config, its ledger, its trial logs, and what follows from them.

Everything here reads; nothing writes. The ledger is opened through SQLite's read-only URI
(`file:...?mode=ro`), so a report, the status view or the dashboard can never take a write lock,
never block the loop (the ledger is in WAL mode: readers and the writer do not wait for each other)
and never change a byte of it. Where SQLite still answers `database is locked` (a writer holding
an exclusive lock, a ledger not in WAL mode), the read is retried for a while and then refused
with a message that says so.

A run's trial slots (a GPU each, a share of the CPU, a slot on a cluster node) are read from the ledger's
meta `slots`, which the lab writes for its latest run, and from the slot each trial's row names (its
hardware's `slot`); a ledger from before there were slots is one slot, slot 0, that ran every trial.

From the lab it takes the workspace, the ledger's `Trial` record and schema check, the time limits,
and the lab's own rules for what the ledger means: the best commit and its runs (decide.current_best)
and the noise (noise.workspace_noise), so that the report never tells a story the lab did not decide
on. None of these imports torch or runs anything (decide imports numpy, for the detectable gain).
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
from functools import cached_property
from pathlib import Path
from urllib.parse import quote

from autoresearch.errors import UserError
from autoresearch.lab.decide import VALUE_KINDS, Best, DecisionRule, current_best
from autoresearch.lab.ledger import LedgerVersionError, Trial, check_schema_version
from autoresearch.lab.limits import trial_limit
from autoresearch.lab.noise import Interval, NoiseEstimate, detectable_gain, gain_interval, workspace_noise
from autoresearch.lab.outcomes import Kind, NamedValue, Status
from autoresearch.lab.workspace import Workspace, WorkspaceError

RETRY_SECONDS = 10.0  # how long a read waits out a locked ledger before giving up
NOISE_SINCE = "noise_since"  # the ledger meta where the lab (lab.loop.NOISE_SINCE) starts its noise epoch
SLOTS = "slots"  # the ledger meta where the lab (lab.loop.SLOTS) records the trial slots of its latest run
GPU_DEVICES = frozenset({"cuda", "mps", "xpu", "rocm"})  # devices whose hours are GPU-hours


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
NO_FAILURE = "unknown"  # the group of a crash whose row names no failure (an older ledger's odd reason)


def failure_name(trial: Trial) -> str | None:
    """What a crash's group is called: its failure's value, or NO_FAILURE; None for a trial that did not crash."""
    if trial.status != Status.CRASH:
        return None
    return str(trial.failure) if trial.failure else NO_FAILURE


UNSANDBOXED_NOTE = "unsandboxed: its train.py could read the answers and the lab's files"


def unsandboxed_text(a) -> str:
    """A warning where any trial ran without the sandbox, else ''."""
    if not a.unsandboxed:
        return ""
    return (f"{len(a.unsandboxed)} of {len(a.trials)} trial(s) ran unsandboxed (--unsandboxed): their train.py could "
            "read the answers, the network and your files, so their numbers are only as good as the trust in it")


def reason_text(trial: Trial) -> str:
    """Why a trial ended as it did, for a list of trials: the reason, after the failure for a crash."""
    failure = failure_name(trial)
    return (f"[{failure}] " if failure else "") + (trial.reason or "")


def crash_detail(reason: str) -> str:
    """A crash's reason without the label reasons have started with (`exit:`, `OOM:`, ...; the group's
    name says what it is): for `exit: train.py exited with code 1: ZeroDivisionError: ...`,
    `code 1: ZeroDivisionError: ...`."""
    reason = " ".join((reason or "").split())
    head, colon, rest = reason.partition(":")
    rest = rest.strip() if colon and len(head.split()) <= 4 else reason
    return re.sub(r"^train\.py exited with ", "", rest)


# --- throughput ----------------------------------------------------------------------------------------
def tokens_per_second(trial: Trial) -> float | None:
    """Training tokens per second of the lab's clock: as the lab recorded it, else from the trainer's
    token count over the training time the lab measured (older ledgers)."""
    if trial.tokens_per_second:
        return trial.tokens_per_second
    if trial.total_tokens_m and trial.training_seconds:
        return trial.total_tokens_m * 1e6 / trial.training_seconds
    return None


def mfu_text(mfu, on_cpu: bool) -> str:
    """MFU as people read it. A CPU has no peak FLOP/s to measure against, and a trainer that does not
    know its device's peak prints 0: neither is a utilisation, so both read `n/a`."""
    if on_cpu or not isinstance(mfu, (int, float)) or not math.isfinite(mfu) or mfu <= 0:
        return "n/a"
    return f"{mfu:.1f}%"


# --- what the ledger says, derived -------------------------------------------------------------------
# The statuses a candidate's keep rate counts: it ran, and either was judged or crashed.
COUNTED = frozenset({Status.KEEP, Status.DISCARD, Status.CRASH})
# Statuses that end a trial with a val_bpb the lab decided on: a result.
DECIDED = frozenset({Status.KEEP, Status.DISCARD})
# A tally of trials in words, in this order: the counted statuses always, then the trials that ended
# otherwise and the one still running, where there are any.
TALLY = (Status.KEEP, Status.DISCARD, Status.CRASH, Status.STOPPED, Status.LOST, Status.EMPTY, Status.SUPERSEDED,
         Status.RUNNING)


def fmean(values):
    return statistics.fmean(values) if values else None


def main_device_class(trials: list[Trial]) -> str | None:
    """The class of device most trials ran on: the one the report's numbers are of, as the lab's are of
    the device it runs on. None where no trial recorded one (an older ledger): then all trials count."""
    seen = Counter(t.device_class for t in trials if t.device_class)
    return seen.most_common(1)[0][0] if seen else None


def best_as_measured(trials: list[Trial], device_class: str | None, since: int) -> Best | None:
    """The lab's best (decide.current_best) on this device in this noise epoch. Where it has no run in
    the epoch yet (an epoch just began; the lab measures the best again before the next decision), its
    runs on this device of earlier epochs stand for it."""
    best = current_best(trials, device_class, since)
    if best is not None and not best.samples and since:
        best = current_best(trials, device_class)
    return best


def _number(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


@dataclass
class KeptChange:
    trial: Trial
    delta: float | None  # the gain over the best it was measured against: positive is an improvement
    values: list[float]
    best_before: list[float]
    low: float | None  # the gain's 95% interval, as its decision recorded it (None in older ledgers)
    high: float | None
    se: float | None  # where there is no interval: the standard error of delta from sigma and the run counts

    @property
    def z(self) -> float | None:
        return self.delta / self.se if self.delta is not None and self.se else None

    @property
    def mean(self) -> float | None:
        return fmean(self.values)

    @property
    def mean_before(self) -> float | None:
        return fmean(self.best_before)


# --- trial slots ---------------------------------------------------------------------------------------
class SlotState(NamedValue):
    """What a trial slot is doing as the ledger was read."""

    RUNNING = "running"
    IDLE = "idle"
    LOST = "lost"  # its machine went away: it takes no more work this run


def _int(value) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def slot_of(trial: Trial) -> int:
    """The slot that ran `trial`, as its row says; a row from before there were slots ran in slot 0."""
    return _int((trial.hardware or {}).get("slot")) or 0


def gpu_count(gpus, device_class: str | None) -> int:
    """How many GPUs a trial held: its list of them, else the count its device class names
    (`2x NVIDIA H100 ...`), else one."""
    if isinstance(gpus, list) and gpus:
        return len(gpus)
    match = re.match(r"(\d+)x ", device_class or "")
    return int(match.group(1)) if match else 1


@dataclass
class SlotView:
    """One trial slot of the latest run: where it is (as the lab recorded it, meta `slots`), what it runs
    now, and what it ran over the run. An older ledger, which records no slots, is one slot: slot 0."""

    index: int
    device: str = ""  # "cuda", "cpu", ...; "" where nothing says
    gpus: list[int] | None = None  # None: every GPU of its machine
    threads: int | None = None
    executor: str = "local"  # "local", or "ray" for a slot on a node of a Ray cluster
    node: str | None = None
    host: str = ""
    device_class: str = ""
    lost: bool = False
    lost_reason: str = ""
    trials: list[Trial] = field(default_factory=list)  # what it ran in the run, in order
    running: Trial | None = None  # its trial in flight; never a row a dead lab left running
    busy_seconds: float = 0.0  # the wall time of its trials, the one in flight up to now
    device_seconds: float = 0.0  # busy_seconds, each trial's times the GPUs it held (a CPU slot: once)
    span_seconds: float | None = None  # the run's span, the same for every slot

    @classmethod
    def recorded(cls, entry: dict, index: int) -> "SlotView":
        """A slot from its meta entry, tolerant of fields an older or newer lab writes otherwise."""
        gpus = entry.get("gpus")
        return cls(index=index, device=str(entry.get("device") or ""),
                   gpus=[g for g in gpus if _int(g) is not None] if isinstance(gpus, list) else None,
                   threads=_int(entry.get("threads")), executor=str(entry.get("executor") or "local"),
                   node=entry.get("node") if isinstance(entry.get("node"), str) else None,
                   host=str(entry.get("host") or ""), device_class=str(entry.get("device_class") or ""),
                   lost=entry.get("lost") is True, lost_reason=str(entry.get("lost_reason") or ""))

    @property
    def state(self) -> SlotState:
        if self.lost:
            return SlotState.LOST
        return SlotState.RUNNING if self.running is not None else SlotState.IDLE

    @property
    def on_gpu(self) -> bool:
        return self.device in GPU_DEVICES

    @property
    def finished(self) -> list[Trial]:
        return [t for t in self.trials if t.status != Status.RUNNING]

    @property
    def busy_fraction(self) -> float | None:
        """The share of the run's span it had a trial in flight; None before the run has a span."""
        if not self.span_seconds or self.span_seconds <= 0:
            return None
        return min(1.0, self.busy_seconds / self.span_seconds)

    @property
    def device_hours(self) -> float:
        return self.device_seconds / 3600

    @property
    def trials_per_hour(self) -> float | None:
        """Trials it finished per hour of the run's span."""
        if not self.span_seconds or self.span_seconds <= 0:
            return None
        return len(self.finished) / (self.span_seconds / 3600)

    @property
    def where(self) -> str:
        """Where it runs, for people: `GPU 0 (NVIDIA H100 80GB HBM3)`, `CPU, 4 threads`, and the host of
        a cluster node's slot."""
        if self.on_gpu:
            if self.gpus:
                head = f"GPU {self.gpus[0]}" if len(self.gpus) == 1 else f"GPUs {', '.join(map(str, self.gpus))}"
            else:  # which of its machine's GPUs is not recorded (a cluster node assigns them): how many is
                count = gpu_count(None, self.device_class)
                head = "GPU" if count == 1 else f"{count} GPUs"
            text = f"{head} ({self.device_class})" if self.device_class else head
        elif self.device == "cpu":
            text = f"CPU, {self.threads} thread{'' if self.threads == 1 else 's'}" if self.threads else "CPU"
        else:
            text = self.device_class or self.device or "this machine"
        if self.executor != "local" or self.node:
            text += f" on {self.host or 'node ' + (self.node or '?')[:12]}"
        return text


@dataclass
class Analysis:
    ws: Workspace
    trials: list[Trial]
    meta: dict
    read_at: float

    def __post_init__(self):
        t = self.trials
        self.finished = [x for x in t if x.status != Status.RUNNING]
        self.running = [x for x in t if x.status == Status.RUNNING]
        # A row left `running` by a lab that died (kill -9, reboot) until `autoresearch run` resumes.
        limit = self.longest_trial_seconds
        self.stale_running = [x for x in self.running if x.started_at and self.read_at - x.started_at > limit]
        self.live_running = [x for x in self.running if x not in self.stale_running]
        # The lab's view: its rule, the device its numbers are of, the noise of this epoch there.
        self.rule = self._rule()
        self.device_class = main_device_class(t)
        self._slots()
        since = self.meta.get(NOISE_SINCE)
        self.since = int(since) if isinstance(since, (int, float)) and not isinstance(since, bool) else 0
        self.noise: NoiseEstimate = workspace_noise(t, self.device_class, self.rule or DecisionRule(), self.since)
        self.sigma, self.sigma_df = self.noise.sigma, self.noise.df
        self.baseline_commit = self.ws.config.get("base_commit") or next(
            (x.commit_sha for x in t if x.kind == Kind.BASELINE and x.status == Status.KEEP), None)
        # The baseline's runs as the lab counts a commit's runs (decide.VALUE_KINDS): its seeds, and its
        # runs again (drift checks while it was the best, confirmations), on this device.
        self.baseline_runs = [x for x in t if x.commit_sha == self.baseline_commit and x.kind in VALUE_KINDS
                              and x.status == Status.KEEP and x.val_bpb is not None
                              and (self.device_class is None or x.device_class == self.device_class)]
        self.baseline_values = [x.val_bpb for x in self.baseline_runs]
        self.best = best_as_measured(t, self.device_class, self.since)
        self.best_commit = self.best.commit if self.best else None
        self.best_values = self.best.values if self.best else []
        self.candidates = [x for x in t if x.kind == Kind.CANDIDATE]
        # The keep rate's denominator: candidates that ran to an outcome. Not one still running, nor one
        # stopped or lost (it is run again), nor an empty proposal (nothing was tried).
        self.counted_candidates = [x for x in self.candidates if x.status in COUNTED]
        self.kept_candidates = [x for x in self.candidates if x.status == Status.KEEP]
        self.crashes = [x for x in t if x.status == Status.CRASH]
        # Trials the person chose to run without the sandbox: their numbers rest on trusting train.py.
        self.unsandboxed = [x for x in t if not x.sandboxed]
        self._replay()

    def _slots(self) -> None:
        """The slots of the latest run (meta `slots`; an older ledger: one), the trials each ran in that run
        and its busy time, and the run's span, from its start to now while a trial runs, else to its last end."""
        entries = self.meta.get(SLOTS)
        entries = [e for e in entries if isinstance(e, dict)] if isinstance(entries, list) else []
        self.slots_recorded = bool(entries)
        self._live_ids = {x.id for x in self.live_running}
        views: dict[int, SlotView] = {}
        if entries:
            for n, entry in enumerate(entries):
                index = _int(entry.get("slot"))
                index = n if index is None else index
                views[index] = SlotView.recorded(entry, index)
            starts = [_number(e.get("started_at")) for e in entries if _number(e.get("started_at")) is not None]
            self.run_started = min(starts) if starts else None
        else:
            hw = self.hardware
            views[0] = SlotView(0, device=str(hw.get("device") or ("cpu" if self.accelerator == "CPU" else "")),
                                gpus=hw.get("gpus") if isinstance(hw.get("gpus"), list) else None,
                                threads=_int(hw.get("threads")), device_class=self.device_class or "")
            self.run_started = None
        # The rows of this run: an earlier run's slot numbers may have named other devices.
        self.run_trials = [x for x in self.trials if self.run_started is None or (x.started_at or 0) >= self.run_started]
        self._slot_by_trial: dict[int, SlotView] = {}
        for x in self.run_trials:
            k = slot_of(x)
            view = views.setdefault(k, SlotView(k))  # a slot the record does not name: its rows still count
            self._slot_by_trial[x.id] = view
            view.trials.append(x)
            seconds = self.wall_seconds(x)
            view.busy_seconds += seconds
            view.device_seconds += seconds * self.devices_of(x)
            if x.id in self._live_ids:
                view.running = x
        self.slots = [views[k] for k in sorted(views)]
        self.run_span_seconds = self._span(self.run_trials, self.run_started)
        for view in self.slots:
            view.span_seconds = self.run_span_seconds

    def _span(self, trials: list[Trial], start: float | None = None) -> float | None:
        """From `start` (else the first trial's start) to the last end of `trials`, or now while one of them
        runs. A row a dead lab left running ends nowhere: counting it up to now would make the run look ever
        slower."""
        if start is None:
            if not trials:
                return None
            start = min(x.started_at for x in trials)
        ends = [x.ended_at for x in trials if x.status != Status.RUNNING and x.ended_at]
        if any(x.id in self._live_ids for x in trials):
            ends.append(self.read_at)
        return max(ends) - start if ends else None

    def wall_seconds(self, trial: Trial) -> float:
        """How long `trial` held its slot: start to end, the one in flight up to now; a row a dead lab left
        running, nothing (when it ended is not known)."""
        if trial.status == Status.RUNNING:
            return max(0.0, self.read_at - trial.started_at) if trial.id in self._live_ids and trial.started_at else 0.0
        if trial.ended_at and trial.started_at:
            return max(0.0, trial.ended_at - trial.started_at)
        return trial.total_seconds or 0.0

    def slot_of_trial(self, trial: Trial) -> SlotView | None:
        """The slot of the latest run that ran `trial`; None for a trial of an earlier run."""
        return self._slot_by_trial.get(trial.id)

    def devices_of(self, trial: Trial) -> int:
        """The devices `trial` held, that its hours count times: the GPUs of a GPU trial (as its row records
        them, else its slot), one for a CPU trial."""
        hw, slot = trial.hardware or {}, self.slot_of_trial(trial)
        device = hw.get("device") or (slot.device if slot else "") or ("cpu" if self.accelerator == "CPU" else "cuda")
        if device not in GPU_DEVICES:
            return 1
        gpus = hw.get("gpus") if isinstance(hw.get("gpus"), list) else (slot.gpus if slot else None)
        return gpu_count(gpus, trial.device_class or (slot.device_class if slot else None))

    @property
    def several_slots(self) -> bool:
        return len(self.slots) > 1

    @property
    def slots_worth_showing(self) -> bool:
        """Whether the views list the slots: where there are several, or the one there is was lost (with
        one slot at work, the trial in flight says all)."""
        return self.several_slots or any(s.lost for s in self.slots)

    @property
    def slots_busy_fraction(self) -> float | None:
        """The share of the run's slot time that had a trial in flight, over every slot."""
        span = self.run_span_seconds
        if not span or span <= 0 or not self.slots:
            return None
        return min(1.0, sum(s.busy_seconds for s in self.slots) / (span * len(self.slots)))

    def _rule(self) -> DecisionRule | None:
        """The workspace's decision rule; None where its config names one this version cannot read."""
        try:
            return self.ws.rule
        except (KeyError, TypeError, ValueError):
            return None

    def _replay(self) -> None:
        """The best as it stood at every row: the lab's best (best_as_measured) of the ledger up to that
        row, in the noise epoch of then. It changes only at a keep (a kept candidate names a new best
        commit; any kept run adds to the best's runs), so it is computed there."""
        self.running_best: dict[int, float | None] = {}
        self.best_before: dict[int, Best | None] = {}  # a candidate's id: the best as it stood before it
        rows: list[Trial] = []
        best, epoch = None, 0
        for x in self.trials:
            if x.kind == Kind.CANDIDATE:
                self.best_before[x.id] = best
            rows.append(x)
            change = x.decision.get("change") if isinstance(x.decision, dict) else None
            if isinstance(change, dict) and _number(change.get("start")) is not None:  # the lab began an epoch here
                epoch = max(epoch, int(change["start"]))
            if self.since and x.id >= self.since:
                epoch = max(epoch, self.since)
            if x.status == Status.KEEP:
                best = best_as_measured(rows, self.device_class, epoch)
            self.running_best[x.id] = best.mean if best else None
        self.kept_changes: list[KeptChange] = []
        for x in self.kept_candidates:
            decision = x.decision if isinstance(x.decision, dict) else {}
            values = x.values
            before = [v for v in decision.get("best_values") or self._before_values(x) if _number(v) is not None]
            delta = _number(decision.get("delta"))
            if delta is None:
                delta = fmean(before) - fmean(values) if before and values else None
            low, high = _number(decision.get("low")), _number(decision.get("high"))
            se = None
            if low is None or high is None:  # an older ledger: the standard error from sigma and the run counts
                low = high = None
                sigma = _number(decision.get("sigma")) or self.sigma
                se = sigma * math.sqrt(1 / len(before) + 1 / len(values)) if sigma and before and values else None
            self.kept_changes.append(KeptChange(x, delta, values, before, low, high, se))
        self.kept_changes.sort(key=lambda k: -(k.delta if k.delta is not None else -math.inf))

    def _before_values(self, trial: Trial) -> list[float]:
        """The runs of the best before `trial` that a decision on it compares with (decide: the best's
        fresh runs), or all its runs where it has no fresh one."""
        best = self.best_before.get(trial.id)
        if best is None:
            return []
        return [s.value for s in best.fresh] or best.values

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
        """Longer than any trial the lab lets run: every phase's limit, one after another."""
        return trial_limit(self.ws.config, self.time_budget or 300.0)

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
    def best_is_baseline(self) -> bool:
        return self.best_commit is not None and self.best_commit == self.baseline_commit

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
        if self.best_is_baseline:
            return 0.0
        return self.sigma * math.sqrt(1 / len(self.baseline_values) + 1 / len(self.best_values))

    @property
    def improvement_interval(self) -> Interval | None:
        """baseline mean - best mean with its 95% t interval (noise.gain_interval: sigma and its df);
        None where the best is the baseline or either has no run, bounds None while sigma is unknown."""
        if self.best_is_baseline or not self.baseline_values or not self.best_values:
            return None
        return gain_interval(self.baseline_values, self.best_values, self.noise)

    @property
    def detect_against(self) -> int:
        """The runs of the best the next candidate is measured against: its fresh runs, at least the
        rule's baseline_runs (the lab measures the best that often before a candidate)."""
        fresh = len(self.best.fresh) if self.best else 0
        return max(fresh, self.rule.baseline_runs if self.rule else 1, 1)

    @cached_property
    def detectable_gain(self) -> float | None:
        """The smallest true gain the workspace's rule keeps half the time at this noise (noise.detectable_gain),
        against the best as the next candidate meets it; None while sigma is unknown."""
        if self.rule is None or self.sigma is None:
            return None
        return detectable_gain(self.noise, self.rule, self.detect_against)

    @property
    def keep_rate(self) -> float | None:
        return len(self.kept_candidates) / len(self.counted_candidates) if self.counted_candidates else None

    @property
    def span_seconds(self) -> float | None:
        """From the ledger's first trial to its last end (now, while a trial runs)."""
        return self._span(self.trials)

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
    def device_hours(self) -> float:
        """The hours of compute the trials took, in `accelerator`-hours: each trial's wall time (the one in
        flight up to now) times the GPUs it held; a CPU trial's once."""
        return sum(self.wall_seconds(x) * self.devices_of(x) for x in self.trials) / 3600

    @property
    def device_hours_basis(self) -> str:
        """How device_hours were counted, in words."""
        return "trial wall time × the GPUs of its slot" if self.accelerator == "GPU" else "sum of trial wall times"

    @cached_property
    def hardware(self) -> dict:
        """The hardware most trials were measured on ({} when none was recorded). Which slot ran a trial is
        no hardware: a row that records only that (a trial still running) says nothing here."""
        rows = ({k: v for k, v in (x.hardware or {}).items() if k != "slot"} for x in self.trials)
        seen = Counter(json.dumps(hw, sort_keys=True) for hw in rows if hw)
        return json.loads(seen.most_common(1)[0][0]) if seen else {}

    @property
    def accelerator(self) -> str:
        """`GPU` or `CPU`: what the compute hours are counted in."""
        device = self.hardware.get("device")
        if device in GPU_DEVICES:
            return "GPU"
        if device == "cpu" or self.ws.config.get("profile") == "cpu":
            return "CPU"
        return "GPU"

    def on_cpu(self, trial: Trial | None = None) -> bool:
        """Whether `trial` ran on a CPU: by its own record, else (still running, or nothing recorded) by
        what the workspace's trials ran on."""
        device = (trial.hardware or {}).get("device") if trial is not None else None
        slot = self.slot_of_trial(trial) if trial is not None and not device else None
        device = device or (slot.device if slot else None)
        return device == "cpu" if device else self.accelerator == "CPU"

    @property
    def best_run(self) -> Trial | None:
        """The latest kept run of the best commit: what the best trains like now."""
        return next((x for x in reversed(self.trials) if x.status == Status.KEEP and x.val_bpb is not None
                     and (x.commit_sha or "") == self.best_commit), None)

    @property
    def last_result(self) -> Trial | None:
        """The last trial that ended with a val_bpb the lab decided on (kept or discarded)."""
        return next((x for x in reversed(self.trials) if x.status in DECIDED and x.val_bpb is not None), None)

    @property
    def hardware_text(self) -> str:
        hw = self.hardware
        if not hw:
            return "not recorded yet"
        name = hw.get("name") or hw.get("gpu") or hw.get("cpu") or hw.get("class") or hw.get("device", "?")
        parts = [f"{name} ({hw.get('device', '?')})"]
        for key in ("torch", "cuda", "driver", "python"):
            if hw.get(key):
                parts.append(f"{key} {hw[key]}")
        return ", ".join(parts)

    def crash_groups(self) -> list[tuple[str, list[Trial]]]:
        """The crashes by their failure (its value names the group), the most frequent first."""
        groups: dict[str, list[Trial]] = {}
        for x in self.crashes:
            groups.setdefault(failure_name(x), []).append(x)
        return sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0]))

    def counts(self) -> dict[Status, int]:
        """How many trials have each status (every status, zero or not), in Status's order."""
        return {s: sum(x.status == s for x in self.trials) for s in Status}

    def tally(self) -> list[tuple[Status, int]]:
        """(status, how many) in TALLY's order: the counted statuses, and the others that occur."""
        counts = self.counts()
        return [(s, counts[s]) for s in TALLY if counts[s] or s in COUNTED]

    def kinds(self) -> dict:
        return dict(Counter(x.kind for x in self.trials))

    def delta_of(self, trial: Trial) -> float | None:
        """How much better than the best before it a candidate measured (positive: better): the gain its
        decision recorded, else (older ledgers) from the best's runs before it."""
        if trial.val_bpb is None:
            return None
        delta = _number(trial.decision.get("delta")) if isinstance(trial.decision, dict) else None
        if delta is not None:
            return delta
        before = self._before_values(trial)
        return fmean(before) - fmean(trial.values) if before else None


def slot_progress_text(point: dict | None) -> str:
    """A running trial's progress in a few words: `step 340 (45%)`, or what it is doing before its first
    progress line."""
    if not point:
        return "starting (no progress line yet)"
    pct = _number(point.get("progress_pct"))
    return f"step {point.get('step')}" + (f" ({pct:.0f}%)" if pct is not None else "")


def slot_now_text(a: Analysis, slot: SlotView, width: int = 60) -> str:
    """What a slot does now, in words: `running trial 12: <description>, 1m20s, step 340 (45%)` (from the
    last progress line of its train.log), `idle`, or `lost: <why>`."""
    if slot.state == SlotState.LOST:
        return f"lost: {slot.lost_reason or 'its machine went away'}"
    if slot.state == SlotState.IDLE:
        return "idle"
    trial = slot.running
    point = last_progress(a.log_path(trial))
    description = trial.description if len(trial.description) <= width else trial.description[:width - 1] + "…"
    elapsed = a.read_at - trial.started_at if trial.started_at else None
    return f"running trial {trial.id}: {description}, {duration(elapsed)}, {slot_progress_text(point)}"


def percent(fraction: float | None) -> str:
    return f"{100 * fraction:.0f}%" if fraction is not None else "-"


def sigma_basis(a: Analysis) -> str:
    """What sigma was learnt from, in words: its degrees of freedom, the runs, the epoch, the floor."""
    epoch = f" since trial {a.since}, where the lab found the measurement changed" if a.since else ""
    floor = (f", raised to the rule's floor min_sigma (measured {a.noise.raw_sigma:.6f})"
             if a.noise.raw_sigma is not None and a.noise.raw_sigma < a.noise.floor else "")
    return f"{a.sigma_df} df, pooled over every commit run more than once{epoch}{floor}"


def sigma_text(a: Analysis) -> str:
    """The noise as people read it: sigma with its degrees of freedom, and what it was learnt from."""
    if a.sigma is None:
        epoch = f" since trial {a.since}, where the lab found the measurement changed" if a.since else " yet"
        return f"σ unknown: no commit has two runs{epoch}"
    return f"σ = {a.sigma:.6f} with {sigma_basis(a)}"


def detectable_text(a: Analysis, *, why: bool = True) -> str:
    """What the noise hides: the smallest gain the rule can see, in words (`why`: with what that means);
    '' while sigma is unknown."""
    gain = a.detectable_gain
    if gain is None:
        return ""
    if gain == 0:
        return "the rule keeps any gain that measures lower, lucky seeds included"
    meaning = (f" (the rule keeps them less than half the time against a best of {a.detect_against} runs)"
               if why else "")
    return f"gains under {gain:.4g} are invisible here{meaning}: lengthen the budget or allow more runs"


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
