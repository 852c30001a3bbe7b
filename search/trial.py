"""The trial: what a Ray worker runs for one bit assignment.

A worker keeps its :class:`~lsv_core.workbench.Workbench` (baseline weights, AAM head, cached features)
in a process-level cache, so with Ray Tune's actor reuse the data is loaded once per worker, not once
per trial. The baseline's initial codebooks per (layer, bits) live under ``runs/<study>/codebooks/``:
computed once per study by whichever worker needs one first, then read by all. Each MSFT stage is reported (for the stage-aware early stopper); the last report carries
``final=True`` and the trial's metrics. Errors inside the trial (a diverging loss, a bad recipe) are
reported as a final result with ``error`` set, so they are recorded as failed without Ray retrying a
deterministic failure; a worker process that dies is retried by Ray (``FailureConfig``).
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

import torch

from lsv_core.quant import BitRecipe
from lsv_core.quant.msft import MsftSchedule, StageMetrics, plan_stages
from lsv_core.workbench import Workbench, WorkbenchSpec

__all__ = ["layer_sensitivity", "run_trial"]

_WORKBENCHES: dict[str, Workbench] = {}


def _workbench_for(spec: dict[str, Any]) -> Workbench:
    """The worker's workbench for ``spec`` (:meth:`WorkbenchSpec.to_dict`; loaded on first use, then
    reused by later trials)."""
    key = json.dumps(spec, sort_keys=True)
    if key not in _WORKBENCHES:
        _WORKBENCHES.clear()  # one study per worker at a time; free the previous one's memory
        _WORKBENCHES[key] = Workbench.load(WorkbenchSpec.from_dict(spec), progress=False)
    return _WORKBENCHES[key]


def layer_sensitivity(omega: dict[str, dict[Any, float]] | None, recipe: BitRecipe) -> dict[str, float] | None:
    """Per-layer sensitivity at the recipe's bits, Ω_l(b_l), for the MSFT "sensitivity" order."""
    if omega is None:
        return None
    return {name: float({int(b): v for b, v in omega[name].items()}[recipe[name].bits])
            for name in recipe if name in omega}


def run_trial(config: dict[str, Any]) -> None:
    """Ray Tune function trainable. ``config``: recipe, workbench spec, schedule, threads, fault hooks."""
    from ray import tune

    from lsv_core.export.packed import save_packed

    t0 = time.monotonic()
    torch.set_num_threads(max(1, int(config.get("threads", 1))))
    recipe = BitRecipe.from_mapping(config["recipe"])
    fault = config.get("fault")  # test hook: {"kind": "raise" | "nan" | "kill", "once_file": path}
    try:
        bench = _workbench_for(config["workbench"])
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
        # Under the study folder (not Ray's per-session temp dirs), where exports and reports find it.
        packed = Path(config["trials_dir"]) / f"{config['optuna_trial']:05d}" / "model.packed.safetensors"
        save_packed(outcome.model, packed, overwrite=True,
                    metadata={"optuna_trial": config["optuna_trial"], "eer": outcome.eer})
        summary = outcome.summary()
        tune.report({
            **{k: summary[k] for k in ("eer", "eer_ci_low", "eer_ci_high", "min_dcf_001", "size_bytes",
                                       "compression_ratio", "avg_bits")},
            "stage": len(outcome.stages) - 1, "stage_eers": [s.eer for s in outcome.stages],
            "final": True, "packed_path": str(packed), "setup_s": setup_s,
            "trial_wall_s": time.monotonic() - t0, "optuna_trial": config["optuna_trial"],
            "node_id": _node_id(),
        })
    except Exception as exc:  # recorded as a failed trial with its reason; the study goes on
        tune.report({"final": True, "error": f"{type(exc).__name__}: {exc}"[:500],
                     "optuna_trial": config["optuna_trial"], "trial_wall_s": time.monotonic() - t0})


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
