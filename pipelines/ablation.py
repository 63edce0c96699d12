"""``medseg ablate``: train every network variant on the same phantoms, same budget and seed; one table.

For each variant (a ``model`` override of the base config) it trains, segments the held-out phantoms,
evaluates them with :func:`pipelines.evaluate.run_evaluation`, and measures cost:

* parameters; GFLOPs of one forward pass on a 1×1×96³ patch (``torch.utils.flop_counter``, multiply-add
  = 2 FLOPs, convolutions and matmuls only);
* CPU milliseconds per 96³ forward (median of ``--repeats`` after one warm-up, eval mode, no grad);
* peak memory: growth of the process's peak RSS during that forward, measured in a fresh subprocess.

The table goes to ``<out>/ablation.md`` and ``<out>/ablation.csv``.
"""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
import time
from pathlib import Path

#: name → model overrides. Every variant keeps the base encoder/decoder and training budget.
VARIANTS: dict[str, dict] = {
    "unet": {"name": "unet", "skip_gate": "none"},
    "attention_unet": {"name": "attention_unet", "skip_gate": "grid"},
    "ag+pam": {"bottleneck": "pam"},
    "ag+cam": {"bottleneck": "cam"},
    "ag+dual": {"bottleneck": "dual"},
    "ag+ema": {"bottleneck": "ema"},
    "ag+psa": {"bottleneck": "psa"},
    "ag+fpa": {"bottleneck": "fpa"},
    "ag+encoding": {"bottleneck": "encoding"},
    "ag+gau": {"decoder_fusion": "gau"},
    "ag+reverse": {"head": "reverse_attention"},
    "ag+scale_att": {"scales": [1.0, 0.75, 0.5], "scale_fusion": "attention"},
    "ag+scale_avg": {"scales": [1.0, 0.75, 0.5], "scale_fusion": "average"},
}
#: Run by default (``ag+scale_avg`` on request: ``--variants ag+scale_avg``).
DEFAULT_VARIANTS = [v for v in VARIANTS if v != "ag+scale_avg"]

ABLATION_OVERRIDES = [
    "model.filters=[8, 16, 32, 64, 128]",
    "augment.patch_size=[64, 64, 32]",
    "augment.samples_per_volume=1",
    "augment.affine_prob=0.0",
    "train.batch_size=1",
    "train.epochs=8",
    "train.iters_per_epoch=50",
    "train.val_every=8",
    "train.progress=false",
    "infer.overlap=0.25",
]

_PROBE = r"""
import json, resource, statistics, sys, time, torch
from medseg.nets.registry import build_network
torch.set_num_threads(int(sys.argv[3]))
cfg = json.loads(sys.argv[1]); size = int(sys.argv[2]); repeats = int(sys.argv[4])
net = build_network(cfg, 1, int(sys.argv[5])).eval()
x = torch.randn(1, 1, size, size, size)
with torch.no_grad():
    net(torch.randn(1, 1, 64, 64, 64))  # import-time and allocator warm-up on a smaller input
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for _ in range(repeats + 1):
        t = time.perf_counter(); net(x); times.append(time.perf_counter() - t)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as fc:
        net(x)
print(json.dumps({"gflops": fc.get_total_flops() / 1e9, "ms": 1000 * statistics.median(times[1:]),
                  "peak_mb": (after - before) / 1024, "params": sum(p.numel() for p in net.parameters())}))
"""


def measure_cost(
    model_cfg: dict, num_classes: int, size: int = 96, repeats: int = 3, threads: int = 2
) -> dict:
    """Parameters, GFLOPs, CPU ms and peak-RSS growth of one ``size``³ forward, in a fresh process.

    The RSS baseline is taken after a warm-up forward on a 64³ input (weights, imports and the allocator's
    first arena are in it); the reported peak is the extra memory of the ``size``³ forward passes. The first
    ``size``³ pass is not timed.
    """
    args = [
        sys.executable,
        "-c",
        _PROBE,
        json.dumps(model_cfg),
        str(size),
        str(threads),
        str(repeats),
        str(num_classes),
    ]
    out = subprocess.run(args, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_ablation(
    out: Path,
    variants: list[str] | None = None,
    train_cases: int = 10,
    test_cases: int = 4,
    shape: tuple[int, int, int] = (96, 96, 40),
    extra_overrides: list[str] | None = None,
    cost_size: int = 96,
    log=print,
) -> list[dict]:
    """Train/evaluate/measure each variant; write ``ablation.md`` and ``ablation.csv``; return the rows."""
    from medseg.config import load_config
    from medseg.data.datasets import label_names, read_dataset_json
    from medseg.data.phantoms import write_msd_dataset
    from medseg.engine import train
    from pipelines.evaluate import evaluate_held_out, summary_table
    from pipelines.segment import run_segment

    out = Path(out)
    data = out / "data"
    if not (data / "dataset.json").exists():
        write_msd_dataset(data, train_cases, test_cases, shape=shape, seed=2027)
    names = label_names(read_dataset_json(data))
    done = {r["variant"]: r for r in _read_rows(out)}  # a partial or earlier run: re-run rows are replaced
    rows = []
    for name in variants or DEFAULT_VARIANTS:
        if name not in VARIANTS:
            raise ValueError(f"unknown variant {name!r}; valid: {', '.join(VARIANTS)}")
        run = out / "runs" / name
        overrides = [
            *ABLATION_OVERRIDES,
            *(extra_overrides or []),
            f"data.root={data}",
            f"train.output={run}",
        ]
        cfg = load_config(None, overrides)
        cfg["model"].update(VARIANTS[name])
        t0 = time.monotonic()
        train(cfg, log=lambda *_: None)
        train_s = time.monotonic() - t0
        run_segment(data / "imagesTs", run / "pred", run / "best.pt", device="cpu", log=lambda *_: None)
        table = summary_table(evaluate_held_out(run / "pred", data, run / "eval.csv"))
        dice = {name: r["dice"] for name, r in table.items()}
        cost = measure_cost(cfg["model"], len(names), size=cost_size)
        row = {
            "variant": name,
            **{f"dice_{k}": v for k, v in dice.items()},
            "dice_mean": sum(dice.values()) / len(dice),
            "params_M": cost["params"] / 1e6,
            "gflops_96": cost["gflops"],
            "cpu_ms_96": cost["ms"],
            "peak_mb_96": cost["peak_mb"],
            "train_s": train_s,
        }
        rows.append(row)
        done[name] = row
        log(
            f"{name:<16} mean Dice {row['dice_mean']:.3f}  pancreas {dice.get('pancreas', float('nan')):.3f}  "
            f"{row['params_M']:.2f} M  {row['gflops_96']:.1f} GFLOPs  {row['cpu_ms_96']:.0f} ms  {row['peak_mb_96']:.0f} MB"
        )
        _write_tables(out, [done[v] for v in VARIANTS if v in done])
    return rows


def _read_rows(out: Path) -> list[dict]:
    path = Path(out) / "ablation.csv"
    if not path.exists():
        return []
    with path.open(newline="") as fh:
        return [{k: (v if k == "variant" else float(v)) for k, v in r.items()} for r in csv.DictReader(fh)]


def remeasure_costs(out: Path, cost_size: int = 96, log=print) -> list[dict]:
    """Re-measure the cost columns of an existing ``ablation.csv`` (e.g. on a quiet machine) and rewrite it."""
    import yaml

    rows = _read_rows(out)
    for row in rows:
        cfg = yaml.safe_load((Path(out) / "runs" / row["variant"] / "config.yaml").read_text())
        num_classes = sum(1 for k in row if k.startswith("dice_") and k != "dice_mean") + 1
        cost = measure_cost(cfg["model"], num_classes, size=cost_size)
        row.update(
            gflops_96=cost["gflops"],
            cpu_ms_96=cost["ms"],
            peak_mb_96=cost["peak_mb"],
            params_M=cost["params"] / 1e6,
        )
        log(
            f"{row['variant']:<16} {cost['gflops']:.1f} GFLOPs  {cost['ms']:.0f} ms  {cost['peak_mb']:.0f} MB"
        )
    _write_tables(Path(out), rows)
    return rows


def _write_tables(out: Path, rows: list[dict]) -> None:
    from medseg.io import atomic_write_text

    columns = list(rows[0])
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(out / "ablation.csv", buf.getvalue())
    organ_cols = [c for c in columns if c.startswith("dice_") and c != "dice_mean"]
    head = [
        "variant",
        "mean Dice",
        *[c.removeprefix("dice_") for c in organ_cols],
        "params (M)",
        "GFLOPs/96³",
        "CPU ms/96³",
        "peak MB/96³",
        "train s",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [
            r["variant"],
            f"{r['dice_mean']:.3f}",
            *[f"{r[c]:.3f}" for c in organ_cols],
            f"{r['params_M']:.2f}",
            f"{r['gflops_96']:.1f}",
            f"{r['cpu_ms_96']:.0f}",
            f"{r['peak_mb_96']:.0f}",
            f"{r['train_s']:.0f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    atomic_write_text(out / "ablation.md", "\n".join(lines) + "\n")
