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

from lsv_core.data.loader import DataLoading, FeatureSource, open_features
from lsv_core.data.manifest import read_data
from lsv_core.data.trials import Trials, read_trials
from lsv_core.metrics import as_norm, bootstrap_eer_ci, compute_eer, compute_min_dcf, cosine_scores
from lsv_core.metrics.scoring import l2_normalize


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
    p_target: float = 0.01  # of min_dcf
    min_dcf: float = float("nan")  # normalised minDCF at p_target (a study's [objectives] p_target)
    # EER on the shared bootstrap replicates of the trial list (lsv_core.metrics.paired), when asked for:
    # what paired comparisons with other models scored on the same trials need.
    eer_boot: tuple[float, ...] | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict[str, float | int | bool]:
        out = asdict(self)
        if out["eer_boot"] is None:
            del out["eer_boot"]
        return out


@torch.no_grad()
def extract_embeddings(model: nn.Module, store: FeatureSource, utts: Sequence[str], *, batch_size: int = 32,
                       max_frames: int | None = None, progress: bool = False) -> dict[str, np.ndarray]:
    """Embeddings of ``utts`` from their full-length features, read from ``store`` batch by batch.

    Utterances are sorted by length and batched; a batch is cut to its shortest member, which loses at
    most a few frames per utterance (neighbours in the sorted order have nearly equal lengths) and makes
    CPU extraction several times faster than one utterance at a time. ``max_frames`` caps length. Only
    one batch of features is in memory at a time (any source: memory, the sharded store, or audio), so
    memory grows with the number of utterances times the embedding size, not with audio length.
    """
    from tqdm import tqdm

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    order = sorted(utts, key=store.num_frames)
    out: dict[str, np.ndarray] = {}
    for i in tqdm(range(0, len(order), batch_size), desc="embeddings", unit="batch", disable=not progress,
                  leave=False):
        chunk = order[i : i + batch_size]
        feats = [store[u] for u in chunk]
        n = min(len(f) for f in feats)
        if max_frames is not None:
            n = min(n, max_frames)
        x = torch.from_numpy(np.stack([np.asarray(f[:n], dtype=np.float32) for f in feats])).to(device)
        emb = model(x).float().cpu().numpy()
        out.update(zip(chunk, emb, strict=True))
        if (i // batch_size) % 8 == 7:
            _return_freed_memory()
    model.train(was_training)
    return out


def _glibc_trim() -> object | None:
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to do
        return None


_MALLOC_TRIM = _glibc_trim()


def _return_freed_memory() -> None:
    """Hand freed heap memory back to the OS (every 8 batches: a trim costs about 2 % of a batch). Every
    batch has its own length, so the activations of each are blocks of a new size, and glibc keeps the
    freed ones in its heap: without this, embedding 4,000 utterances of 3-5 s took 2.1 GB peak RSS
    (BENCHMARKS.md), with it about 0.5 GB."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


# Trials are scored this many at a time: memory stays bounded by the embeddings, not by the trial count.
_SCORE_CHUNK = 65536


def score(trials: Trials, emb: dict[str, np.ndarray], cohort: np.ndarray | None = None,
          top_k: int = 300) -> np.ndarray:
    """Cosine (or AS-norm) score of every trial, computed in chunks of trials."""
    names = list(emb)
    position = {u: k for k, u in enumerate(names)}
    matrix = l2_normalize(np.stack([emb[u] for u in names]).astype(np.float32))
    e_idx = np.fromiter((position[u] for u in trials.enroll), dtype=np.int64, count=len(trials))
    t_idx = np.fromiter((position[u] for u in trials.test), dtype=np.int64, count=len(trials))
    scores = np.empty(len(trials), dtype=np.float64)
    for a in range(0, len(trials), _SCORE_CHUNK):
        e, t = matrix[e_idx[a : a + _SCORE_CHUNK]], matrix[t_idx[a : a + _SCORE_CHUNK]]
        s = cosine_scores(e, t)
        scores[a : a + len(s)] = s if cohort is None else as_norm(s, e, t, cohort, top_k=top_k)
    return scores


def metrics_of(scores: np.ndarray, labels: np.ndarray, *, as_normed: bool = False, n_boot: int = 1000,
               seed: int = 0, p_target: float = 0.01) -> EvalResult:
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
        p_target=p_target,
        min_dcf=compute_min_dcf(scores, labels, p_target),
    )


def cohort_embeddings(model: nn.Module, store: FeatureSource, spk2utt: dict[str, list[str]],
                      max_frames: int = 300) -> np.ndarray:
    """One mean (length-normalised) embedding per cohort speaker, the usual AS-norm cohort."""
    utts = [u for us in spk2utt.values() for u in us]
    emb = extract_embeddings(model, store, utts, max_frames=max_frames)
    return np.stack([l2_normalize(np.stack([emb[u] for u in us])).mean(axis=0) for us in spk2utt.values()])


def evaluate(model: nn.Module, store: FeatureSource, trials: Trials, *, cohort: np.ndarray | None = None,
             n_boot: int = 1000, seed: int = 0, max_frames: int | None = None,
             paired_boot: tuple[int, int] | None = None, progress: bool = False, p_target: float = 0.01) -> EvalResult:
    """Score ``trials`` with ``model``; ``max_frames`` cuts every utterance (a cheaper, noisier estimate).

    ``paired_boot=(n, seed)`` also gives the EER on ``n`` shared bootstrap replicates (``eer_boot``), for
    paired comparisons with every other model scored on the same trials with the same ``(n, seed)``.
    ``min_dcf`` is at ``p_target`` (``min_dcf_001`` / ``min_dcf_005`` always at 0.01 / 0.05)."""
    emb = extract_embeddings(model, store, trials.utterances, max_frames=max_frames, progress=progress)
    scores = score(trials, emb, cohort)
    result = metrics_of(scores, trials.labels, as_normed=cohort is not None, n_boot=n_boot, seed=seed,
                        p_target=p_target)
    if paired_boot is None:
        return result
    from lsv_core.metrics.paired import bootstrap_eers

    boot = bootstrap_eers(scores, trials.labels, n_boot=paired_boot[0], seed=paired_boot[1])
    return replace(result, eer_boot=tuple(float(x) for x in boot))


def evaluate_dir(model: nn.Module, data_dir: str | Path, trials_file: str | Path, *,
                 cache_dir: str | Path | None = None, cohort_dir: str | Path | None = None,
                 n_boot: int = 1000, progress: bool = True, loading: DataLoading = DataLoading()) -> EvalResult:
    """Read data and trials (validated: every trial utterance must be in the data), then evaluate.
    ``loading`` says where features come from (:mod:`lsv_core.data.loader`)."""
    data = read_data(data_dir)
    trials = read_trials(trials_file, data)
    store, _ = open_features(data, trials.utterances, loading=loading, cache_dir=cache_dir, progress=progress,
                             role="eval")
    cohort = None
    if cohort_dir is not None:
        cdata = read_data(cohort_dir)
        cstore, _ = open_features(cdata, loading=loading, cache_dir=cache_dir, progress=progress, role="cohort")
        cohort = cohort_embeddings(model, cstore, cdata.spk2utt())
    return evaluate(model, store, trials, cohort=cohort, n_boot=n_boot, progress=progress)
