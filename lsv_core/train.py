"""Baseline speaker-embedding training: AAM-softmax over random fixed-length crops.

The loop (:func:`fit`) is shared with quantization-aware fine-tuning (MSFT): it takes a model, a head, a
batch sampler and an optimizer and runs a number of steps with schedules for learning rate and margin.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lsv_core.data.loader import CropBatches, DataLoading, FeatureSource
from lsv_core.errors import ConfigError


class CropSampler(CropBatches):
    """Endless batches of random ``crop_frames`` crops of random training utterances, seeded.

    ``store`` is any feature source (in memory, the sharded store, or audio; :mod:`lsv_core.data.loader`);
    ``speakers`` maps each of its utterances to its class. Utterances shorter than a crop are tiled
    (WeSpeaker repeats short audio the same way). ``workers`` > 0 prepares batches in DataLoader workers.
    """

    def __init__(self, store: FeatureSource, speakers: Mapping[str, int], *, crop_frames: int = 200,
                 batch_size: int = 64, seed: int = 0, workers: int = 0) -> None:
        labels = np.fromiter((speakers[u] for u in store.utts), dtype=np.int64, count=len(store.utts))
        super().__init__(store, labels, crop=crop_frames, batch_size=batch_size, seed=seed, workers=workers)
        self.store = store


@dataclass
class Schedule:
    """Learning rate: linear warm-up then exponential decay from ``lr`` to ``final_lr``.
    Margin: 0 until ``margin_start`` of the steps, then linear to ``margin`` at ``margin_end``
    (WeSpeaker's margin scheduler, compressed from epochs to fractions of the run)."""

    steps: int
    lr: float
    final_lr: float
    warmup: float = 0.05
    margin: float = 0.2
    margin_start: float = 0.2
    margin_end: float = 0.5

    def lr_at(self, step: int) -> float:
        w = max(1, int(self.warmup * self.steps))
        if step < w:
            return self.lr * (step + 1) / w
        frac = (step - w) / max(1, self.steps - w)
        return self.lr * (self.final_lr / self.lr) ** frac

    def margin_at(self, step: int) -> float:
        frac = step / max(1, self.steps)
        if frac <= self.margin_start:
            return 0.0
        if frac >= self.margin_end:
            return self.margin
        return self.margin * (frac - self.margin_start) / (self.margin_end - self.margin_start)


def make_optimizer(params: Any, name: str, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    raise ConfigError(f"optimizer={name!r} is not valid; allowed: 'sgd', 'adam'")


def fit(model: nn.Module, head: nn.Module, batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
        optimizer: torch.optim.Optimizer, schedule: Schedule, *,
        on_step: Callable[[int, float], bool | None] | None = None, progress: bool = True,
        desc: str = "train", time_budget_s: float | None = None) -> dict[str, float]:
    """Run ``schedule.steps`` optimisation steps; returns the mean loss/accuracy over the last 10 %.

    ``on_step(step, loss)`` runs after each step; returning True stops early (used by MSFT to
    re-cluster codebooks, and by callers with a time budget). Raises FloatingPointError on a NaN loss.
    """
    from tqdm import tqdm

    device = next(model.parameters()).device
    model.train()
    head.train()
    loss_fn = nn.CrossEntropyLoss()
    tail = max(1, schedule.steps // 10)
    losses: list[float] = []
    accs: list[float] = []
    start = time.monotonic()
    bar = tqdm(range(schedule.steps), desc=desc, unit="step", disable=not progress, leave=False)
    for step in bar:
        lr = schedule.lr_at(step)
        for g in optimizer.param_groups:
            g["lr"] = lr
        if hasattr(head, "update"):
            head.update(schedule.margin_at(step))
        x, y = next(batches)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        logits = head(model(x), y)
        loss = loss_fn(logits, y)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{desc}: loss is {loss.item()} at step {step}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        accs.append((logits.argmax(1) == y).float().mean().item())
        if step % 20 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}", acc=f"{np.mean(accs[-20:]):.2f}", lr=f"{lr:.3g}")
        if on_step is not None and on_step(step, losses[-1]):
            break
        if time_budget_s is not None and time.monotonic() - start > time_budget_s:
            break
    bar.close()
    return {"loss": float(np.mean(losses[-tail:])), "acc": float(np.mean(accs[-tail:])),
            "steps": float(len(losses))}


# The quickstart's CPU baseline: the thin net with a strided first convolution (about 4x cheaper).
CPU_BASELINE_KWARGS: dict[str, dict[str, Any]] = {
    "ThinResNet": {"m_channels": 8, "num_blocks": [1, 1, 1, 1], "first_stride": 2, "embed_dim": 128}}


@dataclass
class TrainConfig:
    """Baseline training. Defaults are the CPU baseline for the embedded corpus."""

    model: str = "ThinResNet"
    # None: CPU_BASELINE_KWARGS for the thin net, the registry's defaults for every other model (the thin
    # net's m_channels / num_blocks / first_stride are not arguments of WeSpeaker's ResNet34).
    model_kwargs: dict[str, Any] | None = None
    steps: int = 900
    batch_size: int = 64
    crop_frames: int = 200
    optimizer: str = "sgd"
    lr: float = 0.1
    final_lr: float = 0.001
    weight_decay: float = 1e-4
    margin: float = 0.2
    scale: float = 32.0
    seed: int = 0
    device: str = "auto"
    time_budget_s: float | None = None

    def __post_init__(self) -> None:
        if self.model_kwargs is None:
            self.model_kwargs = dict(CPU_BASELINE_KWARGS.get(self.model, {}))

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


@dataclass
class TrainSummary:
    checkpoint: str
    model: str
    params: int
    steps: int
    train_wall_s: float
    total_wall_s: float
    final_loss: float
    final_acc: float
    n_train_speakers: int
    n_train_utts: int
    eval: dict[str, Any]
    config: dict[str, Any]


def _embedding_dim(model: nn.Module) -> int:
    """``model.embed_dim``, or, for a plugin network without one, the width of its output on a short fbank."""
    if isinstance(getattr(model, "embed_dim", None), int):
        return model.embed_dim
    device = next(model.parameters()).device
    was_training = model.training
    with torch.no_grad():
        out = model.eval()(torch.zeros(2, 64, int(model.arch["kwargs"]["feat_dim"]), device=device))
    model.train(was_training)
    return int(out.shape[-1])


def train_baseline(config: TrainConfig, train_dir: str | Path, *, out: str | Path,
                   eval_dir: str | Path | None = None, trials: str | Path | None = None,
                   cache_dir: str | Path | None = None, overwrite: bool = False,
                   progress: bool = True, loading: DataLoading = DataLoading()) -> TrainSummary:
    """Train the baseline on ``train_dir``, evaluate on ``trials`` over ``eval_dir``, write a checkpoint
    (safetensors, with the AAM head under ``projection.*`` for later fine-tuning) and ``<out>.json``.
    ``loading`` says where features come from (:mod:`lsv_core.data.loader`; ``auto`` by default).
    """
    from lsv_core.atomic import check_writable, write_text_atomic
    from lsv_core.data.loader import open_features
    from lsv_core.data.manifest import read_data
    from lsv_core.data.trials import read_trials
    from lsv_core.device import pick_device
    from lsv_core.evaluate import evaluate
    from lsv_core.models import build_model
    from lsv_core.models.checkpoint import save_checkpoint
    from lsv_core.models.heads import AAMSoftmax

    t0 = time.monotonic()
    out = Path(out)
    summary_path = out.with_suffix(".json")
    check_writable(out, overwrite)
    check_writable(summary_path, overwrite)
    device = pick_device(config.device)
    data = read_data(train_dir)
    eval_data = read_data(eval_dir) if eval_dir is not None else None
    trial_list = read_trials(trials, eval_data) if trials is not None and eval_data is not None else None
    spk_index = {s: i for i, s in enumerate(data.speakers)}
    speakers = {u.utt: spk_index[u.speaker] for u in data}
    store, mode = open_features(data, loading=loading, cache_dir=cache_dir, progress=progress)

    torch.manual_seed(config.seed)
    model = build_model(config.model, **(config.model_kwargs or {})).to(device)
    head = AAMSoftmax(_embedding_dim(model), len(spk_index), margin=0.0, scale=config.scale).to(device)
    sampler = CropSampler(store, speakers, crop_frames=config.crop_frames, batch_size=config.batch_size,
                          seed=config.seed, workers=loading.workers_for(mode, device))
    optimizer = make_optimizer(list(model.parameters()) + list(head.parameters()), config.optimizer,
                               config.lr, config.weight_decay)
    schedule = Schedule(config.steps, config.lr, config.final_lr, margin=config.margin)
    t_train = time.monotonic()
    try:
        stats = fit(model, head, sampler, optimizer, schedule, progress=progress, desc="baseline",
                    time_budget_s=config.time_budget_s)
    finally:
        sampler.close()
    train_wall = time.monotonic() - t_train

    result: dict[str, Any] = {}
    if trial_list is not None and eval_data is not None:
        eval_store, _ = open_features(eval_data, trial_list.utterances, loading=loading, cache_dir=cache_dir,
                                      progress=progress, role="eval")
        result = evaluate(model, eval_store, trial_list).to_dict()
    params = sum(p.numel() for p in model.parameters())
    meta = {"train_config": asdict(config), "eval": result, "speakers": len(spk_index)}
    save_checkpoint(model.cpu(), out, metadata=meta,
                    extra_tensors={k: v.detach().cpu() for k, v in head.state_dict().items()},
                    overwrite=overwrite)
    summary = TrainSummary(
        checkpoint=str(out), model=config.model, params=params, steps=int(stats["steps"]),
        train_wall_s=round(train_wall, 1), total_wall_s=round(time.monotonic() - t0, 1),
        final_loss=stats["loss"], final_acc=stats["acc"], n_train_speakers=len(spk_index),
        n_train_utts=len(data), eval=result, config=asdict(config),
    )
    write_text_atomic(summary_path, json.dumps(asdict(summary), indent=2), overwrite=overwrite)
    return summary
