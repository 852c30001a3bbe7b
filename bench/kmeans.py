"""Benchmark: ``lsv_core.quant.kmeans_1d`` against scikit-learn's KMeans on ResNet34's weight tensors.

Claim checked: over every weight tensor of WeSpeaker ResNet34 (m_channels 32, feat_dim 80, embed_dim 256;
6.6 M weights) at 1, 2, 3, 4 and 8 bits, ``kmeans_1d`` is >= 50x faster in total than
``sklearn.cluster.KMeans(n_clusters=2**b, n_init=1, random_state=0)`` on the same data, and its inertia is
<= scikit-learn's on every (layer, bits) up to a relative 1e-6.

Data: tensors of ResNet34's shapes filled with Laplace (even layers) or normal (odd layers) values with
the Kaiming scale sqrt(2 / fan_in) (trained conv weights are bell-shaped with heavy tails; freshly
initialised ones are uniform, which is easier). Both methods get the same float32 array; inertia is
recomputed for both in float64 as the squared distance to the nearest returned centroid. Both run with
the same thread limit (``--threads``, default 1: the comparison is per core).

Usage:
    python bench/kmeans.py                 # full run (minutes: the scikit-learn reference is slow)
    python bench/kmeans.py --quick         # five small layers
    python bench/kmeans.py --json bench/results/kmeans.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lsv_core.quant.kmeans import kmeans_1d, kmeans_inertia  # noqa: E402

SPEEDUP_TARGET = 50.0
INERTIA_RTOL = 1e-6
QUICK_LAYERS = ("conv1", "layer1.0.conv1", "layer2.0.conv1", "layer2.0.shortcut.0", "layer3.0.conv1")


def resnet34_weight_shapes() -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every Conv/Linear weight of WeSpeaker ResNet34, in definition order."""
    shapes: list[tuple[str, tuple[int, ...]]] = [("conv1", (32, 1, 3, 3))]
    in_planes = 32
    for li, (planes, blocks) in enumerate(zip((32, 64, 128, 256), (3, 4, 6, 3), strict=True), start=1):
        for bi in range(blocks):
            shapes.append((f"layer{li}.{bi}.conv1", (planes, in_planes, 3, 3)))
            shapes.append((f"layer{li}.{bi}.conv2", (planes, planes, 3, 3)))
            if bi == 0 and in_planes != planes:
                shapes.append((f"layer{li}.{bi}.shortcut.0", (planes, in_planes, 1, 1)))
            in_planes = planes
    # 80 mel bins / 8 (three stride-2 stages) = 10; x 256 channels x 2 (mean and std pooling) = 5120.
    shapes.append(("seg_1", (256, 5120)))
    return shapes


def layer_data(index: int, shape: tuple[int, ...]) -> np.ndarray:
    rng = np.random.default_rng(1000 + index)
    fan_in = int(np.prod(shape[1:]))
    std = np.sqrt(2.0 / fan_in)
    if index % 2 == 0:
        x = rng.laplace(scale=std / np.sqrt(2.0), size=shape)
    else:
        x = rng.normal(scale=std, size=shape)
    return x.astype(np.float32)


def run(layers: list[tuple[str, tuple[int, ...]]], bits_list: list[int]) -> dict[str, Any]:
    from sklearn.cluster import KMeans

    rows: list[dict[str, Any]] = []
    all_shapes = resnet34_weight_shapes()
    for name, shape in layers:
        x = layer_data([n for n, _ in all_shapes].index(name), shape)
        flat = x.reshape(-1)
        for bits in bits_list:
            k = 2**bits
            t0 = time.perf_counter()
            ours_c, _ = kmeans_1d(x, k, seed=0)
            t_ours = time.perf_counter() - t0
            t0 = time.perf_counter()
            km = KMeans(n_clusters=k, n_init=1, random_state=0).fit(flat[:, None])
            t_sk = time.perf_counter() - t0
            i_ours = kmeans_inertia(flat, ours_c)
            i_sk = kmeans_inertia(flat, km.cluster_centers_.ravel())
            ratio = i_ours / i_sk if i_sk > 0 else (1.0 if i_ours == 0 else float("inf"))
            row = {
                "layer": name,
                "shape": list(shape),
                "n": int(flat.size),
                "bits": bits,
                "time_ours_s": t_ours,
                "time_sklearn_s": t_sk,
                "inertia_ours": i_ours,
                "inertia_sklearn": i_sk,
                "inertia_ratio": ratio,
            }
            rows.append(row)
            print(
                f"{name:22s} n={flat.size:8d} b={bits}  ours {t_ours * 1e3:8.1f} ms  sklearn {t_sk * 1e3:9.1f} ms"
                f"  speedup {t_sk / t_ours:7.1f}x  inertia ratio {ratio:.6f}",
                flush=True,
            )
    t_ours = sum(r["time_ours_s"] for r in rows)
    t_sk = sum(r["time_sklearn_s"] for r in rows)
    worst = max(rows, key=lambda r: r["inertia_ratio"])
    by_bits = {
        str(b): {
            "time_ours_s": sum(r["time_ours_s"] for r in rows if r["bits"] == b),
            "time_sklearn_s": sum(r["time_sklearn_s"] for r in rows if r["bits"] == b),
            "worst_inertia_ratio": max(r["inertia_ratio"] for r in rows if r["bits"] == b),
        }
        for b in bits_list
    }
    return {
        "rows": rows,
        "by_bits": by_bits,
        "total_time_ours_s": t_ours,
        "total_time_sklearn_s": t_sk,
        "speedup": t_sk / t_ours,
        "worst_inertia_ratio": worst["inertia_ratio"],
        "worst_inertia_case": f"{worst['layer']} b={worst['bits']}",
        "speedup_ok": t_sk / t_ours >= SPEEDUP_TARGET,
        "inertia_ok": all(r["inertia_ratio"] <= 1.0 + INERTIA_RTOL for r in rows),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help=f"only layers {', '.join(QUICK_LAYERS)}")
    parser.add_argument("--bits", type=int, nargs="+", default=[1, 2, 3, 4, 8])
    parser.add_argument("--threads", type=int, default=1, help="thread limit for both methods (default 1)")
    parser.add_argument(
        "--json", type=Path, default=None, help="write results (per layer/bits and totals) here"
    )
    args = parser.parse_args(argv)

    from threadpoolctl import threadpool_limits

    layers = resnet34_weight_shapes()
    if args.quick:
        layers = [(n, s) for n, s in layers if n in QUICK_LAYERS]
    with threadpool_limits(limits=args.threads):
        result = run(layers, args.bits)
    n_weights = sum(int(np.prod(s)) for _, s in layers)
    print(
        f"\n{len(layers)} layers, {n_weights} weights, bits {args.bits}\n"
        f"total: ours {result['total_time_ours_s']:.2f} s, sklearn {result['total_time_sklearn_s']:.2f} s, "
        f"speedup {result['speedup']:.1f}x (target >= {SPEEDUP_TARGET:.0f}x: "
        f"{'ok' if result['speedup_ok'] else 'MISSED'})\n"
        f"worst inertia ratio ours/sklearn {result['worst_inertia_ratio']:.6f} at {result['worst_inertia_case']} "
        f"(target <= 1 + {INERTIA_RTOL:g}: {'ok' if result['inertia_ok'] else 'MISSED'})"
    )
    for b, agg in result["by_bits"].items():
        print(
            f"  {b} bit: ours {agg['time_ours_s']:.3f} s, sklearn {agg['time_sklearn_s']:.2f} s, "
            f"worst ratio {agg['worst_inertia_ratio']:.6f}"
        )
    if args.json is not None:
        import sklearn

        result["meta"] = {
            "quick": args.quick,
            "bits": args.bits,
            "threads": args.threads,
            "n_layers": len(layers),
            "n_weights": n_weights,
            "sklearn": sklearn.__version__,
            "numpy": np.__version__,
            "python": platform.python_version(),
            "machine": platform.processor() or platform.machine(),
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0 if result["speedup_ok"] and result["inertia_ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
