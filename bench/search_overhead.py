"""Orchestration overhead and worker scaling of a study (issue 4's benchmark claims).

* overhead: the share of each trial's wall time, as the driver sees it (Optuna ask -> tell), that is not
  the trial's own work inside the worker (workbench lookup, MSFT, scoring, packed write). It covers Ray
  scheduling, Optuna ask/tell, MLflow logging and result plumbing. Target < 3 %.
* throughput: trials per minute with 2 concurrent workers vs 1 on this machine. Target >= 1.8x.

Both run the same study (default corpus and baseline, a trial subset) with early stopping and seeds off,
so every trial does the same amount of work. Run through ../shared/loopback-only (it starts Ray).

    ../shared/loopback-only .venv/bin/python bench/search_overhead.py --trials 8 --json bench/results/search_overhead.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import optuna
from optuna.trial import TrialState

from search.config import parse_study_config
from search.study.run import run_study


def study_config(out: Path, name: str, trials: int, concurrency: int, steps: int, max_trials: int) -> dict:
    return {
        "study": {"name": name, "out_dir": str(out), "n_trials": trials, "concurrency": concurrency,
                  "sampler": "random", "seed": 0},
        "model": {"checkpoint": "runs/baseline/model.safetensors", "train_if_missing": False},
        "data": {"corpus": "data/corpus", "cache_dir": "runs/cache", "max_trials": max_trials,
                 "synthesize_if_missing": False},
        "space": {"granularity": "block", "bits": [2, 3, 4, 8]},
        "msft": {"order": "one_shot", "total_steps": steps},
        "seeds": {"uniform": False, "allocator_fractions": []},
        "early_stop": {"enabled": False},
    }


def measure(out: Path, trials: int, concurrency: int, steps: int, max_trials: int) -> dict:
    cfg = parse_study_config(study_config(out, f"bench-c{concurrency}", trials, concurrency, steps, max_trials))
    t0 = time.monotonic()
    run_study(cfg, progress=False)
    wall = time.monotonic() - t0
    study = optuna.load_study(study_name=cfg.study.name, storage=cfg.optuna_url)
    done = [t for t in study.trials if t.state == TrialState.COMPLETE and "memoized_from" not in t.user_attrs]
    driver = sum((t.datetime_complete - t.datetime_start).total_seconds() for t in done)
    worker = sum(t.user_attrs["trial_wall_s"] for t in done)
    first = min(t.datetime_start for t in done)
    last = max(t.datetime_complete for t in done)
    span = (last - first).total_seconds()
    return {"concurrency": concurrency, "trials": len(done), "study_wall_s": wall, "trials_span_s": span,
            "driver_trial_s": driver, "worker_trial_s": worker,
            "overhead_fraction": (driver - worker) / driver,
            "trials_per_min": 60 * len(done) / span}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=8)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--max-trials", type=int, default=6000)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    out = Path(tempfile.mkdtemp(prefix="lsv-bench-"))
    try:
        rows = [measure(out, args.trials, c, args.steps, args.max_trials) for c in (1, 2)]
    finally:
        shutil.rmtree(out, ignore_errors=True)
    speedup = rows[1]["trials_per_min"] / rows[0]["trials_per_min"]
    for r in rows:
        print(f"concurrency {r['concurrency']}: {r['trials']} trials in {r['trials_span_s']:.1f} s "
              f"({r['trials_per_min']:.2f}/min); orchestration overhead {100 * r['overhead_fraction']:.2f} % "
              f"(driver {r['driver_trial_s']:.1f} s vs worker {r['worker_trial_s']:.1f} s)")
    print(f"throughput 2 workers / 1 worker: {speedup:.2f}x (target >= 1.8x); "
          f"overhead target < 3 %")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"rows": rows, "speedup_2_vs_1": speedup, "args": vars(args)},
                                        indent=2, default=str))


if __name__ == "__main__":
    main()
