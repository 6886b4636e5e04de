"""`autoresearch status`: the terminal view of a run, printed once (no TTY needed) or watched.

Uses the real small workspace of test_report.py (the real loop, the tiny trainer), and one more
real trial running in the background for the live numbers.
"""
from __future__ import annotations

import io
import json
import re
import signal
import sqlite3
import subprocess
import sys
import time

import pytest

from autoresearch.lab.ledger import SCHEMA_VERSION
from lab_helpers import make_workspace
from report_helpers import ledger_trials, running_trial_with_progress, set_budget, start_trial, wait_for


def status_text(root, **kwargs) -> tuple[int, str]:
    from autoresearch.report import status

    out = io.StringIO()
    code = status(root, stream=out, **kwargs)
    return code, out.getvalue()


def test_status_shows_the_best_the_noise_floor_and_the_last_trials(research_workspace):
    code, text = status_text(research_workspace)
    assert code == 0
    trials, sigma = ledger_trials(research_workspace)
    base = [t.val_bpb for t in trials[:2]]
    best = trials[2]
    assert re.search(rf"best {best.val_bpb:.6f}\s+{best.short_sha} over 1 run\(s\)", text)
    assert f"base {sum(base) / 2:.6f}" in text
    assert f"σ = {sigma:.6f} from 2 baseline seeds" in text
    assert "trials 5: 3 keep, 1 discard, 1 crash" in text and "keep rate 33% of 3 candidates" in text
    for t in trials:
        assert re.search(rf"^\s*{t.id}\s+{t.kind}\s+{t.short_sha}\s+{t.status}", text, re.M), t.id
    assert "[exit] exit: train.py exited with code 1" in text  # brackets printed, not taken for markup
    assert f"{trials[3].decision['delta']:+.6f}" in text
    assert "\x1b[" not in text  # no TTY, no escape codes


def test_last_limits_the_table(research_workspace):
    _, text = status_text(research_workspace, last=2)
    assert not re.search(r"^\s*3\s+candidate", text, re.M)
    assert re.search(r"^\s*4\s+candidate", text, re.M) and re.search(r"^\s*5\s+candidate", text, re.M)


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
    live = re.search(r"step (\d+) · ([\d.]+)% · loss (\d+\.\d{4}) · ([\d,]+) tok/s · MFU 0\.0% · epoch 0 · (\w+) of "
                     r"training left", text)
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
    proc = subprocess.Popen([sys.executable, "-c", STATUS_IN_A_PROCESS, str(research_workspace), "--watch"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(2.5)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert out.count("noise σ") >= 2  # printed again at each refresh when stdout is no terminal


def test_a_trial_left_running_by_a_dead_lab_is_called_so(workspace_copy):
    from autoresearch.lab.ledger import Ledger
    from autoresearch.report.build import trial_running
    from autoresearch.report.data import find_workspace

    ledger = Ledger(workspace_copy / ".autoresearch" / "ledger.db")
    trial_id = ledger.begin(kind="candidate", proposer="test", description="killed with the lab", commit_sha=None,
                            parent_sha=None, diff="", seed=None)
    ledger.update(trial_id, started_at=time.time() - 6 * 3600)
    ledger.close()
    _, text = status_text(workspace_copy)
    assert f"now  trial {trial_id}" in text and "the lab stopped during it" in text
    assert not trial_running(find_workspace(workspace_copy))  # a report need not wait for it
