"""Shared by the report's, status view's and dashboard's specifications: a real small workspace
made by the real loop (the tiny trainer, printing progress lines), what the lab itself makes of its
ledger (the expectations), and ways to add a trial to it."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from autoresearch.lab.decide import Best, DecisionRule
from autoresearch.lab.ledger import Ledger, Trial
from autoresearch.lab.loop import CONFIG_HASH, Lab
from autoresearch.lab.noise import NoiseEstimate, detectable_gain
from autoresearch.lab.outcomes import Kind, Status
from autoresearch.lab.workspace import Workspace
from lab_helpers import EDITS, make_workspace, variant

CHROMIUM = os.environ.get("AUTORESEARCH_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run"]

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
    """Baseline (3 seeds), then EDITS by the real loop: a gain (kept where the noise lets the lab see it), a
    loss and a crash, with the runs the lab adds as it measures (the new best again, reruns): how many rows,
    the ledger says."""
    from autoresearch.proposers.scripted import ScriptedProposer

    # Three baseline seeds: with two, sigma's single degree of freedom sets a bar that a loaded machine's
    # noise can lift above even this change's clear gain.
    ws = make_workspace(root, data, PROGRESS_TRAINER, budget=2.0, baseline_runs=3)
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


def add_trial(root: Path, status: str, *, kind: str = Kind.CANDIDATE, description: str = "an added trial",
              progress: list[str] | None = None, **fields) -> int:
    """One more row in the workspace's ledger, written as the lab writes one (begun, then completed with
    `status` and `fields`), and, given `progress` lines, its train.log. Returns its id."""
    ledger = Ledger(root / ".autoresearch" / "ledger.db")
    try:
        trial_id = ledger.begin(kind=kind, proposer="test", description=description, commit_sha=None,
                                parent_sha=None, diff="", seed=None)
        ledger.update(trial_id, status=status, **fields)
    finally:
        ledger.close()
    if progress is not None:
        log = Workspace.open(root).trial_dir(trial_id) / "train.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text("".join(line + "\n" for line in progress))
    return trial_id


@dataclass
class LabView:
    """What the lab itself makes of a workspace's ledger, by its own functions (Lab.best, Lab.noise): the
    expectations the report's numbers are checked against."""

    best: Best | None
    noise: NoiseEstimate
    rule: DecisionRule
    base_commit: str
    device_class: str

    @property
    def detectable_gain(self) -> float | None:
        """Against the best as the next candidate meets it: its fresh runs, the rule's baseline_runs at least."""
        return detectable_gain(self.noise, self.rule, max(len(self.best.fresh) if self.best else 0,
                                                          self.rule.baseline_runs))


def ledger_trials(root: Path) -> tuple[list[Trial], LabView]:
    """Every row of the workspace's ledger, and what the lab makes of them."""
    ws = Workspace.open(root)
    lab = Lab(ws, log=lambda message: None)
    try:
        view = LabView(lab.best(), lab.noise(), ws.rule, ws.config["base_commit"], lab.device_class)
        return lab.ledger.trials(), view
    finally:
        lab.close()


def scripted(trials: list[Trial], edit: int) -> Trial:
    """The candidate the loop made of EDITS[edit] (its first run; reruns share its status)."""
    return next(t for t in trials if t.kind == Kind.CANDIDATE and t.description == EDITS[edit]["description"])


def the_kept_gain(trials: list[Trial]) -> Trial:
    """The research workspace's kept change (EDITS[0]). The loop keeps it once the baseline's two short runs
    tell the noise well enough; on a machine loaded heavily enough that they do not, it is discarded
    (test_lab_loop then says so), and a specification of how a kept change is shown has nothing to show."""
    gain = scripted(trials, 0)
    if gain.status != Status.KEEP:
        pytest.skip(f"the loop did not keep {gain.description!r} in the research workspace ({gain.status}: "
                    f"{gain.decision.get('why', '')}): nothing kept to show")
    return gain


def set_budget(root: Path, seconds: float) -> None:
    """Change the workspace's training budget as the lab's config, and record it as the config the lab last
    left (the lab refuses a config changed behind its back: test_lab_guards)."""
    ws = Workspace.open(root)
    ws.config["time_budget"] = seconds
    ws.save_config()
    ledger = Ledger(ws.ledger_path)
    try:
        ledger.set_meta(CONFIG_HASH, ws.integrity()["config"])
    finally:
        ledger.close()


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
    with ws.lock("trial"):
        trial = lab.candidate(description, "test")
finally:
    lab.close()
print(trial.id, trial.status, trial.reason)
"""


def start_trial(root: Path, old: str, new: str, description: str) -> subprocess.Popen:
    """One more real trial in a process of its own, as `autoresearch trial` runs it: holding the
    workspace's lock, writing the ledger."""
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

    running = [t for t in read_ledger(root / ".autoresearch" / "ledger.db").trials if t.status == Status.RUNNING]
    if running and last_progress(root / ".autoresearch" / "trials" / f"{running[0].id:05d}" / "train.log"):
        return running[0].id
    return None


@pytest.fixture(scope="module")
def browser():
    """Headless Debian Chromium driven by Playwright (no browser download); skipped where missing, unless
    AUTORESEARCH_REQUIRE_BROWSER is set (CI sets it)."""
    if not (Path(CHROMIUM).exists() and shutil.which(CHROMIUM)):
        if os.environ.get("AUTORESEARCH_REQUIRE_BROWSER"):
            pytest.fail(f"no Chromium at {CHROMIUM}: apt-get install -y chromium")
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install -y chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        if os.environ.get("AUTORESEARCH_REQUIRE_BROWSER"):
            raise
        pytest.skip("the playwright package is not installed (pip install playwright; no `playwright install`)")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()



# --- trial slots -----------------------------------------------------------------------------------------
H100 = "NVIDIA H100 80GB HBM3"
NODE_B = "8f14e45fceea167a5a36dedd4bea2543"  # a Ray node's id


def slot_record(slot: int, started_at: float, *, device: str = "cuda", gpus: list[int] | None = None,
                threads: int | None = None, executor: str = "local", node: str | None = None, host: str = "gpubox",
                device_class: str = H100, lost: bool = False, lost_reason: str = "") -> dict:
    """One entry of the ledger's meta `slots`, as the lab records a slot of its run (lab.loop)."""
    return {"slot": slot, "device": device, "gpus": gpus, "threads": threads, "executor": executor, "node": node,
            "host": host, "device_class": device_class, "lost": lost, "lost_reason": lost_reason,
            "started_at": started_at}


def record_slots(root: Path, slots: list[dict]) -> None:
    from autoresearch.lab.loop import SLOTS

    ledger = Ledger(root / ".autoresearch" / "ledger.db")
    try:
        ledger.set_meta(SLOTS, slots)
    finally:
        ledger.close()


def add_slot_trial(root: Path, status: str, slot: int, started_at: float, ended_at: float | None = None, *,
                   gpus: list[int] | None = None, device_class: str = H100, **fields) -> int:
    """A trial the lab ran in `slot` at known times. Its row's hardware names the slot from the start; the
    device it ran on once it is over (as lab.loop records them)."""
    if status == Status.RUNNING:
        hardware = {"slot": slot}
    else:
        hardware = {"device": "cuda", "class": device_class, "gpus": gpus, "threads": None, "slot": slot}
        fields["ended_at"] = ended_at
    if status in (Status.KEEP, Status.DISCARD):
        fields.setdefault("val_bpb", 2.5)
    fields.setdefault("sandboxed", True)
    return add_trial(root, status, started_at=started_at, hardware=hardware, device_class=device_class, **fields)


PROGRESS_340 = [f"train step={n} progress_pct={45 * n / 340:.1f} loss={4 - n / 340:.4f} lrm=1.000 dt_ms=12 "
                f"tok_per_s=150000 mfu_pct=38.5 epoch=0 remaining_s={300 - 135 * n // 340}" for n in (100, 200, 340)]


def two_slot_run(root: Path, start: float, *, lost: bool = False) -> dict[str, int]:
    """A run of two GPU slots, at `start` plus known seconds:

        slot 0, GPU 0 of this host:            a baseline 0-1200 s, a discarded candidate 1200-3000 s, and
                                               a candidate running since 3000 s (at step 340, 45%)
        slot 1, GPUs 0 and 1 of a Ray node:    a discarded candidate 600-2400 s, then nothing; with `lost`,
                                               that trial was lost with its node, and the slot with it

    Read at start + 3600 s: slot 0 busy 3600 s (100%), 1.0 GPU-hours, 2 trials finished (2 per hour);
    slot 1 busy 1800 s (50%) on two GPUs, 1.0 GPU-hours, 1 trial (1 per hour). Returns the ids by role."""
    lost_reason = "its machine (node-b) went away" if lost else ""
    record_slots(root, [slot_record(0, start, gpus=[0]),
                        slot_record(1, start, gpus=[0, 1], executor="ray", node=NODE_B, host="node-b",
                                    device_class=f"2x {H100}", lost=lost, lost_reason=lost_reason)])
    ids = {}
    ids["baseline"] = add_slot_trial(root, Status.KEEP, 0, start, start + 1200, gpus=[0], kind=Kind.BASELINE,
                                     description="baseline (seed 1)", val_bpb=2.6)
    ids["other"] = add_slot_trial(root, Status.LOST if lost else Status.DISCARD, 1, start + 600, start + 2400,
                                  gpus=[0, 1], device_class=f"2x {H100}", description="wider MLP",
                                  **({"reason": "its machine went away during the trial"} if lost else {}))
    ids["discarded"] = add_slot_trial(root, Status.DISCARD, 0, start + 1200, start + 3000, gpus=[0],
                                      description="LR 0.003 -> 0.03")
    ids["running"] = add_slot_trial(root, Status.RUNNING, 0, start + 3000, description="deeper model",
                                    progress=PROGRESS_340)
    return ids
