"""Benchmark: HD95 + ASSD + NSD with medseg vs MONAI vs DeepMind ``surface-distance``, in one run.

    python -m pipelines.bench_metrics [--shape 300 512 512] [--spacing 1.0 0.8 0.8] [--offset 2] [--repeat 3]

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
"""

from __future__ import annotations

import argparse
import time

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


def _best(fn, repeat: int) -> tuple[float, object]:
    best, out = np.inf, None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", type=int, nargs=3, default=[300, 512, 512])
    parser.add_argument("--spacing", type=float, nargs=3, default=[1.0, 0.8, 0.8])
    parser.add_argument("--offset", type=float, default=2.0, help="shift of the second ellipsoid, voxels")
    parser.add_argument("--tolerance", type=float, default=2.0)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--skip-monai", action="store_true")
    parser.add_argument("--skip-surface-distance", action="store_true")
    args = parser.parse_args(argv)

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
