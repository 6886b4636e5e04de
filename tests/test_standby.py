"""A slot's next trial started before it is known (lab.executor.LocalExecutor's standby): its sandboxes
made and the trainer's imports done beside the trial before it (on a GPU slot, while it is scored; on a CPU
slot, once it has ended), and then a trial like any other.

The tiny trainer on the CPU, with the standby asked for (by default only GPU slots stand by). A lab killed
-9 with a standby in flight: test_lab_loop's resume test.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import time
from dataclasses import asdict
from pathlib import Path

from autoresearch.lab.executor import STANDBY_PREFIX, LocalExecutor
from autoresearch.lab.loop import Lab
from autoresearch.lab.outcomes import Status
from autoresearch.lab.supervisor import LOG_FILE, SPEC_FILE
from autoresearch.lab.trial import run_trial
from autoresearch.proposers.scripted import ScriptedProposer
from lab_helpers import alive, make_workspace, survivors, tagged_processes, trainer_processes, variant

# What the trainer finds as it starts: whether torch was imported before its first line, and its /tmp. It
# leaves a stash in /tmp, which the next trial must not find. A checkout under /tmp shows there too: its
# installation is bound into the sandbox's /tmp.
INSTALLED = sorted({Path(p).parts[2] for p in (sys.prefix, __file__) if Path(p).parts[1:2] == ("tmp",)})
PROBING = variant(("import time\n", "import sys\nimport os\nimport time\n\n"
                                    "print('torch before train.py:', 'torch' in sys.modules, flush=True)\n"
                                    "print('tmp holds:', sorted(n for n in os.listdir('/tmp') "
                                    f"if n not in {['torchinductor_sandbox', *INSTALLED]!r}), flush=True)\n"
                                    "open('/tmp/stash', 'w').write('weights of the last trial')\n"))
EDITS = [{"description": "LR 0.003 -> 0.01", "replace": [["LR = 0.003", "LR = 0.01"]]},
         {"description": "DIM 32 -> 48", "replace": [["DIM = 32", "DIM = 48"]]}]


def standby_folders(ws) -> list[Path]:
    return sorted((ws.root / ".autoresearch" / "trials").glob(f"{STANDBY_PREFIX}*"))


def standby_supervisors(ws) -> list[int]:
    """The standby supervisor processes of this workspace's trials."""
    found = []
    trials = str(ws.root / ".autoresearch" / "trials")
    for entry in Path("/proc").iterdir():
        try:
            argv = (entry / "cmdline").read_bytes().decode().split("\0")
        except OSError:
            continue
        if "--standby" in argv and any(a.startswith(trials) for a in argv):
            found.append(int(entry.name))
    return found


def wait_for(condition, within: float = 60.0):
    deadline = time.monotonic() + within
    while not (found := condition()) and time.monotonic() < deadline:
        time.sleep(0.05)
    return found


def test_a_trial_in_a_standby_starts_with_its_imports_done_in_fresh_sandboxes_that_saw_no_train_py(
        tmp_path, cpu_prepared):
    ws = make_workspace(tmp_path / "ws", cpu_prepared, PROBING, baseline_runs=1, rule="strict")
    lab = Lab(ws, log=lambda msg: None, executor=LocalExecutor(standby=True))
    try:
        lab.run(ScriptedProposer(EDITS))
        trials = lab.ledger.trials()
        assert len(trials) == 3 and {t.status for t in trials} <= {Status.KEEP, Status.DISCARD}
        assert [t.hardware.get("standby") for t in trials] == [False, True, True]
        for trial in trials:
            log = (ws.trial_dir(trial.id) / LOG_FILE).read_text()
            assert f"torch before train.py: {trial.hardware['standby']}" in log  # the imports were done first
            assert "tmp holds: []" in log, log  # no stash of the trial before, no marker of the standby's
            assert (ws.trial_dir(trial.id) / "sandbox" / "train" / "train.py").exists()  # what it ran, kept
            result = json.loads((ws.trial_dir(trial.id) / "result.json").read_text())
            assert result["outcome"] == "ok" and result.get("standby", False) == trial.hardware["standby"]
        # The last trial's end (on a CPU slot; on a GPU, its hand-in) made the next standby: its sandboxes wait,
        # and no train.py is in its reach.
        (folder,) = standby_folders(ws)
        assert json.loads((folder / SPEC_FILE).read_text())["trainer"] == ""
        assert not list(folder.rglob("train.py")) and not list(folder.rglob("stash"))
        assert wait_for(lambda: trainer_processes(ws)), "the standby's sandboxes are not running"
    finally:
        lab.close()
    assert not standby_folders(ws) and not survivors(ws) and not standby_supervisors(ws)


def test_a_standby_that_died_or_lost_its_trainer_is_replaced_and_one_for_other_settings_is_not_used(
        tmp_path, cpu_prepared):
    ws = make_workspace(tmp_path / "ws", cpu_prepared, baseline_runs=1, rule="strict")
    executor = LocalExecutor(standby=True)
    commit = ws.config["base_commit"]

    def trial(n: int, **spec_changes):
        if spec_changes:
            ws.config.update(spec_changes)
            ws.save_config()
        return run_trial(ws, n, commit, seed=None, executor=executor)

    try:
        first = trial(1)
        assert first.val_bpb is not None and not first.hardware["standby"]
        # Its trainer killed while it waits: the trial still runs, on a fresh trainer, and says so.
        (zygote,) = wait_for(lambda: tagged_processes(f"AUTORESEARCH_TRIAL={ws.config['id']}:standby/train"))
        wait_for(lambda: list(standby_folders(ws)[0].rglob(".autoresearch-standby-ready")))
        os.kill(zygote, signal.SIGKILL)
        wait_for(lambda: not alive(zygote))
        time.sleep(0.5)  # and its sandbox has ended with it
        second = trial(2)
        assert second.val_bpb is not None and second.hardware["standby"]
        assert "the standby trainer had ended" in (ws.trial_dir(2) / LOG_FILE).read_text()
        # The whole standby killed: the trial runs without one.
        (supervisor,) = wait_for(lambda: standby_supervisors(ws))
        os.kill(supervisor, signal.SIGKILL)
        third = trial(3)
        assert third.val_bpb is not None and not third.hardware["standby"]
        # The workspace's settings changed since the standby was made: it is let go, unused.
        wait_for(lambda: standby_supervisors(ws))
        fourth = trial(4, max_processes=200)
        assert fourth.val_bpb is not None and not fourth.hardware["standby"]
        assert json.loads((ws.trial_dir(4) / SPEC_FILE).read_text())["max_processes"] == 200
        assert len(standby_folders(ws)) == 1  # the new one, for the new settings
    finally:
        executor.close()
    assert not standby_folders(ws) and not survivors(ws) and not standby_supervisors(ws)


def test_only_sandboxed_trials_of_one_process_stand_by():
    from autoresearch.lab.supervisor import TrialSpec, can_stand_by

    spec = asdict(TrialSpec(trainer="train.py", data="data", profile={}, time_budget=1.0))
    assert can_stand_by(spec)
    assert not can_stand_by({**spec, "sandboxed": False})
    assert not can_stand_by({**spec, "world_size": 2})
    assert not can_stand_by({**spec, "checkpoint": "kept.pt"})  # the sealed test scores, trains nothing
