"""Simulates the lab's keep rule: how often a change with no effect is kept (a false keep), how often
a real gain is (power), and how many runs each candidate costs.

The model. A run of a commit measures its true level plus seed noise N(0, sigma^2); the same
commit under the same seed twice differs a little (0.28 sigma sd, as on an H100 at a 20 s budget).
Gains are in units of sigma, so the numbers hold for any sigma (0.012 val_bpb on that H100).

Whole nights (table "nights"), as the lab runs them: the baseline is run 3 times (seeds None, 1,
2); then 100 candidates, each measured against the current best; a kept candidate becomes the best;
every 10 candidates the best is run again (a drift check). Of every 100 candidates 50 have no
effect (null), 15 a real gain (5 each at 0.5, 1 and 2 sigma) and 35 are worse (by 0.5 to 4 sigma,
uniformly). The rules, all at most 3 runs per candidate unless named:
  today          keep above 2 standard errors, re-run between 1 and 2, z thresholds, sigma from the
                 3 baseline runs, frozen for the night; the best's values are the kept commit's runs
                 (the rule before issue 16, re-implemented here)
  noise          the new default (lab/decide.py): a group-sequential t test at alpha 0.05 on the
                 noise learnt all night (lab/noise.py: pooled within-commit spread, its df growing
                 with every rerun and drift check), stops for futility, a new best re-measured with
                 3 fresh runs before the next candidate (decide.best_runs_missing) and candidates
                 decided against those (Best.fresh), detect_change after each drift check
  noise, winners counted
                 the same, but the best's values include the runs that won it the keep
  noise, max_runs 4
                 the same with one more run allowed per candidate
  noise, sigma frozen (df 2)
                 the same, but sigma from the 3 baseline runs and the candidate's own runs only (the
                 fixed-df case: what the rule costs where the lab learns nothing)
  noise, sigma known
                 sigma known exactly (df infinite): the bound that learning approaches
  strict         the reference's: one run, kept when lower than the best's mean at all

One candidate against a fresh baseline of 3 runs (table "one"): the model the issue's numbers come
from (today: 11% false keeps, 67% power at 2 sigma), with sigma from those 3 runs (df 2), from
10 or 30 df, or known.

Pairing (table "pairing"): whole nights whose candidates' runs correlate with the best's run under
the same seed (rho = 0.9, 0, -0.5 before the repeat noise), so that the same-seed difference has
an sd smaller than, equal to, or larger than sqrt(2) sigma; pairing never, always and auto.

Calibration (table "calibration", not in the default set): the false-keep rate of a null candidate
in the one-candidate model at small df, as shipped and with two rejected variants: the t boundaries
counting the df of the candidate's own reruns, and pairing chosen on the candidate's own runs.

Reported: the false-keep rate per null candidate (goal: at most 5%), the power at true gains of
0.5, 1 and 2 sigma (goal at 2 sigma: at least 65%), the mean runs per candidate (goal: at most 1.8)
and per null and 2-sigma candidate, the lab's other runs per candidate (baseline, drift checks,
re-measuring a new best), the nights with at least one false keep, and the false keeps per night.
Everything is seeded (--seed): the same command prints the same tables.

    python bench/simulate_keep_rule.py                        # nights, one, pairing: 400 nights (~3 min, 2 cores)
    python bench/simulate_keep_rule.py --nights 40            # a quick look
    python bench/simulate_keep_rule.py --tables calibration   # the small-df calibration
"""
from __future__ import annotations

import argparse
import math
import multiprocessing
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from autoresearch.lab import decide as decide_module  # noqa: E402
from autoresearch.lab.decide import (Action, Best, DecisionRule, Sample, best_runs_missing,  # noqa: E402
                                     decide, next_seed)
from autoresearch.lab.noise import Measurement, NoiseEstimate, detect_change, estimate, t_quantile  # noqa: E402

REPEAT = 0.2  # the sd (in sigma) of the part of a run's noise that is new even under the same seed: two runs of
# one commit under one seed differ by 0.28 sigma (sd)
CLASSES = ["null"] * 50 + ["gain 0.5"] * 5 + ["gain 1"] * 5 + ["gain 2"] * 5 + ["worse"] * 35
GAINS = {"null": 0.0, "gain 0.5": 0.5, "gain 1": 1.0, "gain 2": 2.0}
DRIFT_EVERY = 10


@dataclass
class Outcome:
    kind: str  # the candidate's class
    kept: bool
    runs: int
    paired: bool = False


@dataclass
class NightResult:
    outcomes: list[Outcome] = field(default_factory=list)
    other_runs: int = 0  # baseline, drift checks, re-measuring the best
    changes: int = 0  # new noise epochs started by detect_change


class World:
    """The true levels and the seed noise of every commit of one night."""

    def __init__(self, rng: np.random.Generator, rho: float):
        self.rng, self.rho = rng, rho
        self.level: dict[int, float] = {}
        self.parent: dict[int, int | None] = {}
        self.latent: dict[tuple[int, int | None], float] = {}

    def commit(self, level: float, parent: int | None) -> int:
        commit = len(self.level)
        self.level[commit], self.parent[commit] = level, parent
        return commit

    def _latent(self, commit: int, seed) -> float:
        key = (commit, seed)
        if key not in self.latent:
            parent = self.parent[commit]
            own = self.rng.standard_normal()
            self.latent[key] = (own if parent is None or self.rho == 0
                                else self.rho * self._latent(parent, seed) + math.sqrt(1 - self.rho ** 2) * own)
        return self.latent[key]

    def run(self, commit: int, seed) -> float:
        noise = math.sqrt(1 - REPEAT ** 2) * self._latent(commit, seed) + REPEAT * self.rng.standard_normal()
        return self.level[commit] + noise  # sigma = 1


# --- the rule before issue 16, re-implemented for comparison -----------------------------------------
def today_decide(best: list[float], candidate: list[float], sigma: float) -> Action:
    delta = statistics.fmean(best) - statistics.fmean(candidate)
    se = sigma * math.sqrt(1 / len(best) + 1 / len(candidate))
    if delta > 2 * se:
        return Action.KEEP
    if delta > 1 * se and len(candidate) < 3:
        return Action.RERUN
    return Action.DISCARD


def today_night(world: World, classes: list[str], effects: list[float]) -> NightResult:
    result = NightResult()
    base = world.commit(0.0, None)
    baseline = [world.run(base, seed) for seed in (None, 1, 2)]
    result.other_runs += 3
    sigma = statistics.stdev(baseline)  # frozen for the night
    best, best_values = base, baseline
    for i, (kind, effect) in enumerate(zip(classes, effects), 1):
        commit = world.commit(world.level[best] - effect, best)
        values = []
        while True:
            values.append(world.run(commit, None if not values else len(values)))
            action = today_decide(best_values, values, sigma)
            if action != Action.RERUN:
                break
        result.outcomes.append(Outcome(kind, action == Action.KEEP, len(values)))
        if action == Action.KEEP:
            best, best_values = commit, values
        if i % DRIFT_EVERY == 0:
            best_values = best_values + [world.run(best, len(best_values))]
            result.other_runs += 1
    return result


def strict_night(world: World, classes, effects) -> NightResult:
    result = NightResult()
    base = world.commit(0.0, None)
    best, best_values = base, [world.run(base, seed) for seed in (None, 1, 2)]
    result.other_runs += 3
    for i, (kind, effect) in enumerate(zip(classes, effects), 1):
        commit = world.commit(world.level[best] - effect, best)
        value = world.run(commit, None)
        kept = value < statistics.fmean(best_values)
        result.outcomes.append(Outcome(kind, kept, 1))
        if kept:
            best, best_values = commit, [value]
        if i % DRIFT_EVERY == 0:
            best_values = best_values + [world.run(best, len(best_values))]
            result.other_runs += 1
    return result


# --- the new rule, driven as the lab drives it ---------------------------------------------------------
class Lab:
    """The measurements of a night and the lab's use of noise.py and decide.py on them."""

    def __init__(self, world: World, rule: DecisionRule, noise_mode: str, winners_count: bool = False):
        self.world, self.rule, self.noise_mode, self.winners_count = world, rule, noise_mode, winners_count
        self.found: list[Measurement] = []
        self.since = 0
        self.candidate: str | None = None  # the commit now being decided

    def run(self, commit: int, seed, kind: str, reference: int | None) -> Sample:
        value = self.world.run(commit, seed)
        order = len(self.found)
        self.found.append(Measurement(order, str(commit), value, seed, "sim", kind, None, order,
                                      None if reference is None else str(reference)))
        return Sample(value, seed)

    def noise(self) -> NoiseEstimate:
        if self.noise_mode == "known":
            return NoiseEstimate(1.0, 1.0, math.inf)
        if self.noise_mode == "frozen":  # the baseline's runs and the candidate's own, nothing learnt in between
            return estimate([m for m in self.found if m.kind == "baseline" or m.commit == self.candidate],
                            floor=self.rule.min_sigma)
        return estimate(self.found, floor=self.rule.min_sigma, since=self.since)

    def best_runs(self, best: int) -> list[Measurement]:
        return [m for m in self.found if m.commit == str(best) and m.order >= self.since]

    def best(self, best: int) -> Best:
        """As current_best builds it from the ledger: all runs, and the fresh ones (not the winning runs)."""
        runs = self.best_runs(best)
        fresh = [m for m in runs if self.winners_count or m.kind != "candidate"]
        return Best(str(best), tuple(Sample(m.value, m.seed) for m in runs),
                    tuple(Sample(m.value, m.seed) for m in fresh), 0)


def noise_night(world: World, classes, effects, rule: DecisionRule, noise_mode: str,
                winners_count: bool = False) -> NightResult:
    result, lab = NightResult(), Lab(world, rule, noise_mode, winners_count)
    best = world.commit(0.0, None)
    for seed in (None, 1, 2)[:rule.baseline_runs]:
        lab.run(best, seed, "baseline", None)
        result.other_runs += 1
    for i, (kind, effect) in enumerate(zip(classes, effects), 1):
        while best_runs_missing(rule, lab.best(best)) > 0:
            lab.run(best, next_seed([], lab.best(best).samples), "drift", None)
            result.other_runs += 1
        commit = world.commit(world.level[best] - effect, best)
        lab.candidate = str(commit)
        samples: list[Sample] = []
        paired = False
        while True:
            samples.append(lab.run(commit, next_seed(lab.best(best).fresh, samples), "candidate", best))
            decision = decide(rule, lab.best(best).fresh, samples, lab.noise())
            while decision.action == Action.MEASURE:
                lab.run(best, next_seed([], lab.best(best).samples), "drift", None)
                result.other_runs += 1
                decision = decide(rule, lab.best(best).fresh, samples, lab.noise())
            paired = paired or decision.paired
            if decision.action != Action.RERUN:
                break
        kept = decision.action == Action.KEEP
        result.outcomes.append(Outcome(kind, kept, len(samples), paired))
        if kept:
            best = commit
        if i % DRIFT_EVERY == 0:
            lab.run(best, next_seed([], lab.best(best).samples), "drift", None)
            result.other_runs += 1
            if noise_mode == "learnt":
                change = detect_change(lab.best_runs(best), lab.noise())
                if change is not None:
                    lab.since = change.start
                    result.changes += 1
    return result


# --- one candidate against a freshly measured baseline (the model) ------------------------------
class CountingOwnDf(DecisionRule):
    """The rejected variant: a look's t boundary uses sigma's df with the candidate's own reruns counted."""

    def plan(self, noise, n_best, n_runs=1, paired=False):
        return super().plan(noise, n_best, 1, paired)


def pairing_on_own_runs(rule, best, candidate, noise) -> bool:
    """The rejected variant of decide._use_pairing: pair whenever the paired estimate, the candidate's own
    differences included, gives the lower bar at this look."""
    partners = [next((b for b in best if b.seed == c.seed), None) for c in candidate]
    if noise.paired is None or None in partners:
        return False
    n = len(candidate)
    paired_bar = t_quantile(1 - rule.alpha, noise.paired.df) * noise.paired.sd / math.sqrt(n)
    return paired_bar < t_quantile(1 - rule.alpha, noise.df) * noise.sigma * math.sqrt(1 / len(best) + 1 / n)


def one_candidate(job) -> list[tuple[bool, int]]:
    """Candidates each against a fresh baseline of 3 runs, with other commits' repeated runs adding
    `df_extra` df to sigma (0: sigma from the 3 baseline runs, df 2; None: sigma known)."""
    variant, gain, df_extra, seed, count = job
    shipped_pairing = decide_module._use_pairing
    if variant == "own-pairing":
        decide_module._use_pairing = pairing_on_own_runs
    try:
        return _candidates(variant, gain, df_extra, np.random.default_rng(seed), count)
    finally:
        decide_module._use_pairing = shipped_pairing


def _candidates(variant, gain, df_extra, rng, count) -> list[tuple[bool, int]]:
    rule = {"own-df": CountingOwnDf(), "own-pairing": DecisionRule(), "noise": DecisionRule()}.get(variant)
    out = []
    for _ in range(count):
        baseline = list(rng.standard_normal(3))
        values = []
        if variant == "today":
            sigma = statistics.stdev(baseline)
            while True:
                values.append(rng.standard_normal() - gain)
                action = today_decide(baseline, values, sigma)
                if action != Action.RERUN:
                    break
        elif variant == "strict":
            values.append(rng.standard_normal() - gain)
            action = Action.KEEP if values[0] < statistics.fmean(baseline) else Action.DISCARD
        else:
            found = [Measurement(i, "best", v, s, "sim", "baseline", None, i) for i, (v, s) in
                     enumerate(zip(baseline, (None, 1, 2)))]
            for j in range(df_extra or 0):  # other commits run twice: one df each
                for seed_ in (3, 4):
                    found.append(Measurement(len(found), f"other{j}", rng.standard_normal(), seed_, "sim", "rerun",
                                             None, len(found)))
            best = [Sample(v, s) for v, s in zip(baseline, (None, 1, 2))]
            while True:
                seed_ = next_seed(best, [Sample(v, s) for v, s in values])
                value = rng.standard_normal() - gain
                values.append((value, seed_))
                found.append(Measurement(len(found), "cand", value, seed_, "sim", "candidate", None, len(found),
                                         "best"))
                noise = NoiseEstimate(1.0, 1.0, math.inf) if df_extra is None else estimate(found)
                action = decide(rule, best, values, noise).action
                if action != Action.RERUN:
                    break
        out.append((action == Action.KEEP, len(values)))
    return out


# --- nights, tables ------------------------------------------------------------------------------------
NIGHT_VARIANTS = {  # name: (how, rule, noise mode, winners counted)
    "today": ("today", None, None, False),
    "noise": ("noise", DecisionRule(), "learnt", False),
    "noise, winners counted": ("noise", DecisionRule(), "learnt", True),
    "noise, max_runs 4": ("noise", DecisionRule(max_runs=4), "learnt", False),
    "noise, sigma frozen (df 2)": ("noise", DecisionRule(), "frozen", False),
    "noise, sigma known": ("noise", DecisionRule(), "known", False),
    "strict": ("strict", None, None, False),
}


def one_night(job) -> NightResult:
    how, rule, noise_mode, winners_count, rho, seed, night, n_candidates = job
    plan_rng = np.random.default_rng([seed, night])  # the same candidates for every rule
    classes = [CLASSES[int(j)] for j in plan_rng.permutation(len(CLASSES))]
    classes = [classes[j % len(classes)] for j in range(n_candidates)]
    effects = [GAINS[c] if c in GAINS else -plan_rng.uniform(0.5, 4.0) for c in classes]
    world = World(np.random.default_rng([seed, night, 1]), rho)
    if how == "today":
        return today_night(world, classes, effects)
    if how == "strict":
        return strict_night(world, classes, effects)
    return noise_night(world, classes, effects, rule, noise_mode, winners_count)


def summarize(nights: list[NightResult]) -> dict:
    outcomes = [o for night in nights for o in night.outcomes]

    def rate(kind):
        chosen = [o for o in outcomes if o.kind == kind]
        return sum(o.kept for o in chosen) / len(chosen)

    def runs(kind=None):
        return statistics.fmean(o.runs for o in outcomes if kind is None or o.kind == kind)

    false_keeps = [sum(o.kept for o in night.outcomes if o.kind == "null") for night in nights]
    return {
        "false keep": rate("null"), "power 0.5": rate("gain 0.5"), "power 1": rate("gain 1"),
        "power 2": rate("gain 2"), "runs": runs(), "runs null": runs("null"), "runs gain 2": runs("gain 2"),
        "other runs": statistics.fmean(n.other_runs for n in nights) / len(nights[0].outcomes),
        "nights with a false keep": statistics.fmean(f > 0 for f in false_keeps),
        "false keeps per night": statistics.fmean(false_keeps),
        "paired": statistics.fmean(o.paired for o in outcomes),
        "changes per night": statistics.fmean(n.changes for n in nights),
        "null n": sum(o.kind == "null" for o in outcomes), "gain 2 n": sum(o.kind == "gain 2" for o in outcomes),
    }


def run_nights(pool, how, rule, noise_mode, winners_count, rho: float, args) -> dict:
    jobs = [(how, rule, noise_mode, winners_count, rho, args.seed, night, args.candidates)
            for night in range(args.nights)]
    return summarize(pool.map(one_night, jobs, chunksize=max(1, len(jobs) // (4 * args.workers))))


def run_candidates(pool, variant: str, gain: float, df_extra, args, count: int) -> tuple[float, float]:
    """(share kept, mean runs) of `count` candidates in the one-candidate model."""
    chunks = 8
    jobs = [(variant, gain, df_extra, [args.seed, int(gain * 10), 999 if df_extra is None else df_extra, chunk],
             count // chunks) for chunk in range(chunks)]
    out = [x for part in pool.map(one_candidate, jobs) for x in part]
    return statistics.fmean(k for k, _ in out), statistics.fmean(r for _, r in out)


def nights_table(pool, args) -> None:
    print("Whole nights (the lab's own dynamics: sigma learnt, a kept candidate becomes the best):\n")
    print("| rule | false keeps / null | power 0.5σ | power 1σ | power 2σ | runs / cand. | runs / null | "
          "runs / 2σ gain | other runs / cand. | nights with a false keep | false keeps / night |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, (how, rule, mode, winners) in NIGHT_VARIANTS.items():
        s = run_nights(pool, how, rule, mode, winners, 0.0, args)
        print(f"| {name} | {s['false keep']:.1%} | {s['power 0.5']:.1%} | {s['power 1']:.1%} | "
              f"{s['power 2']:.1%} | {s['runs']:.2f} | {s['runs null']:.2f} | {s['runs gain 2']:.2f} | "
              f"{s['other runs']:.2f} | {s['nights with a false keep']:.0%} | {s['false keeps per night']:.2f} |",
              flush=True)
        if name == "noise":
            shipped = s
    print(f"\n(per row {shipped['null n']} null and {shipped['gain 2 n']} 2σ candidates: Monte Carlo sd ~"
          f"{math.sqrt(0.05 * 0.95 / shipped['null n']):.1%} on a 5% false-keep rate, ~"
          f"{math.sqrt(0.7 * 0.3 / shipped['gain 2 n']):.1%} on a 70% power. detect_change restarted the noise "
          f"epoch {shipped['changes per night']:.2f} times per night on this steady machine.)\n")


def one_candidate_table(pool, args) -> None:
    count = args.candidates * args.nights
    print(f"One candidate against a fresh baseline of 3 runs (the issue's model; {count} candidates per cell):\n")
    print("| rule | sigma from | false keeps / null | power 2σ | runs / null | runs / 2σ gain |")
    print("|---|---|---|---|---|---|")
    rows = [("today", "the 3 runs (df 2), z", 0), ("noise", "the 3 runs (df 2)", 0), ("noise", "df 10", 8),
            ("noise", "df 30", 28), ("noise", "known", None), ("strict", "-", 0)]
    for variant, label, df_extra in rows:
        null, null_runs = run_candidates(pool, variant, 0.0, df_extra, args, count)
        power, power_runs = run_candidates(pool, variant, 2.0, df_extra, args, count)
        print(f"| {variant} | {label} | {null:.1%} | {power:.1%} | {null_runs:.2f} | {power_runs:.2f} |", flush=True)
    print()


def pairing_table(pool, args) -> None:
    print("Pairing (whole nights; candidates' runs correlate with the best's under the same seed):\n")
    print("| same-seed difference sd | pairing | false keeps / null | power 2σ | runs / cand. | decisions paired |")
    print("|---|---|---|---|---|---|")
    for rho in (0.9, 0.0, -0.5):
        tau = math.sqrt(2 * (1 - rho * (1 - REPEAT ** 2)))
        for pairing in ("never", "always", "auto"):
            s = run_nights(pool, "noise", DecisionRule(pairing=pairing), "learnt", False, rho, args)
            print(f"| {tau:.2f} σ (rho {rho:+.1f}) | {pairing} | {s['false keep']:.1%} | {s['power 2']:.1%} | "
                  f"{s['runs']:.2f} | {s['paired']:.0%} |", flush=True)
    print()


def calibration_table(pool, args) -> None:
    count = args.candidates * args.nights
    print(f"Calibration: false keeps of a null candidate in the one-candidate model ({count} per cell), as "
          "shipped and with the two rejected variants:\n")
    print("| sigma's df before the candidate | shipped | df counting the candidate's own reruns | "
          "pairing chosen on the candidate's own runs |")
    print("|---|---|---|---|")
    for df_extra in (0, 1, 3, 8, 28):
        cells = [run_candidates(pool, variant, 0.0, df_extra, args, count)[0]
                 for variant in ("noise", "own-df", "own-pairing")]
        print(f"| {df_extra + 2} | " + " | ".join(f"{c:.1%}" for c in cells) + " |", flush=True)
    print()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nights", type=int, default=400, help="simulated nights per row (default 400)")
    parser.add_argument("--candidates", type=int, default=100, help="candidates per night (default 100)")
    parser.add_argument("--seed", type=int, default=16, help="the seed of everything (default 16)")
    parser.add_argument("--workers", type=int, default=multiprocessing.cpu_count(),
                        help="processes (default: all cores)")
    parser.add_argument("--tables", default="nights,one,pairing",
                        help="which tables, comma-separated: nights, one (one candidate against a fresh baseline), "
                             "pairing, calibration (default: nights,one,pairing)")
    args = parser.parse_args(argv)
    tables = {"nights": nights_table, "one": one_candidate_table, "pairing": pairing_table,
              "calibration": calibration_table}
    chosen = [t.strip() for t in args.tables.split(",") if t.strip()]
    unknown = [t for t in chosen if t not in tables]
    if unknown:
        parser.error(f"unknown table(s) {', '.join(unknown)}: choose from {', '.join(tables)}")
    started = time.time()
    print(f"{args.nights} nights x {args.candidates} candidates, seed {args.seed}; gains in units of sigma; per 100 "
          "candidates: 50 null, 5 each at 0.5/1/2 sigma, 35 worse by 0.5-4 sigma; at most 3 runs per candidate\n")
    with multiprocessing.Pool(args.workers) as pool:
        for name in chosen:
            tables[name](pool, args)
    print(f"({time.time() - started:.0f} s on {multiprocessing.cpu_count()} cores)")


if __name__ == "__main__":
    main()
