"""The research loop: baseline, then propose -> trial -> decide -> record, until told to stop.

Every step is recorded in the ledger before it is acted on, so the loop can be stopped at any point
(Ctrl-C, kill -9, a reboot) and `resume()` finds a consistent state: a trial in flight is recorded
as stopped, the sandboxes die with their supervisor, git is put back on the best commit, and a
stopped candidate is run again before anything new is proposed.
"""
from __future__ import annotations

import statistics
import threading
import time
from pathlib import Path
from typing import Callable

from ..errors import UserError
from . import sandbox
from .decide import Action, Best, Decision, RuleName, best_runs_missing, current_best, decide, next_seed
from .ledger import Ledger, Trial
from .noise import NoiseEstimate, by_device, detect_change, measurements, workspace_noise
from .outcomes import Failure, Kind, Status
from .proposer import ProposalContext, Proposer, backoff_seconds, consecutive_failures
from .trial import Slot, TrialOutcome, kill_trial_processes, run_trial
from .workspace import SETTINGS_FILE, Workspace, WorkspaceError

CONFIG_HASH = "config_sha256"  # ledger meta: the lab's config as the lab last left it
NOISE_SINCE = "noise_since"  # ledger meta: the first trial of the current noise epoch (a change starts a new one)
MAX_TRAINER_BYTES = 1 << 20  # a train.py this large carries data (weights), not code


class LabError(UserError):
    """The loop cannot go on (a crashing baseline, a changed harness); the message says why."""


def default_slot() -> Slot:
    """One slot on the best device here: the GPUs the driver lists, else the CPU."""
    gpus = sorted(Path("/proc/driver/nvidia/gpus").glob("*")) if Path("/proc/driver/nvidia/gpus").is_dir() else []
    return Slot("cuda") if gpus else Slot("cpu")


class Lab:
    def __init__(self, ws: Workspace, log: Callable[[str], None] = print, *, sandboxed: bool = True,
                 slot: Slot | None = None):
        self.ws = ws
        self.ledger = Ledger(ws.ledger_path, ws.results_tsv)
        self.log = log
        self.stop = threading.Event()
        self.sandboxed = sandboxed
        self.slot = slot or default_slot()
        self.current: tuple[int, Path] | None = None  # the trial in flight and its log, for progress views

    def close(self) -> None:
        self.ledger.close()

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

    def noise(self) -> NoiseEstimate:
        """The noise model, learnt from every repeated measurement of this epoch on this class of device."""
        return workspace_noise(self.ledger.trials(), self.device_class, self.ws.rule, self.since())

    def context(self) -> ProposalContext:
        best = self.best()
        return ProposalContext(self.ws.root, list(self.ws.config["allowed_files"]), self.ws.config["profile"],
                               self.ws.time_budget, best.commit, best.mean, self.noise().sigma, self.ledger.trials())

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
                   and t.status in (Status.KEEP, Status.DISCARD, Status.CRASH)}
        again, seen = [], set()
        for t in trials:
            if (t.status == Status.STOPPED and t.kind in (Kind.CANDIDATE, Kind.RERUN) and t.commit_sha
                    and t.commit_sha not in decided and t.commit_sha not in seen):
                seen.add(t.commit_sha)
                again.append(t)
        return again

    # --- running one commit -----------------------------------------------------------------------
    def _measure(self, trial_id: int, commit: str, seed: int | None) -> TrialOutcome:
        before = self.ledger.snapshot()
        content = self.ledger.content()
        self.current = (trial_id, self.ws.trial_dir(trial_id) / "train.log")
        try:
            outcome = run_trial(self.ws, trial_id, commit, seed, slot=self.slot, sandboxed=self.sandboxed,
                                stop=self.stop)
        finally:
            self.current = None
        if self.ledger.content() != content:  # only an unsandboxed trainer can reach the ledger
            self.ledger.restore(before)
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
            hardware=outcome.hardware,
            device_class=outcome.device_class,
            tokens_per_second=outcome.tokens_per_second,
            sandboxed=outcome.sandboxed,
        )
        if outcome.stopped:
            self.ledger.update(trial_id, status=Status.STOPPED)
        return outcome

    def _begin(self, kind: Kind, description: str, proposer: str, commit: str | None, parent: str | None,
               diff: str = "", seed: int | None = None, usage: dict | None = None) -> int:
        trial_id = self.ledger.begin(kind=kind, proposer=proposer, description=description, commit_sha=commit,
                                     parent_sha=parent, diff=diff, seed=seed)
        self.ledger.update(trial_id, log_path=str(self.ws.trial_dir(trial_id) / "train.log"),
                           proposer_usage=usage or {}, sandboxed=self.sandboxed)
        return trial_id

    def _drop_checkpoint(self, trial_id: int) -> None:
        (self.ws.trial_dir(trial_id) / "checkpoint.pt").unlink(missing_ok=True)

    # --- the baseline and the best -------------------------------------------------------------------
    def baseline(self) -> Best | None:
        """Run the unedited train.py under `baseline_runs` seeds: the first best, and the first estimate of
        the noise. Then make sure the best is measured enough here (measure_best). None if the lab was
        told to stop first."""
        self.check_ready()
        base = self.ws.config["base_commit"]
        runs = [t for t in self.ledger.trials(kind=Kind.BASELINE) if t.status == Status.KEEP]
        wanted = self.ws.rule.baseline_runs
        while len(runs) < wanted and not self.stop.is_set():
            seed = None if not runs else len(runs)
            self.log(f"baseline run {len(runs) + 1}/{wanted} (seed {'of train.py' if seed is None else seed})")
            trial_id = self._begin(Kind.BASELINE, "baseline" if seed is None else f"baseline (seed {seed})",
                                   "baseline", base, None, seed=seed)
            outcome = self._measure(trial_id, base, seed)
            if outcome.stopped:
                return None
            if outcome.crashed:
                self.ledger.update(trial_id, status=Status.CRASH)
                raise LabError(f"The baseline crashed: {outcome.reason}\n{outcome.log_tail}\nFix train.py (its "
                               f"log: {self.ws.trial_dir(trial_id) / 'train.log'}) and run again.")
            self.ledger.update(trial_id, status=Status.KEEP, decision={"why": "baseline"})
            runs.append(self.ledger.trial(trial_id))
            self.log(f"  val_bpb {outcome.val_bpb:.6f}")
        if len(runs) < wanted or not self.measure_best():
            return None
        return self.best()

    def measure_best(self) -> bool:
        """Run the best again until it has the fresh runs the rule asks for on this device in this epoch
        (after a keep, after a change of the machine, on another device class). False if stopped."""
        while not self.stop.is_set():
            best = self.best()
            if best is None:
                best = Best(self.ws.config["base_commit"], (), (), 0)
            if not best_runs_missing(self.ws.rule, best):
                return True
            self.log(f"measuring the best ({best.commit[:7]}) again: {len(best.fresh)} fresh run(s) of "
                     f"{self.ws.rule.baseline_runs} here")
            if not self.run_best(best, "to measure candidates against", check_drift=False) and not self.stop.is_set():
                raise LabError(f"The best commit {best.commit[:7]} crashed when run again (trial "
                               f"{self.ledger.trials()[-1].id}: {self.ledger.trials()[-1].reason}). The machine or the "
                               "data may have changed; look at that trial's log, then run again.")
        return False

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
                  before: dict | None = None) -> Trial:
        """Audit, commit, run and decide on the edit now in the working tree. `before` is the working
        tree's snapshot from before the proposal (ws.snapshot()): what the proposal changed besides
        train.py is then undone, exactly that. Without it (a coding agent that ran `autoresearch trial`
        by hand), the lab cannot tell the agent's edits from the person's, so it leaves other files as
        they are and reads train.py alone. `usage` is what the proposal cost, recorded with the trial."""
        self.check_ready()
        if self.best() is None:
            raise LabError("There is no baseline yet: run `autoresearch baseline` (or `autoresearch run`) first.")
        if not self.measure_best():
            raise LabError("Stopped while measuring the best again; the edit in train.py is untouched.")
        best = self.best()
        description = " ".join(description.split()) or "(no description)"
        allowed = list(self.ws.config["allowed_files"])
        changed = self.ws.changed_since(before) if before is not None else self.ws.changed_files()
        others = [f for f in changed if f not in allowed]
        edits = [f for f in changed if f in allowed]
        if others and before is not None:
            diff = self.ws.working_diff(changed)
            self.ws.restore(before, others)
            self.ws.reset_to(best.commit)
            trial_id = self._begin(Kind.CANDIDATE, description, proposer, None, best.commit, diff, usage=usage)
            what = "autoresearch.toml belongs to people" if SETTINGS_FILE in others else "only the allowed files may change"
            self.ledger.update(trial_id, status=Status.CRASH, failure=Failure.REJECTED_EDIT,
                               reason=f"rejected edit: {what}: only {', '.join(allowed)} may change, but "
                                      f"{', '.join(others)} did; exactly those changes were undone")
            return self._told(trial_id)
        if others:
            self.log(f"note: {', '.join(others)} differ from the last commit; left as they are (only "
                     f"{', '.join(allowed)} is read)")
        if not edits:
            trial_id = self._begin(Kind.CANDIDATE, description, proposer, None, best.commit, usage=usage)
            self.ledger.update(trial_id, status=Status.EMPTY, reason="no change: the proposal edited nothing")
            return self._told(trial_id)
        too_big = [f for f in edits if (self.ws.root / f).is_file() and (self.ws.root / f).stat().st_size > MAX_TRAINER_BYTES]
        if too_big:
            diff = f"({', '.join(too_big)} larger than {MAX_TRAINER_BYTES >> 10} KiB: not shown)"
            self.ws.reset_to(best.commit)
            trial_id = self._begin(Kind.CANDIDATE, description, proposer, None, best.commit, diff, usage=usage)
            self.ledger.update(trial_id, status=Status.CRASH, failure=Failure.REJECTED_EDIT,
                               reason=f"rejected edit: {', '.join(too_big)} is over {MAX_TRAINER_BYTES >> 10} KiB; "
                                      "a train.py that large carries data (weights), not code; the edit was undone")
            return self._told(trial_id)
        commit = self.ws.commit(edits, description)
        return self.evaluate(commit, description, proposer, best, usage)

    def _told(self, trial_id: int) -> Trial:
        """A proposal that ended before anything ran, as recorded, and said in the log."""
        trial = self.ledger.trial(trial_id)
        self.log(f"trial {trial.id}: {trial.description}\n  {trial.status}: {trial.reason}")
        return trial

    def evaluate(self, commit: str, description: str, proposer: str, best: Best, usage: dict | None = None) -> Trial:
        """Measure `commit` (a child of the best) under the rule: more runs only while the decision is open,
        the best measured again where the noise or the best is not known well enough to decide. Keep it,
        or put the best back."""
        trial_id = self._begin(Kind.CANDIDATE, description, proposer, commit, best.commit,
                               self.ws.diff(best.commit, commit), usage=usage)
        self.log(f"trial {trial_id}: {description}")
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
            decision = decide(self.ws.rule, best.reference(self.ws.rule), runs, self.noise())
            while decision.action == Action.MEASURE and not self.stop.is_set():
                self.log(f"  {decision.why}")
                if not self.run_best(best, "the noise is not known well enough to decide", check_drift=False):
                    break
                best = self.best()
                decision = decide(self.ws.rule, best.reference(self.ws.rule), runs, self.noise())
            if decision.action != Action.RERUN or self.stop.is_set():
                break
            self.log(f"  val_bpb {outcome.val_bpb:.6f}: {decision.why}")
            rows.append(self._begin(Kind.RERUN, f"rerun: {description}", proposer, commit, best.commit))
        values = [v for v, _ in runs]
        if outcome is not None and outcome.stopped or (outcome is None and self.stop.is_set()):
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
        for row in rows:  # a candidate's reruns share its fate; only a run that crashed says so
            crashed_here = row == rows[-1] and outcome is not None and outcome.crashed
            self.ledger.update(row, status=Status.CRASH if crashed_here else status, decision=why)
        if status != Status.KEEP:
            self.ws.reset_to(best.commit)
            for row in rows:
                self._drop_checkpoint(row)
        shown = f"val_bpb {statistics.fmean(values):.6f}" if values else (outcome.reason if outcome else "stopped")
        self.log(f"  {status}: {shown}" + (f" ({decision.why})" if decision and status in (Status.KEEP, Status.DISCARD) else ""))
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
        """Propose, run and decide until told to stop, the proposer runs out, or `max_trials` or
        `max_hours` are reached; then, with `confirm_runs`, confirm the best (lab.confirm)."""
        started = time.time()
        self.check_ready()
        again = self.resume()
        if self.baseline() is None:
            return
        done = 0
        for stopped in again:
            if self.stop.is_set():
                return
            self.log(f"resuming: trial {stopped.id} was stopped, running it again")
            best = self.best()
            if stopped.parent_sha != best.commit:  # the best moved on since: it is proposed anew instead
                self.log(f"  (skipped: it was built on {stopped.parent_sha[:7]}, the best is now {best.commit[:7]})")
                continue
            self.ws.reset_to(stopped.commit_sha)
            trial = self.evaluate(stopped.commit_sha, stopped.description, stopped.proposer, best,
                                  stopped.proposer_usage)
            proposer.tell(trial)
            done += 1
        rule = self.ws.rule
        while not self.stop.is_set():
            if max_trials is not None and done >= max_trials:
                self.log(f"stopping: {max_trials} trial(s) done")
                self.finish(confirm_runs)
                break
            if max_hours is not None and time.time() - started > max_hours * 3600:
                self.log(f"stopping: {max_hours:g} hour(s) passed")
                self.finish(confirm_runs)
                break
            if not self.measure_best():
                break
            ctx = self.context()
            if self.stop.wait(self.backoff(proposer, ctx.history)):
                break
            ledger_before, content_before = self.ledger.snapshot(), self.ledger.content()
            integrity = self.ws.integrity()
            before = self.ws.snapshot()
            failure = reason = None
            what = "tampering"  # the failed proposal's title in the record
            broken = False  # the lab's config, the harness or the data changed: the lab stops
            try:
                description = proposer.propose(ctx)
            except Exception as e:  # a proposer's failure is recorded; the loop goes on
                failure, reason, description, what = Failure.PROPOSER, f"proposer error: {e}", "", type(e).__name__
            if self.ledger.content() != content_before:  # a proposer with a shell could rewrite the record
                self.ledger.restore(ledger_before)
                failure, reason = Failure.TAMPERING, "tampering: the proposer wrote into the ledger; it was restored"
            try:
                self.ws.check_integrity(integrity)
            except WorkspaceError as e:
                failure, reason, broken = Failure.TAMPERING, f"tampering: while the proposer ran, {e}", True
            if failure is not None:
                best_commit = self.best().commit
                self.ws.restore(before, self.ws.changed_since(before))
                self.ws.reset_to(best_commit)
                trial_id = self._begin(Kind.CANDIDATE, f"proposal failed: {what}", proposer.name, None,
                                       best_commit, usage=proposer.last_usage)
                self.ledger.update(trial_id, status=Status.CRASH, failure=failure, reason=reason)
                proposer.tell(self.ledger.trial(trial_id))
                if broken:
                    raise LabError(f"{reason}. The lab stops rather than trust them: put them back and run again.")
                done += 1
                continue
            if description is None:
                self.log("stopping: " + (proposer.stop_reason or "the proposer has nothing more to propose"))
                break
            trial = self.candidate(description, proposer.name, proposer.last_usage, before=before)
            proposer.tell(trial)
            if trial.status != Status.STOPPED:
                done += 1
            if rule.drift_every and done % rule.drift_every == 0 and not self.stop.is_set():
                self.run_best(self.best(), "to see whether the measurement has moved")
