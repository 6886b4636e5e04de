"""Several trials at once: trial slots, a worktree each, and what happens when the best moves under
a candidate.

Real git worktrees, real sandboxed trials of the tiny trainer on two CPU slots (one thread each on
a 2-core machine), the `autoresearch` command itself for kill -9 and for the limits. The strict
rule keeps any gain, so that what is tested is the scheduling, not the noise rule.
"""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from autoresearch.lab.executor import ExecutorError, Slot
from autoresearch.lab.ledger import Ledger
from autoresearch.lab.loop import Lab, slots_for
from autoresearch.lab.outcomes import Failure, Kind, Status
from autoresearch.lab.workspace import git
from autoresearch.proposers.scripted import ScriptedProposer
from lab_helpers import make_workspace, survivors, trainer_processes, variant

# Two knobs on two lines that each raise the learning rate tenfold: each alone is a clear gain, so
# both candidates beat the baseline they were built on, and the one decided second is superseded.
TWO_KNOBS = variant(("LR = 0.003  # Adam learning rate\n",
                     "LR = 0.003  # Adam learning rate\nLR_SCALE = 1.0  # multiplies LR\n"),
                    ("lr=LR", "lr=LR * LR_SCALE"))
LR_UP = {"description": "LR 0.003 -> 0.03", "replace": [["LR = 0.003", "LR = 0.03"]]}
SCALE_UP = {"description": "LR_SCALE 1.0 -> 10.0", "replace": [["LR_SCALE = 1.0", "LR_SCALE = 10.0"]]}
LR_UP_LESS = {"description": "LR 0.003 -> 0.02", "replace": [["LR = 0.003", "LR = 0.02"]]}


def two_slot_lab(ws) -> Lab:
    return Lab(ws, log=lambda msg: None, slots=slots_for(2))


def kept_subjects(ws) -> list[str]:
    """The branch's commits above the baseline, oldest first, by subject."""
    return git(ws.root, "log", "--reverse", "--format=%s", f"{ws.config['base_commit']}..HEAD").splitlines()


def assert_branch_on_the_best(lab: Lab) -> None:
    ws, best = lab.ws, lab.best()
    kept = [t for t in lab.ledger.trials() if t.kind == Kind.CANDIDATE and t.status == Status.KEEP]
    assert git(ws.root, "rev-parse", "HEAD") == best.commit
    assert kept_subjects(ws) == [t.description for t in kept]
    assert (ws.root / "train.py").read_text() == ws.show(best.commit, "train.py")
    assert git(ws.root, "status", "--porcelain") == ""


def test_cpu_slots_share_the_threads_and_too_many_are_refused():
    slots = slots_for(2)
    assert len(slots) == 2 and {s.device for s in slots} == {"cpu"}
    assert slots[0].threads == slots[1].threads >= 1
    assert slots_for(1)[0].threads is None  # one slot: every thread, as without --parallel
    with pytest.raises(ExecutorError, match=r"no GPU and \d+ CPU thread\(s\)"):
        slots_for(10_000)


def test_two_candidates_at_once_the_one_decided_second_is_reapplied_onto_the_new_best(tmp_path, cpu_prepared):
    ws = make_workspace(tmp_path / "ws", cpu_prepared, TWO_KNOBS, budget=2.0, baseline_runs=1, rule="strict")
    lab = two_slot_lab(ws)
    lab.run(ScriptedProposer([LR_UP, SCALE_UP]))
    trials = lab.ledger.trials()
    assert Status.RUNNING not in {t.status for t in trials}
    first, second = [t for t in trials if t.kind == Kind.CANDIDATE][:2]
    assert second.started_at < first.ended_at  # they ran at the same time, on different slots
    assert {first.hardware["threads"], second.hardware["threads"]} == {slots_for(2)[0].threads}

    superseded = [t for t in trials if t.status == Status.SUPERSEDED]
    assert len(superseded) == 1, [(t.id, t.description, t.status, t.decision.get("why")) for t in trials]
    loser = superseded[0]
    winner = next(t for t in (first, second) if t.id != loser.id)
    assert winner.status == Status.KEEP and loser.parent_sha == winner.parent_sha == ws.config["base_commit"]
    assert "was kept meanwhile" in loser.decision["why"] and loser.decision["values"]
    reapplied = [t for t in trials if t.kind == Kind.CANDIDATE and t.decision.get("reapplied_from") == loser.id]
    assert len(reapplied) == 1
    again = reapplied[0]
    assert again.description == loser.description and again.parent_sha == winner.commit_sha
    assert again.status in (Status.KEEP, Status.DISCARD, Status.CRASH)
    changed = lambda diff: sorted(line for line in diff.splitlines() if line[:1] in "+-" and line[:3] not in ("+++", "---"))  # noqa: E731
    assert changed(again.diff) == changed(loser.diff)  # the same edit, onto the new best
    assert_branch_on_the_best(lab)
    best = lab.ws.show(lab.best().commit, "train.py")
    assert "LR = 0.03" in best if winner.description == LR_UP["description"] else "LR_SCALE = 10.0" in best
    if again.status == Status.KEEP:  # the final best holds both kept changes, measured together
        assert "LR = 0.03" in best and "LR_SCALE = 10.0" in best and lab.best().commit == again.commit_sha
    lab.close()


def test_an_edit_that_no_longer_applies_onto_the_new_best_is_not_kept(tmp_path, cpu_prepared):
    ws = make_workspace(tmp_path / "ws", cpu_prepared, budget=2.0, baseline_runs=1, rule="strict")
    lab = two_slot_lab(ws)
    lab.run(ScriptedProposer([LR_UP, LR_UP_LESS]))  # both rewrite the same line
    candidates = [t for t in lab.ledger.trials() if t.kind == Kind.CANDIDATE]
    assert len(candidates) == 2, [(t.description, t.status) for t in candidates]  # nothing was re-applied
    kept, other = sorted(candidates, key=lambda t: t.status != Status.KEEP)
    assert kept.status == Status.KEEP and other.status == Status.DISCARD
    assert "no longer applies" in other.decision["why"] and other.decision["values"]
    assert_branch_on_the_best(lab)
    lab.close()


def test_on_mixed_devices_each_candidate_is_judged_only_against_the_best_measured_on_its_own_class(
        tmp_path, cpu_prepared):
    ws = make_workspace(tmp_path / "ws", cpu_prepared, budget=1.5, baseline_runs=1, rule="strict")
    slots = [Slot("cpu", threads=1), Slot("cpu", threads=2)]  # two classes of device: 1 and 2 threads
    assert slots[0].device_class != slots[1].device_class
    lab = Lab(ws, log=lambda msg: None, slots=slots)
    lab.run(ScriptedProposer([LR_UP, LR_UP_LESS, {"description": "DIM 32 -> 16", "replace": [["DIM = 32", "DIM = 16"]]}]))
    trials = lab.ledger.trials()
    classes = {slot.device_class for slot in slots}
    base = ws.config["base_commit"]
    measured = {c for c in classes if any(t.commit_sha == base and t.val_bpb and t.device_class == c for t in trials)}
    assert measured == classes  # the best was measured on each class before a candidate there was judged
    judged = [t for t in trials if t.kind == Kind.CANDIDATE and t.decision.get("best_values")]
    assert judged
    for t in judged:
        own = [u.val_bpb for u in trials if u.commit_sha == t.parent_sha and u.device_class == t.device_class
               and u.status == Status.KEEP and u.id < t.id]
        assert t.decision["best_values"] and set(t.decision["best_values"]) <= set(own), (t.id, t.device_class)
    lab.close()


def test_a_proposal_that_fails_in_one_slot_does_not_stop_the_other(tmp_path, cpu_prepared):
    ws = make_workspace(tmp_path / "ws", cpu_prepared, budget=1.5, baseline_runs=1, rule="strict")
    broken = {"description": "an edit of a line that is not there", "replace": [["NO SUCH LINE", "x"]]}
    lab = two_slot_lab(ws)
    lab.run(ScriptedProposer([broken, LR_UP, LR_UP_LESS]))
    candidates = [t for t in lab.ledger.trials() if t.kind == Kind.CANDIDATE]
    failed = [t for t in candidates if t.failure == Failure.PROPOSER]
    assert len(failed) == 1 and failed[0].status == Status.CRASH and "NO SUCH LINE" in failed[0].reason
    measured = [t for t in candidates if t.val_bpb is not None]
    assert {t.description for t in measured} >= {LR_UP["description"]}  # the other slot went on, and so did this one
    assert len({t.hardware.get("slot") for t in lab.ledger.trials()}) == 2
    assert_branch_on_the_best(lab)
    lab.close()


def test_git_worktrees_are_the_slots_and_the_persons_tree_only_moves_on_a_keep(tmp_path, cpu_prepared):
    ws = make_workspace(tmp_path / "ws", cpu_prepared, budget=1.5, baseline_runs=1, rule="strict")
    lab = two_slot_lab(ws)
    lab.run(ScriptedProposer([{"description": "DIM 32 -> 2", "replace": [["DIM = 32", "DIM = 2"]]},
                              {"description": "divide by zero", "replace": [["    run.training_started()\n",
                                                                            "    run.training_started()\n    1 / 0\n"]]}]))
    trials = lab.ledger.trials()
    assert {t.status for t in trials if t.kind == Kind.CANDIDATE} <= {Status.DISCARD, Status.CRASH, Status.KEEP}
    listed = git(ws.root, "worktree", "list", "--porcelain")
    slots = sorted(Path(line.split(" ", 1)[1]).name for line in listed.splitlines() if line.startswith("worktree ")
                   and "/.autoresearch/worktrees/" in line)
    assert slots == ["slot-0", "slot-1"]
    for slot in slots:  # each slot's tree was put back on the best after its candidate
        tree = ws.lab_dir / "worktrees" / slot
        assert git(tree, "status", "--porcelain") == ""
        assert (tree / "train.py").read_text() == ws.show(lab.best().commit, "train.py")
    assert_branch_on_the_best(lab)
    lab.close()


def test_kill_9_during_two_trials_then_run_again_leaves_no_process_or_worktree_behind(tmp_path, cpu_prepared):
    ws = make_workspace(tmp_path / "ws", cpu_prepared, TWO_KNOBS, budget=4.0, baseline_runs=2, rule="strict")
    script = tmp_path / "edits.json"
    script.write_text(json.dumps([LR_UP, SCALE_UP]))
    command = [sys.executable, "-m", "autoresearch", "run", str(ws.root), "--script", str(script), "--parallel", "2"]
    lab = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # both baseline seeds in flight at once, their trainers started
        if all((ws.trial_dir(i) / "train.log").exists() for i in (1, 2)) and len(trainer_processes(ws)) >= 2:
            break
        time.sleep(0.1)
    else:
        lab.kill()
        pytest.fail("two trials never ran at once")
    lab.send_signal(signal.SIGKILL)
    lab.wait()
    assert not survivors(ws), "a trial outlived the lab"
    assert [t.status for t in Ledger(ws.ledger_path).trials()] == [Status.RUNNING, Status.RUNNING]

    done = subprocess.run(command + ["--max-trials", "2", "--confirm-runs", "0"], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr
    assert "was in flight when the lab stopped" in done.stdout
    assert not trainer_processes(ws)
    trials = Ledger(ws.ledger_path).trials()
    assert [t.status for t in trials[:2]] == [Status.STOPPED, Status.STOPPED]
    assert Status.RUNNING not in {t.status for t in trials}
    assert len([t for t in trials if t.kind == Kind.BASELINE and t.status == Status.KEEP]) == 2
    listed = [line for line in git(ws.root, "worktree", "list", "--porcelain").splitlines() if line.startswith("worktree ")]
    assert len(listed) == 3 and not git(ws.root, "worktree", "prune", "--dry-run", "-v")  # the root and two slots
    reopened = Lab(ws, log=lambda msg: None, slots=slots_for(2))
    assert_branch_on_the_best(reopened)
    reopened.close()


def test_parallel_beyond_the_machine_is_refused_at_once_with_the_numbers(tmp_path, cpu_prepared):
    ws = make_workspace(tmp_path / "ws", cpu_prepared, baseline_runs=1)
    done = subprocess.run([sys.executable, "-m", "autoresearch", "run", str(ws.root), "--parallel", "999"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "--parallel 999: this machine has no GPU and" in done.stderr and "ask for 1 to" in done.stderr
    assert not ws.ledger_path.exists() or not Ledger(ws.ledger_path).trials()
