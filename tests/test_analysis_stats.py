"""taca_probe.stats against scipy called directly and against simulations with a known mean."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.stats
import xarray as xr

from taca_probe import stats


def _run(keys, values=None):
    n = len(keys)
    return xr.Dataset(
        {"v": ("sample", np.arange(n, dtype=float) if values is None else np.asarray(values, float))},
        coords={"sample": np.arange(n), "prompt": ("sample", [k[0] for k in keys]),
                "seed": ("sample", [k[1] for k in keys]), "batch_index": ("sample", [k[2] for k in keys])},
    )


def test_bootstrap_ci_is_scipys_interval_of_the_mean():
    x = np.random.default_rng(3).normal(2.0, 1.0, 25)
    ref = scipy.stats.bootstrap((x,), np.mean, n_resamples=500, method="BCa",
                               **{stats._RNG_ARG: np.random.default_rng(7)})
    mean, low, high = stats.bootstrap_ci(x, n_resamples=500, seed=7)
    assert mean == pytest.approx(x.mean())
    assert (low, high) == pytest.approx((ref.confidence_interval.low, ref.confidence_interval.high))


def test_bootstrap_ci_degenerate_inputs():
    assert stats.bootstrap_ci([2.0, 2.0, 2.0]) == (2.0, 2.0, 2.0)
    mean, low, high = stats.bootstrap_ci([1.0])
    assert mean == 1.0 and np.isnan(low) and np.isnan(high)
    with pytest.raises(stats.AnalysisError, match="one label per value"):
        stats.bootstrap_ci([1.0, 2.0], clusters=["a"])


def test_cluster_bootstrap_covers_the_true_mean_and_is_wider_than_the_naive_one():
    """Prompts as clusters with a strong prompt effect: resampling images alone is too narrow."""
    rng = np.random.default_rng(0)
    covered, naive_covered, wider = 0, 0, 0
    trials = 60
    for _ in range(trials):
        effects = rng.normal(0.0, 1.0, 12)  # 12 prompts, true mean 0
        values = np.repeat(effects, 4) + rng.normal(0.0, 0.1, 48)  # 4 seeds each
        clusters = np.repeat(np.arange(12), 4)
        _, lo, hi = stats.bootstrap_ci(values, clusters=clusters, n_resamples=400, method="percentile",
                                       seed=int(rng.integers(1 << 30)))
        _, nlo, nhi = stats.bootstrap_ci(values, n_resamples=400, method="percentile", seed=1)
        covered += lo <= 0.0 <= hi
        naive_covered += nlo <= 0.0 <= nhi
        wider += (hi - lo) > 1.5 * (nhi - nlo)
    assert covered >= 0.85 * trials
    assert naive_covered < covered
    assert wider == trials


def test_cluster_bootstrap_mean_weights_every_value_once():
    values, clusters = [1.0, 2.0, 3.0, 10.0], ["a", "a", "a", "b"]
    mean, low, high = stats.bootstrap_ci(values, clusters=clusters, method="percentile", n_resamples=300)
    assert mean == pytest.approx(4.0)
    # every resample is (sum of drawn clusters) / (their counts): between cluster a's mean and b's
    assert 2.0 <= low <= high <= 10.0


def test_pair_samples_matches_keys_in_any_order():
    keys = [("a", 0, 0), ("a", 1, 0), ("b", 0, 0), ("b", 0, 1)]
    perm = [2, 0, 3, 1]
    ti, bi = stats.pair_samples(_run(keys), _run([keys[i] for i in perm]))
    assert [keys[i] for i in ti] == [[keys[i] for i in perm][j] for j in bi]
    t, b = stats.paired(_run(keys, [1.0, 2.0, 3.0, 4.0]), _run([keys[i] for i in perm], [30.0, 10.0, 40.0, 20.0]))
    np.testing.assert_array_equal((b["v"] - t["v"]).values, [9.0, 18.0, 27.0, 36.0])


def test_pair_samples_refuses_duplicates_and_unpaired_keys():
    keys = [("a", 0, 0), ("a", 1, 0)]
    with pytest.raises(stats.AnalysisError, match=r"holds sample \('a', seed 0\) twice"):
        stats.pair_samples(_run(keys + [("a", 0, 0)]), _run(keys))
    with pytest.raises(stats.AnalysisError, match=r"1 only in the baseline \(first \('b', seed 3, image 1\)\)"):
        stats.pair_samples(_run(keys), _run(keys + [("b", 3, 1)]))


def test_paired_test_is_scipys_per_column():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(9, 3))
    b = a + rng.normal(0.3, 1.0, size=(9, 3))
    b[:, 2] = a[:, 2]  # no difference at all: p = 1
    stat, p = stats.paired_test(a, b, test="wilcoxon", alternative="two-sided")
    for j in range(2):
        ref = scipy.stats.wilcoxon(a[:, j], b[:, j])
        assert (stat[j], p[j]) == pytest.approx((ref.statistic, ref.pvalue))
    assert p[2] == 1.0
    stat, p = stats.paired_test(a, b, test="ttest", alternative="less")
    assert p[0] == pytest.approx(scipy.stats.ttest_rel(a[:, 0], b[:, 0], alternative="less").pvalue)
    assert np.isnan(stats.paired_test(a[:1], b[:1], test="ttest", alternative="less")[1]).all()
    with pytest.raises(stats.AnalysisError, match="unknown paired test 'sign'; choose from wilcoxon, ttest"):
        stats.paired_test(a, b, test="sign", alternative="less")


def test_paired_test_gives_p_one_where_every_difference_is_zero_for_both_tests():
    rng = np.random.default_rng(2)
    a = rng.normal(size=(8, 2))
    b = a.copy()
    b[:, 0] += rng.normal(0.5, 1.0, size=8)
    for test in stats.PAIRED_TESTS:  # the t-test itself gives NaN for identical columns
        _, p = stats.paired_test(a, b, test=test, alternative="two-sided")
        assert p[1] == 1.0 and 0.0 < p[0] < 1.0


def test_cluster_bootstrap_statistic_pools_values_not_cluster_means():
    # cluster "a" holds one 0, clusters b..e twenty 1s each; a resample draws 5 clusters, k of them "a".
    # Pooling the drawn values gives 20(5-k) / (20(5-k) + k): 40/43 at k = 3, 20/24 at k = 4. P(k >= 4)
    # = 0.7 % and P(k >= 3) = 5.8 %, so the 2.5 % percentile is 40/43. The mean of the cluster means,
    # (5-k)/5, would put it at 0.4.
    values = [0.0] + [1.0] * 80
    clusters = ["a"] + [c for c in "bcde" for _ in range(20)]
    mean, low, high = stats.bootstrap_ci(values, clusters=clusters, method="percentile", n_resamples=2000)
    assert mean == pytest.approx(80 / 81)
    assert low == pytest.approx(40 / 43) and high == pytest.approx(1.0)
