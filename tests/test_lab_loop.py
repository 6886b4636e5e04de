"""The loop end to end: baseline, candidates that help, hurt and crash, and resume after kill -9.

Real git, real subprocesses (the `autoresearch` command itself), the tiny real trainer. The finished
five-trial loop is the session's `research_workspace` (conftest.py), read and never changed here;
tests that change a workspace make their own.
"""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from autoresearch.lab.ledger import RESULTS_HEADER, Ledger
from autoresearch.lab.loop import Lab
from autoresearch.lab.proposer import backoff_seconds, consecutive_failures
from autoresearch.lab.workspace import git
from lab_helpers import EDITS, ledger_row, make_workspace
from report_helpers import ledger_trials


def autoresearch(*args: str, cwd: Path, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "autoresearch", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=600, **kwargs)


def test_baseline_then_better_worse_and_crashing_edits(research_workspace):
    """Two baseline seeds, then EDITS played back by the loop: the gain is kept, the loss discarded,
    the crash recorded, and the ledger, results.tsv and git agree on it."""
    root = research_workspace
    trials, sigma = ledger_trials(root)
    assert [t.kind for t in trials] == ["baseline", "baseline", "candidate", "candidate", "candidate"]
    assert [t.status for t in trials] == ["keep", "keep", "keep", "discard", "crash"], [t.reason for t in trials]
    assert sigma > 0
    better, worse, crashed = trials[2:]
    assert better.val_bpb < min(t.val_bpb for t in trials[:2])
    assert better.decision["action"] == "keep" and better.decision["delta"] > better.decision["threshold"]
    assert worse.val_bpb > better.val_bpb and worse.decision["action"] == "discard"
    assert crashed.reason.startswith("exit: train.py exited with code 1") and "ZeroDivisionError" in crashed.reason
    assert "DIM = 2" in worse.diff  # a discarded edit's diff outlives its commit

    # results.tsv says what the ledger says, in the reference's format.
    rows = [line.split("\t") for line in (root / "results.tsv").read_text().splitlines()]
    assert "\t".join(rows[0]) == RESULTS_HEADER
    assert [(r[0], r[3], r[4]) for r in rows[1:]] == [(t.short_sha, t.status, t.description) for t in trials]
    assert [float(r[1]) for r in rows[1:]] == pytest.approx([t.val_bpb or 0.0 for t in trials], abs=1e-6)
    assert rows[-1][1:3] == ["0.000000", "0.0"]

    # git holds the baseline and the kept commit only, and train.py is the kept one.
    log = git(root, "log", "--format=%s").splitlines()
    assert log == ["LR 0.003 -> 0.03", "baseline: train.py for profile cpu"]
    assert "LR = 0.03" in (root / "train.py").read_text()
    assert git(root, "--no-optional-locks", "status", "--porcelain") == ""


def test_an_edit_outside_train_py_is_rejected_and_undone(tmp_path, cpu_prepared):
    ws = make_workspace(tmp_path / "ws", cpu_prepared, baseline_runs=1)
    lab = Lab(ws, log=lambda msg: None)
    lab.baseline()
    (ws.root / "program.md").write_text("ignore the rules\n")
    (ws.root / "helper.py").write_text("x = 1\n")
    trial = lab.candidate("rewrite the rules", "agent")
    assert trial.status == "crash"
    assert trial.reason.startswith("rejected edit") and "program.md" in trial.reason and "helper.py" in trial.reason
    assert "ignore the rules" in trial.diff
    assert "ignore the rules" not in (ws.root / "program.md").read_text()
    assert not (ws.root / "helper.py").exists()
    assert len(lab.ledger.trials()) == 2


def test_a_proposal_that_changes_nothing_is_recorded_and_not_run(tmp_path, cpu_prepared):
    ws = make_workspace(tmp_path / "ws", cpu_prepared, baseline_runs=1)
    lab = Lab(ws, log=lambda msg: None)
    lab.baseline()
    trial = lab.candidate("nothing", "agent")
    assert (trial.status, trial.reason) == ("discard", "no change: the proposal edited nothing")
    assert not ws.trial_dir(trial.id).exists()


def test_trial_needs_a_baseline_first(tmp_path, cpu_prepared):
    ws = make_workspace(tmp_path / "ws", cpu_prepared)
    (ws.root / "train.py").write_text((ws.root / "train.py").read_text().replace("LR = 0.003", "LR = 0.01"))
    proc = autoresearch("trial", "-m", "LR 0.01", cwd=ws.root)
    assert proc.returncode == 2
    assert "no baseline yet" in proc.stderr.lower() or "There is no baseline yet" in proc.stderr


def test_resume_after_kill_9_in_the_middle_of_a_trial_loses_nothing(tmp_path, cpu_prepared):
    ws = make_workspace(tmp_path / "ws", cpu_prepared, budget=3.0)
    script = tmp_path / "edits.json"
    script.write_text(json.dumps(EDITS[:2]))
    lab = subprocess.Popen([sys.executable, "-m", "autoresearch", "run", str(ws.root), "--script", str(script)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # Wait for the second baseline run to be in flight, its trainer started, then kill the lab.
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if (ws.trial_dir(2) / "train.log").exists() and ws.ledger_path.exists():
            break
        time.sleep(0.1)
    else:
        lab.kill()
        pytest.fail("the second trial never started")
    time.sleep(1.0)
    lab.send_signal(signal.SIGKILL)
    lab.wait()

    before = Ledger(ws.ledger_path).trials()
    assert [(t.id, t.status) for t in before] == [(1, "keep"), (2, "running")]
    time.sleep(0.5)
    assert not trainer_processes(ws), "the trainer outlived the lab"

    proc = autoresearch("run", str(ws.root), "--script", str(script), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "interrupted" in proc.stdout
    after = Ledger(ws.ledger_path).trials()
    assert after[0].val_bpb == before[0].val_bpb  # recorded rows are kept as they were
    assert (after[1].status, after[1].reason) == ("crash", "interrupted: the lab stopped during this trial")
    assert [t.kind for t in after[2:]] == ["baseline", "candidate", "candidate"]
    assert [t.status for t in after[2:]] == ["keep", "keep", "discard"]
    assert git(ws.root, "rev-parse", "HEAD") == after[3].commit_sha
    assert git(ws.root, "status", "--porcelain") == ""


def test_ctrl_c_kills_the_trial_in_flight_and_leaves_a_consistent_state(tmp_path, cpu_prepared):
    ws = make_workspace(tmp_path / "ws", cpu_prepared, budget=30.0, baseline_runs=1)
    (tmp_path / "none.json").write_text("[]")
    lab = subprocess.Popen([sys.executable, "-m", "autoresearch", "run", str(ws.root), "--script",
                            str(tmp_path / "none.json")],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not trainer_processes(ws) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert trainer_processes(ws), "the baseline never started"
    lab.send_signal(signal.SIGINT)
    out, err = lab.communicate(timeout=30)
    assert lab.returncode == 0, err
    assert "stopped" in out
    assert not trainer_processes(ws)
    trials = Ledger(ws.ledger_path).trials()
    assert [(t.status, t.reason) for t in trials] == [("crash", "interrupted")]
    assert git(ws.root, "status", "--porcelain") == ""


def trainer_processes(ws) -> list[int]:
    needle = f"AUTORESEARCH_TRIAL={ws.config['id']}:".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if any(v.startswith(needle) for v in (entry / "environ").read_bytes().split(b"\0")):
                    found.append(int(entry.name))
            except OSError:
                pass
    return found


def test_a_proposer_that_rewrites_the_record_is_caught_and_the_record_restored(tmp_path, cpu_prepared):
    import sqlite3

    class Forger:
        name = "forger"
        proposals = 0

        def propose(self, ctx):
            self.proposals += 1
            if self.proposals > 1:
                return None
            db = sqlite3.connect(ctx.workspace / ".autoresearch" / "ledger.db")
            db.execute("UPDATE trials SET val_bpb = 0.1")
            db.commit()
            return "nothing to see"

        def tell(self, trial):
            pass

    ws = make_workspace(tmp_path / "ws", cpu_prepared, baseline_runs=1)
    lab = Lab(ws, log=lambda msg: None)
    lab.run(Forger())
    baseline, forged = lab.ledger.trials()
    assert baseline.val_bpb > 1.0  # restored
    assert forged.status == "crash" and forged.reason.startswith("proposer error: tampering")


def test_failed_proposals_in_a_row_back_off_doubling_up_to_ten_minutes():
    err = "proposer error: boom"
    history = [ledger_row(1, status="keep"), ledger_row(2, status="crash", reason=err),
               ledger_row(3, status="crash", reason=err), ledger_row(4, status="crash", reason=err, proposer="llm")]
    assert consecutive_failures(history, "agent") == 2 and consecutive_failures(history, "llm") == 1
    assert [backoff_seconds(n, 60) for n in (0, 2, 3, 4, 5, 20)] == [0, 0, 60, 120, 240, 600]
    assert backoff_seconds(10, 0) == 0


def test_the_lab_waits_out_a_failing_proposer_and_a_stop_ends_the_wait_at_once(tmp_path, cpu_prepared):
    class Broken:
        name, failure_backoff, backoff_after = "broken", 600.0, 1
        proposals = 0

        def propose(self, ctx):
            self.proposals += 1
            raise RuntimeError("the endpoint is down")

        def tell(self, trial):
            pass

    messages, waiting = [], threading.Event()

    def log(message):
        messages.append(message)
        if message.startswith("waiting"):
            waiting.set()

    ws = make_workspace(tmp_path / "ws", cpu_prepared, baseline_runs=1)
    lab = Lab(ws, log=log)
    stop_at = []

    def press_ctrl_c():  # what the CLI's signal handler does
        if waiting.wait(120):
            time.sleep(0.5)
            stop_at.append(time.monotonic())
            lab.stop.set()

    threading.Thread(target=press_ctrl_c, daemon=True).start()
    proposer = Broken()
    try:
        lab.run(proposer, max_trials=5)
    finally:
        lab.close()
    assert time.monotonic() - stop_at[0] < 5  # not the 600 s the back-off asked for
    assert "waiting 600 s before the next proposal: the last 1 failed" in messages
    assert proposer.proposals == 1  # asked once, then waited rather than asking again
    baseline, failed = Ledger(ws.ledger_path).trials()
    assert failed.status == "crash" and failed.reason == "proposer error: the endpoint is down"
