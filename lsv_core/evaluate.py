"""Speaker-verification evaluation: embeddings for a trial list, cosine (or AS-norm) scores, metrics.

EER and its bootstrap interval are in percent; minDCF is normalised.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lsv_core.data.features import FeatureStore, extract_features
from lsv_core.data.manifest import read_data
from lsv_core.data.trials import Trials, read_trials
from lsv_core.metrics import as_norm, bootstrap_eer_ci, compute_eer, compute_min_dcf, cosine_scores


@dataclass(frozen=True)
class EvalResult:
    eer: float  # percent
    eer_ci_low: float  # percent, 95 % bootstrap
    eer_ci_high: float
    min_dcf_001: float  # p_target = 0.01
    min_dcf_005: float  # p_target = 0.05
    n_trials: int
    n_target: int
    as_norm: bool
    # EER on the shared bootstrap replicates of the trial list (lsv_core.metrics.paired), when asked for:
    # what paired comparisons with other models scored on the same trials need.
    eer_boot: tuple[float, ...] | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict[str, float | int | bool]:
        out = asdict(self)
        if out["eer_boot"] is None:
            del out["eer_boot"]
        return out


@torch.no_grad()
def extract_embeddings(model: nn.Module, store: FeatureStore, utts: Sequence[str], *, batch_size: int = 32,
                       max_frames: int | None = None) -> dict[str, np.ndarray]:
    """Embeddings of ``utts`` from their full-length features.

    Utterances are sorted by length and batched; a batch is cut to its shortest member, which loses at
    most a few frames per utterance (neighbours in the sorted order have nearly equal lengths) and makes
    CPU extraction several times faster than one utterance at a time. ``max_frames`` caps length.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    order = sorted(utts, key=store.num_frames)
    out: dict[str, np.ndarray] = {}
    for i in range(0, len(order), batch_size):
        chunk = order[i : i + batch_size]
        n = min(store.num_frames(u) for u in chunk)
        if max_frames is not None:
            n = min(n, max_frames)
        x = torch.from_numpy(np.stack([store[u][:n] for u in chunk])).to(device)
        emb = model(x).float().cpu().numpy()
        out.update(zip(chunk, emb, strict=True))
    model.train(was_training)
    return out


def score(trials: Trials, emb: dict[str, np.ndarray], cohort: np.ndarray | None = None,
          top_k: int = 300) -> np.ndarray:
    e = np.stack([emb[u] for u in trials.enroll])
    t = np.stack([emb[u] for u in trials.test])
    s = cosine_scores(e, t)
    return s if cohort is None else as_norm(s, e, t, cohort, top_k=top_k)


def metrics_of(scores: np.ndarray, labels: np.ndarray, *, as_normed: bool = False, n_boot: int = 1000,
               seed: int = 0) -> EvalResult:
    ci = bootstrap_eer_ci(scores, labels, n_boot=n_boot, seed=seed) if n_boot > 0 else None
    eer = ci.eer if ci else compute_eer(scores, labels)
    return EvalResult(
        eer=eer,
        eer_ci_low=ci.low if ci else float("nan"),
        eer_ci_high=ci.high if ci else float("nan"),
        min_dcf_001=compute_min_dcf(scores, labels, 0.01),
        min_dcf_005=compute_min_dcf(scores, labels, 0.05),
        n_trials=len(labels),
        n_target=int(np.sum(labels)),
        as_norm=as_normed,
    )


def cohort_embeddings(model: nn.Module, store: FeatureStore, spk2utt: dict[str, list[str]],
                      max_frames: int = 300) -> np.ndarray:
    """One mean (length-normalised) embedding per cohort speaker, the usual AS-norm cohort."""
    utts = [u for us in spk2utt.values() for u in us]
    emb = extract_embeddings(model, store, utts, max_frames=max_frames)
    from lsv_core.metrics.scoring import l2_normalize

    return np.stack([l2_normalize(np.stack([emb[u] for u in us])).mean(axis=0) for us in spk2utt.values()])


def evaluate(model: nn.Module, store: FeatureStore, trials: Trials, *, cohort: np.ndarray | None = None,
             n_boot: int = 1000, seed: int = 0, max_frames: int | None = None,
             paired_boot: tuple[int, int] | None = None) -> EvalResult:
    """Score ``trials`` with ``model``; ``max_frames`` cuts every utterance (a cheaper, noisier estimate).

    ``paired_boot=(n, seed)`` also gives the EER on ``n`` shared bootstrap replicates (``eer_boot``), for
    paired comparisons with every other model scored on the same trials with the same ``(n, seed)``."""
    emb = extract_embeddings(model, store, trials.utterances, max_frames=max_frames)
    scores = score(trials, emb, cohort)
    result = metrics_of(scores, trials.labels, as_normed=cohort is not None, n_boot=n_boot, seed=seed)
    if paired_boot is None:
        return result
    from lsv_core.metrics.paired import bootstrap_eers

    boot = bootstrap_eers(scores, trials.labels, n_boot=paired_boot[0], seed=paired_boot[1])
    return replace(result, eer_boot=tuple(float(x) for x in boot))


def evaluate_dir(model: nn.Module, data_dir: str | Path, trials_file: str | Path, *,
                 cache_dir: str | Path | None = None, cohort_dir: str | Path | None = None,
                 n_boot: int = 1000, progress: bool = True) -> EvalResult:
    """Read data and trials (validated: every trial utterance must be in the data), then evaluate."""
    data = read_data(data_dir)
    trials = read_trials(trials_file, data)
    store = extract_features(data, utts=trials.utterances, cache_dir=cache_dir, progress=progress)
    cohort = None
    if cohort_dir is not None:
        cdata = read_data(cohort_dir)
        cstore = extract_features(cdata, cache_dir=cache_dir, progress=progress)
        cohort = cohort_embeddings(model, cstore, cdata.spk2utt())
    return evaluate(model, store, trials, cohort=cohort, n_boot=n_boot)
