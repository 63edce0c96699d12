"""``medseg demo``: phantoms → train the Attention U-Net → segment held-out phantoms → evaluate → Dice table →
the batch review page.

The recipe is ``configs/demo.yaml`` (loaded with :func:`medseg.config.load_config` like any user config);
sized to finish in under 10 minutes on 2 CPU cores. Every step is one :mod:`medseg` call. The held-out
phantoms are segmented the way a reviewer would want a batch: organ statistics, three-plane previews, the
attention gates' coefficients and the uncertainty map per case, and ``pred/index.html``, the review page with
its QA flags. The phantoms are not adult anatomy at adult resolution (≈3.7×3.7×5.9 mm voxels, small organs),
so the page flags them (spacing, organ volumes outside the adult reference ranges): that is the rules working.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated

import typer

DEMO_SHAPE = (96, 96, 40)  # → about 3.7 × 3.7 × 5.9 mm voxels over a 360 × 360 × 240 mm field of view
DEMO_TRAIN_CASES = 30  # data variety, not iterations, held the pancreas back (docs/ablation.md)
DEMO_TEST_CASES = 4


def run_demo(
    out: Path,
    cases: int | None = None,
    epochs: int | None = None,
    log=print,
    overrides: tuple[str, ...] = (),
    test_cases: int = DEMO_TEST_CASES,
) -> dict:
    """Run the whole demo; return ``{"dice": {label: mean}, "failed": [...], "seconds": ..., "review_page": ...}``.

    ``overrides`` are extra ``key=value`` config overrides and ``test_cases`` the number of held-out phantoms
    (tests shorten the demo with them).
    """
    from medseg.batch.run import segment_inputs
    from medseg.config import load_config, recipe_path
    from medseg.config.segment import OutputSpec
    from medseg.data.phantoms import write_msd_dataset
    from medseg.engine import train
    from medseg.evaluation import evaluate_held_out, summary_table

    out = Path(out)
    data = out / "data"
    settings = [f"data.root={data}", f"train.output={out / 'run'}", *overrides]
    if epochs:
        settings.append(f"train.epochs={epochs}")
    cfg = load_config(recipe_path("demo"), settings)
    t0 = time.monotonic()
    n_train = cases or DEMO_TRAIN_CASES
    log(f"[1/4] generating {n_train} training + {test_cases} held-out phantoms {DEMO_SHAPE} → {data}")
    write_msd_dataset(data, n_train, test_cases, shape=DEMO_SHAPE, seed=2026)
    t_data = time.monotonic()

    log(
        f"[2/4] training the Attention U-Net ({cfg.train.epochs} epochs × {cfg.train.iters_per_epoch} iterations)"
    )
    run = train(cfg, log=log)
    t_train = time.monotonic()

    log("[3/4] segmenting the held-out phantoms (statistics, previews, attention, uncertainty, review page)")
    report = segment_inputs(
        data / "imagesTs",
        out / "pred",
        run / "best.pt",
        outputs=OutputSpec(statistics=True, preview=True, attention=True, uncertainty=True),
        log=log,
    )
    t_seg = time.monotonic()

    log("[4/4] evaluating against the held-out labels")
    summary = evaluate_held_out(out / "pred", data, out / "metrics.csv")
    t_eval = time.monotonic()

    table = summary_table(summary)
    dice = {name: row["dice"] for name, row in table.items()}
    organ_mean = sum(dice.values()) / len(dice)
    seconds = time.monotonic() - t0
    lines = ["", f"{'structure':<16}{'Dice':>8}{'HD95 mm':>10}{'NSD@2mm':>10}"]
    lines += [f"{name:<16}{r['dice']:>8.3f}{r['hd95']:>10.2f}{r['nsd']:>10.3f}" for name, r in table.items()]
    lines += [
        f"{f'mean ({len(dice)} labels)':<16}{organ_mean:>8.3f}",
        "",
        f"pancreas-like structure on its own: Dice {dice.get('pancreas', float('nan')):.3f}",
        "",
        f"time: {seconds / 60:.1f} min (data {t_data - t0:.0f} s, training {t_train - t_data:.0f} s, "
        f"segmentation {t_seg - t_train:.0f} s, evaluation {t_eval - t_seg:.0f} s)",
        f"checkpoint: {run / 'best.pt'}   curves: {run / 'curves.png'}",
        f"masks: {out / 'pred'}   metrics: {out / 'metrics.csv'}",
        f"review page: {report.review_page}",
        "",
        "review the cases in a browser (viewer, attention maps, verdicts, corrections):",
        f"  medseg review {out / 'pred'} --serve",
    ]
    for line in lines:
        log(line)
    result = {
        "dice": dice,
        "mean_organ_dice": organ_mean,
        "failed": list(report.failed),
        "seconds": seconds,
        "review_page": str(report.review_page),
    }
    (out / "demo_result.json").write_text(json.dumps(result, indent=2))
    return result


def demo_command(
    out: Annotated[Path, typer.Option(help="Folder for data, run, predictions and metrics.")] = Path(
        "demo_out"
    ),
    cases: Annotated[int, typer.Option(help="Training phantoms.")] = 0,
    epochs: Annotated[int, typer.Option(help="Training epochs (0 = the recipe's).")] = 0,
    seed: Annotated[
        int | None, typer.Option(help="Training seed (train.seed; the recipe's 0 by default).")
    ] = None,
) -> None:
    """Phantoms → train the Attention U-Net → segment held-out phantoms → evaluate → Dice table."""
    overrides = () if seed is None else (f"train.seed={seed}",)
    result = run_demo(out, cases=cases or None, epochs=epochs or None, log=typer.echo, overrides=overrides)
    if result["failed"]:
        raise typer.Exit(1)
