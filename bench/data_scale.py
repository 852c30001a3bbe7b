"""Data at scale: does fine-tuning keep flat memory and speed from 4 k to 200 k utterances?

Builds Kaldi data dirs of 4 k, 40 k and 200 k utterances from the embedded corpus (hard links under new
utterance ids, so nothing is shared in the content-keyed cache), builds their feature stores (throughput
in utterances/s), then runs one 200-step fine-tune of the thin ResNet per size in a fresh process and
records its peak RSS and steps/s; finally evaluates 40 k trials over the 4 k utterances (time, peak RSS).

    nice -n 10 python bench/data_scale.py --corpus data/corpus --work /tmp/lsv-scale

Targets (issue 10): peak RSS at 200 k within 1.25x of 4 k; steps/s at 200 k within 15 % of 4 k.
Results: bench/results/data_scale.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def make_data_dir(corpus: Path, out: Path, n: int) -> Path:
    """``n`` utterances: the corpus's train + eval audio hard-linked again and again under new ids."""
    from lsv_core.data.manifest import read_kaldi_dir

    if (out / "utt2spk").exists():
        return out
    sources = [u for d in ("train", "eval") for u in read_kaldi_dir(corpus / d)]
    wav = out / "wav"
    wav.mkdir(parents=True, exist_ok=True)
    scp, u2s = [], []
    for k in range(n):
        src = sources[k % len(sources)]
        utt = f"{src.speaker}-n{n}-c{k // len(sources):03d}-{src.utt}"  # ids unique per size
        dst = wav / f"{utt}.wav"
        if not dst.exists():
            os.link(src.path.resolve(), dst)
        scp.append(f"{utt} wav/{utt}.wav\n")
        u2s.append(f"{utt} {src.speaker}\n")
    order = sorted(range(n), key=lambda i: scp[i])
    (out / "wav.scp").write_text("".join(scp[i] for i in order))
    (out / "utt2spk").write_text("".join(u2s[i] for i in order))
    return out


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_finetune(data_dir: Path, cache: Path, mode: str, steps: int, batch: int, workers: int) -> dict:
    """One fine-tune in this process (called in a fresh subprocess): load, then ``steps`` steps."""
    import torch

    from lsv_core.data.loader import DataLoading, open_features
    from lsv_core.data.manifest import read_data
    from lsv_core.models import AAMSoftmax, build_model
    from lsv_core.train import CropSampler, Schedule, fit, make_optimizer

    torch.set_num_threads(2)
    t0 = time.monotonic()
    data = read_data(data_dir)
    spk_index = {s: i for i, s in enumerate(data.speakers)}
    speakers = {u.utt: spk_index[u.speaker] for u in data}
    source, taken = open_features(data, loading=DataLoading(features=mode), cache_dir=cache, progress=False)
    del data
    load_s = time.monotonic() - t0
    rss_after_load = peak_rss_mb()
    torch.manual_seed(0)
    model = build_model("ThinResNet", m_channels=8, num_blocks=[1, 1, 1, 1], first_stride=2, embed_dim=128)
    head = AAMSoftmax(128, len(spk_index))
    sampler = CropSampler(source, speakers, batch_size=batch, seed=0, workers=workers)
    opt = make_optimizer(list(model.parameters()) + list(head.parameters()), "sgd", 0.01, 1e-4)
    fit(model, head, sampler, opt, Schedule(10, 0.01, 0.001), progress=False)  # warm-up (allocator, caches)
    t1 = time.monotonic()
    fit(model, head, sampler, opt, Schedule(steps, 0.01, 0.001), progress=False)
    train_s = time.monotonic() - t1
    sampler.close()
    return {"utterances": len(source), "mode": taken, "load_s": round(load_s, 2), "train_s": round(train_s, 2),
            "steps_per_s": round(steps / train_s, 3), "rss_after_load_mb": round(rss_after_load, 1),
            "peak_rss_mb": round(peak_rss_mb(), 1), "workers": workers, "batch": batch, "steps": steps}


def run_eval(data_dir: Path, cache: Path, n_trials: int) -> dict:
    """Score ``n_trials`` random trials over the utterances of ``data_dir`` (thin ResNet, features from the store)."""
    import numpy as np
    import torch

    from lsv_core.data.loader import DataLoading
    from lsv_core.evaluate import evaluate_dir
    from lsv_core.models import build_model

    torch.set_num_threads(2)
    from lsv_core.data.manifest import read_data

    data = read_data(data_dir)
    utts, spk = list(data.utterances), [u.speaker for u in data]
    rng = np.random.default_rng(0)
    trials = data_dir / "trials_eval"
    if not trials.exists():
        lines = []
        by_spk: dict[str, list[int]] = {}
        for i, s in enumerate(spk):
            by_spk.setdefault(s, []).append(i)
        for k in range(n_trials):
            a = int(rng.integers(len(utts)))
            if k % 5 == 0:
                b = int(rng.choice(by_spk[spk[a]]))
            else:
                b = int(rng.integers(len(utts)))
            lines.append(f"{int(spk[a] == spk[b])} {utts[a]} {utts[b]}\n")
        trials.write_text("".join(lines))
    torch.manual_seed(0)
    model = build_model("ThinResNet", m_channels=8, num_blocks=[1, 1, 1, 1], first_stride=2, embed_dim=128).eval()
    t0 = time.monotonic()
    result = evaluate_dir(model, data_dir, trials, cache_dir=cache, n_boot=0, progress=False,
                          loading=DataLoading(features="store"))
    return {"trials": result.n_trials, "utterances": len(utts), "eval_s": round(time.monotonic() - t0, 2),
            "peak_rss_mb": round(peak_rss_mb(), 1), "eer": result.eer}


def build_cache(data_dir: Path, cache: Path, workers: int) -> dict:
    from lsv_core.data.fingerprint import manifest_of
    from lsv_core.data.manifest import read_data
    from lsv_core.data.store import build_store

    data = read_data(data_dir)
    t0 = time.monotonic()
    manifest = manifest_of(data, cache_dir=cache, progress=False)
    hash_s = time.monotonic() - t0
    n = build_store(data, manifest, cache, workers=workers, progress=True)
    total = time.monotonic() - t0
    return {"utterances": len(data), "computed": n, "hash_s": round(hash_s, 1), "build_s": round(total, 1),
            "utt_per_s": round(n / max(total, 1e-9), 1), "workers": workers}


def in_subprocess(fn: str, **kwargs: object) -> dict:
    """Run ``fn(**kwargs)`` of this module in a fresh Python, so peak RSS is that run's alone."""
    code = (f"import json, sys; sys.path.insert(0, {str(ROOT)!r}); import bench.data_scale as b; "
            f"print('@@' + json.dumps(b.{fn}(**{{k: (__import__('pathlib').Path(v) if k in ('data_dir', 'cache') "
            f"else v) for k, v in json.loads(sys.argv[1]).items()}})))")
    out = subprocess.run([sys.executable, "-c", code, json.dumps({k: str(v) if isinstance(v, Path) else v
                                                                  for k, v in kwargs.items()})],
                         capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if out.returncode != 0:
        raise RuntimeError(f"{fn} failed:\n{out.stderr[-3000:]}")
    return json.loads(next(line for line in out.stdout.splitlines() if line.startswith("@@"))[2:])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--corpus", type=Path, default=ROOT / "data" / "corpus")
    p.add_argument("--work", type=Path, default=Path("/tmp/lsv-data-scale"))
    p.add_argument("--sizes", default="4000,40000,200000")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--repeats", type=int, default=2, help="fine-tunes per size, interleaved; the best is kept")
    p.add_argument("--eval-trials", type=int, default=40000)
    p.add_argument("--skip", default="", help="comma list of stages to skip: build,finetune,eval")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "data_scale.json")
    args = p.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    skip = set(filter(None, args.skip.split(",")))
    results: dict = json.loads(args.out.read_text()) if args.out.exists() else {}
    results["command"] = " ".join(sys.argv)

    def save() -> None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2))

    dirs = {n: make_data_dir(args.corpus, args.work / f"data{n}", n) for n in sizes}
    # One cache folder per size: a shared one would make the small runs read the big stores' indices too.
    caches = {n: args.work / f"cache{n}" for n in sizes}
    if "build" not in skip:
        for n in sizes:
            r = in_subprocess("build_cache", data_dir=dirs[n], cache=caches[n], workers=2)
            print(f"cache {n:>7} utts: {r}", flush=True)
            results.setdefault("cache_build", {})[str(n)] = r
            save()
    if "finetune" not in skip:
        runs: dict[str, list[dict]] = {}
        for rep in range(args.repeats):
            for n in sizes:
                r = in_subprocess("run_finetune", data_dir=dirs[n], cache=caches[n], mode="store", steps=args.steps,
                                  batch=args.batch, workers=0)
                print(f"fine-tune {n:>7} utts (store, rep {rep}): {r}", flush=True)
                runs.setdefault(str(n), []).append(r)
            r = in_subprocess("run_finetune", data_dir=dirs[sizes[0]], cache=caches[sizes[0]], mode="memory",
                              steps=args.steps, batch=args.batch, workers=0)
            print(f"fine-tune {sizes[0]:>7} utts (memory, rep {rep}): {r}", flush=True)
            runs.setdefault(f"{sizes[0]}-memory", []).append(r)
        results["finetune"] = {k: {"best_steps_per_s": max(x["steps_per_s"] for x in v),
                                   "peak_rss_mb": max(x["peak_rss_mb"] for x in v), "runs": v}
                               for k, v in runs.items()}
        small, big = results["finetune"][str(sizes[0])], results["finetune"][str(sizes[-1])]
        results["targets"] = {
            "rss_ratio": round(big["peak_rss_mb"] / small["peak_rss_mb"], 3), "rss_ratio_target": 1.25,
            "speed_ratio": round(big["best_steps_per_s"] / small["best_steps_per_s"], 3), "speed_ratio_target": 0.85,
        }
        print(f"targets: {results['targets']}", flush=True)
        save()
    if "eval" not in skip:
        r = in_subprocess("run_eval", data_dir=dirs[sizes[0]], cache=caches[sizes[0]], n_trials=args.eval_trials)
        print(f"evaluate {args.eval_trials} trials over {sizes[0]} utterances: {r}", flush=True)
        results["evaluate"] = r
        save()


if __name__ == "__main__":
    main()
