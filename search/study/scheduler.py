"""What stops trials early: stage-aware multi-objective early stopping for MSFT trials, and the stopper that
ends the whole run when the driver lost its lease.

Optuna cannot prune multi-objective studies and ASHA/HyperBand rank one metric; :class:`StageParetoStopper`
ranks the two objectives together. After each MSFT stage a trial reports ``(stage, eer, size_bytes)`` and
its stage plan (:func:`stage_plan_key`). It is stopped when ``min_peers`` or more trials **with the same
stage plan** that reached the same stage dominate it by a margin: each has ``size <= size`` and
``eer + margin <= eer``. Sizes are exact and known up front; the EER margin (in percent points) absorbs
the noise of a partly fine-tuned network. The last stage is never cut (the result is nearly paid for), and
stopped trials are recorded as pruned, never as results.

Like with like: the EER after stage k is that of a network with only the first k+1 layer groups quantized
and ``(k+1)/n`` of the fine-tuning done, so "stage k" of two trials means the same thing only when their
plans agree. Under ``msft.order = "bits"`` (one stage per bit width in the recipe) a plan is its sequence
of widths: stage 0 of a 2/4/8-bit recipe (its 2-bit layers quantized, a third of the fine-tuning done) is
compared with stage 0 of other 2/4/8-bit recipes, never with stage 0 of a 4/8-bit recipe (its 4-bit
layers quantized, half of the fine-tuning done). Under the other orders the groups split the layers by
count, so a plan is the order and its number of stages.

Resuming: the stopper's history is rebuilt from the study's storage (:func:`stage_history`): each pruned
or complete trial keeps its per-stage EERs (``stage_eers``), its stage plan (``stage_plan``) and size.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ray.tune import Stopper
from ray.tune.schedulers import FIFOScheduler, TrialScheduler

if TYPE_CHECKING:
    import optuna

__all__ = ["LeaseStopper", "StageParetoStopper", "dominated_by_margin", "stage_history", "stage_plan_key"]

Point = tuple[float, float]  # (eer in percent, size in bytes)
History = dict[tuple[str, int], dict[str, Point]]  # (stage plan, stage) -> trial key -> point


def dominated_by_margin(point: tuple[float, float], peers: list[tuple[float, float]], margin: float) -> int:
    """How many ``peers`` (eer, size) dominate ``point`` with an EER margin."""
    eer, size = point
    return sum(1 for pe, ps in peers if ps <= size and pe + margin <= eer)


def stage_plan_key(order: str, stage_bits: Sequence[Sequence[int]]) -> str:
    """The comparable identity of a trial's stage plan (see the module docstring): ``"bits:2-4-8"`` under
    the "bits" order (``stage_bits``: the bit widths of each stage's layers), else ``"<order>:<n stages>"``."""
    if order == "bits":
        return "bits:" + "-".join(str(max(bits)) for bits in stage_bits)
    return f"{order}:{len(stage_bits)}"


def stage_history(study: optuna.Study) -> History:
    """Per-stage results of the study's pruned and complete trials (memoized ones aside: they copy another
    trial's), keyed like :class:`StageParetoStopper`'s history, for a resumed run's stopper."""
    from optuna.trial import TrialState

    history: History = defaultdict(dict)
    for t in study.get_trials(deepcopy=False, states=(TrialState.PRUNED, TrialState.COMPLETE)):
        attrs = t.user_attrs
        plan, eers, size = attrs.get("stage_plan"), attrs.get("stage_eers"), attrs.get("size_bytes")
        if "memoized_from" in attrs or not isinstance(plan, str) or not isinstance(eers, list) or size is None:
            continue
        for stage, eer in enumerate(eers):
            if isinstance(eer, (int, float)) and math.isfinite(eer):
                history[(plan, stage)][f"optuna-{t.number}"] = (float(eer), float(size))
    return history


class StageParetoStopper(FIFOScheduler):
    """The stage-aware early stopper (module docstring); ``history`` seeds it with a resumed study's results."""

    def __init__(self, margin: float = 1.0, min_peers: int = 3, history: History | None = None) -> None:
        super().__init__()
        self.margin = margin
        self.min_peers = min_peers
        self.seen: History = defaultdict(dict)
        for key, points in (history or {}).items():
            self.seen[key].update(points)
        self.stopped: set[str] = set()

    def on_trial_result(self, tune_controller: object, trial: object, result: dict) -> str:
        if result.get("final") or "stage" not in result:
            return TrialScheduler.CONTINUE
        eer, size, stage = result.get("eer"), result.get("size_bytes"), int(result["stage"])
        if stage >= int(result.get("n_stages", math.inf)) - 1:
            return TrialScheduler.CONTINUE
        if eer is None or size is None or not math.isfinite(eer):
            return TrialScheduler.CONTINUE
        key = (str(result.get("stage_plan", "")), stage)
        trial_id = f"optuna-{result['optuna_trial']}" if "optuna_trial" in result else str(
            getattr(trial, "trial_id", trial))
        peers = [p for tid, p in self.seen[key].items() if tid != trial_id]
        self.seen[key][trial_id] = (float(eer), float(size))
        if dominated_by_margin((float(eer), float(size)), peers, self.margin) >= self.min_peers:
            self.stopped.add(trial_id)
            return TrialScheduler.STOP
        return TrialScheduler.CONTINUE


class LeaseStopper(Stopper):
    """Tune's stopper: ends the whole run (every trial stopped, nothing more suggested) once the driver's
    lease (:class:`search.cluster.lease.DriverLease`) is lost. Tune asks ``stop_all`` at every step of its loop
    (about every 0.1 s); the lease reads the storage at most every ``recheck_s``."""

    def __init__(self, lease: Any) -> None:
        self.lease = lease

    def __call__(self, trial_id: str, result: dict[str, Any]) -> bool:
        return False

    def stop_all(self) -> bool:
        return self.lease is not None and not self.lease.holds()

    def __reduce__(self) -> tuple[Any, ...]:  # Tune may pickle its stopper with the experiment state
        return (LeaseStopper, (None,))
