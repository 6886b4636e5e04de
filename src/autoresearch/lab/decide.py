"""Keep, discard, re-run or measure: a candidate is kept only when its gain over the best clears
the noise, and runs go to it only while the decision is open.

The gain is mean(best) - mean(candidate) in val_bpb (lower is better, so a positive gain is an
improvement), weighed in standard errors from the noise model (noise.py): sigma * sqrt(1/n_best +
1/n_candidate) unpaired, or the paired sd / sqrt(n) when the candidate's runs share seeds with
the best's and the estimate shows that pairing lowers the bar.

The `noise` rule is a group-sequential test: the candidate's k-th run (k = 1 .. max_runs) is a look.
At each look it is kept when the gain reaches the keep boundary, discarded when the gain falls
below the stop boundary (futility: a candidate that measures worse than the best stops after one
run), and run again in between; at the last look whatever is not kept is discarded. The
boundaries are designed in the normal scale for the information the looks will carry, spending
the false-keep rate alpha as alpha * t^SPENDING_POWER over the information fraction t (Lan and
DeMets; Kim and DeMets' power family), with the stop boundaries binding: the lab never runs a
candidate past one, and any early end of a candidate (a crash, Ctrl-C) is a discard, so they can
only lower the false-keep rate. Each look then uses the t quantile of the boundary's nominal
level at the estimate's degrees of freedom (Jennison and Turnbull, ch. 11), never z.

Why this rule, in numbers (bench/simulate_keep_rule.py; whole nights of 100 candidates, half of
them null, 15% with real gains, sigma learnt through the night; 400 nights):
                    false keeps/null   power at 2 sigma   runs/candidate (+ the lab's other runs)
  before issue 16        2.9%              44.1%              1.08 (+0.13)
  this rule              2.6%              66.3%              1.46 (+0.31)
  max_runs 4             2.3%              71.2%              1.58 (+0.31)
  strict                21.1%              78.5%              1.00 (+0.13)
One candidate against a fresh 3-run baseline (the issue's model), the old rule keeps 11.7% of null
candidates (67.2% power); this one keeps 2.6% with sigma from those 3 runs (40.7% power: df 2 buys
little) and 4.9-5.1% from df 10 on (72-76% power). The other runs are mostly the 3 fresh runs of each
new best (best_runs_missing). See SPENDING_POWER and STOP_Z for the constants' alternatives.

The `strict` rule is the reference's: one run, kept when it is lower at all (lucky seeds too).

`current_best` is the one definition of the best commit and its runs, shared by the lab and the
report.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass, fields
from functools import lru_cache
from typing import Iterable, NamedTuple, Sequence

import numpy as np

from .noise import NoiseEstimate, normal_cdf, pooled_spread, t_quantile
from .outcomes import Kind, NamedValue, Status

# Spending alpha * t**3 (close to O'Brien-Fleming's) keeps most of alpha for the last look, where a
# 2-sigma gain is most often seen; a gain of ~2.5 SE is still kept after one run. Simulated nights
# (power at 2 sigma / runs per candidate, 200-400 nights): t**1 (Pocock-like) 62.6% / 1.41, t**2
# 66.0% / 1.44, t**3 66.2% / 1.46; false keeps 2.6-3.1% for all three.
SPENDING_POWER = 3.0
# The stop (futility) boundary, in standard errors of the gain, at each look before the last: after one
# run a candidate measuring no better than the best stops; later it must stay half an SE up. Stopping
# at (0, 0) cost 0.06 more runs per candidate for no power; (0.25, 0.75) saved 0.10 runs but lost 2.4
# points of power at 2 sigma; (-0.25, 0.25) cost 0.12 runs.
STOP_Z = (0.0, 0.5)
MAX_LOOKS = 10  # max_runs above this buys little and makes the design slow to compute


class RuleName(NamedValue):
    NOISE = "noise"  # the sequential test against the learnt noise
    STRICT = "strict"  # the reference's: any improvement is kept


class Pairing(NamedValue):
    AUTO = "auto"  # pair seeds where the estimate shows that pairing lowers the bar
    NEVER = "never"
    ALWAYS = "always"  # whenever every run of the candidate has a partner and a paired estimate exists


class Action(NamedValue):
    KEEP = "keep"
    DISCARD = "discard"
    RERUN = "rerun"  # run the candidate again, under the next seed (next_seed)
    MEASURE = "measure"  # the noise or the best is not measured enough to decide: run the best again, then decide


class Sample(NamedTuple):
    value: float  # val_bpb
    seed: int | None


# Keys of older workspaces' configs: the z thresholds of the rule before it was sequential.
OLD_KEEP_Z_DEFAULT = 2.0


@dataclass(frozen=True)
class DecisionRule:
    name: str = RuleName.NOISE
    baseline_runs: int = 3  # runs of the baseline, and of any new best before the next candidate
    alpha: float = 0.05  # the chance that a candidate with no effect is kept, over all its runs
    max_runs: int = 3  # runs of one candidate at most, reruns included
    min_sigma: float = 0.0  # a floor under sigma (and the paired sd), in val_bpb
    drift_every: int = 10  # run the best again after this many candidates (0: never)
    pairing: str = Pairing.AUTO

    def __post_init__(self):
        def refuse(message: str):
            raise ValueError(f"decision rule: {message}")

        if self.name not in RuleName._value2member_map_:
            refuse(f"unknown decision rule {self.name!r}: use 'noise' (the default) or 'strict'")
        if self.pairing not in Pairing._value2member_map_:
            refuse(f"pairing {self.pairing!r} is not one of 'auto', 'never', 'always': use 'auto'")
        if not isinstance(self.baseline_runs, int) or self.baseline_runs < 1:
            refuse(f"baseline_runs must be a whole number of at least 1 (got {self.baseline_runs!r}): set it to 3, "
                   "so that the baseline's spread gives a first noise estimate")
        if not isinstance(self.max_runs, int) or not 1 <= self.max_runs <= MAX_LOOKS:
            refuse(f"max_runs must be a whole number from 1 to {MAX_LOOKS} (got {self.max_runs!r}): set it to 3")
        if not isinstance(self.alpha, (int, float)) or not 0 < self.alpha < 0.5:
            refuse(f"alpha must be above 0 and below 0.5 (got {self.alpha!r}): it is the chance that a change with no "
                   "effect is kept; set it to 0.05")
        if not isinstance(self.min_sigma, (int, float)) or not self.min_sigma >= 0:
            refuse(f"min_sigma must not be negative (got {self.min_sigma!r}): it is a floor under the noise in "
                   "val_bpb; set it to 0 for none")
        if not isinstance(self.drift_every, int) or self.drift_every < 0:
            refuse(f"drift_every must be a whole number, 0 or more (got {self.drift_every!r}): set it to 10, or 0 for "
                   "no drift checks")
        object.__setattr__(self, "name", RuleName(self.name))
        object.__setattr__(self, "pairing", Pairing(self.pairing))

    def to_dict(self) -> dict:
        return {k: str(v) if isinstance(v, NamedValue) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict) -> "DecisionRule":
        """A rule from a workspace's config, including those written before the sequential rule: their
        z_rerun is dropped (the stop boundary replaces it) and a z_keep other than the old default 2
        becomes the alpha of a one-sided normal test at that z. Keys of newer versions are ignored."""
        data = dict(data)
        z_keep = data.pop("z_keep", None)
        data.pop("z_rerun", None)
        if z_keep is not None and z_keep != OLD_KEEP_Z_DEFAULT and "alpha" not in data:
            data["alpha"] = min(max(1 - normal_cdf(float(z_keep)), 1e-6), 0.499)
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def plan(self, noise: NoiseEstimate, n_best: int, n_runs: int = 1, paired: bool = False) -> "Plan | None":
        """The test a candidate faces against a best of `n_best` runs, at its `n_runs`-th run; None
        while the noise is unknown.

        `noise` holds the candidate's runs so far. Its df are counted as they were before them (df -
        (n_runs - 1)) at every look: sigma is sharpened by the candidate's own reruns, but counting
        their df as well makes the t boundaries of a sequential test too lenient at small df. A null
        candidate against a fresh 3-run baseline is kept, at sigma's df 2 / 3 / 5 before it: 5.6% /
        5.5% / 5.4% counting them, 2.6% / 3.7% / 4.4% as here; 4.9% at df 10 and 5.0% at df 20
        (100,000 candidates each; bench/simulate_keep_rule.py --tables calibration)."""
        spread = noise.paired if paired else noise
        if spread is None or noise.sigma is None:
            return None
        sd = max(spread.sd if paired else noise.sigma, self.min_sigma)
        df = max(1, spread.df - (n_runs - 1))
        if self.name == RuleName.STRICT:
            return Plan((sd * math.sqrt(1 / n_best + 1 / n_runs),), df, (0.0,), (None,), paired)
        looks = range(1, max(self.max_runs, n_runs) + 1)
        # The information of look k, 1 / SE_k^2, up to the factor sigma^2: k runs of differences paired,
        # else the difference of two means.
        information = [k if paired else 1 / (1 / n_best + 1 / k) for k in looks]
        keep_z, stop_z = sequential_boundaries(self.alpha, tuple(round(i / information[-1], 12) for i in information))
        return Plan(tuple(sd / math.sqrt(i) for i in information), df, keep_z, stop_z, paired)


@dataclass(frozen=True)
class Plan:
    """A candidate's sequential test: after k runs (k = 1 .. len), keep when gain / standard_errors[k-1]
    reaches keep_t(k), run again while it is at least stop_t(k), otherwise discard."""

    standard_errors: tuple[float, ...]  # of the gain after k runs, in val_bpb
    df: int  # of the spread behind them, as counted before the candidate's runs
    keep_z: tuple[float, ...]  # the design's boundaries in the normal scale
    stop_z: tuple[float | None, ...]  # None at the last look
    paired: bool

    def keep_t(self, k: int) -> float:
        return _nominal_t(self.keep_z[k - 1], self.df)

    def stop_t(self, k: int) -> float | None:
        z = self.stop_z[k - 1]
        return None if z is None else _nominal_t(z, self.df)

    def keep_probability(self, gain: float) -> float:
        """The chance a candidate with this true gain is kept over all its looks, taking sigma as
        known (the t boundaries carry the cost of estimating it)."""
        looks = range(1, len(self.standard_errors) + 1)
        information = [1 / se ** 2 if se > 0 else 1e18 for se in self.standard_errors]
        kept, _ = crossing_probabilities(information, [self.keep_t(k) for k in looks],
                                         [self.stop_t(k) for k in looks], gain)
        return sum(kept)


def _nominal_t(z: float, df: int) -> float:
    """The t boundary with the nominal level of the normal boundary z (0 stays 0)."""
    return 0.0 if z == 0 else t_quantile(normal_cdf(z), df)


# --- the design: boundaries of a group-sequential test --------------------------------------------
GRID = 201  # nodes per look of the numerical integration; the false-keep rate is exact to ~1e-5


def _upper_tail(x: np.ndarray) -> np.ndarray:
    return np.array([0.5 * math.erfc(v / math.sqrt(2)) for v in np.atleast_1d(x)])


def _open_density(nodes, weights, low, high, step, drift_step, first_mean):
    """The sub-density, on a grid over [low, high), of the score after one more look that stayed open."""
    new = np.linspace(low, high, GRID)
    sd = math.sqrt(step)
    if nodes is None:
        density = np.exp(-0.5 * ((new - first_mean) / sd) ** 2) / (sd * math.sqrt(2 * math.pi))
    else:
        kernel = np.exp(-0.5 * ((new[None, :] - nodes[:, None] - drift_step) / sd) ** 2) / (sd * math.sqrt(2 * math.pi))
        density = weights @ kernel
    h = new[1] - new[0]
    trapezoid = np.full(GRID, h)
    trapezoid[0] = trapezoid[-1] = h / 2
    return new, density * trapezoid


def crossing_probabilities(information: Sequence[float], keep_z: Sequence[float], stop_z: Sequence[float | None],
                           drift: float = 0.0) -> tuple[list[float], list[float]]:
    """For Z_k = S_k / sqrt(I_k), S a Brownian motion in information with drift `drift` (the true gain
    when I = 1/SE^2): the chance of first reaching keep_z[k] at look k, and the chance the test is
    still open after look k (never kept, never stopped). Numerical integration on a grid (Jennison and
    Turnbull, ch. 19). The joint law of a candidate's gains over its looks is this one: Cov(Z_j, Z_k)
    = sqrt(I_j / I_k), since the best's runs are shared and the candidate's runs accumulate."""
    kept, still_open = [], []
    nodes = weights = None
    before = 0.0
    for k, (info, keep, stop) in enumerate(zip(information, keep_z, stop_z)):
        step = info - before
        top = keep * math.sqrt(info)
        if nodes is None:
            kept.append(float(_upper_tail((top - drift * info) / math.sqrt(step))[0]))
        else:
            kept.append(float(weights @ _upper_tail((top - nodes - drift * step) / math.sqrt(step))))
        if k == len(information) - 1:
            break
        bottom = stop * math.sqrt(info) if stop is not None else drift * info - 9 * math.sqrt(info)
        if bottom >= top:
            still_open.append(0.0)
            break
        nodes, weights = _open_density(nodes, weights, bottom, top, step, drift * step, drift * info)
        still_open.append(float(weights.sum()))
        before = info
    return kept, still_open


@lru_cache(maxsize=256)
def sequential_boundaries(alpha: float, information: tuple[float, ...]) -> tuple[tuple[float, ...], tuple]:
    """Keep and stop boundaries (normal scale) for looks with these informations: the chance of a keep
    by look k under no effect is alpha * (I_k / I_K) ** SPENDING_POWER, with the stop boundaries
    binding; stop at look k (before the last) is STOP_Z[k] (its last entry for later looks)."""
    looks = len(information)
    stop = tuple(STOP_Z[min(k, len(STOP_Z) - 1)] if k < looks - 1 else None for k in range(looks))
    keep: list[float] = []
    spent, before, nodes, weights = 0.0, 0.0, None, None
    for k, info in enumerate(information):
        sd, root = math.sqrt(info - before), math.sqrt(info)

        def crossed(z: float) -> float:  # the chance of a first keep at this look, under no effect
            tail = _upper_tail((z * root - (0.0 if nodes is None else nodes)) / sd)
            return float(tail[0] if nodes is None else weights @ tail)

        target = alpha * (info / information[-1]) ** SPENDING_POWER - spent
        low, high = (stop[k] if stop[k] is not None else -4.0), 8.0
        for _ in range(60):  # bisection: the boundary whose crossing spends what this look may spend
            middle = (low + high) / 2
            low, high = (middle, high) if crossed(middle) > target else (low, middle)
        keep.append(high)
        spent += crossed(high)
        if k < looks - 1:
            nodes, weights = _open_density(nodes, weights, stop[k] * root, high * root, info - before, 0.0, 0.0)
        before = info
    return tuple(keep), stop


# --- the decision ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Decision:
    action: Action
    delta: float | None  # the gain, mean(best) - mean(candidate): positive is an improvement; None without a best
    low: float | None  # its 95% t interval (fixed-sample, for people), None while the noise is unknown
    high: float | None
    threshold: float | None  # the gain it had to reach to be kept at this look
    stop_below: float | None  # below this gain it stops (None at the last look)
    sigma: float | None  # the sd behind the standard error: sigma, or the paired sd
    df: int
    paired: bool
    runs: int  # of the candidate
    best_runs: int
    why: str

    def to_dict(self) -> dict:
        return {k: str(v) if isinstance(v, NamedValue) else v for k, v in asdict(self).items()}


def _mean(samples: Sequence[Sample]) -> float:
    return statistics.fmean(s.value for s in samples)


def _partners(best: Sequence[Sample], candidate: Sequence[Sample]) -> list[Sample] | None:
    """The best's run under each of the candidate's seeds (its first one), or None if one is missing."""
    partners = [next((b for b in best if b.seed == c.seed), None) for c in candidate]
    return None if any(p is None for p in partners) else partners


def _without(sd: float | None, df: int, own: Sequence[float]) -> tuple[float | None, int]:
    """A pooled sd with one group's contribution (its squares around its mean, len - 1 df) taken out."""
    own_sd, own_df = pooled_spread([own])
    if sd is None or df - own_df < 1:
        return None, 0
    squares = sd ** 2 * df - (own_sd ** 2 * own_df if own_df else 0.0)
    return math.sqrt(max(squares, 0.0) / (df - own_df)), df - own_df


def _use_pairing(rule: DecisionRule, best: Sequence[Sample], candidate: Sequence[Sample], noise: NoiseEstimate) -> bool:
    """Whether to pair the candidate's runs with the best's runs under the same seeds.

    Only where every run the candidate may get can have a partner (the best has max_runs seeds and the
    candidate's seeds so far are among them) and the other candidates' same-seed differences give a
    paired estimate. Under "auto", only where that estimate gives a lower bar at the last look than
    sigma does. The choice never looks at the candidate's own runs (their contributions are taken out
    of both estimates): a choice made on them picks whichever spread happened to come out smaller,
    and kept 5.6% to 6.2% of null candidates at df 5 to 30 instead of 4.4% to 5.1%
    (bench/simulate_keep_rule.py --tables calibration)."""
    if rule.pairing == Pairing.NEVER or noise.paired is None or _partners(best, candidate) is None:
        return False
    looks = max(rule.max_runs, len(candidate))
    if len({b.seed for b in best}) < looks:
        return False
    differences = [c.value - p.value for c, p in zip(candidate, _partners(best, candidate))]
    paired_sd, paired_df = _without(noise.paired.raw_sd, noise.paired.df, differences)
    if paired_df < 1:
        return False
    if rule.pairing == Pairing.ALWAYS:
        return True
    sigma, df = _without(noise.raw_sigma, noise.df, [c.value for c in candidate])
    if df < 1:
        return True
    paired_bar = t_quantile(1 - rule.alpha, paired_df) * max(paired_sd, rule.min_sigma) / math.sqrt(looks)
    unpaired_bar = t_quantile(1 - rule.alpha, df) * max(sigma, rule.min_sigma) * math.sqrt(1 / len(best) + 1 / looks)
    return paired_bar < unpaired_bar


def decide(rule: DecisionRule, best: Sequence[tuple[float, int | None]], candidate: Sequence[tuple[float, int | None]],
           noise: NoiseEstimate) -> Decision:
    """The decision on a candidate after its runs so far.

    best: the best's runs that the candidate is measured against, as (val_bpb, seed): Best.fresh (its
    runs of this epoch on this device that were not the ones that won it the keep).
    candidate: the candidate's finished runs in order, as (val_bpb, seed), seeds from next_seed; a run
    that crashed is left out (the lab decides what a crash means: a crashed first run is a crash, not a
    decision; after a crashed rerun, decide on the runs that finished, and a RERUN then means run again).
    noise: the estimate from every measurement of this epoch and device, the candidate's runs included.

    Invariants: KEEP needs the gain to reach a positive bar (noise rule); RERUN only while the runs are
    fewer than max(rule.max_runs, runs); MEASURE only when the best has no runs or the noise has df 0:
    run the best again (next_seed([], best)), then decide again on the same candidate runs."""
    best = [Sample(*s) for s in best]
    candidate = [Sample(*s) for s in candidate]
    if not candidate:
        raise ValueError("decide needs at least one finished run of the candidate")
    n = len(candidate)

    def decision(action, delta, why, *, low=None, high=None, threshold=None, stop_below=None, sigma=None, df=0,
                 paired=False):
        return Decision(action, delta, low, high, threshold, stop_below, sigma, df, paired, n, len(best), why)

    if not best:
        return decision(Action.MEASURE, None, "the best has no runs in this noise epoch on this device: measure it "
                                              "again before deciding")
    if rule.name == RuleName.STRICT:
        delta = _mean(best) - _mean(candidate)
        return decision(Action.KEEP if delta > 0 else Action.DISCARD, delta, threshold=0.0, sigma=noise.sigma,
                        df=noise.df, why=f"strict rule: any improvement is kept; gain {delta:+.6f}")
    if noise.sigma is None:
        return decision(Action.MEASURE, _mean(best) - _mean(candidate),
                        "the noise is unknown (no commit has two runs in this epoch yet): measure the best again")

    paired = _use_pairing(rule, best, candidate, noise)
    plan = rule.plan(noise, len(best), n, paired)
    delta = _mean(_partners(best, candidate) if paired else best) - _mean(candidate)
    se, last = plan.standard_errors[n - 1], n >= len(plan.standard_errors)
    sd = se * math.sqrt(n) if paired else se / math.sqrt(1 / len(best) + 1 / n)
    half = t_quantile(0.975, plan.df) * se
    common = dict(low=delta - half, high=delta + half, sigma=sd, df=plan.df, paired=paired)
    basis = (f"gain {delta:+.6f} after {n} run(s) against {len(best)} of the best"
             + (f", seeds paired (sd {sd:.4g}, {plan.df} df)" if paired else f" (sigma {sd:.4g}, {plan.df} df)"))
    if se == 0:  # the runs repeat exactly: there is no noise to clear
        return decision(Action.KEEP if delta > 0 else Action.DISCARD, delta,
                        f"{basis}; the runs repeat exactly, so any gain is real", threshold=0.0, **common)
    keep_bar = plan.keep_t(n) * se
    stop_bar = None if last else plan.stop_t(n) * se
    common.update(threshold=keep_bar, stop_below=stop_bar)
    if delta >= keep_bar:
        return decision(Action.KEEP, delta, f"{basis}: at least the bar {keep_bar:.6f}, kept", **common)
    if stop_bar is not None and delta >= stop_bar:
        return decision(Action.RERUN, delta, f"{basis}: under the bar {keep_bar:.6f} but not below {stop_bar:.6f}, "
                                             "so another seed", **common)
    if stop_bar is not None:
        return decision(Action.DISCARD, delta, f"{basis}: below {stop_bar:.6f}, too far under the bar {keep_bar:.6f} "
                                               "to be worth another run", **common)
    return decision(Action.DISCARD, delta, f"{basis}: under the bar {keep_bar:.6f} at the last run allowed", **common)


def next_seed(reference: Sequence[tuple[float, int | None]], runs: Sequence[tuple[float, int | None]]) -> int | None:
    """The seed of the next run of a commit whose runs so far are `runs`: the first seed of the
    reference's runs (the best's) not run yet, so that the runs can be paired; past those, the
    smallest seed from 1 that neither has run. (None is train.py's own seed.) For a run of the best
    itself (a drift check), pass no reference."""
    taken = {Sample(*r).seed for r in runs}
    for sample in reference:
        if Sample(*sample).seed not in taken:
            return Sample(*sample).seed
    used = taken | {Sample(*r).seed for r in reference}
    return next(seed for seed in range(1, len(used) + 2) if seed not in used)


# --- the best -------------------------------------------------------------------------------------
BEST_KINDS = frozenset({Kind.BASELINE, Kind.CANDIDATE, Kind.RERUN})  # a keep of these names the best commit
VALUE_KINDS = BEST_KINDS | {Kind.DRIFT, Kind.CONFIRM}  # runs of the best that count as its values


@dataclass(frozen=True)
class Best:
    commit: str
    samples: tuple[Sample, ...]  # all its runs (val_bpb, seed) on the device and in the epoch asked for
    fresh: tuple[Sample, ...]  # those of them not from the trials that won it the keep: what decisions use
    trial_id: int  # the latest trial that kept it

    @property
    def values(self) -> list[float]:
        return [s.value for s in self.samples]

    @property
    def seeds(self) -> list[int | None]:
        return [s.seed for s in self.samples]

    @property
    def mean(self) -> float | None:
        return _mean(self.samples) if self.samples else None

    def reference(self, rule: DecisionRule) -> tuple[Sample, ...]:
        """The runs a candidate is judged against: the fresh ones under the noise rule; under the strict
        rule, as in the reference, every run of the best, the one that won it the keep included."""
        return self.samples if rule.name == RuleName.STRICT else self.fresh


def current_best(trials: Iterable, device_class: str | None = None, since: int = 0) -> Best | None:
    """The best commit and its runs, from ledger rows (`ledger.Trial`); None before anything is kept.

    The best commit is the commit of the latest trial with status keep whose kind is baseline,
    candidate or rerun (the baseline's until a candidate is kept). Its samples are the runs of that
    commit with a val_bpb and status keep of kinds baseline, candidate, rerun, drift or confirm, with
    id >= `since` (the noise epoch), on `device_class` (None: any); they may be empty (a new epoch,
    another device), and then the best must be measured before the next decision.

    Its fresh samples leave out the kept candidate's own runs (kinds candidate and rerun). Those won a
    comparison, so they measure low by selection: a best judged on them makes every later candidate
    look worse than it is (simulated nights: 53.7% power at a 2-sigma gain instead of 66.3%, 1.1%
    false keeps instead of 2.6%). The baseline's runs were not selected, so they stay."""
    rows = sorted(trials, key=lambda t: t.id)
    kept = [t for t in rows if t.status == Status.KEEP and t.kind in BEST_KINDS and t.commit_sha]
    if not kept:
        return None
    return best_of(rows, kept[-1].commit_sha, device_class, since)


def best_of(trials: Iterable, commit: str, device_class: str | None = None, since: int = 0) -> Best:
    """A commit that was (or is) the best, with its runs as current_best counts them: what a candidate
    built on it is judged against, even after another candidate has been kept meanwhile."""
    rows = sorted(trials, key=lambda t: t.id)
    kept = [t.id for t in rows if t.status == Status.KEEP and t.kind in BEST_KINDS and t.commit_sha == commit]
    runs = [t for t in rows if t.commit_sha == commit and t.status == Status.KEEP and t.kind in VALUE_KINDS
            and t.val_bpb is not None and t.id >= since and (device_class is None or t.device_class == device_class)]
    samples = tuple(Sample(float(t.val_bpb), t.seed) for t in runs)
    fresh = tuple(Sample(float(t.val_bpb), t.seed) for t in runs if t.kind not in (Kind.CANDIDATE, Kind.RERUN))
    return Best(commit, samples, fresh, kept[-1] if kept else 0)


def best_runs_missing(rule: DecisionRule, best: Best | None) -> int:
    """How many more runs of the best (kind drift, seeds from next_seed([], best.samples)) the lab
    should make before the next candidate: up to baseline_runs fresh runs in this epoch, so that each
    candidate is measured against a fair reference. The strict rule measures nothing more."""
    have = len(best.fresh) if best else 0
    if rule.name == RuleName.STRICT:
        return 0 if best and best.samples else 1
    return max(0, rule.baseline_runs - have)
