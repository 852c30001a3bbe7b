"""1-D k-means (lsv_core/quant/kmeans.py): optimality, agreement with scikit-learn, determinism, edge cases."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from lsv_core.quant import kmeans as km
from lsv_core.quant.kmeans import kmeans_1d, kmeans_inertia, nearest_centroid


def brute_force_inertia(x: np.ndarray, k: int) -> float:
    """Optimal SSE over every split of the sorted values into k contiguous non-empty runs."""
    xs = np.sort(x)
    n = xs.size
    best = np.inf
    for cuts in itertools.combinations(range(1, n), k - 1):
        bounds = (0, *cuts, n)
        sse = sum(float(((xs[a:b] - xs[a:b].mean()) ** 2).sum()) for a, b in itertools.pairwise(bounds))
        best = min(best, sse)
    return best


def sse(x: np.ndarray, centroids: np.ndarray, labels: np.ndarray) -> float:
    d = x.astype(np.float64) - centroids.astype(np.float64)[labels]
    return float(np.dot(d.ravel(), d.ravel()))


def test_matches_brute_force_optimum_on_small_arrays() -> None:
    rng = np.random.default_rng(0)
    for _ in range(250):
        n = int(rng.integers(1, 11))
        k = int(rng.integers(1, 5))
        x = rng.standard_normal(n).round(1)  # rounding makes ties and repeated values common
        centroids, labels = kmeans_1d(x, k)
        d = np.unique(x).size
        assert sse(x, centroids, labels) <= brute_force_inertia(x, min(k, d)) + 1e-12


@pytest.mark.parametrize("k", [2, 3, 5])
def test_large_input_path_is_near_the_exact_optimum(k: int) -> None:
    rng = np.random.default_rng(k)
    x = np.concatenate([rng.laplace(size=60000), rng.normal(3.0, 0.3, size=20000)]).astype(np.float32)
    assert x.size * k > km._EXACT_MAX_WORK  # exercises the histogram path
    centroids, labels = kmeans_1d(x, k)
    uniq, counts = np.unique(x.astype(np.float64), return_counts=True)
    optimum = km._exact_on_atoms(uniq, counts.astype(np.float64), k)
    assert sse(x, centroids, labels) <= kmeans_inertia(x, optimum) * (1 + 1e-4)


@pytest.mark.parametrize(("dist", "k"), [("laplace", 4), ("normal", 16), ("laplace", 64)])
def test_inertia_at_most_sklearn(dist: str, k: int) -> None:
    from sklearn.cluster import KMeans

    rng = np.random.default_rng(7)
    x = getattr(rng, dist)(size=20000).astype(np.float32)
    centroids, _ = kmeans_1d(x, k)
    ref = KMeans(n_clusters=k, n_init=1, random_state=0).fit(x[:, None]).cluster_centers_.ravel()
    assert kmeans_inertia(x, centroids) <= kmeans_inertia(x, ref) * (1 + 1e-6)


def test_banded_dp_equals_reference_dp() -> None:
    rng = np.random.default_rng(3)
    for _ in range(200):
        values = np.unique(rng.laplace(size=int(rng.integers(1, 60))).round(2))
        weights = rng.integers(1, 5, size=values.size).astype(np.float64)
        k = int(rng.integers(1, values.size + 1))
        N, S, Q = km._prefix(weights), km._prefix(weights * values), km._prefix(weights * values**2)
        b1 = km._optimal_partition_banded(N, S, Q, k)
        b2 = km._optimal_partition(N, S, Q, k)
        assert b1[0] == 0 and b1[-1] == values.size and np.all(np.diff(b1) > 0)
        cost1 = km._run_cost(N, S, Q, b1[:-1], b1[1:]).sum()
        cost2 = km._run_cost(N, S, Q, b2[:-1], b2[1:]).sum()
        assert cost1 <= cost2 + 1e-9


def test_outputs_are_sorted_nearest_and_shaped_like_input() -> None:
    rng = np.random.default_rng(1)
    x = rng.standard_normal((64, 32, 3, 3)).astype(np.float32)
    for k in (2, 8, 256):
        centroids, labels = kmeans_1d(x, k)
        assert centroids.shape == (k,) and centroids.dtype == np.float32
        assert np.all(np.diff(centroids) >= 0)
        assert labels.shape == x.shape and labels.dtype == np.int64
        np.testing.assert_array_equal(labels.ravel(), nearest_centroid(x, centroids))


def test_deterministic_and_seed_independent() -> None:
    x = np.random.default_rng(2).laplace(size=50000).astype(np.float32)
    c1, l1 = kmeans_1d(x, 16, seed=0)
    c2, l2 = kmeans_1d(x.copy(), 16, seed=0)
    c3, _ = kmeans_1d(x, 16, seed=123)
    np.testing.assert_array_equal(c1, c2)
    np.testing.assert_array_equal(l1, l2)
    np.testing.assert_array_equal(c1, c3)


def test_torch_input_gives_torch_output_equal_to_numpy() -> None:
    w = torch.randn(16, 8, 3, 3, dtype=torch.float64)
    c_t, l_t = kmeans_1d(w, 4)
    c_n, l_n = kmeans_1d(w.numpy(), 4)
    assert isinstance(c_t, torch.Tensor) and c_t.dtype == torch.float64 and c_t.device == w.device
    assert l_t.dtype == torch.int64 and l_t.shape == w.shape
    np.testing.assert_array_equal(c_t.numpy(), c_n)
    np.testing.assert_array_equal(l_t.numpy(), l_n)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_tensor_stays_on_device() -> None:
    w = torch.randn(1000, device="cuda")
    c, labels = kmeans_1d(w, 4)
    assert c.device == w.device and labels.device == w.device


def test_more_clusters_than_distinct_values_pads_with_the_largest() -> None:
    x = np.array([3.0, 1.0, 2.0, 1.0, 3.0])
    centroids, labels = kmeans_1d(x, 8)
    np.testing.assert_array_equal(centroids, [1, 2, 3, 3, 3, 3, 3, 3])
    np.testing.assert_array_equal(centroids[labels], x)
    assert labels.max() == 2  # only the first copy of a repeated centroid is used


def test_many_points_few_distinct_values() -> None:
    rng = np.random.default_rng(5)
    x = rng.choice([-1.5, -0.5, 0.25, 2.0], size=40000)
    centroids, labels = kmeans_1d(x, 16)
    np.testing.assert_array_equal(centroids[:4], [-1.5, -0.5, 0.25, 2.0])
    assert np.all(centroids[4:] == 2.0)
    np.testing.assert_array_equal(centroids[labels], x)
    # Few distinct values but more than 2k of them in few bins: the sorted-atoms fallback.
    y = np.concatenate([rng.integers(0, 300, size=30000) / 300.0, [1e4]])
    c, lab = kmeans_1d(y, 256)
    uniq, counts = np.unique(y, return_counts=True)
    opt = km._exact_on_atoms(uniq, counts.astype(np.float64), 256)
    assert sse(y, c, lab) <= kmeans_inertia(y, opt) * (1 + 1e-9)


@pytest.mark.parametrize("k", [4, 16])
def test_far_outliers_get_their_own_centroids(k: int) -> None:
    # A few weights far out stretch a uniform histogram; the bins gain quantile edges and stay exact.
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(size=50000), rng.uniform(100, 1e4, size=20)])
    centroids, labels = kmeans_1d(x, k)
    uniq, counts = np.unique(x, return_counts=True)
    optimum = km._exact_on_atoms(uniq, counts.astype(np.float64), k)
    assert sse(x, centroids, labels) <= kmeans_inertia(x, optimum) * (1 + 1e-6)


def test_constant_and_single_value_inputs() -> None:
    centroids, labels = kmeans_1d(np.full((5, 5), 0.7), 4)
    np.testing.assert_array_equal(centroids, np.full(4, 0.7))
    assert labels.shape == (5, 5) and not labels.any()
    centroids, labels = kmeans_1d(np.array([2.5]), 1)
    assert centroids.tolist() == [2.5] and labels.tolist() == [0]


def test_one_cluster_is_the_mean() -> None:
    x = np.random.default_rng(0).standard_normal(100000)
    centroids, labels = kmeans_1d(x, 1)
    assert centroids[0] == pytest.approx(x.mean(), abs=1e-12)
    assert not labels.any()


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_values_raise(bad: float) -> None:
    x = np.array([0.0, 1.0, bad])
    with pytest.raises(ValueError, match="values contains NaN or Inf"):
        kmeans_1d(x, 2)
    with pytest.raises(ValueError, match="values contains NaN or Inf"):
        kmeans_1d(torch.tensor(x), 2)


@pytest.mark.parametrize("k", [0, -1, 2.0, True, None])
def test_bad_n_clusters_raise(k: object) -> None:
    with pytest.raises(ValueError, match="n_clusters"):
        kmeans_1d(np.arange(10.0), k)  # type: ignore[arg-type]


def test_empty_and_non_numeric_raise() -> None:
    with pytest.raises(ValueError, match="empty"):
        kmeans_1d(np.array([]), 2)
    with pytest.raises(ValueError, match="dtype"):
        kmeans_1d(np.array(["a", "b"]), 2)
    with pytest.raises(ValueError, match="max_iter"):
        kmeans_1d(np.arange(10.0), 2, max_iter=0)


def test_integer_input_gives_float_centroids() -> None:
    centroids, labels = kmeans_1d(np.array([0, 0, 10, 10, 11]), 2)
    assert centroids.dtype == np.float64
    np.testing.assert_allclose(centroids, [0.0, 31 / 3])
    np.testing.assert_array_equal(labels, [0, 0, 1, 1, 1])
