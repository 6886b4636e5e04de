"""Shared by the report's, status view's and dashboard's specifications: a real small workspace
made by the real loop (the tiny trainer, printing progress lines), and ways to add a trial to it."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from autoresearch.lab.ledger import Ledger
from lab_helpers import EDITS, make_workspace, variant

# The tiny trainer, printing train.py's progress line every 0.2 s (the status view and the
# dashboard read the running trial's step, loss and time left from it).
PROGRESS_TRAINER = variant(
    ("started, steps = time.time(), 0", "started, steps, shown = time.time(), 0, 0.0"),
    ("        steps += 1\n",
     "        steps += 1\n"
     "        if time.time() - shown > 0.2:  # PROGRESS\n"
     "            shown = time.time()\n"
     "            elapsed = shown - started\n"
     "            print(f\"train step={steps} progress_pct={100 * min(elapsed / run.time_budget, 1):.1f} \"\n"
     "                  f\"loss={loss.item():.4f} lrm=1.000 dt_ms=1 tok_per_s={steps * BATCH * run.seq_len / elapsed:.0f} \"\n"
     "                  f\"mfu_pct=0.0 epoch=0 remaining_s={max(0.0, run.time_budget - elapsed):.0f}\", flush=True)\n"),
)


def build_research_workspace(root: Path, data) -> Path:
    """Baseline (2 seeds), then a kept, a discarded and a crashed candidate: 5 trials, by the real loop."""
    from autoresearch.lab.loop import Lab
    from autoresearch.proposers.scripted import ScriptedProposer

    ws = make_workspace(root, data, PROGRESS_TRAINER, budget=2.0, baseline_runs=2)
    lab = Lab(ws, log=lambda msg: None)
    try:
        lab.run(ScriptedProposer(EDITS))
    finally:
        lab.close()
    return ws.root


def copy_workspace(src: Path, dst: Path) -> Path:
    """A copy to change freely (the ledger is copied while nothing writes to it)."""
    shutil.copytree(src, dst, symlinks=True)
    return dst


def ledger_trials(root: Path):
    ledger = Ledger(root / ".autoresearch" / "ledger.db")
    try:
        return ledger.trials(), ledger.get_meta("sigma")
    finally:
        ledger.close()


def set_budget(root: Path, seconds: float) -> None:
    path = root / ".autoresearch" / "config.json"
    config = json.loads(path.read_text())
    config["time_budget"] = seconds
    path.write_text(json.dumps(config, indent=2))


TRIAL_SCRIPT = """
import sys
from pathlib import Path
from autoresearch.lab.loop import Lab
from autoresearch.lab.workspace import Workspace
root, old, new, description = sys.argv[1:5]
ws = Workspace.open(Path(root))
train = ws.root / "train.py"
train.write_text(train.read_text().replace(old, new, 1))
lab = Lab(ws, log=lambda message: None)
try:
    trial = lab.candidate(description, "test")
finally:
    lab.close()
print(trial.id, trial.status, trial.reason)
"""


def start_trial(root: Path, old: str, new: str, description: str) -> subprocess.Popen:
    """One more real trial in a process of its own, as the loop runs it (it writes the ledger)."""
    return subprocess.Popen([sys.executable, "-c", TRIAL_SCRIPT, str(root), old, new, description],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(predicate, timeout: float = 60.0, what: str = "the condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    pytest.fail(f"timed out after {timeout:g}s waiting for {what}")


def running_trial_with_progress(root: Path):
    """(trial id, True) once the ledger has a running trial whose train.log has a progress line."""
    from autoresearch.report.data import last_progress, read_ledger

    running = [t for t in read_ledger(root / ".autoresearch" / "ledger.db").trials if t.status == "running"]
    if running and last_progress(root / ".autoresearch" / "trials" / f"{running[0].id:05d}" / "train.log"):
        return running[0].id
    return None


# --- what the report says ------------------------------------------------------------------------------
