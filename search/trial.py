"""The trial: what a Ray worker runs for one bit assignment.

Nothing a trial reads or writes needs a filesystem shared with the driver: the baseline (network, AAM
head) and its initial k-means codebooks per (layer, bits) arrive through Ray's object store
(:class:`SharedInputs`, via ``tune.with_parameters``); the data is read at the configured paths on the
worker's own node; the packed model goes back to the driver's study folder through the study's
:mod:`artifact sink <search.artifacts>`. A worker keeps its :class:`~lsv_core.workbench.Workbench` in a
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

__all__ = ["SharedInputs", "hessian_task", "layer_sensitivity", "run_trial", "trial_device"]

_WORKBENCHES: dict[str, Workbench] = {}


@dataclass
class SharedInputs:
    """What every trial of a study shares, shipped once through the object store: the baseline as
    tensors, its initial codebooks (computed on the driver) and its state-dict digest."""

    baseline: BaselineWeights
    codebooks: InitialCodebooks
    digest: str


def trial_device(requested: str, gpu_ids: list[Any]) -> str:
    """The device of a trial: ``"auto"`` is the GPU Ray assigned (``cuda:0``: Ray sets CUDA_VISIBLE_DEVICES to
    it), else the CPU; with no GPU assigned a trial never takes one, even on a GPU node (Ray does not hide
    the node's GPUs from a task that asked for none)."""
    if requested == "cpu" or not gpu_ids:
        if requested.startswith("cuda"):
            raise RuntimeError(f"device={requested!r} but Ray assigned this trial no GPU (resources.gpu = 0?)")
        return "cpu"
    return "cuda:0" if requested in ("auto", "cuda") else requested


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


def hessian_task(spec: dict[str, Any], shared: SharedInputs, cache_path: str, seed: int) -> dict[str, float]:
    """Ray task: the baseline's Hessian traces on a worker (``resources.hessian = "worker"``)."""
    import ray

    spec = {**spec, "device": trial_device(spec.get("device", "auto"), ray.get_gpu_ids())}
    return _workbench_for(spec, shared).hessian_traces(cache_path=cache_path, seed=seed)


def layer_sensitivity(omega: dict[str, dict[Any, float]] | None, recipe: BitRecipe) -> dict[str, float] | None:
    """Per-layer sensitivity at the recipe's bits, Ω_l(b_l), for the MSFT "sensitivity" order."""
    if omega is None:
        return None
    return {name: float({int(b): v for b, v in omega[name].items()}[recipe[name].bits])
            for name in recipe if name in omega}


def run_trial(config: dict[str, Any], shared: SharedInputs | None = None) -> None:
    """Ray Tune function trainable. ``config``: recipe, workbench spec, schedule, threads, artifact sink,
    fault hooks; ``shared``: the study's :class:`SharedInputs` (``tune.with_parameters``)."""
    import ray
    from ray import tune

    t0 = time.monotonic()
    torch.set_num_threads(max(1, int(config.get("threads", 1))))
    recipe = BitRecipe.from_mapping(config["recipe"])
    fault = config.get("fault")  # test hook: {"kind": "raise" | "nan" | "kill", "once_file": path}
    try:
        spec = dict(config["workbench"])
        gpu_ids = ray.get_gpu_ids() if ray.is_initialized() else []
        spec["device"] = trial_device(spec.get("device", "auto"), gpu_ids)
        bench = _workbench_for(spec, shared)
        setup_s = time.monotonic() - t0
        size = bench.size_of(recipe)
        schedule = MsftSchedule.from_dict(config["schedule"])
        sensitivity = layer_sensitivity(config.get("sensitivity"), recipe)
        n_stages = len(plan_stages(bench.model, recipe, schedule.order, schedule.n_groups, sensitivity))

        def on_stage(stage: int, m: StageMetrics) -> bool:
            _inject_fault(fault, stage)
            tune.report({"stage": stage, "eer": m.eer if m.eer is not None else math.nan,
                         "size_bytes": size, "n_stages": n_stages, "final": False,
                         "optuna_trial": config["optuna_trial"]})
            return False

        outcome = bench.run(recipe, schedule, callback=on_stage, sensitivity=sensitivity,
                            n_boot=int(config.get("n_boot", 200)))
        if not math.isfinite(outcome.eer):
            raise FloatingPointError(f"EER is {outcome.eer}")
        packed = _keep_packed(outcome.model, config, outcome.eer)
        summary = outcome.summary()
        tune.report({
            **{k: summary[k] for k in ("eer", "eer_ci_low", "eer_ci_high", "min_dcf_001", "size_bytes",
                                       "compression_ratio", "avg_bits")},
            "stage": len(outcome.stages) - 1, "stage_eers": [s.eer for s in outcome.stages],
            "final": True, "packed_path": str(packed), "setup_s": setup_s,
            "trial_wall_s": time.monotonic() - t0, "optuna_trial": config["optuna_trial"],
            "node_id": _node_id(), "device": spec["device"],
        })
    except Exception as exc:  # recorded as a failed trial with its reason; the study goes on
        tune.report({"final": True, "error": f"{type(exc).__name__}: {exc}"[:500],
                     "optuna_trial": config["optuna_trial"], "trial_wall_s": time.monotonic() - t0})


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
    from search.artifacts import store_artifact

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
