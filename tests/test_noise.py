"""The noise model: sigma pooled within commits with its degrees of freedom, same-seed differences,
the t and F distributions it rests on, changes of the machine, and what gains it lets us see."""
import math
import random

import pytest

from autoresearch.lab.decide import DecisionRule, Sample, decide
from autoresearch.lab.noise import (ChangeKind, Measurement, NoiseEstimate, by_device, detect_change, detectable_gain,
                                    estimate, f_sf, gain_interval, measurements, regularized_beta, t_cdf, t_quantile)
from lab_helpers import ledger_row


def row(id, **fields):
    """A ledger row (`ledger.Trial`) with every field, schema 2's included."""
    return ledger_row(id, **{"failure": None, "device_class": None, "tokens_per_second": None, "sandboxed": None,
                             **fields})


def run(order, commit, value, seed=None, *, reference=None, kind="rerun", device="h100", tps=None):
    return Measurement(order, commit, value, seed, device, kind, tps, order, reference)


# --- pooling --------------------------------------------------------------------------------------
def test_sigma_pools_the_spread_within_each_commit_with_its_degrees_of_freedom():
    found = [run(1, "a", 1.0), run(2, "a", 1.2),  # mean 1.1, squares 0.02, 1 df
             run(3, "b", 2.0), run(4, "b", 2.1), run(5, "b", 2.5),  # mean 2.2, squares 0.14, 2 df
             run(6, "c", 3.0)]  # one run: no spread, no df
    noise = estimate(found)
    assert noise.df == 3
    assert noise.raw_sigma == pytest.approx(math.sqrt(0.16 / 3))
    assert noise.sigma == noise.raw_sigma and noise.paired is None


def test_commits_that_differ_in_level_do_not_inflate_sigma():
    found = [run(1, "a", 1.0), run(2, "a", 1.01), run(3, "b", 5.0), run(4, "b", 5.01)]
    assert estimate(found).sigma == pytest.approx(math.sqrt(2 * 0.005 ** 2 * 2 / 2))


def test_only_measurements_from_the_start_of_the_epoch_count():
    found = [run(1, "a", 1.0), run(2, "a", 1.5), run(10, "a", 1.0), run(11, "a", 1.02)]
    assert estimate(found, since=10).sigma == pytest.approx(math.sqrt(0.02 ** 2 / 2))
    assert estimate(found, since=10).df == 1 and estimate(found, since=10).since == 10


def test_without_a_repeated_commit_there_is_no_sigma():
    noise = estimate([run(1, "a", 1.0), run(2, "b", 1.1)])
    assert noise.sigma is None and noise.raw_sigma is None and noise.df == 0


def test_the_floor_is_put_under_sigma_and_the_raw_value_kept():
    noise = estimate([run(1, "a", 1.0), run(2, "a", 1.0001)], floor=0.01)
    assert noise.sigma == 0.01 and noise.raw_sigma == pytest.approx(0.0001 / math.sqrt(2)) and noise.floor == 0.01
    with pytest.raises(ValueError, match="floor"):
        estimate([], floor=-0.1)


def test_same_seed_differences_are_pooled_around_each_candidates_own_mean_difference():
    best = [run(1, "B", 1.00, None, kind="baseline"), run(2, "B", 1.02, 1, kind="baseline"),
            run(3, "B", 0.98, 2, kind="baseline")]
    x = [run(4, "X", 0.97, None, reference="B", kind="candidate"), run(5, "X", 1.00, 1, reference="B")]  # -0.03, -0.02
    y = [run(6, "Y", 1.05, None, reference="B", kind="candidate")]  # one pair: no spread of its own
    z = [run(7, "Z", 1.10, 7, reference="B", kind="candidate"), run(8, "Z", 1.2, 8, reference="B")]  # no partner
    noise = estimate(best + x + y + z)
    assert noise.paired.df == 1
    assert noise.paired.sd == pytest.approx(math.sqrt((0.005 ** 2) * 2))
    assert estimate(best + y).paired is None


def test_measurements_come_from_ledger_rows_with_a_value():
    rows = [
        row(1, kind="baseline", commit_sha="b", status="keep", val_bpb=1.0, device_class="h100", seed=None),
        row(2, kind="candidate", commit_sha="c", parent_sha="b", status="discard", val_bpb=1.1, seed=None,
                   device_class="h100", tokens_per_second=5e5),
        row(3, kind="rerun", commit_sha="d", parent_sha="b", status="running", val_bpb=0.9, seed=1,
                   device_class="cpu"),
        row(4, kind="candidate", commit_sha="e", parent_sha="b", status="crash", val_bpb=None),
        row(5, kind="candidate", commit_sha="f", parent_sha="b", status="stopped", val_bpb=0.5),
        row(6, kind="candidate", commit_sha=None, status="discard", val_bpb=None),  # an empty proposal
        row(7, kind="drift", commit_sha="b", parent_sha="b", status="keep", val_bpb=1.01, seed=3,
                   device_class="h100"),
    ]
    found = measurements(rows)
    assert [m.trial_id for m in found] == [1, 2, 3, 7]
    assert found[1] == Measurement(2, "c", 1.1, None, "h100", "candidate", 5e5, 2, "b")
    assert found[3].reference is None  # the best measured against itself
    assert [m.trial_id for m in by_device(found, "h100")] == [1, 2, 7]
    assert len(by_device(found, None)) == 4


# --- the distributions ------------------------------------------------------------------------------
@pytest.mark.parametrize("p, df, tabulated", [
    (0.95, 1, 6.314), (0.975, 1, 12.706), (0.9995, 1, 636.619), (0.95, 2, 2.920), (0.975, 2, 4.303),
    (0.9, 4, 1.533), (0.99, 5, 3.365), (0.975, 10, 2.228), (0.995, 30, 2.750), (0.975, 120, 1.980),
    (0.9995, 3, 12.924), (0.95, math.inf, 1.645),
])
def test_t_quantiles_match_the_tables(p, df, tabulated):
    assert t_quantile(p, df) == pytest.approx(tabulated, abs=6e-4)
    assert t_quantile(1 - p, df) == pytest.approx(-tabulated, abs=6e-4)
    assert t_cdf(t_quantile(p, df), df) == pytest.approx(p, abs=1e-10)


def test_the_incomplete_beta_and_f_distribution_match_closed_forms_and_tables():
    assert regularized_beta(0.3, 1, 1) == pytest.approx(0.3)
    assert regularized_beta(0.3, 2.5, 1) == pytest.approx(0.3 ** 2.5)
    assert regularized_beta(0.8, 3, 4) + regularized_beta(0.2, 4, 3) == pytest.approx(1)
    assert f_sf(3.326, 5, 10) == pytest.approx(0.05, abs=2e-4)  # F(0.95; 5, 10)
    assert f_sf(5.390, 2, 30) == pytest.approx(0.01, abs=1e-4)  # F(0.99; 2, 30)


def test_bad_quantile_arguments_are_refused():
    with pytest.raises(ValueError):
        t_quantile(1.0, 3)
    with pytest.raises(ValueError):
        t_quantile(0.9, 0)


# --- following the machine ----------------------------------------------------------------------------
NOISE = NoiseEstimate(0.01, 0.01, 30)


def steady(values, tps=1e6):
    return [run(i, "best", v, i, kind="baseline" if i < 3 else "drift", tps=tps) for i, v in enumerate(values)]


def test_a_level_shift_of_the_best_is_detected_where_it_starts():
    runs = steady([1.000, 1.008, 0.993, 1.004, 0.997, 1.060])
    change = detect_change(runs, NOISE)
    assert change.what == ChangeKind.LEVEL and change.start == 5
    assert change.size == pytest.approx(1.060 - 1.0004)
    assert "higher" in change.why and "trial 5" in change.why


def test_a_shift_seen_in_the_two_newest_runs_starts_at_the_first_of_them():
    change = detect_change(steady([1.000, 1.008, 0.993, 1.004, 0.997, 1.03, 1.03]), NOISE)
    assert change.what == ChangeKind.LEVEL and change.start == 5


def test_a_wider_spread_without_a_shift_is_detected():
    runs = steady([1.000, 1.004, 0.996, 1.03, 0.97, 1.03, 0.97, 1.0])
    change = detect_change(runs, NOISE)
    assert change.what == ChangeKind.SPREAD and change.start == 3 and change.size > 2


def test_a_slower_machine_is_seen_as_such():
    runs = steady([1.0, 1.01, 0.99, 1.0])
    runs[-1] = run(3, "best", 1.0, 3, kind="drift", tps=0.8e6)
    change = detect_change(runs, NOISE)
    assert change.what == ChangeKind.THROUGHPUT and change.size == pytest.approx(-0.2) and change.start == 3
    assert "slower" in change.why
    runs[-1] = run(3, "best", 1.0, 3, kind="drift", tps=0.98e6)  # 2%: the same machine
    assert detect_change(runs, NOISE) is None


def test_a_steady_series_is_rarely_flagged():
    rng = random.Random(16)
    alarms = 0
    for _ in range(400):
        runs = steady([rng.gauss(1.0, 0.01) for _ in range(8)], tps=1e6 * rng.uniform(0.97, 1.03))
        alarms += detect_change(runs, NOISE) is not None
    assert alarms / 400 <= 0.03  # three tests at alpha 0.01 each
    assert detect_change(steady([1.0]), NOISE) is None  # one run: nothing to compare
    assert detect_change(steady([1.0, 1.5]), NoiseEstimate(None, None, 0)) is None  # no sigma: no level test


# --- what the noise lets the lab see --------------------------------------------------------------------
def test_the_gain_interval_is_reference_minus_treatment_with_a_t_half_width():
    noise = NoiseEstimate(0.01, 0.01, 10)
    interval = gain_interval([1.0, 1.0, 1.0], [0.98, 0.99], noise)
    assert interval.delta == pytest.approx(0.015)  # positive: the treatment measures lower, better
    half = 2.228139 * 0.01 * math.sqrt(1 / 3 + 1 / 2)
    assert (interval.low, interval.high) == pytest.approx((0.015 - half, 0.015 + half), abs=1e-6)
    unknown = gain_interval([1.0], [1.1], NoiseEstimate(None, None, 0))
    assert unknown.delta == pytest.approx(-0.1) and unknown.low is None and unknown.high is None


def test_the_detectable_gain_shrinks_with_what_is_known_and_is_kept_half_the_time():
    rule = DecisionRule()
    early, learnt = NoiseEstimate(0.01, 0.01, 2), NoiseEstimate(0.01, 0.01, 40)
    assert detectable_gain(early, rule, 3) > detectable_gain(learnt, rule, 3) > detectable_gain(learnt, rule, 8)
    assert detectable_gain(learnt, DecisionRule(max_runs=1), 3) > detectable_gain(learnt, rule, 3)
    assert detectable_gain(NoiseEstimate(None, None, 0), rule, 3) is None
    assert detectable_gain(learnt, DecisionRule(name="strict"), 3) == 0.0

    # the rule, run as the lab runs it with sigma known, keeps a candidate of exactly that gain half the time
    known = NoiseEstimate(0.01, 0.01, math.inf)
    gain = detectable_gain(known, rule, 3)
    assert 1.0 * 0.01 < gain < 2.0 * 0.01  # 1.37 sigma: a 2-sigma gain is kept ~75% of the time
    rng = random.Random(7)
    kept = 0
    for _ in range(3000):
        best = [Sample(rng.gauss(1.0, 0.01), seed) for seed in (None, 1, 2)]
        runs = []
        while True:
            runs.append(Sample(rng.gauss(1.0 - gain, 0.01), len(runs) + 10))
            decision = decide(rule, best, runs, known)
            if decision.action != "rerun":
                break
        kept += decision.action == "keep"
    assert kept / 3000 == pytest.approx(0.5, abs=0.03)
