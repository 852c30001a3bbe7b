"""Benchmark: EER against bit width for each shipped quickstart model, paired with its own fp32 control (issue 22).

Li et al. (Interspeech 2023) found ResNet more robust than ECAPA-TDNN at low bit widths. This checks it on
the embedded corpus with the two baselines shipped here (``studies/quickstart.toml``: ThinResNet, 159 k
parameters; ``studies/quickstart_ecapa.toml``: a CPU-sized ECAPA-TDNN, 242 k), each fine-tuned exactly as
its study's trials are (the study's ``[msft]``: budget, batch, learning rate).

Per model and fine-tuning seed: the fp32 control (the float baseline fine-tuned with the same budget,
nothing quantized: ``Workbench.run`` of the empty recipe, as a study's control), then uniform 8, 4, 3 and 2
bit k-means codebooks (every Conv/Linear, one-shot fine-tune: a uniform recipe has one MSFT stage) and
1 bit (adaptive binary). Each quantized model is compared with the control *of the same seed* on the same
trials by a paired bootstrap (:mod:`lsv_core.metrics.paired`: the same resampled trials for both models
in every replicate), so a difference is called only when its 95 % interval excludes 0.

Robustness is read two ways: the EER increase in points over the control, and relative to the control's
EER (the two baselines do not start at the same EER). The table gives mean ± std over seeds, the per-seed
paired intervals, and how many seeds were significantly worse than their control.

Usage (the corpus made by ``make demo``; 858 s for both models and 3 seeds, one thread, beside other benches):
    OMP_NUM_THREADS=1 python bench/bit_robustness.py --json bench/results/bit_robustness.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from lsv_core.atomic import write_text_atomic  # noqa: E402
from lsv_core.metrics.paired import paired_delta  # noqa: E402
from lsv_core.quant import BitRecipe  # noqa: E402
from lsv_core.workbench import Workbench  # noqa: E402
from search.config import load_study_config  # noqa: E402

STUDIES = (Path("studies/quickstart.toml"), Path("studies/quickstart_ecapa.toml"))
BITS = (8, 4, 3, 2, 1)
N_BOOT = 1000
BOOT_SEED = 0  # the replicates depend on the trial list and this seed only: shared by every row of a model


def _recipe(bench: Workbench, bits: int) -> BitRecipe:
    return BitRecipe.uniform(bench.model, bits, mode="adaptive" if bits == 1 else None)


def run_model(study: Path, seeds: list[int], max_trials: int | None, device: str) -> dict[str, Any]:
    """Control and uniform rows of one study's model, every seed; paired deltas against the control."""
    config = load_study_config(study)
    spec = config.workbench_spec().replace(max_trials=max_trials, subset_seed=0, device=device, codebook_dir=None)
    bench = Workbench.load(spec, progress=False)
    base = dataclasses.replace(config.msft_schedule(), eval_each_stage=False)
    n_params = sum(p.numel() for p in bench.model.parameters())
    out: dict[str, Any] = {"study": str(study), "arch": bench.model.arch["name"], "kwargs": bench.model.arch["kwargs"],
                           "params": n_params, "fp32_bytes": bench.fp32_bytes, "n_trials": len(bench.trials),
                           "schedule": base.to_dict(), "control": [], "rows": {}}
    for b in BITS:
        out["rows"][str(b)] = {"bits": b, "size_bytes": bench.size_of(_recipe(bench, b)), "per_seed": []}
    for seed in seeds:
        schedule = dataclasses.replace(base, seed=seed)
        t0 = time.monotonic()
        ctl = bench.run(BitRecipe({}), schedule, n_boot=N_BOOT, paired_boot=(N_BOOT, BOOT_SEED))
        out["control"].append({"seed": seed, "eer": ctl.eer, "eer_ci": [ctl.eer_ci_low, ctl.eer_ci_high],
                               "min_dcf_001": ctl.min_dcf_001, "wall_s": time.monotonic() - t0})
        print(f"  {out['arch']:11s} seed {seed} fp32 control  EER {ctl.eer:6.3f} %", flush=True)
        for b in BITS:
            t0 = time.monotonic()
            res = bench.run(_recipe(bench, b), schedule, n_boot=N_BOOT, paired_boot=(N_BOOT, BOOT_SEED))
            d = paired_delta(res.eer, res.eer_boot, ctl.eer, ctl.eer_boot)
            out["rows"][str(b)]["per_seed"].append({
                "seed": seed, "eer": res.eer, "eer_ci": [res.eer_ci_low, res.eer_ci_high],
                "min_dcf_001": res.min_dcf_001, "delta": d.delta, "delta_ci": [d.low, d.high],
                "worse": d.a_worse, "better": d.a_better, "relative": d.delta / ctl.eer,
                "wall_s": time.monotonic() - t0})
            print(f"  {out['arch']:11s} seed {seed} {b} bit  EER {res.eer:6.3f} %  vs control {d.delta:+.3f} "
                  f"[{d.low:+.3f}, {d.high:+.3f}]", flush=True)
    for row in out["rows"].values():
        per = row["per_seed"]
        row["eer_mean"] = statistics.mean(p["eer"] for p in per)
        row["delta_mean"] = statistics.mean(p["delta"] for p in per)
        row["delta_std"] = statistics.stdev(p["delta"] for p in per) if len(per) > 1 else None
        row["relative_mean"] = statistics.mean(p["relative"] for p in per)
        row["n_worse"] = sum(p["worse"] for p in per)
        row["compression"] = out["fp32_bytes"] / row["size_bytes"]
    out["control_eer_mean"] = statistics.mean(c["eer"] for c in out["control"])
    return out


def print_table(models: list[dict[str, Any]]) -> None:
    for m in models:
        print(f"\n{m['arch']} ({m['params']:,} params, fp32 {m['fp32_bytes']:,} B; {m['n_trials']:,} trials): "
              f"fp32 control EER {m['control_eer_mean']:.3f} % (mean of {len(m['control'])} seeds)")
        print("  bits  size B    x     EER %   Δ vs control (pp)   relative   worse/seeds   per-seed paired 95 % CI")
        for row in m["rows"].values():
            cis = "  ".join(f"[{p['delta_ci'][0]:+.2f}, {p['delta_ci'][1]:+.2f}]" for p in row["per_seed"])
            std = f" ± {row['delta_std']:.2f}" if row["delta_std"] is not None else ""
            print(f"  {row['bits']:>4} {row['size_bytes']:>8,} {row['compression']:5.1f}  {row['eer_mean']:6.2f}   "
                  f"{row['delta_mean']:+6.2f}{std:8s}       {100 * row['relative_mean']:+6.1f} %   "
                  f"{row['n_worse']}/{len(row['per_seed'])}         {cis}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--studies", type=Path, nargs="+", default=list(STUDIES))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--max-trials", type=int, default=None, help="trial subset (default: all)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", type=Path, required=True)
    args = ap.parse_args(argv)
    t0 = time.monotonic()
    models = []
    for study in args.studies:
        models.append(run_model(study, args.seeds, args.max_trials, args.device))
        doc = {"meta": {"command": " ".join(sys.argv), "seeds": args.seeds, "n_boot": N_BOOT, "device": args.device,
                        "torch_threads": torch.get_num_threads(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
                        "cpu_count": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
                        "wall_s": time.monotonic() - t0},
               "models": models}
        write_text_atomic(args.json, json.dumps(doc, indent=2) + "\n", overwrite=True)
    print_table(models)
    print(f"\nwall time {time.monotonic() - t0:.0f} s; wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
