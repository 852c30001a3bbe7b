"""The Ray side of a study: connect, check every node, ship the shared inputs, run the trials with Tune.

* :func:`connect` joins the cluster at the given address (or starts a private local instance: a bare
  ``ray.init()`` would join whatever cluster ``ray start`` last left on this machine).
* :func:`preflight_nodes` runs :mod:`search.cluster.nodes` on every node; bad nodes stop the study (exit 2) or, with
  ``resources.bad_nodes = "skip"``, are left out of the trials' placement.
* :func:`shared_inputs` builds what every trial shares (baseline tensors, initial codebooks), shipped
  once through the object store; the packed models come back through the :mod:`artifact sink
  <search.cluster.artifacts>`; the data is read at the configured paths on each node. No shared filesystem.
* :func:`hessian_on_worker` computes the baseline's Hessian traces as a Ray task with one trial's
  resources (``resources.hessian = "worker"``) instead of on the driver.
* :func:`run_trials` drives Ray Tune with the study's Optuna searcher and early stopper; Tune stops every
  trial at its next step once the driver's lease is lost (another driver took the study over).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from rich.console import Console

from search.study.preflight import PreflightFailed, Problem

if TYPE_CHECKING:
    from lsv_core.models.baseline import Baseline
    from search.config import StudyConfig
    from search.space import SearchSpace
    from search.study.searcher import AskTellSearcher
    from search.study.trial import SharedInputs

__all__ = ["connect", "hessian_on_worker", "preflight_nodes", "run_trials", "shared_inputs"]

console = Console(stderr=True)


def connect(config: StudyConfig, address: str | None) -> bool:
    """Connect to Ray; returns whether this call started it (then the caller shuts it down)."""
    import ray

    if ray.is_initialized():
        return False
    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        cpus = max(int(config.resources.cpu * config.study.concurrency), os.cpu_count() or 1)
        ray.init(address="local", num_cpus=cpus, num_gpus=None, include_dashboard=False, log_to_driver=False)
    return True


def shared_inputs(config: StudyConfig, baseline: Baseline, space: SearchSpace, digest: str,
                  progress: bool = False) -> SharedInputs:
    """The baseline as tensors and its initial codebooks at every width the space can use, computed here
    once (also kept in ``runs/<study>/codebooks/`` on the driver)."""
    from lsv_core.quant import latent_weight, quantizable_layers
    from lsv_core.quant.initial_codebooks import InitialCodebooks
    from lsv_core.quant.recipe import LayerSpec
    from search.study.trial import SharedInputs

    schedule = config.msft_schedule()
    modules = dict(baseline.model.named_modules())
    codebooks = InitialCodebooks({n: latent_weight(modules[n]) for n in quantizable_layers(baseline.model)},
                                 directory=config.study_dir / "codebooks")
    specs = [LayerSpec.from_token(t) for t in space.choices] + [s for s in space.fixed.values() if s is not None]
    levels = {s.n_levels for s in specs if s.quantizer_class.clustered}
    codebooks.precompute(levels, seed=schedule.seed, max_iter=schedule.kmqat.kmeans_max_iter, progress=progress)
    return SharedInputs(baseline.weights(), codebooks.portable(), digest)


def preflight_nodes(config: StudyConfig, baseline_digest: str | None, baseline_ref: Any) -> list[str]:
    """Check every node (:mod:`search.cluster.nodes`; the baseline in ``baseline_ref`` must arrive with
    ``baseline_digest``); returns the node ids to leave out (``bad_nodes = "skip"``) or raises
    :class:`PreflightFailed` naming each bad node and why."""
    import lsv_core
    from search.cluster.nodes import NodeExpectations, check_nodes, code_digest

    paths = config.data_paths().resolved()
    expect = NodeExpectations(
        data={"data.train": str(paths.train), "data.eval": str(paths.eval), "data.trials": str(paths.trials)},
        listings=("data.train", "data.eval"), lsv_version=lsv_core.__version__, code_digest=code_digest(),
        baseline_digest=baseline_digest, need_cuda=config.resources.gpu > 0)
    reports = check_nodes(expect, baseline_ref)
    bad = [r for r in reports if not r.ok]
    for r in reports:
        console.print(f"preflight {r.describe()}", soft_wrap=True)
    if not bad:
        return []
    if config.resources.bad_nodes == "skip" and len(bad) < len(reports):
        console.print(f"[yellow]going on without {len(bad)} node(s) that failed the preflight "
                      "(resources.bad_nodes = \"skip\")[/]", soft_wrap=True)
        return [r.node_id for r in bad]
    hint = ("" if config.resources.bad_nodes == "skip" else
            "; fix them, stop them, or set resources.bad_nodes = \"skip\" to go on without them")
    raise PreflightFailed([Problem(f"node {r.hostname} ({r.address})", "; ".join(r.problems) + hint) for r in bad],
                          what="the trials")


def _one_trial_options(config: StudyConfig, excluded: list[str]) -> dict[str, Any]:
    """Ray task options: one trial's resources, on a node the preflight did not exclude, no retry."""
    options: dict[str, Any] = {"num_cpus": config.resources.cpu, "num_gpus": config.resources.gpu, "max_retries": 0}
    if excluded:
        from ray.util.scheduling_strategies import NodeLabelSchedulingStrategy, NotIn

        options["scheduling_strategy"] = NodeLabelSchedulingStrategy(hard={"ray.io/node-id": NotIn(*excluded)})
    return options


def hessian_on_worker(config: StudyConfig, shared_ref: Any, excluded: list[str]) -> dict[str, float]:
    """The baseline's Hessian traces, computed by a Ray task with one trial's resources on a worker node."""
    import ray

    from search.study.trial import hessian_task

    options = _one_trial_options(config, excluded)
    spec = config.workbench_spec().replace(codebook_dir=None).to_dict()
    task = ray.remote(hessian_task).options(**options)
    return ray.get(task.remote(spec, shared_ref, str(config.data.cache_dir.resolve() / "hessian_traces.json"),
                               config.study.seed))


def probe_on_worker(config: StudyConfig, shared_ref: Any, excluded: list[str], units: dict[str, list[str]],
                    choices: list[str]) -> dict[str, Any]:
    """The unit probes (:meth:`Workbench.probe`), measured by a Ray task with one trial's resources."""
    import ray

    from search.study.trial import probe_task

    options = _one_trial_options(config, excluded)
    spec = config.workbench_spec().replace(codebook_dir=None).to_dict()
    return ray.get(ray.remote(probe_task).options(**options).remote(spec, shared_ref, units, choices))


def run_trials(config: StudyConfig, searcher: AskTellSearcher, shared: SharedInputs, excluded: list[str],
               sink_name: str) -> None:
    """Run the trials ``searcher`` proposes with Ray Tune until it is finished (or the study's timeout)."""
    from ray import tune

    from search.cluster.nodes import node_selector
    from search.study.scheduler import LeaseStopper, StageParetoStopper, stage_history
    from search.study.trial import run_trial

    # A resumed study's stopper starts from the per-stage results its storage holds.
    scheduler = (StageParetoStopper(config.early_stop.margin, config.early_stop.min_peers,
                                    history=stage_history(searcher.study))
                 if config.early_stop.enabled else None)
    bundle = {"CPU": config.resources.cpu, "GPU": config.resources.gpu}
    resources: Any = {"cpu": config.resources.cpu, "gpu": config.resources.gpu}
    if excluded:
        resources = tune.PlacementGroupFactory([bundle], bundle_label_selector=node_selector(excluded))
    trainable = tune.with_resources(tune.with_parameters(run_trial, shared=shared), resources)
    remaining = searcher.trials_left
    stopper = LeaseStopper(searcher.lease)
    tuner = tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(search_alg=searcher, scheduler=scheduler, num_samples=remaining or -1,
                                    max_concurrent_trials=config.study.concurrency, reuse_actors=True,
                                    time_budget_s=config.study.timeout_s),
        run_config=tune.RunConfig(name=f"ray-{time.strftime('%Y%m%d-%H%M%S')}-{sink_name[-8:]}",
                                  storage_path=config.storage.ray_storage or str(config.study_dir / "ray"),
                                  verbose=0, stop=stopper,
                                  failure_config=tune.FailureConfig(max_failures=config.resources.max_failures)),
    )
    tuner.fit()


PAIRED_N_BOOT = 200  # shared bootstrap replicates per trial (lsv_core.metrics.paired)
TRIAL_N_BOOT = 200  # replicates of each trial's own EER interval


def paired_boot(config: StudyConfig) -> tuple[int, int]:
    """The study's shared replicates: every trial, the control and verifications are scored on them."""
    return PAIRED_N_BOOT, config.data.subset_seed


def submit_recipe(config: StudyConfig, shared_ref: Any, recipe: dict[str, Any], *, seed: int | None = None,
                  steps_mult: float = 1.0, excluded: list[str] | None = None, omega: dict | None = None) -> Any:
    """Start :func:`search.study.trial.recipe_task` on the cluster with one trial's resources; returns its ref."""
    import dataclasses

    import ray

    from search.study.trial import recipe_task

    schedule = config.msft_schedule()
    schedule = dataclasses.replace(schedule, seed=schedule.seed if seed is None else seed,
                                   total_steps=int(round(schedule.total_steps * steps_mult)))
    options: dict[str, Any] = {"num_cpus": config.resources.cpu, "num_gpus": config.resources.gpu, "max_retries": 1}
    if excluded:
        from ray.util.scheduling_strategies import NodeLabelSchedulingStrategy, NotIn

        options["scheduling_strategy"] = NodeLabelSchedulingStrategy(hard={"ray.io/node-id": NotIn(*excluded)})
    spec = config.workbench_spec().replace(codebook_dir=None).to_dict()
    return ray.remote(recipe_task).options(**options).remote(
        spec, shared_ref, recipe, schedule.to_dict(), TRIAL_N_BOOT, paired_boot(config), max(1, int(config.resources.cpu)),
        omega)


def make_trial_config(config: StudyConfig, sink_name: str, omega: dict | None,
                      fault_plan: dict[int, dict[str, Any]] | None) -> Callable[[Any, int], dict[str, Any]]:
    """The per-trial Tune config: recipe, workbench spec, schedule, threads, sink (and test faults)."""
    spec = config.workbench_spec().replace(codebook_dir=None).to_dict()
    schedule = config.msft_schedule().to_dict()
    threads = max(1, int(config.resources.cpu))

    def make(recipe: Any, number: int) -> dict[str, Any]:
        cfg = {"recipe": recipe.to_dict(), "optuna_trial": number, "workbench": spec, "schedule": schedule,
               "threads": threads, "gpu": config.resources.gpu, "artifact_sink": sink_name,
               "trials_dir": str(config.study_dir / "trials"), "paired_boot": list(paired_boot(config))}
        if omega is not None:
            cfg["sensitivity"] = omega
        if fault_plan and number in fault_plan:
            cfg["fault"] = fault_plan[number]
        return cfg

    return make
