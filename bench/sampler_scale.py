"""Scale of the space (issue 14): ``granularity = "layer"`` on ResNet34 (37 quantizable tensors, shortcuts
searched too: 5^37 recipes), 1,000 trials with a fake objective (no training): the sampler's own time per
suggestion and the driver's memory, per block of 100 trials.

The driver is the project's: :class:`search.study.searcher.AskTellSearcher` over an Optuna study in SQLite
(RDB) storage with the study record a real study writes, budget repair and memoization included; Ray
is left out (it only carries configs to workers). The objective stands in for training: a fixed,
deterministic function of the recipe, Σ w_l Ω_l(b_l) over the layers (Ω from the k-means errors of a
randomly initialised ResNet34 and synthetic Hessian traces, w_l weights the sampler does not see) plus
noise. Time is measured inside the sampler (``infer_relative_search_space``, ``sample_relative``,
``sample_independent``), separately from the whole ask-to-tell step; memory is the driver process's RSS.

    python bench/sampler_scale.py --samplers hessian tpe --trials 1000 --json bench/results/sampler_scale.json

``probe`` gets its unit probes from the fake objective itself (each unit alone at 1 and 2 bit, the rest at
4 bit), as a real study gets them from one-shot scoring.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import optuna  # noqa: E402

from lsv_core.atomic import write_text_atomic  # noqa: E402


class TimedSampler(optuna.samplers.BaseSampler):
    """Delegates to ``inner`` and adds up the time spent in it per trial (seconds)."""

    def __init__(self, inner: optuna.samplers.BaseSampler) -> None:
        self.inner = inner
        self.spent: dict[int, float] = {}

    def _timed(self, trial: optuna.trial.FrozenTrial, fn: Any, *args: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return fn(*args)
        finally:
            self.spent[trial.number] = self.spent.get(trial.number, 0.0) + time.perf_counter() - t0

    def infer_relative_search_space(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> dict:
        return self._timed(trial, self.inner.infer_relative_search_space, study, trial)

    def sample_relative(self, study: optuna.Study, trial: optuna.trial.FrozenTrial, search_space: dict) -> dict:
        return self._timed(trial, self.inner.sample_relative, study, trial, search_space)

    def sample_independent(self, study: optuna.Study, trial: optuna.trial.FrozenTrial, name: str, dist: Any) -> Any:
        return self._timed(trial, self.inner.sample_independent, study, trial, name, dist)

    def before_trial(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        self._timed(trial, self.inner.before_trial, study, trial)

    def after_trial(self, study: optuna.Study, trial: optuna.trial.FrozenTrial, state: Any, values: Any) -> None:
        self._timed(trial, self.inner.after_trial, study, trial, state, values)


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def run(sampler_name: str, trials: int, budget_bits: int | None, seed: int, workdir: Path) -> dict[str, Any]:
    import torch

    from lsv_core.models import build_model
    from lsv_core.models.checkpoint import save_checkpoint
    from lsv_core.quant import BitRecipe, packed_size_bytes, quantizable_layers
    from lsv_core.quant.sensitivity import quantization_errors, sensitivity, state_dict_digest
    from search.cluster.storage import SAMPLERS
    from search.config import parse_study_config
    from search.results.record import StudyRecord, save_record
    from search.space import SearchSpace
    from search.study.searcher import AskTellSearcher

    torch.manual_seed(0)
    model = build_model("ResNet34", feat_dim=80, embed_dim=256)
    ckpt = workdir / "resnet34.safetensors"
    if not ckpt.exists():
        save_checkpoint(model, ckpt)
    layers = quantizable_layers(model)
    budget = packed_size_bytes(model, BitRecipe.uniform(model, budget_bits)) if budget_bits else None
    name = f"scale-{sampler_name}"
    config = parse_study_config({
        "study": {"name": name, "out_dir": str(workdir / "runs"), "sampler": sampler_name, "seed": seed,
                  "n_trials": trials},
        "model": {"checkpoint": str(ckpt), "train_if_missing": False},
        "space": {"granularity": "layer", "bits": [1, 2, 3, 4, 8], "tie_shortcuts": False},
        "objectives": {"size_budget_mb": None if budget is None else budget / 1e6},
    })
    space = SearchSpace.build(model, config.space)
    rng = np.random.default_rng(seed)
    traces = {n: float(10 ** rng.uniform(-1, 2)) for n in layers}
    omega = sensitivity(traces, quantization_errors(model, (1, 2, 3, 4, 8)))
    hidden = {n: float(np.exp(rng.normal(0, 0.5))) for n in layers}
    norm = sum(v[1] for v in omega.values())

    def fake_eer(recipe: BitRecipe) -> float:
        total = sum(hidden[n] * omega[n][spec.bits] for n, spec in recipe.items())
        return 1.0 + 20.0 * total / norm + (int(recipe.digest()[:6], 16) % 1000) * 1e-4

    probes = None
    if sampler_name == "probe":
        # The probe protocol applied to the fake objective (no model to score): each unit alone at each
        # probed width, every other unit at the context width.
        from lsv_core.quant.probe import ProbeResult, context_token, probe_tokens

        ctx = context_token(space.choices)

        def at(overrides: dict[str, str]) -> float:
            return fake_eer(space.recipe_from_params({f"b:{u}": overrides.get(u, ctx) for u in space.units}))

        ref = at({})
        probes = ProbeResult(ctx, ref, {u: {t: at({u: t}) - ref for t in probe_tokens(space.choices, ctx)}
                                        for u in space.units}).to_dict()
    config.study_dir.mkdir(parents=True, exist_ok=True)
    timed = TimedSampler(SAMPLERS[sampler_name](seed))
    study = optuna.create_study(study_name=name, storage=optuna.storages.RDBStorage(config.optuna_url),
                                directions=["minimize", "minimize"], sampler=timed)
    save_record(study, None, StudyRecord(name=name, digest=config.digest(), config=config.model_dump(mode="json"),
                                         layers=layers, baseline_digest=state_dict_digest(model),
                                         fp32_bytes=packed_size_bytes(model, BitRecipe({})), hessian_traces=traces,
                                         unit_probes=probes))
    searcher = AskTellSearcher(study, space, size_of=lambda r: packed_size_bytes(model, r), budget_bytes=budget,
                               make_config=lambda r, k: {"recipe": r.to_dict(), "optuna_trial": k},
                               sink=lambda record: None, max_trials=trials)
    steps: list[float] = []
    rss: list[tuple[int, float]] = [(0, rss_mb())]
    t_all = time.monotonic()
    for i in range(trials):
        t0 = time.perf_counter()
        cfg = searcher.suggest(f"t{i}")
        if cfg is None or cfg == AskTellSearcher.FINISHED:
            break
        recipe = BitRecipe.from_mapping(cfg["recipe"])
        searcher.on_trial_complete(f"t{i}", {"final": True, "eer": fake_eer(recipe),
                                              "size_bytes": packed_size_bytes(model, recipe), "min_dcf_001": 0.1})
        steps.append(time.perf_counter() - t0)
        if (i + 1) % 100 == 0:
            rss.append((i + 1, rss_mb()))
            print(f"{sampler_name}: {i + 1} trials, sampler {1e3 * statistics.mean(list(timed.spent.values())[-100:]):.1f} "
                  f"ms/suggestion, step {1e3 * statistics.mean(steps[-100:]):.0f} ms, RSS {rss[-1][1]:.0f} MB", flush=True)
    spent = [timed.spent.get(t.number, 0.0) for t in study.get_trials(deepcopy=False)]
    blocks = []
    for start in range(0, len(steps), 100):
        s = spent[start:start + 100]
        st = steps[start:start + 100]
        blocks.append({"trials": [start + 1, start + len(st)],
                       "sampler_ms_mean": 1e3 * statistics.mean(s), "sampler_ms_median": 1e3 * statistics.median(s),
                       "sampler_ms_p95": 1e3 * float(np.quantile(s, 0.95)),
                       "step_ms_mean": 1e3 * statistics.mean(st), "rss_mb_end": dict(rss).get(start + len(st))})
    n_unique = len({t.user_attrs.get("digest") for t in study.get_trials(deepcopy=False)})
    return {"sampler": sampler_name, "trials": len(steps), "budget_bytes": budget, "units": len(space.units),
            "wall_s": time.monotonic() - t_all, "unique_recipes": n_unique, "rss_mb": rss, "blocks": blocks}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samplers", nargs="+", default=["hessian"])
    ap.add_argument("--trials", type=int, default=1000)
    ap.add_argument("--budget-bits", type=int, default=4,
                    help="size budget = uniform B-bit size (0: no budget); default 4 (3.38 MB)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, required=True)
    args = ap.parse_args(argv)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    doc: dict[str, Any] = {"meta": {"command": " ".join(sys.argv), "machine": platform.machine(),
                                    "cpu_count": os.cpu_count(), "load_avg_start": os.getloadavg()}, "runs": []}
    with tempfile.TemporaryDirectory(prefix="lsv-scale-") as tmp:
        for name in args.samplers:
            doc["runs"].append(run(name, args.trials, args.budget_bits or None, args.seed, Path(tmp)))
            doc["meta"]["load_avg_end"] = os.getloadavg()
            write_text_atomic(args.json, json.dumps(doc, indent=1) + "\n", overwrite=True)
    for r in doc["runs"]:
        first, last = r["blocks"][0], r["blocks"][-1]
        print(f"{r['sampler']}: {r['trials']} trials ({r['unique_recipes']} distinct), sampler "
              f"{first['sampler_ms_mean']:.1f} -> {last['sampler_ms_mean']:.1f} ms/suggestion (first vs last 100), "
              f"RSS {r['rss_mb'][0][1]:.0f} -> {r['rss_mb'][-1][1]:.0f} MB, {r['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
