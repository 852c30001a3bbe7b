"""Search quality: hypervolume after 16/32/64 trials for tpe, nsga2 and random, with and without the
seed trials (uniform + allocator recipes) and the stage-aware early stopper, over several seeds.

Hypervolume uses the project's reference point (search.pareto.reference_point: 2 x the baseline's
EER, fp32 bytes) with sizes normalised by fp32 bytes, so numbers are comparable across runs. It is
computed over the first k finished trials of each study (prefix), so one 64-trial study gives all three
checkpoints. Run through ../shared/loopback-only (it starts Ray).

    ../shared/loopback-only .venv/bin/python bench/hypervolume.py --trials 16 32 64 --seeds 0 1 2 \
        --json bench/results/hypervolume.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import optuna
from optuna.trial import TrialState

from lsv_core.models import load_checkpoint
from lsv_core.quant import BitRecipe, packed_size_bytes
from search.config import parse_study_config
from search.pareto import hypervolume, reference_point
from search.study import run_study


def config(out: Path, name: str, sampler: str, seeds: bool, early: bool, seed: int, trials: int,
           steps: int, max_trials: int) -> dict:
    return {
        "study": {"name": name, "out_dir": str(out), "n_trials": trials, "concurrency": 2, "sampler": sampler,
                  "seed": seed},
        "model": {"checkpoint": "runs/baseline/model.safetensors", "train_if_missing": False},
        "data": {"corpus": "data/corpus", "cache_dir": "runs/cache", "max_trials": max_trials,
                 "synthesize_if_missing": False},
        "space": {"granularity": "block", "bits": [1, 2, 3, 4, 8]},
        "objectives": {"size_budget_mb": 0.1},
        "msft": {"order": "bits", "total_steps": steps, "batch_size": 32, "stage_eval_frames": 200},
        "seeds": {"uniform": seeds, "allocator_fractions": [0.08, 0.12] if seeds else []},
        "early_stop": {"enabled": early, "margin": 1.0, "min_peers": 3},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, nargs="+", default=[16, 32, 64])
    ap.add_argument("--samplers", nargs="+", default=["tpe", "nsga2", "random"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--variants", nargs="+", default=["seeds+es", "seeds", "es", "plain"],
                    help="seeds+es | seeds | es | plain (seed trials and/or early stopping)")
    ap.add_argument("--steps", type=int, default=40, help="MSFT steps per trial (the quickstart's 40)")
    ap.add_argument("--max-trials", type=int, default=4000)
    ap.add_argument("--json", type=Path, help="results file, rewritten after every study")
    ap.add_argument("--resume", action="store_true", help="keep the rows already in --json and skip their studies")
    args = ap.parse_args()
    if args.resume and not args.json:
        ap.error("--resume needs --json")

    model, meta = load_checkpoint("runs/baseline/model.safetensors")
    fp32 = packed_size_bytes(model, BitRecipe({}))
    ref = reference_point([], fp32_bytes=fp32, baseline_eer=meta.get("eval", {}).get("eer"))
    out = Path(tempfile.mkdtemp(prefix="lsv-hv-"))
    rows = json.loads(args.json.read_text())["rows"] if args.resume and args.json.exists() else []
    done = {(r["sampler"], r["variant"], r["seed"]) for r in rows}
    try:
        # Seeds outermost: a grid cut short still covers every sampler and variant.
        for seed, sampler, variant in itertools.product(args.seeds, args.samplers, args.variants):
            if (sampler, variant, seed) in done:
                continue
            name = f"hv-{sampler}-{variant.replace('+', '-')}-{seed}"
            raw = config(out, name, sampler, "seeds" in variant, "es" in variant, seed, max(args.trials),
                         args.steps, args.max_trials)
            t0 = time.monotonic()
            cfg = parse_study_config(raw)
            run_study(cfg, progress=False)
            study = optuna.load_study(study_name=name, storage=cfg.optuna_url)
            # A suggestion that duplicated a running trial was asked again for free: it is not a trial.
            finished = [t for t in study.trials if t.state.is_finished()
                        and t.user_attrs.get("reason") != "duplicate of a running trial"]
            row = {"sampler": sampler, "variant": variant, "seed": seed, "steps": args.steps,
                   "wall_s": time.monotonic() - t0,
                   "n_pruned": sum(t.state == TrialState.PRUNED for t in finished[:max(args.trials)]),
                   "n_memoized": sum("memoized_from" in t.user_attrs for t in finished[:max(args.trials)])}
            for k in args.trials:
                pts = [(t.values[0], t.values[1]) for t in finished[:k] if t.state == TrialState.COMPLETE]
                row[f"hv@{k}"] = hypervolume(pts, ref, size_scale=fp32) if pts else 0.0
            rows.append(row)
            print(json.dumps(row), flush=True)
            if args.json:
                save(args.json, ref, fp32, rows, args)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    print(f"reference point: EER {ref[0]:.2f} %, {ref[1]:.0f} bytes (sizes normalised by fp32 bytes)")
    for sampler, variant in itertools.product(args.samplers, args.variants):
        sel = [r for r in rows if r["sampler"] == sampler and r["variant"] == variant]
        if not sel:
            continue
        cells = []
        for k in args.trials:
            v = [r[f"hv@{k}"] for r in sel if f"hv@{k}" in r]
            if not v:
                continue
            sd = statistics.stdev(v) if len(v) > 1 else 0.0
            cells.append(f"hv@{k} {statistics.mean(v):.3f}±{sd:.3f}")
        print(f"{sampler:7s} {variant:9s} n={len(sel)} " + "  ".join(cells))


def save(path: Path, ref: tuple[float, float], fp32: int, rows: list[dict], args: argparse.Namespace) -> None:
    from lsv_core.atomic import write_text_atomic

    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps({"reference": ref, "fp32_bytes": fp32, "rows": rows, "args": vars(args)},
                                       indent=2, default=str), overwrite=True)


if __name__ == "__main__":
    main()
