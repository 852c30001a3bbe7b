"""Does the Hessian proxy rank the search units the way the trials do? (issue 14)

The Hessian-prior sampler and the allocator trust Ω (trace of the baseline's loss Hessian x k-means error,
docs/method.md) to say which unit can lose bits for the fewest EER points per byte saved. This bench reads
the trials of a hypervolume grid (``bench/hypervolume.py --json``), fits the additive model the allocator
itself assumes, ``EER ≈ b + Σ_u θ[u, c_u]``, by least squares on every finished recipe without a 1-bit unit
(4 bit is each unit's reference; the 1-bit region interacts too strongly for an additive fit), and prints
each (unit, choice) step next to what Ω says about it: bytes saved, measured EER cost with a bootstrap
interval over recipes, and both costs per kB saved with their ranks.

    python bench/proxy_check.py --grid bench/results/hypervolume_issue14b.json \\
        --json bench/results/proxy_check_issue14.json

Units, choices and byte costs come from the sampler's own :func:`search.samplers.prior.unit_table` for
``--study`` (default the quickstart), with the Hessian traces cached under its ``data.cache_dir``
(``--prior hessian``) or the unit probes, measured when it starts (``--prior probe``, about 35 s; the column
headed Ω then holds the probes' estimated damage):

    python bench/proxy_check.py --grid bench/results/hypervolume_issue14b.json --prior probe \
        --json bench/results/proxy_check_probe.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from lsv_core.atomic import write_text_atomic  # noqa: E402

REFERENCE = "4"


def grid_points(grid: dict[str, Any], token_of: Any) -> dict[tuple[int, ...], list[float]]:
    """Every finished recipe of the grid -> its EERs (one per study that ran it)."""
    out: dict[tuple[int, ...], list[float]] = {}
    for run in grid["runs"]:
        for row in run["rows"]:
            if row["state"] == "COMPLETE" and row["values"]:
                out.setdefault(token_of(row["recipe"]), []).append(float(row["values"][0]))
    return out


def fit_effects(idx: np.ndarray, y: np.ndarray, n_choices: int, ref: int) -> tuple[float, np.ndarray]:
    """Least squares of the additive model; ``θ[u, ref] = 0``. Returns (intercept, θ of shape (units, choices));
    a (unit, choice) no recipe used gets NaN."""
    n_units = idx.shape[1]
    cols = [(u, c) for u in range(n_units) for c in range(n_choices) if c != ref and (idx[:, u] == c).any()]
    x = np.column_stack([np.ones(len(y))] + [(idx[:, u] == c).astype(float) for u, c in cols])
    coef, *_ = np.linalg.lstsq(x, y, rcond=None)
    theta = np.full((n_units, n_choices), np.nan)
    theta[:, ref] = 0.0
    for (u, c), t in zip(cols, coef[1:], strict=True):
        theta[u, c] = t
    return float(coef[0]), theta


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--grid", type=Path, required=True, help="bench/hypervolume.py results")
    ap.add_argument("--study", type=Path, default=Path("studies/quickstart.toml"))
    ap.add_argument("--prior", choices=("hessian", "probe"), default="hessian",
                    help="hessian: Ω from the cached traces; probe: the unit probes, measured now (lsv_core.quant.probe)")
    ap.add_argument("--n-boot", type=int, default=500)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)

    from lsv_core.quant import BitRecipe
    from lsv_core.quant.sensitivity import state_dict_digest
    from search.config import load_study_config
    from search.samplers.prior import _load_baseline, unit_table
    from search.space import SearchSpace

    config = load_study_config(args.study)
    model = _load_baseline(config)
    space = SearchSpace.build(model, config.space)
    if args.prior == "probe":
        import torch

        from lsv_core.workbench import Workbench

        torch.set_num_threads(1)
        bench = Workbench.load(config.workbench_spec().replace(device="cpu"), progress=False)
        probes = bench.probe(space.unit_layers(), space.choices, progress=True)
        print(f"probes: {probes.wall_s:.1f} s on 1 thread")
        table = unit_table(model, space, None, probe=probes)
    else:
        cache = json.loads((config.data.cache_dir / "hessian_traces.json").read_text())
        digest = state_dict_digest(model)
        entries = [e for e in cache["entries"].values() if e.get("model") == digest]
        if not entries:
            raise SystemExit(f"no Hessian traces of {config.model.checkpoint} in {config.data.cache_dir}: run the study first")
        table = unit_table(model, space, entries[0]["traces"])
    units = list(space.units)
    ref = table.choices.index(REFERENCE)

    def token_of(recipe: dict[str, Any]) -> tuple[int, ...]:
        idx = table.from_params(space.params_from_recipe(BitRecipe.from_mapping(recipe)))
        if idx is None:
            raise SystemExit(f"a grid recipe is not a recipe of {args.study}'s space: {recipe}")
        return idx

    points = grid_points(json.loads(args.grid.read_text()), token_of)
    keep = {k: float(np.mean(v)) for k, v in points.items() if min(k) > 0}  # choice 0 is 1 bit
    idx = np.array(list(keep), dtype=np.int64)
    y = np.array(list(keep.values()))
    intercept, theta = fit_effects(idx, y, len(table.choices), ref)
    rng = np.random.default_rng(0)
    boots = []
    for _ in range(args.n_boot):
        pick = rng.integers(0, len(y), len(y))
        boots.append(fit_effects(idx[pick], y[pick], len(table.choices), ref)[1])
    boot = np.array(boots)
    pred = intercept + theta[np.arange(len(units)), idx].sum(axis=1)
    print(f"{len(points)} distinct recipes in the grid, {len(y)} without a 1-bit unit; additive fit: intercept "
          f"{intercept:.2f} %, residual rms {np.sqrt(np.mean((pred - y) ** 2)):.3f} pp")
    rows = []
    for u, unit in enumerate(units):
        for c, choice in enumerate(table.choices):
            if c == ref or c == 0 or np.isnan(theta[u, c]):
                continue
            saved = int(table.cost[u, ref] - table.cost[u, c])
            lo, hi = np.nanpercentile(boot[:, u, c], [2.5, 97.5])
            rows.append({"unit": unit, "choice": choice, "bytes_saved_vs_4bit": saved,
                         "eer_cost_pp": float(theta[u, c]), "eer_cost_ci": [float(lo), float(hi)],
                         "omega_cost": float(table.omega[u, c] - table.omega[u, ref])})
    down = [r for r in rows if r["bytes_saved_vs_4bit"] > 0]
    for key, rank_key in (("eer_cost_pp", "measured_rank"), ("omega_cost", "omega_rank")):
        for rank, r in enumerate(sorted(down, key=lambda r, key=key: r[key] / r["bytes_saved_vs_4bit"]), 1):
            r[rank_key] = rank
    ranks = np.array([(r["measured_rank"], r["omega_rank"]) for r in down], dtype=float)
    rho = float(np.corrcoef(ranks[:, 0], ranks[:, 1])[0, 1]) if len(down) > 2 else float("nan")
    print(f"rank correlation (Spearman) of EER cost per kB saved, measured vs Ω: {rho:+.2f} over {len(down)} steps")
    print(f"{'unit':10s} {'bits':>4s} {'B saved':>8s} {'EER cost pp [95 % CI]':>24s} {'pp/kB':>7s} {'rank':>4s}"
          f" {'Ω/kB':>9s} {'Ω rank':>6s}")
    for r in sorted(rows, key=lambda r: (r["unit"], r["choice"])):
        per_kb = r["eer_cost_pp"] / r["bytes_saved_vs_4bit"] * 1000 if r["bytes_saved_vs_4bit"] > 0 else float("nan")
        om_kb = r["omega_cost"] / r["bytes_saved_vs_4bit"] * 1000 if r["bytes_saved_vs_4bit"] > 0 else float("nan")
        ci = f"{r['eer_cost_pp']:+.2f} [{r['eer_cost_ci'][0]:+.2f}, {r['eer_cost_ci'][1]:+.2f}]"
        print(f"{r['unit']:10s} {r['choice']:>4s} {r['bytes_saved_vs_4bit']:8d} {ci:>24s} {per_kb:7.2f} "
              f"{r.get('measured_rank', ''):>4} {om_kb:9.1f} {r.get('omega_rank', ''):>6}")
    if args.json is not None:
        doc = {"grid": str(args.grid), "study": str(args.study), "n_recipes": len(points), "n_fit": len(y),
               "intercept": intercept, "prior": args.prior, "spearman_measured_vs_omega": rho, "rows": rows, "command": " ".join(sys.argv)}
        write_text_atomic(args.json, json.dumps(doc, indent=1) + "\n", overwrite=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
