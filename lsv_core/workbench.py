"""A baseline model and its data loaded once, ready to quantize and score many bit recipes.

This is what ``lsv quantize``, the benchmarks and every search worker share: features are extracted
(or read from the cache) once, the float baseline stays untouched, and each :meth:`Workbench.run`
works on a fresh copy. EER is in percent; sizes are exact packed bytes.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lsv_core.data.loader import DataLoading, FeatureSource, open_features
from lsv_core.data.manifest import read_data
from lsv_core.data.subset import TrainingSubset, select_training_utts
from lsv_core.data.trials import Trials, read_trials
from lsv_core.device import pick_device
from lsv_core.errors import CheckpointError, ConfigError
from lsv_core.evaluate import EvalResult, evaluate
from lsv_core.models import AAMSoftmax
from lsv_core.models.baseline import Baseline, read_baseline
from lsv_core.quant.initial_codebooks import InitialCodebooks
from lsv_core.quant.msft import FineTuneData, MsftSchedule, StageMetrics, msft
from lsv_core.quant.probe import ProbeResult
from lsv_core.quant.quantize import latent_weight
from lsv_core.quant.recipe import ALLOWED_BITS, BitRecipe, SpecLike, quantizable_layers
from lsv_core.quant.size import average_bits, packed_size_bytes


@dataclass(frozen=True)
class DataPaths:
    """Training data (for fine-tuning), evaluation data and its trial list."""

    train: Path
    eval: Path
    trials: Path

    @classmethod
    def corpus(cls, root: str | Path) -> DataPaths:
        """The layout ``lsv corpus synth`` writes: ``train/``, ``eval/``, ``eval/trials``."""
        root = Path(root)
        return cls(root / "train", root / "eval", root / "eval" / "trials")

    def resolved(self) -> DataPaths:
        return DataPaths(self.train.resolve(), self.eval.resolve(), self.trials.resolve())


@dataclass(frozen=True)
class WorkbenchSpec:
    """Everything :meth:`Workbench.load` needs, as plain data: the one form in which a study's config
    reaches the driver, the trial workers, ``lsv quantize`` and export (:meth:`to_dict` travels to Ray).

    ``checkpoint`` is ours (``lsv train``; it keeps its AAM head) or a WeSpeaker ``avg_model.pt`` (then
    ``arch``/``arch_kwargs`` name its architecture). ``max_trials`` scores on a seeded subset
    (``subset_seed``) of the trial list. ``codebook_dir`` keeps the baseline's initial k-means codebooks
    on disk, shared by every workbench that points at it. ``loading`` says where features come from
    (memory, the sharded store in ``cache_dir``, or audio; :mod:`lsv_core.data.loader`) and ``train_subset``
    fine-tunes on a seeded subset of the training speakers/utterances (:mod:`lsv_core.data.subset`).
    """

    checkpoint: Path
    data: DataPaths
    arch: str | None = None
    arch_kwargs: Mapping[str, Any] = field(default_factory=dict)
    cache_dir: Path | None = None
    max_trials: int | None = None
    subset_seed: int = 0
    device: str = "auto"
    codebook_dir: Path | None = None
    loading: DataLoading = field(default_factory=DataLoading)
    train_subset: TrainingSubset = field(default_factory=TrainingSubset)
    p_target: float = 0.01  # of the minDCF every run reports (RecipeOutcome.min_dcf)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (paths as strings)."""
        def text(p: Path | None) -> str | None:
            return None if p is None else str(p)

        return {"checkpoint": str(self.checkpoint), "train": str(self.data.train), "eval": str(self.data.eval),
                "trials": str(self.data.trials), "arch": self.arch, "arch_kwargs": dict(self.arch_kwargs),
                "cache_dir": text(self.cache_dir), "max_trials": self.max_trials, "subset_seed": self.subset_seed,
                "device": self.device, "codebook_dir": text(self.codebook_dir), "loading": asdict(self.loading),
                "train_subset": asdict(self.train_subset), "p_target": self.p_target}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> WorkbenchSpec:
        def path(v: str | None) -> Path | None:
            return None if v is None else Path(v)

        return cls(checkpoint=Path(d["checkpoint"]), data=DataPaths(Path(d["train"]), Path(d["eval"]), Path(d["trials"])),
                   arch=d.get("arch"), arch_kwargs=dict(d.get("arch_kwargs") or {}), cache_dir=path(d.get("cache_dir")),
                   max_trials=d.get("max_trials"), subset_seed=int(d.get("subset_seed", 0)),
                   device=d.get("device", "auto"), codebook_dir=path(d.get("codebook_dir")),
                   loading=DataLoading(**(d.get("loading") or {})),
                   train_subset=TrainingSubset(**(d.get("train_subset") or {})),
                   p_target=float(d.get("p_target", 0.01)))

    def replace(self, **changes: Any) -> WorkbenchSpec:
        return dataclasses.replace(self, **changes)


def subset_trials(trials: Trials, max_trials: int | None, seed: int = 0) -> Trials:
    """A seeded random subset of at most ``max_trials`` trials with the original target ratio."""
    if max_trials is None or max_trials >= len(trials):
        return trials
    rng = np.random.default_rng(seed)
    tgt, non = np.flatnonzero(trials.labels == 1), np.flatnonzero(trials.labels == 0)
    n_tgt = max(1, round(max_trials * len(tgt) / len(trials)))
    keep = np.sort(np.r_[rng.choice(tgt, n_tgt, replace=False), rng.choice(non, max_trials - n_tgt, replace=False)])
    return Trials([trials.enroll[i] for i in keep], [trials.test[i] for i in keep], trials.labels[keep],
                  trials.source)


@dataclass
class RecipeOutcome:
    """Result of quantizing the baseline with one recipe (EER in percent, sizes in bytes)."""

    recipe: BitRecipe
    eer: float
    eer_ci_low: float
    eer_ci_high: float
    min_dcf_001: float
    min_dcf_005: float
    size_bytes: int
    fp32_bytes: int
    stages: list[StageMetrics]
    stopped_early: bool
    wall_s: float
    model: nn.Module = field(repr=False)
    eer_boot: tuple[float, ...] | None = field(default=None, repr=False)  # with Workbench.run(paired_boot=...)
    min_dcf: float = float("nan")  # at the workbench's p_target
    p_target: float = 0.01

    @property
    def compression_ratio(self) -> float:
        return self.fp32_bytes / self.size_bytes

    @property
    def avg_bits(self) -> float:
        return average_bits(self.model, self.recipe)

    def summary(self) -> dict[str, Any]:
        return {
            "recipe": self.recipe.to_dict(), "eer": self.eer, "eer_ci_low": self.eer_ci_low,
            "eer_ci_high": self.eer_ci_high, "min_dcf_001": self.min_dcf_001, "min_dcf_005": self.min_dcf_005,
            "min_dcf": self.min_dcf, "p_target": self.p_target, "size_bytes": self.size_bytes, "fp32_bytes": self.fp32_bytes,
            "compression_ratio": self.compression_ratio, "avg_bits": self.avg_bits,
            "stopped_early": self.stopped_early, "wall_s": self.wall_s,
            "stages": [asdict(s) for s in self.stages],
        }


class Workbench:
    """The float baseline, its AAM head, training features and evaluation trials, loaded once."""

    def __init__(self, model: nn.Module, head: nn.Module | None, train: FeatureSource, speakers: Mapping[str, int],
                 eval_store: FeatureSource, trials: Trials, codebook_dir: str | Path | None = None,
                 codebooks: InitialCodebooks | None = None, loader_workers: int = 0, p_target: float = 0.01) -> None:
        self.model = model.eval()
        self.p_target = p_target
        self.head = head
        self.train = train
        self.speakers = speakers
        self.eval_store = eval_store
        self.trials = trials
        self.loader_workers = loader_workers
        self.fp32_bytes = packed_size_bytes(model, BitRecipe({}))
        modules = dict(model.named_modules())
        # Every recipe's first MSFT stage clusters baseline weights: those codebooks are computed once.
        self.codebooks = codebooks if codebooks is not None else InitialCodebooks(
            {n: latent_weight(modules[n]) for n in quantizable_layers(model)}, directory=codebook_dir)

    @classmethod
    def load(cls, spec: WorkbenchSpec, *, baseline: Baseline | None = None,
             codebooks: InitialCodebooks | None = None, progress: bool = True) -> Workbench:
        """Load the baseline and the data ``spec`` names (see :class:`WorkbenchSpec`).

        ``baseline`` (already read, e.g. received through Ray's object store) replaces reading
        ``spec.checkpoint``; ``codebooks`` replaces the baseline's initial codebooks cache. The head's classes
        must be the training speakers in sorted order (as ``lsv train`` and WeSpeaker's spk2id make them).
        """
        checkpoint, paths = spec.checkpoint, spec.data
        dev = pick_device(spec.device)
        if baseline is None:
            baseline = read_baseline(checkpoint, spec.arch, spec.arch_kwargs)
        model, head_state = copy.deepcopy(baseline.model), baseline.head
        train_data = read_data(paths.train)
        train_utts = select_training_utts(train_data, spec.train_subset)
        speakers_sorted = train_data.speakers
        head = None  # a checkpoint without its AAM head still quantizes by k-means alone (no fine-tuning)
        if "weight" in head_state:
            n_classes, embed_dim = head_state["weight"].shape
            if n_classes != len(speakers_sorted):
                raise ConfigError(f"{checkpoint}: the head has {n_classes} classes but {paths.train} has "
                                  f"{len(speakers_sorted)} speakers; fine-tune on the data the baseline was trained on")
            head = AAMSoftmax(embed_dim, n_classes)
            head.load_state_dict(head_state)
        eval_data = read_data(paths.eval)
        trials = subset_trials(read_trials(paths.trials, eval_data), spec.max_trials, spec.subset_seed)
        spk_index = {s: i for i, s in enumerate(speakers_sorted)}
        speakers = {u: spk_index[train_data.utterances[u].speaker] for u in train_utts}
        train, mode = open_features(train_data, train_utts, loading=spec.loading, cache_dir=spec.cache_dir,
                                    progress=progress)
        del train_data  # a million-utterance listing is a few hundred MB of Python objects
        eval_store, _ = open_features(eval_data, trials.utterances, loading=spec.loading, cache_dir=spec.cache_dir,
                                      progress=progress, role="eval")
        return cls(model.to(dev), head.to(dev) if head is not None else None, train, speakers, eval_store, trials,
                   codebook_dir=spec.codebook_dir, codebooks=codebooks,
                   loader_workers=spec.loading.workers_for(mode, dev), p_target=spec.p_target)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def evaluate_float(self, n_boot: int = 1000, seed: int = 0) -> EvalResult:
        return evaluate(self.model, self.eval_store, self.trials, n_boot=n_boot, seed=seed)

    def fresh(self) -> tuple[nn.Module, FineTuneData]:
        """Independent copies of the baseline and head, and the shared (read-only) data."""
        model, head = copy.deepcopy(self.model), copy.deepcopy(self.head)
        return model, FineTuneData(self.train, self.speakers, head, self.eval_store, self.trials,
                                   loader_workers=self.loader_workers)

    def size_of(self, recipe: BitRecipe | Mapping[str, SpecLike]) -> int:
        """Exact packed bytes of the baseline under ``recipe``, without quantizing anything."""
        return packed_size_bytes(self.model, recipe)

    def run(self, recipe: BitRecipe | Mapping[str, SpecLike], schedule: MsftSchedule = MsftSchedule(), *,
            callback: Callable[[int, StageMetrics], bool | None] | None = None,
            sensitivity: Mapping[str, float] | None = None, n_boot: int = 1000,
            progress: bool = False, paired_boot: tuple[int, int] | None = None) -> RecipeOutcome:
        """Quantize a fresh copy of the baseline with ``recipe`` by MSFT and score it on the trials.

        An empty recipe is the fp32 control: the same fine-tuning with nothing quantized. ``paired_boot``:
        see :func:`lsv_core.evaluate.evaluate` (``RecipeOutcome.eer_boot``)."""
        t0 = time.monotonic()
        recipe = recipe if isinstance(recipe, BitRecipe) else BitRecipe(recipe)
        model, data = self.fresh()
        scored: list[EvalResult] = []

        def final_eval(m: nn.Module) -> tuple[float, float]:
            scored.append(evaluate(m, self.eval_store, self.trials, n_boot=n_boot, seed=schedule.seed,
                                   paired_boot=paired_boot, p_target=self.p_target))
            return scored[-1].eer, scored[-1].min_dcf_001

        result = msft(model, recipe, data, schedule, callback=callback, sensitivity=sensitivity,
                      progress=progress, final_eval=final_eval, codebooks=self.codebooks)
        # A run stopped early, or a recipe with no stage, has not been scored as a whole yet.
        final = scored[-1] if scored else evaluate(model, self.eval_store, self.trials, n_boot=n_boot,
                                                   seed=schedule.seed, paired_boot=paired_boot,
                                                   p_target=self.p_target)
        return RecipeOutcome(
            recipe=recipe, eer=final.eer, eer_ci_low=final.eer_ci_low, eer_ci_high=final.eer_ci_high,
            min_dcf_001=final.min_dcf_001, min_dcf_005=final.min_dcf_005,
            size_bytes=packed_size_bytes(model), fp32_bytes=self.fp32_bytes, stages=result.stages,
            stopped_early=result.stopped_early, wall_s=time.monotonic() - t0, model=model, eer_boot=final.eer_boot,
            min_dcf=final.min_dcf, p_target=final.p_target,
        )

    def _train_digest(self) -> str:
        """Identity of the training utterances (the loss batches are drawn from them)."""
        return hashlib.sha256("\n".join(self.train.utts).encode()).hexdigest()[:16]

    def loss_batches(self, n_batches: int, batch_size: int = 32, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
        from lsv_core.train import CropSampler

        sampler = CropSampler(self.train, self.speakers, batch_size=batch_size, seed=seed)
        return [next(sampler) for _ in range(n_batches)]

    def hessian_traces(self, *, n_probes: int = 16, n_batches: int = 2, cache_path: str | Path | None = None,
                       seed: int = 0) -> dict[str, float]:
        """Per-layer Hutchinson traces Tr(H) of the baseline's training loss (docs/method.md), cached per
        model, head and training data in ``cache_path`` when given."""
        from lsv_core.quant.sensitivity import cached_hessian_traces, hessian_traces, state_dict_digest

        if self.head is None:
            raise CheckpointError("the baseline has no AAM head (projection.*): Hessian traces are of its training "
                                  "loss, which needs the head; train the baseline with `lsv train`")
        head = copy.deepcopy(self.head)
        head.update(0.2)
        loss = nn.CrossEntropyLoss()
        dev = self.device

        def loss_fn(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
            x, y = batch
            return loss(head(model(x.to(dev)), y.to(dev)), y.to(dev))

        batches = self.loss_batches(n_batches, seed=seed)
        if cache_path is not None:
            return cached_hessian_traces(self.model, loss_fn, batches, cache_path, n_probes=n_probes, seed=seed,
                                         data_key=f"{state_dict_digest(head)}/{self._train_digest()}/{n_batches}")
        return hessian_traces(self.model, loss_fn, batches, n_probes=n_probes, seed=seed)

    def sensitivities(self, *, bit_choices: tuple[int, ...] = ALLOWED_BITS, n_probes: int = 16,
                      n_batches: int = 2, cache_path: str | Path | None = None, seed: int = 0,
                      traces: Mapping[str, float] | None = None) -> dict[str, dict[int, float]]:
        """Per-layer Ω(b) = Tr(H) · ||W − Q_b(W)||² (docs/method.md); ``traces`` from :meth:`hessian_traces`
        (computed here when not given)."""
        from lsv_core.quant.sensitivity import quantization_errors, sensitivity

        if traces is None:
            traces = self.hessian_traces(n_probes=n_probes, n_batches=n_batches, cache_path=cache_path, seed=seed)
        errors = quantization_errors(self.model, bit_choices, seed=seed)
        return sensitivity(traces, errors)

    def probe(self, units: Mapping[str, list[str]], choices: tuple[str, ...] | list[str], *,
              max_frames: int | None = 100, progress: bool = False) -> ProbeResult:
        """One-shot probes of each unit (name -> its layers) on this workbench's trials
        (:func:`lsv_core.quant.probe.probe_units`); ``max_frames`` cuts each test utterance (1 s by
        default: a probe ranks units, it does not need the final EER's precision)."""
        from lsv_core.quant.probe import probe_units

        def score(model: nn.Module) -> float:
            return evaluate(model.eval(), self.eval_store, self.trials, n_boot=0, max_frames=max_frames).eer

        return probe_units(self.model, units, choices, score, codebooks=self.codebooks, progress=progress,
                           settings={"max_frames": max_frames, "n_trials": len(self.trials)})
