"""Keep, discard, re-run or measure: gains are weighed against the learnt noise with t boundaries of a
sequential test, never taken at face value; and the best is defined once, from the ledger."""
import json
import math
import random

import pytest

from autoresearch.lab.decide import (Action, Best, DecisionRule, Sample, best_runs_missing, crossing_probabilities,
                                     current_best, decide, next_seed, sequential_boundaries)
from autoresearch.lab.noise import Measurement, NoiseEstimate, PairedEstimate, estimate
from lab_helpers import ledger_row


def row(id, **fields):
    """A ledger row (`ledger.Trial`) with every field, schema 2's included."""
    return ledger_row(id, **{"failure": None, "device_class": None, "tokens_per_second": None, "sandboxed": None,
                             **fields})


RULE = DecisionRule()  # noise rule, alpha 0.05, at most 3 runs
LEARNT = NoiseEstimate(0.01, 0.01, 40)  # sigma 0.01 with 40 df
BEST = [Sample(1.0, None), Sample(1.0, 1), Sample(1.0, 2)]
BEST_BASE = [Sample(1.00, None), Sample(1.02, 1), Sample(0.98, 2)]  # the baseline of `night()`


# --- the rule's settings --------------------------------------------------------------------------------
def test_the_rule_has_declared_defaults_and_round_trips_through_its_dict():
    assert RULE.to_dict() == {"name": "noise", "baseline_runs": 3, "alpha": 0.05, "max_runs": 3, "min_sigma": 0.0,
                              "drift_every": 10, "pairing": "auto"}
    assert json.loads(json.dumps(RULE.to_dict())) == RULE.to_dict()
    assert DecisionRule.from_dict(RULE.to_dict()) == RULE


def test_an_old_workspaces_config_opens():
    old = {"name": "noise", "baseline_runs": 2, "z_keep": 2.0, "z_rerun": 1.0, "max_runs": 3, "min_sigma": 0.0,
           "drift_every": 0}
    rule = DecisionRule.from_dict(old)
    assert rule == DecisionRule(baseline_runs=2, drift_every=0)  # the old default z becomes the new default alpha
    stricter = DecisionRule.from_dict({**old, "z_keep": 3.0})  # a z the user chose: the same one-sided level
    assert stricter.alpha == pytest.approx(0.00135, abs=1e-5)
    assert DecisionRule.from_dict({"name": "strict", "from_a_newer_version": 1}).name == "strict"


@pytest.mark.parametrize("setting, value, says", [
    ("name", "lucky", "unknown decision rule 'lucky': use 'noise'"),
    ("pairing", "sometimes", "pairing 'sometimes' is not one of 'auto', 'never', 'always'"),
    ("baseline_runs", 0, "baseline_runs must be a whole number of at least 1 (got 0): set it to 3"),
    ("max_runs", 0, "max_runs must be a whole number from 1 to 10 (got 0): set it to 3"),
    ("max_runs", 2.5, "max_runs must be a whole number"),
    ("alpha", 0.5, "alpha must be above 0 and below 0.5 (got 0.5)"),
    ("alpha", 0.0, "alpha must be above 0 and below 0.5 (got 0.0): it is the chance"),
    ("min_sigma", -0.001, "min_sigma must not be negative (got -0.001)"),
    ("drift_every", -1, "drift_every must be a whole number, 0 or more (got -1): set it to 10, or 0"),
])
def test_each_bad_setting_gets_one_message_that_names_it_and_the_fix(setting, value, says):
    with pytest.raises(ValueError, match="^decision rule: ") as refused:
        DecisionRule(**{setting: value})
    assert says in str(refused.value)


# --- the design -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("n_best, looks", [(1, 3), (3, 3), (3, 1), (6, 4), (3, 5)])
def test_the_boundaries_spend_exactly_alpha_on_a_null_candidate(n_best, looks):
    information = tuple(1 / (1 / n_best + 1 / k) for k in range(1, looks + 1))
    keep, stop = sequential_boundaries(0.05, tuple(i / information[-1] for i in information))
    kept, still_open = crossing_probabilities(information, keep, stop)
    assert sum(kept) == pytest.approx(0.05, abs=2e-4)
    assert all(k >= s for k, s in zip(keep, stop) if s is not None) and stop[-1] is None
    assert len(still_open) == looks - 1


def test_one_look_is_the_one_sided_t_test():
    plan = DecisionRule(max_runs=1).plan(NoiseEstimate(0.01, 0.01, 10), n_best=3)
    assert plan.keep_t(1) == pytest.approx(1.812, abs=1e-3)  # t(0.95; 10)
    assert plan.standard_errors == pytest.approx((0.01 * math.sqrt(1 / 3 + 1),))


# --- decisions --------------------------------------------------------------------------------------------
def test_a_gain_well_above_the_noise_is_kept_and_the_decision_says_why():
    d = decide(RULE, BEST, [Sample(0.96, None)], LEARNT)
    assert d.action == Action.KEEP and d.delta == pytest.approx(0.04)
    assert d.threshold < 0.04 and d.low < 0.04 < d.high and d.df == 40 and not d.paired
    assert "kept" in d.why and d.runs == 1 and d.best_runs == 3
    assert json.loads(json.dumps(d.to_dict()))["action"] == "keep"


def test_a_clearly_worse_candidate_stops_after_one_run():
    d = decide(RULE, BEST, [Sample(1.02, None)], LEARNT)
    assert d.action == Action.DISCARD and d.stop_below == 0.0 and "worth another run" in d.why


def test_a_borderline_gain_is_rerun_while_the_decision_is_open_and_only_up_to_max_runs():
    small = [Sample(0.994, None)]
    assert decide(RULE, BEST, small, LEARNT).action == Action.RERUN
    assert decide(RULE, BEST, small * 2, LEARNT).action == Action.RERUN
    last = decide(RULE, BEST, small * 3, LEARNT)
    assert last.action == Action.DISCARD and last.stop_below is None and "last run" in last.why
    assert decide(DecisionRule(max_runs=1), BEST, small, LEARNT).action == Action.DISCARD


def test_thresholds_come_from_the_t_distribution_with_the_estimates_df():
    early = decide(RULE, BEST, [Sample(0.995, None)], NoiseEstimate(0.01, 0.01, 2))
    learnt = decide(RULE, BEST, [Sample(0.995, None)], LEARNT)
    known = decide(RULE, BEST, [Sample(0.995, None)], NoiseEstimate(0.01, 0.01, math.inf))
    assert early.threshold > 2 * learnt.threshold > 2 * known.threshold
    # the candidate's own reruns are in the estimate; its df count from before them
    assert decide(RULE, BEST, [Sample(0.995, None)] * 2, NoiseEstimate(0.01, 0.01, 41)).df == 40


def test_without_a_noise_estimate_or_a_measured_best_the_lab_must_measure():
    d = decide(RULE, [Sample(1.0, None)], [Sample(0.9, None)], estimate([]))
    assert d.action == Action.MEASURE and "measure the best again" in d.why
    assert decide(RULE, [], [Sample(0.9, None)], LEARNT).action == Action.MEASURE
    with pytest.raises(ValueError, match="at least one finished run"):
        decide(RULE, BEST, [], LEARNT)


def test_min_sigma_puts_a_floor_under_a_lucky_small_spread():
    lucky = NoiseEstimate(0.0001, 0.0001, 40)
    assert decide(RULE, BEST, [Sample(0.995, None)], lucky).action == Action.KEEP
    assert decide(DecisionRule(min_sigma=0.01), BEST, [Sample(0.995, None)], lucky).action != Action.KEEP


def test_runs_that_repeat_exactly_keep_any_gain():
    exact = NoiseEstimate(0.0, 0.0, 5)
    assert decide(RULE, BEST, [Sample(0.9999, None)], exact).action == Action.KEEP
    assert decide(RULE, BEST, [Sample(1.0, None)], exact).action == Action.DISCARD


def test_the_strict_rule_keeps_any_improvement_after_one_run():
    strict = DecisionRule(name="strict")
    assert decide(strict, BEST, [Sample(0.9995, None)], LEARNT).action == Action.KEEP
    assert decide(strict, BEST, [Sample(1.0, None)], LEARNT).action == Action.DISCARD
    assert decide(strict, BEST, [Sample(0.9995, None)], estimate([])).action == Action.KEEP  # needs no noise
    assert decide(RULE, BEST, [Sample(0.9995, None)], LEARNT).action == Action.RERUN


# --- the rule as the lab runs it: seeded simulations against known distributions ------------------------------
def lab_candidates(rule, gain, count, seed, *, other_df=8):
    """Null or real candidates, each against a fresh best of 3 runs, sigma 1 pooled over the best's runs,
    `other_df` other commits run twice, and the candidate's own runs: (share kept, mean runs)."""
    rng = random.Random(seed)
    kept = runs = 0
    for _ in range(count):
        found = [Measurement(i, "best", rng.gauss(0, 1), s, "sim", "baseline", None, i) for i, s in
                 enumerate((None, 1, 2))]
        for j in range(other_df):
            found += [Measurement(len(found) + k, f"other{j}", rng.gauss(0, 1), 5 + k, "sim", "rerun", None,
                                  len(found) + k) for k in range(2)]
        best = [Sample(m.value, m.seed) for m in found[:3]]
        samples = []
        while True:
            seed_ = next_seed(best, samples)
            samples.append(Sample(rng.gauss(-gain, 1), seed_))
            found.append(Measurement(len(found), "cand", samples[-1].value, seed_, "sim", "candidate", None,
                                     len(found), "best"))
            decision = decide(rule, best, samples, estimate(found))
            if decision.action != Action.RERUN:
                break
        kept += decision.action == Action.KEEP
        runs += len(samples)
    return kept / count, runs / count


def test_a_null_candidate_is_kept_at_most_alpha_of_the_time_over_all_its_looks():
    rate, runs = lab_candidates(RULE, 0.0, 4000, seed=1)
    assert rate <= 0.05 + 3 * math.sqrt(0.05 * 0.95 / 4000)  # Monte Carlo sd 0.0034
    assert runs < 1.8
    rate_df2, _ = lab_candidates(RULE, 0.0, 3000, seed=2, other_df=0)  # sigma from the baseline alone
    assert rate_df2 <= 0.05


def test_a_two_sigma_gain_is_kept_most_of_the_time():
    power, _ = lab_candidates(RULE, 2.0, 2000, seed=3)
    assert power >= 0.65


# --- pairing ------------------------------------------------------------------------------------------------
def noise_with_paired(sd, df=20):
    return NoiseEstimate(0.01, 0.01, 40, paired=PairedEstimate(sd, sd, df))


def test_pairing_is_used_only_where_the_estimate_shows_it_lowers_the_variance():
    candidate = [Sample(0.99, None)]
    assert decide(RULE, BEST, candidate, noise_with_paired(0.003)).paired  # same-seed sd well under sqrt(2) sigma
    assert not decide(RULE, BEST, candidate, noise_with_paired(0.03)).paired  # over it: pairing would hurt
    assert not decide(DecisionRule(pairing="never"), BEST, candidate, noise_with_paired(0.003)).paired
    assert decide(DecisionRule(pairing="always"), BEST, candidate, noise_with_paired(0.03)).paired
    # no partner under the candidate's seed, or too few of the best's seeds for all its runs: no pairing
    assert not decide(RULE, BEST, [Sample(0.99, 9)], noise_with_paired(0.003)).paired
    assert not decide(RULE, BEST[:2], [Sample(0.99, None)], noise_with_paired(0.003)).paired


def test_a_paired_decision_uses_the_same_seed_differences():
    best = [Sample(1.00, None), Sample(1.03, 1), Sample(0.97, 2)]
    d = decide(RULE, best, [Sample(1.02, 1)], noise_with_paired(0.002))
    # worse than the best's mean, better than the best's run under the same seed by 5 paired sds
    assert d.paired and d.delta == pytest.approx(0.01) and d.action == Action.KEEP


def test_the_choice_to_pair_ignores_the_candidates_own_differences():
    # the only same-seed differences are the candidate's own two, which agree closely: no pairing
    found = [Measurement(i, "best", v, s, "sim", "baseline", None, i) for i, (v, s) in
             enumerate([(1.0, None), (1.01, 1), (0.99, 2)])]
    found += [Measurement(3, "c", 0.995, None, "sim", "candidate", None, 3, "best"),
              Measurement(4, "c", 1.005, 1, "sim", "rerun", None, 4, "best")]
    noise = estimate(found)
    assert noise.paired is not None and noise.paired.df == 1
    assert not decide(RULE, [Sample(1.0, None), Sample(1.01, 1), Sample(0.99, 2)],
                      [Sample(0.995, None), Sample(1.005, 1)], noise).paired


# --- seeds -----------------------------------------------------------------------------------------------------
def test_a_candidate_runs_under_the_best_seeds_first_and_a_drift_check_under_a_new_one():
    assert next_seed(BEST, []) is None
    assert next_seed(BEST, [Sample(0.9, None)]) == 1
    assert next_seed(BEST, [Sample(0.9, None), Sample(0.9, 1), Sample(0.9, 2)]) == 3
    assert next_seed([], BEST) == 3  # the best again: a seed it has not run


# --- the best ------------------------------------------------------------------------------------------------
def night():
    """A ledger: baseline (3 seeds on h100), a discarded candidate, a kept candidate with a rerun, a drift
    check on cpu, a crashed drift check, a candidate kept later."""
    return [
        row(1, kind="baseline", commit_sha="base", status="keep", val_bpb=1.00, seed=None, device_class="h100"),
        row(2, kind="baseline", commit_sha="base", status="keep", val_bpb=1.02, seed=1, device_class="h100"),
        row(3, kind="baseline", commit_sha="base", status="keep", val_bpb=0.98, seed=2, device_class="h100"),
        row(4, kind="candidate", commit_sha="c1", parent_sha="base", status="discard", val_bpb=1.1,
                   device_class="h100"),
        row(5, kind="candidate", commit_sha="c2", parent_sha="base", status="keep", val_bpb=0.95, seed=None,
                   device_class="h100"),
        row(6, kind="rerun", commit_sha="c2", parent_sha="base", status="keep", val_bpb=0.96, seed=1,
                   device_class="h100"),
        row(7, kind="drift", commit_sha="c2", parent_sha="c2", status="keep", val_bpb=0.97, seed=3,
                   device_class="h100"),
        row(8, kind="drift", commit_sha="c2", parent_sha="c2", status="keep", val_bpb=0.99, seed=4,
                   device_class="cpu"),
        row(9, kind="drift", commit_sha="c2", parent_sha="c2", status="crash", val_bpb=None, seed=5,
                   device_class="h100"),
        row(10, kind="ablation", commit_sha="c2", parent_sha="c2", status="keep", val_bpb=0.5,
                   device_class="h100"),
    ]


def test_the_best_is_the_latest_kept_commit_with_its_kept_runs():
    rows = night()
    assert current_best([]) is None
    assert current_best(rows[:4]) == Best("base", tuple(BEST_BASE), tuple(BEST_BASE), 3)
    best = current_best(rows)
    assert best.commit == "c2" and best.trial_id == 6
    assert best.samples == (Sample(0.95, None), Sample(0.96, 1), Sample(0.97, 3), Sample(0.99, 4))
    assert best.fresh == (Sample(0.97, 3), Sample(0.99, 4))  # not the runs that won it the keep
    assert best.mean == pytest.approx(0.9675) and best.seeds == [None, 1, 3, 4]


def test_the_best_is_measured_per_device_class_and_per_noise_epoch():
    rows = night()
    assert current_best(rows, "h100").values == [0.95, 0.96, 0.97]
    assert current_best(rows, "cpu").values == [0.99]
    assert current_best(rows, "h100", since=7).values == [0.97]
    on_a_new_device = current_best(rows, "h200")
    assert on_a_new_device.commit == "c2" and on_a_new_device.samples == () and on_a_new_device.mean is None
    assert decide(RULE, on_a_new_device.fresh, [Sample(0.9, None)], LEARNT).action == Action.MEASURE


def test_a_newer_kept_candidate_becomes_the_best_and_a_kept_drift_check_does_not():
    rows = night() + [
        row(11, kind="candidate", commit_sha="c3", parent_sha="c2", status="keep", val_bpb=0.90,
                   device_class="h100"),
        row(12, kind="drift", commit_sha="c2", parent_sha="c2", status="keep", val_bpb=0.97,
                   device_class="h100"),  # a late row of an older best changes nothing
    ]
    best = current_best(rows)
    assert best.commit == "c3" and best.values == [0.90] and best.fresh == ()
    assert best_runs_missing(RULE, best) == 3
    assert best_runs_missing(RULE, current_best(night())) == 1
    assert best_runs_missing(DecisionRule(name="strict"), best) == 0
    assert best_runs_missing(RULE, None) == 3
