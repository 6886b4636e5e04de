"""After the loop: the best confirmed against the baseline under fresh seeds, and each kept change undone
alone (lab.confirm), on a copy of the session's real research workspace with a second kept change."""
from __future__ import annotations

from autoresearch.lab.confirm import CONFIRMATION, confirm, fresh_seeds
from autoresearch.lab.decide import current_best
from autoresearch.lab.loop import Lab
from autoresearch.lab.outcomes import Kind, Status
from autoresearch.lab.workspace import Workspace, git


def keep_by_hand(lab: Lab, old: str, new: str, description: str) -> str:
    """A kept change on top of the best, recorded as the loop records one (its run: the best's last)."""
    ws = lab.ws
    (ws.root / "train.py").write_text((ws.root / "train.py").read_text().replace(old, new))
    parent = lab.best()
    commit = ws.commit(["train.py"], description)
    trial_id = lab._begin(Kind.CANDIDATE, description, "test", commit, parent.commit, ws.diff(parent.commit, commit))
    lab.ledger.update(trial_id, status=Status.KEEP, val_bpb=parent.values[-1], device_class=lab.device_class)
    return commit


def test_the_best_is_confirmed_under_fresh_seeds_and_each_kept_change_undone_alone(workspace_copy):
    ws = Workspace.open(workspace_copy)
    lab = Lab(ws, log=lambda msg: None)
    try:
        lr = current_best(lab.ledger.trials()).commit  # the research workspace's kept "LR 0.003 -> 0.03"
        assert ws.subject(lr) == "LR 0.003 -> 0.03", "the research workspace kept no change"
        dim = keep_by_hand(lab, "DIM = 32", "DIM = 48", "DIM 32 -> 48")  # the next line of train.py
        seeds_before = {t.seed for t in lab.ledger.trials() if t.commit_sha in (ws.config["base_commit"], dim)}
        assert fresh_seeds(lab, [ws.config["base_commit"], dim], 3) == sorted(
            {1, 2, 3, 4, 5, 6} - seeds_before)[:3]
        head = ws.head()
        result = confirm(lab, runs=3)
        trials = lab.ledger.trials()
    finally:
        lab.close()
    confirms = [t for t in trials if t.kind == Kind.CONFIRM]
    assert [t.commit_sha for t in confirms] == [ws.config["base_commit"], dim] * 3  # in turn
    assert {t.status for t in confirms} == {Status.KEEP} and not {t.seed for t in confirms} & seeds_before
    assert len({t.seed for t in confirms}) == 3
    # LR 0.03 against 0.003 is a gain of many sigma: its interval lies above zero.
    assert result.gain.gain > 0 and result.gain.low > 0 and result.gain.low < result.gain.gain < result.gain.high
    assert result.best_values == [t.val_bpb for t in confirms if t.commit_sha == dim]
    # Each kept change undone alone, in a commit beside the branch; undoing LR hurts by far.
    by_change = {a.commit: a for a in result.ablations}
    assert set(by_change) == {lr, dim}
    assert by_change[lr].gain > 0 and by_change[lr].low > 0
    ablations = [t for t in trials if t.kind == Kind.ABLATION]
    assert len(ablations) == 2 and all(t.parent_sha == dim and t.status == Status.KEEP for t in ablations)
    undone_lr = next(t for t in ablations if lr[:7] in t.description)
    assert "-LR = 0.03" in undone_lr.diff and "+LR = 0.003" in undone_lr.diff and "DIM = 32" not in undone_lr.diff
    assert git(ws.root, "branch", "--contains", undone_lr.commit_sha) == ""  # never on the branch
    assert ws.head() == head and git(ws.root, "status", "--porcelain") == ""
    stored = Lab(ws, log=lambda msg: None)
    try:
        assert stored.ledger.get_meta(CONFIRMATION)["gain"]["gain"] == result.gain.gain
        assert current_best(stored.ledger.trials()).commit == dim  # confirming moves nothing
    finally:
        stored.close()


def test_a_change_that_later_changes_touched_again_cannot_be_undone_alone(tmp_path, cpu_prepared):
    from lab_helpers import make_workspace

    ws = make_workspace(tmp_path / "ws", cpu_prepared)
    first = edit(ws, "LR = 0.003", "LR = 0.01", "LR 0.003 -> 0.01")
    second = edit(ws, "LR = 0.01", "LR = 0.03", "LR 0.01 -> 0.03")
    third = edit(ws, "DIM = 32", "DIM = 48", "DIM 32 -> 48")  # the next line: undone alone all the same
    assert ws.kept_commits(third) == [first, second, third]
    assert ws.without(third, first) is None  # its line was changed again by the second
    without_second = ws.without(third, second)
    assert "LR = 0.01" in without_second and "DIM = 48" in without_second
    without_third = ws.without(third, third)
    assert "LR = 0.03" in without_third and "DIM = 32" in without_third
    aside = ws.commit_aside(third, {"train.py": without_third}, "the best without DIM 32 -> 48")
    assert ws.show(aside, "train.py") == without_third and ws.head() == third
    assert git(ws.root, "status", "--porcelain") == "" and ws.subject(second) == "LR 0.01 -> 0.03"


def edit(ws, old: str, new: str, message: str) -> str:
    (ws.root / "train.py").write_text((ws.root / "train.py").read_text().replace(old, new))
    return ws.commit(["train.py"], message)
