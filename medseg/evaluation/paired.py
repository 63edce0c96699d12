"""Paired comparison of ablation variants: bootstrap confidence intervals of per-(seed, case) differences.

An ablation trains every variant with the same seeds and scores it on the same cases, so each variant's
score on ``(seed, case)`` has a partner in the reference's (the plain U-Net, or the Attention U-Net). The
difference ``d = variant − reference`` removes what the case and the seed contribute to both, and the
question "is the variant better?" becomes "is the mean of ``d`` above zero?".

* :func:`paired_bootstrap` — percentile bootstrap confidence interval of the mean difference (Efron &
  Tibshirani 1993, *An Introduction to the Bootstrap*, ch. 13.3). A variant is called ``"better"`` only where
  the whole interval lies above zero, ``"worse"`` only where it lies below; otherwise ``"no difference"``.
* :func:`paired_table` — the paired statistics of every (variant, metric) against one reference, pairing the
  rows of an ablation table on ``(seed, case)``.
* :func:`seed_summary` — the usual "mean ± std over seeds" of each variant's per-seed mean.

Which resampling. Differences from one seed share that seed's initialisation and data order; they are not
independent draws. Resampling the pairs as if they were (the *plain* bootstrap) then gives an interval that
is too narrow whenever a seed shifts all its cases together. With ``clusters`` (the seed of each pair) the
bootstrap is *two-stage* (Davison & Hinkley 1997, *Bootstrap Methods and their Application*, sec. 3.8):
draw the seeds with replacement, then the cases of each drawn seed with replacement. :func:`paired_bootstrap`
resamples plain pairs by default (it is given no seeds); :func:`paired_table` passes the seeds, so tables are
two-stage by default. With three seeds there are only ten distinct multisets of seeds: the interval is coarse
and, like every bootstrap from few clusters, somewhat optimistic, but it no longer pretends that 3 × 20 pairs
are 60 independent experiments. With a single seed the two-stage bootstrap is the plain one over cases.

Missing values. A NaN difference (an organ absent from the reference, so its Dice is undefined; a metric a
variant did not record) drops that pair, for that metric only; the number of pairs used is reported as ``n``.

>>> stats = paired_bootstrap([0.02, 0.03, 0.01, 0.04], n_boot=2000)
>>> stats["verdict"]
'better'
"""

from __future__ import annotations

import math
from collections.abc import Collection, Hashable, Mapping, Sequence
from typing import Any

import numpy as np

#: Verdicts of :func:`paired_bootstrap`; ``"n/a"`` when fewer than two pairs are left.
VERDICTS = ("better", "worse", "no difference", "n/a")

#: Bootstrap resamples are drawn in chunks of at most this many values (bounded memory for large tables).
_CHUNK_VALUES = 1 << 22


def _check_n_boot(n_boot: int) -> None:
    if int(n_boot) != n_boot or n_boot < 1:
        raise ValueError(f"n_boot must be a positive integer, found {n_boot}")


def _finite_pairs(diffs: Any, clusters: Any) -> tuple[np.ndarray, np.ndarray | None]:
    """1-D float differences without NaN, and the matching cluster codes ``0..C-1`` (or None)."""
    values = np.asarray(diffs, dtype=np.float64)
    if values.ndim != 1:
        raise ValueError(f"diffs must be one-dimensional (one value per pair), found shape {values.shape}")
    keep = ~np.isnan(values)
    if clusters is None:
        return values[keep], None
    ids = np.asarray(clusters)
    if ids.shape != values.shape:
        raise ValueError(
            f"clusters must give one id per difference: {ids.shape[0] if ids.ndim else 0} ids for "
            f"{values.shape[0]} differences"
        )
    _, codes = np.unique(ids[keep], return_inverse=True)
    return values[keep], codes.reshape(-1)


def bootstrap_means(diffs: Any, n_boot: int = 10000, seed: int = 0, clusters: Any = None) -> np.ndarray:
    """``n_boot`` bootstrap replicates of the mean of ``diffs`` (NaN dropped), as a float64 array.

    Plain (``clusters=None``): each replicate is the mean of ``n`` values drawn with replacement. Two-stage
    (``clusters`` gives each value's cluster, e.g. its seed): draw the ``C`` clusters with replacement, then
    within each drawn cluster as many values as it holds, with replacement; the replicate is the mean over all
    values drawn (clusters of unequal size weigh by their size, as in the point estimate, the mean over
    pairs). Deterministic given ``seed`` (``numpy.random.default_rng``). Empty input gives NaN replicates.
    """
    _check_n_boot(n_boot)
    values, codes = _finite_pairs(diffs, clusters)
    rng = np.random.default_rng(seed)
    out = np.empty(int(n_boot), dtype=np.float64)
    if values.size == 0:
        out.fill(np.nan)
        return out
    if codes is None:
        n = values.size
        step = max(1, _CHUNK_VALUES // n)
        for start in range(0, out.size, step):
            rows = min(step, out.size - start)
            out[start : start + rows] = values[rng.integers(0, n, size=(rows, n))].mean(axis=1)
        return out
    order = np.argsort(codes, kind="stable")
    ordered = values[order]
    sizes = np.bincount(codes)
    starts = np.cumsum(sizes) - sizes
    n_clusters, widest = sizes.size, int(sizes.max())
    within = np.arange(widest)
    step = max(1, _CHUNK_VALUES // (n_clusters * widest))
    for start in range(0, out.size, step):
        rows = min(step, out.size - start)
        drawn = rng.integers(0, n_clusters, size=(rows, n_clusters))  # stage 1: clusters
        size = sizes[drawn][..., None]  # (rows, C, 1)
        offset = rng.integers(0, size, size=(rows, n_clusters, widest))  # stage 2: values in each
        picked = ordered[starts[drawn][..., None] + offset]
        total = np.where(within < size, picked, 0.0).sum(axis=(1, 2))
        out[start : start + rows] = total / size.sum(axis=(1, 2))
    return out


def verdict(lo: float, hi: float, higher_is_better: bool = True) -> str:
    """``"better"`` when the interval ``[lo, hi]`` of ``variant − reference`` excludes zero on the good side,
    ``"worse"`` when it excludes zero on the bad side, ``"no difference"`` when it contains zero, ``"n/a"``
    when it is undefined (NaN)."""
    if math.isnan(lo) or math.isnan(hi):
        return "n/a"
    if lo > 0:
        return "better" if higher_is_better else "worse"
    if hi < 0:
        return "worse" if higher_is_better else "better"
    return "no difference"


def paired_bootstrap(
    diffs: Any,
    n_boot: int = 10000,
    seed: int = 0,
    clusters: Any = None,
    level: float = 0.95,
    *,
    higher_is_better: bool = True,
) -> dict[str, Any]:
    """Mean paired difference with its percentile bootstrap interval, and the verdict.

    Args:
        diffs: per-pair differences ``variant − reference`` (one per seed and case); NaN pairs are dropped.
        n_boot: bootstrap replicates (10 000 resamples of ~50 values take a few milliseconds).
        seed: seed of the resampling (same seed, same interval).
        clusters: optional cluster id of each difference (the training seed) for the two-stage bootstrap
            (module docstring); None resamples the pairs as independent.
        level: coverage of the interval; its ends are the ``(1 − level)/2`` and ``(1 + level)/2`` quantiles
            of the bootstrap means (``numpy.quantile``, linear interpolation).
        higher_is_better: False for metrics where lower is better (HD95, ASSD): a negative difference is
            then ``"better"``.

    Returns:
        ``{"mean", "lo", "hi", "n", "n_clusters", "n_dropped", "verdict"}``: ``n`` pairs used, ``n_clusters``
        distinct clusters among them (``n`` without ``clusters``), ``n_dropped`` NaN pairs left out. With
        fewer than two pairs the interval is NaN and the verdict ``"n/a"`` (one pair says nothing about
        spread); the mean is NaN without pairs.

    Example:
        >>> paired_bootstrap([0.1, -0.1, 0.05, -0.05, float("nan")], n_boot=1000)["verdict"]
        'no difference'
    """
    _check_n_boot(n_boot)
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must lie strictly between 0 and 1 (e.g. 0.95), found {level}")
    values, codes = _finite_pairs(diffs, clusters)
    n = int(values.size)
    dropped = int(np.asarray(diffs, dtype=np.float64).size) - n
    mean = float(values.mean()) if n else math.nan
    lo = hi = math.nan
    if n >= 2:
        means = bootstrap_means(values, n_boot, seed, codes)
        lo, hi = (float(q) for q in np.quantile(means, [(1.0 - level) / 2.0, (1.0 + level) / 2.0]))
    return {
        "mean": mean,
        "lo": lo,
        "hi": hi,
        "n": n,
        "n_clusters": n if codes is None else int(np.unique(codes).size),
        "n_dropped": dropped,
        "verdict": verdict(lo, hi, higher_is_better),
    }


def _number(value: Any) -> float:
    """A metric cell as float: None and empty strings (a CSV's missing value) are NaN."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return math.nan
    return float(value)


def _index_rows(rows: Sequence[Mapping[str, Any]]) -> dict[Hashable, dict[tuple, Mapping[str, Any]]]:
    """``{variant: {(seed, case): row}}`` in first-appearance order; a duplicated key is an error."""
    table: dict[Hashable, dict[tuple, Mapping[str, Any]]] = {}
    for i, row in enumerate(rows):
        try:
            variant, key = row["variant"], (row["seed"], row["case"])
        except KeyError as exc:
            raise ValueError(f"row {i} has no {exc.args[0]!r} column (needs variant, seed, case)") from None
        by_key = table.setdefault(variant, {})
        if key in by_key:
            raise ValueError(f"variant {variant!r} has two rows for seed {key[0]!r}, case {key[1]!r}")
        by_key[key] = row
    return table


def paired_table(
    rows: Sequence[Mapping[str, Any]],
    reference: Hashable,
    metric_keys: Sequence[str],
    *,
    n_boot: int = 10000,
    seed: int = 0,
    level: float = 0.95,
    by_seed: bool = True,
    lower_is_better: Collection[str] = (),
) -> list[dict[str, Any]]:
    """Paired bootstrap of every other variant against ``reference``, per metric, pairing on (seed, case).

    Args:
        rows: one dict per (variant, seed, case) with keys ``variant``, ``seed``, ``case`` and the metric
            columns (numbers, or strings as read from a CSV; None / ``""`` / NaN are missing).
        reference: the variant every other variant is compared with (call again for a second reference).
        metric_keys: metric columns to compare, e.g. ``["dice_pancreas", "dice_mean"]``.
        n_boot, seed, level: as :func:`paired_bootstrap` (every cell uses the same ``seed``).
        by_seed: two-stage bootstrap with the seed as cluster (default; module docstring); False resamples
            the pairs as independent.
        lower_is_better: metric keys for which a negative difference is an improvement (``hd95``, ``assd``).

    Returns:
        One dict per (variant, metric), variants in the order they first appear in ``rows``, metrics in the
        order given: ``variant``, ``reference``, ``metric``, the keys of :func:`paired_bootstrap`, and
        ``n_unpaired`` — (seed, case) keys present for only one of the two variants (a variant that lacks
        runs shows it here and in a smaller ``n``). The pairs are put in a fixed order before resampling,
        so the order of ``rows`` does not change any number.

    Raises:
        ValueError: ``reference`` has no rows (the message lists the variants found), a row lacks
            ``variant`` / ``seed`` / ``case``, or a (variant, seed, case) appears twice.
    """
    table = _index_rows(rows)
    if reference not in table:
        raise ValueError(f"reference {reference!r} has no rows; variants found: {list(table)}")
    ref_rows = table[reference]
    out = []
    for variant, var_rows in table.items():
        if variant == reference:
            continue
        keys = sorted((k for k in ref_rows if k in var_rows), key=repr)  # row order does not matter
        unpaired = len(ref_rows.keys() ^ var_rows.keys())
        for metric in metric_keys:
            diffs = [_number(var_rows[k].get(metric)) - _number(ref_rows[k].get(metric)) for k in keys]
            stats = paired_bootstrap(
                diffs,
                n_boot,
                seed,
                [k[0] for k in keys] if by_seed else None,
                level,
                higher_is_better=metric not in lower_is_better,
            )
            out.append(
                {
                    "variant": variant,
                    "reference": reference,
                    "metric": metric,
                    **stats,
                    "n_unpaired": unpaired,
                }
            )
    return out


def seed_summary(rows: Sequence[Mapping[str, Any]], metric_keys: Sequence[str]) -> list[dict[str, Any]]:
    """Per variant and metric: the mean over seeds of each seed's mean over cases, and its spread.

    Returns one dict per (variant, metric), variants in first-appearance order: ``variant``, ``metric``,
    ``mean`` (mean of the per-seed means), ``std`` (their standard deviation, ``ddof=1``; NaN with one seed)
    and ``n_seeds``. Missing values (NaN, None, ``""``) are left out of a seed's mean; a seed with no value
    for the metric is left out (``n_seeds`` counts the seeds that have one). No seed at all: NaN, 0.
    """
    table = _index_rows(rows)
    out = []
    for variant, by_key in table.items():
        for metric in metric_keys:
            per_seed: dict[Hashable, list[float]] = {}
            for (run_seed, _case), row in by_key.items():
                value = _number(row.get(metric))
                if not math.isnan(value):
                    per_seed.setdefault(run_seed, []).append(value)
            means = np.array([np.mean(v) for v in per_seed.values()], dtype=np.float64)
            out.append(
                {
                    "variant": variant,
                    "metric": metric,
                    "mean": float(means.mean()) if means.size else math.nan,
                    "std": float(means.std(ddof=1)) if means.size > 1 else math.nan,
                    "n_seeds": int(means.size),
                }
            )
    return out
