"""Running a study: validate, prepare the baseline, then Ray Tune trials steered by an Optuna study.

Everything lives under ``runs/<study>/``: ``optuna.db`` (the source of truth for trials and the study
record, :mod:`search.record`), ``mlflow.db`` and ``mlartifacts/`` (a parent run for the study, a child
run per trial), ``trials/`` (packed models), ``ray/`` (Ray Tune's trial folders) and ``study.json`` (a
copy of the record).

Resuming: running a study that exists continues it. Trials left RUNNING by a driver that died are
marked failed ("interrupted") and their assignments re-queued; finished trials missing from MLflow
(the driver died between Optuna's tell and the MLflow write) are logged then, so nothing is lost
and nothing is logged twice. ``fresh=True`` moves the old folder aside (never deletes it).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState
from rich.console import Console

from lsv_core.atomic import write_text_atomic
from lsv_core.errors import ConfigError
from lsv_core.quant import BitRecipe, LayerSpec
from search.config import StudyConfig
from search.record import StudyRecord, save_record, stored_record
from search.results import StudyStatus, refresh_pareto_tags, study_status
from search.space import SearchSpace
from search.storage import open_study
from search.tracking import StudyTracker, TrackingThread, TrialRecord

__all__ = ["RunResult", "run_study"]

console = Console(stderr=True)
OBJECTIVES = ("eer", "size_bytes")


# -- preparation (driver side, before any worker starts) --------------------------------------------------
def _prepare_inputs(config: StudyConfig, *, progress: bool = True) -> None:
    """Make sure the corpus and the baseline exist (synthesize/train them when the config allows)."""
    from lsv_core.data.manifest import read_data
    from lsv_core.data.trials import read_trials

    paths = config.data_paths()
    train, eval_dir, trials = paths.train, paths.eval, paths.trials
    corpus = config.data.corpus
    if config.data.train is None and corpus is not None and not (corpus / "corpus.json").exists():
        if not config.data.synthesize_if_missing:
            raise ConfigError(f"data.corpus={str(corpus)!r} has no corpus.json and synthesize_if_missing is false")
        from lsv_core.data.synth import SynthConfig, synthesize_corpus

        console.print(f"synthesizing the embedded corpus into {corpus} ...")
        synthesize_corpus(corpus, SynthConfig(seed=config.study.seed), progress=progress)
    eval_data = read_data(eval_dir)
    read_trials(trials, eval_data)  # validated before any worker starts
    read_data(train).check_audio()
    eval_data.check_audio()
    ckpt = config.model.checkpoint
    if not ckpt.exists():
        if not config.model.train_if_missing:
            raise ConfigError(f"model.checkpoint={str(ckpt)!r} does not exist and train_if_missing is false")
        from lsv_core.train import TrainConfig, train_baseline

        tc = TrainConfig(seed=config.study.seed, device=config.resources.device)
        if config.model.train_steps:
            tc.steps = config.model.train_steps
        console.print(f"training the default baseline into {ckpt} ...")
        train_baseline(tc, train, out=ckpt, eval_dir=eval_dir, trials=trials, cache_dir=config.data.cache_dir,
                       progress=progress)


def _load_baseline(config: StudyConfig) -> tuple[Any, dict[str, Any]]:
    """The float baseline (our checkpoint or a WeSpeaker .pt) and its metadata, on the CPU."""
    from lsv_core.models import load_checkpoint, load_pretrained

    ckpt = config.model.checkpoint
    if ckpt.suffix in (".pt", ".pth"):
        if config.model.arch is None:
            raise ConfigError(f"model.checkpoint={str(ckpt)!r} is a WeSpeaker state dict; set model.arch "
                              "(e.g. \"ResNet34\")")
        return load_pretrained(ckpt, config.model.arch, **config.model.arch_kwargs), {}
    return load_checkpoint(ckpt)


def _seed_recipes(config: StudyConfig, space: SearchSpace, model: Any, omega: dict | None) -> list[tuple[str, BitRecipe]]:
    """Uniform recipes at each choice and the sensitivity allocator's recipes at several budgets."""
    from lsv_core.quant import packed_size_bytes

    seeds: list[tuple[str, BitRecipe]] = []
    if config.seeds.uniform:
        seeds += [(f"uniform-{tok}", space.uniform(tok)) for tok in space.choices]
    if omega is not None and config.seeds.allocator_fractions:
        from lsv_core.quant.sensitivity import allocate_bits

        fp32 = packed_size_bytes(model, BitRecipe({}))
        specs = [LayerSpec.from_token(t) for t in space.choices]
        bits = tuple(sorted({s.bits for s in specs}))
        binary = [s.mode for s in specs if s.bits == 1]
        for frac in config.seeds.allocator_fractions:
            budget = int(frac * fp32)
            try:
                rec = allocate_bits(model, omega, budget, bit_choices=bits,
                                    binary_mode="adaptive" if "adaptive" in binary or not binary else binary[0])
            except ConfigError:
                continue
            # Project onto the search space's units (the allocator works per layer).
            params = {f"b:{u}": _closest_token(rec, layers, space) for u, layers in space.units.items()}
            seeds.append((f"allocator-{frac:g}", space.recipe_from_params(params)))
    return seeds


def _closest_token(recipe: BitRecipe, layers: list[str], space: SearchSpace) -> str:
    tokens = [recipe[n].token if n in recipe else space.choices[-1] for n in layers]
    # A unit takes the widest of its layers' allocations, so the seed is never less precise than planned.
    return max(tokens, key=space.choices.index)


# -- the run ---------------------------------------------------------------------------------------------
@dataclass
class RunResult:
    status: StudyStatus
    study_dir: Path
    wall_s: float
    resumed: bool


def run_study(config: StudyConfig, *, address: str | None = None, fresh: bool = False, progress: bool = True,
              fault_plan: dict[int, dict[str, Any]] | None = None,
              on_status: Callable[[StudyStatus], None] | None = None) -> RunResult:
    """Run (or resume) the study described by ``config``; returns its status when no trials remain.

    ``fault_plan`` maps Optuna trial numbers to injected faults; it exists for the fault tests only.
    """
    t0 = time.monotonic()
    study_dir = config.study_dir
    _prepare_inputs(config, progress=progress)
    model, meta = _load_baseline(config)
    space = SearchSpace.build(model, config.space)
    if fresh and study_dir.exists():
        backup = study_dir.with_name(f"{study_dir.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
        os.replace(study_dir, backup)
        console.print(f"--fresh: moved the previous study to {backup}")
    study_dir.mkdir(parents=True, exist_ok=True)
    study = open_study(config, create=True)
    record = stored_record(study)
    legacy = study_dir / "study.json"
    made_with = record.digest if record is not None else (
        json.loads(legacy.read_text()).get("digest") if legacy.exists() else None)
    if made_with is not None and made_with != config.digest():
        raise ConfigError(f"{study_dir} holds study {config.study.name!r} made with a different config "
                          f"(digest {made_with} != {config.digest()}); rerun with --fresh to start over "
                          "(the old study is moved aside, not deleted)")
    resumed = made_with is not None
    if record is None or record.layers is None:
        record = _new_record(config, model, meta)
        save_record(study, study_dir, record)

    tracker = StudyTracker(config.mlflow_uri, config.study.name, artifact_root=study_dir / "mlartifacts")
    baseline = {"baseline_size_bytes": float(record.fp32_bytes or 0)}
    if (record.baseline_eval or {}).get("eer") is not None:
        baseline["baseline_eer"] = float(record.baseline_eval["eer"])
    tracker.start_study(config.model_dump(mode="json"), config.digest(), baseline)
    _recover(study, tracker)
    needs_omega = config.msft.order == "sensitivity" or (
        "seeded" not in study.user_attrs and bool(config.seeds.allocator_fractions))
    omega = None
    if needs_omega:
        traces, omega = _baseline_sensitivity(config)
        if record.hessian_traces is None:
            record = record.with_traces(traces)
            save_record(study, study_dir, record)
    if "seeded" not in study.user_attrs:
        for label, recipe in _seed_recipes(config, space, model, omega):
            study.enqueue_trial(space.params_from_recipe(recipe), user_attrs={"seed": label})
        study.set_user_attr("seeded", True)
        study.set_user_attr("fp32_bytes", record.fp32_bytes)

    not_counted = ("interrupted (driver stopped)", "duplicate of a running trial")  # re-queued / asked again
    done = sum(1 for t in study.get_trials(deepcopy=False)
               if t.state.is_finished() and t.user_attrs.get("reason") not in not_counted)
    remaining = None if config.study.n_trials is None else max(0, config.study.n_trials - done)
    if remaining != 0:
        _run_ray(config, study, space, tracker, model, remaining, address, progress, fault_plan, on_status,
                 omega if config.msft.order == "sensitivity" else None)
    refresh_pareto_tags(tracker, study)
    status = study_status(study, config.size_budget_bytes)
    tracker.finish_study({"n_complete": status.n_complete, "n_failed": status.n_failed,
                          "n_pruned": status.n_pruned, "pareto_size": status.pareto_size})
    write_text_atomic(study_dir / "status.json", json.dumps(asdict(status), indent=2), overwrite=True)
    return RunResult(status, study_dir, time.monotonic() - t0, resumed)


def _new_record(config: StudyConfig, model: Any, meta: dict[str, Any]) -> StudyRecord:
    """The record of a study about to be created from ``config`` and its loaded baseline."""
    from lsv_core import __version__
    from lsv_core.quant import packed_size_bytes, quantizable_layers
    from lsv_core.quant.sensitivity import state_dict_digest

    return StudyRecord(name=config.study.name, digest=config.digest(), config=config.model_dump(mode="json"),
                       layers=quantizable_layers(model), baseline_digest=state_dict_digest(model),
                       fp32_bytes=packed_size_bytes(model, BitRecipe({})), baseline_eval=meta.get("eval") or None,
                       lsv_version=__version__)


def _baseline_sensitivity(config: StudyConfig) -> tuple[dict[str, float], dict[str, dict[int, float]]]:
    """Hessian traces of the baseline and Ω per (layer, bits), for the allocator and the sensitivity order."""
    from lsv_core.workbench import Workbench

    bench = Workbench.load(config.workbench_spec(), progress=False)
    # Cached beside the features: the traces depend on the baseline and its data, not on the study, so
    # every study (and every --fresh restart) of the same baseline reuses them.
    traces = bench.hessian_traces(cache_path=config.data.cache_dir / "hessian_traces.json", seed=config.study.seed)
    return traces, bench.sensitivities(traces=traces, seed=config.study.seed)


def _recover(study: optuna.Study, tracker: StudyTracker) -> None:
    """Close trials a dead driver left RUNNING (re-queue them) and log finished ones MLflow lacks."""
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        study._storage.set_trial_user_attr(t._trial_id, "reason", "interrupted (driver stopped)")
        study.tell(t.number, state=TrialState.FAIL)
        study.enqueue_trial(t.params, user_attrs={"retry_of": t.number})
    _log_missing(study, tracker)


def _log_missing(study: optuna.Study, tracker: StudyTracker) -> None:
    """Log the finished Optuna trials that have no MLflow run yet (Optuna is the source of truth)."""
    from search.searcher import record_from

    logged = tracker.logged_trials()
    state_names = {TrialState.COMPLETE: "complete", TrialState.PRUNED: "pruned", TrialState.FAIL: "failed"}
    for t in study.get_trials(deepcopy=False):
        if t.number in logged or t.state not in state_names:
            continue
        recipe = t.user_attrs.get("recipe", {})
        tracker.log_trial(record_from(t.number, state_names[t.state], recipe, dict(t.user_attrs),
                                      t.user_attrs.get("memoized_from")))


def _run_ray(config: StudyConfig, study: optuna.Study, space: SearchSpace, tracker: StudyTracker, model: Any,
             remaining: int | None, address: str | None, progress: bool,
             fault_plan: dict[int, dict[str, Any]] | None,
             on_status: Callable[[StudyStatus], None] | None, omega: dict | None = None) -> None:
    import ray
    from ray import tune

    from lsv_core.quant import packed_size_bytes
    from search.scheduler import StageParetoStopper
    from search.searcher import AskTellSearcher
    from search.trial import run_trial

    address = address or config.storage.ray_address or os.environ.get("RAY_ADDRESS")
    started_here = not ray.is_initialized()
    if started_here:
        if address:
            ray.init(address=address, log_to_driver=False)
        else:
            # "local" always starts a private instance: a bare ray.init() would join whatever cluster
            # `ray start` last left on this machine, which is not what "no address" means.
            cpus = max(int(config.resources.cpu * config.study.concurrency), os.cpu_count() or 1)
            ray.init(address="local", num_cpus=cpus, num_gpus=None, include_dashboard=False, log_to_driver=False)
    spec = config.workbench_spec().to_dict()
    schedule = config.msft_schedule().to_dict()
    threads = max(1, int(config.resources.cpu))

    def make_config(recipe: BitRecipe, number: int) -> dict[str, Any]:
        cfg = {"recipe": recipe.to_dict(), "optuna_trial": number, "workbench": spec, "schedule": schedule,
               "threads": threads, "trials_dir": str(config.study_dir / "trials")}
        if omega is not None:
            cfg["sensitivity"] = omega
        if fault_plan and number in fault_plan:
            cfg["fault"] = fault_plan[number]
        return cfg

    logged = [0]
    writer = TrackingThread()

    def sink(record: TrialRecord) -> None:
        writer.submit(tracker.log_trial, record)
        logged[0] += 1
        if logged[0] % 4 == 0:  # keep `tags.pareto_optimal = "true"` usable in the UI during the study
            writer.submit(refresh_pareto_tags, tracker, study)
        st = study_status(study, config.size_budget_bytes)
        if progress:
            console.print(st.line(), soft_wrap=True)
        if on_status is not None:
            on_status(st)

    searcher = AskTellSearcher(study, space, size_of=lambda r: packed_size_bytes(model, r),
                               budget_bytes=config.size_budget_bytes, make_config=make_config, sink=sink,
                               max_trials=remaining)
    scheduler = (StageParetoStopper(config.early_stop.margin, config.early_stop.min_peers)
                 if config.early_stop.enabled else None)
    trainable = tune.with_resources(run_trial, {"cpu": config.resources.cpu, "gpu": config.resources.gpu})
    tuner = tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(search_alg=searcher, scheduler=scheduler, num_samples=remaining or -1,
                                    max_concurrent_trials=config.study.concurrency, reuse_actors=True,
                                    time_budget_s=config.study.timeout_s),
        run_config=tune.RunConfig(name=f"ray-{time.strftime('%Y%m%d-%H%M%S')}",
                                  storage_path=str(config.study_dir / "ray"), verbose=0,
                                  failure_config=tune.FailureConfig(max_failures=config.resources.max_failures)),
    )
    try:
        tuner.fit()
    finally:
        failed = writer.close()
        if started_here:
            ray.shutdown()
    if failed:  # Optuna has every result: log what MLflow is missing now (a resumed run would too)
        console.print(f"[yellow]{len(failed)} MLflow call(s) failed during the study ({failed[0]}); retrying[/]")
        _log_missing(study, tracker)
