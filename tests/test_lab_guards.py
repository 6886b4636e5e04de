"""A trial cannot be fooled: each misbehaving trainer is caught, named, and loses nothing else.

Each test runs one real trial (real git, real subprocesses) of a variant of the tiny trainer.
"""
from __future__ import annotations

import time
from importlib import resources
from pathlib import Path

import pytest

from autoresearch.lab.trial import run_trial
from lab_helpers import TINY_TRAINER, alive, make_workspace, variant


def trial(tmp_path, data, trainer, **config):
    ws = make_workspace(tmp_path / "ws", data, trainer, **config)
    outcome = run_trial(ws, 1, None, lambda: "ledger unchanged")
    return ws, outcome


def test_an_honest_trainer_is_measured_by_the_harness(tmp_path, cpu_prepared):
    ws, outcome = trial(tmp_path, cpu_prepared, TINY_TRAINER)
    assert outcome.reason == ""
    assert 1.0 < outcome.val_bpb < 4.0
    assert outcome.summary["val_bpb"] == pytest.approx(outcome.val_bpb, abs=1e-5)  # same rows, same metric
    assert 2.0 <= outcome.training_seconds < 2.0 * 1.05 + 0.5
    assert (ws.trial_dir(1) / "checkpoint.pt").is_file()


def test_a_printed_val_bpb_is_ignored(tmp_path, cpu_prepared):
    liar = variant(('print(f"val_bpb:          {val_bpb:.6f}")', 'print("val_bpb:          0.100000")'))
    _, outcome = trial(tmp_path, cpu_prepared, liar)
    assert outcome.summary["val_bpb"] == 0.1
    assert outcome.val_bpb > 1.0


def test_a_model_that_reads_the_next_token_is_a_causality_violation(tmp_path, cpu_prepared):
    # Position t gets the embedding of token t+1: the very token it is meant to predict.
    peeker = variant(("features = self.embed(idx)  # FEATURES",
                      "features = self.embed(torch.cat([idx[:, 1:], idx[:, -1:]], dim=1))"))
    _, outcome = trial(tmp_path, cpu_prepared, peeker)
    assert outcome.val_bpb is None
    assert outcome.reason.startswith("causality violation")


def test_a_trainer_that_sleeps_past_the_limit_is_killed(tmp_path, cpu_prepared):
    sleeper = variant(("    training_seconds = time.time() - started", "    time.sleep(600)"))
    started = time.monotonic()
    _, outcome = trial(tmp_path, cpu_prepared, sleeper, grace_seconds=4.0)
    assert time.monotonic() - started < 30
    assert outcome.reason.startswith("timeout")


def test_training_past_the_budget_is_caught_by_the_labs_clock(tmp_path, cpu_prepared):
    # Trains 1.5x the budget but reports the budget, as a cheat would.
    greedy = variant(("while time.time() - started < run.time_budget:  # BUDGET",
                      "while time.time() - started < 1.5 * run.time_budget:"),
                     ('print(f"training_seconds: {training_seconds:.1f}")',
                      'print(f"training_seconds: {run.time_budget:.1f}")'))
    _, outcome = trial(tmp_path, cpu_prepared, greedy, budget=4.0)
    assert outcome.summary["training_seconds"] == 4.0
    assert outcome.val_bpb is None
    assert "by the lab's clock" in outcome.reason
    assert outcome.training_seconds >= 5.5


def test_training_before_the_clock_starts_is_caught(tmp_path, cpu_prepared):
    # A long "warm-up" that trains before telling the harness that training started.
    early = variant(("    run.training_started()\n",
                     "    _t = time.time()\n    while time.time() - _t < 4:\n"
                     "        model(inputs).sum().backward()\n    run.training_started()\n"))
    _, outcome = trial(tmp_path, cpu_prepared, early, warmup_cap_seconds=2.0)
    assert outcome.reason.startswith("over budget: warm-up took")


def test_a_child_process_left_running_is_killed_and_reported(tmp_path, cpu_prepared):
    spawner = variant(("    run.save_checkpoint(model, config)\n",
                       "    run.save_checkpoint(model, config)\n    import os, subprocess\n"
                       "    child = subprocess.Popen(['sleep', '300'], start_new_session=True)\n"
                       "    open(os.path.join(os.environ['AUTORESEARCH_OUTPUT'], 'child.pid'), 'w').write(str(child.pid))\n"))
    ws, outcome = trial(tmp_path, cpu_prepared, spawner)
    assert outcome.reason == "stray processes: left 1 process(es) running after it exited; they were killed"
    pid = int((ws.trial_dir(1) / "child.pid").read_text())
    time.sleep(0.2)
    assert not alive(pid)


def test_writing_into_the_lab_folder_is_tampering(tmp_path, cpu_prepared):
    writer = variant(("    run.save_checkpoint(model, config)\n",
                      "    run.save_checkpoint(model, config)\n"
                      "    open('.autoresearch/config.json', 'a').write(' ')\n"))
    _, outcome = trial(tmp_path, cpu_prepared, writer)
    assert outcome.val_bpb is None
    assert outcome.reason.startswith("tampering") and "config.json" in outcome.reason


def test_writing_into_the_ledger_is_tampering(tmp_path, cpu_prepared):
    # The lab passes a view of the ledger's rows; here, a file the trainer rewrites stands for it.
    writer = variant(("    run.save_checkpoint(model, config)\n",
                      "    run.save_checkpoint(model, config)\n    open('ledger.txt', 'w').write('forged')\n"))
    ws = make_workspace(tmp_path / "ws", cpu_prepared, writer)
    content = lambda: (ws.root / "ledger.txt").read_text() if (ws.root / "ledger.txt").exists() else ""  # noqa: E731
    outcome = run_trial(ws, 1, None, content)
    assert outcome.reason == "tampering: the ledger in .autoresearch/ was written during the trial"


def test_editing_the_installed_harness_is_tampering(tmp_path, cpu_prepared):
    target = Path(str(resources.files("autoresearch") / "harness" / "errors.py"))
    original = target.read_bytes()
    tamperer = variant(("    run.save_checkpoint(model, config)\n",
                        f"    run.save_checkpoint(model, config)\n    open({str(target)!r}, 'a').write('# x')\n"))
    try:
        _, outcome = trial(tmp_path, cpu_prepared, tamperer)
    finally:
        target.write_bytes(original)
    assert outcome.val_bpb is None
    assert outcome.reason.startswith("tampering: the harness or its data changed during the run")


def test_a_crash_is_reported_with_its_last_line(tmp_path, cpu_prepared):
    crasher = variant(("    run.training_started()\n", "    run.training_started()\n    raise RuntimeError('boom')\n"))
    _, outcome = trial(tmp_path, cpu_prepared, crasher)
    assert outcome.reason.startswith("exit: train.py exited with code 1")
    assert "RuntimeError: boom" in outcome.reason
    assert "RuntimeError: boom" in outcome.log_tail


def test_secrets_are_not_passed_to_the_trainer(tmp_path, cpu_prepared, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-secret")
    monkeypatch.setenv("HF_TOKEN", "hf-secret")
    snoop = variant(("    run.training_started()\n",
                     "    run.training_started()\n    import os\n"
                     "    print('SECRETS', [k for k in os.environ if k in ('OPENAI_API_KEY', 'HF_TOKEN')])\n"))
    ws, outcome = trial(tmp_path, cpu_prepared, snoop)
    assert "SECRETS []" in (ws.trial_dir(1) / "train.log").read_text()


def test_a_forged_ledger_row_is_caught_and_the_record_restored(tmp_path, cpu_prepared):
    from autoresearch.lab.loop import Lab

    forger = variant(("    run.save_checkpoint(model, config)\n",
                      "    run.save_checkpoint(model, config)\n    import sqlite3\n"
                      "    db = sqlite3.connect('.autoresearch/ledger.db')\n"
                      "    db.execute(\"UPDATE trials SET val_bpb = 0.5, status = 'keep'\")\n    db.commit()\n"))
    ws = make_workspace(tmp_path / "ws", cpu_prepared, forger, baseline_runs=1)
    lab = Lab(ws, log=lambda msg: None)
    with pytest.raises(Exception, match="tampering: the ledger"):
        lab.baseline()  # the baseline itself forges: the lab refuses to go on
    (trial,) = lab.ledger.trials()
    assert (trial.status, trial.val_bpb) == ("crash", None)
    assert trial.reason == "tampering: the ledger in .autoresearch/ was written during the trial"


def test_nothing_a_trainer_leaves_in_the_workspace_reaches_the_next_trial(tmp_path, cpu_prepared):
    # Weights stashed in an ignored folder, to be picked up by the next trial, are removed.
    stasher = variant(("    run.save_checkpoint(model, config)\n",
                       "    run.save_checkpoint(model, config)\n    import os\n    os.makedirs('__pycache__', exist_ok=True)\n"
                       "    torch.save(model.state_dict(), '__pycache__/weights.pt')\n"))
    ws, outcome = trial(tmp_path, cpu_prepared, stasher)
    assert outcome.reason == ""
    assert not (ws.root / "__pycache__").exists()
