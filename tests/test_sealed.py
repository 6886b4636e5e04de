"""lab.sealed: the baseline's and the best's kept checkpoints scored on the sealed test split, by the
lab's own supervisor (sandboxed model processes, probes, audits) as a trial is scored on val, once per
commit, and cached; and what the report makes of that cache (report.sealed_results).

On a copy of the real small workspace of test_report.py; expectations come from its ledger and the
lab's own functions (report_helpers.ledger_trials).
"""
from __future__ import annotations

import hashlib
import json

import pytest

from autoresearch.lab import sealed
from autoresearch.lab.outcomes import Failure, Kind, Status
from autoresearch.lab.workspace import Workspace, WorkspaceBusy
from report_helpers import ledger_trials, the_kept_gain


def kept_runs(trials, commit):
    return [t for t in trials if t.commit_sha == commit and t.status == Status.KEEP]


def folder_contents(folder) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_the_baseline_and_the_best_are_scored_on_the_test_split_once_and_cached(workspace_copy, monkeypatch):
    ws = Workspace.open(workspace_copy)
    trials, lab = ledger_trials(workspace_copy)
    trial_folders = folder_contents(ws.lab_dir / "trials")
    said = []
    scored = sealed.score(ws, log=said.append)

    assert set(scored) == {lab.base_commit, lab.best.commit}
    cache = json.loads(sealed.cache_path(ws).read_text())
    assert cache["version"] == sealed.CACHE_VERSION and cache["results"] == json.loads(json.dumps(scored))
    for commit in (lab.base_commit, lab.best.commit):
        entry = scored[commit]
        assert isinstance(entry["test_bpb"], float) and 0 < entry["test_bpb"] < 10
        assert entry["sandboxed"] is True and entry["split"] == "test" and entry["eval_tokens"] > 0
        scored_run = next(t for t in trials if t.id == entry["trial"])
        assert scored_run.commit_sha == commit and scored_run.status == Status.KEEP
        # a run that won no comparison, where the commit has one (the kept candidate's run measured well by selection)
        if any(t.kind not in (Kind.CANDIDATE, Kind.RERUN) for t in kept_runs(trials, commit)):
            assert scored_run.kind not in (Kind.CANDIDATE, Kind.RERUN)
        assert "[autoresearch: scoring the checkpoint on the test split]" in (
            ws.lab_dir / sealed.SEALED_DIR / commit / "train.log").read_text()
    if lab.best.commit != lab.base_commit:
        assert scored[lab.best.commit]["test_bpb"] < scored[lab.base_commit]["test_bpb"]  # the gain holds on test
    assert sum("on the sealed test split" in line for line in said) == len(scored)
    assert folder_contents(ws.lab_dir / "trials") == trial_folders  # the scored checkpoints and their trials untouched

    # a second call scores nothing: no trial is run, the cache stays as it is
    from autoresearch.lab import trial

    monkeypatch.setattr(trial, "run_trial", lambda *a, **k: pytest.fail("a cached commit was scored again"))
    before = sealed.cache_path(ws).read_bytes()
    assert sealed.score(ws, log=said.append) == {}
    assert sealed.cache_path(ws).read_bytes() == before

    from autoresearch.report.data import load
    from autoresearch.report.sealed_results import sealed_results

    rows = sealed_results(load(ws))
    roles = [(sealed.Role.BASELINE, lab.base_commit)] + (
        [(sealed.Role.BEST, lab.best.commit)] if lab.best.commit != lab.base_commit else [])  # one row while the same
    assert [(r.role, r.commit, r.test_bpb) for r in rows] == [(role, c, scored[c]["test_bpb"]) for role, c in roles]
    assert all(r.note.startswith("scored ") for r in rows)


def test_a_commit_without_a_kept_checkpoint_is_noted_and_a_failed_scoring_is_recorded_and_tried_again(
        workspace_copy):
    """The best's checkpoints are gone: it cannot be scored, and the report says so. The baseline's are
    damaged: the scoring fails, its reason is cached without a number, and the next call tries again."""
    from autoresearch.report.data import load
    from autoresearch.report.sealed_results import sealed_results

    ws = Workspace.open(workspace_copy)
    trials, lab = ledger_trials(workspace_copy)
    the_kept_gain(trials)  # a best apart from the baseline
    for t in kept_runs(trials, lab.best.commit):
        (ws.trial_dir(t.id) / "checkpoint.pt").unlink()
    for t in kept_runs(trials, lab.base_commit):
        (ws.trial_dir(t.id) / "checkpoint.pt").write_bytes(b"not a checkpoint")

    scored = sealed.score(ws, log=lambda message: None)
    assert set(scored) == {lab.base_commit}
    failed = scored[lab.base_commit]
    assert "test_bpb" not in failed and failed["failure"] == Failure.SCORING and failed["error"]
    assert sealed.read_cache(ws) == json.loads(json.dumps(scored))

    rows = {r.role: r for r in sealed_results(load(ws))}
    assert rows[sealed.Role.BEST].test_bpb is None
    assert rows[sealed.Role.BEST].note.startswith("no kept checkpoint to score")
    runs = kept_runs(trials, lab.best.commit)
    fresh = [t for t in runs if t.kind not in (Kind.CANDIDATE, Kind.RERUN)]
    assert rows[sealed.Role.BEST].trial_id == (fresh or runs)[0].id  # the run it would have been scored from
    assert rows[sealed.Role.BASELINE].test_bpb is None
    assert rows[sealed.Role.BASELINE].note == f"scoring failed: {failed['error']}; `autoresearch report` tries again"
    assert [s.commit for s in sealed.unscored(ws, trials)] == [lab.base_commit]  # tried again next time


def test_nothing_is_scored_while_a_lab_holds_the_workspace(workspace_copy):
    ws = Workspace.open(workspace_copy)
    with ws.lock("run"):
        with pytest.raises(WorkspaceBusy, match="autoresearch run"):
            sealed.score(ws, log=lambda message: None)
    assert not sealed.cache_path(ws).exists()


def test_an_older_cache_is_read_and_one_of_another_version_is_not(workspace_copy):
    """The cache of the report that scored the test itself (version 1, the same keys) still reads."""
    ws = Workspace.open(workspace_copy)
    trials, lab = ledger_trials(workspace_copy)
    old = {"version": 1, "results": {lab.base_commit: {"test_bpb": 2.5, "trial": 1, "evaluated_at": 0.0, "seconds": 3.0,
                                                       "eval_tokens": 131072, "hardware": {}}}}
    sealed.cache_path(ws).write_text(json.dumps(old))
    assert sealed.read_cache(ws) == old["results"]
    assert [s.commit for s in sealed.unscored(ws, trials)] == [c for c in [lab.best.commit] if c != lab.base_commit]
    sealed.cache_path(ws).write_text(json.dumps({**old, "version": 2}))
    assert sealed.read_cache(ws) == {}
