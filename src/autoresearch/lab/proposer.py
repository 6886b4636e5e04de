"""The proposer interface: who writes the next change. The only part of the lab proposers import.

A proposer edits the allowed files in the workspace (for now, train.py) and says in one line what
it changed. The lab audits whatever it did, so a proposer needs no trust: files outside the allowed
ones are restored and the edit is recorded as rejected.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path

from .ledger import Trial
from .outcomes import Failure, Status


@dataclass
class ProposalContext:
    workspace: Path  # the working tree to edit: the workspace's own, or the worktree of this proposal's slot
    allowed_files: list[str]
    profile: str
    time_budget: float
    best_commit: str
    best_val_bpb: float  # mean over the best commit's runs
    sigma: float | None  # the noise: spread of val_bpb across seeds of the same code (lab.noise)
    history: list[Trial] = field(default_factory=list)  # every trial so far, oldest first
    seq_len: int | None = None  # tokens per row the harness trains and scores on (for batch-size arithmetic)
    slot: int = 0  # which of the lab's trial slots this proposal is for
    scratch: Path | None = None  # a folder of the lab's for this proposal alone (transcripts, notes); None: none
    in_flight: list[str] = field(default_factory=list)  # what the other slots are trying right now


class Proposer:
    """Who writes the next change: the interface every proposer implements, with its defaults.

    A subclass sets `name` and implements `propose`; `tell` is optional. The lab reads the attributes
    below after each proposal and relies on nothing else: `last_usage` is what the last proposal cost
    (LLM tokens, dollars, seconds; None: nothing to record), recorded with the trial; it is kept per
    thread, so that proposals made at once each report their own; `failure_backoff` (seconds, 0:
    never) and `backoff_after` make the lab wait before asking again after proposals that failed in
    a row (backoff_seconds), and the lab waits, so that a stop ends the wait at once; `stop_reason`
    says why `propose` returned None.

    With several trial slots the lab asks one proposal per slot, each in the slot's own working tree,
    and tells each outcome as it comes (in any order). Unless `concurrent` is True, it never calls
    `propose` or `tell` while another call to either is running.
    """

    name: str = "proposer"
    concurrent: bool = False  # propose() may run in several threads at once
    failure_backoff: float = 0.0
    backoff_after: int = 3
    stop_reason: str = ""

    @property
    def last_usage(self) -> dict | None:
        return getattr(self._usage(), "value", None)

    @last_usage.setter
    def last_usage(self, value: dict | None) -> None:
        self._usage().value = value

    def _usage(self) -> threading.local:
        local = self.__dict__.get("_last_usage")
        if local is None:
            local = self.__dict__.setdefault("_last_usage", threading.local())
        return local

    def propose(self, ctx: ProposalContext) -> str | None:
        """Edit files in ctx.workspace and return a one-line description; None when out of ideas."""
        raise NotImplementedError

    def tell(self, trial: Trial) -> None:
        """Hear how a proposal ended (its status, val_bpb and reason)."""


def consecutive_failures(history: list[Trial], proposer: str) -> int:
    """How many of this proposer's latest proposals in a row failed (raised)."""
    n = 0
    for t in reversed([t for t in history if t.kind == "candidate" and t.proposer == proposer]):
        if t.status == Status.CRASH and t.failure == Failure.PROPOSER:
            n += 1
        else:
            break
    return n


def backoff_seconds(failures: int, base: float, after: int = 3, cap: float = 600.0) -> float:
    """Seconds to wait before proposing again after `failures` failed proposals in a row: none for
    the first `after`, then `base`, doubling up to `cap`. A broken key or a dead endpoint at 2 a.m.
    then costs a row every few minutes, not thousands of rows."""
    if base <= 0 or failures < after:
        return 0.0
    return min(base * 2 ** (failures - after), cap)


def check_settings(section: str, settings: dict, known: set[str]) -> None:
    """ValueError naming the keys of a proposer's config section that it does not know: a typo in
    a setting should stop the run at once, not be ignored all night."""
    unknown = sorted(set(settings) - known)
    if unknown:
        raise ValueError(f"[{section}] has unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
