"""Fine-tuning: a training run that starts from another run's weights (``train.init_from``).

``medseg train CONFIG --set data.root=corrections --set train.init_from=runs/x/best.pt`` trains on a new
dataset (e.g. the corrected cases that ``medseg review OUTDIR --export-corrections DIR`` writes) starting
from the weights of ``best.pt`` rather than from a random initialisation (transfer learning as in nnU-Net's
``-pretrained_weights``). What carries over and what does not:

* the **weights** (``model`` state dict, strict: every tensor must fit the configured network, so the config
  must build the same architecture — use the run's own ``config.yaml``);
* the **plan** (spacing, patch, pool kernels, intensity normalisation, batch size) of the checkpoint, so the
  network sees data prepared as it was trained; the dataset's labels must be the checkpoint's (same names,
  same values) — a fine-tuned model's outputs mean the same organs;
* **not** the optimizer, the schedule, the epoch counter or the best metric: the run starts at epoch 1 with
  a fresh optimizer (choose a small ``optim.lr``), and the class-prior initialisation of the output biases
  is skipped (the weights already hold it).

``--resume`` still continues the fine-tuning run itself from its own ``last.pt``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from medseg.config import ConfigError
from medseg.inference.loading import checkpoint_plan
from medseg.io import InputError
from medseg.io.checkpoint import load_checkpoint
from medseg.io.plan import Plan


def initial_checkpoint(path: str, labels: dict[str, int]) -> tuple[dict, Plan]:
    """The checkpoint named by ``train.init_from`` and its plan, checked against the dataset's ``labels``.

    Raises:
        ConfigError: the file is not a readable medseg checkpoint, or its labels differ from the dataset's.
    """
    try:
        ckpt = load_checkpoint(path)
        plan = checkpoint_plan(ckpt, path)
    except InputError as exc:
        raise ConfigError(f"train.init_from: {exc}") from None
    theirs = {str(k): int(v) for k, v in dict(plan.labels).items()}
    if theirs != dict(labels):
        raise ConfigError(
            f"train.init_from: {path} was trained on labels {theirs}, the dataset has {dict(labels)}; "
            "fine-tuning needs the same label table"
        )
    return ckpt, plan


def load_initial_weights(model: torch.nn.Module, ckpt: dict, path: str | Path) -> None:
    """Copy the checkpoint's weights into ``model`` (strict).

    Raises:
        ConfigError: the weights do not fit the configured network (another architecture or filters).
    """
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise ConfigError(
            f"train.init_from: {path}: its weights do not fit the configured network ({first}); train with the "
            "checkpoint's own config (config.yaml in its run folder)"
        ) from None
