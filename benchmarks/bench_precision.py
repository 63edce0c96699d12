"""Agreement of the fast default precision with float32 on a trained model: the bound the default is held to.

    python -m benchmarks.bench_precision [--model RUN/best.pt --data DATA] [--epochs 8] [--out DIR] [--json FILE]
        [--precision auto|bf16|int8] [--with-validation]

``medseg segment``'s default precision (``auto``: bf16 where the CPU computes it natively, channels-last — see
:mod:`medseg.inference.fast`) is the default only if its masks agree with exact float32 (``--precision fp32``):
**Dice ≥ 0.99 per label on every held-out case** of the demo's phantoms. This script measures that:

1. a trained model: ``--model`` (with ``--data``, a phantom dataset with ``imagesTs``/``labelsTs``), or it
   generates the demo's phantoms (``medseg demo``'s 30 + 4 cases, 96×96×40, seed 2026) and trains the demo
   recipe (``configs/demo.yaml``) for ``--epochs`` epochs (the recipe's own is 16; fewer is a weaker model,
   whose less confident logits make the bound harder to meet, not easier);
2. every held-out case (the test images; with ``--with-validation`` also the run's validation cases named in
   ``validation.json`` beside the checkpoint, never trained on) segmented by :class:`medseg.inference.Predictor` with ``precision="fp32"`` and with the
   default, postprocessing as recorded in the checkpoint (what ``medseg segment`` does);
3. Dice per label between the two masks, and each against the ground truth.

Prints a table and ``meets the bound: yes|no``; ``--json`` writes the numbers
(``python -m benchmarks.bench_vs_monai --agreement FILE`` prints them beside the speed table).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

#: What ``medseg demo`` generates (pipelines/demo.py): training and held-out phantoms, shape, seed.
DEMO_TRAIN_CASES, DEMO_TEST_CASES, DEMO_SHAPE, DEMO_SEED = 30, 4, (96, 96, 40), 2026
#: Dice per label the default precision's masks must reach against float32's on every held-out case.
BOUND = 0.99


def train_demo_model(out: Path, epochs: int, log=print) -> tuple[Path, Path]:
    """The demo's phantoms and the demo recipe trained for ``epochs`` epochs; returns (best.pt, data root)."""
    from medseg.config import load_config, recipe_path
    from medseg.data.phantoms import write_msd_dataset
    from medseg.engine import train

    data = out / "data"
    if not (data / "dataset.json").is_file():
        write_msd_dataset(data, DEMO_TRAIN_CASES, DEMO_TEST_CASES, shape=DEMO_SHAPE, seed=DEMO_SEED)
    overrides = [f"data.root={data}", f"train.output={out / 'run'}", f"train.epochs={epochs}"]
    run = train(load_config(recipe_path("demo"), overrides), log=log)
    return run / "best.pt", data


def held_out(model: Path, data: Path, with_validation: bool) -> list[Path]:
    """The test images, and with ``with_validation`` the run's validation cases (``validation.json``)."""
    images = sorted((data / "imagesTs").glob("*.nii.gz"))
    record = model.parent / "validation.json"
    if with_validation and record.is_file():
        names = json.loads(record.read_text()).get("cases") or []
        images = [data / "imagesTr" / f"{n}.nii.gz" for n in names] + images
    return images


def agreement(model: Path, data: Path, precision: str = "auto", with_validation: bool = False) -> dict:
    """Dice per label of ``precision``'s masks against fp32's, and of both against the ground truth."""
    import nibabel as nib

    from medseg.inference import Predictor
    from medseg.metrics.overlap import dice_per_label

    exact = Predictor(model, device="cpu", precision="fp32")
    fast = Predictor(model, device="cpu", precision=precision)
    names = {v: k for k, v in exact.label_names.items() if v}
    out: dict = {"model": str(model), "precision": fast.precision, "cases": {}, "seconds": {}}
    seconds = {"fp32": 0.0, fast.precision: 0.0}
    for image in held_out(model, data, with_validation):
        truth_path = data / ("labelsTs" if image.parent.name == "imagesTs" else "labelsTr") / image.name
        truth = np.asarray(nib.load(truth_path).dataobj) if truth_path.is_file() else None
        masks = {}
        for name, predictor in (("fp32", exact), (fast.precision, fast)):
            t0 = time.perf_counter()
            masks[name] = predictor.predict(image).labels
            seconds[name] += time.perf_counter() - t0
        case = {"vs_fp32": dice_per_label(masks[fast.precision], masks["fp32"], names)}
        if truth is not None:
            case["fp32_vs_truth"] = dice_per_label(masks["fp32"], truth, names)
            case[f"{fast.precision}_vs_truth"] = dice_per_label(masks[fast.precision], truth, names)
        case["differing_voxels"] = int((masks[fast.precision] != masks["fp32"]).sum())
        out["cases"][image.name] = {k: ({names[v]: d for v, d in d_.items()} if isinstance(d_, dict) else d_)
                                    for k, d_ in case.items()}  # fmt: skip
    per_label = {n: min(c["vs_fp32"][n] for c in out["cases"].values()) for n in names.values()}
    out["seconds"] = seconds
    out["summary"] = {
        "precision": fast.precision,
        "cases": len(out["cases"]),
        "min_dice_vs_fp32_per_label": per_label,
        "min_dice_vs_fp32": min(per_label.values()),
        "bound": BOUND,
        "meets_bound": min(per_label.values()) >= BOUND,
    }
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", type=Path, default=None, help="a trained checkpoint (else: train the demo)"
    )
    parser.add_argument("--data", type=Path, default=None, help="dataset root with imagesTs/labelsTs")
    parser.add_argument("--epochs", type=int, default=8, help="demo training epochs when --model is absent")
    parser.add_argument("--precision", default="auto", help="the precision to hold to the bound")
    parser.add_argument("--with-validation", action="store_true", help="also the run's validation cases")
    parser.add_argument("--out", type=Path, default=Path("bench_precision_out"))
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.model is None:
        print(
            f"training the demo recipe for {args.epochs} epochs on the demo phantoms → {args.out}", flush=True
        )
        args.model, data = train_demo_model(args.out, args.epochs, log=lambda *_: None)
    else:
        data = args.data or args.model.parent.parent / "data"
    result = agreement(args.model, data, args.precision, args.with_validation)
    fast = result["precision"]
    labels = list(result["summary"]["min_dice_vs_fp32_per_label"])
    where = "the run's validation cases and " * args.with_validation + str(data / "imagesTs")
    print(f"model {args.model}; held-out cases: {where}; {fast} vs fp32 (Dice per label)")
    print(f"{'case':<22}" + "".join(f"{n[:12]:>13}" for n in labels) + f"{'voxels differ':>15}")
    for name, case in result["cases"].items():
        row = "".join(f"{case['vs_fp32'][n]:>13.4f}" for n in labels)
        print(f"{name:<22}{row}{case['differing_voxels']:>15}")
    minima = result["summary"]["min_dice_vs_fp32_per_label"]
    print(f"{'minimum':<22}" + "".join(f"{minima[n]:>13.4f}" for n in labels))
    for who in ("fp32", fast):
        key = f"{who}_vs_truth"
        if all(key in c for c in result["cases"].values()):
            means = {n: np.mean([c[key][n] for c in result["cases"].values()]) for n in labels}
            print(f"{who + ' vs truth (mean)':<22}" + "".join(f"{means[n]:>13.4f}" for n in labels))
    s = result["seconds"]
    print(f"seconds for all cases: fp32 {s['fp32']:.1f}, {fast} {s[fast]:.1f}")
    verdict = "yes" if result["summary"]["meets_bound"] else "NO"
    print(f"meets the bound (Dice ≥ {BOUND} per label on every case): {verdict}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
