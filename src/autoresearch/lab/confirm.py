"""After the loop: is the best really better than the baseline, and which kept changes carry the gain?

A confirmation runs the baseline and the best again, in turn, under seeds neither has run (at least
three each), and gives the gain with its 95% interval from these fresh runs alone: the runs that won
the keeps were selected for measuring low, and a gain judged on them would be too large. An
ablation measures the best with each kept change undone alone (a commit beside the branch, never on
it): the effect of keeping a change is how much worse the best measures without it. The runs are
ordinary measurements in the ledger (kinds confirm and ablation, status keep), so they also sharpen
the noise estimate; the results are kept in the ledger's meta for the report.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

from .noise import gain_interval
from .outcomes import Kind, Status

CONFIRMATION = "confirmation"  # ledger meta: the last confirmation and its ablation
MIN_RUNS = 3


@dataclass
class Effect:
    """One comparison's result: gain = mean(reference) - mean(treatment), positive where the
    treatment measures better (lower val_bpb), with its 95% interval (None while the noise is unknown)."""

    commit: str
    description: str
    values: list[float] = field(default_factory=list)
    gain: float | None = None
    low: float | None = None
    high: float | None = None
    note: str = ""


@dataclass
class Confirmation:
    best: str
    baseline: str
    best_values: list[float]
    baseline_values: list[float]
    gain: Effect  # of the best over the baseline
    ablations: list[Effect]  # per kept change: how much worse the best measures without it
    sigma: float | None
    df: int
    at: float = field(default_factory=time.time)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Confirmation":
        """As stored in the ledger's meta (to_dict)."""
        return cls(**{**data, "gain": Effect(**data["gain"]), "ablations": [Effect(**e) for e in data["ablations"]]})


def fresh_seeds(lab, commits: list[str], n: int) -> list[int]:
    """The n smallest seeds (from 1) that none of `commits` has run."""
    used = {t.seed for t in lab.ledger.trials() if t.commit_sha in commits}
    seeds, seed = [], 1
    while len(seeds) < n:
        if seed not in used:
            seeds.append(seed)
        seed += 1
    return seeds


def _run(lab, kind: Kind, commit: str, parent: str, description: str, seed: int, diff: str = "") -> float | None:
    trial_id = lab._begin(kind, f"{description} (seed {seed})", "lab", commit, parent, diff, seed=seed)
    outcome = lab._measure(trial_id, commit, seed)
    if outcome.val_bpb is None:
        if not outcome.stopped:
            lab.ledger.update(trial_id, status=Status.CRASH)
        lab.log(f"  {description}, seed {seed}: {outcome.reason or 'no value'}")
        return None
    lab.ledger.update(trial_id, status=Status.KEEP, decision={"why": description})
    lab.log(f"  {description}, seed {seed}: val_bpb {outcome.val_bpb:.6f}")
    return outcome.val_bpb


def _effect(commit: str, description: str, reference: list[float], treatment: list[float], noise) -> Effect:
    if not reference or not treatment:
        return Effect(commit, description, treatment, note="a run crashed or was stopped: no comparison")
    interval = gain_interval(reference, treatment, noise)
    return Effect(commit, description, treatment, interval.delta, interval.low, interval.high)


def confirm(lab, runs: int = MIN_RUNS, ablate: bool = True) -> Confirmation | None:
    """Measure the best against the baseline under `runs` fresh seeds each (at least MIN_RUNS), then, with
    `ablate`, the best without each of its kept changes (one run each, under the first of those seeds).
    None when the best is the baseline or the lab was told to stop; the result is also in the ledger."""
    lab.check_ready()
    best = lab.best()
    base = lab.ws.config["base_commit"]
    if best is None or best.commit == base:
        lab.log("confirm: the best is the baseline; there is no gain to confirm")
        return None
    runs = max(runs, MIN_RUNS)
    seeds = fresh_seeds(lab, [base, best.commit], runs)
    lab.log(f"confirm: the best {best.commit[:7]} against the baseline {base[:7]}, {runs} fresh seeds each")
    base_values, best_values = [], []
    for seed in seeds:  # in turn, so that a change of the machine falls on both alike
        for commit, values, what in ((base, base_values, "confirm the baseline"), (best.commit, best_values,
                                                                                   "confirm the best")):
            if lab.stop.is_set():
                return None
            value = _run(lab, Kind.CONFIRM, commit, commit, what, seed)
            if value is not None:
                values.append(value)
    gain = _effect(best.commit, "the best over the baseline", base_values, best_values, lab.noise())
    ablations = []
    kept = lab.ws.kept_commits(best.commit)
    if ablate and len(kept) > 1:  # with one kept change, the best without it is the baseline
        for change in kept:
            if lab.stop.is_set():
                return None
            description = lab.ws.subject(change)
            source = lab.ws.without(best.commit, change)
            if source is None:
                ablations.append(Effect(change, description, note="cannot be undone alone: later changes touched "
                                                                   "the same lines"))
                continue
            variant = lab.ws.commit_aside(best.commit, {"train.py": source}, f"ablation: the best without {change[:7]}")
            value = _run(lab, Kind.ABLATION, variant, best.commit, f"the best without {change[:7]} ({description})",
                         seeds[0], lab.ws.diff(best.commit, variant))
            ablations.append(_effect(change, description, [value] if value is not None else [], best_values,
                                     lab.noise()))
    noise = lab.noise()
    result = Confirmation(best.commit, base, best_values, base_values, gain, ablations, noise.sigma, noise.df)
    lab.ledger.set_meta(CONFIRMATION, result.to_dict())
    lab.log(summary(result))
    return result


def _shown(effect: Effect) -> str:
    if effect.gain is None:
        return effect.note
    interval = f" (95% interval {effect.low:+.6f} to {effect.high:+.6f})" if effect.low is not None else \
        " (no interval: the noise is unknown)"
    return f"{effect.gain:+.6f}{interval}"


def summary(result: Confirmation) -> str:
    lines = [f"confirmed: the best {result.best[:7]} is {_shown(result.gain)} val_bpb better than the baseline "
             f"over {len(result.best_values)} and {len(result.baseline_values)} fresh run(s)"]
    for effect in result.ablations:
        lines.append(f"  without {effect.commit[:7]} ({effect.description}): {_shown(effect)} val_bpb worse than the "
                     "best (negative: better without it)" if effect.gain is not None
                     else f"  without {effect.commit[:7]} ({effect.description}): {effect.note}")
    return "\n".join(lines)
