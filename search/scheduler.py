"""Stage-aware multi-objective early stopping for MSFT trials.

Optuna cannot prune multi-objective studies and ASHA/HyperBand rank one metric; this scheduler ranks the
two objectives together. After each MSFT stage a trial reports ``(stage, eer, size_bytes)``. It is
stopped when ``min_peers`` or more trials that reached the same stage dominate it by a margin: each has
``size <= size`` and ``eer + margin <= eer``. Sizes are exact and known up front; the EER margin (in
percent points) absorbs the noise of a partly fine-tuned network. The last stage is never cut (the
result is nearly paid for), and stopped trials are recorded as pruned, never as results.
"""

from __future__ import annotations

import math
from collections import defaultdict

from ray.tune.schedulers import FIFOScheduler, TrialScheduler

__all__ = ["StageParetoStopper", "dominated_by_margin"]


def dominated_by_margin(point: tuple[float, float], peers: list[tuple[float, float]], margin: float) -> int:
    """How many ``peers`` (eer, size) dominate ``point`` with an EER margin."""
    eer, size = point
    return sum(1 for pe, ps in peers if ps <= size and pe + margin <= eer)


class StageParetoStopper(FIFOScheduler):
    def __init__(self, margin: float = 1.0, min_peers: int = 3) -> None:
        super().__init__()
        self.margin = margin
        self.min_peers = min_peers
        self.seen: dict[int, dict[str, tuple[float, float]]] = defaultdict(dict)
        self.stopped: set[str] = set()

    def on_trial_result(self, tune_controller: object, trial: object, result: dict) -> str:
        if result.get("final") or "stage" not in result:
            return TrialScheduler.CONTINUE
        eer, size, stage = result.get("eer"), result.get("size_bytes"), int(result["stage"])
        if stage >= int(result.get("n_stages", math.inf)) - 1:
            return TrialScheduler.CONTINUE
        if eer is None or size is None or not math.isfinite(eer):
            return TrialScheduler.CONTINUE
        trial_id = str(getattr(trial, "trial_id", trial))
        peers = [p for tid, p in self.seen[stage].items() if tid != trial_id]
        self.seen[stage][trial_id] = (float(eer), float(size))
        if dominated_by_margin((float(eer), float(size)), peers, self.margin) >= self.min_peers:
            self.stopped.add(trial_id)
            return TrialScheduler.STOP
        return TrialScheduler.CONTINUE
