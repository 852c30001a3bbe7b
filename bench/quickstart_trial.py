"""One quickstart trial with whichever ``lsv_core`` is first on PYTHONPATH, for before/after timings.

``Workbench.load`` of ``studies/quickstart.toml`` (baseline, corpus and cache given here), then
``Workbench.run`` of uniform 4 bit with the study's ``[msft]`` schedule and ``max_trials``, one torch thread.
BENCHMARKS.md ("Data at scale") alternates it between main's checkout and a branch:

    PYTHONPATH=/path/to/checkout python bench/quickstart_trial.py --baseline B --corpus C --cache DIR
"""

from __future__ import annotations

import argparse
import resource
import time
import tomllib
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--study", type=Path, default=Path(__file__).resolve().parent.parent / "studies" / "quickstart.toml")
    p.add_argument("--baseline", required=True, type=Path)
    p.add_argument("--corpus", required=True, type=Path)
    p.add_argument("--cache", required=True, type=Path)
    args = p.parse_args()

    import torch

    import lsv_core
    from lsv_core.quant import BitRecipe
    from lsv_core.workbench import Workbench
    from search.config import parse_study_config

    torch.set_num_threads(1)
    raw = tomllib.loads(args.study.read_text())
    raw["model"]["checkpoint"] = str(args.baseline)
    raw["data"]["corpus"] = str(args.corpus)
    raw["data"]["cache_dir"] = str(args.cache)
    cfg = parse_study_config(raw)
    t1 = time.perf_counter()
    bench = Workbench.load(cfg.workbench_spec().replace(device="cpu", codebook_dir=None), progress=False)
    t2 = time.perf_counter()
    out = bench.run(BitRecipe.uniform(bench.model, 4), cfg.msft_schedule(), n_boot=200)
    t3 = time.perf_counter()
    print(f"{Path(lsv_core.__file__).parent.parent}: load {t2 - t1:.2f} s, trial {t3 - t2:.2f} s, EER {out.eer:.2f} %, "
          f"cpu {time.process_time():.1f} s, peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


if __name__ == "__main__":
    main()
