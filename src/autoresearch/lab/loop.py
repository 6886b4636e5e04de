"""The research loop: baseline, then propose -> trial -> decide -> record, until told to stop.

Every step is recorded in the ledger before it is acted on, so the loop can be killed at any point
(Ctrl-C, kill -9, a reboot) and `resume()` finds a consistent state: trials that were in flight are
recorded as crashed, their processes killed, and git is put back on the best commit.
"""
from __future__ import annotations

import statistics
import threading
import time
from dataclasses import dataclass
from typing import Callable

from ..errors import UserError
from .decide import Decision, decide, noise_floor
from .ledger import Ledger, Trial
from .proposer import ProposalContext, Proposer, backoff_seconds, consecutive_failures
from .trial import TrialOutcome, kill_trial_processes, run_trial
from .workspace import CONFIG_FILE, Workspace


class LabError(UserError):
    """The loop cannot go on (a crashing baseline, a changed harness); the message says why."""


@dataclass
class Best:
    commit: str
    values: list[float]

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values)


class Lab:
    def __init__(self, ws: Workspace, log: Callable[[str], None] = print):
        self.ws = ws
        self.ledger = Ledger(ws.ledger_path, ws.results_tsv)
        self.log = log
        self.stop = threading.Event()

    def close(self) -> None:
        self.ledger.close()

    # --- state derived from the ledger ------------------------------------------------------------
    def best(self) -> Best | None:
        kept = [t for t in self.ledger.trials(status="keep") if t.val_bpb is not None]
        if not kept:
            return None
        commit = kept[-1].commit_sha
        return Best(commit, [t.val_bpb for t in kept if t.commit_sha == commit])

    def sigma(self) -> float | None:
        return self.ledger.get_meta("sigma")

    def context(self) -> ProposalContext:
        best = self.best()
        return ProposalContext(self.ws.root, list(self.ws.config["allowed_files"]), self.ws.config["profile"],
                               self.ws.time_budget, best.commit, best.mean, self.sigma(), self.ledger.trials())

    # --- recovery ---------------------------------------------------------------------------------
    def resume(self) -> list[int]:
        """Make the state consistent after an unclean stop; returns the ids of interrupted trials."""
        interrupted = []
        for t in self.ledger.trials(status="running"):
            kill_trial_processes(f"{self.ws.config['id']}:{t.id}")
            self.ledger.update(t.id, status="crash", reason="interrupted: the lab stopped during this trial")
            interrupted.append(t.id)
        best = self.best()
        self.ws.reset_to(best.commit if best else self.ws.config["base_commit"])
        return interrupted

    # --- running one commit -----------------------------------------------------------------------
    def _measure(self, trial_id: int, seed: int | None) -> TrialOutcome:
        before = self.ledger.snapshot()
        outcome = run_trial(self.ws, trial_id, seed, self.ledger.content, self.stop)
        if outcome.reason.startswith("tampering: the ledger"):
            self.ledger.restore(before)  # the record is put back as it was before the trial
        self.ledger.update(
            trial_id,
            val_bpb=outcome.val_bpb,
            reason=outcome.reason,
            trainer_summary={**outcome.summary, "log_tail": outcome.log_tail} if outcome.crashed else outcome.summary,
            training_seconds=outcome.training_seconds,
            total_seconds=outcome.total_seconds,
            total_tokens_m=outcome.summary.get("total_tokens_M"),
            num_steps=int(outcome.summary["num_steps"]) if "num_steps" in outcome.summary else None,
            mfu_percent=outcome.summary.get("mfu_percent"),
            peak_vram_mb=outcome.summary.get("peak_vram_mb"),
            hardware=outcome.hardware,
        )
        return outcome

    def _begin(self, kind: str, description: str, proposer: str, commit: str | None, parent: str | None,
               diff: str = "", seed: int | None = None, usage: dict | None = None) -> int:
        trial_id = self.ledger.begin(kind=kind, proposer=proposer, description=description, commit_sha=commit,
                                     parent_sha=parent, diff=diff, seed=seed)
        self.ledger.update(trial_id, log_path=str(self.ws.trial_dir(trial_id) / "train.log"),
                           proposer_usage=usage or {})
        return trial_id

    def _drop_checkpoint(self, trial_id: int) -> None:
        (self.ws.trial_dir(trial_id) / "checkpoint.pt").unlink(missing_ok=True)

    # --- the baseline -----------------------------------------------------------------------------
    def baseline(self) -> Best | None:
        """Run the unedited train.py under `baseline_runs` seeds; their spread is the noise floor.
        None if the lab was told to stop before the baseline was complete."""
        self.ws.check_fingerprint()
        base = self.ws.config["base_commit"]
        runs = [t for t in self.ledger.trials(kind="baseline") if t.status == "keep"]
        wanted = self.ws.rule.baseline_runs
        while len(runs) < wanted and not self.stop.is_set():
            seed = None if not runs else len(runs)
            self.log(f"baseline run {len(runs) + 1}/{wanted} (seed {'of train.py' if seed is None else seed})")
            trial_id = self._begin("baseline", "baseline" if seed is None else f"baseline (seed {seed})",
                                   "baseline", base, None, seed=seed)
            outcome = self._measure(trial_id, seed)
            if outcome.crashed:
                self.ledger.update(trial_id, status="crash")
                if self.stop.is_set():
                    return None
                raise LabError(f"The baseline crashed: {outcome.reason}\n{outcome.log_tail}\nFix train.py (its "
                               f"log: {self.ws.trial_dir(trial_id) / 'train.log'}) and run again.")
            self.ledger.update(trial_id, status="keep", decision={"why": "baseline"})
            runs.append(self.ledger.trial(trial_id))
            self.log(f"  val_bpb {outcome.val_bpb:.6f}")
        if len(runs) < wanted:
            return None
        values = [t.val_bpb for t in runs]
        self.ledger.set_meta("sigma", noise_floor(values))
        return Best(base, values)

    # --- one candidate ----------------------------------------------------------------------------
    def candidate(self, description: str, proposer: str, usage: dict | None = None) -> Trial:
        """Audit, commit, run and decide on the edit now in the working tree. `usage` is what the
        proposal cost (tokens, dollars, seconds), recorded with the trial."""
        self.ws.check_fingerprint()
        best = self.best()
        if best is None:
            raise LabError("There is no baseline yet: run `autoresearch baseline` (or `autoresearch run`) first.")
        description = " ".join(description.split()) or "(no description)"
        changed = self.ws.changed_files()
        allowed = set(self.ws.config["allowed_files"])
        if not changed:
            trial_id = self._begin("candidate", description, proposer, None, best.commit, usage=usage)
            self.ledger.update(trial_id, status="discard", reason="no change: the proposal edited nothing")
            return self.ledger.trial(trial_id)
        forbidden = [f for f in changed if f not in allowed]
        if forbidden:
            diff = self.ws.working_diff()
            self.ws.reset_to(best.commit)
            trial_id = self._begin("candidate", description, proposer, None, best.commit, diff, usage=usage)
            self.ledger.update(trial_id, status="crash",
                               reason=f"rejected edit: only {', '.join(sorted(allowed))} may change, but "
                                      f"{', '.join(forbidden)} did; the edit was undone")
            return self.ledger.trial(trial_id)
        commit = self.ws.commit(changed, description)
        trial_id = self._begin("candidate", description, proposer, commit, best.commit,
                               self.ws.diff(best.commit, commit), usage=usage)
        self.log(f"trial {trial_id}: {description}")
        rows, values = [trial_id], []
        decision: Decision | None = None
        while True:
            seed = None if not values else len(values)
            outcome = self._measure(rows[-1], seed)
            if outcome.crashed:
                break
            values.append(outcome.val_bpb)
            decision = decide(self.ws.rule, best.values, values, self.sigma())
            if decision.action != "rerun" or self.stop.is_set():
                break
            self.log(f"  val_bpb {outcome.val_bpb:.6f}: borderline, re-running under seed {len(values)}")
            rows.append(self._begin("rerun", f"rerun (seed {len(values)}): {description}", proposer, commit,
                                    best.commit, seed=len(values)))
        if outcome.crashed and not values:
            status, why = "crash", {"why": outcome.reason}
        elif decision is None or decision.action == "rerun" or outcome.crashed:
            status = "discard"
            why = {"why": "a rerun crashed or the lab stopped before the reruns were done", "values": values}
        else:
            status, why = decision.action, {**decision.to_dict(), "values": values, "best_values": best.values}
        for row in rows:  # a candidate's reruns share its fate; only a run that crashed says so
            crashed_here = row == rows[-1] and outcome.crashed
            self.ledger.update(row, status="crash" if crashed_here else status, decision=why)
        if status != "keep":
            self.ws.reset_to(best.commit)
            for row in rows:
                self._drop_checkpoint(row)
        shown = f"val_bpb {statistics.fmean(values):.6f}" if values else outcome.reason
        self.log(f"  {status}: {shown}" + (f" ({decision.why})" if decision and status != "crash" else ""))
        return self.ledger.trial(trial_id)

    def drift_check(self) -> None:
        """Re-run the best commit to see whether the measurement has moved (hardware, heat, load)."""
        best = self.best()
        seed = len(best.values)
        trial_id = self._begin("drift", f"drift check: best {best.commit[:7]} again (seed {seed})", "lab",
                               best.commit, best.commit, seed=seed)
        outcome = self._measure(trial_id, seed)
        if outcome.crashed:
            self.ledger.update(trial_id, status="crash")
            return
        sigma = self.sigma() or 0.0
        moved = outcome.val_bpb - best.mean
        drifted = sigma > 0 and abs(moved) > 3 * sigma
        self.ledger.update(trial_id, status="keep", decision={"why": "drift check", "moved": moved, "drifted": drifted})
        if drifted:
            self.log(f"  drift: the best commit now measures {outcome.val_bpb:.6f}, {moved:+.6f} from its mean")

    # --- the loop ---------------------------------------------------------------------------------
    def backoff(self, proposer: Proposer, history: list[Trial]) -> float:
        """Seconds to wait before asking `proposer` again, after its proposals failed in a row."""
        failures = consecutive_failures(history, proposer.name)
        wait = backoff_seconds(failures, getattr(proposer, "failure_backoff", 0.0), getattr(proposer, "backoff_after", 3))
        if wait:
            self.log(f"waiting {wait:g} s before the next proposal: the last {failures} failed")
        return wait

    def run(self, proposer: Proposer, max_trials: int | None = None, max_hours: float | None = None) -> None:
        started = time.time()
        interrupted = self.resume()
        if interrupted:
            self.log(f"resumed: trial(s) {', '.join(map(str, interrupted))} were interrupted and recorded as crashed")
        if self.baseline() is None:
            return
        done = 0
        rule = self.ws.rule
        while not self.stop.is_set():
            if max_trials is not None and done >= max_trials:
                self.log(f"stopping: {max_trials} trial(s) done")
                break
            if max_hours is not None and time.time() - started > max_hours * 3600:
                self.log(f"stopping: {max_hours:g} hour(s) passed")
                break
            ctx = self.context()
            if self.stop.wait(self.backoff(proposer, ctx.history)):
                break
            ledger_before, content_before = self.ledger.snapshot(), self.ledger.content()
            config_path = self.ws.lab_dir / CONFIG_FILE
            config_before = config_path.read_bytes()
            try:
                description = proposer.propose(ctx)
                # An agent with a shell could rewrite the record while it proposes: put it back.
                if self.ledger.content() != content_before or config_path.read_bytes() != config_before:
                    self.ledger.restore(ledger_before)
                    config_path.write_bytes(config_before)
                    raise RuntimeError("tampering: the proposer wrote into the ledger or .autoresearch/config.json; "
                                       "both were restored")
            except Exception as e:  # a proposer's failure is recorded; the loop goes on
                best_commit = self.best().commit
                self.ws.reset_to(best_commit)
                trial_id = self._begin("candidate", f"proposal failed: {type(e).__name__}", proposer.name,
                                       None, best_commit, usage=getattr(proposer, "last_usage", None))
                self.ledger.update(trial_id, status="crash", reason=f"proposer error: {e}")
                proposer.tell(self.ledger.trial(trial_id))
                done += 1
                continue
            if description is None:
                self.log("stopping: " + (getattr(proposer, "stop_reason", "") or "the proposer has nothing more to propose"))
                break
            trial = self.candidate(description, proposer.name, getattr(proposer, "last_usage", None))
            proposer.tell(trial)
            done += 1
            if rule.drift_every and done % rule.drift_every == 0 and not self.stop.is_set():
                self.drift_check()
