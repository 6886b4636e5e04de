"""The measurement noise of a workspace, learnt from its ledger all night: how far val_bpb moves
between runs of one commit, whether the machine under the runs has changed, and which gains that
noise lets the lab see.

Everything here is a pure function of ledger rows (through `measurements`), so a resumed lab
rebuilds exactly the model it had. Runs compare only within one class of device: callers filter
with `by_device` before estimating.

The model: a run of commit c under seed s measures mu_c + e, with e ~ N(0, sigma^2) the same for
every commit (seed noise: initialisation, data order, how many steps the wall clock bought).
sigma is estimated by pooling the spread of every commit that was run more than once (baseline
seeds, a candidate's reruns, drift checks, confirmations): each group contributes its squared
deviations from its own mean and n - 1 degrees of freedom, so commits that differ in level do
not inflate it. Its df grows through the night, and the thresholds use the t distribution with
that df (a sigma from 3 runs, df 2, is uncertain by a factor of ~2 either way: a z threshold on
it keeps a null change 11% of the time instead of 5%).

Same-seed differences (a candidate under seed s minus its reference, the best then, under seed s)
have their own spread: small where a change leaves the seed's trajectory alone, larger than
sqrt(2) sigma where it does not. It is estimated the same way, pooled over candidates with two or
more paired runs (each around its own mean difference, so the candidates' effects do not count).

The distributions (t, F) are computed here from the regularized incomplete beta function, since
the lab does not depend on scipy.
"""
from __future__ import annotations

import math
import statistics
from collections import defaultdict
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Iterable, Sequence

from .outcomes import NamedValue, Status

# Rows whose val_bpb is a measurement: decided trials, and a candidate's runs while its decision is
# still open (those rows are `running` with a value). A crash or a stopped run measured nothing.
MEASURED = frozenset({Status.KEEP, Status.DISCARD, Status.RUNNING, Status.SUPERSEDED})


@dataclass(frozen=True)
class Measurement:
    """One run's val_bpb, with what it takes to pool, pair and follow it."""

    trial_id: int
    commit: str
    value: float  # val_bpb
    seed: int | None  # None: train.py's own seed, the same on every run that leaves it alone
    device_class: str
    kind: str  # an outcomes.Kind value
    tokens_per_second: float | None
    order: int  # the trial id: measurements sort in the order they were made
    reference: str | None = None  # the commit it was measured against (a candidate's parent); None for the best itself


def measurements(trials: Iterable) -> list[Measurement]:
    """The measurements among ledger rows (`ledger.Trial`), in id order: every row of a commit with a
    val_bpb whose status is keep, discard, superseded or running."""
    found = []
    for t in trials:
        if t.val_bpb is None or t.commit_sha is None or t.status not in MEASURED:
            continue
        reference = t.parent_sha if t.parent_sha != t.commit_sha else None
        found.append(Measurement(t.id, t.commit_sha, float(t.val_bpb), t.seed, t.device_class or "", str(t.kind),
                                 t.tokens_per_second, t.id, reference))
    return sorted(found, key=lambda m: m.order)


def by_device(found: Iterable[Measurement], device_class: str | None) -> list[Measurement]:
    """The measurements made on one class of device (None: all of them)."""
    return [m for m in found if device_class is None or m.device_class == device_class]


# --- the estimate -------------------------------------------------------------------------------
@dataclass(frozen=True)
class PairedEstimate:
    """The spread of same-seed differences, candidate minus reference."""

    sd: float  # after the floor
    raw_sd: float
    df: int


@dataclass(frozen=True)
class NoiseEstimate:
    """sigma, the standard deviation of one run, pooled within commits; None while df == 0."""

    sigma: float | None  # max(raw_sigma, floor)
    raw_sigma: float | None
    df: int
    floor: float = 0.0
    paired: PairedEstimate | None = None
    since: int = 0  # the order from which measurements counted (the start of this noise epoch)

    def to_dict(self) -> dict:
        return asdict(self)


def pooled_spread(groups: Iterable[Sequence[float]]) -> tuple[float | None, int]:
    """The pooled standard deviation of several groups around their own means, and its degrees of
    freedom (sum of n_g - 1); (None, 0) when no group has two values."""
    squares, df = 0.0, 0
    for values in groups:
        if len(values) >= 2:
            mean = statistics.fmean(values)
            squares += sum((v - mean) ** 2 for v in values)
            df += len(values) - 1
    return (math.sqrt(squares / df), df) if df else (None, 0)


def estimate(found: Sequence[Measurement], *, floor: float = 0.0, since: int = 0) -> NoiseEstimate:
    """The noise of `found` (one class of device), counting only measurements with order >= `since`.

    The floor is a lower bound the user puts under sigma (and under the paired sd): a night whose
    few runs happened to agree closely does not make every small gain look real."""
    if floor < 0:
        raise ValueError(f"the noise floor must not be negative (got {floor})")
    current = sorted((m for m in found if m.order >= since), key=lambda m: m.order)
    by_commit: dict[str, list[Measurement]] = defaultdict(list)
    for m in current:
        by_commit[m.commit].append(m)
    raw, df = pooled_spread([m.value for m in runs] for runs in by_commit.values())

    differences: dict[str, list[float]] = defaultdict(list)
    for m in current:
        partner = next((r for r in by_commit.get(m.reference, ()) if r.seed == m.seed), None)
        if partner is not None:
            differences[m.commit].append(m.value - partner.value)
    raw_paired, paired_df = pooled_spread(differences.values())
    paired = PairedEstimate(max(raw_paired, floor), raw_paired, paired_df) if paired_df else None
    return NoiseEstimate(max(raw, floor) if df else None, raw, df, floor, paired, since)


def workspace_noise(trials: Iterable, device_class: str | None, rule, since: int = 0) -> NoiseEstimate:
    """The noise of a workspace as its lab sees it: every measurement among ledger rows (`ledger.Trial`)
    on `device_class` (None: all), from the noise epoch's start `since` on, with `rule`'s (a
    decide.DecisionRule's) min_sigma as the floor. The lab decides on this estimate and the report
    shows it, so both call this one function."""
    return estimate(by_device(measurements(trials), device_class), floor=rule.min_sigma, since=since)


# --- what the noise lets the lab see ---------------------------------------------------------------
@dataclass(frozen=True)
class Interval:
    """A gain and its confidence interval. gain = mean(reference) - mean(treatment): val_bpb is lower
    when better, so a positive gain means the treatment measures better than the reference. The
    bounds are None while the noise is unknown."""

    delta: float
    low: float | None
    high: float | None
    level: float = 0.95

    def to_dict(self) -> dict:
        return asdict(self)


def gain_interval(best_values: Sequence[float], other_values: Sequence[float], noise: NoiseEstimate,
                  level: float = 0.95) -> Interval:
    """The gain of `other_values` over `best_values` (mean(best) - mean(other)) with its two-sided
    t interval, from the pooled sigma and its df: for confirmations and ablations (an ablation's gain
    is negative when reverting the change hurts)."""
    if not best_values or not other_values:
        raise ValueError("a gain needs at least one value on each side")
    delta = statistics.fmean(best_values) - statistics.fmean(other_values)
    if noise.sigma is None:
        return Interval(delta, None, None, level)
    half = t_quantile(0.5 + level / 2, noise.df) * noise.sigma * math.sqrt(1 / len(best_values) + 1 / len(other_values))
    return Interval(delta, delta - half, delta + half, level)


def detectable_gain(noise: NoiseEstimate, rule, n_best: int, *, power: float = 0.5) -> float | None:
    """The smallest true gain (in val_bpb) that `rule` (a decide.DecisionRule) keeps with probability
    `power` (default: half the time) against a best measured `n_best` times, with the reruns the rule
    allows; None while the noise is unknown. Gains below it are mostly invisible: lengthen the budget
    (less noise) or allow more runs."""
    if n_best < 1:
        raise ValueError("the best must have at least one run")
    plan = rule.plan(noise, n_best)
    if plan is None:
        return None
    if plan.standard_errors[0] == 0 or plan.keep_probability(0.0) >= power:  # runs that repeat exactly see any gain
        return 0.0
    low, high = 0.0, plan.standard_errors[0]
    while plan.keep_probability(high) < power:
        low, high = high, 2 * high
    for _ in range(50):
        middle = (low + high) / 2
        low, high = (low, middle) if plan.keep_probability(middle) >= power else (middle, high)
    return high


# --- following the machine ------------------------------------------------------------------------
class ChangeKind(NamedValue):
    """What moved under the runs of the best commit."""

    LEVEL = "level"  # it measures higher or lower than it did
    SPREAD = "spread"  # its runs scatter more than sigma says
    THROUGHPUT = "throughput"  # it trains faster or slower: the budget buys a different number of steps


@dataclass(frozen=True)
class Change:
    what: ChangeKind
    size: float  # level: newest minus earlier mean (val_bpb); spread: sd ratio; throughput: relative change
    start: int  # the order of the first run after the change: the start of the next noise epoch
    why: str  # one sentence for the log

    def to_dict(self) -> dict:
        return asdict(self)


THROUGHPUT_FRACTION = 0.10  # tokens/s of one commit vary ~1% on a quiet GPU; a tenth is another machine or load
SPREAD_RUNS = 5  # at most this many of the newest runs estimate a new spread
# A false alarm costs the epoch's df and a re-measured best; a missed shift makes every later candidate
# look better or worse than it is. At 0.01, simulated steady nights restart 0.04 times per night (0.005
# at 0.001), and a shift of 3 sigma seen in two drift checks is caught once sigma has ~30 df.
CHANGE_ALPHA = 0.01


def detect_change(best_runs: Sequence[Measurement], noise: NoiseEstimate, *, alpha: float = CHANGE_ALPHA,
                  throughput_fraction: float = THROUGHPUT_FRACTION) -> Change | None:
    """Whether the newest runs of the best commit say the measurement has changed, and how.

    `best_runs` are the best commit's measurements of this noise epoch in the order they were made
    (its first runs, then the drift checks between candidates), one class of device. In turn:
    - throughput: the newest run's tokens/s differs from the median of the earlier ones by more than
      `throughput_fraction` (the machine is slower or faster, so the budget buys other steps);
    - level: the newest run (then the newest two) against the mean of the earlier ones, a two-sided t
      test at `alpha` (each of the two at alpha / 2) with the pooled sigma and its df;
    - spread: the variance of the newest 3 to 5 runs against sigma^2, an F test at `alpha`, once the
      best has two runs before them.
    The caller starts a new noise epoch at `Change.start` (estimate(..., since=start)) and measures
    the best again: this function only detects and describes."""
    runs = sorted(best_runs, key=lambda m: m.order)
    if len(runs) < 2:
        return None
    newest = runs[-1]
    rates = [m.tokens_per_second for m in runs[:-1] if m.tokens_per_second]
    if newest.tokens_per_second and rates:
        usual = statistics.median(rates)
        moved = newest.tokens_per_second / usual - 1
        if abs(moved) > throughput_fraction:
            return Change(ChangeKind.THROUGHPUT, moved, newest.order,
                          f"the best trains {'faster' if moved > 0 else 'slower'} from trial {newest.trial_id} on: "
                          f"{newest.tokens_per_second:,.0f} tokens/s against {usual:,.0f} before ({moved:+.0%}), "
                          "so its budget buys a different number of steps")
    if noise.sigma is None or noise.sigma == 0:
        return None
    for count in (1, 2):
        recent, earlier = runs[-count:], runs[:-count]
        if not earlier:
            break
        shift = statistics.fmean(m.value for m in recent) - statistics.fmean(m.value for m in earlier)
        t = shift / (noise.sigma * math.sqrt(1 / count + 1 / len(earlier)))
        if abs(t) > t_quantile(1 - alpha / 4, noise.df):
            return Change(ChangeKind.LEVEL, shift, recent[0].order,
                          f"the best measures {abs(shift):.4g} {'higher' if shift > 0 else 'lower'} from trial "
                          f"{recent[0].trial_id} on ({count} run(s) against {len(earlier)} before: t = {t:+.1f}, sigma "
                          f"{noise.sigma:.4g} with {noise.df} df)")
    count = min(SPREAD_RUNS, len(runs) - 2)
    if count >= 3:
        recent = [m.value for m in runs[-count:]]
        ratio = statistics.stdev(recent) / noise.sigma
        if f_sf(ratio ** 2, count - 1, noise.df) < alpha:
            return Change(ChangeKind.SPREAD, ratio, runs[-count].order,
                          f"the best's last {count} runs scatter {ratio:.1f} times as much as sigma {noise.sigma:.4g} "
                          f"says, from trial {runs[-count].trial_id} on")
    return None


# --- distributions --------------------------------------------------------------------------------
def normal_cdf(x: float) -> float:
    return 0.5 * math.erfc(-x / math.sqrt(2))


def normal_quantile(p: float) -> float:
    return statistics.NormalDist().inv_cdf(p)


def _beta_continued_fraction(a: float, b: float, x: float) -> float:
    """The continued fraction of the incomplete beta function, by Lentz's method (Numerical Recipes 6.4)."""
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1 / (d if abs(d) > tiny else tiny)
    result = d
    for m in range(1, 500):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1 + numerator * d
            d = 1 / (d if abs(d) > tiny else tiny)
            c = 1 + numerator / c
            c = c if abs(c) > tiny else tiny
            result *= c * d
        if abs(c * d - 1) < 1e-15:
            break
    return result


def regularized_beta(x: float, a: float, b: float) -> float:
    """I_x(a, b), the regularized incomplete beta function."""
    if x <= 0:
        return 0.0
    if x >= 1:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1) / (a + b + 2):
        return front * _beta_continued_fraction(a, b, x) / a
    return 1 - front * _beta_continued_fraction(b, a, 1 - x) / b


def t_cdf(x: float, df: float) -> float:
    """P(T <= x) for Student's t with `df` degrees of freedom (math.inf: the normal)."""
    if math.isinf(df):
        return normal_cdf(x)
    tail = 0.5 * regularized_beta(df / (df + x * x), df / 2, 0.5)
    return 1 - tail if x > 0 else tail


@lru_cache(maxsize=8192)
def t_quantile(p: float, df: float) -> float:
    """The x with P(T <= x) = p, by bisection on t_cdf (to ~1e-12 relative)."""
    if not 0 < p < 1:
        raise ValueError(f"a quantile needs 0 < p < 1 (got {p})")
    if df <= 0:
        raise ValueError(f"the t distribution needs df > 0 (got {df})")
    if math.isinf(df):
        return normal_quantile(p)
    if p < 0.5:
        return -t_quantile(1 - p, df)
    low, high = 0.0, max(1.0, normal_quantile(p))
    while t_cdf(high, df) < p:
        low, high = high, 2 * high
    for _ in range(200):
        middle = (low + high) / 2
        if middle in (low, high):
            break
        low, high = (middle, high) if t_cdf(middle, df) < p else (low, middle)
    return (low + high) / 2


def f_sf(x: float, d1: float, d2: float) -> float:
    """P(F > x) for the F distribution with (d1, d2) degrees of freedom."""
    if x <= 0:
        return 1.0
    return regularized_beta(d2 / (d2 + d1 * x), d2 / 2, d1 / 2)
