"""One-dimensional k-means for per-layer weight codebooks.

KMQAT (docs/method.md, "known") gives every layer its own 2^b centroids from k-means over that layer's
weights and re-generates them during training, so this runs many times per fine-tuning job over tensors
of up to ~1.3 M values (ResNet34's ``seg_1``). Generic k-means (scikit-learn's Lloyd/Elkan with
k-means++) costs O(n k) per iteration and stops at a local optimum; in one dimension we can do better on
both counts because an optimal clustering of sorted data is a partition into contiguous runs.

Algorithm (deterministic: no random numbers are drawn, so ``seed`` does not change the result):

* Small inputs (``n_clusters * size <= 2**14``): the globally optimal partition by dynamic programming
  over the sorted distinct values with prefix sums. Exact. (The 1-D k-means cost satisfies the
  quadrangle inequality, so each DP row can be computed by divide and conquer.)
* Larger inputs, without ever sorting the whole tensor (sorting 1 M floats costs more than the rest):

  1. a fine uniform histogram (``max(4096, 64 * n_clusters)`` bins) of count, sum and sum of squares per
     bin, by ``np.bincount`` in O(n); its non-empty bins are the "atoms" of stages 2-4. If outliers
     stretch the range so far that one bin holds more than ``size / n_clusters`` values, the bins are
     given extra edges at quantiles; if there are fewer than ``2 * n_clusters`` atoms, the atoms become
     the sorted distinct values;
  2. greedy divisive grouping of the atoms into ``max(256, 2.5 * n_clusters)`` runs (split the runs whose
     best 2-split gains most, level by level): the boundaries land where the data needs them, including
     on isolated tail values, which dominate the inertia of heavy-tailed layers at 8 bits;
  3. the optimal choice of ``n_clusters`` runs from those groups by the exact DP (a banded variant, see
     ``_optimal_partition_banded``);
  4. a windowed-DP pass on the atoms: all boundaries re-optimised jointly, each within 12 atoms of its
     position (a Viterbi sweep), which can shift many clusters at once, a move Lloyd iterations cannot
     make; it never increases the cost;
  5. exact Lloyd iterations on the data within the bins that hold the midpoints: the count and sum of
     points below each midpoint come from histogram prefix sums plus a sorted copy of those bins' points,
     so an iteration costs O(k log n), not O(n k).

  Not guaranteed optimal: in our checks (Laplace/normal samples of 2e4-1e5 values) the inertia was
  optimal to 1e-5 at up to 16 clusters and within 0.2 % (64) / 0.5 % (256 clusters) of the exact DP
  optimum, and below scikit-learn's KMeans on every ResNet34 layer and bit width
  (``bench/kmeans.py``); ``tests/test_kmeans.py`` checks against brute force and the exact DP.

Degenerate inputs: if ``n_clusters`` exceeds the number of distinct values ``d``, the first ``d`` centroids
are the distinct values and the remaining slots repeat the largest one (a codebook keeps exactly
``n_clusters`` entries, so the index width stays ``b`` bits); labels only ever point at the first copy.
A constant tensor gives ``n_clusters`` copies of its value and all-zero labels.
"""

from __future__ import annotations

from typing import TypeVar

import numpy as np
import torch

__all__ = ["kmeans_1d", "kmeans_inertia", "nearest_centroid"]

ArrayT = TypeVar("ArrayT", np.ndarray, torch.Tensor)

# Exact DP over the sorted distinct values when n_clusters * size is at most this.
_EXACT_MAX_WORK = 1 << 14
# The DP uses a dense (M+1)^2 cost matrix while n_clusters * M^2 is at most this; else banded rows.
_DENSE_DP_MAX_WORK = 1 << 22
# Banded DP rows scan at most this many split candidates per end position; wider rows use D&C.
_BAND_MAX_WIDTH = 48
# Histogram path: the exact DP runs over max(_COARSE_MIN, _COARSE_PER_CLUSTER * k) groups of atoms.
_COARSE_MIN = 256
_COARSE_PER_CLUSTER = 2.5
# Histogram bins: at least this many per cluster, and at least _MIN_BINS.
_BINS_PER_CLUSTER = 64
_MIN_BINS = 4096
# Windowed-DP refinement: a boundary moves at most this many atoms per pass; passes (stops when stable).
_REFINE_RADIUS = 12
_REFINE_MAX_PASSES = 1


def kmeans_1d(values: ArrayT, n_clusters: int, seed: int = 0, max_iter: int = 100) -> tuple[ArrayT, ArrayT]:
    """Cluster the entries of ``values`` (any shape, flattened) into ``n_clusters`` groups.

    Args:
        values: real numbers, numpy array or torch tensor (any device; the work runs on the CPU and the
            results are moved back to ``values.device``). NaN or Inf raise ``ValueError``.
        n_clusters: number of centroids, >= 1 (2^b for a b-bit codebook).
        seed: accepted for API compatibility with randomised k-means; this algorithm draws no random
            numbers, so the result is the same for every seed.
        max_iter: cap on Lloyd iterations per stage (they normally converge in far fewer).

    Returns:
        ``(centroids, labels)``: centroids of shape ``(n_clusters,)`` sorted ascending, in the input's
        floating dtype (float64 for integer numpy input, the default dtype for integer tensors); labels,
        int64 with the shape of ``values``: the index of the nearest centroid (a value exactly halfway
        between two centroids goes to the lower one). Same kind (numpy/torch) as the input.
    """
    _check_int("n_clusters", n_clusters, minimum=1)
    _check_int("max_iter", max_iter, minimum=1)
    _check_int("seed", seed, minimum=None)
    is_torch = isinstance(values, torch.Tensor)
    if is_torch:
        src = values.detach()
        if src.is_complex():
            raise ValueError(f"values has complex dtype {src.dtype}; k-means needs real numbers")
        out_dtype_t = src.dtype if src.is_floating_point() else torch.get_default_dtype()
        x = src.reshape(-1).to("cpu", torch.float64).numpy()
        shape: tuple[int, ...] = tuple(src.shape)
    else:
        arr = np.asarray(values)
        if np.iscomplexobj(arr) or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_):
            raise ValueError(f"values has dtype {arr.dtype}; k-means needs real numbers")
        out_dtype = arr.dtype if np.issubdtype(arr.dtype, np.floating) else np.dtype(np.float64)
        x = arr.reshape(-1).astype(np.float64, copy=False)
        shape = arr.shape
    if x.size == 0:
        raise ValueError("values is empty; k-means needs at least one value")
    lo, hi = float(x.min()), float(x.max())  # NaN propagates into min/max, so this also checks finiteness
    if not (np.isfinite(lo) and np.isfinite(hi)):
        bad = int(x.size - np.count_nonzero(np.isfinite(x)))
        raise ValueError(
            f"values contains NaN or Inf ({bad} of {x.size} entries); k-means needs finite values"
        )

    solver = _make_solver(x, lo, hi, n_clusters, max_iter)
    centroids64 = solver.centroids()
    # Round to the output dtype first, then assign, so labels are nearest for the centroids returned.
    if is_torch:
        c_out_t = torch.from_numpy(centroids64).to(out_dtype_t)
        c_rounded = c_out_t.to(torch.float64).numpy()
    else:
        c_out = centroids64.astype(out_dtype)
        c_rounded = c_out.astype(np.float64)
    labels = solver.labels((c_rounded[:-1] + c_rounded[1:]) * 0.5).reshape(shape)
    if is_torch:
        device = values.device
        return c_out_t.to(device), torch.from_numpy(labels).to(device)
    return c_out, labels


def nearest_centroid(values: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Index of the nearest of the ascending ``centroids`` for each entry of ``values`` (int64, flat).

    Ties (a value exactly at a midpoint, or repeated centroids) go to the lower index, matching
    ``torch.bucketize(..., right=False)`` on the midpoints, which the quantized layers use.
    """
    x = np.asarray(values, dtype=np.float64).reshape(-1)
    c = np.asarray(centroids, dtype=np.float64)
    return np.searchsorted((c[:-1] + c[1:]) * 0.5, x, side="left").astype(np.int64)


def kmeans_inertia(values: np.ndarray | torch.Tensor, centroids: np.ndarray | torch.Tensor) -> float:
    """Sum of squared distances (float64, units of ``values`` squared) from each value to its nearest centroid."""
    if isinstance(values, torch.Tensor):
        values = values.detach().to("cpu", torch.float64).numpy()
    if isinstance(centroids, torch.Tensor):
        centroids = centroids.detach().to("cpu", torch.float64).numpy()
    x = np.asarray(values, dtype=np.float64).reshape(-1)
    c = np.sort(np.asarray(centroids, dtype=np.float64).reshape(-1))
    d = x - c[nearest_centroid(x, c)]
    return float(np.dot(d, d))


# --------------------------------------------------------------------------------------------- internals


def _check_int(name: str, value: object, minimum: int | None) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name}={value!r} should be an integer")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name}={value!r} should be >= {minimum}")


class _Solver:
    """Holds the data of one call: ``centroids()`` then ``labels(midpoints)``."""

    def __init__(self, x: np.ndarray, centroids: np.ndarray) -> None:
        self.x, self._c = x, centroids

    def centroids(self) -> np.ndarray:
        return self._c

    def labels(self, mids: np.ndarray) -> np.ndarray:
        return np.searchsorted(mids, self.x, side="left").astype(np.int64)


def _make_solver(x: np.ndarray, lo: float, hi: float, k: int, max_iter: int) -> _Solver:
    if lo == hi:
        return _Solver(x, np.full(k, lo))
    if x.size * k <= _EXACT_MAX_WORK:
        uniq, counts = np.unique(x, return_counts=True)
        if uniq.size <= k:
            return _Solver(x, _pad(uniq, k))
        return _Solver(x, _exact_on_atoms(uniq, counts.astype(np.float64), k))
    return _HistogramKMeans(x, lo, hi, k, max_iter)


def _pad(uniq: np.ndarray, k: int) -> np.ndarray:
    # Fewer distinct values than clusters: every value is its own centroid; pad by repeating the largest so
    # the codebook keeps k entries (labels use the first copy, see nearest_centroid).
    return np.concatenate([uniq, np.full(k - uniq.size, uniq[-1])])


def _prefix(a: np.ndarray) -> np.ndarray:
    out = np.empty(a.size + 1, dtype=np.float64)
    out[0] = 0.0
    np.cumsum(a, out=out[1:])
    return out


def _run_cost(N: np.ndarray, S: np.ndarray, Q: np.ndarray, j: np.ndarray, i: np.ndarray) -> np.ndarray:
    """SSE of the run of atoms ``j..i-1`` (j < i) from prefix sums of weight, sum and sum of squares."""
    n = N[i] - N[j]
    s = S[i] - S[j]
    return np.maximum(Q[i] - Q[j] - s * s / n, 0.0)


def _exact_on_atoms(values: np.ndarray, weights: np.ndarray, k: int) -> np.ndarray:
    """Globally optimal centroids for sorted distinct ``values`` with multiplicities ``weights``."""
    shift = float(np.dot(values, weights) / weights.sum())
    vc = values - shift  # centred so the sum-of-squares prefix sums do not cancel catastrophically
    N, S, Q = _prefix(weights), _prefix(vc * weights), _prefix(vc * vc * weights)
    bounds = _optimal_partition(N, S, Q, k)
    return shift + np.diff(S[bounds]) / np.diff(N[bounds])


def _first_argmin_per_segment(vals: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Minimum and index of its first occurrence in each consecutive segment (all counts >= 1)."""
    starts = np.cumsum(counts) - counts
    seg_min = np.minimum.reduceat(vals, starts)
    seg = np.repeat(np.arange(counts.size), counts)
    hit = np.flatnonzero(vals == seg_min[seg])
    first = hit[np.concatenate([[True], seg[hit[1:]] != seg[hit[:-1]]])]
    return seg_min, first


def _backtrack(args: list[np.ndarray], k: int, M: int) -> np.ndarray:
    """Cluster boundaries ``0 = b_0 < ... < b_k = M`` from the DP's per-row argmin tables."""
    bounds = np.empty(k + 1, dtype=np.int64)
    bounds[k] = M
    for t in range(k, 1, -1):
        bounds[t - 1] = args[t - 2][bounds[t]]
    bounds[0] = 0
    return bounds


def _optimal_partition(N: np.ndarray, S: np.ndarray, Q: np.ndarray, k: int) -> np.ndarray:
    """Optimal split of M sorted atoms into k contiguous non-empty runs, minimising the summed SSE.

    ``N, S, Q`` are prefix sums (length M+1) of weight, weighted value and weighted squared value. Returns
    ``b`` (length k+1, ``b[0] = 0``, ``b[k] = M``); run t holds atoms ``b[t]:b[t+1]``. Small problems
    use a dense cost matrix, larger ones :func:`_optimal_partition_banded`.
    """
    M = N.size - 1
    if not 1 <= k <= M:
        raise ValueError(f"cannot split {M} atoms into {k} non-empty runs")
    if k * M * M > _DENSE_DP_MAX_WORK:
        return _optimal_partition_banded(N, S, Q, k)
    with np.errstate(divide="ignore", invalid="ignore"):
        dn = N[None, :] - N[:, None]
        ds = S[None, :] - S[:, None]
        cost = np.maximum(Q[None, :] - Q[:, None] - ds * ds / dn, 0.0)
    cost[np.tril_indices(M + 1)] = np.inf  # run j..i needs j < i
    best = cost[0].copy()
    cols = np.arange(M + 1)
    args: list[np.ndarray] = []
    for _ in range(2, k + 1):
        total = best[:, None] + cost
        arg = total.argmin(axis=0)  # first minimum = smallest split point
        best = total[arg, cols]
        args.append(arg)
    return _backtrack(args, k, M)


def _dp_row_divide_and_conquer(
    prev: np.ndarray, N: np.ndarray, S: np.ndarray, Q: np.ndarray, t: int, k: int, M: int
) -> tuple[np.ndarray, np.ndarray]:
    """Row t of the DP, ``D_t[i] = min_j D_{t-1}[j] + cost(j, i)``, by divide and conquer.

    The smallest optimal split point is monotone in i (total monotonicity of the 1-D k-means cost), so
    each recursion level evaluates O(M) candidates; all tasks of a level run in one vectorised pass.
    """
    cur = np.full(M + 1, np.inf)
    arg = np.zeros(M + 1, dtype=np.int64)
    i_hi0 = M - (k - t)  # leave room for the remaining k - t runs
    ilo, ihi = np.array([t]), np.array([i_hi0])
    jlo, jhi = np.array([t - 1]), np.array([i_hi0 - 1])
    while ilo.size:
        mid = (ilo + ihi) // 2
        cnt = np.minimum(jhi, mid - 1) - jlo + 1
        starts = np.cumsum(cnt) - cnt
        seg = np.repeat(np.arange(cnt.size), cnt)
        js = jlo[seg] + (np.arange(seg.size) - starts[seg])
        vals = prev[js] + _run_cost(N, S, Q, js, mid[seg])
        seg_min, first = _first_argmin_per_segment(vals, cnt)
        best = js[first]
        cur[mid] = seg_min
        arg[mid] = best
        left = ilo <= mid - 1
        right = mid + 1 <= ihi
        ilo, ihi, jlo, jhi = (
            np.concatenate([ilo[left], mid[right] + 1]),
            np.concatenate([mid[left] - 1, ihi[right]]),
            np.concatenate([jlo[left], best[right]]),
            np.concatenate([best[left], jhi[right]]),
        )
    return cur, arg


def _best_splits(N: np.ndarray, S: np.ndarray, Q: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Best 2-split of every run ``b[j]:b[j+1]``: (SSE gain, split position); gain 0 for one-atom runs."""
    k = b.size - 1
    n_cand = np.maximum(np.diff(b) - 1, 0)
    gains = np.zeros(k)
    pos = np.full(k, -1, dtype=np.int64)
    has = np.flatnonzero(n_cand)
    if has.size == 0:
        return gains, pos
    cnt = n_cand[has]
    starts = np.cumsum(cnt) - cnt
    run = np.repeat(has, cnt)
    s = b[run] + 1 + (np.arange(run.size) - np.repeat(starts, cnt))
    a, e = b[run], b[run + 1]
    seg_min, first = _first_argmin_per_segment(_run_cost(N, S, Q, a, s) + _run_cost(N, S, Q, s, e), cnt)
    gains[has] = _run_cost(N, S, Q, b[has], b[has + 1]) - seg_min
    pos[has] = s[first]
    return gains, pos


def _window_dp(N: np.ndarray, S: np.ndarray, Q: np.ndarray, b: np.ndarray, radius: int) -> np.ndarray:
    """Best partition whose boundary t stays within ``radius`` atoms of ``b[t]`` and between its neighbours.

    An exact DP over these windows (a Viterbi sweep over the boundaries), so all boundaries move jointly.
    The old partition is feasible, so the cost never increases.
    """
    k = b.size - 1
    lo = np.empty(k + 1, dtype=np.int64)
    hi = np.empty(k + 1, dtype=np.int64)
    lo[0] = hi[0] = 0
    lo[k] = hi[k] = b[k]
    lo[1:k] = np.maximum(b[:-2] + 1, b[1:-1] - radius)
    hi[1:k] = np.minimum(b[2:] - 1, b[1:-1] + radius)
    W = int((hi - lo).max()) + 1
    # Window positions past hi repeat hi: duplicates after a valid position, so the first minimum taken
    # below is never one of them and no masking is needed for them.
    P = np.minimum(lo[:, None] + np.arange(W), hi[:, None])
    Np, Sp, Qp = N[P], S[P], Q[P]
    n = Np[1:, None, :] - Np[:-1, :, None]
    s = Sp[1:, None, :] - Sp[:-1, :, None]
    ok = n > 0  # a run needs at least one atom (p < q)
    C = np.divide(s * s, n, out=np.zeros_like(s), where=ok)
    np.subtract(Qp[1:, None, :] - Qp[:-1, :, None], C, out=C)
    C[~ok] = np.inf
    f = C[0, 0].copy()
    back = np.zeros((k, W), dtype=np.int64)
    cols = np.arange(W)
    tot = np.empty((W, W))
    for t in range(1, k):
        np.add(f[:, None], C[t], out=tot)
        arg = tot.argmin(axis=0)
        back[t] = arg
        f = tot[arg, cols]
    idx = np.zeros(k + 1, dtype=np.int64)
    for t in range(k - 1, 0, -1):
        idx[t] = back[t][idx[t + 1]]
    return P[np.arange(k + 1), idx]


def _optimal_partition_banded(N: np.ndarray, S: np.ndarray, Q: np.ndarray, k: int) -> np.ndarray:
    """Same result as :func:`_optimal_partition`, fast when the number of atoms M is a small multiple of k.

    Uses the monotonicity of the smallest optimal split in the number of runs,
    ``opt[t-1][i] <= opt[t][i]`` (a consequence of the quadrangle inequality of the 1-D k-means cost):
    once that band is narrow, row t scans only ``j in [opt[t-1][i], i-1]`` as one small rectangular
    array; the first rows, where the band is still wide, use divide and conquer. Row t is only needed
    at the ``M-k+1`` feasible end positions ``i in [t, t+M-k]``, and the last row only at ``i = M``.
    """
    M = N.size - 1
    if not 1 <= k <= M:
        raise ValueError(f"cannot split {M} atoms into {k} non-empty runs")
    span = M - k + 1
    best = np.full(M + 1, np.inf)
    i = np.arange(1, span + 1)
    best[i] = _run_cost(N, S, Q, np.zeros_like(i), i)
    opt = np.zeros(M + 1, dtype=np.int64)
    args: list[np.ndarray] = []
    offsets = np.arange(span)
    rows = np.arange(span)
    steps = np.arange(M + 1)
    for t in range(2, k):
        i = t + offsets
        # opt[t-1][i] bounds opt[t][i] from below; row t-1 stops one short of this row's last i, where
        # opt[t-1][i-1] <= opt[t-1][i] serves instead.
        lo = opt[i]
        lo[-1] = opt[i[-1] - 1]
        np.maximum(lo, t - 1, out=lo)
        width = int((i - lo).max())
        if width > _BAND_MAX_WIDTH:
            best, opt = _dp_row_divide_and_conquer(best, N, S, Q, t, k, M)
            args.append(opt)
            continue
        # Candidates past i-1 are clamped to i-1: duplicates of a valid candidate, after it, so the
        # first minimum (the smallest optimal split) is unaffected and no masking is needed.
        js = np.minimum(lo[:, None] + steps[:width], (i - 1)[:, None])
        sl = slice(t, t + span)
        s = S[sl, None] - S[js]
        vals = best[js] + ((Q[sl, None] - Q[js]) - s * s / (N[sl, None] - N[js]))
        arg = vals.argmin(axis=1)
        best = np.full(M + 1, np.inf)
        best[sl] = vals[rows, arg]
        opt = np.zeros(M + 1, dtype=np.int64)
        opt[sl] = js[rows, arg]
        args.append(opt)
    if k >= 2:  # the last row needs only i = M
        j = np.arange(k - 1, M)
        opt = np.zeros(M + 1, dtype=np.int64)
        opt[M] = j[np.argmin(best[j] + _run_cost(N, S, Q, j, np.full_like(j, M)))]
        args.append(opt)
    return _backtrack(args, k, M)


class _HistogramKMeans(_Solver):
    """The large-input path (see the module docstring, stages 1-5)."""

    def __init__(self, x: np.ndarray, lo: float, hi: float, k: int, max_iter: int) -> None:
        self.x, self.k, self.max_iter = x, k, max_iter
        self.n = x.size
        self.shift = 0.5 * (lo + hi)  # sums are of x - shift, for precision (no extra pass for the mean)
        self.cover_all = False
        self.edges: np.ndarray | None = None
        self.B = max(_MIN_BINS, _BINS_PER_CLUSTER * k)
        self.lo, self.scale = lo, self.B / (hi - lo)
        hn = self._histogram()
        if hn.max() > self.n / k:
            # Outliers stretch the range so that one uniform bin holds more than a cluster's share of the
            # data: add bin edges at quantiles of a strided sample (resolution where the data is dense)
            # to the uniform ones (resolution in the sparse tails, which hold whole clusters).
            stride = max(1, self.n // (16 * self.B))
            sample = np.sort(x[::stride])
            quantiles = sample[np.linspace(0, sample.size - 1, self.B + 1).astype(np.int64)[1:-1]]
            uniform = lo + (hi - lo) * np.arange(1, self.B) / self.B
            edges = np.unique(np.concatenate([quantiles, uniform]))
            self.edges, self.B = edges, edges.size + 1
            hn = self._histogram()
        nz = np.flatnonzero(hn)
        self.atom_n, self.atom_s, self.atom_q = hn[nz], self._hs[nz], self._hq[nz]
        self.AN, self.AS, self.AQ = _prefix(self.atom_n), _prefix(self.atom_s), _prefix(self.atom_q)

    def _histogram(self) -> np.ndarray:
        """Per-bin count (returned), centred sum and sum of squares; sets the cells and bin prefix sums."""
        self.cell = self._cell(self.x)
        buf = np.subtract(self.x, self.shift)
        hn = np.bincount(self.cell, minlength=self.B).astype(np.float64)
        self._hs = np.bincount(self.cell, weights=buf, minlength=self.B)
        self._hq = np.bincount(self.cell, weights=np.multiply(buf, buf, out=buf), minlength=self.B)
        self.HN, self.HS = _prefix(hn), _prefix(self._hs)
        return hn

    def _cell(self, v: np.ndarray) -> np.ndarray:
        # Monotone in v (rounding, truncation and searchsorted are): the window bookkeeping relies on it.
        if self.edges is not None:
            return np.searchsorted(self.edges, v, side="right")
        t = np.multiply(v, self.scale)
        t -= self.lo * self.scale  # >= 0 for v >= lo: both products are rounded monotonically
        c = t.astype(np.intp)
        return np.minimum(c, self.B - 1, out=c)

    def centroids(self) -> np.ndarray:
        if self.atom_n.size < 2 * self.k:
            # Values crowd into a few bins (discrete weights or huge outliers): the histogram cannot resolve
            # k clusters, so the atoms become the exactly sorted distinct values.
            uniq, counts = np.unique(self.x, return_counts=True)
            if uniq.size <= self.k:
                return _pad(uniq, self.k)
            self._use_exact_atoms(uniq, counts.astype(np.float64))
        b = self._coarse_bounds(max(_COARSE_MIN, int(_COARSE_PER_CLUSTER * self.k)))
        b = b[_optimal_partition_banded(self.AN[b], self.AS[b], self.AQ[b], self.k)]
        for _ in range(_REFINE_MAX_PASSES):
            nb = _window_dp(self.AN, self.AS, self.AQ, b, _REFINE_RADIUS)
            if np.array_equal(nb, b):
                break
            b = nb
        return self._lloyd_exact(self._centroids_of(b))

    def _use_exact_atoms(self, uniq: np.ndarray, counts: np.ndarray) -> None:
        uc = uniq - self.shift
        self.atom_n, self.atom_s, self.atom_q = counts, uc * counts, uc * uc * counts
        self.AN, self.AS, self.AQ = _prefix(self.atom_n), _prefix(self.atom_s), _prefix(self.atom_q)
        self.cover_all = True

    def labels(self, mids: np.ndarray) -> np.ndarray:
        """Nearest-centroid labels: a per-bin table, exact search only in bins that contain a midpoint."""
        mid_cell = self._cell(mids)
        table = np.searchsorted(mid_cell, np.arange(self.B), side="left")  # midpoints in lower bins
        labels = table[self.cell]
        has_mid = np.zeros(self.B, dtype=bool)
        has_mid[mid_cell] = True
        sel = np.flatnonzero(has_mid[self.cell])
        labels[sel] = np.searchsorted(mids, self.x[sel], side="left")
        return labels

    def _centroids_of(self, b: np.ndarray) -> np.ndarray:
        return self.shift + np.diff(self.AS[b]) / np.diff(self.AN[b])

    def _coarse_bounds(self, target: int) -> np.ndarray:
        """Greedy divisive grouping of the atoms into ``target`` runs, level by level.

        Each round splits the runs whose best 2-split gains most, so boundaries land where the data needs
        them (including isolated tail values); the exact DP then picks k runs out of these groups.
        """
        b = np.array([0, self.atom_n.size], dtype=np.int64)
        while b.size - 1 < target:
            gains, pos = _best_splits(self.AN, self.AS, self.AQ, b)
            order = np.argsort(-gains, kind="stable")[: target - (b.size - 1)]
            order = order[gains[order] > 0]
            if order.size == 0:
                break
            b = np.sort(np.concatenate([b, pos[order]]))
        return b

    # -- stage 5 ---------------------------------------------------------------------------------------
    def _build_windows(self, mids: np.ndarray) -> None:
        """Sort the points of the bins that hold a midpoint; other bins enter only through prefix sums."""
        B = self.B
        if self.cover_all:
            covered = np.ones(B, dtype=bool)
        else:
            covered = np.zeros(B, dtype=bool)
            covered[self._cell(mids)] = True
        xs = np.sort(self.x[covered[self.cell]])
        self.win_x = xs
        self.win_cell = self._cell(xs)
        self.win_S = _prefix(xs - self.shift)
        run_first = covered & ~np.concatenate([[False], covered[:-1]])
        self.run_start = np.maximum.accumulate(np.where(run_first, np.arange(B), 0))
        self.covered = covered

    def _stats_below(self, mids: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        """Count and centred sum of the points <= each midpoint; None if a midpoint left the sorted bins."""
        tb = self._cell(mids)
        if not self.covered[tb].all():
            return None
        rs = self.run_start[tb]
        # Points in bins below the covered run are all < mid (cells are monotone); the run is exact.
        off = np.searchsorted(self.win_cell, rs, side="left")
        pos = np.searchsorted(self.win_x, mids, side="right")
        return self.HN[rs] + (pos - off), self.HS[rs] + self.win_S[pos] - self.win_S[off]

    def _lloyd_exact(self, c: np.ndarray) -> np.ndarray:
        """Lloyd on the data while every midpoint stays in the bin it started in (or to convergence).

        Stage 4 already placed every boundary optimally at bin resolution, so what is left is the
        sub-bin adjustment; stopping when a midpoint crosses into another bin bounds the cost to one
        O(n) pass plus sorting the points of k-1 bins, and Lloyd steps never increase the inertia.
        """
        n_tot, s_tot = float(self.n), float(self.HS[-1])
        self._build_windows((c[:-1] + c[1:]) * 0.5)
        prev = None
        for _ in range(self.max_iter):
            stats = self._stats_below((c[:-1] + c[1:]) * 0.5)
            if stats is None:
                break
            n_le, s_le = stats
            if prev is not None and np.array_equal(n_le, prev):
                break
            prev = n_le
            cnt = np.diff(np.concatenate([[0.0], n_le, [n_tot]]))
            sums = np.diff(np.concatenate([[0.0], s_le, [s_tot]]))
            empty = cnt == 0
            # An empty cluster keeps its centroid (rare: the DP stages leave every cluster non-empty).
            c = np.where(empty, c, self.shift + sums / np.where(empty, 1.0, cnt))
            c.sort()
        return c
