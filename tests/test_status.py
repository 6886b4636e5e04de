"""`autoresearch status`: the terminal view of a run, printed once (no TTY needed) or watched.

Uses the real small workspace of test_report.py (the real loop, the tiny trainer), and one more
real trial running in the background for the live numbers. Expectations come from the ledger and
the lab's own functions (report_helpers.ledger_trials), never from fixed trial ids.
"""
from __future__ import annotations

import io
import json
import re
import signal
import sqlite3
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter

import pytest

from autoresearch.lab.decide import VALUE_KINDS
from autoresearch.lab.ledger import SCHEMA_VERSION
from autoresearch.lab.outcomes import Failure, Kind, Status
from lab_helpers import make_workspace
from report_helpers import (add_trial, ledger_trials, running_trial_with_progress, set_budget, start_trial,
                            two_slot_run, wait_for)


def status_text(root, **kwargs) -> tuple[int, str]:
    from autoresearch.report import status

    out = io.StringIO()
    code = status(root, stream=out, **kwargs)
    return code, out.getvalue()


def test_status_shows_the_best_the_noise_and_the_last_trials(research_workspace):
    code, text = status_text(research_workspace)
    assert code == 0
    trials, lab = ledger_trials(research_workspace)
    best, noise = lab.best, lab.noise
    base = [t.val_bpb for t in trials if t.commit_sha == lab.base_commit and t.kind in VALUE_KINDS
            and t.status == Status.KEEP]
    assert re.search(rf"best {best.mean:.6f}\s+{best.commit[:7]} over {len(best.values)} run\(s\)", text)
    assert f"base {statistics.fmean(base):.6f}  over {len(base)} run(s)" in text
    assert f"noise σ = {noise.sigma:.6f} with {noise.df} df, pooled over every commit run more than once" in text
    assert f"gains under {lab.detectable_gain:.4g} are invisible here: lengthen the budget or allow more runs" in text
    count = Counter(t.status for t in trials)
    counted = [t for t in trials if t.kind == Kind.CANDIDATE and t.status in (Status.KEEP, Status.DISCARD, Status.CRASH)]
    assert (f"trials {len(trials)}: {count[Status.KEEP]} keep, {count[Status.DISCARD]} discard, "
            f"{count[Status.CRASH]} crash") in text
    kept = sum(t.status == Status.KEEP for t in counted)
    assert f"keep rate {100 * kept / len(counted):.0f}% of {len(counted)} candidates" in text
    for t in trials:
        assert re.search(rf"^\s*{t.id}\s+{t.kind}\s+{t.short_sha}\s+{t.status}", text, re.M), t.id
    (crash,) = [t for t in trials if t.status == Status.CRASH]
    assert f"[exit] {crash.reason[:40]}" in text  # brackets printed, not taken for markup
    for t in trials:
        if t.kind == Kind.CANDIDATE and t.status == Status.DISCARD:
            assert f"{t.decision['delta']:+.6f}" in text
    assert "\x1b[" not in text  # no TTY, no escape codes


def test_trials_that_ended_without_a_decision_are_shown_as_what_they_are(workspace_copy):
    """A crash is counted under its failure; a stopped or lost trial (run again) and an empty proposal
    are no crashes and no candidates of the keep rate, and are listed with why they ended."""
    trials, _ = ledger_trials(workspace_copy)
    oom = add_trial(workspace_copy, Status.CRASH, failure=Failure.OOM, description="wider model",
                    reason="CUDA out of memory while allocating 2.0 GiB")
    stopped = add_trial(workspace_copy, Status.STOPPED, description="deeper model",
                        reason="stopped: the lab was told to stop during this trial")
    lost = add_trial(workspace_copy, Status.LOST, description="longer warm-down", reason="its worker went away")
    empty = add_trial(workspace_copy, Status.EMPTY, description="nothing at all",
                      reason="no change: the proposal edited nothing")
    _, text = status_text(workspace_copy)
    count = Counter(t.status for t in trials)
    counted = 1 + sum(t.kind == Kind.CANDIDATE and t.status in (Status.KEEP, Status.DISCARD, Status.CRASH)
                      for t in trials)
    kept = sum(t.kind == Kind.CANDIDATE and t.status == Status.KEEP for t in trials)
    assert (f"trials {len(trials) + 4}: {count[Status.KEEP]} keep, {count[Status.DISCARD]} discard, "
            f"{count[Status.CRASH] + 1} crash, 1 stopped, 1 lost, 1 empty") in text
    assert f"keep rate {100 * kept / counted:.0f}% of {counted} candidates" in text
    assert "[oom] CUDA out of memory while allocating 2.0 GiB" in text
    for trial_id, status in ((oom, "crash"), (stopped, "stopped"), (lost, "lost"), (empty, "empty")):
        assert re.search(rf"^\s*{trial_id}\s+candidate\s+0000000\s+{status}\s", text, re.M), status
    assert "stopped: the lab was told to stop during this trial" in text and "its worker went away" in text
    assert "no change: the proposal edited nothing" in text


def test_last_limits_the_table(research_workspace):
    trials, _ = ledger_trials(research_workspace)
    _, text = status_text(research_workspace, last=2)
    assert not re.search(rf"^\s*{trials[-3].id}\s+{trials[-3].kind}", text, re.M)
    for t in trials[-2:]:
        assert re.search(rf"^\s*{t.id}\s+{t.kind}", text, re.M)


def test_status_of_a_workspace_without_trials_says_so_and_succeeds(tmp_path, cpu_prepared):
    ws = make_workspace(tmp_path / "empty", cpu_prepared)
    code, text = status_text(ws.root)
    assert code == 0
    assert "No trials yet" in text and "autoresearch run" in text


def test_status_refuses_a_ledger_from_a_newer_autoresearch(workspace_copy):
    from autoresearch.report import LedgerTooNew

    db = sqlite3.connect(workspace_copy / ".autoresearch" / "ledger.db")
    db.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (json.dumps(SCHEMA_VERSION + 1),))
    db.commit()
    db.close()
    with pytest.raises(LedgerTooNew, match=rf"ledger schema {SCHEMA_VERSION + 1}"):
        status_text(workspace_copy)


def test_status_shows_the_running_trial_live_from_its_log(workspace_copy):
    set_budget(workspace_copy, 4.0)
    proc = start_trial(workspace_copy, "SEED = 0", "SEED = 1", "seed 0 -> 1")
    try:
        trial_id = wait_for(lambda: running_trial_with_progress(workspace_copy), what="a running trial")
        code, text = status_text(workspace_copy)
    finally:
        out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert code == 0
    assert f"now  trial {trial_id} [candidate] seed 0 -> 1" in text
    live = re.search(r"step (\d+) · ([\d.]+)% · loss (\d+\.\d{4}) · ([\d,]+) tok/s · MFU n/a · epoch 0 · (\w+) of "
                     r"training left", text)  # MFU: a CPU has none (the trainer prints 0.0)
    assert live, text
    assert int(live.group(1)) > 0 and 0 <= float(live.group(2)) <= 100
    assert re.search(rf"^\s*{trial_id}\s+candidate\s+\w+\s+running", text, re.M)
    # and once it is over, no trial is current
    _, after = status_text(workspace_copy)
    assert "now  trial" not in after


STATUS_IN_A_PROCESS = """
import sys
from autoresearch.report import status
sys.exit(status(sys.argv[1], watch=len(sys.argv) > 2, interval=0.5))
"""


def test_status_works_without_a_terminal(research_workspace):
    proc = subprocess.run([sys.executable, "-c", STATUS_IN_A_PROCESS, str(research_workspace)],
                          capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr
    assert "noise σ" in proc.stdout and "divide by zero" in proc.stdout


def test_watch_redraws_until_interrupted(research_workspace):
    # SIGINT as a terminal delivers it: a test run started in the background would hand it down ignored
    proc = subprocess.Popen([sys.executable, "-c", STATUS_IN_A_PROCESS, str(research_workspace), "--watch"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    watchdog = threading.Timer(60, proc.kill)  # a watch that never draws fails the test, not the whole run
    watchdog.start()
    seen = []
    for line in proc.stdout:  # interrupt only once it has redrawn: a fixed sleep races a loaded machine
        seen.append(line)
        if sum("noise σ" in s for s in seen) >= 2:
            break
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    watchdog.cancel()
    assert proc.returncode == 0, err
    assert "".join(seen).count("noise σ") >= 2  # printed again at each refresh when stdout is no terminal


def test_a_trial_left_running_by_a_dead_lab_is_called_so(workspace_copy):
    from autoresearch.lab.ledger import Ledger
    from autoresearch.report.data import find_workspace

    ledger = Ledger(workspace_copy / ".autoresearch" / "ledger.db")
    trial_id = ledger.begin(kind="candidate", proposer="test", description="killed with the lab", commit_sha=None,
                            parent_sha=None, diff="", seed=None)
    ledger.update(trial_id, started_at=time.time() - 6 * 3600)
    ledger.close()
    _, text = status_text(workspace_copy)
    assert f"now  trial {trial_id}" in text and "the lab stopped during it" in text
    assert find_workspace(workspace_copy).holder() is None  # the dead lab holds nothing: a report need not wait


def test_an_unsandboxed_trial_is_called_so_in_the_view_and_the_report(workspace_copy):
    from autoresearch.report.data import load
    from autoresearch.report.html import render_html
    from autoresearch.report.summary import markdown

    add_trial(workspace_copy, Status.DISCARD, description="run by hand", val_bpb=2.5, sandboxed=False)
    code, text = status_text(workspace_copy)
    a = load(workspace_copy)
    assert code == 0 and "WARNING: 1 of" in text and "ran unsandboxed" in text and "unsandboxed: its train.py could read" in text
    assert "**WARNING**: 1 of" in markdown(a, [])
    page = render_html(a, [], None)
    assert 'class="warning"' in page and "[unsandboxed: its train.py could read" in page.replace("&#x27;", "'")


# --- trial slots -----------------------------------------------------------------------------------------
def slotted_workspace(tmp_path, data, *, lost: bool = False):
    """A fresh workspace whose ledger holds report_helpers.two_slot_run, begun an hour ago."""
    ws = make_workspace(tmp_path / "slotted", data)
    return ws.root, two_slot_run(ws.root, time.time() - 3600, lost=lost)


def test_status_lists_every_slot_with_what_it_runs_and_how_far(tmp_path, cpu_prepared):
    """Two GPU slots: one runs a trial (shown with its slot's device, its time and its progress from its
    train.log), the other is idle; each with the share of the run it was busy."""
    root, ids = slotted_workspace(tmp_path, cpu_prepared)
    code, text = status_text(root)
    assert code == 0
    assert re.search(r"slots 2 · busy (7[45])% of the run's 1h00m · 2\.00 GPU-h", text), text
    assert re.search(rf"slot 0  GPU 0 \(NVIDIA H100 80GB HBM3\)  running trial {ids['running']}: deeper model, "
                     r"10m0\ds, step 340 \(45%\)  · busy 100%, 2 finished$", text, re.M), text
    assert re.search(r"slot 1  GPUs 0, 1 \(2x NVIDIA H100 80GB HBM3\) on node-b  idle  · busy 50%, 1 finished$",
                     text, re.M), text
    # the trial in flight says which slot it is in, with its full progress line as before
    assert f"now  trial {ids['running']} [candidate] deeper model" in text and "in slot 0" in text
    assert "step 340 · 45.0% · loss 3.0000 · 150,000 tok/s · MFU 38.5% · epoch 0 · 2m45s of training left" in text


def test_a_lost_slot_says_so_and_why(tmp_path, cpu_prepared):
    root, ids = slotted_workspace(tmp_path, cpu_prepared, lost=True)
    _, text = status_text(root)
    assert re.search(r"slot 1  GPUs 0, 1 \(2x NVIDIA H100 80GB HBM3\) on node-b  lost: its machine \(node-b\) went "
                     r"away  · busy 50%", text), text
    assert re.search(rf"^\s*{ids['other']}\s+candidate\s+0000000\s+lost\s", text, re.M)  # its trial: run again
    assert "its machine went away during the trial" in text


def test_a_run_of_one_slot_shows_no_slot_list(research_workspace):
    """One slot at work, recorded (this workspace's run) or not (an older ledger): the trial in flight
    says it all, as before there were slots."""
    from autoresearch.report.data import load

    a = load(research_workspace)
    assert len(a.slots) == 1 and not a.slots_worth_showing
    _, text = status_text(research_workspace)
    assert "slot 0" not in text and not re.search(r"^slots ", text, re.M)
