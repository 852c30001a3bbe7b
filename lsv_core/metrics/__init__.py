"""Speaker-verification metrics. EER is in percent (0-100)."""

from lsv_core.metrics.eer import EerInterval, bootstrap_eer_ci, compute_eer, compute_min_dcf
from lsv_core.metrics.scoring import as_norm, cosine_scores, l2_normalize

__all__ = [
    "EerInterval",
    "as_norm",
    "bootstrap_eer_ci",
    "compute_eer",
    "compute_min_dcf",
    "cosine_scores",
    "l2_normalize",
]
