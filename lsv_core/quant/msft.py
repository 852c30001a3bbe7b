"""Multi-stage fine-tuning (MSFT): quantize layers group by group, fine-tuning after each group.

The paper states that once the bits are fixed, layers are quantized and fine-tuned progressively in a
specific order, and that this beats quantizing everything at once. The order is not published; ours
(docs/method.md) are switches:

* ``"bits"`` (default): one stage per distinct bit width, lowest bits first, so the most damaging
  quantization happens while the rest of the network is still float and can compensate;
* ``"sensitivity"``: ``n_groups`` groups by ascending sensitivity (robust layers first, the most
  sensitive ones last, when the network around them is already quantized and they get the last budget);
* ``"depth"``: ``n_groups`` contiguous groups from input to output;
* ``"one_shot"``: one stage with every layer, the ablation (same total steps).

The fine-tuning budget is split evenly over the stages. Quantized layers stay quantized. After each
stage the model is scored on the evaluation trials and ``callback(stage, metrics)`` may stop the run.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from lsv_core.data.loader import FeatureSource
from lsv_core.data.trials import Trials
from lsv_core.errors import CheckpointError, ConfigError
from lsv_core.quant.codebook import KMQATConfig
from lsv_core.quant.initial_codebooks import InitialCodebooks
from lsv_core.quant.quantize import quantize, recluster_all
from lsv_core.quant.recipe import BitRecipe, quantizable_layers
from lsv_core.settings import check_settings, setting

Order = Literal["bits", "sensitivity", "depth", "one_shot"]
ORDERS: tuple[str, ...] = ("bits", "sensitivity", "depth", "one_shot")


@dataclass(frozen=True)
class MsftSchedule:
    """Budget and order of the fine-tuning. ``total_steps`` is split evenly over the stages.

    Defaults and bounds are declared here once; a study's ``[msft]`` section and ``lsv quantize`` read them.
    """

    order: Order = setting("bits", choices=ORDERS)
    total_steps: int = setting(300, ge=0)
    n_groups: int = setting(4, ge=1)
    optimizer: str = setting("sgd", choices=("sgd", "adam"))
    lr: float = setting(0.01, gt=0)
    final_lr: float = setting(0.001, gt=0)
    weight_decay: float = setting(1e-4, ge=0)
    batch_size: int = setting(64, ge=1)
    crop_frames: int = setting(200, ge=10)
    margin: float = setting(0.2, ge=0)
    bn_reestimate_batches: int = setting(0, ge=0)
    eval_each_stage: bool = True
    # Intermediate stages are scored on utterances cut to this many frames: their EER only steers early
    # stopping and the per-stage curves, and full-length embeddings dominate a short trial's wall time.
    # The last stage is always scored at full length. None: full length everywhere.
    stage_eval_frames: int | None = setting(None, ge=10, optional=True)
    n_boot: int = setting(0, ge=0)
    seed: int = 0
    kmqat: KMQATConfig = field(default_factory=KMQATConfig)

    def __post_init__(self) -> None:
        check_settings(self)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MsftSchedule:
        """Inverse of :meth:`to_dict` (how a schedule travels to a Ray worker)."""
        data = dict(data)
        kmqat = data.pop("kmqat", None)
        return cls(**data, kmqat=KMQATConfig(**kmqat) if kmqat is not None else KMQATConfig())


@dataclass
class FineTuneData:
    """What fine-tuning needs: training features with speaker indices, the trained AAM head, and the
    evaluation features and trials (often a subset, for speed). Features come from any source of
    :mod:`lsv_core.data.loader`; ``loader_workers`` > 0 prepares training batches in the background."""

    train: FeatureSource
    speakers: Mapping[str, int]
    head: nn.Module | None  # None: a baseline without its AAM head, only for total_steps = 0
    eval: FeatureSource | None = None
    trials: Trials | None = None
    loader_workers: int = 0


@dataclass
class StageMetrics:
    stage: int
    layers: list[str]
    bits: list[int]
    steps: int
    loss: float
    eer: float | None  # percent
    min_dcf: float | None
    wall_s: float


@dataclass
class MsftResult:
    stages: list[StageMetrics]
    stopped_early: bool
    recipe: BitRecipe

    @property
    def final(self) -> StageMetrics:
        return self.stages[-1]


def plan_stages(model: nn.Module, recipe: BitRecipe, order: Order = "bits", n_groups: int = 4,
                sensitivity: Mapping[str, float] | None = None) -> list[list[str]]:
    """Layer groups in the order they are quantized; together they cover the recipe exactly."""
    layers = [name for name in quantizable_layers(model) if name in recipe]
    if not layers:
        return []
    if order == "one_shot":
        return [layers]
    if order == "bits":
        return [[n for n in layers if recipe[n].bits == b] for b in sorted({recipe[n].bits for n in layers})]
    if order == "sensitivity":
        if sensitivity is None:
            raise ConfigError("order='sensitivity' needs per-layer sensitivities (sensitivity=...)")
        missing = [n for n in layers if n not in sensitivity]
        if missing:
            raise ConfigError(f"order='sensitivity': no sensitivity for layers {missing}")
        layers = sorted(layers, key=lambda n: (sensitivity[n], layers.index(n)))
    groups = np.array_split(np.arange(len(layers)), min(n_groups, len(layers)))
    return [[layers[i] for i in g] for g in groups]


@torch.no_grad()
def reestimate_batchnorm(model: nn.Module, batches: Any, n_batches: int) -> None:
    """Recompute BatchNorm running statistics under the current (quantized) weights, cumulatively."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not bns or n_batches <= 0:
        return
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average over the re-estimation batches
    model.train()
    device = next(model.parameters()).device
    for _ in range(n_batches):
        x, _ = next(batches)
        model(x.to(device))
    for m, mom in zip(bns, saved, strict=True):
        m.momentum = mom


def msft(model: nn.Module, recipe: BitRecipe | Mapping[str, Any], data: FineTuneData,
         schedule: MsftSchedule = MsftSchedule(), *,
         callback: Callable[[int, StageMetrics], bool | None] | None = None,
         sensitivity: Mapping[str, float] | None = None, progress: bool = False,
         final_eval: Callable[[nn.Module], tuple[float, float]] | None = None,
         codebooks: InitialCodebooks | None = None) -> MsftResult:
    """Quantize ``model`` (in place) to ``recipe`` in stages, fine-tuning after each one.

    ``final_eval(model) -> (eer, min_dcf)`` replaces the plain evaluation after the last stage, so a
    caller that scores the final model anyway (with a bootstrap CI) does not score it twice.
    ``codebooks`` caches the initial codebooks of layers quantized straight from the baseline.

    ``callback(stage, metrics)`` is called after every stage (metrics include the stage's EER in percent
    when evaluation data is given); returning True stops before the next stage (``stopped_early``).
    Raises FloatingPointError if fine-tuning diverges.
    """
    from lsv_core.train import CropSampler

    recipe = recipe if isinstance(recipe, BitRecipe) else BitRecipe(recipe)
    recipe.validate(model)
    # An empty recipe still fine-tunes, as one stage with nothing quantized: the fp32 control of a study
    # gets exactly the budget and schedule its trials get.
    stages = plan_stages(model, recipe, schedule.order, schedule.n_groups, sensitivity) or [[]]
    device = next(model.parameters()).device
    head = data.head.to(device) if data.head is not None else None
    if schedule.total_steps > 0 and head is None:
        raise CheckpointError(f"fine-tuning (total_steps={schedule.total_steps}) needs the baseline's AAM head and "
                              "this baseline has none; total_steps=0 quantizes by k-means alone")
    if hasattr(head, "update"):
        head.update(schedule.margin)
    sampler = CropSampler(data.train, data.speakers, crop_frames=schedule.crop_frames,
                          batch_size=schedule.batch_size, seed=schedule.seed, workers=data.loader_workers)
    try:
        return _run_stages(model, recipe, data, schedule, stages, head, sampler, callback, progress, final_eval,
                           codebooks)
    finally:
        sampler.close()


def _run_stages(model: nn.Module, recipe: BitRecipe, data: FineTuneData, schedule: MsftSchedule,
                stages: list[list[str]], head: nn.Module | None, sampler: Any,
                callback: Callable[[int, StageMetrics], bool | None] | None, progress: bool,
                final_eval: Callable[[nn.Module], tuple[float, float]] | None,
                codebooks: InitialCodebooks | None) -> MsftResult:
    from lsv_core.evaluate import evaluate
    from lsv_core.train import Schedule, fit, make_optimizer

    torch.manual_seed(schedule.seed)
    n_stages = max(1, len(stages))
    steps_per_stage = [len(a) for a in np.array_split(np.arange(schedule.total_steps), n_stages)]
    done: dict[str, Any] = {}
    results: list[StageMetrics] = []
    stopped = False
    global_step = 0
    for i, group in enumerate(stages):
        t0 = time.monotonic()
        done.update({n: recipe[n] for n in group})
        quantize(model, BitRecipe(done), seed=schedule.seed, config=schedule.kmqat, codebooks=codebooks)
        reestimate_batchnorm(model, sampler, schedule.bn_reestimate_batches)
        steps = steps_per_stage[i]
        loss = float("nan")
        if steps > 0 and head is not None:
            params = list(model.parameters()) + list(head.parameters())
            optimizer = make_optimizer(params, schedule.optimizer, schedule.lr, schedule.weight_decay)
            sched = Schedule(steps, schedule.lr, schedule.final_lr, warmup=0.0, margin=schedule.margin,
                             margin_start=0.0, margin_end=0.0)
            base = global_step

            def on_step(step: int, _loss: float, base: int = base) -> bool:
                # Codebooks regenerated after the last optimizer step would reach evaluation without one
                # step of training against them; on the quickstart that final re-cluster was the largest
                # source of seed-to-seed EER noise at 2-3 bits (BENCHMARKS.md "Where the noise came from").
                if base + step + 1 < schedule.total_steps:
                    recluster_all(model, base + step + 1, seed=schedule.seed)
                return False

            stats = fit(model, head, sampler, optimizer, sched, on_step=on_step, progress=progress,
                        desc=f"msft {i + 1}/{n_stages}")
            loss = stats["loss"]
            global_step += steps
        eer = dcf = None
        last = i == len(stages) - 1
        if last and final_eval is not None:
            eer, dcf = final_eval(model)
        elif data.trials is not None and data.eval is not None and (schedule.eval_each_stage or last):
            res = evaluate(model, data.eval, data.trials, n_boot=schedule.n_boot, seed=schedule.seed,
                           max_frames=None if last else schedule.stage_eval_frames)
            eer, dcf = res.eer, res.min_dcf_001
        metrics = StageMetrics(stage=i, layers=list(group), bits=[recipe[n].bits for n in group], steps=steps,
                               loss=loss, eer=eer, min_dcf=dcf, wall_s=time.monotonic() - t0)
        results.append(metrics)
        if callback is not None and callback(i, metrics) and not last:
            stopped = True
            break
    model.eval()
    return MsftResult(results, stopped, recipe)
