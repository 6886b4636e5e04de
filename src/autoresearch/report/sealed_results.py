"""The sealed test's results as the lab cached them (lab.sealed): one row for the baseline and one for
the best commit, each with its test val_bpb or a note that says why there is none yet.

Reading only. The report runs no code of any train.py: `autoresearch report` first has the lab score
what is missing (lab.sealed.score, in its sandboxes, holding the workspace's lock), then reads.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

from autoresearch.lab.sealed import Role, read_cache, scored, subjects

from .data import Analysis


@dataclass
class TestResult:
    __test__ = False  # not a test class, whatever its name says to pytest

    role: Role
    commit: str | None
    test_bpb: float | None = None
    trial_id: int | None = None  # the kept run whose checkpoint was (or is to be) scored
    note: str = ""  # when it was scored, or why there is no number


def sealed_results(a: Analysis) -> list[TestResult]:
    """The baseline's and the best's sealed-test rows (one row while the best is the baseline)."""
    cache = read_cache(a.ws)
    rows = []
    for subject in subjects(a.ws, a.trials):
        entry = cache.get(subject.commit) or {}
        if scored(entry):
            when = time.strftime("%Y-%m-%d %H:%M", time.localtime(entry.get("evaluated_at") or 0))
            rows.append(TestResult(subject.role, subject.commit, float(entry["test_bpb"]), entry.get("trial"),
                                   f"scored {when}"))
            continue
        if subject.trial_id is None:
            note = "no kept run to score"
        elif subject.checkpoint is None:
            note = (f"no kept checkpoint to score: trial {subject.trial_id}'s and those of the commit's other runs "
                    "are gone")
        elif entry.get("error"):
            note = f"scoring failed: {entry['error']}; `autoresearch report` tries again"
        else:
            note = "not scored yet: `autoresearch report` scores it when no lab is running"
        rows.append(TestResult(subject.role, subject.commit, None, subject.trial_id, note))
    return rows
