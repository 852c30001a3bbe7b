"""Benchmark: the deployable model.onnx (codebooks kept) against the dequantized float ONNX, in onnxruntime on CPU.

Claims checked (issue 11), per architecture, for fp32, uniform 8/4/2/1 bit and a mixed recipe:

* file size: ``model.onnx`` at 4 bit is <= 1/7 of the fp32 ``model.onnx``;
* latency per 3 s utterance (298 frames, batch 1, one intra-op thread): ``model.onnx`` within 1.5x of the
  dequantized float ONNX (``model.float.onnx``, BatchNorm folded by the exporter). onnxruntime turns the
  codebook nodes into constant weights once, when the session is created, so the two should run the same
  graph; the session-creation time is reported separately;
* peak RSS of a fresh process that imports onnxruntime, creates the session and runs it (VmHWM), next to
  that of the float file.

Latency: both sessions live in one child process and are timed alternately (A, B, A, B, ...), so load
from other processes on the machine hits both alike; the median of ``--runs`` calls each is reported. RSS:
one fresh child per file. Weights: the given checkpoint (``--checkpoint``), else a randomly initialised
network with non-trivial BatchNorm statistics (sizes and latency do not depend on the values).

The mixed recipe: the knee of a finished study (``--study``; the quickstart's by default when it has
run), else ``--recipe FILE``, else a per-stage mix (conv1 8 bit, layer1 4, layer2 3, layer3 2, layer4 2,
seg_1 adaptive 1 bit).

Usage:
    python bench/deploy.py                                    # ThinResNet, ResNet34, both ECAPA-TDNNs
    python bench/deploy.py --arch ECAPA_TDNN --study studies/quickstart_ecapa.toml \
        --checkpoint baselines/quickstart_ecapa/model.safetensors
    python bench/deploy.py --arch ThinResNet --study studies/quickstart.toml --checkpoint runs/baseline/model.safetensors
    python bench/deploy.py --runs 20 --json bench/results/deploy.json
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SIZE_TARGET_4BIT = 1 / 7  # model.onnx at 4 bit vs fp32 model.onnx
LATENCY_TARGET = 1.5  # model.onnx vs model.float.onnx
FRAMES_3S = 1 + (3 * 16000 - 400) // 160  # 25 ms windows every 10 ms, snip_edges: 298 frames
ARCHS = {"ThinResNet": {"m_channels": 8, "first_stride": 2, "embed_dim": 128}, "ResNet34": {},
         # the ECAPA quickstart's (baselines/quickstart_ecapa) and WeSpeaker's c512
         "ECAPA_TDNN": {"channels": 64, "mfa_channels": 192, "embed_dim": 128}, "ECAPA_TDNN_c512": {}}
# The default mixed recipe when no study knee is at hand: a few bits more at the input, fewer at the output.
STAGE_MIXES: dict[str, dict[str, Any]] = {
    "resnet": {"conv1": 8, "layer1": 4, "layer2": 3, "layer3": 2, "layer4": 2, "seg_1": (1, "adaptive")},
    "ecapa": {"layer1": 8, "layer2": 4, "layer3": 3, "layer4": 2, "conv": 2, "pool": 4, "linear": (1, "adaptive")},
}


# -- children: one process per measurement ----------------------------------------------------------------------------
def _vm(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return -1


def _session(path: str) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def child_latency(paths: list[str], runs: int, feat_dim: int) -> dict[str, Any]:
    x = np.random.default_rng(0).standard_normal((1, FRAMES_3S, feat_dim)).astype(np.float32)
    _session(paths[-1])  # onnxruntime's one-time set-up must not be charged to the first file timed
    sessions, create_ms = [], []
    for p in paths:
        t0 = time.perf_counter()
        sessions.append(_session(p))
        create_ms.append(1000 * (time.perf_counter() - t0))
    for s in sessions:  # warm-up: first runs allocate and pick kernels
        for _ in range(3):
            s.run(None, {"fbank": x})
    times: list[list[float]] = [[] for _ in paths]
    for _ in range(runs):
        for i, s in enumerate(sessions):
            t0 = time.perf_counter()
            s.run(None, {"fbank": x})
            times[i].append(1000 * (time.perf_counter() - t0))
    return {"session_ms": create_ms, "median_ms": [float(np.median(t)) for t in times],
            "p90_ms": [float(np.percentile(t, 90)) for t in times]}


def child_rss(path: str, feat_dim: int) -> dict[str, Any]:
    import onnxruntime  # noqa: F401  (its import is part of the baseline, not of the model)

    base = _vm("VmRSS")
    x = np.random.default_rng(0).standard_normal((1, FRAMES_3S, feat_dim)).astype(np.float32)
    session = _session(path)
    for _ in range(3):
        session.run(None, {"fbank": x})
    return {"rss_after_import": base, "peak_rss": _vm("VmHWM"), "rss_end": _vm("VmRSS")}


def _run_child(args: list[str]) -> dict[str, Any]:
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


# -- parent -----------------------------------------------------------------------------------------------------------
def _mixed_recipe(model: Any, args: argparse.Namespace) -> tuple[Any, str]:
    from lsv_core.quant import BitRecipe, quantizable_layers

    if args.study and Path(args.study).exists():
        try:
            from search import load_study_config
            from search.results.reading import load_points
            from search.results.selection import SelectionRule, select_trial

            config = load_study_config(args.study)
            if config.model.architecture not in (None, model.arch["name"]):
                raise ValueError(f"its model is {config.model.architecture}, not {model.arch['name']}")
            point = select_trial(load_points(config), SelectionRule(knee=True))
            foreign = set(point.recipe) - set(quantizable_layers(model))
            if foreign:
                raise ValueError(f"its recipe names layers this model lacks ({sorted(foreign)[:3]} ...)")
            return BitRecipe.from_mapping(dict(point.recipe)), f"knee of {config.study.name} (trial {point.number})"
        except Exception as err:  # a study that never ran: fall through to the default mix
            print(f"  (no knee from {args.study}: {type(err).__name__}: {err})")
    if args.recipe:
        return BitRecipe.load(args.recipe), f"recipe {args.recipe}"
    mix = STAGE_MIXES["ecapa" if model.arch["name"].startswith("ECAPA") else "resnet"]
    spec = {n: next(v for k, v in mix.items() if n == k or n.startswith(k + ".")) for n in quantizable_layers(model)}
    return BitRecipe(spec), "per-stage mix " + json.dumps(mix)


def _base_model(arch: str, args: argparse.Namespace) -> Any:
    import torch

    from lsv_core.models import build_model, load_checkpoint

    if args.checkpoint:
        model, _ = load_checkpoint(args.checkpoint)
        if model.arch["name"] == arch and all(model.arch["kwargs"].get(k) == v for k, v in ARCHS[arch].items()):
            return model.eval()
    torch.manual_seed(0)
    model = build_model(arch, **ARCHS[arch])
    model.train()
    with torch.no_grad():
        model(torch.randn(4, 200, 80))
    return model.eval()


def bench_arch(arch: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from lsv_core.export.onnx_codebook import save_codebook_onnx
    from lsv_core.export.onnx_export import export_onnx
    from lsv_core.export.wespeaker import dequantized_model
    from lsv_core.quant import (
        BitRecipe,
        InitialCodebooks,
        latent_weight,
        packed_size_bytes,
        packed_tensor_bytes,
        quantizable_layers,
        quantize,
    )

    base = _base_model(arch, args)
    feat_dim = int(base.arch["kwargs"].get("feat_dim", 80))
    modules = dict(base.named_modules())
    codebooks = InitialCodebooks({n: latent_weight(modules[n]) for n in quantizable_layers(base)})
    mixed, mixed_from = _mixed_recipe(base, args)
    configs = {"fp32": BitRecipe({}), **{f"{b} bit": BitRecipe.uniform(base, b) for b in (8, 4, 2, 1)},
               "mixed": mixed}
    rows = []
    for label, recipe in configs.items():
        model = quantize(copy.deepcopy(base), recipe, codebooks=codebooks).eval()
        codebook_path = save_codebook_onnx(model, work / f"{arch}-{label.replace(' ', '')}.onnx", overwrite=True)
        float_path = export_onnx(dequantized_model(model), work / f"{arch}-{label.replace(' ', '')}.float.onnx",
                                 overwrite=True)
        assert codebook_path.stat().st_size == packed_size_bytes(model)
        lat = _run_child(["--child-latency", str(codebook_path), str(float_path), "--runs", str(args.runs),
                          "--feat-dim", str(feat_dim)])
        rss = [_run_child(["--child-rss", str(p), "--feat-dim", str(feat_dim)]) for p in (codebook_path, float_path)]
        rows.append({
            "config": label, "recipe": recipe.to_dict() if label == "mixed" else None,
            "onnx_bytes": codebook_path.stat().st_size, "tensor_bytes": packed_tensor_bytes(model),
            "onnx_data_bytes": _data_bytes(codebook_path),
            "float_onnx_bytes": float_path.stat().st_size,
            "latency_ms": lat["median_ms"][0], "float_latency_ms": lat["median_ms"][1],
            "latency_p90_ms": lat["p90_ms"][0], "float_latency_p90_ms": lat["p90_ms"][1],
            "latency_ratio": lat["median_ms"][0] / lat["median_ms"][1],
            "session_ms": lat["session_ms"][0], "float_session_ms": lat["session_ms"][1],
            "peak_rss": rss[0]["peak_rss"], "float_peak_rss": rss[1]["peak_rss"],
            "rss_end": rss[0]["rss_end"], "float_rss_end": rss[1]["rss_end"],
            "rss_after_import": rss[0]["rss_after_import"],
        })
        _print_row(arch, rows[-1], rows[0]["onnx_bytes"])
    fp32, four = rows[0]["onnx_bytes"], next(r for r in rows if r["config"] == "4 bit")["onnx_bytes"]
    return {"arch": arch, "kwargs": base.arch["kwargs"], "mixed_from": mixed_from, "rows": rows,
            "size_ratio_4bit": four / fp32, "size_target_met": four <= SIZE_TARGET_4BIT * fp32,
            "worst_latency_ratio": max(r["latency_ratio"] for r in rows),
            "latency_target_met": all(r["latency_ratio"] <= LATENCY_TARGET for r in rows)}


def _data_bytes(path: Path) -> int:
    """Bytes of tensor data in an ONNX file (the rest is graph, names and header)."""
    import onnx

    return sum(len(t.raw_data) for t in onnx.load(str(path)).graph.initializer)


def _print_row(arch: str, r: dict[str, Any], fp32: int) -> None:
    mb = 1 / 1e6
    print(f"  {arch:10s} {r['config']:7s} model.onnx {r['onnx_bytes']:>11,} B ({fp32 / r['onnx_bytes']:5.1f}x; graph "
          f"{r['onnx_bytes'] - r['onnx_data_bytes']:>6,} B; {r['onnx_bytes'] / r['tensor_bytes']:.3f} x packed "
          f"tensors) | float.onnx {r['float_onnx_bytes']:>11,} B | latency {r['latency_ms']:7.2f} vs "
          f"{r['float_latency_ms']:7.2f} ms ({r['latency_ratio']:.2f}x) | session {r['session_ms']:6.1f} vs "
          f"{r['float_session_ms']:6.1f} ms | peak RSS {r['peak_rss'] * mb:6.1f} vs {r['float_peak_rss'] * mb:6.1f} MB, "
          f"after {r['rss_end'] * mb:6.1f} vs {r['float_rss_end'] * mb:6.1f} MB (import {r['rss_after_import'] * mb:.1f})",
          flush=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", nargs="+", default=list(ARCHS), choices=list(ARCHS))
    p.add_argument("--checkpoint", help="trained weights (lsv train output) for the --arch they fit, instead of random ones")
    p.add_argument("--study", default="studies/quickstart.toml", help="take the mixed recipe from this study's knee")
    p.add_argument("--recipe", help="mixed recipe file (when no study has run)")
    p.add_argument("--runs", type=int, default=30, help="timed runs per file")
    p.add_argument("--json", type=Path, default=Path("bench/results/deploy.json"))
    p.add_argument("--child-latency", nargs=2, help=argparse.SUPPRESS)
    p.add_argument("--child-rss", help=argparse.SUPPRESS)
    p.add_argument("--feat-dim", type=int, default=80, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child_latency:
        print(json.dumps(child_latency(args.child_latency, args.runs, args.feat_dim)))
        return 0
    if args.child_rss:
        print(json.dumps(child_rss(args.child_rss, args.feat_dim)))
        return 0
    import onnxruntime
    import torch

    t0 = time.time()
    results = []
    with tempfile.TemporaryDirectory(prefix="lsv-deploy-bench-") as work:
        for arch in args.arch:
            print(f"{arch}: {FRAMES_3S} frames (3 s), batch 1, 1 thread, median of {args.runs} alternating runs")
            results.append(bench_arch(arch, args, Path(work)))
    for r in results:
        print(f"{r['arch']}: 4-bit model.onnx / fp32 = {r['size_ratio_4bit']:.4f} (target <= {SIZE_TARGET_4BIT:.4f}: "
              f"{'met' if r['size_target_met'] else 'NOT met'}); worst latency ratio {r['worst_latency_ratio']:.2f}x "
              f"(target <= {LATENCY_TARGET}: {'met' if r['latency_target_met'] else 'NOT met'}); mixed = {r['mixed_from']}")
    doc = {"command": " ".join(sys.argv), "machine": platform.platform(), "python": platform.python_version(),
           "onnxruntime": onnxruntime.__version__, "torch": torch.__version__, "frames": FRAMES_3S,
           "runs": args.runs, "wall_s": time.time() - t0, "results": results}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {args.json}")
    return 0 if all(r["size_target_met"] and r["latency_target_met"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
