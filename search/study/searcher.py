"""A Ray Tune ``Searcher`` over an Optuna study in RDB storage, driven by ``ask``/``tell``.

Why not Ray's ``OptunaSearch``: it tells Optuna the *last* reported values of a trial, also for trials
stopped early, and cannot memoize or repair. Here only a trial's final values reach Optuna; a trial
stopped by the early stopper is told as PRUNED and a failed one as FAIL (with its reason), so the
sampler only ever learns from finished MSFT runs.

* Memoization: a suggestion whose canonical recipe (digest) already has a finished result is told that
  result at once (``memoized_from``) and a new suggestion is asked for; it is never trained twice.
* Size budget: a suggestion over budget is repaired toward it (:meth:`SearchSpace.repair`, biggest byte
  saving first) before it is trained; assignments over budget are never trained. The repaired recipe
  is what is told, trained and logged, and the trial's Optuna params are rewritten to it before anything
  is trained (:func:`record_ran_params`), so every sampler (TPE, NSGA-II, GP, probe) learns from the
  assignment that ran and ``space.recipe_from_params(trial.params)`` is the trial's recipe. The sampler's
  proposal is kept only where it differed: user attrs ``repaired`` and ``proposed`` (the changed params).
  Enqueued seeds go through the same path.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import optuna
from optuna.trial import TrialState
from ray.tune.search import Searcher

from lsv_core.quant import BitRecipe
from search.objectives import rounded, rounded_metrics
from search.results.system_attrs import EER_BOOT, set_trial_data, trial_boot
from search.results.tracking import TrialRecord
from search.space import SearchSpace

__all__ = ["AskTellSearcher", "record_from", "record_ran_params"]

RecordSink = Callable[[TrialRecord], None]
log = logging.getLogger(__name__)
_MAX_ASKS = 200


@dataclass
class _LiveTrial:
    trial: optuna.trial.Trial
    recipe: BitRecipe
    digest: str
    repaired: bool
    params: dict[str, str]  # the Optuna params that run (re-queued as they are if the driver stops)
    full_samples: int = 0  # fine-tuning samples of the full schedule (steps x batch): one full-trial equivalent
    stage_eers: dict[int, float] = field(default_factory=dict)  # per-stage EERs reported so far


def trial_cost(result: dict[str, Any], full_samples: int, state: str) -> dict[str, float]:
    """A trial's cost from its (last) result: samples, utterances, wall/CPU/GPU seconds as the worker
    measured them, and ``fte``: full-trial equivalents, the share of the schedule's fine-tuning samples it
    ran (a complete trial 1; one stopped early less; with no fine-tuning, complete trials count 1 and
    stopped ones their share of stages)."""
    cost = {k[5:]: float(v) for k, v in result.items() if k.startswith("cost_") and v is not None}
    samples = cost.get("finetune_samples", 0.0)
    if full_samples > 0:
        fte = min(1.0, samples / full_samples)
    elif state == "complete":
        fte = 1.0
    else:
        n_stages = int(result.get("n_stages") or 1)
        fte = min(1.0, (int(result.get("stage", -1)) + 1) / max(1, n_stages))
    cost["fte"] = fte
    return cost


def record_ran_params(study: optuna.Study, trial: optuna.trial.Trial, params: dict[str, str],
                      dists: dict[str, optuna.distributions.BaseDistribution]) -> None:
    """Rewrite the params of a RUNNING trial to ``params`` (the repaired assignment), in its storage.

    Optuna has no public call for this: ``RDBStorage.set_trial_param`` inserts a row and a param already
    set violates its (trial_id, param_name) unique key, so the rows are updated through Optuna's own
    models; ``InMemoryStorage.set_trial_param`` overwrites. ``_CachedStorage`` caches finished trials
    only, and the trial is still running, so every later read (samplers included) sees the new values.
    """
    from optuna.storages import InMemoryStorage, RDBStorage

    storage = study._storage
    backend = getattr(storage, "_backend", storage)
    changed = {k: v for k, v in params.items() if trial.params.get(k) != v}
    if isinstance(backend, RDBStorage):
        from optuna.storages._rdb import models
        from optuna.storages._rdb.storage import _create_scoped_session

        with _create_scoped_session(backend.scoped_session, True) as session:
            row = models.TrialModel.find_or_raise_by_id(trial._trial_id, session)
            backend.check_trial_is_updatable(trial._trial_id, row.state)
            for name, value in changed.items():
                param = models.TrialParamModel.find_or_raise_by_trial_and_param_name(row, name, session)
                param.param_value = dists[name].to_internal_repr(value)
    elif isinstance(backend, InMemoryStorage):
        for name, value in changed.items():
            backend.set_trial_param(trial._trial_id, name, dists[name].to_internal_repr(value), dists[name])
    else:
        raise TypeError(f"cannot rewrite trial params in a {type(backend).__name__}; use an RDB storage")


def _finished_results(study: optuna.Study) -> dict[str, tuple[int, list[float]]]:
    """digest -> (trial number, values) of every COMPLETE trial that was really trained."""
    out: dict[str, tuple[int, list[float]]] = {}
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        d = t.user_attrs.get("digest")
        if d and "memoized_from" not in t.user_attrs and t.values is not None:
            out.setdefault(d, (t.number, list(t.values)))
    return out


class AskTellSearcher(Searcher):
    def __init__(self, study: optuna.Study, space: SearchSpace, *, size_of: Callable[[BitRecipe], int],
                 budget_bytes: int | None, make_config: Callable[[BitRecipe, int], dict[str, Any]],
                 sink: RecordSink, objectives: tuple[str, ...] = ("eer", "size_bytes"),  # result keys (search.objectives)
                 max_trials: int | None = None,
                 on_progress: Callable[[str, int, dict[str, Any]], None] | None = None) -> None:
        super().__init__(metric=None, mode=None)
        self.study = study
        self.space = space
        self.size_of = size_of
        self.budget = budget_bytes
        self.make_config = make_config
        self.sink = sink
        self.objectives = objectives
        self.live: dict[str, _LiveTrial] = {}
        self.on_progress = on_progress
        # Set when the driver is stopping (SIGINT/SIGTERM): Tune then ends the trials it runs, and they are
        # re-queued, not told as stopped early.
        self.stopping: Any = None
        # The study's DriverLease (search.cluster.lease): once another driver took the study over, nothing more is
        # asked or told here (that driver has closed and re-queued this one's running trials).
        self.lease: Any = None
        self.memo = _finished_results(study)
        # Optuna trials this run may still create (trained, memoized or over budget alike); None = no limit.
        self.trials_left = max_trials

    # Ray Tune pickles its search algorithm for experiment restore. The Optuna study (in RDB storage) is
    # this searcher's whole state, and resuming goes through it, so nothing else needs to be saved.
    def __getstate__(self) -> dict[str, Any]:
        return {"_metric": None, "_mode": None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def save(self, checkpoint_path: str) -> None:
        return None

    def restore(self, checkpoint_path: str) -> None:
        return None

    def set_search_properties(self, metric: str | None, mode: str | None, config: dict, **spec: Any) -> bool:
        return True

    # -- suggestions ---------------------------------------------------------------------------------
    def suggest(self, trial_id: str) -> dict[str, Any] | None:
        dists = self.space.distributions()
        for _ in range(_MAX_ASKS):
            if self._displaced():
                return None  # Tune's stopper ends the run (search.cluster.ray_cluster)
            if self.trials_left is not None:
                if self.trials_left <= 0:
                    return Searcher.FINISHED
                self.trials_left -= 1
            ot = self.study.ask(dists)
            if self.lease is not None:
                ot.set_user_attr("driver", self.lease.holder)
            params = {k: ot.params[k] for k in dists}
            repaired = False
            if self.budget is not None:
                fixed = self.space.repair(params, self.budget, self.size_of)
                if fixed is None:
                    self._tell_failed(ot, params, "even the smallest choices exceed the size budget")
                    continue
                repaired = fixed != params
                if repaired:
                    record_ran_params(self.study, ot, fixed, dists)
                    ot.set_user_attr("repaired", True)
                    ot.set_user_attr("proposed", {k: v for k, v in params.items() if fixed[k] != v})
                params = fixed
            recipe = self.space.recipe_from_params(params)
            digest = recipe.digest()
            ot.set_user_attr("digest", digest)
            ot.set_user_attr("recipe", recipe.to_dict())
            if digest in self.memo:
                self._tell_memoized(ot, recipe, digest)
                continue
            if any(lt.digest == digest for lt in self.live.values()):
                # The same recipe is being trained right now: wait for its result instead of duplicating.
                ot.set_user_attr("reason", "duplicate of a running trial")
                self.study.tell(ot, state=TrialState.PRUNED)
                if self.trials_left is not None:
                    self.trials_left += 1  # not a trial of its own: ask again for free
                continue
            cfg = self.make_config(recipe, ot.number)
            schedule = cfg.get("schedule") or {}
            full = int(schedule.get("total_steps", 0)) * int(schedule.get("batch_size", 0))
            self.live[trial_id] = _LiveTrial(ot, recipe, digest, repaired, params, full)
            if self.on_progress is not None:
                self.on_progress(trial_id, ot.number, {"started": True})
            return cfg
        return None

    def abandon_live(self, reason: str) -> None:
        """The driver is stopping: close the trials still running as failed with ``reason`` and put their
        assignments back in the queue, so the next run trains them (nothing lost, nothing doubled)."""
        for live in list(self.live.values()):
            ot = live.trial
            try:
                ot.set_user_attr("reason", reason)
                self.study.tell(ot, state=TrialState.FAIL)
                self.study.enqueue_trial(dict(live.params), user_attrs={"retry_of": ot.number})
            except Exception as err:  # noqa: BLE001 - the next run's recovery re-queues it anyway
                log.warning("could not re-queue trial %d: %s", ot.number, err)
        self.live.clear()

    def _displaced(self) -> bool:
        """Whether another driver took the study over (this one's lease is lost)."""
        return self.lease is not None and not self.lease.holds()

    def _tell(self, ot: optuna.trial.Trial, values: list[float] | None = None,
              state: TrialState | None = None) -> bool:
        """``study.tell``, but a trial already finished elsewhere (another driver took over the study and
        closed it) is reported and skipped instead of crashing the driver; returns whether it was told."""
        if self._displaced():
            log.warning("trial %d is not told: another driver took the study over", ot.number)
            return False
        try:
            if values is not None:
                self.study.tell(ot, values)
            else:
                self.study.tell(ot, state=state)
            return True
        except (RuntimeError, ValueError) as err:
            if "finished" not in str(err) and "Cannot tell" not in str(err):
                raise
            log.warning("trial %d was already finished by another driver; its result here is dropped (%s)",
                        ot.number, err)
            return False

    def _tell_memoized(self, ot: optuna.trial.Trial, recipe: BitRecipe, digest: str) -> None:
        source, values = self.memo[digest]
        src = self.study.get_trials(deepcopy=False)[source]
        ot.set_user_attr("memoized_from", source)
        for k, v in src.user_attrs.items():
            if k not in ("digest", "recipe", "repaired", "proposed", "seed", "retry_of", "cost"):
                ot.set_user_attr(k, v)
        ot.set_user_attr("cost", {"fte": 0.0})  # answered from the stored result: nothing trained
        boot = trial_boot(src)
        if boot:
            set_trial_data(self.study, ot._trial_id, EER_BOOT, list(boot))
        if not self._tell(ot, values):
            return
        self.sink(self._record(ot.number, "complete", recipe, {**src.user_attrs, "eer_boot": boot,
                                                               "cost": {"fte": 0.0}}, memoized_from=source))

    def _tell_failed(self, ot: optuna.trial.Trial, params: dict[str, str], reason: str) -> None:
        ot.set_user_attr("reason", reason)
        if self._tell(ot, state=TrialState.FAIL):
            self.sink(TrialRecord(number=ot.number, state="failed", recipe={}, reason=reason))

    # -- results ---------------------------------------------------------------------------------------
    def on_trial_result(self, trial_id: str, result: dict) -> None:
        # Intermediate (per-stage) results are never told to Optuna (only final values are); they feed
        # the live progress view.
        live = self.live.get(trial_id)
        if live is not None and not result.get("final") and "stage" in result and result.get("eer") is not None:
            live.stage_eers[int(result["stage"])] = float(result["eer"])
        if live is not None and self.on_progress is not None:
            self.on_progress(trial_id, live.trial.number, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        live = self.live.pop(trial_id, None)
        if live is None:
            return
        ot, result = live.trial, result or {}
        if self.stopping is not None and self.stopping.is_set() and not result.get("final"):
            self.live[trial_id] = live  # abandon_live re-queues it
            return
        if self._displaced():  # the driver that took over re-queued it
            log.warning("trial %d is not told: another driver took the study over", ot.number)
            return
        if self.study._storage.get_trial(ot._trial_id).state != TrialState.RUNNING:
            log.warning("trial %d was finished by another driver meanwhile; this result is dropped", ot.number)
            return
        ray_id = {"ray_trial_id": trial_id}
        if error or result.get("error"):
            reason = result.get("error") or "the Ray worker failed (see the trial's error file under ray/)"
            cost = rounded_metrics(trial_cost(result, live.full_samples, "failed"))
            ot.set_user_attr("reason", reason)
            ot.set_user_attr("cost", cost)
            if not self._tell(ot, state=TrialState.FAIL):
                return
            self.sink(self._record(ot.number, "failed", live.recipe, {**ray_id, "reason": reason, "cost": cost}))
            return
        if not result.get("final"):
            reason = f"stopped after MSFT stage {result.get('stage')} (dominated at that stage)"
            cost = rounded_metrics(trial_cost(result, live.full_samples, "pruned"))
            # Every stage's EER, the stage plan and the size: a resumed run's early stopper compares with them
            stages = {**live.stage_eers, **({int(result["stage"]): result["eer"]} if "stage" in result else {})}
            stage_eers = [rounded("eer", stages.get(k)) for k in range(max(stages) + 1)] if stages else []
            pruned = {"reason": reason, "stage_eers": stage_eers, "cost": cost,
                      **{k: result[k] for k in ("stage_plan", "size_bytes") if k in result}}
            for k, v in pruned.items():
                ot.set_user_attr(k, v)
            if not self._tell(ot, state=TrialState.PRUNED):
                return
            self.sink(self._record(ot.number, "pruned", live.recipe, {**ray_id, **pruned}))
            return
        # Metrics rounded to what they mean; the bootstrap EERs are machine data (search.results.system_attrs).
        attrs = rounded_metrics({k: result[k] for k in (
            "eer", "eer_ci_low", "eer_ci_high", "min_dcf", "min_dcf_001", "size_bytes", "compression_ratio",
            "avg_bits", "stage_eers", "stage_plan", "trial_wall_s", "packed_path", "setup_s", "node_id")
            if k in result})
        attrs.update(ray_id)
        attrs["cost"] = rounded_metrics(trial_cost(result, live.full_samples, "complete"))
        for k, v in attrs.items():
            ot.set_user_attr(k, v)
        boot = rounded("eer", result.get("eer_boot")) or None
        if boot:
            set_trial_data(self.study, ot._trial_id, EER_BOOT, boot)
            attrs["eer_boot"] = boot
        values = [rounded(k, float(result[k])) for k in self.objectives]
        if not all(math.isfinite(v) for v in values):
            ot.set_user_attr("reason", f"non-finite objective values {values}")
            if not self._tell(ot, state=TrialState.FAIL):
                return
            self.sink(self._record(ot.number, "failed", live.recipe, {**attrs, "reason": "non-finite result"}))
            return
        if not self._tell(ot, values):
            return
        self.memo[live.digest] = (ot.number, values)
        self.sink(self._record(ot.number, "complete", live.recipe, attrs))

    def _record(self, number: int, state: str, recipe: BitRecipe, attrs: dict[str, Any],
                memoized_from: int | None = None) -> TrialRecord:
        return record_from(number, state, recipe, attrs, memoized_from)


def record_from(number: int, state: str, recipe: BitRecipe | dict[str, Any], attrs: dict[str, Any],
                memoized_from: int | None = None) -> TrialRecord:
    """The MLflow record of a trial, from the values the searcher keeps in Optuna user attrs."""
    recipe_dict = recipe.to_dict() if isinstance(recipe, BitRecipe) else dict(recipe)
    artifacts = {}
    if state == "complete" and memoized_from is None and attrs.get("packed_path"):
        artifacts["model.packed.safetensors"] = attrs["packed_path"]
    return TrialRecord(
        number=number, state=state, recipe=recipe_dict, reason=attrs.get("reason"),
        ray_trial_id=attrs.get("ray_trial_id"),
        config_hash=BitRecipe.from_mapping(recipe_dict).digest() if recipe_dict else None,
        avg_bits=attrs.get("avg_bits"), eer=attrs.get("eer"), eer_ci_low=attrs.get("eer_ci_low"),
        eer_ci_high=attrs.get("eer_ci_high"), min_dcf=attrs.get("min_dcf", attrs.get("min_dcf_001")),
        size_bytes=attrs.get("size_bytes"), compression_ratio=attrs.get("compression_ratio"),
        stage_eers=[e for e in (attrs.get("stage_eers") or []) if e is not None],
        wall_s=attrs.get("trial_wall_s"), memoized_from=memoized_from, artifacts=artifacts,
        cost={k: float(v) for k, v in (attrs.get("cost") or {}).items()},
        eer_boot=tuple(attrs["eer_boot"]) if attrs.get("eer_boot") else None,
    )
