"""Trial scoring: cosine similarity of embeddings and adaptive symmetric score normalisation (AS-norm)."""

from __future__ import annotations

import numpy as np


def l2_normalize(emb: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(emb, axis=-1, keepdims=True)
    return emb / np.maximum(norms, 1e-12)


def cosine_scores(enroll: np.ndarray, test: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of two (n, d) arrays of embeddings."""
    return np.einsum("nd,nd->n", l2_normalize(enroll), l2_normalize(test))


def as_norm(scores: np.ndarray, enroll: np.ndarray, test: np.ndarray, cohort: np.ndarray,
            top_k: int = 300) -> np.ndarray:
    """Adaptive s-norm (Matejka et al., 2017): each side is normalised by the mean/std of its top-k
    cohort scores, and the two normalised scores are averaged.

    ``enroll``/``test`` are the (n, d) embeddings behind ``scores``; ``cohort`` is (m, d) embeddings of
    speakers disjoint from the trials (typically the training set, one mean embedding per speaker).
    """
    if cohort.ndim != 2 or cohort.shape[0] < 2:
        raise ValueError(f"cohort must be (m >= 2, d) embeddings, got shape {cohort.shape}")
    k = min(top_k, cohort.shape[0])
    c = l2_normalize(cohort)

    def stats(emb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        cs = l2_normalize(emb) @ c.T
        top = -np.partition(-cs, k - 1, axis=1)[:, :k]
        return top.mean(axis=1), top.std(axis=1) + 1e-8

    me, se = stats(enroll)
    mt, st = stats(test)
    return 0.5 * ((scores - me) / se + (scores - mt) / st)
