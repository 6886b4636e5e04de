"""The sealed test split: the baseline's and the best's kept checkpoints scored on it, once each, by
the lab's own supervisor, and remembered.

The loop decides on val_bpb only; no decision ever sees the test split. `score` takes, for the
baseline commit and for the best commit (decide.current_best), the checkpoint of one kept run and
scores it on the `test` split exactly as a trial scores val: trial.run_trial with `checkpoint=`, so
the commit's own train.py rebuilds the model in sandboxed model processes, the supervisor's probes
and audits check its answers, and harness code computes bits per byte. The supervisor works in a
folder of its own (`.autoresearch/sealed/COMMIT/`): the trial's folder and its checkpoint stay as
they were. Like every run of the lab it holds the workspace's lock, so it never shares the device
with a trial.

Of a commit's kept runs, the first one that won no comparison is scored (a drift check of the best,
a baseline seed): the run that got a candidate kept was picked for measuring well, and a seed that
trained a lucky model on val trained it for test too. Its checkpoint when it still has one, else the
next run's.

The results are cached in `.autoresearch/test-eval.json`, keyed by commit:

    {"version": 1, "results": {COMMIT: {"test_bpb": ..., "trial": ..., "evaluated_at": ..., "seconds": ...,
                                        "eval_tokens": ..., "hardware": {...}, ...}}}

A commit with a number is never scored again. A scoring that failed is recorded with its reason
({"error", "failure", "trial", "evaluated_at"}, no test_bpb: readers of version 1 take it as not
scored) and is tried again by the next `score`.

Only `score` runs anything: its imports of the trial machinery are made where it is used, so that
the report reads this module's cache and subjects without importing the supervisor or the sandbox.
"""
from __future__ import annotations

import json
import shutil
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence
from urllib.parse import quote

from autoresearch.harness.storage import write_json

from .decide import current_best
from .ledger import Trial, check_schema_version
from .outcomes import Kind, NamedValue, Status
from .workspace import Workspace

CACHE_FILE = "test-eval.json"  # under .autoresearch/
CACHE_VERSION = 1
SEALED_DIR = "sealed"  # under .autoresearch/: the supervisor's folder for each commit scored
SPLIT = "test"
SELECTED_KINDS = frozenset({Kind.CANDIDATE, Kind.RERUN})  # runs that won (or lost) a comparison


class Role(NamedValue):
    BASELINE = "baseline"  # the unedited train.py
    BEST = "best"  # the best commit, where a change has been kept


@dataclass(frozen=True)
class Subject:
    """A commit whose checkpoint the sealed test scores."""

    role: Role
    commit: str
    trial_id: int | None  # the kept run whose checkpoint is scored; None: the commit has no kept run
    checkpoint: Path | None  # None: no kept run of the commit still has its checkpoint


# --- the cache -------------------------------------------------------------------------------------
def cache_path(ws: Workspace) -> Path:
    return ws.lab_dir / CACHE_FILE


def read_cache(ws: Workspace) -> dict[str, dict]:
    """{commit: entry} as cached; {} for a missing, unreadable or other-version cache."""
    try:
        data = json.loads(cache_path(ws).read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    if not isinstance(data, dict) or data.get("version") != CACHE_VERSION or not isinstance(data.get("results"), dict):
        return {}
    return {commit: entry for commit, entry in data["results"].items() if isinstance(entry, dict)}


def write_cache(ws: Workspace, results: dict[str, dict]) -> None:
    write_json(cache_path(ws), {"version": CACHE_VERSION, "results": results})


def scored(entry: dict | None) -> bool:
    """Whether a cache entry holds a test val_bpb (and so is final)."""
    value = (entry or {}).get("test_bpb")
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# --- what is scored --------------------------------------------------------------------------------
def kept_checkpoint(ws: Workspace, trials: Iterable[Trial], commit: str) -> tuple[int | None, Path | None]:
    """The kept run of `commit` whose checkpoint is scored, and that checkpoint: of its kept runs that
    still have one, the first that won no comparison, else the first. Where none has its checkpoint any
    more, (the run it would have been, None); (None, None) where the commit has no kept run."""
    runs = [t for t in trials if t.commit_sha == commit and t.status == Status.KEEP and t.val_bpb is not None]
    runs.sort(key=lambda t: (t.kind in SELECTED_KINDS, t.id))
    for t in runs:
        path = ws.trial_dir(t.id) / "checkpoint.pt"
        if path.is_file():
            return t.id, path
    return (runs[0].id if runs else None), None


def subjects(ws: Workspace, trials: Sequence[Trial]) -> list[Subject]:
    """The baseline commit and the best commit (one subject when the best is still the baseline), with
    the checkpoint each would be scored from; [] before the baseline has a kept run."""
    best = current_best(trials)
    if best is None:
        return []
    base = ws.config.get("base_commit") or next(
        (t.commit_sha for t in trials if t.kind == Kind.BASELINE and t.status == Status.KEEP), best.commit)
    found = []
    for role, commit in ((Role.BASELINE, base), (Role.BEST, best.commit)):
        if role == Role.BEST and commit == base:
            break
        found.append(Subject(role, commit, *kept_checkpoint(ws, trials, commit)))
    return found


def unscored(ws: Workspace, trials: Sequence[Trial]) -> list[Subject]:
    """The subjects with a checkpoint and no test val_bpb in the cache yet."""
    cache = read_cache(ws)
    return [s for s in subjects(ws, trials) if s.checkpoint is not None and not scored(cache.get(s.commit))]


def _trials(ws: Workspace) -> list[Trial]:
    """Every row of the ledger, read only: the sealed test writes none, and an older ledger is not
    upgraded (for its older autoresearch to refuse) because a report was made of it."""
    if not ws.ledger_path.exists():  # nothing has run yet
        return []
    db = sqlite3.connect(f"file:{quote(str(ws.ledger_path.resolve()))}?mode=ro", uri=True, timeout=30)
    try:
        db.row_factory = sqlite3.Row
        version = db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        check_schema_version(json.loads(version[0]) if version else None, ws.ledger_path)
        return [Trial.from_row(row) for row in db.execute("SELECT * FROM trials ORDER BY id")]
    finally:
        db.close()


# --- scoring ---------------------------------------------------------------------------------------
def score(ws: Workspace, *, sandboxed: bool = True, slot=None, log: Callable[[str], None] = print,
          stop: threading.Event | None = None) -> dict[str, dict]:
    """Score every subject not scored yet whose checkpoint is kept, holding the workspace's lock.
    Returns {commit: cache entry} of those scored now (a failure's entry says why).

    Raises WorkspaceBusy when a lab holds the workspace (and there is something to score),
    SandboxUnavailable when `sandboxed` and no sandbox can be had here, and WorkspaceError when the
    harness changed since the workspace was made (its scores would not be the harness's)."""
    if not unscored(ws, _trials(ws)):
        return {}
    from . import sandbox
    from .loop import default_slot
    from .trial import run_trial

    done: dict[str, dict] = {}
    with ws.lock("report: scoring the sealed test"):
        todo = unscored(ws, _trials(ws))  # as it is now that no lab can change it
        if not todo:
            return done
        if sandboxed:
            sandbox.check()
        ws.check_fingerprint()
        slot = slot or default_slot()
        cache = read_cache(ws)
        for subject in todo:
            log(f"scoring the {subject.role} {subject.commit[:7]} (the checkpoint of trial {subject.trial_id}) on the "
                f"sealed {SPLIT} split" + ("" if sandboxed else
                                           ", unsandboxed as asked: its train.py can read the answers"))
            folder = ws.lab_dir / SEALED_DIR / subject.commit
            shutil.rmtree(folder, ignore_errors=True)  # what an earlier, failed scoring left
            started = time.monotonic()
            outcome = run_trial(ws, subject.trial_id, subject.commit, None, slot=slot, sandboxed=sandboxed, stop=stop,
                                checkpoint=subject.checkpoint, split=SPLIT, folder=folder)
            if outcome.stopped:
                break
            entry = {"trial": subject.trial_id, "evaluated_at": time.time(),
                     "seconds": round(time.monotonic() - started, 1), "split": SPLIT, "sandboxed": outcome.sandboxed,
                     "log": f"{SEALED_DIR}/{subject.commit}/train.log"}
            if outcome.val_bpb is not None:
                rows = (outcome.result.get("score") or {}).get("rows")
                entry.update(test_bpb=outcome.val_bpb, hardware=outcome.hardware, device_class=outcome.device_class,
                             eval_tokens=rows * ws.profile.seq_len if isinstance(rows, int) else None)
                log(f"  test val_bpb {outcome.val_bpb:.6f}")
            else:
                entry.update(error=outcome.reason, failure=str(outcome.failure) if outcome.failure else None)
                log(f"  not scored: {outcome.reason}")
            cache[subject.commit] = done[subject.commit] = entry
            write_cache(ws, cache)  # after each: an interrupted scoring keeps what it finished
    return done
