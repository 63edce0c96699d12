"""Paired bootstrap of ablation variants: exact small cases by enumeration, verdicts, NaN pairs, pairing on
(seed, case), determinism and the two-stage (seed, then case) bootstrap."""

from __future__ import annotations

import itertools
import math
import random
from collections import Counter

import numpy as np
import pytest

from medseg.evaluation.paired import (
    bootstrap_means,
    paired_bootstrap,
    paired_table,
    seed_summary,
    verdict,
)

#: Resampling [1, 2, 3] with replacement: the 27 equally likely resamples, counted by hand by their sum
#: (3 = 1+1+1 once; 4 = a 2 and two 1s, 3 orders; 5 = {1,1,3} 3 + {1,2,2} 3; 6 = {2,2,2} 1 + {1,2,3} 6; ...).
SUM_COUNTS = {3: 1, 4: 3, 5: 6, 6: 7, 7: 6, 8: 3, 9: 1}


def _exact_quantile(q: float) -> float:
    """Smallest mean m with P(mean ≤ m) ≥ q under the exact bootstrap distribution of [1, 2, 3]."""
    cumulative = 0
    for total in sorted(SUM_COUNTS):
        cumulative += SUM_COUNTS[total]
        if cumulative / 27 >= q:
            return total / 3
    raise AssertionError(q)


def test_the_hand_count_is_the_enumeration():
    assert Counter(sum(r) for r in itertools.product([1, 2, 3], repeat=3)) == SUM_COUNTS


@pytest.mark.parametrize("clusters", [None, ["a", "b", "c"]], ids=["plain", "singleton-clusters"])
def test_bootstrap_distribution_of_three_values_is_the_exact_one(clusters):
    """Frequencies of every bootstrap mean of [1, 2, 3] match the 27-resample enumeration; one value per
    cluster makes the two-stage bootstrap the plain one."""
    n_boot = 100_000
    means = bootstrap_means([1.0, 2.0, 3.0], n_boot=n_boot, seed=3, clusters=clusters)
    sums = np.rint(means * 3).astype(int)
    np.testing.assert_allclose(means * 3, sums, atol=1e-12)
    found = Counter(sums.tolist())
    assert set(found) == set(SUM_COUNTS)
    for total, count in SUM_COUNTS.items():
        p = count / 27
        assert abs(found[total] / n_boot - p) < 5 * math.sqrt(p * (1 - p) / n_boot), total


@pytest.mark.parametrize(
    ("level", "lo", "hi"),
    [(0.5, 5 / 3, 7 / 3), (0.8, 4 / 3, 8 / 3), (0.95, 1.0, 3.0)],
)
def test_percentile_interval_is_the_exact_quantile_pair(level, lo, hi):
    """CDF of the mean: 1/27, 4/27, 10/27, 17/27, 23/27, 26/27, 1 at 1, 4/3, ..., 3. The 25 % quantile lies in
    the 5/3 step (4/27 < 0.25 < 10/27), the 10 % one in 4/3, the 2.5 % one in 1 (1/27 > 0.025)."""
    assert (_exact_quantile((1 - level) / 2), _exact_quantile((1 + level) / 2)) == pytest.approx((lo, hi))
    stats = paired_bootstrap([1.0, 2.0, 3.0], n_boot=20_000, seed=0, level=level)
    assert stats["lo"] == pytest.approx(lo, abs=1e-9)
    assert stats["hi"] == pytest.approx(hi, abs=1e-9)
    assert stats["mean"] == 2.0 and stats["n"] == 3 and stats["verdict"] == "better"


def test_two_stage_weighs_clusters_by_their_size():
    """Cluster 0 holds three 0s, cluster 1 two 1s. Within-cluster draws change nothing; drawing the clusters
    gives {0, 0} → 0 (p 1/4), {1, 1} → 1 (1/4), one of each → (0·3 + 1·2)/5 = 0.4 (1/2)."""
    n_boot = 40_000
    means = bootstrap_means([0, 0, 0, 1, 1], n_boot=n_boot, seed=1, clusters=[7, 7, 7, 9, 9])
    values, counts = np.unique(np.round(means, 12), return_counts=True)
    np.testing.assert_allclose(values, [0.0, 0.4, 1.0])
    np.testing.assert_allclose(counts / n_boot, [0.25, 0.5, 0.25], atol=0.01)


@pytest.mark.parametrize(
    ("lo", "hi", "higher_is_better", "expected"),
    [
        (0.01, 0.2, True, "better"),
        (-0.2, -0.01, True, "worse"),
        (-0.01, 0.2, True, "no difference"),
        (0.0, 0.2, True, "no difference"),  # the interval must exclude zero
        (-0.2, 0.0, True, "no difference"),
        (0.01, 0.2, False, "worse"),  # HD95 went up
        (-0.2, -0.01, False, "better"),
        (math.nan, math.nan, True, "n/a"),
    ],
)
def test_verdict_table(lo, hi, higher_is_better, expected):
    assert verdict(lo, hi, higher_is_better) == expected


def test_verdicts_of_paired_bootstrap():
    rng = np.random.default_rng(0)
    noise = rng.normal(0.0, 0.01, 40)
    assert paired_bootstrap(0.05 + noise)["verdict"] == "better"
    assert paired_bootstrap(-0.05 + noise)["verdict"] == "worse"
    assert paired_bootstrap(noise - noise.mean())["verdict"] == "no difference"
    assert paired_bootstrap(-0.05 + noise, higher_is_better=False)["verdict"] == "better"


def test_nan_pairs_are_dropped():
    clean = [0.1, -0.02, 0.05, 0.07, 0.0]
    with_nan = [0.1, math.nan, -0.02, 0.05, math.nan, 0.07, 0.0]
    a, b = paired_bootstrap(clean, n_boot=500), paired_bootstrap(with_nan, n_boot=500)
    assert {**b, "n_dropped": 0} == a
    assert b["n"] == 5 and b["n_dropped"] == 2

    # With clusters the dropped pair's id goes too; a cluster left empty is no cluster.
    seeds = [0, 0, 1, 1, 2, 2, 2]
    c = paired_bootstrap(with_nan, n_boot=500, clusters=seeds)
    d = paired_bootstrap(clean, n_boot=500, clusters=[0, 1, 1, 2, 2])
    assert {**c, "n_dropped": 0} == d and c["n_clusters"] == 3
    e = paired_bootstrap([math.nan, math.nan, 0.1, 0.2], n_boot=500, clusters=[5, 5, 6, 6])
    assert e["n_clusters"] == 1 and e["n"] == 2


def test_too_few_pairs_give_no_interval():
    empty = paired_bootstrap([math.nan, math.nan])
    assert empty["n"] == 0 and math.isnan(empty["mean"]) and empty["verdict"] == "n/a"
    one = paired_bootstrap([0.3])
    assert one["mean"] == 0.3 and math.isnan(one["lo"]) and math.isnan(one["hi"]) and one["verdict"] == "n/a"
    assert np.isnan(bootstrap_means([], n_boot=4)).all()


def test_deterministic_given_the_seed():
    diffs = np.random.default_rng(5).normal(0.01, 0.05, 30)
    seeds = np.repeat([0, 1, 2], 10)
    for clusters in (None, seeds):
        assert paired_bootstrap(diffs, seed=11, clusters=clusters) == paired_bootstrap(
            diffs, seed=11, clusters=clusters
        )
        np.testing.assert_array_equal(
            bootstrap_means(diffs, 1000, 11, clusters), bootstrap_means(diffs, 1000, 11, clusters)
        )
        assert not np.array_equal(
            bootstrap_means(diffs, 1000, 11, clusters), bootstrap_means(diffs, 1000, 12, clusters)
        )


def test_a_shared_seed_offset_widens_the_two_stage_interval():
    """Each seed shifts all its cases together (a lucky or unlucky initialisation). 60 pairs look like a
    clear improvement when resampled as independent; the five seeds do not support it."""
    rng = np.random.default_rng(2)
    offsets = np.array([0.04, -0.02, 0.03, -0.01, 0.025])
    seeds = np.repeat(np.arange(5), 12)
    diffs = offsets[seeds] + rng.normal(0.0, 0.005, seeds.size)
    plain = paired_bootstrap(diffs)
    two_stage = paired_bootstrap(diffs, clusters=seeds)
    assert plain["mean"] == two_stage["mean"]
    assert (two_stage["hi"] - two_stage["lo"]) > 2 * (plain["hi"] - plain["lo"])
    assert plain["verdict"] == "better" and two_stage["verdict"] == "no difference"
    assert two_stage["n_clusters"] == 5 and plain["n_clusters"] == 60


def test_bad_arguments_are_errors():
    with pytest.raises(ValueError, match="level"):
        paired_bootstrap([1.0, 2.0], level=95)
    with pytest.raises(ValueError, match="n_boot"):
        paired_bootstrap([1.0, 2.0], n_boot=0)
    with pytest.raises(ValueError, match="one id per difference"):
        paired_bootstrap([1.0, 2.0], clusters=[0])
    with pytest.raises(ValueError, match="one-dimensional"):
        paired_bootstrap([[1.0, 2.0]])


# ---- tables ----------------------------------------------------------------------------------------------


def _ablation_rows(seeds=(0, 1, 2), cases=("c1", "c2", "c3", "c4")) -> list[dict]:
    """Reference ``unet`` with random Dice; ``ag`` = unet + 0.01·(case number) + 0.002·seed, so its true
    per-pair difference is known and a mis-pairing would show."""
    rng = np.random.default_rng(4)
    rows = []
    for s in seeds:
        for j, c in enumerate(cases, start=1):
            base = float(rng.uniform(0.5, 0.9))
            rows.append(
                {"variant": "unet", "seed": s, "case": c, "dice_pancreas": base, "dice_mean": base + 0.05}
            )
            rows.append(
                {
                    "variant": "ag",
                    "seed": s,
                    "case": c,
                    "dice_pancreas": base + 0.01 * j + 0.002 * s,
                    "dice_mean": base + 0.05,
                }
            )
    return rows


def test_paired_table_pairs_on_seed_and_case_whatever_the_row_order():
    rows = _ablation_rows()
    shuffled = rows[:]
    random.Random(0).shuffle(shuffled)
    table = paired_table(rows, "unet", ["dice_pancreas", "dice_mean"], n_boot=2000)
    assert paired_table(shuffled, "unet", ["dice_pancreas", "dice_mean"], n_boot=2000) == table

    pancreas, mean = table
    assert (pancreas["variant"], pancreas["reference"], pancreas["metric"]) == ("ag", "unet", "dice_pancreas")
    # true differences: 0.01·j (j = 1..4, mean 0.025) + 0.002·s (s = 0..2, mean 0.002)
    assert pancreas["mean"] == pytest.approx(0.027, abs=1e-12)
    assert pancreas["n"] == 12 and pancreas["n_clusters"] == 3 and pancreas["n_unpaired"] == 0
    assert pancreas["verdict"] == "better"
    assert mean["mean"] == pytest.approx(0.0, abs=1e-12) and mean["lo"] == pytest.approx(0.0, abs=1e-12)
    assert mean["verdict"] == "no difference"

    # The same numbers as paired_bootstrap on the differences in (seed, case) order, seeds as clusters.
    diffs = [0.01 * j + 0.002 * s for s in range(3) for j in range(1, 5)]
    expected = paired_bootstrap(diffs, 2000, 0, np.repeat([0, 1, 2], 4))
    assert {k: pancreas[k] for k in expected} == pytest.approx(expected)
    plain = paired_table(rows, "unet", ["dice_pancreas"], n_boot=2000, by_seed=False)[0]
    assert plain["n_clusters"] == 12


def test_paired_table_reports_missing_pairs_and_nan():
    rows = [
        r for r in _ablation_rows() if not (r["variant"] == "ag" and r["seed"] == 2 and r["case"] == "c4")
    ]
    rows.append({"variant": "ag", "seed": 9, "case": "c1", "dice_pancreas": 0.7, "dice_mean": 0.7})
    rows[0]["dice_pancreas"] = math.nan  # unet, seed 0, c1: organ absent
    rows.append({"variant": "only_one", "seed": 0, "case": "c2", "dice_pancreas": 0.7, "dice_mean": 0.7})
    table = {
        (r["variant"], r["metric"]): r for r in paired_table(rows, "unet", ["dice_pancreas", "dice_mean"])
    }
    assert table["ag", "dice_pancreas"]["n"] == 10 and table["ag", "dice_pancreas"]["n_dropped"] == 1
    assert table["ag", "dice_mean"]["n"] == 11 and table["ag", "dice_pancreas"]["n_unpaired"] == 2
    lonely = table["only_one", "dice_pancreas"]
    assert lonely["n"] == 1 and lonely["n_unpaired"] == 11 and lonely["verdict"] == "n/a"


def test_paired_table_reads_csv_strings_and_lower_is_better():
    rows = [
        {"variant": v, "seed": "0", "case": f"c{i}", "hd95": str(10.0 + i - (2.0 if v == "ag" else 0.0))}
        for v in ("unet", "ag")
        for i in range(6)
    ]
    rows[1]["hd95"] = ""  # a missing cell from csv.DictReader
    (row,) = paired_table(rows, "unet", ["hd95"], n_boot=500, lower_is_better={"hd95"})
    assert row["mean"] == pytest.approx(-2.0) and row["n"] == 5 and row["verdict"] == "better"


def test_paired_table_errors_name_the_problem():
    rows = _ablation_rows()
    with pytest.raises(
        ValueError, match=r"reference 'attention_unet' has no rows; variants found: \['unet', 'ag'\]"
    ):
        paired_table(rows, "attention_unet", ["dice_mean"])
    with pytest.raises(ValueError, match="two rows for seed 0, case 'c1'"):
        paired_table([*rows, dict(rows[0])], "unet", ["dice_mean"])
    with pytest.raises(ValueError, match="no 'seed' column"):
        paired_table([{"variant": "unet", "case": "c1"}], "unet", ["dice_mean"])


def test_seed_summary_by_hand():
    nan = math.nan
    rows = [
        {"variant": "ag", "seed": 0, "case": "a", "dice": 0.8},
        {"variant": "ag", "seed": 0, "case": "b", "dice": 0.6},  # seed 0: 0.7
        {"variant": "ag", "seed": 1, "case": "a", "dice": 0.9},
        {"variant": "ag", "seed": 1, "case": "b", "dice": nan},
        {"variant": "ag", "seed": 1, "case": "c", "dice": 0.7},  # seed 1: 0.8 (NaN left out)
        {"variant": "ag", "seed": 2, "case": "a", "dice": None},  # seed 2: no value, not counted
        {"variant": "unet", "seed": 0, "case": "a", "dice": 0.5},
    ]
    ag, unet = seed_summary(rows, ["dice"])
    assert (ag["variant"], ag["metric"], ag["n_seeds"]) == ("ag", "dice", 2)
    assert ag["mean"] == pytest.approx(0.75)
    assert ag["std"] == pytest.approx(math.sqrt(2 * 0.05**2))  # ddof=1 over the two seed means
    assert unet["mean"] == 0.5 and math.isnan(unet["std"]) and unet["n_seeds"] == 1
    (empty,) = seed_summary([{"variant": "x", "seed": 0, "case": "a"}], ["dice"])
    assert empty["n_seeds"] == 0 and math.isnan(empty["mean"])
