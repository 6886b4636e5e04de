"""The named values the ledger stores: what a trial was run for, how it ended, and why it failed.

Code compares these values, never the wording of a reason: the reason is for people. Each value is
a `str`, so the ledger stores it as plain text and older readers still see the same words.
"""
from __future__ import annotations

from enum import Enum


class NamedValue(str, Enum):
    def __str__(self) -> str:  # the stored text, also inside f-strings
        return self.value


class Kind(NamedValue):
    """Why a trial ran."""

    BASELINE = "baseline"  # the unedited train.py, under several seeds: the first best
    CANDIDATE = "candidate"  # a proposal's first run
    RERUN = "rerun"  # another run of a candidate, while its decision is open
    DRIFT = "drift"  # the best again, to see whether the measurement moved
    CONFIRM = "confirm"  # the best or the baseline again, with fresh seeds, after the loop
    ABLATION = "ablation"  # the best with one kept change reverted


class Status(NamedValue):
    """How a trial ended. Only KEEP and DISCARD are decisions; the rest say why there is none."""

    RUNNING = "running"
    KEEP = "keep"
    DISCARD = "discard"
    CRASH = "crash"  # no val_bpb: `failure` says why
    STOPPED = "stopped"  # the user (Ctrl-C) or the lab's own death stopped it; it is run again on resume
    EMPTY = "empty"  # the proposal changed nothing: recorded, not a candidate
    LOST = "lost"  # the machine running it went away; it is run again elsewhere
    # It beat the best it was built on, but another candidate was kept meanwhile: its edit is applied
    # onto the new best and measured there, as a candidate of its own, before anything is kept.
    SUPERSEDED = "superseded"


FINISHED = frozenset({Status.KEEP, Status.DISCARD, Status.CRASH, Status.STOPPED, Status.EMPTY, Status.LOST,
                      Status.SUPERSEDED})
RUN_AGAIN = frozenset({Status.STOPPED, Status.LOST})  # no decision was made: the lab runs these again


class Failure(NamedValue):
    """Why a crashed trial has no val_bpb."""

    SYNTAX = "syntax"  # train.py does not compile
    IMPORT = "import"  # it imports something that is not installed
    EXIT = "exit"  # it exited with an error of its own
    OOM = "oom"  # it ran out of memory
    DIVERGED = "diverged"  # its loss went to NaN or blew up
    STARTUP_TIMEOUT = "startup-timeout"  # it did not start training within the start-up limit
    OVER_BUDGET = "over-budget"  # by the lab's clock it trained longer than the budget
    NO_DATA = "no-data"  # it never drew a batch from the lab
    NO_CHECKPOINT = "no-checkpoint"  # it ended without handing over a checkpoint
    HANG = "hang"  # it did not exit after handing over its checkpoint
    CAUSALITY = "causality"  # its model's answers depend on tokens ahead, on batch-mates or on the past
    SCORING = "scoring"  # its checkpoint could not be scored (build_model, shapes, NaN)
    SANDBOX = "sandbox"  # the sandbox around it could not be set up
    TAMPERING = "tampering"  # a file of the lab's changed while it ran
    REJECTED_EDIT = "rejected-edit"  # the proposal changed files other than train.py
    PROPOSER = "proposer"  # the proposer failed to propose


# What older ledgers (schema 1) wrote before a reason's first colon, for the one-time migration.
LEGACY_REASONS = {
    "syntax error": Failure.SYNTAX, "import error": Failure.IMPORT, "exit": Failure.EXIT, "OOM": Failure.OOM,
    "NaN": Failure.DIVERGED, "timeout": Failure.STARTUP_TIMEOUT, "over budget": Failure.OVER_BUDGET,
    "no data": Failure.NO_DATA, "causality violation": Failure.CAUSALITY, "evaluation": Failure.SCORING,
    "tampering": Failure.TAMPERING, "rejected edit": Failure.REJECTED_EDIT, "proposer error": Failure.PROPOSER,
    "stray processes": Failure.EXIT,
}


def legacy_failure(reason: str) -> Failure | None:
    head = (reason or "").partition(":")[0].strip()
    return LEGACY_REASONS.get(head)
