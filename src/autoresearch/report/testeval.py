"""The sealed test split: scored once per commit, at report time, and remembered.

The loop decides on val_bpb only; the test split is never seen by a decision. A report scores the
baseline's and the best commit's kept checkpoints on it, through the harness's own evaluation
process (`python -m autoresearch.harness.evaluate TRAINER CHECKPOINT OUT --split test`), with the
train.py *of that commit* (taken with `git show`, a read-only git command) in a temporary folder.
The results are cached in `.autoresearch/test-eval.json`, keyed by commit, so a second report
does not evaluate again.

While a trial is running, evaluation is deferred by default (mode "auto"): it would compete with
the trial for the device and could change the trial's measurement. Mode "always" evaluates
anyway, "never" uses only what is cached.
"""
from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from autoresearch.harness.storage import write_json
from autoresearch.lab.trial import score_checkpoint, without_secrets
from autoresearch.lab.workspace import Workspace

from .data import Analysis

CACHE_FILE = "test-eval.json"
CACHE_VERSION = 1
MODES = ("auto", "always", "never")
TIMEOUT_SECONDS = 1800.0
_RUN_VARIABLES = ("AUTORESEARCH_SEED", "AUTORESEARCH_EVENTS_FD", "AUTORESEARCH_TIME_BUDGET", "AUTORESEARCH_TRIAL")


@dataclass
class TestResult:
    role: str  # baseline or best
    commit: str | None
    test_bpb: float | None = None
    trial_id: int | None = None
    note: str = ""  # why there is no number, or where a cached one came from


def cache_path(ws: Workspace) -> Path:
    return ws.lab_dir / CACHE_FILE


def read_cache(ws: Workspace) -> dict:
    try:
        data = json.loads(cache_path(ws).read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    if not isinstance(data, dict) or data.get("version") != CACHE_VERSION:
        return {}
    return data.get("results", {}) if isinstance(data.get("results"), dict) else {}


def write_cache(ws: Workspace, results: dict) -> None:
    write_json(cache_path(ws), {"version": CACHE_VERSION, "results": results})


def _checkpoint_for(a: Analysis, commit: str, prefer_kind: str) -> tuple[int | None, Path | None]:
    rows = [x for x in a.trials if x.commit_sha == commit and x.status == "keep" and x.val_bpb is not None]
    rows.sort(key=lambda x: (x.kind != prefer_kind, x.id))
    for x in rows:
        path = a.ws.trial_dir(x.id) / "checkpoint.pt"
        if path.is_file():
            return x.id, path
    return (rows[0].id if rows else None), None


def _git_show(root: Path, commit: str, name: str) -> str | None:
    proc = subprocess.run(["git", "show", f"{commit}:{name}"], cwd=root, capture_output=True, text=True,
                          env={**os.environ, "GIT_TERMINAL_PROMPT": "0", "GIT_OPTIONAL_LOCKS": "0"})
    return proc.stdout if proc.returncode == 0 else None


def evaluate_commit(ws: Workspace, commit: str, checkpoint: Path, timeout: float = TIMEOUT_SECONDS) -> dict:
    """Score `checkpoint` on the test split with the train.py of `commit`, in a fresh process."""
    with tempfile.TemporaryDirectory(prefix="autoresearch-test-eval-") as tmp:
        folder = Path(tmp)
        files = list(dict.fromkeys(["train.py", *ws.config.get("allowed_files", [])]))
        for name in files:
            text = _git_show(ws.root, commit, name)
            if text is None:
                if name == "train.py":
                    return {"error": f"`git show {commit[:12]}:train.py` failed: is the commit still in the repository?"}
                continue
            target = folder / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text)
        out = folder / "eval-test.json"
        env = {k: v for k, v in without_secrets(os.environ).items() if k not in _RUN_VARIABLES}
        env.update({"AUTORESEARCH_PROFILE": ws.config.get("profile", ""), "AUTORESEARCH_DATA": ws.config.get("data", ""),
                    "AUTORESEARCH_OUTPUT": str(folder / "output"), "PYTHONDONTWRITEBYTECODE": "1",
                    "PYTHONUNBUFFERED": "1"})
        try:
            return score_checkpoint(folder / "train.py", checkpoint, out, "test", cwd=folder, env=env, timeout=timeout,
                                    tail_lines=3)
        except subprocess.TimeoutExpired:
            return {"error": f"the test evaluation ran past {timeout:.0f}s and was stopped"}


def sealed_test(a: Analysis, mode: str = "auto", log=None, may_write=lambda: True) -> list[TestResult]:
    """Test-split val_bpb of the baseline and of the best commit (one entry when they are the same).
    `may_write()` says whether the cache may be written now (not while the lab watches its folder)."""
    if mode not in MODES:
        raise ValueError(f"test evaluation mode must be one of {', '.join(MODES)}, not {mode!r}")
    roles = []
    if a.baseline_commit and a.baseline_values:
        roles.append(("baseline", a.baseline_commit, "baseline"))
    if a.best_commit and a.best_commit != a.baseline_commit:
        roles.append(("best", a.best_commit, "candidate"))
    if not roles:
        return []
    cache = read_cache(a.ws)
    results, changed = [], False
    running = a.live_running[0] if a.live_running else None
    for role, commit, prefer in roles:
        entry = cache.get(commit)
        if isinstance(entry, dict) and isinstance(entry.get("test_bpb"), (int, float)):
            results.append(TestResult(role, commit, entry["test_bpb"], entry.get("trial"),
                                      f"evaluated {time.strftime('%Y-%m-%d %H:%M', time.localtime(entry.get('evaluated_at', 0)))}"))
            continue
        trial_id, checkpoint = _checkpoint_for(a, commit, prefer)
        if checkpoint is None:
            results.append(TestResult(role, commit, None, trial_id, "no kept checkpoint to evaluate"))
            continue
        if mode == "never":
            results.append(TestResult(role, commit, None, trial_id, "not evaluated (--test-eval never)"))
            continue
        if mode == "auto" and running is not None:
            results.append(TestResult(role, commit, None, trial_id,
                                      f"deferred: trial {running.id} is running and would share the device; "
                                      "report again when the loop is idle (or --test-eval always)"))
            continue
        if log:
            log(f"scoring {role} {commit[:7]} (trial {trial_id}) on the sealed test split...")
        started = time.time()
        result = evaluate_commit(a.ws, commit, checkpoint)
        seconds = round(time.time() - started, 1)
        if "error" in result:
            results.append(TestResult(role, commit, None, trial_id, f"evaluation failed: {result['error']}"))
            continue
        if not result.get("causality", {}).get("causal", True) or result.get("val_bpb") is None:
            results.append(TestResult(role, commit, None, trial_id, "evaluation refused: the causality probe failed"))
            continue
        cache[commit] = {"test_bpb": result["val_bpb"], "trial": trial_id, "evaluated_at": time.time(),
                         "seconds": seconds, "eval_tokens": result.get("eval_tokens"),
                         "hardware": result.get("hardware", {})}
        changed = True
        results.append(TestResult(role, commit, result["val_bpb"], trial_id, "evaluated now"))
    if changed:
        if may_write():
            write_cache(a.ws, cache)
        else:
            for r in results:
                if r.note == "evaluated now":
                    r.note = "evaluated now; not cached, since a trial is running and the lab watches .autoresearch/"
    return results
