"""The report: progress.png, report.html, the markdown summary and the sealed test evaluation, made
from a real small workspace (the real loop, the tiny real trainer, scripted edits).

The workspace is made once per session by the `research_workspace` fixture (conftest.py) and shared
with test_status.py and test_dashboard.py; tests that change it work on a copy (`workspace_copy`).
"""
from __future__ import annotations

import base64
import json
import re
import sqlite3
import subprocess
import sys
import threading
import time

import pytest

from autoresearch.lab.ledger import SCHEMA_VERSION, Ledger, LedgerVersionError
from lab_helpers import make_workspace
from report_helpers import ledger_trials, running_trial_with_progress, set_budget, start_trial, wait_for

def test_the_report_writes_a_plot_a_self_contained_page_and_a_summary(workspace_copy, tmp_path, capsys, monkeypatch):
    from autoresearch.report import report
    from autoresearch.report import testeval

    evaluated = []
    real = testeval.evaluate_commit
    monkeypatch.setattr(testeval, "evaluate_commit",
                        lambda ws, commit, checkpoint, **kw: evaluated.append(commit) or real(ws, commit, checkpoint, **kw))
    out = tmp_path / "out"
    assert report(workspace_copy, out) == 0
    printed = capsys.readouterr().out

    trials, sigma = ledger_trials(workspace_copy)
    base = [t.val_bpb for t in trials if t.kind == "baseline"]
    kept = next(t for t in trials if t.status == "keep" and t.kind == "candidate")
    base_mean = sum(base) / len(base)
    se = sigma * (1 / len(base) + 1 / 1) ** 0.5

    # the numbers, with the improvement's standard error from sigma and the run counts
    assert f"val_bpb **{base_mean:.6f}** over 2 run(s)" in printed
    assert f"σ = {sigma:.6f}" in printed
    assert f"**best** `{kept.short_sha}`: val_bpb **{kept.val_bpb:.6f}** over 1 run(s)" in printed
    assert f"**improvement**: {base_mean - kept.val_bpb:+.6f} bpb" in printed
    assert f"± {se:.6f} (1 SE = σ·√(1/2 + 1/1)" in printed
    assert "keep rate: 1/3 candidates (33%)" in printed
    assert "CPU-hours" in printed and "GPU-hours" not in printed
    assert re.search(r"pace: [\d.]+ trials per hour", printed)
    assert "hardware: " in printed and "(cpu)" in printed
    # kept changes ranked, with their diff; crashes grouped by reason
    assert f"1. **{kept.decision['delta']:+.6f}** bpb" in printed and "LR 0.003 -> 0.03" in printed
    assert "+LR = 0.03" in printed and "-LR = 0.003" in printed
    assert "- **exit** (1): trials 5" in printed and "ZeroDivisionError" in printed

    # the sealed test: both commits scored once, by the harness, with the numbers cached by commit
    assert sorted(evaluated) == sorted([trials[0].commit_sha, kept.commit_sha])
    cache = json.loads((workspace_copy / ".autoresearch" / "test-eval.json").read_text())["results"]
    assert set(cache) == {trials[0].commit_sha, kept.commit_sha}
    assert cache[trials[0].commit_sha]["trial"] == 1 and cache[kept.commit_sha]["trial"] == kept.id
    base_test, best_test = cache[trials[0].commit_sha]["test_bpb"], cache[kept.commit_sha]["test_bpb"]
    assert 0 < best_test < base_test  # a tenfold learning rate helps on the sealed split too
    assert f"sealed test, baseline `{trials[0].short_sha}`: **{base_test:.6f}**" in printed
    assert f"sealed test, best `{kept.short_sha}`: **{best_test:.6f}**" in printed

    # the files
    png = (out / "progress.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
    assert width >= 1200 and height >= 600
    page = (out / "report.html").read_text()
    assert "data:image/png;base64," + base64.b64encode(png).decode()[:200] in page  # the plot, inlined
    assert "<style>" in page and "<script" not in page and "<link" not in page
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page)  # nothing fetched from anywhere
    assert "LR 0.003 -&gt; 0.03" in page and "+LR = 0.03" in page and "ZeroDivisionError" in page
    assert f"{best_test:.6f}" in page
    assert (out / "report.md").read_text().startswith("# autoresearch report: test")

    # a second report reads the cache and evaluates nothing
    evaluated.clear()
    assert report(workspace_copy, out) == 0
    assert evaluated == []
    assert f"**{best_test:.6f}**" in capsys.readouterr().out


def test_the_report_goes_into_the_workspace_by_default(workspace_copy, capsys):
    from autoresearch.report import report

    assert report(workspace_copy, test_eval="never") == 0
    folder = workspace_copy / ".autoresearch" / "report"
    assert sorted(p.name for p in folder.iterdir()) == ["progress.png", "report.html", "report.md"]
    printed = capsys.readouterr().out
    assert f"report: {folder / 'report.html'}" in printed
    assert "not evaluated (--test-eval never)" in printed


def test_the_analysis_follows_the_labs_rules(research_workspace):
    from autoresearch.report.data import crash_group, load

    a = load(research_workspace)
    trials, sigma = ledger_trials(research_workspace)
    v = [t.val_bpb for t in trials]
    assert a.sigma == sigma and a.baseline_values == v[:2]
    # the running best: the mean of the best commit's kept runs, step by step
    assert a.running_best == {1: v[0], 2: pytest.approx((v[0] + v[1]) / 2), 3: v[2], 4: v[2], 5: v[2]}
    assert a.best_commit == trials[2].commit_sha and a.best_values == [v[2]]
    assert [k.trial.id for k in a.kept_changes] == [3]
    assert a.kept_changes[0].delta == pytest.approx(trials[2].decision["delta"])
    assert a.delta_of(trials[3]) == pytest.approx(trials[3].decision["delta"])  # the discarded one: negative
    assert a.keep_rate == pytest.approx(1 / 3)
    assert [(name, [t.id for t in group]) for name, group in a.crash_groups()] == [("exit", [5])]
    assert a.accelerator == "CPU" and a.compute_seconds > 5 * 2.0
    assert crash_group(trials[4].reason) == "exit"


@pytest.mark.parametrize("reason, group", [
    ("timeout: still running after the 4s limit (budget 2s + grace)", "timeout"),
    ("causality violation: logits before position 12 changed by 1.00e+00 (tolerance 1e-05)", "causality violation"),
    ("exit: train.py exited with code 1: ZeroDivisionError: division by zero", "exit"),
    ("OOM: train.py exited with code 1: torch.OutOfMemoryError: CUDA out of memory", "OOM"),
    ("tampering: the trial wrote into .autoresearch/ outside its own folder: x", "tampering"),
    ("rejected edit: only train.py may change, but helper.py did; the edit was undone", "rejected edit"),
    ("interrupted: the lab stopped during this trial", "interrupted"),
    ("evaluation: the evaluation process failed (exit 1): boom", "evaluation"),
    ("proposer error: HTTP 500", "proposer error"),
    ("over budget: trained 12.3s by the lab's clock, over the 10s budget (+5% tolerance); ...", "over budget"),
    ("over budget: warm-up took 200.0s between the first batch and run.training_started()", "over budget"),
    ("no data: train.py never drew a batch from the harness loader (run.train_loader)", "no data"),
    ("stray processes: left 2 process(es) running after it exited; they were killed", "stray processes"),
    ("", "no reason recorded"),
])
def test_crashes_are_grouped_by_the_first_words_of_their_reason(reason, group):
    from autoresearch.report.data import crash_group

    assert crash_group(reason) == group


# --- bad input ------------------------------------------------------------------------------------------
def test_a_workspace_without_trials_is_reported_as_such(tmp_path, cpu_prepared, capsys):
    from autoresearch.report import report

    ws = make_workspace(tmp_path / "empty", cpu_prepared)
    assert report(ws.root) == 1
    err = capsys.readouterr().err
    assert "has no trials yet" in err and "autoresearch run" in err
    assert not (ws.root / ".autoresearch" / "report").exists()


def test_a_folder_that_is_no_workspace_is_refused(tmp_path):
    from autoresearch.report import ReportError, report

    with pytest.raises(ReportError, match="not inside an autoresearch workspace"):
        report(tmp_path)


def test_a_ledger_from_a_newer_autoresearch_is_refused_clearly(workspace_copy):
    from autoresearch.report import LedgerTooNew, report

    db = sqlite3.connect(workspace_copy / ".autoresearch" / "ledger.db")
    db.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (json.dumps(SCHEMA_VERSION + 1),))
    db.commit()
    db.close()
    with pytest.raises(LedgerTooNew, match="newer autoresearch") as caught:
        report(workspace_copy)
    assert isinstance(caught.value, LedgerVersionError)  # the CLI already prints these as errors


def test_reading_waits_out_a_locked_ledger_then_gives_up_clearly(workspace_copy):
    from autoresearch.report.data import LedgerBusy, read_ledger

    path = workspace_copy / ".autoresearch" / "ledger.db"
    holder = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    holder.execute("PRAGMA locking_mode=EXCLUSIVE")  # the one way to lock readers out of a WAL database
    holder.execute("BEGIN EXCLUSIVE")
    holder.execute("UPDATE meta SET value = value WHERE key = 'schema_version'")
    holder.execute("COMMIT")
    started = time.monotonic()
    with pytest.raises(LedgerBusy, match="stayed locked for 0.5s"):
        read_ledger(path, retry_seconds=0.5)
    assert time.monotonic() - started < 5

    def release():
        time.sleep(0.6)
        holder.close()  # in WAL mode an exclusive locking mode ends only with the connection

    thread = threading.Thread(target=release)
    thread.start()
    assert len(read_ledger(path, retry_seconds=10).trials) == 5  # retried until the lock went
    thread.join()


REPORT_IN_A_PROCESS = """
import sys
from autoresearch.report import report
sys.exit(report(sys.argv[1], sys.argv[2], test_eval="never"))
"""


def test_a_report_neither_blocks_nor_breaks_a_writer_holding_a_transaction(workspace_copy, tmp_path):
    ledger = Ledger(workspace_copy / ".autoresearch" / "ledger.db")
    ledger.db.execute("BEGIN IMMEDIATE")
    ledger.db.execute("UPDATE trials SET description = 'renamed in flight' WHERE id = 4")
    before = (workspace_copy / ".autoresearch" / "ledger.db").read_bytes()
    proc = subprocess.run([sys.executable, "-c", REPORT_IN_A_PROCESS, str(workspace_copy), str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    page = (tmp_path / "out" / "report.html").read_text()
    assert "DIM 32 -&gt; 2" in page and "renamed in flight" not in page  # the committed state
    assert (workspace_copy / ".autoresearch" / "ledger.db").read_bytes() == before
    ledger.db.execute("COMMIT")  # the writer goes on as if nobody had read
    assert ledger.trial(4).description == "renamed in flight"
    ledger.close()
    assert ledger_trials(workspace_copy)[0][3].description == "renamed in flight"


def test_a_report_made_during_a_trial_leaves_the_trial_alone(workspace_copy, capsys):
    """The lab checks that nothing under .autoresearch/ changes during a trial; a report made then
    must not make the trial fail, and defers the sealed test (it would share the device)."""
    from autoresearch.report import report

    (workspace_copy / ".autoresearch" / "test-eval.json").unlink(missing_ok=True)
    set_budget(workspace_copy, 4.0)
    proc = start_trial(workspace_copy, "SEED = 0", "SEED = 1", "seed 0 -> 1")
    try:
        trial_id = wait_for(lambda: running_trial_with_progress(workspace_copy), what="a running trial")
        assert report(workspace_copy) == 0
        printed = capsys.readouterr().out
        assert f"deferred: trial {trial_id} is running" in printed
    finally:
        out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    trials, _ = ledger_trials(workspace_copy)
    assert trials[-1].id == trial_id and trials[-1].status in ("keep", "discard"), trials[-1].reason
    assert (workspace_copy / ".autoresearch" / "report" / "report.html").is_file()


def test_the_lab_lets_reports_be_written_during_a_trial_but_still_guards_the_test_cache(workspace_copy):
    """The contract with the lab: `.autoresearch/report/` is out of the lab's tampering check (the
    lab never reads it), the sealed-test cache is not (a trainer must not forge it)."""
    from autoresearch.report.data import find_workspace
    from autoresearch.lab.trial import _lab_snapshot

    ws = find_workspace(workspace_copy)
    own = ws.trial_dir(99)
    before = _lab_snapshot(ws, own)
    (ws.lab_dir / "report").mkdir(exist_ok=True)
    (ws.lab_dir / "report" / "report.html").write_text("<html></html>")
    assert _lab_snapshot(ws, own) == before
    (ws.lab_dir / "test-eval.json").write_text("{}")
    assert _lab_snapshot(ws, own) != before
