"""The proposer interface: who writes the next change. The only part of the lab proposers import.

A proposer edits the allowed files in the workspace (for now, train.py) and says in one line what
it changed. The lab audits whatever it did, so a proposer needs no trust: files outside the allowed
ones are restored and the edit is recorded as rejected.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from .ledger import Trial


@dataclass
class ProposalContext:
    workspace: Path
    allowed_files: list[str]
    profile: str
    time_budget: float
    best_commit: str
    best_val_bpb: float  # mean over the best commit's runs
    sigma: float | None  # the noise floor: spread of val_bpb across seeds of the baseline
    history: list[Trial] = field(default_factory=list)  # every trial so far, oldest first


class Proposer(Protocol):
    """`last_usage`, if a proposer has it, is a dict of what its last proposal cost (e.g. LLM
    tokens, dollars, seconds); the lab records it with the trial."""

    name: str

    def propose(self, ctx: ProposalContext) -> str | None:
        """Edit files in ctx.workspace and return a one-line description; None when out of ideas."""

    def tell(self, trial: Trial) -> None:
        """Hear how a proposal ended (keep, discard or crash, with val_bpb and reason)."""
