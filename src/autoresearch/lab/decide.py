"""Keep or discard: a candidate is kept only when its gain clears the noise of the measurement.

The noise floor sigma is the spread of val_bpb over the baseline repeated under different seeds.
A candidate's gain over the current best is weighed in standard errors of the difference of the
two means, sigma * sqrt(1/n_best + 1/n_candidate): past `z_keep` it is kept, past `z_rerun` it is
borderline and run again under another seed, below that it is discarded. The `strict` rule is the
reference's: any improvement at all is kept (and so are lucky seeds).
"""
from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class DecisionRule:
    name: str = "noise"  # "noise" or "strict"
    baseline_runs: int = 3  # seeds of the baseline that estimate sigma
    z_keep: float = 2.0  # standard errors of the difference a gain must exceed to be kept
    z_rerun: float = 1.0  # above this (but under z_keep) a candidate is re-run under another seed
    max_runs: int = 3  # runs of one candidate at most, reruns included
    min_sigma: float = 0.0  # a floor under the estimated sigma, in bits per byte
    drift_every: int = 10  # re-run the current best after this many candidates (0: never)

    def __post_init__(self):
        if self.name not in ("noise", "strict"):
            raise ValueError(f"unknown decision rule {self.name!r}: use 'noise' or 'strict'")
        if self.baseline_runs < 1 or self.max_runs < 1:
            raise ValueError("baseline_runs and max_runs must be at least 1")
        if self.z_rerun > self.z_keep:
            raise ValueError("z_rerun must not exceed z_keep")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Decision:
    action: str  # keep, discard, rerun
    delta: float  # mean(best) - mean(candidate): positive is an improvement
    threshold: float  # the gain needed to keep
    sigma: float | None
    why: str

    def to_dict(self) -> dict:
        return asdict(self)


def noise_floor(values: list[float]) -> float | None:
    """Sample standard deviation of repeated runs of one commit; None under two runs."""
    return statistics.stdev(values) if len(values) >= 2 else None


def decide(rule: DecisionRule, best: list[float], candidate: list[float], sigma: float | None) -> Decision:
    if not best or not candidate:
        raise ValueError("decide needs at least one val_bpb for the best and for the candidate")
    delta = statistics.fmean(best) - statistics.fmean(candidate)
    if rule.name == "strict" or sigma is None:
        verdict = "keep" if delta > 0 else "discard"
        basis = "strict rule: any improvement is kept" if rule.name == "strict" else "no noise estimate"
        return Decision(verdict, delta, 0.0, sigma, f"{basis}; gain {delta:+.6f}")
    sigma = max(sigma, rule.min_sigma)
    se = sigma * math.sqrt(1 / len(best) + 1 / len(candidate))
    keep_at, rerun_at = rule.z_keep * se, rule.z_rerun * se
    gain = f"gain {delta:+.6f} over {len(best)} best run(s) with {len(candidate)} run(s) of this"
    if delta > keep_at:
        return Decision("keep", delta, keep_at, sigma, f"{gain}, above {rule.z_keep:g} SE = {keep_at:.6f}")
    if delta > rerun_at and len(candidate) < rule.max_runs:
        return Decision("rerun", delta, keep_at, sigma,
                        f"{gain}, borderline ({rule.z_rerun:g} SE = {rerun_at:.6f} < gain <= {keep_at:.6f}): another seed")
    return Decision("discard", delta, keep_at, sigma, f"{gain}, not above {rule.z_keep:g} SE = {keep_at:.6f}")
