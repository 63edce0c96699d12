"""Benchmark: HD95 + ASSD + NSD with medseg vs MONAI vs DeepMind ``surface-distance``, in one run.

    python -m benchmarks.bench_metrics [--shape 300 512 512] [--spacing 1.0 0.8 0.8] [--offset 2] [--repeat 3]

Builds two overlapping ellipsoids (the second shifted by ``--offset`` voxels along every axis and with
slightly different semi-axes; ``--offset`` sets how far apart the surfaces are, i.e. how good the
"prediction" is), then times

* medseg: :func:`medseg.metrics.evaluate_pair` (Dice, IoU, HD95, ASSD, NSD, volumes — everything);
* MONAI: ``monai.metrics.compute_hausdorff_distance(percentile=95)`` alone;
* surface-distance (if installed): ``compute_surface_distances`` + robust Hausdorff + surface Dice +
  average surface distance.

It prints the best-of-``--repeat`` time of each and the ratios measured in this run (other processes may load
the machine: compare ratios, not absolute times across runs), and checks that HD95 / NSD / the directed mean
distances agree with surface-distance. It is a script, not a timed test.

    python -m benchmarks.bench_metrics --pairs [--gaps 2 6 8 12 30 36] [--repeat 2] [--methods] [--loop auto]

instead times pairs whose surfaces are a given number of voxels apart: the reference ellipsoid, and the same
ellipsoid grown by LO, (LO+HI)/2 and HI voxels along the three axes (so its surface lies LO-HI voxels
outside). For each pair, medseg's ``evaluate_pair`` and MONAI's HD95 alternate (A B A B, best of
``--repeat``); it prints both times, the ratio, the nearest-corner method the cost estimate chose per
direction (:mod:`medseg.metrics.nearest`) and the agreement with surface-distance. ``--methods`` also times
``compute_surface_distances`` with each method forced (the row search on the far pair takes minutes: that is
the worst case the estimate avoids). ``--loop numpy|compiled`` forces the row search's loop (default
``auto``: numpy until the process's searches would have paid for loading the compiled one, see
:mod:`medseg.metrics.nearest`); each row lists every medseg run and the loop in use after the pair.

    python -m benchmarks.bench_metrics --tables [--spacings 200]

instead compares the surface-area lookup tables (code -> mm²): medseg's ``surfel_area_table`` against
MONAI's ``create_table_neighbour_code_to_surface_area`` and surface-distance's table: the first call in a
fresh process (derivation / imports included), the warm cost per call, the max abs difference over random
anisotropic spacings, the code bit order, and how far NSD / ASD move from surface-distance with each table.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
import timeit
import warnings
from collections.abc import Callable

import numpy as np


def ellipsoids(shape: tuple[int, int, int], offset: float) -> tuple[np.ndarray, np.ndarray]:
    """Two overlapping ellipsoids filling most of the volume (a liver-sized structure and a 'prediction')."""
    centre = np.array(shape, dtype=np.float64) / 2.0
    radii = np.array(shape, dtype=np.float64) * np.array([0.30, 0.29, 0.25])

    def make(c: np.ndarray, r: np.ndarray) -> np.ndarray:
        axes = [((np.arange(n, dtype=np.float32) - c[i]) / r[i]) ** 2 for i, n in enumerate(shape)]
        return (axes[0][:, None, None] + axes[1][None, :, None] + axes[2][None, None, :]) <= 1.0

    ref = make(centre, radii)
    pred = make(centre + offset * np.array([1.0, 1.0, -1.0]), radii + offset * np.array([0.5, -1.0, 1.0]))
    return pred, ref


def shells(shape: tuple[int, int, int], lo: float, hi: float) -> tuple[np.ndarray, np.ndarray]:
    """The :func:`ellipsoids` reference and, as prediction, the same ellipsoid with semi-axes longer by
    ``(lo, (lo + hi) / 2, hi)`` voxels: its surface lies ``lo``-``hi`` voxels outside the reference's."""
    centre = np.array(shape, dtype=np.float64) / 2.0
    radii = np.array(shape, dtype=np.float64) * np.array([0.30, 0.29, 0.25])
    axes = np.indices(shape, sparse=True, dtype=np.float32)

    def make(r: np.ndarray) -> np.ndarray:
        return sum(((a - c) / ri) ** 2 for a, c, ri in zip(axes, centre, r, strict=True)) <= 1.0

    return make(radii + np.array([lo, (lo + hi) / 2.0, hi])), make(radii)


def _monai_hd95(pred: np.ndarray, ref: np.ndarray, spacing) -> Callable[[], float]:
    import torch
    from monai.metrics import compute_hausdorff_distance

    yp, yr = torch.from_numpy(pred)[None, None], torch.from_numpy(ref)[None, None]
    return lambda: float(
        compute_hausdorff_distance(yp, yr, include_background=True, percentile=95, spacing=list(spacing))
    )


def bench_pairs(args) -> int:
    """Shell pairs LO-HI voxels apart: medseg (all metrics) vs MONAI's HD95, alternating (module docstring)."""
    from medseg.metrics import compute_surface_distances, evaluate_pair

    shape, spacing = tuple(args.shape), tuple(args.spacing)
    warnings.filterwarnings("ignore", category=FutureWarning)  # MONAI's always_return_as_numpy notice
    evaluate_pair(*shells((40, 48, 48), 1, 2), spacing)  # warm-up: imports, area-table derivation
    _monai_hd95(*shells((40, 48, 48), 1, 2), spacing)()
    print(f"volume {shape}, spacing {spacing} mm; best of {args.repeat} alternating runs (medseg, MONAI)")
    print("wall time (CPU time of the process, all threads: steadier than wall on a loaded machine)")
    print(
        "surfaces apart (voxels) | medseg evaluate_pair | MONAI HD95 | ratio wall (CPU) | HD95 medseg / MONAI | methods"
    )
    for lo, hi in zip(args.gaps[::2], args.gaps[1::2], strict=True):
        pred, ref = shells(shape, lo, hi)
        monai = _monai_hd95(pred, ref, spacing)
        times: dict[str, list[tuple[float, float]]] = {"medseg": [], "monai": []}
        results: dict = {}
        for _ in range(args.repeat):
            for name, fn in (
                ("medseg", lambda p=pred, r=ref: evaluate_pair(p, r, spacing, tolerance=args.tolerance)[1]),
                ("monai", monai),
            ):
                t0, c0 = time.perf_counter(), time.process_time()
                results[name] = fn()
                times[name].append((time.perf_counter() - t0, time.process_time() - c0))
        (w_ours, c_ours), (w_monai, c_monai) = min(times["medseg"]), min(times["monai"])
        runs = ", ".join(f"{w:.3f}" for w, _ in times["medseg"])
        loop = "compiled" if "medseg.metrics.rowscan" in sys.modules else "numpy"
        ours, hd_monai = results["medseg"], results["monai"]
        methods = "/".join(compute_surface_distances(pred, ref, spacing).methods)
        print(
            f"{lo:g}-{hi:g} | {w_ours:.3f} s ({c_ours:.2f}) | {w_monai:.3f} s ({c_monai:.2f}) | "
            f"{w_monai / w_ours:.1f}x ({c_monai / c_ours:.1f}x) | {ours['hd95']:.3f} / {hd_monai:.3f} mm | {methods}",
            flush=True,
        )
        print(f"    medseg runs {runs} s; row-search loop now: {loop}", flush=True)
        for method in ("search", "edt") if args.methods else ():
            t0 = time.perf_counter()
            compute_surface_distances(pred, ref, spacing, method=method)
            print(
                f"    compute_surface_distances(method={method!r}) {time.perf_counter() - t0:.3f} s",
                flush=True,
            )
        if not args.skip_surface_distance:
            _check_against_surface_distance(pred, ref, spacing, args.tolerance, ours)
    return 0


def _check_against_surface_distance(pred, ref, spacing, tolerance: float, ours: dict) -> None:
    try:
        import surface_distance as sd
    except ImportError:
        print("    surface-distance not installed: agreement not checked (pip install surface-distance)")
        return
    if not hasattr(np, "Inf"):  # the package predates numpy 2
        setattr(np, "Inf", np.inf)  # noqa: B010
    d = sd.compute_surface_distances(ref, pred, spacing)
    gt2p, p2gt = sd.compute_average_surface_distance(d)
    diffs = {
        "hd95": abs(sd.compute_robust_hausdorff(d, 95) - ours["hd95"]),
        "nsd": abs(sd.compute_surface_dice_at_tolerance(d, tolerance) - ours["nsd"]),
        "asd_ref_to_pred": abs(gt2p - ours["asd_ref_to_pred"]),
        "asd_pred_to_ref": abs(p2gt - ours["asd_pred_to_ref"]),
    }
    worst = max(diffs.values())
    print(
        f"    agreement with surface-distance: max |diff| {worst:.2e} ({'OK' if worst <= 1e-6 else 'MISMATCH'})"
    )


def _best(fn, repeat: int) -> tuple[float, object]:
    best, out = np.inf, None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


_RSS_MIB = "float(open('/proc/self/status').read().split('VmRSS:')[1].split()[0]) / 1024"
_FIRST_CALL = {
    "medseg": "import medseg.metrics.surface as s; import time; t = time.perf_counter(); "
    "s.surfel_area_table((1.0, 0.8, 0.8)); print(time.perf_counter() - t)",
    # medseg.metrics is imported first: what MONAI would add to a process that already evaluates.
    "MONAI": f"import medseg.metrics, time; r = {_RSS_MIB}; t = time.perf_counter(); "
    "from monai.metrics.utils import create_table_neighbour_code_to_surface_area as f; "
    f"f((1.0, 0.8, 0.8)); print(time.perf_counter() - t, {_RSS_MIB} - r)",
}


def _metric_drift(table_fn, n_pairs: int = 40) -> dict[str, float]:
    """Worst |NSD| / |ASD| / |HD| difference to surface-distance on random blob pairs with ``table_fn``."""
    from unittest import mock

    import surface_distance as sd
    from scipy import ndimage

    from medseg.metrics import compute_surface_distances, surface

    worst = {"nsd": 0.0, "asd": 0.0, "hd": 0.0}
    with mock.patch.object(surface, "surfel_area_table", table_fn):
        for seed in range(n_pairs):
            rng = np.random.default_rng(seed)
            shape = tuple(int(n) for n in rng.integers(12, 40, 3))
            spacing = tuple(float(s) for s in rng.uniform(0.4, 3.0, 3))

            def blob(rng=rng, shape=shape):
                noise = ndimage.gaussian_filter(rng.random(shape), rng.uniform(1.0, 3.0))
                return noise > np.quantile(noise, 1.0 - rng.uniform(0.1, 0.5))

            pred, ref = blob(), blob()
            theirs = sd.compute_surface_distances(ref, pred, list(spacing))
            d = compute_surface_distances(pred, ref, spacing)
            for tol in (0.5, 1.0, 2.0):
                in_p, tot_p = surface.surface_overlap(d.dist_pred_to_ref, d.area_pred, tol)
                in_r, tot_r = surface.surface_overlap(d.dist_ref_to_pred, d.area_ref, tol)
                nsd = (in_p + in_r) / (tot_p + tot_r)
                worst["nsd"] = max(worst["nsd"], abs(nsd - sd.compute_surface_dice_at_tolerance(theirs, tol)))
            for pct in (50, 95, 99):
                hd = max(
                    surface.directed_percentile(d.dist_pred_to_ref, d.area_pred, pct),
                    surface.directed_percentile(d.dist_ref_to_pred, d.area_ref, pct),
                )
                worst["hd"] = max(worst["hd"], abs(hd - sd.compute_robust_hausdorff(theirs, pct)))
            gt2p, p2gt = sd.compute_average_surface_distance(theirs)
            worst["asd"] = max(
                worst["asd"],
                abs(gt2p - surface.directed_mean(d.dist_ref_to_pred, d.area_ref)),
                abs(p2gt - surface.directed_mean(d.dist_pred_to_ref, d.area_pred)),
            )
    return worst


def bench_tables(n_spacings: int, seed: int = 0) -> int:
    """Surface-area tables: medseg vs MONAI vs surface-distance (build time, differences, bit order)."""
    for name, code in _FIRST_CALL.items():  # before this process imports torch
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        vals = [float(v) for v in out.stdout.split()]
        extra = f", RSS +{vals[1]:.0f} MiB" if len(vals) > 1 else ""
        print(f"first call in a fresh process  {name:16s} {vals[0] * 1e3:9.1f} ms{extra}")

    from monai.metrics.utils import ENCODING_KERNEL, create_table_neighbour_code_to_surface_area

    from medseg.metrics import surface

    def monai_table(spacing) -> np.ndarray:
        return create_table_neighbour_code_to_surface_area(tuple(float(s) for s in spacing))[0].numpy()

    try:
        from surface_distance import lookup_tables
    except ImportError:
        lookup_tables = None
        print("surface-distance not installed: comparisons against it skipped")

    spacing = (1.3, 0.7, 2.1)
    surface.surfel_area_table(spacing)
    monai_table(spacing)
    timers = {"medseg": lambda: surface.surfel_area_table(spacing), "MONAI": lambda: monai_table(spacing)}
    if lookup_tables is not None:
        timers["surface-distance"] = lambda: lookup_tables.create_table_neighbour_code_to_surface_area(
            spacing
        )
    for name, fn in timers.items():
        number = 50 if name == "surface-distance" else 2000
        per_call = min(timeit.repeat(fn, number=number, repeat=3)) / number
        print(f"warm, per call                 {name:16s} {per_call * 1e6:9.1f} µs")

    weights = np.zeros((2, 2, 2), dtype=np.int64)
    for corner in surface._CORNERS:
        weights[corner] = 1 << surface._bit(corner)
    same_order = np.array_equal(np.asarray(ENCODING_KERNEL[3]), weights)
    print(f"code bit order: MONAI ENCODING_KERNEL == medseg's -> {same_order} (permutation: identity)")

    rng = np.random.default_rng(seed)
    worst: dict[str, float] = {}
    for _ in range(n_spacings):
        sp = tuple(float(s) for s in rng.uniform(0.2, 6.0, 3))
        ours, theirs = surface.surfel_area_table(sp), monai_table(sp).astype(np.float64)
        pairs = {"MONAI vs medseg": (theirs, ours)}
        if lookup_tables is not None:
            ref = lookup_tables.create_table_neighbour_code_to_surface_area(sp)
            pairs |= {"medseg vs surface-distance": (ours, ref), "MONAI vs surface-distance": (theirs, ref)}
        for name, (a, b) in pairs.items():
            worst[name] = max(worst.get(name, 0.0), float(np.abs(a - b).max()))
            rel = float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-300)))
            worst[name + " (rel)"] = max(worst.get(name + " (rel)", 0.0), rel)
    print(f"MONAI table dtype: {create_table_neighbour_code_to_surface_area((1, 1, 1))[0].dtype}")
    for name in [k for k in worst if not k.endswith("(rel)")]:
        print(
            f"max |diff| over {n_spacings} spacings  {name:28s} {worst[name]:.2e} mm² "
            f"(relative {worst[name + ' (rel)']:.1e})"
        )
    if lookup_tables is not None:
        if not hasattr(np, "Inf"):  # the package predates numpy 2
            setattr(np, "Inf", np.inf)  # noqa: B010
        for name, fn in (("medseg", surface.surfel_area_table), ("MONAI", monai_table)):
            drift = _metric_drift(lambda sp, fn=fn: np.asarray(fn(sp), dtype=np.float64))
            print(f"metrics vs surface-distance with the {name:6s} table: worst |diff| " + str(drift))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", type=int, nargs=3, default=[300, 512, 512])
    parser.add_argument("--spacing", type=float, nargs=3, default=[1.0, 0.8, 0.8])
    parser.add_argument("--offset", type=float, default=2.0, help="shift of the second ellipsoid, voxels")
    parser.add_argument("--tolerance", type=float, default=2.0)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--skip-monai", action="store_true")
    parser.add_argument("--skip-surface-distance", action="store_true")
    parser.add_argument("--tables", action="store_true", help="benchmark the surface-area tables instead")
    parser.add_argument("--spacings", type=int, default=200, help="random spacings for --tables")
    parser.add_argument("--pairs", action="store_true", help="time shell pairs --gaps voxels apart instead")
    parser.add_argument("--gaps", type=float, nargs="+", default=[2, 6, 8, 12, 30, 36], help="LO HI ...")
    parser.add_argument("--methods", action="store_true", help="--pairs: also time each method forced")
    parser.add_argument(
        "--loop", choices=("auto", "numpy", "compiled"), default="auto", help="row-search loop"
    )
    args = parser.parse_args(argv)
    from medseg.metrics import nearest

    nearest._LOOP = args.loop
    if args.tables:
        return bench_tables(args.spacings)
    if args.pairs:
        return bench_pairs(args)

    from medseg.metrics import evaluate_pair

    shape, spacing = tuple(args.shape), tuple(args.spacing)
    pred, ref = ellipsoids(shape, args.offset)
    print(f"volume {shape}, spacing {spacing} mm, offset {args.offset} voxels")
    print(f"ref {int(ref.sum())} voxels, pred {int(pred.sum())} voxels")
    times: dict[str, float] = {}

    times["medseg"], ours = _best(
        lambda: evaluate_pair(pred, ref, spacing, tolerance=args.tolerance), args.repeat
    )
    m = ours[1]
    print(
        f"medseg   evaluate_pair (all metrics)  {times['medseg']:7.3f} s   "
        f"hd95 {m['hd95']:.6f}  assd {m['assd']:.6f}  nsd {m['nsd']:.6f}"
    )

    if not args.skip_monai:
        import torch
        from monai.metrics import compute_hausdorff_distance

        yp = torch.from_numpy(pred)[None, None]
        yr = torch.from_numpy(ref)[None, None]

        def monai_hd95():
            return float(
                compute_hausdorff_distance(
                    yp, yr, include_background=True, percentile=95, spacing=list(spacing)
                )
            )

        times["monai"], hd_monai = _best(monai_hd95, max(1, min(args.repeat, 2)))
        print(
            f"MONAI    compute_hausdorff_distance     {times['monai']:7.3f} s   hd95 {hd_monai:.6f} (own edges)"
        )

    if not args.skip_surface_distance:
        try:
            import surface_distance as sd
        except ImportError:
            print("surface-distance not installed: skipped (pip install surface-distance)")
        else:
            if not hasattr(np, "Inf"):  # the package predates numpy 2
                setattr(np, "Inf", np.inf)  # noqa: B010

            def sd_all():
                d = sd.compute_surface_distances(ref, pred, spacing)
                return (
                    sd.compute_robust_hausdorff(d, 95),
                    sd.compute_surface_dice_at_tolerance(d, args.tolerance),
                    sd.compute_average_surface_distance(d),
                )

            times["surface-distance"], (hd, nsd, (gt2p, p2gt)) = _best(sd_all, 1)
            print(
                f"surface-distance (HD95 + NSD + ASD)     {times['surface-distance']:7.3f} s   hd95 {hd:.6f}  nsd {nsd:.6f}"
            )
            diffs = {
                "hd95": abs(hd - m["hd95"]),
                "nsd": abs(nsd - m["nsd"]),
                "asd_ref_to_pred": abs(gt2p - m["asd_ref_to_pred"]),
                "asd_pred_to_ref": abs(p2gt - m["asd_pred_to_ref"]),
            }
            worst = max(diffs.values())
            status = "OK" if worst <= 1e-6 else "MISMATCH"
            print(f"agreement with surface-distance: max |diff| {worst:.2e} ({status}) {diffs}")

    for name in ("monai", "surface-distance"):
        if name in times:
            print(f"speed-up vs {name}: {times[name] / times['medseg']:.1f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
