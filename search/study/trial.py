"""The trial: what a Ray worker runs for one bit assignment.

Nothing a trial reads or writes needs a filesystem shared with the driver: the baseline (network, AAM
head) and its initial k-means codebooks per (layer, bits) arrive through Ray's object store
(:class:`SharedInputs`, via ``tune.with_parameters``); the data is read at the configured paths on the
worker's own node; the packed model goes back to the driver's study folder through the study's
:mod:`artifact sink <search.cluster.artifacts>`. A worker keeps its :class:`~lsv_core.workbench.Workbench` in a
process-level cache, so with Ray Tune's actor reuse the data is loaded once per worker, not once per
trial. A trial runs on the GPU Ray assigned it (``ray.get_gpu_ids()``), and on the CPU when it was
given none, whatever the node has (:func:`trial_device`).

Each MSFT stage is reported (for the stage-aware early stopper); the last report carries ``final=True``
and the trial's metrics. Errors inside the trial (a diverging loss, a bad recipe) are
reported as a final result with ``error`` set, so they are recorded as failed without Ray retrying a
deterministic failure; a worker process that dies is retried by Ray (``FailureConfig``).
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lsv_core.models.baseline import Baseline, BaselineWeights
from lsv_core.quant import BitRecipe
from lsv_core.quant.initial_codebooks import InitialCodebooks
from lsv_core.quant.msft import MsftSchedule, StageMetrics, plan_stages
from lsv_core.workbench import Workbench, WorkbenchSpec

__all__ = ["SharedInputs", "hessian_task", "layer_sensitivity", "placement", "ray_trial_device", "recipe_task",
           "run_trial", "trial_device"]

_WORKBENCHES: dict[str, Workbench] = {}


@dataclass
class SharedInputs:
    """What every trial of a study shares, shipped once through the object store: the baseline as
    tensors, its initial codebooks (computed on the driver) and its state-dict digest."""

    baseline: BaselineWeights
    codebooks: InitialCodebooks
    digest: str


def trial_device(requested: str, gpu_ids: list[Any], visible: str | None = None) -> str:
    """The device of a trial, from the GPU ids Ray assigned it (``ray.get_gpu_ids()``), never from the config.

    With no GPU assigned the trial runs on the CPU, even on a GPU node (Ray does not hide the node's GPUs
    from a task that asked for none); ``requested = "cuda"`` then is an error. With GPUs assigned (and
    ``requested`` not ``"cpu"``) it is the first of them as this process numbers it: Ray sets
    ``CUDA_VISIBLE_DEVICES`` (``visible``) to the assigned ids, so the trial's GPU is ``cuda:<its position
    in that list>`` (``cuda:0`` in a plain Ray setup); where Ray leaves the variable unset, it is
    ``cuda:<id>``. Two trials at ``resources.gpu = 0.5`` get the same id, each its half of that GPU."""
    if requested == "cpu" or not gpu_ids:
        if requested.startswith("cuda"):
            raise RuntimeError(f"device={requested!r} but Ray assigned this trial no GPU (resources.gpu = 0?)")
        return "cpu"
    first = str(gpu_ids[0])
    order = [d.strip() for d in visible.split(",")] if visible else []
    if first in order:
        return f"cuda:{order.index(first)}"
    if visible:
        raise RuntimeError(f"Ray assigned GPU {first} but CUDA_VISIBLE_DEVICES={visible!r} does not list it")
    return f"cuda:{first}"


def ray_trial_device(requested: str) -> str:
    """:func:`trial_device` inside a Ray task or Tune trial (the CPU outside Ray)."""
    import ray

    gpu_ids = ray.get_gpu_ids() if ray.is_initialized() else []
    return trial_device(requested, gpu_ids, os.environ.get("CUDA_VISIBLE_DEVICES"))


def placement() -> dict[str, Any]:
    """Where this Ray task runs, as Ray decided it: the GPU ids it assigned and ``CUDA_VISIBLE_DEVICES``."""
    import ray

    return {"gpu_ids": [str(i) for i in (ray.get_gpu_ids() if ray.is_initialized() else [])],
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"), "node_id": _node_id()}


def _workbench_for(spec: dict[str, Any], shared: SharedInputs | None) -> Workbench:
    """The worker's workbench for ``spec`` (:meth:`WorkbenchSpec.to_dict`; loaded on first use, then
    reused by later trials), built from ``shared`` when given instead of the checkpoint file."""
    key = json.dumps(spec, sort_keys=True) + (shared.digest if shared is not None else "")
    if key not in _WORKBENCHES:
        _WORKBENCHES.clear()  # one study per worker at a time; free the previous one's memory
        if shared is None:
            _WORKBENCHES[key] = Workbench.load(WorkbenchSpec.from_dict(spec), progress=False)
        else:
            _WORKBENCHES[key] = Workbench.load(WorkbenchSpec.from_dict(spec), progress=False,
                                               baseline=Baseline.from_weights(shared.baseline),
                                               codebooks=shared.codebooks)
    return _WORKBENCHES[key]


def recipe_task(spec: dict[str, Any], shared: SharedInputs, recipe: dict[str, Any], schedule: dict[str, Any],
                n_boot: int, paired_boot: tuple[int, int], threads: int = 1,
                omega: dict[str, dict[Any, float]] | None = None) -> dict[str, Any]:
    """Ray task: one recipe at one schedule, scored like a trial (the study's fp32 control is the empty
    recipe; ``lsv verify`` re-runs front recipes with other seeds and longer fine-tunes)."""
    torch.set_num_threads(max(1, threads))
    meter = _CostMeter()
    spec = {**spec, "device": ray_trial_device(spec.get("device", "auto"))}
    bench = _workbench_for(spec, shared)
    sched = MsftSchedule.from_dict(schedule)
    rec = BitRecipe.from_mapping(recipe)
    outcome = bench.run(rec, sched, n_boot=n_boot, paired_boot=tuple(paired_boot),
                        sensitivity=layer_sensitivity(omega, rec))
    meter.add(sum(s.steps for s in outcome.stages) * sched.batch_size, len(bench.trials.utterances))
    return {"eer": outcome.eer, "eer_ci_low": outcome.eer_ci_low, "eer_ci_high": outcome.eer_ci_high,
            "min_dcf_001": outcome.min_dcf_001, "min_dcf": outcome.min_dcf, "eer_boot": list(outcome.eer_boot or ()),
            "size_bytes": outcome.size_bytes, "n_trials": len(bench.trials), "seed": sched.seed,
            "total_steps": sched.total_steps, "node_id": _node_id(), **meter.report()}


def hessian_task(spec: dict[str, Any], shared: SharedInputs, cache_path: str, seed: int) -> dict[str, float]:
    """Ray task: the baseline's Hessian traces on a worker (``resources.hessian = "worker"``)."""
    spec = {**spec, "device": ray_trial_device(spec.get("device", "auto"))}
    return _workbench_for(spec, shared).hessian_traces(cache_path=cache_path, seed=seed)


def probe_task(spec: dict[str, Any], shared: SharedInputs, units: dict[str, list[str]],
               choices: list[str]) -> dict[str, Any]:
    """Ray task: the unit probes on a worker (``resources.hessian = "worker"``); a ProbeResult dict."""
    spec = {**spec, "device": ray_trial_device(spec.get("device", "auto"))}
    return _workbench_for(spec, shared).probe(units, choices).to_dict()


def layer_sensitivity(omega: dict[str, dict[Any, float]] | None, recipe: BitRecipe) -> dict[str, float] | None:
    """Per-layer sensitivity at the recipe's bits, Ω_l(b_l), for the MSFT "sensitivity" order."""
    if omega is None:
        return None
    return {name: float({int(b): v for b, v in omega[name].items()}[recipe[name].bits])
            for name in recipe if name in omega}


def run_trial(config: dict[str, Any], shared: SharedInputs | None = None) -> None:
    """Ray Tune function trainable. ``config``: recipe, workbench spec, schedule, threads, artifact sink,
    fault hooks; ``shared``: the study's :class:`SharedInputs` (``tune.with_parameters``)."""
    from ray import tune

    from search.study.scheduler import stage_plan_key

    t0 = time.monotonic()
    meter = _CostMeter()
    torch.set_num_threads(max(1, int(config.get("threads", 1))))
    recipe = BitRecipe.from_mapping(config["recipe"])
    # Test hooks: {"kind": "raise" | "nan" | "kill", "once_file": path} inject a failure at stage 0;
    # {"kind": "placement", "hold_s": s} reports where Ray placed the trial and the device it chose, holds
    # for hold_s (so concurrent trials overlap), and ends before anything moves to that device (GPU
    # placement is tested on Ray nodes with declared GPUs and no CUDA).
    fault = config.get("fault")
    try:
        spec = dict(config["workbench"])
        spec["device"] = ray_trial_device(spec.get("device", "auto"))
        if fault and fault.get("kind") == "placement":
            t_start = time.time()
            time.sleep(float(fault.get("hold_s", 0)))
            tune.report({"final": True, "device": spec["device"], **placement(), "t_start": t_start,
                         "t_end": time.time(), "optuna_trial": config["optuna_trial"]})
            return
        bench = _workbench_for(spec, shared)
        setup_s = time.monotonic() - t0
        size = bench.size_of(recipe)
        schedule = MsftSchedule.from_dict(config["schedule"])
        sensitivity = layer_sensitivity(config.get("sensitivity"), recipe)
        groups = plan_stages(bench.model, recipe, schedule.order, schedule.n_groups, sensitivity)
        n_stages = len(groups)
        plan = stage_plan_key(schedule.order, [[recipe[n].bits for n in g] for g in groups])
        meter.gpu_share = float(config.get("gpu", 0)) if spec["device"].startswith("cuda") else 0.0
        n_eval = len(bench.trials.utterances)

        def on_stage(stage: int, m: StageMetrics) -> bool:
            _inject_fault(fault, stage)
            meter.add(m.steps * schedule.batch_size, n_eval if m.eer is not None else 0)
            tune.report({"stage": stage, "eer": m.eer if m.eer is not None else math.nan,
                         "size_bytes": size, "n_stages": n_stages, "stage_plan": plan, "final": False,
                         "optuna_trial": config["optuna_trial"], **meter.report()})
            return False

        paired = config.get("paired_boot")
        outcome = bench.run(recipe, schedule, callback=on_stage, sensitivity=sensitivity,
                            n_boot=int(config.get("n_boot", 200)), paired_boot=tuple(paired) if paired else None)
        if not math.isfinite(outcome.eer):
            raise FloatingPointError(f"EER is {outcome.eer}")
        packed = _keep_packed(outcome.model, config, outcome.eer)
        summary = outcome.summary()
        tune.report({
            **{k: summary[k] for k in ("eer", "eer_ci_low", "eer_ci_high", "min_dcf_001", "min_dcf", "size_bytes",
                                       "compression_ratio", "avg_bits")},
            "stage": len(outcome.stages) - 1, "stage_eers": [s.eer for s in outcome.stages], "stage_plan": plan,
            "final": True, "packed_path": str(packed), "setup_s": setup_s,
            "trial_wall_s": time.monotonic() - t0, "optuna_trial": config["optuna_trial"],
            "node_id": _node_id(), "device": spec["device"],
            **({"eer_boot": list(outcome.eer_boot)} if outcome.eer_boot is not None else {}),
            **meter.report(),
        })
    except Exception as exc:  # recorded as a failed trial with its reason; the study goes on
        # A failure in a Ray call (e.g. the driver's disk full while the sink writes) arrives wrapped in a
        # RayTaskError whose text starts with a remote traceback: report the exception itself.
        cause = getattr(exc, "cause", None) or exc
        tune.report({"final": True, "error": f"{type(cause).__name__}: {cause}"[:500],
                     "optuna_trial": config["optuna_trial"], "trial_wall_s": time.monotonic() - t0,
                     **meter.report()})


class _CostMeter:
    """What a trial has cost so far: fine-tuning samples, evaluated utterances, wall, CPU and GPU seconds.

    Reported with every stage, so a trial stopped early still tells what it spent (the driver turns the
    samples into full-trial equivalents, :func:`search.results.reading.trial_fte`)."""

    def __init__(self) -> None:
        self.wall0, self.cpu0 = time.monotonic(), time.process_time()
        self.samples = 0
        self.eval_utts = 0
        self.gpu_share = 0.0

    def add(self, samples: int, eval_utts: int) -> None:
        self.samples += samples
        self.eval_utts += eval_utts

    def report(self) -> dict[str, float]:
        wall = time.monotonic() - self.wall0
        return {"cost_finetune_samples": float(self.samples), "cost_eval_utterances": float(self.eval_utts),
                "cost_wall_s": wall, "cost_cpu_s": time.process_time() - self.cpu0,
                "cost_gpu_s": wall * self.gpu_share}


def _keep_packed(model: Any, config: dict[str, Any], eer: float) -> str:
    """Write the trial's packed model under ``runs/<study>/trials/<number>/`` on the driver (through the
    artifact sink when the study has one, else directly); returns the driver-side path."""
    import tempfile

    from lsv_core.export.packed import save_packed

    rel = f"{config['optuna_trial']:05d}/model.packed.safetensors"
    meta = {"optuna_trial": config["optuna_trial"], "eer": eer}
    sink = config.get("artifact_sink")
    if sink is None:
        target = Path(config["trials_dir"]) / rel
        save_packed(model, target, overwrite=True, metadata=meta)
        return str(target)
    from search.cluster.artifacts import store_artifact

    with tempfile.TemporaryDirectory(prefix="lsv-trial-") as tmp:
        local = save_packed(model, Path(tmp) / "model.packed.safetensors", metadata=meta)
        return store_artifact(sink, f"trials/{rel}", local.read_bytes())


def _inject_fault(fault: dict[str, Any] | None, stage: int) -> None:
    """Failure injection for the fault tests (never set by a study config)."""
    if not fault or stage != 0:
        return
    once = fault.get("once_file")
    if once is not None:
        if Path(once).exists():
            return
        Path(once).write_text("fired")
    if fault["kind"] == "raise":
        raise RuntimeError("injected failure")
    if fault["kind"] == "nan":
        raise FloatingPointError("loss is nan (injected)")
    if fault["kind"] == "kill":
        os._exit(1)  # the worker process dies mid-trial, as an OOM kill would


def _node_id() -> str:
    import ray

    try:
        return ray.get_runtime_context().get_node_id()
    except Exception:  # not inside Ray (direct calls in tests)
        return "local"
