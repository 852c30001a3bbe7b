"""The fp32 control of a quantization trial: the unquantized baseline fine-tuned with the trial's budget.

A quantized trial is fine-tuned after quantization, so comparing it with the baseline as trained mixes
two effects: quantization damage and the extra fine-tuning. The control removes the second one: the float
baseline gets exactly what a one-stage MSFT run gives a quantized copy (same head, crop sampler, seed,
optimizer, learning-rate schedule and margin; :func:`lsv_core.quant.msft.msft` with an empty recipe runs
no stage, so this calls :func:`lsv_core.train.fit` the way it does) and is scored the same way.

It also tells whether the baseline is converged: fine-tuning it in fp32 at the study's budget should move
its EER by less than the EER's confidence interval.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

import torch

from lsv_core.evaluate import EvalResult, evaluate
from lsv_core.quant.msft import MsftSchedule
from lsv_core.train import CropSampler, Schedule, fit, make_optimizer
from lsv_core.workbench import Workbench

__all__ = ["ControlOutcome", "fine_tune_fp32"]


@dataclass(frozen=True)
class ControlOutcome:
    """The fine-tuned float model's scores (EER in percent) and the fine-tuning's final loss and wall time."""

    result: EvalResult
    steps: int
    final_loss: float
    wall_s: float

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self.result), "steps": self.steps, "final_loss": self.final_loss, "wall_s": self.wall_s}


def fine_tune_fp32(bench: Workbench, schedule: MsftSchedule, *, n_boot: int = 1000,
                   progress: bool = False) -> ControlOutcome:
    """Fine-tune a fresh copy of ``bench``'s float baseline for ``schedule.total_steps`` steps as one MSFT
    stage would, then score it on ``bench``'s trials (bootstrap seeded with ``schedule.seed``)."""
    t0 = time.monotonic()
    model, data = bench.fresh()
    device = next(model.parameters()).device
    head = data.head.to(device)
    if hasattr(head, "update"):
        head.update(schedule.margin)
    # Same construction order as msft(): sampler, then the torch seed, then the optimizer.
    sampler = CropSampler(data.train, data.speakers, crop_frames=schedule.crop_frames,
                          batch_size=schedule.batch_size, seed=schedule.seed)
    torch.manual_seed(schedule.seed)
    loss = float("nan")
    if schedule.total_steps > 0:
        optimizer = make_optimizer(list(model.parameters()) + list(head.parameters()), schedule.optimizer,
                                   schedule.lr, schedule.weight_decay)
        sched = Schedule(schedule.total_steps, schedule.lr, schedule.final_lr, warmup=0.0, margin=schedule.margin,
                         margin_start=0.0, margin_end=0.0)
        loss = fit(model, head, sampler, optimizer, sched, progress=progress, desc="fp32 control")["loss"]
    model.eval()
    result = evaluate(model, bench.eval_store, bench.trials, n_boot=n_boot, seed=schedule.seed)
    return ControlOutcome(result, schedule.total_steps, loss, time.monotonic() - t0)
