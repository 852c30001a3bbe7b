"""How much a trial's EER depends on its fine-tuning seed (issue 14).

A study's seed also seeds its trials' fine-tuning (batch order, crops). When the same recipe scored on the
same trials moves by more across fine-tuning seeds than the differences a search is asked to find, no
sampler can be told apart from another. This bench runs uniform recipes (and the fp32 control, the empty
recipe) through ``Workbench.run`` exactly as a study's trial would, once per fine-tuning seed, for the
study's ``[msft]`` settings and for variants of them, and reports mean, sd and spread (max - min) per row.

    OMP_NUM_THREADS=1 python bench/finetune_noise.py --seeds 0 1 2 3 4 --bits 32 8 4 3 2 1 \\
        --variant quickstart --variant lr0.005:lr=0.005,final_lr=0.001 \\
        --json bench/results/finetune_noise.json

``--variant NAME[:key=value,...]`` overrides fields of the study's :class:`MsftSchedule` (``lr``,
``final_lr``, ``total_steps``, ``batch_size``, ``bn_reestimate_batches``) or of its KMQAT config
(``recluster_every``, ``centroid_update``); a bare NAME runs the study's settings. Bits 32 is the fp32
control; 1 is adaptive binary (the quickstart's only binary mode).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from lsv_core.atomic import write_text_atomic  # noqa: E402
from lsv_core.quant import BitRecipe  # noqa: E402
from lsv_core.quant.msft import MsftSchedule  # noqa: E402
from lsv_core.workbench import Workbench  # noqa: E402
from search.config import load_study_config  # noqa: E402

_KMQAT_FIELDS = {f.name for f in dataclasses.fields(MsftSchedule().kmqat)}
_SCHEDULE_FIELDS = {f.name for f in dataclasses.fields(MsftSchedule)} - {"kmqat", "seed"}


def parse_variant(text: str) -> tuple[str, dict[str, Any]]:
    """``name:key=value,...`` -> (name, {key: value}); values are read as JSON (numbers), else strings."""
    name, _, rest = text.partition(":")
    overrides: dict[str, Any] = {}
    for item in filter(None, rest.split(",")):
        key, sep, raw = item.partition("=")
        if not sep or key not in _SCHEDULE_FIELDS | _KMQAT_FIELDS:
            raise SystemExit(f"--variant {text!r}: {item!r} is not key=value with key in "
                             f"{sorted(_SCHEDULE_FIELDS | _KMQAT_FIELDS)}")
        try:
            overrides[key] = json.loads(raw)
        except json.JSONDecodeError:
            overrides[key] = raw
    return name, overrides


def schedule_for(base: MsftSchedule, overrides: dict[str, Any], seed: int) -> MsftSchedule:
    kmqat = dataclasses.replace(base.kmqat, **{k: v for k, v in overrides.items() if k in _KMQAT_FIELDS})
    rest = {k: v for k, v in overrides.items() if k in _SCHEDULE_FIELDS}
    return dataclasses.replace(base, seed=seed, kmqat=kmqat, **rest)


def recipe_for(bench: Workbench, bits: int) -> BitRecipe:
    if bits == 32:
        return BitRecipe({})
    return BitRecipe.uniform(bench.model, bits, mode="adaptive" if bits == 1 else None)  # type: ignore[arg-type]


def describe(eers: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(eers), "sd": statistics.stdev(eers) if len(eers) > 1 else 0.0,
            "spread": max(eers) - min(eers)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--study", type=Path, default=Path("studies/quickstart.toml"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--bits", type=int, nargs="+", default=[32, 8, 4, 3, 2, 1], choices=[32, 8, 4, 3, 2, 1])
    ap.add_argument("--variant", action="append", default=None, help="NAME[:key=value,...] (repeatable)")
    ap.add_argument("--json", type=Path, required=True)
    args = ap.parse_args(argv)
    variants = [parse_variant(v) for v in (args.variant or ["study"])]
    torch.set_num_threads(1)
    config = load_study_config(args.study)
    base = config.msft_schedule()
    bench = Workbench.load(config.workbench_spec().replace(device="cpu"), progress=False)
    doc: dict[str, Any] = {"study": str(args.study), "n_trials": len(bench.trials), "seeds": args.seeds,
                           "base_schedule": base.to_dict(), "command": " ".join(sys.argv),
                           "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "rows": []}
    t_all = time.monotonic()
    for name, overrides in variants:
        for bits in args.bits:
            eers = []
            for seed in args.seeds:
                outcome = bench.run(recipe_for(bench, bits), schedule_for(base, overrides, seed), n_boot=0)
                eers.append(round(outcome.eer, 4))
            row = {"variant": name, "overrides": overrides, "bits": bits, "eer": eers, **describe(eers)}
            doc["rows"].append(row)
            print(f"{name:14s} {'fp32' if bits == 32 else f'{bits} bit':7s} mean {row['mean']:6.2f}  "
                  f"sd {row['sd']:.2f}  spread {row['spread']:.2f}  per seed {eers}", flush=True)
            doc["wall_s"] = time.monotonic() - t_all
            write_text_atomic(args.json, json.dumps(doc, indent=1) + "\n", overwrite=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
