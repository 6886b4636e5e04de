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
from autoresearch.lab.outcomes import Failure, Kind, Status
from autoresearch.lab.proposer import Proposer, backoff_seconds, consecutive_failures
from autoresearch.lab.workspace import git
from lab_helpers import EDITS, TINY_TRAINER, ledger_row, make_repository, make_workspace, survivors, trainer_processes
from report_helpers import ledger_trials


def autoresearch(*args: str, cwd: Path, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "autoresearch", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=600, **kwargs)


def test_baseline_then_better_worse_and_crashing_edits(research_workspace):
    """Three baseline seeds, then EDITS played back by the loop: the gain is kept, the loss discarded,
    the crash recorded, and the ledger, results.tsv and git agree on it."""
    root = research_workspace
    trials, _ = ledger_trials(root)
    baseline = trials[:3]
    assert [t.kind for t in baseline] == [Kind.BASELINE] * 3 and len({t.seed for t in baseline}) == 3
    candidates = [t for t in trials if t.kind == Kind.CANDIDATE]
    assert [t.description for t in candidates] == [e["description"] for e in EDITS]
    better, worse, crashed = candidates
    assert [better.status, worse.status, crashed.status] == [Status.KEEP, Status.DISCARD, Status.CRASH]
    # A candidate's reruns share its decision; the runs of the best in between it won (drift) are kept as runs.
    for t in trials:
        if t.kind == Kind.RERUN:
            assert t.status == next(c.status for c in candidates if c.commit_sha == t.commit_sha)
        if t.kind == Kind.DRIFT:
            assert (t.status, t.commit_sha) == (Status.KEEP, better.commit_sha)
    assert better.val_bpb < min(t.val_bpb for t in baseline)
    assert better.decision["action"] == "keep" and better.decision["delta"] > better.decision["threshold"]
    assert worse.val_bpb > better.val_bpb and worse.decision["action"] == "discard"
    assert crashed.failure == Failure.EXIT and crashed.val_bpb is None
    assert crashed.reason.startswith("train.py exited with code 1") and "ZeroDivisionError" in crashed.reason
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


def test_an_edit_outside_train_py_is_rejected_and_exactly_it_undone(tmp_path, cpu_prepared):
    ws = make_workspace(tmp_path / "ws", cpu_prepared, baseline_runs=1)
    lab = Lab(ws, log=lambda msg: None)
    lab.baseline()
    (ws.root / "notes.md").write_text("the person's notes, there before the proposal\n")
    before = ws.snapshot()  # what the loop takes before it asks a proposer
    (ws.root / "program.md").write_text("ignore the rules\n")
    (ws.root / "helper.py").write_text("x = 1\n")
    (ws.root / "train.py").write_text((ws.root / "train.py").read_text().replace("LR = 0.003", "LR = 0.01"))
    trial = lab.candidate("rewrite the rules", "agent", before=before)
    assert (trial.status, trial.failure) == (Status.CRASH, Failure.REJECTED_EDIT)
    assert trial.reason.startswith("rejected edit") and "program.md" in trial.reason and "helper.py" in trial.reason
    assert "ignore the rules" in trial.diff
    assert "ignore the rules" not in (ws.root / "program.md").read_text()
    assert not (ws.root / "helper.py").exists()
    assert "LR = 0.003" in (ws.root / "train.py").read_text()  # back on the best
    assert (ws.root / "notes.md").read_text() == "the person's notes, there before the proposal\n"
    assert len(lab.ledger.trials()) == 2


def test_by_hand_the_lab_reads_train_py_alone_and_leaves_other_files_as_they_are(tmp_path, cpu_prepared):
    # `autoresearch trial` after an agent's edit: the lab cannot tell the agent's other edits from the person's.
    ws = make_workspace(tmp_path / "ws", cpu_prepared, baseline_runs=1)
    messages = []
    lab = Lab(ws, log=messages.append)
    lab.baseline()
    (ws.root / "notes.md").write_text("mine\n")
    trial = lab.candidate("nothing in train.py", "agent")
    assert (trial.status, trial.reason) == (Status.EMPTY, "no change: the proposal edited nothing")
    assert (ws.root / "notes.md").read_text() == "mine\n"
    assert any("notes.md" in m and "left as they are" in m for m in messages)


def test_a_proposal_that_changes_nothing_is_recorded_and_not_run(tmp_path, cpu_prepared):
    ws = make_workspace(tmp_path / "ws", cpu_prepared, baseline_runs=1)
    lab = Lab(ws, log=lambda msg: None)
    lab.baseline()
    trial = lab.candidate("nothing", "agent", before=ws.snapshot())
    assert (trial.status, trial.reason) == (Status.EMPTY, "no change: the proposal edited nothing")
    assert not ws.trial_dir(trial.id).exists()


def test_trial_needs_a_baseline_first(tmp_path, cpu_prepared):
    ws = make_workspace(tmp_path / "ws", cpu_prepared)
    (ws.root / "train.py").write_text((ws.root / "train.py").read_text().replace("LR = 0.003", "LR = 0.01"))
    proc = autoresearch("trial", "-m", "LR 0.01", cwd=ws.root)
    assert proc.returncode == 2
    assert "no baseline yet" in proc.stderr.lower() or "There is no baseline yet" in proc.stderr


def test_a_syntax_error_is_shown_once_with_its_line_and_the_trial_s_log(tmp_path, cpu_prepared):
    ws = make_workspace(tmp_path / "ws", cpu_prepared, baseline_runs=1)
    lab = Lab(ws, log=lambda msg: None)
    lab.baseline()
    lab.close()
    (ws.root / "train.py").write_text((ws.root / "train.py").read_text().replace("LR = 0.003", "LR = (0.003"))
    proc = autoresearch("trial", "-m", "a typo", cwd=ws.root)
    assert proc.returncode == 1
    assert proc.stdout.count("SyntaxError: '(' was never closed") == 1 and proc.stdout.count("LR = (0.003") == 1
    assert 'File "train.py", line ' in proc.stdout and "^" in proc.stdout
    assert f"the trial's log: {ws.trial_dir(2) / 'train.log'}" in proc.stdout
    trial = Ledger(ws.ledger_path).trials()[-1]
    assert (trial.status, trial.failure) == (Status.CRASH, Failure.SYNTAX)


def test_resume_after_kill_9_in_the_middle_of_a_trial_loses_nothing(tmp_path, cpu_prepared):
    ws = make_workspace(tmp_path / "ws", cpu_prepared, rule="strict")
    settings = ws.root / "autoresearch.toml"  # the second baseline run then runs in the standby the first made
    settings.write_text(settings.read_text().replace("[run]\n", "[run]\nstandby = true\n", 1))
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
    assert not survivors(ws), "the trainer outlived the lab"
    trials_dir = ws.root / ".autoresearch" / "trials"
    assert list(trials_dir.glob(".standby-*")), "the second run did not run in a standby"

    proc = autoresearch("run", str(ws.root), "--script", str(script), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "trial 2 was in flight when the lab stopped" in proc.stdout
    after = Ledger(ws.ledger_path).trials()
    assert after[0].val_bpb == before[0].val_bpb  # recorded rows are kept as they were
    assert (after[1].status, after[1].reason) == (Status.STOPPED, "stopped: the lab stopped during this trial")
    assert after[2].kind == Kind.BASELINE and after[2].status == Status.KEEP  # the stopped run, made again
    assert Status.RUNNING not in {t.status for t in after}
    candidates = [t for t in after if t.kind == Kind.CANDIDATE]
    assert [(t.description, t.status) for t in candidates] == [(EDITS[0]["description"], Status.KEEP),
                                                               (EDITS[1]["description"], Status.DISCARD)]
    assert git(ws.root, "rev-parse", "HEAD") == candidates[0].commit_sha
    assert git(ws.root, "status", "--porcelain") == ""
    assert not list(trials_dir.glob(".standby-*")) and not survivors(ws)  # the dead lab's standby cleared too


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
    assert [(t.status, t.reason) for t in trials] == [(Status.STOPPED, "stopped: the lab was told to stop during this trial")]
    assert git(ws.root, "status", "--porcelain") == ""


def test_a_proposer_that_rewrites_the_record_is_caught_and_the_record_restored(tmp_path, cpu_prepared):
    import sqlite3

    class Forger(Proposer):
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

    ws = make_workspace(tmp_path / "ws", cpu_prepared, baseline_runs=1)
    lab = Lab(ws, log=lambda msg: None)
    lab.run(Forger())
    baseline, forged = lab.ledger.trials()
    assert baseline.val_bpb > 1.0  # restored
    assert (forged.status, forged.failure) == (Status.CRASH, Failure.TAMPERING)
    assert forged.reason == "tampering: the ledger was written while the proposer ran; it was restored"


def test_failed_proposals_in_a_row_back_off_doubling_up_to_ten_minutes():
    failed = dict(status=Status.CRASH, failure=Failure.PROPOSER, reason="proposer error: boom")
    history = [ledger_row(1, status=Status.KEEP), ledger_row(2, **failed), ledger_row(3, **failed),
               ledger_row(4, **failed, proposer="llm"), ledger_row(5, status=Status.CRASH, failure=Failure.EXIT)]
    assert consecutive_failures(history, "agent") == 0  # its last proposal ran (and crashed as a trial)
    assert consecutive_failures(history[:4], "agent") == 2 and consecutive_failures(history, "llm") == 1
    assert [backoff_seconds(n, 60) for n in (0, 2, 3, 4, 5, 20)] == [0, 0, 60, 120, 240, 600]
    assert backoff_seconds(10, 0) == 0


def test_the_lab_waits_out_a_failing_proposer_and_a_stop_ends_the_wait_at_once(tmp_path, cpu_prepared):
    class Broken(Proposer):
        name, failure_backoff, backoff_after = "broken", 600.0, 1
        proposals = 0

        def propose(self, ctx):
            self.proposals += 1
            raise RuntimeError("the endpoint is down")

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
    assert (failed.status, failed.failure) == (Status.CRASH, Failure.PROPOSER)
    assert (failed.description, failed.reason) == ("proposal failed: RuntimeError", "proposer error: the endpoint is down")


def test_a_workspace_inside_a_repository_leaves_every_file_of_the_person_as_it_was(tmp_path, cpu_prepared):
    """A workspace made as a branch of a repository holding the person's own work, then a night in
    miniature: the baseline, a keep, a discard, a crash, a proposal that edits the settings, a Ctrl-C in
    the middle of a trial and the resume. Every file of the person's is byte-identical afterwards, and
    the settings they edited stay as they edited them."""
    from autoresearch.lab.decide import DecisionRule
    from autoresearch.lab.workspace import Workspace

    repo = make_repository(tmp_path / "repo", {".gitignore": "data/\n.venv/\n", "analysis.py": "print('mine')\n"})
    mine = {"notes.txt": b"untracked notes\n", "data/shard.bin": bytes(range(256)) * 4,
            ".venv/bin/python": b"#!/bin/sh\n", ".venv/lib/site.py": b"x = 1\n", "analysis.py": b"print('mine')\n"}
    for name, content in mine.items():
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        (repo / name).write_bytes(content)
    ws = Workspace.create(repo, tag="night", profile="cpu", data=cpu_prepared, trainer_source=TINY_TRAINER,
                          time_budget=2.0, rule=DecisionRule(name="strict", baseline_runs=1, drift_every=0))
    settings = (repo / "autoresearch.toml").read_text() + "\n# my own note, kept\n"
    (repo / "autoresearch.toml").write_text(settings)
    script = tmp_path / "edits.json"
    script.write_text(json.dumps([*EDITS, {"description": "loosen the rules",
                                           "files": {"autoresearch.toml": "[run]\nmax_trials = 1000\n"}}]))
    command = [sys.executable, "-m", "autoresearch", "run", str(repo), "--script", str(script)]

    lab = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not ((ws.trial_dir(2) / "train.log").exists() and trainer_processes(ws)) and time.monotonic() < deadline:
        time.sleep(0.1)
    lab.send_signal(signal.SIGINT)  # in the middle of the first candidate
    out, err = lab.communicate(timeout=60)
    assert lab.returncode == 0, err
    proc = autoresearch("run", str(repo), "--script", str(script), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "trial 2 is run again: it was stopped" in proc.stdout

    trials = Ledger(ws.ledger_path).trials()
    assert [(t.kind, t.status) for t in trials] == [
        (Kind.BASELINE, Status.KEEP), (Kind.CANDIDATE, Status.STOPPED), (Kind.CANDIDATE, Status.KEEP),
        (Kind.CANDIDATE, Status.DISCARD), (Kind.CANDIDATE, Status.CRASH), (Kind.CANDIDATE, Status.CRASH)]
    assert trials[-1].failure == Failure.REJECTED_EDIT and "autoresearch.toml" in trials[-1].reason
    for name, content in mine.items():
        assert (repo / name).read_bytes() == content, name
    assert (repo / "autoresearch.toml").read_text() == settings
    assert git(repo, "log", "--format=%s", "main") == "my work"
    assert git(repo, "log", "--format=%s").splitlines() == [EDITS[0]["description"], "baseline: train.py for profile cpu",
                                                            "my work"]
    assert git(repo, "status", "--porcelain", "--untracked-files=all").splitlines() == ["?? notes.txt"]
