"""The ablation's tables, from the stored run results of :mod:`medseg.engine.ablation`.

Written to the ablation folder (each file atomically, rewritten after every finished run):

* ``ablation_cases.csv`` — one row per (variant, seed, held-out case): Dice per organ and their mean;
* ``ablation.csv`` — per variant and metric: mean over seeds of the per-seed case mean, std over seeds
  (:func:`medseg.evaluation.paired.seed_summary`), with the cost columns;
* ``ablation_paired.csv`` — every variant against the plain U-Net and against the Attention U-Net, paired on
  (seed, case), two-stage bootstrap 95 % interval of the mean difference and its verdict
  (:func:`medseg.evaluation.paired.paired_table`);
* ``ablation_attention.csv`` — for gated variants, per level: α's normalised entropy and, per organ, the α
  mass fraction inside the organ's dilated box and its concentration, averaged over cases and seeds;
* ``ablation.md`` — the same, as Markdown tables.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from medseg.evaluation.paired import paired_table, seed_summary
from medseg.io import atomic_write_text

#: References of the paired comparison: the plain U-Net (does attention help?) and the Attention U-Net
#: (does a block help on top of the gates?).
REFERENCES = ("unet", "attention_unet")


def case_rows(results: Sequence[dict]) -> tuple[list[dict], list[str]]:
    """One row per (variant, seed, case) with ``dice_<organ>`` and ``dice_mean``; and the organ names."""
    organs = sorted({organ for r in results for scores in r["cases"].values() for organ in scores})
    rows = []
    for r in results:
        for case, scores in sorted(r["cases"].items()):
            dice = {f"dice_{o}": scores.get(o, {}).get("dice", math.nan) for o in organs}
            values = [v for v in dice.values() if not math.isnan(v)]
            rows.append(
                {
                    "variant": r["variant"],
                    "seed": r["seed"],
                    "case": case,
                    **dice,
                    "dice_mean": float(np.mean(values)) if values else math.nan,
                }
            )
    return rows, organs


def _csv(path: Path, rows: list[dict]) -> None:
    if not rows:
        return
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def _order(variants: Sequence[str]) -> list[str]:
    from medseg.engine.ablation import DEFAULT_VARIANTS

    rank = {name: i for i, name in enumerate(DEFAULT_VARIANTS)}
    return sorted(set(variants), key=lambda v: (rank.get(v, len(rank)), v))


def summary_rows(results: Sequence[dict], rows: list[dict], metrics: list[str]) -> list[dict]:
    """Per variant: ``<metric>`` mean and ``<metric>_std`` over seeds, seeds, cost and training time."""
    stats = {(s["variant"], s["metric"]): s for s in seed_summary(rows, metrics)}
    out = []
    for variant in _order([r["variant"] for r in results]):
        runs = [r for r in results if r["variant"] == variant]
        cost = runs[0]["cost"]
        row = {"variant": variant, "seeds": len(runs)}
        for m in metrics:
            row[m] = stats[(variant, m)]["mean"]
            row[f"{m}_std"] = stats[(variant, m)]["std"]
        row.update(
            params_M=cost["params"] / 1e6,
            gflops=cost["gflops"],
            cpu_ms=cost["ms"],
            peak_mb=cost["peak_mb"],
            cost_size=cost.get("size", 96),
            train_s=float(np.mean([r["train_s"] for r in runs])),
            train_cpu_s=float(np.mean([r.get("train_cpu_s", math.nan) for r in runs])),
        )
        out.append(row)
    return out


def attention_rows(results: Sequence[dict]) -> list[dict]:
    """Per gated variant and level: entropy and per-organ mass fraction / concentration, mean over seeds."""
    out = []
    for variant in _order([r["variant"] for r in results]):
        runs = [r["attention"] for r in results if r["variant"] == variant and r.get("attention")]
        if not runs:
            continue
        for level in sorted(runs[0]):
            entries = [run[level] for run in runs if level in run]
            row = {"variant": variant, "level": level, "seeds": len(entries)}
            row["entropy"] = float(np.mean([e["entropy"] for e in entries]))
            for organ in entries[0]["organs"]:
                for key in ("mass_fraction", "volume_fraction", "concentration"):
                    row[f"{organ}_{key}"] = float(np.nanmean([e["organs"][organ][key] for e in entries]))
            out.append(row)
    return out


def write_report(out: str | Path, n_boot: int = 10000) -> None:
    """Write every table of the module docstring from ``<out>/results/*.json``."""
    from medseg.engine.ablation import load_results

    out = Path(out)
    results = load_results(out)
    if not results:
        return
    rows, organs = case_rows(results)
    metrics = [f"dice_{o}" for o in organs] + ["dice_mean"]
    summary = summary_rows(results, rows, metrics)
    paired = []
    for reference in REFERENCES:
        if any(r["variant"] == reference for r in rows):
            paired += paired_table(rows, reference, metrics, n_boot=n_boot)
    attention = attention_rows(results)
    _csv(out / "ablation_cases.csv", rows)
    _csv(out / "ablation.csv", summary)
    _csv(out / "ablation_paired.csv", paired)
    _csv(out / "ablation_attention.csv", attention)
    atomic_write_text(out / "ablation.md", markdown(summary, paired, attention, organs))


def _pm(row: dict, metric: str) -> str:
    std = row[f"{metric}_std"]
    return f"{row[metric]:.3f}" + ("" if math.isnan(std) else f" ± {std:.3f}")


def markdown(summary: list[dict], paired: list[dict], attention: list[dict], organs: list[str]) -> str:
    """The report as Markdown: accuracy ± std over seeds, paired differences, α focus, cost."""
    lines = ["## Dice on the held-out phantoms (mean ± std over seeds of the per-seed mean)", ""]
    head = ["variant", "seeds", "mean", *organs]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in summary:
        cells = [r["variant"], str(r["seeds"]), _pm(r, "dice_mean"), *[_pm(r, f"dice_{o}") for o in organs]]
        lines.append("| " + " | ".join(cells) + " |")
    for reference in REFERENCES:
        sub = [
            p for p in paired if p["reference"] == reference and p["metric"] in ("dice_mean", "dice_pancreas")
        ]
        if not sub:
            continue
        lines += [
            "",
            f"## Paired difference against `{reference}` (same seed, same case; two-stage bootstrap 95 % CI)",
            "",
            "| variant | metric | Δ mean | 95 % CI | pairs | verdict |",
            "|---|---|---|---|---|---|",
        ]
        for p in sub:
            lines.append(
                f"| {p['variant']} | {p['metric'].removeprefix('dice_')} | {p['mean']:+.3f} | "
                f"[{p['lo']:+.3f}, {p['hi']:+.3f}] | {p['n']} | {p['verdict']} |"
            )
    if attention:
        lines += [
            "",
            "## Where the gates look (held-out cases; α inside the body crop)",
            "",
            "Entropy: α's normalised entropy (1 = uniform). Concentration: α mass inside the organ's box "
            "(dilated by 3 voxels) ÷ the box's share of the volume (1 = no preference).",
            "",
        ]
        head = ["variant", "level", "entropy", *[f"{o} conc." for o in organs], "pancreas mass"]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for a in attention:
            cells = [a["variant"], a["level"].removeprefix("alpha_"), f"{a['entropy']:.3f}"]
            cells += [f"{a.get(f'{o}_concentration', math.nan):.2f}" for o in organs]
            cells.append(f"{a.get('pancreas_mass_fraction', math.nan):.3f}")
            lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Cost",
        "",
        "| variant | params (M) | GFLOPs | CPU ms | peak MB | train s | train CPU s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in summary:
        lines.append(
            f"| {r['variant']} | {r['params_M']:.2f} | {r['gflops']:.1f} | {r['cpu_ms']:.0f} | "
            f"{r['peak_mb']:.0f} | {r['train_s']:.0f} | {r['train_cpu_s']:.0f} |"
        )
    size = summary[0]["cost_size"] if summary else 96
    lines += ["", f"GFLOPs, CPU ms and peak MB: one forward pass of a {size}³ window (batch 1)."]
    return "\n".join(lines) + "\n"
