"""The research loop: baseline, then propose -> trial -> decide -> record, until told to stop.

Every step is recorded in the ledger before it is acted on, so the loop can be stopped at any point
(Ctrl-C, kill -9, a reboot) and `resume()` finds a consistent state: a trial in flight is recorded
as stopped, the sandboxes die with their supervisor, git is put back on the best commit, and a
stopped candidate is run again before anything new is proposed.

Trial slots. The lab runs up to one trial per slot at once (`run --parallel N`): a GPU each, or a
share of the CPU's threads. With one slot everything happens in the workspace's own working tree,
in the calling thread. With several, each slot has a worker thread and a worktree of its own
(.autoresearch/worktrees/slot-K), where its proposals are made and committed; the branch stays on
the best commit and moves, forward, only when a change is kept. Which work a slot takes next is
decided under one lock (`_next_step`): the baseline's seeds, the runs the best still lacks, the
candidates a stopped lab left, then a new proposal. A candidate is judged against the best it was
built on; if another was kept meanwhile, its edit is applied onto the new best and measured there
before it can be kept (`evaluate`), so the final best holds every kept change, measured together.
"""
from __future__ import annotations

import shutil
import statistics
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from enum import Enum
from pathlib import Path
from typing import Callable

from ..errors import UserError
from . import sandbox
from .decide import (Action, Best, Decision, RuleName, best_of, best_runs_missing, current_best, decide,
                     next_seed)
from .ledger import Ledger, Trial
from .noise import NoiseEstimate, by_device, detect_change, measurements, workspace_noise
from .outcomes import RUN_AGAIN, Failure, Kind, Status
from .proposer import ProposalContext, Proposer, backoff_seconds, consecutive_failures
from .executor import Executor, LocalExecutor, Slot
from .trial import TrialOutcome, kill_trial_processes, run_trial
from .workspace import SETTINGS_FILE, Tree, Workspace, WorkspaceError

CONFIG_HASH = "config_sha256"  # ledger meta: the lab's config as the lab last left it
NOISE_SINCE = "noise_since"  # ledger meta: the first trial of the current noise epoch (a change starts a new one)
MAX_TRAINER_BYTES = 1 << 20  # a train.py this large carries data (weights), not code
SLOTS = "slots"  # ledger meta: the slots of the latest run (Slot.describe, with its executor and whether lost)
PROPOSALS_DIR = "proposals"  # under .autoresearch/: each proposal's scratch folder, named by its trial
WAIT_SECONDS = 0.2  # how often an idle slot looks again for work (while others run the baseline)


class LabError(UserError):
    """The loop cannot go on (a crashing baseline, a changed harness); the message says why."""


def slots_for(parallel: int | None = None) -> list[Slot]:
    """This host's trial slots (LocalExecutor.slots): one GPU each, or CPU slots sharing its threads."""
    return LocalExecutor().slots(parallel)


def default_slot() -> Slot:
    """One slot on the best device here: the first GPU the driver lists, else the CPU."""
    return slots_for(1)[0]


class Step(str, Enum):
    """What a slot does next (Lab._next_step)."""

    BASELINE = "baseline"  # one seed of the unedited train.py
    BEST = "best"  # one more run of the best, which lacks runs here
    AGAIN = "again"  # a candidate a stopped lab left undecided
    PROPOSE = "propose"  # a new proposal
    WAIT = "wait"  # nothing yet: the others are measuring what everything else waits on


@dataclass
class Plan:
    """What the slots of one `run` share: the work left, its limits, what is in flight, and how it ended."""

    proposer: Proposer
    again: list[Trial]
    max_trials: int | None
    max_hours: float | None
    started: float = field(default_factory=time.time)
    claimed: int = 0  # proposals begun (and stopped candidates taken up): what max_trials counts
    done: int = 0  # candidates decided: what drift_every counts
    baseline_seeds: list[int | None] = field(default_factory=list)  # baseline runs in flight
    best_runs: dict[tuple[str, str], int] = field(default_factory=dict)  # runs of a best in flight: (commit, class)
    limit: str = ""  # why the run stopped at a limit (then it is confirmed)
    exhausted: bool = False  # the proposer had nothing more
    error: BaseException | None = None  # what stopped a slot's worker; raised by run()


class Lab:
    def __init__(self, ws: Workspace, log: Callable[[str], None] = print, *, sandboxed: bool = True,
                 slot: Slot | None = None, slots: list[Slot] | None = None, executor: Executor | None = None):
        self.ws = ws
        self.executor = executor or LocalExecutor()
        self.ledger = Ledger(ws.ledger_path, ws.results_tsv)
        self._emit = log
        self.stop = threading.Event()
        self.sandboxed = sandboxed
        self.slots = list(slots) if slots else [slot or default_slot()]
        self.lock = threading.RLock()  # the best, the branch, and the slots' claims on work
        self._proposing = threading.Lock()  # a proposer that is not `concurrent` proposes one at a time
        self._local = threading.local()  # which slot this thread works for
        self.running: dict[int, tuple[int, Path]] = {}  # slot -> its trial in flight and its log (progress views)
        self.trying: dict[int, str] = {}  # slot -> the candidate it is measuring (told to the other proposals)
        self.lost: dict[int, str] = {}  # slot -> why its machine is gone (it takes no more work)
        self._run_started: float | None = None

    @property
    def slot_index(self) -> int:
        return getattr(self._local, "index", 0)

    @property
    def slot(self) -> Slot:
        return self.slots[self.slot_index]

    def log(self, message: str) -> None:
        if len(self.slots) > 1:
            message = "\n".join(f"[{self.slot_index}] {line}" for line in message.split("\n"))
        with self.lock:
            self._emit(message)

    def close(self) -> None:
        self.ledger.close()
        self.executor.close()

    # --- trust ------------------------------------------------------------------------------------
    def check_ready(self) -> None:
        """Before any trial: a sandbox can be had (or the user chose to go without), the harness is the
        one the workspace was made with, and the lab's config is as the lab last left it."""
        if self.sandboxed:
            sandbox.check()
        self.ws.check_fingerprint()
        config_hash = self.ws.integrity()["config"]
        recorded = self.ledger.get_meta(CONFIG_HASH)
        if recorded is None:
            self.ledger.set_meta(CONFIG_HASH, config_hash)
        elif recorded != config_hash:
            raise LabError(f"{self.ws.lab_dir / 'config.json'} changed outside the lab (by hand, or by a program with "
                           "your rights) since its last trial, so its settings cannot be trusted. Put it back as it "
                           "was; settings people may change live in autoresearch.toml.")

    # --- state derived from the ledger ------------------------------------------------------------
    @property
    def device_class(self) -> str:
        return self.slot.device_class

    def since(self) -> int:
        return int(self.ledger.get_meta(NOISE_SINCE, 0) or 0)

    def best(self) -> Best | None:
        """The best commit and its runs on this class of device in this noise epoch (decide.current_best)."""
        return current_best(self.ledger.trials(), self.device_class, self.since())

    def best_of(self, commit: str) -> Best:
        """`commit`, as a best that candidates built on it are judged against, with its runs so far."""
        return best_of(self.ledger.trials(), commit, self.device_class, self.since())

    def noise(self) -> NoiseEstimate:
        """The noise model, learnt from every repeated measurement of this epoch on this class of device."""
        return workspace_noise(self.ledger.trials(), self.device_class, self.ws.rule, self.since())

    def context(self, tree: Tree | None = None, scratch: Path | None = None) -> ProposalContext:
        best = self.best()
        return ProposalContext((tree or self.ws).root, list(self.ws.config["allowed_files"]), self.ws.config["profile"],
                               self.ws.time_budget, best.commit, best.mean, self.noise().sigma, self.ledger.trials(),
                               seq_len=self.ws.profile.seq_len, slot=self.slot_index, scratch=scratch,
                               in_flight=[d for k, d in sorted(self.trying.items()) if k != self.slot_index])

    # --- recovery ---------------------------------------------------------------------------------
    def resume(self) -> list[Trial]:
        """Make the state consistent after an unclean stop. Trials the lab was running when it died are
        recorded as stopped, and what is left of them is killed. Returns the stopped candidates whose
        decision never came, oldest first: `run` measures them again before proposing anything."""
        for t in self.ledger.trials(status=Status.RUNNING):
            kill_trial_processes(self.ws, t.id)
            self.ledger.update(t.id, status=Status.STOPPED, reason="stopped: the lab stopped during this trial")
            self.log(f"resuming: trial {t.id} was in flight when the lab stopped; it is recorded as stopped and "
                     "run again")
        best = self.best()
        self.ws.reset_to(best.commit if best else self.ws.config["base_commit"])
        trials = self.ledger.trials()
        decided = {t.commit_sha for t in trials if t.kind in (Kind.CANDIDATE, Kind.RERUN)
                   and t.status in (Status.KEEP, Status.DISCARD, Status.CRASH, Status.SUPERSEDED)}
        again, seen = [], set()
        for t in trials:
            if (t.status in RUN_AGAIN and t.kind in (Kind.CANDIDATE, Kind.RERUN) and t.commit_sha
                    and t.commit_sha not in decided and t.commit_sha not in seen):
                seen.add(t.commit_sha)
                again.append(t)
        return again

    # --- running one commit -----------------------------------------------------------------------
    def _measure(self, trial_id: int, commit: str, seed: int | None) -> TrialOutcome:
        k = self.slot_index
        self.running[k] = (trial_id, self.ws.trial_dir(trial_id) / "train.log")
        try:
            outcome = run_trial(self.ws, trial_id, commit, seed, slot=self.slot, sandboxed=self.sandboxed,
                                stop=self.stop, executor=self.executor)
        finally:
            self.running.pop(k, None)
        if not self.ledger.untouched():  # only an unsandboxed trainer can reach the ledger
            outcome.val_bpb, outcome.failure = None, Failure.TAMPERING
            outcome.reason = f"tampering: the ledger in {self.ws.lab_dir.name}/ was written during the trial; it was restored"
        summary = outcome.summary
        self.ledger.update(
            trial_id,
            val_bpb=outcome.val_bpb,
            failure=outcome.failure,
            reason=outcome.reason,
            trainer_summary={**summary, **{f"trainer_{k}": v for k, v in outcome.stats.items()},
                             **({"log_tail": outcome.log_tail} if outcome.crashed else {})},
            training_seconds=outcome.training_seconds,
            total_seconds=outcome.total_seconds,
            total_tokens_m=summary.get("total_tokens_M"),
            num_steps=int(summary["num_steps"]) if isinstance(summary.get("num_steps"), (int, float)) else None,
            mfu_percent=summary.get("mfu_percent"),
            peak_vram_mb=summary.get("peak_vram_mb"),
            hardware={**outcome.hardware, "slot": k},
            device_class=outcome.device_class,
            tokens_per_second=outcome.tokens_per_second,
            sandboxed=outcome.sandboxed,
        )
        if outcome.stopped:
            self.ledger.update(trial_id, status=Status.LOST if outcome.lost else Status.STOPPED)
        return outcome

    def _begin(self, kind: Kind, description: str, proposer: str, commit: str | None, parent: str | None,
               diff: str = "", seed: int | None = None, usage: dict | None = None, scratch: Path | None = None) -> int:
        """A new row of the ledger. `scratch`, a proposal's scratch folder, is kept as the row's
        (.autoresearch/proposals/ID), and named in its usage."""
        trial_id = self.ledger.begin(kind=kind, proposer=proposer, description=description, commit_sha=commit,
                                     parent_sha=parent, diff=diff, seed=seed)
        usage = dict(usage or {})
        if scratch is not None and scratch.is_dir():
            if any(scratch.iterdir()):
                kept = self.ws.lab_dir / PROPOSALS_DIR / f"{trial_id:05d}"
                shutil.rmtree(kept, ignore_errors=True)
                scratch.rename(kept)
                usage["notes"] = str(kept.relative_to(self.ws.root))
            else:
                scratch.rmdir()
        self.ledger.update(trial_id, log_path=str(self.ws.trial_dir(trial_id) / "train.log"),
                           proposer_usage=usage, sandboxed=self.sandboxed, hardware={"slot": self.slot_index})
        return trial_id

    def _drop_checkpoint(self, trial_id: int) -> None:
        (self.ws.trial_dir(trial_id) / "checkpoint.pt").unlink(missing_ok=True)

    # --- the baseline and the best -------------------------------------------------------------------
    def baseline(self) -> Best | None:
        """Run the unedited train.py under `baseline_runs` seeds: the first best, and the first estimate of
        the noise. Then make sure the best is measured enough here (measure_best). None if the lab was
        told to stop first."""
        self.check_ready()
        wanted = self.ws.rule.baseline_runs
        while not self.stop.is_set():
            seed = self._baseline_seed()
            if seed is False:
                break
            if not self._run_baseline(seed):
                return None
        if len(self._baseline_runs()) < wanted or not self.measure_best():
            return None
        return self.best()

    def _baseline_runs(self) -> list[Trial]:
        return [t for t in self.ledger.trials(kind=Kind.BASELINE) if t.status == Status.KEEP]

    def _baseline_seed(self, in_flight: list[int | None] = ()):
        """The seed of the next baseline run (None: train.py's own, then 1, 2, ...), or False when the
        baseline has its runs (those in flight counted)."""
        runs = self._baseline_runs()
        if len(runs) + len(in_flight) >= self.ws.rule.baseline_runs:
            return False
        used = {t.seed for t in runs} | set(in_flight)
        return next(s for s in [None, *range(1, len(used) + 2)] if s not in used)

    def _run_baseline(self, seed: int | None) -> bool:
        """One run of the baseline; False if it was stopped. A crash ends the lab: nothing can be
        measured against a baseline that does not run."""
        base = self.ws.config["base_commit"]
        self.log(f"baseline run {len(self._baseline_runs()) + 1}/{self.ws.rule.baseline_runs} "
                 f"(seed {'of train.py' if seed is None else seed})")
        trial_id = self._begin(Kind.BASELINE, "baseline" if seed is None else f"baseline (seed {seed})",
                               "baseline", base, None, seed=seed)
        outcome = self._measure(trial_id, base, seed)
        if outcome.stopped:
            return False
        if outcome.crashed:
            self.ledger.update(trial_id, status=Status.CRASH)
            raise LabError(f"The baseline crashed: {outcome.reason}\n{outcome.log_tail}\nFix train.py (its "
                           f"log: {self.ws.trial_dir(trial_id) / 'train.log'}) and run again.")
        self.ledger.update(trial_id, status=Status.KEEP, decision={"why": "baseline"})
        self.log(f"  val_bpb {outcome.val_bpb:.6f}")
        return True

    def measure_best(self) -> bool:
        """Run the best again until it has the fresh runs the rule asks for on this device in this epoch
        (after a keep, after a change of the machine, on another device class). False if stopped."""
        while not self.stop.is_set():
            best = self.best()
            if best is None:
                best = Best(self.ws.config["base_commit"], (), (), 0)
            if not best_runs_missing(self.ws.rule, best):
                return True
            self._measure_best_once(best)
        return False

    def _measure_best_once(self, best: Best) -> None:
        """One run of the best to measure candidates against; a crash of the best ends the lab."""
        self.log(f"measuring the best ({best.commit[:7]}) again: {len(best.fresh)} fresh run(s) of "
                 f"{self.ws.rule.baseline_runs} here")
        if not self.run_best(best, "to measure candidates against", check_drift=False) and not self.stop.is_set():
            last = [t for t in self.ledger.trials() if t.commit_sha == best.commit][-1]
            if last.status in RUN_AGAIN:  # its slot's machine went away: another slot runs it
                return
            raise LabError(f"The best commit {best.commit[:7]} crashed when run again (trial {last.id}: {last.reason}). "
                           "The machine or the data may have changed; look at that trial's log, then run again.")

    def run_best(self, best: Best, why: str, check_drift: bool = True) -> bool:
        """One more run of the best commit (kind drift). With `check_drift`, it is also asked whether the
        measurement moved (noise.detect_change): if so a new noise epoch starts, said in the log and the
        ledger, and the best is measured again in it. False if the run gave no value."""
        seed = next_seed([], best.samples)
        trial_id = self._begin(Kind.DRIFT, f"best {best.commit[:7]} again, {why} (seed {seed})", "lab",
                               best.commit, best.commit, seed=seed)
        outcome = self._measure(trial_id, best.commit, seed)
        if outcome.val_bpb is None:
            if not outcome.stopped:
                self.ledger.update(trial_id, status=Status.CRASH)
            return False
        decision = {"why": why}
        if check_drift:
            runs = [m for m in by_device(measurements(self.ledger.trials()), self.device_class)
                    if m.commit == best.commit and m.order >= self.since()]
            change = detect_change(runs, self.noise())
            if change is not None:
                decision["change"] = change.to_dict()
                self.ledger.set_meta(NOISE_SINCE, change.start)
                self.log(f"  the measurement changed: {change.why}; a new noise epoch starts at trial {change.start}, "
                         "and the best is measured again")
        self.ledger.update(trial_id, status=Status.KEEP, decision=decision)
        return True

    # --- one candidate ----------------------------------------------------------------------------
    def candidate(self, description: str, proposer: str, usage: dict | None = None,
                  before: dict | None = None, *, tree: Tree | None = None, scratch: Path | None = None,
                  measure_best: bool = True) -> Trial:
        """Audit, commit, run and decide on the edit now in the working tree (`tree`; the workspace's
        own by default). `before` is the tree's snapshot from before the proposal (tree.snapshot()):
        what the proposal changed besides train.py is then undone, exactly that. Without it (a coding
        agent that ran `autoresearch trial` by hand), the lab cannot tell the agent's edits from the
        person's, so it leaves other files as they are and reads train.py alone. `usage` is what the
        proposal cost, recorded with the trial, and `scratch` its notes. With `measure_best`, the best is
        first given the runs it lacks here (a slot of a parallel run leaves that to _next_step)."""
        tree = tree or self.ws
        self.check_ready()
        if self.best() is None:
            raise LabError("There is no baseline yet: run `autoresearch baseline` (or `autoresearch run`) first.")
        if measure_best and not self.measure_best():
            raise LabError("Stopped while measuring the best again; the edit in train.py is untouched.")
        best = self.best()
        description = " ".join(description.split()) or "(no description)"
        allowed = list(self.ws.config["allowed_files"])
        changed = tree.changed_since(before) if before is not None else tree.changed_files()
        others = [f for f in changed if f not in allowed]
        edits = [f for f in changed if f in allowed]
        begin = lambda diff="": self._begin(Kind.CANDIDATE, description, proposer, None, best.commit, diff,  # noqa: E731
                                            usage=usage, scratch=scratch)
        if others and before is not None:
            diff = tree.working_diff(changed)
            tree.restore(before, others)
            tree.reset_to(best.commit)
            trial_id = begin(diff)
            what = "autoresearch.toml belongs to people" if SETTINGS_FILE in others else "only the allowed files may change"
            self.ledger.update(trial_id, status=Status.CRASH, failure=Failure.REJECTED_EDIT,
                               reason=f"rejected edit: {what}: only {', '.join(allowed)} may change, but "
                                      f"{', '.join(others)} did; exactly those changes were undone")
            return self._told(trial_id)
        if others:
            self.log(f"note: {', '.join(others)} differ from the last commit; left as they are (only "
                     f"{', '.join(allowed)} is read)")
        if not edits:
            trial_id = begin()
            self.ledger.update(trial_id, status=Status.EMPTY, reason="no change: the proposal edited nothing")
            return self._told(trial_id)
        too_big = [f for f in edits if (tree.root / f).is_file() and (tree.root / f).stat().st_size > MAX_TRAINER_BYTES]
        if too_big:
            diff = f"({', '.join(too_big)} larger than {MAX_TRAINER_BYTES >> 10} KiB: not shown)"
            tree.reset_to(best.commit)
            trial_id = begin(diff)
            self.ledger.update(trial_id, status=Status.CRASH, failure=Failure.REJECTED_EDIT,
                               reason=f"rejected edit: {', '.join(too_big)} is over {MAX_TRAINER_BYTES >> 10} KiB; "
                                      "a train.py that large carries data (weights), not code; the edit was undone")
            return self._told(trial_id)
        commit = tree.commit(edits, description)
        return self.evaluate(commit, description, proposer, best, usage, tree=tree, scratch=scratch)

    def _told(self, trial_id: int) -> Trial:
        """A proposal that ended before anything ran, as recorded, and said in the log."""
        trial = self.ledger.trial(trial_id)
        self.log(f"trial {trial.id}: {trial.description}\n  {trial.status}: {trial.reason}")
        return trial

    def evaluate(self, commit: str, description: str, proposer: str, best: Best, usage: dict | None = None, *,
                 tree: Tree | None = None, scratch: Path | None = None, reapplied_from: int | None = None) -> Trial:
        """Measure `commit` (a child of `best`, the best it was built on) under the rule: more runs only
        while the decision is open, the best measured again where the noise or the best is not known
        well enough to decide. Keep it (the branch moves to it), or put `tree` back on the best.

        If it beats the best it was built on but another candidate was kept meanwhile, it is superseded:
        its edit is applied onto the new best and measured there, as a new candidate whose outcome is
        returned; where the edit no longer applies, it is discarded and the record says why."""
        tree = tree or self.ws
        trial_id = self._begin(Kind.CANDIDATE, description, proposer, commit, best.commit,
                               self.ws.diff(best.commit, commit),
                               usage={"reapplied_from": reapplied_from} if reapplied_from else usage, scratch=scratch)
        self.log(f"trial {trial_id}: {description}" + (f" (trial {reapplied_from}'s edit, re-applied onto "
                                                      f"{best.commit[:7]})" if reapplied_from else ""))
        rows, runs = [trial_id], []
        decision: Decision | None = None
        outcome = None
        while not self.stop.is_set():
            seed = next_seed(best.reference(self.ws.rule), runs)
            self.ledger.update(rows[-1], seed=seed)
            outcome = self._measure(rows[-1], commit, seed)
            if outcome.val_bpb is None:
                break
            runs.append((outcome.val_bpb, seed))
            best = self.best_of(best.commit)  # with the runs other slots made of it meanwhile
            decision = decide(self.ws.rule, best.reference(self.ws.rule), runs, self.noise())
            while decision.action == Action.MEASURE and not self.stop.is_set():
                self.log(f"  {decision.why}")
                if not self.run_best(best, "the noise is not known well enough to decide", check_drift=False):
                    break
                best = self.best_of(best.commit)
                decision = decide(self.ws.rule, best.reference(self.ws.rule), runs, self.noise())
            if decision.action != Action.RERUN or self.stop.is_set():
                break
            self.log(f"  val_bpb {outcome.val_bpb:.6f}: {decision.why}")
            rows.append(self._begin(Kind.RERUN, f"rerun: {description}", proposer, commit, best.commit))
        values = [v for v, _ in runs]
        if outcome is not None and outcome.lost:
            status, why = Status.LOST, {"why": f"{outcome.reason}, before the decision", "values": values}
        elif outcome is not None and outcome.stopped or (outcome is None and self.stop.is_set()):
            status, why = Status.STOPPED, {"why": "stopped before the decision; it is measured again on resume",
                                            "values": values}
        elif outcome is not None and outcome.crashed and not runs:
            status, why = Status.CRASH, {"why": outcome.reason}
        elif decision is None or decision.action not in (Action.KEEP, Action.DISCARD):
            status = Status.DISCARD
            why = {"why": "a rerun crashed, or the decision could not be made; a candidate that does not reach a "
                          "decision is not kept", "values": values}
        else:
            status = Status(decision.action.value)
            why = {**decision.to_dict(), "values": values, "best_values": best.values}
        if reapplied_from:
            why["reapplied_from"] = reapplied_from
        with self.lock:  # the keep, and the branch with it, against the best as it is now
            now = self.best()
            moved = status == Status.KEEP and now is not None and now.commit != best.commit
            if moved:
                tree.reset_to(now.commit)
                applies = tree.reapply(best.commit, commit)
                status = Status.SUPERSEDED if applies else Status.DISCARD
                why["why"] = (f"it beat {best.commit[:7]}, the best it was built on ({decision.why}), but "
                              f"{now.commit[:7]} was kept meanwhile; " +
                              ("its edit is applied onto that and measured there before it can be kept" if applies else
                               "its edit no longer applies onto that (a kept change touched the same lines), so it "
                               "is not kept"))
            for row in rows:  # a candidate's reruns share its fate; only a run that crashed says so
                crashed_here = row == rows[-1] and outcome is not None and outcome.crashed
                self.ledger.update(row, status=Status.CRASH if crashed_here else status, decision=why,
                                   **({"reason": why["why"]} if moved else {}))
            if status == Status.KEEP:
                self.ws.reset_to(commit)  # the branch moves forward to the new best
        if status != Status.KEEP:
            if not moved:
                tree.reset_to(best.commit if now is None else now.commit)
            for row in rows:
                self._drop_checkpoint(row)
        shown = f"val_bpb {statistics.fmean(values):.6f}" if values else (outcome.reason if outcome else "stopped")
        said = why["why"] if moved else decision.why if decision and status in (Status.KEEP, Status.DISCARD) else ""
        self.log(f"  {status}: {shown}" + (f" ({said})" if said else ""))
        if status == Status.SUPERSEDED:
            edits = [f for f in tree.changed_files() if f in self.ws.config["allowed_files"]]
            again = tree.commit(edits, description)
            return self.evaluate(again, description, proposer, now, tree=tree, reapplied_from=trial_id)
        return self.ledger.trial(trial_id)

    def finish(self, confirm_runs: int) -> None:
        """At the planned end of a run: confirm the best against the baseline, and ablate its changes."""
        from .confirm import confirm

        if confirm_runs and self.ws.rule.name == RuleName.NOISE and not self.stop.is_set():
            confirm(self, confirm_runs)

    # --- the loop ---------------------------------------------------------------------------------
    def backoff(self, proposer: Proposer, history: list[Trial]) -> float:
        """Seconds to wait before asking `proposer` again, after its proposals failed in a row."""
        failures = consecutive_failures(history, proposer.name)
        wait = backoff_seconds(failures, proposer.failure_backoff, proposer.backoff_after)
        if wait:
            self.log(f"waiting {wait:g} s before the next proposal: the last {failures} failed")
        return wait

    def run(self, proposer: Proposer, max_trials: int | None = None, max_hours: float | None = None,
            confirm_runs: int = 0) -> None:
        """Propose, run and decide, on every slot, until told to stop, the proposer runs out, or
        `max_trials` or `max_hours` are reached; then, with `confirm_runs`, confirm the best
        (lab.confirm). A slot's failure (a crashing baseline, tampering with the lab's files) stops
        the others, which record their trials as stopped, and is raised here."""
        self.check_ready()
        plan = Plan(proposer, self.resume(), max_trials, max_hours)
        self._run_started = plan.started
        self._record_slots()
        if len(self.slots) == 1:
            self._work(self.ws, plan)
        else:
            best = self.best()
            trees = self.ws.worktrees(len(self.slots), best.commit if best else self.ws.config["base_commit"])
            workers = [threading.Thread(target=self._worker, args=(k, tree, plan), name=f"autoresearch-slot-{k}",
                                        daemon=True) for k, tree in enumerate(trees)]
            for worker in workers:
                worker.start()
            for worker in workers:
                while worker.is_alive():  # in short waits, so that Ctrl-C reaches this thread
                    worker.join(0.5)
            if plan.error is not None:
                raise plan.error
        if plan.limit:
            self.log(f"stopping: {plan.limit}")
            self.finish(confirm_runs)

    def _worker(self, k: int, tree: Tree, plan: Plan) -> None:
        self._local.index = k
        try:
            self._work(tree, plan)
        except BaseException as e:  # noqa: BLE001 - handed to run(), in the main thread
            with self.lock:
                plan.error = plan.error or e
            self.stop.set()

    def _work(self, tree: Tree, plan: Plan) -> None:
        """One slot's loop: take the next step, do it, until there is none or the slot's machine is gone."""
        while True:
            if not self.executor.alive(self.slot):
                self._lose_slot(plan)
                return
            step, what = self._next_step(plan)
            if step is None:
                return
            try:
                if step == Step.WAIT:
                    self.stop.wait(WAIT_SECONDS)
                elif step == Step.BASELINE:
                    self._run_baseline(what)
                elif step == Step.BEST:
                    self._measure_best_once(what)
                elif step == Step.AGAIN:
                    self._again(tree, what, plan)
                else:
                    self._propose(tree, plan)
            finally:
                with self.lock:
                    if step == Step.BASELINE:
                        plan.baseline_seeds.remove(what)
                    elif step == Step.BEST:
                        plan.best_runs[what.commit, self.device_class] -= 1

    def _lose_slot(self, plan: Plan) -> None:
        """This slot's machine went away: it takes no more work, and the record says so. Without a slot
        left, the run stops."""
        k = self.slot_index
        with self.lock:
            self.lost[k] = f"its machine ({self.slot.host or self.slot.node or 'this host'}) went away"
            self._record_slots()
            left = len(self.slots) - len(self.lost)
        self.log(f"slot {k} is lost: {self.lost[k]}; {left} slot(s) go on")
        if not left:
            raise LabError("Every trial slot was lost: the machines that ran them went away. What ran is recorded; "
                           "start them again (or use other ones), then `autoresearch run` again.")

    def _record_slots(self) -> None:
        """The slots of this run, as the ledger keeps them for status, the dashboard and the report."""
        self.ledger.set_meta(SLOTS, [{"slot": k, **slot.describe(), "executor": self.executor.name,
                                      "lost": k in self.lost, "lost_reason": self.lost.get(k, ""),
                                      "started_at": self._run_started} for k, slot in enumerate(self.slots)])

    def _next_step(self, plan: Plan) -> tuple[Step | None, object]:
        """What this slot does next, claimed under the lock so that no two slots do the same: (None, _)
        when the run is over for it."""
        with self.lock:
            if self.stop.is_set() or plan.exhausted or plan.limit:
                return None, None
            seed = self._baseline_seed(plan.baseline_seeds)
            if seed is not False:
                plan.baseline_seeds.append(seed)
                return Step.BASELINE, seed
            if len(self._baseline_runs()) < self.ws.rule.baseline_runs:
                return Step.WAIT, None
            best = self.best() or Best(self.ws.config["base_commit"], (), (), 0)
            key = (best.commit, self.device_class)  # each class of device measures the best for itself
            if best_runs_missing(self.ws.rule, best) > plan.best_runs.get(key, 0):
                plan.best_runs[key] = plan.best_runs.get(key, 0) + 1
                return Step.BEST, best
            if plan.max_trials is not None and plan.claimed >= plan.max_trials:
                if self.trying:  # a candidate in flight whose slot's machine dies comes back to be run again
                    return Step.WAIT, None
                plan.limit = f"{plan.max_trials} trial(s) done"
                return None, None
            if plan.max_hours is not None and time.time() - plan.started > plan.max_hours * 3600:
                plan.limit = f"{plan.max_hours:g} hour(s) passed"
                return None, None
            plan.claimed += 1
            if plan.again:
                return Step.AGAIN, plan.again.pop(0)
            return Step.PROPOSE, None

    def _again(self, tree: Tree, stopped: Trial, plan: Plan) -> None:
        """Measure again a candidate left undecided (by a stopped lab, or a slot whose machine went away):
        as it was if the best is still the one it was built on, else with its edit applied onto the best
        (as for a superseded candidate), or not at all where the edit no longer applies."""
        why = "its slot was lost" if stopped.status == Status.LOST else "it was stopped"
        self.log(f"trial {stopped.id} is run again: {why}")
        best = self.best()
        commit, reapplied_from = stopped.commit_sha, None
        if stopped.parent_sha != best.commit:
            tree.reset_to(best.commit)
            if not tree.reapply(stopped.parent_sha, stopped.commit_sha):
                self.log(f"  (skipped: it was built on {stopped.parent_sha[:7]}, and its edit no longer applies onto "
                         f"the best, {best.commit[:7]})")
                tree.reset_to(best.commit)
                with self.lock:
                    plan.claimed -= 1
                return
            edits = [f for f in tree.changed_files() if f in self.ws.config["allowed_files"]]
            commit, reapplied_from = tree.commit(edits, stopped.description), stopped.id
        else:
            tree.reset_to(commit)
        trial = self._try(plan, stopped.description, lambda: self.evaluate(
            commit, stopped.description, stopped.proposer, best, stopped.proposer_usage, tree=tree,
            reapplied_from=reapplied_from))
        self._tell(plan, replace(trial, proposer_usage=stopped.proposer_usage))
        self._decided(plan, trial)

    def _tell(self, plan: Plan, trial: Trial) -> None:
        with nullcontext() if plan.proposer.concurrent else self._proposing:
            plan.proposer.tell(trial)

    def _try(self, plan: Plan, description: str, measure: Callable[[], Trial]) -> Trial:
        """Measure a candidate in this slot, told meanwhile to the other slots' proposals. One whose slot's
        machine went away is queued for another slot, in the same breath as it stops being in flight (a
        slot at the trial limit waits for what is in flight), and is counted once, when it is decided."""
        k = self.slot_index
        self.trying[k] = description
        trial = None
        try:
            trial = measure()
            return trial
        finally:
            with self.lock:
                self.trying.pop(k, None)
                if trial is not None and trial.status == Status.LOST:
                    plan.again.append(trial)
                    plan.claimed -= 1

    def _decided(self, plan: Plan, trial: Trial) -> None:
        """After a candidate: count it, and every drift_every candidates see whether the measurement moved."""
        if trial.status in RUN_AGAIN:
            return
        with self.lock:
            plan.done += 1
            check = self.ws.rule.drift_every and plan.done % self.ws.rule.drift_every == 0
        if check and not self.stop.is_set():
            self.run_best(self.best(), "to see whether the measurement has moved")

    def _propose(self, tree: Tree, plan: Plan) -> None:
        """One proposal in `tree`, audited, then tried as a candidate (or recorded as the failure it was)."""
        proposer = plan.proposer
        tree.reset_to(self.best().commit)
        scratch = self.ws.lab_dir / PROPOSALS_DIR / f"slot-{self.slot_index}"
        shutil.rmtree(scratch, ignore_errors=True)
        scratch.mkdir(parents=True)
        ctx = self.context(tree, scratch)
        if self.stop.wait(self.backoff(proposer, ctx.history)):
            return
        integrity = self.ws.integrity()
        before = tree.snapshot()
        failure = reason = None
        what = "tampering"  # the failed proposal's title in the record
        broken = False  # the lab's config, the harness or the data changed: the lab stops
        with nullcontext() if proposer.concurrent else self._proposing:
            try:
                description = proposer.propose(ctx)
            except Exception as e:  # a proposer's failure is recorded; the loop goes on
                failure, reason, description, what = Failure.PROPOSER, f"proposer error: {e}", "", type(e).__name__
            usage = proposer.last_usage
            if description is None and failure is None:
                with self.lock:
                    if not plan.exhausted:
                        self.log("stopping: " + (proposer.stop_reason or "the proposer has nothing more to propose"))
                    plan.exhausted = True
        if not self.ledger.untouched():  # a proposer with a shell could rewrite the record
            failure, reason = Failure.TAMPERING, "tampering: the ledger was written while the proposer ran; it was restored"
        try:
            self.ws.check_integrity(integrity)
        except WorkspaceError as e:
            failure, reason, broken = Failure.TAMPERING, f"tampering: while the proposer ran, {e}", True
        if failure is not None:
            best_commit = self.best().commit  # the best may have moved while it proposed
            tree.restore(before, tree.changed_since(before))
            tree.reset_to(best_commit)
            trial_id = self._begin(Kind.CANDIDATE, f"proposal failed: {what}", proposer.name, None, best_commit,
                                   usage=usage, scratch=scratch)
            self.ledger.update(trial_id, status=Status.CRASH, failure=failure, reason=reason)
            self._tell(plan, self.ledger.trial(trial_id))
            if broken:
                raise LabError(f"{reason}. The lab stops rather than trust them: put them back and run again.")
            return
        if description is None:
            tree.restore(before, tree.changed_since(before))
            shutil.rmtree(scratch, ignore_errors=True)
            return
        trial = self._try(plan, " ".join(description.split()), lambda: self.candidate(
            description, proposer.name, usage, before=before, tree=tree, scratch=scratch, measure_best=False))
        self._tell(plan, replace(trial, proposer_usage=usage or {}))
        self._decided(plan, trial)
