"""Search efficiency: what each search method pays, in full-trial equivalents, to reach 95 % of the
reference hypervolume on the quickstart benchmark (issue 14).

Methods (sampler, seed trials, stage-aware early stopping), every other setting from ``--study``
(default ``studies/quickstart.toml``: its baseline, corpus, space, budget, fine-tuning, trial subset):

* ``random``, ``tpe``, ``nsga2``: Optuna's samplers alone (no seeds, no early stopping);
* ``tpe+seeds+es``: TPE with the uniform and allocator seed trials and early stopping (the quickstart's
  settings before issue 14);
* ``hessian+seeds+es``: :class:`search.samplers.prior.HessianPriorSampler` with seeds and early stopping;
* ``probe+seeds+es``: :class:`search.samplers.prior.ProbePriorSampler` with the uniform seeds (not Ω's
  allocator seeds) and early stopping. Its unit probes are the run's first cost (their CPU-seconds over a
  full trial's), so the comparison pays for what the prior measured.

Cost: a trial trained to the end costs 1; one stopped after ``k`` of its ``n`` MSFT stages ``k / n`` (the
budget is split evenly over stages); a memoized trial, a duplicate of a running one and a failed one cost
0. Trials are taken in the order they finished.

Hypervolume of (EER, size) with sizes normalised by the size budget, against the reference point (the
worst EER worth keeping, the budget): ``--ref-eer`` (default: the median EER of the uniform 1-bit seed
trials, the smallest model the quickstart seeds with). The reference front is the union of every run's
finished trials (seeded runs include the uniform and allocator recipes). A run reaches the target when
its hypervolume is >= ``--target`` x the reference front's; runs that never reach it are censored (their
whole cost, marked ">").

Every run's trials are kept in the JSON (``--resume`` continues a grid), so ``--analyze-only`` recomputes
the table with another reference or target without training anything. Run through
../shared/loopback-only (it starts Ray):

    ../shared/loopback-only .venv/bin/python bench/hypervolume.py --methods probe+seeds+es tpe nsga2 \\
        --seeds 0 1 2 3 4 --trials 32 --json bench/results/hypervolume_issue14c.json --resume
    ../shared/loopback-only .venv/bin/python bench/hypervolume.py --methods random --seeds 0 1 2 3 4 \\
        --trials 64 --json bench/results/hypervolume_issue14c.json --resume

(``--trials`` applies to the studies started by that call; the analysis takes each run as it is.)
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lsv_core.atomic import write_text_atomic  # noqa: E402

# name -> (sampler, seed trials, early stopping)
METHODS: dict[str, tuple[str, bool, bool]] = {
    "random": ("random", False, False),
    "tpe": ("tpe", False, False),
    "nsga2": ("nsga2", False, False),
    "tpe+seeds+es": ("tpe", True, True),
    "hessian+seeds+es": ("hessian", True, True),
    "probe+seeds+es": ("probe", True, True),
}
BASELINE_METHOD = "random"
_STAGE = re.compile(r"stopped after MSFT stage (\d+)")


# -- running ---------------------------------------------------------------------------------------------
def study_raw(base: dict[str, Any], out: Path, name: str, method: str, seed: int, trials: int) -> dict[str, Any]:
    """The study's own config with the method's sampler, seeds and early stopping, in a scratch folder."""
    sampler, seeded, early = METHODS[method]
    raw = json.loads(json.dumps(base))
    raw["study"].update({"name": name, "out_dir": str(out), "n_trials": trials, "sampler": sampler, "seed": seed})
    raw.setdefault("model", {})["train_if_missing"] = False
    raw.setdefault("data", {})["synthesize_if_missing"] = False
    if not seeded:
        raw["seeds"] = {"uniform": False, "allocator_fractions": []}
    elif sampler == "probe":  # its own allocations come from the probes; Ω's would cost Hessian traces
        raw["seeds"] = {**raw.get("seeds", {}), "allocator_fractions": []}
    raw.setdefault("early_stop", {})["enabled"] = early
    raw.pop("storage", None)
    return raw


def run_one(base: dict[str, Any], out: Path, method: str, seed: int, trials: int) -> dict[str, Any]:
    """Run one study to ``trials`` trials; return every trial's outcome and cost, in finishing order."""
    import optuna

    from lsv_core.models import load_checkpoint
    from lsv_core.quant import BitRecipe
    from lsv_core.quant.msft import plan_stages
    from search.config import parse_study_config
    from search.results.record import stored_record
    from search.study.run import run_study

    name = f"hv-{method.replace('+', '-')}-{seed}"
    cfg = parse_study_config(study_raw(base, out, name, method, seed, trials))
    load0 = os.getloadavg()
    t0 = time.monotonic()
    run_study(cfg, progress=False)
    wall = time.monotonic() - t0
    model, _ = load_checkpoint(cfg.model.checkpoint)
    study = optuna.load_study(study_name=name, storage=cfg.optuna_url)
    rows = []
    for t in study.trials:
        if not t.state.is_finished():
            continue
        recipe = t.user_attrs.get("recipe") or {}
        reason = t.user_attrs.get("reason") or ""
        cost = 0.0
        stage = None
        if t.state == optuna.trial.TrialState.COMPLETE:
            cost = 0.0 if "memoized_from" in t.user_attrs else 1.0
        elif t.state == optuna.trial.TrialState.PRUNED and (m := _STAGE.match(reason)):
            stage = int(m.group(1))
            n_stages = len(plan_stages(model, BitRecipe.from_mapping(recipe), cfg.msft.order, cfg.msft.n_groups))
            cost = (stage + 1) / max(1, n_stages)
        rows.append({
            "number": t.number, "state": t.state.name, "values": t.values, "cost": cost, "stage": stage,
            "finished": t.datetime_complete.isoformat() if t.datetime_complete else None,
            "seed_label": t.user_attrs.get("seed"), "memoized_from": t.user_attrs.get("memoized_from"),
            "reason": reason or None, "digest": t.user_attrs.get("digest"), "recipe": recipe,
            "trial_wall_s": t.user_attrs.get("trial_wall_s"),
            "eer_ci": [t.user_attrs.get("eer_ci_low"), t.user_attrs.get("eer_ci_high")],
        })
    rows.sort(key=lambda r: (r["finished"] or "", r["number"]))
    record = stored_record(study)  # the record is a system attr (search.results.system_attrs)
    probes = record.unit_probes if record is not None else None
    if probes:
        rows.insert(0, probe_row(probes, rows, cfg.resources.cpu))
    return {"method": method, "seed": seed, "trials": trials, "wall_s": wall, "load_avg_start": load0,
            "load_avg_end": os.getloadavg(), "fp32_bytes": study.user_attrs.get("fp32_bytes"),
            "budget_bytes": cfg.size_budget_bytes, "rows": rows}


def probe_row(probes: dict[str, Any], rows: list[dict[str, Any]], trial_cpus: float) -> dict[str, Any]:
    """The unit probes as the run's first cost: their CPU-seconds over a full trial's (median wall time of
    the trials trained to the end, each on ``trial_cpus`` CPUs)."""
    full = [r["trial_wall_s"] for r in rows if r["cost"] == 1.0 and r.get("trial_wall_s")]
    if not full:
        raise SystemExit("cannot price the unit probes: no trial of the run was trained to the end")
    cost = probes["wall_s"] * probes.get("threads", 1) / (statistics.median(full) * trial_cpus)
    return {"number": -1, "state": "PROBES", "values": None, "cost": cost, "stage": None, "finished": None,
            "seed_label": "unit probes", "memoized_from": None, "reason": f"{probes['wall_s']:.1f} s on "
            f"{probes.get('threads', 1)} thread(s)", "digest": None, "recipe": {}, "eer_ci": [None, None]}


# -- analysis --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Reference:
    eer: float  # percent
    size: float  # bytes
    hv: float  # of the union front, in EER points x (size / size budget)


def complete_points(run: dict[str, Any]) -> list[tuple[float, float]]:
    return [(r["values"][0], r["values"][1]) for r in run["rows"] if r["state"] == "COMPLETE" and r["values"]]


def reference(runs: list[dict[str, Any]], ref_eer: float | None) -> Reference:
    budget = float(runs[0]["budget_bytes"])
    if ref_eer is None:
        uniform1 = [r["values"][0] for run in runs for r in run["rows"]
                    if (r["seed_label"] or "").startswith("uniform-1") and r["state"] == "COMPLETE"]
        if not uniform1:
            raise SystemExit("no uniform 1-bit seed trial in the runs: give --ref-eer")
        ref_eer = statistics.median(uniform1)
    return Reference(ref_eer, budget, union_hypervolume(runs, ref_eer, budget))


def union_hypervolume(runs: list[dict[str, Any]], ref_eer: float, size: float) -> float:
    """Hypervolume of the union of ``runs``' finished trials against (``ref_eer``, ``size``)."""
    from search.results.pareto import hypervolume

    union = [p for run in runs for p in complete_points(run)]
    return hypervolume(union, (ref_eer, size), size_scale=size)


def per_seed_references(runs: list[dict[str, Any]], ref: Reference) -> dict[int, Reference]:
    """For each study seed, ``ref`` with the hypervolume of the union of that seed's runs only.

    A study's seed also seeds its trials' fine-tuning, which moves a recipe's EER by up to a point or more
    at 2-3 bits; against a reference made of every seed's luckiest points a run of an unlucky seed can
    never reach the target, whatever its method. Against its own seed's union, methods are compared on
    the same fine-tuning draws (a paired design)."""
    return {seed: Reference(ref.eer, ref.size, union_hypervolume([r for r in runs if r["seed"] == seed], ref.eer, ref.size))
            for seed in sorted({r["seed"] for r in runs})}


def cost_curve(run: dict[str, Any], ref: Reference) -> list[tuple[float, float]]:
    """(cumulative cost, hypervolume / reference hypervolume) after each finished trial."""
    from search.results.pareto import hypervolume

    points: list[tuple[float, float]] = []
    spent = 0.0
    curve = []
    for r in run["rows"]:
        spent += r["cost"]
        if r["state"] == "COMPLETE" and r["values"]:
            points.append((r["values"][0], r["values"][1]))
        hv = hypervolume(points, (ref.eer, ref.size), size_scale=ref.size) if points else 0.0
        curve.append((spent, hv / ref.hv))
    return curve


def cost_to_reach(run: dict[str, Any], ref: Reference, target: float) -> tuple[float, bool]:
    """(cost at which the run first reaches ``target`` of the reference hypervolume, reached?)."""
    curve = cost_curve(run, ref)
    for spent, frac in curve:
        if frac >= target:
            return spent, True
    return (curve[-1][0] if curve else 0.0), False


def summarize(runs: list[dict[str, Any]], ref: Reference, target: float,
              per_seed: dict[int, Reference] | None = None) -> dict[str, Any]:
    """Per method: cost to reach ``target`` of the reference hypervolume (``ref``, or each run's own
    seed's reference from ``per_seed``), per run and its median, and the final fractions."""
    out: dict[str, Any] = {}
    for method in METHODS:
        sel = [r for r in runs if r["method"] == method]
        if not sel:
            continue
        refs = [per_seed[r["seed"]] if per_seed else ref for r in sel]
        costs = [cost_to_reach(r, rf, target) for r, rf in zip(sel, refs, strict=True)]
        finals = [cost_curve(r, rf)[-1][1] if r["rows"] else 0.0 for r, rf in zip(sel, refs, strict=True)]
        values = [c for c, _ in costs]
        out[method] = {
            "seeds": [r["seed"] for r in sel], "cost": values, "reached": [ok for _, ok in costs],
            # Censored runs enter the median with their whole cost: a lower bound of what they would need.
            "median_cost": statistics.median(values), "min_cost": min(values), "max_cost": max(values),
            "n_reached": sum(ok for _, ok in costs), "final_hv_fraction": finals,
            "total_cost": [sum(x["cost"] for x in r["rows"]) for r in sel],
            "wall_s": [r["wall_s"] for r in sel],
            "n_pruned": [sum(x["state"] == "PRUNED" and x["stage"] is not None for x in r["rows"]) for r in sel],
            "n_memoized": [sum(x["memoized_from"] is not None for x in r["rows"]) for r in sel],
        }
    return out


EQUAL_COSTS = (4, 8, 12, 16, 24, 32)


def hv_at(run: dict[str, Any], ref: Reference, cost: float) -> float | None:
    """Fraction of the reference hypervolume the run held once it had spent ``cost`` full-trial
    equivalents (None when the run stopped before spending that much)."""
    curve = cost_curve(run, ref)
    if not curve or curve[-1][0] + 1e-9 < cost:
        return None
    held = [frac for spent, frac in curve if spent <= cost + 1e-9]
    return held[-1] if held else 0.0


def equal_cost_table(runs: list[dict[str, Any]], ref: Reference) -> dict[str, dict[str, float | None]]:
    """Per method, the mean over its runs of :func:`hv_at` at each of ``EQUAL_COSTS`` (only costs every run
    of the method reached)."""
    out: dict[str, dict[str, float | None]] = {}
    for method in METHODS:
        sel = [r for r in runs if r["method"] == method]
        if not sel:
            continue
        row: dict[str, float | None] = {}
        for k in EQUAL_COSTS:
            vals = [hv_at(r, ref, k) for r in sel]
            row[str(k)] = None if any(v is None for v in vals) else statistics.mean(vals)  # type: ignore[arg-type]
        out[method] = row
    return out


def print_equal_cost(table: dict[str, dict[str, float | None]]) -> None:
    print("\nhypervolume fraction at equal cost (mean over seeds; '-': a run stopped before that cost)")
    print(f"{'method':18s} " + " ".join(f"@{k:<6}" for k in EQUAL_COSTS))
    for method, row in table.items():
        print(f"{method:18s} " + " ".join(f"{v:.3f}  " if v is not None else "-      " for v in row.values()))


def print_summary(summary: dict[str, Any], ref: Reference, target: float, reference_hv: str | None = None) -> None:
    hv = reference_hv if reference_hv is not None else f"{ref.hv:.4f}"
    print(f"reference point: EER {ref.eer:.2f} %, {ref.size:.0f} bytes; reference hypervolume {hv}; "
          f"target {target:.0%}")
    for method, s in summary.items():
        cells = " ".join(f"{c:.2f}{'' if ok else '>'}" for c, ok in zip(s["cost"], s["reached"], strict=True))
        print(f"{method:18s} median {s['median_cost']:6.2f} [{s['min_cost']:.2f}, {s['max_cost']:.2f}] "
              f"reached {s['n_reached']}/{len(s['cost'])}  per seed: {cells}")
    if BASELINE_METHOD in summary:
        base = summary[BASELINE_METHOD]["median_cost"]
        for method, s in summary.items():
            if method != BASELINE_METHOD and base > 0:
                print(f"  {method}: median cost / random's = {s['median_cost'] / base:.2f}")


# -- main --------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--study", type=Path, default=Path("studies/quickstart.toml"))
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--trials", type=int, default=40, help="trials per study")
    ap.add_argument("--target", type=float, nargs="+", default=[0.95],
                    help="fraction(s) of the reference hypervolume; the first is the headline, the others are "
                         "reported beside it (how the ranking depends on the target)")
    ap.add_argument("--ref-eer", type=float, default=None, help="reference EER in percent")
    ap.add_argument("--json", type=Path, required=True, help="results file, rewritten after every study")
    ap.add_argument("--resume", action="store_true", help="keep the runs already in --json, skip their studies")
    ap.add_argument("--analyze-only", action="store_true", help="no new studies: recompute the summary")
    args = ap.parse_args(argv)

    import tomllib

    base = tomllib.loads(args.study.read_text())
    doc: dict[str, Any] = {"runs": []}
    if (args.resume or args.analyze_only) and args.json.exists():
        doc = json.loads(args.json.read_text())
    runs: list[dict[str, Any]] = doc["runs"]
    done = {(r["method"], r["seed"]) for r in runs}
    if not args.analyze_only:
        out = Path(tempfile.mkdtemp(prefix="lsv-hv-"))
        try:
            # Seeds outermost: a grid cut short still covers every method.
            for seed, method in itertools.product(args.seeds, args.methods):
                if (method, seed) in done:
                    continue
                run = run_one(base, out, method, seed, args.trials)
                runs.append(run)
                print(json.dumps({k: run[k] for k in ("method", "seed", "wall_s")} |
                                 {"complete": len(complete_points(run)),
                                  "cost": sum(r["cost"] for r in run["rows"])}), flush=True)
                save(args.json, doc, args, base)
        finally:
            shutil.rmtree(out, ignore_errors=True)
    ref = reference(runs, args.ref_eer)
    summaries = {target: summarize(runs, ref, target) for target in args.target}
    per_seed = per_seed_references(runs, ref)
    paired = {target: summarize(runs, ref, target, per_seed) for target in args.target}
    summary = summaries[args.target[0]]
    doc["reference"] = {"eer": ref.eer, "size": ref.size, "hv": ref.hv, "target": args.target[0],
                        "hv_per_seed": {str(k): v.hv for k, v in per_seed.items()}}
    doc["summary_by_target"] = {f"{t:g}": s for t, s in summaries.items()}
    doc["summary_per_seed_reference"] = {f"{t:g}": s for t, s in paired.items()}
    doc["summary"] = summary
    doc["equal_cost"] = equal_cost_table(runs, ref)
    save(args.json, doc, args, base)
    for target, one in summaries.items():
        print_summary(one, ref, target)
    print("\nagainst each seed's own reference (the union of that seed's runs):")
    per_seed_hv = "per seed " + ", ".join(f"{k}: {v.hv:.4f}" for k, v in per_seed.items())
    for target, one in paired.items():
        print_summary(one, ref, target, per_seed_hv)
    print_equal_cost(doc["equal_cost"])
    return 0


def save(path: Path, doc: dict[str, Any], args: argparse.Namespace, base: dict[str, Any]) -> None:
    doc["args"] = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    doc["study"] = base
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(doc, indent=1, default=str) + "\n", overwrite=True)


if __name__ == "__main__":
    raise SystemExit(main())
