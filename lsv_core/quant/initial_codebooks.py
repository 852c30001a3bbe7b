"""Initial k-means codebooks of one float baseline, per (layer, bits): computed once, reused by every recipe.

A search quantizes the same baseline hundreds of times. Every layer of an MSFT first stage (and every
layer of a one-shot run) is clustered straight from the baseline's weights, so its initial codebook
depends only on (layer, bits, seed, k-means iterations): :class:`InitialCodebooks` computes it once and
hands out copies. Layers quantized in later stages were fine-tuned first; their weights differ from the
baseline's, and they are clustered afresh (a cache hit needs bit-identical weights, so results never
change, only time).

With ``directory`` the codebooks are also kept on disk as small safetensors files named by the layer,
the bits and a digest of the baseline weights, so every process that sees the folder shares them: the
first to need an entry computes and writes it atomically; k-means is deterministic, so two writers racing
write the same bytes. A study computes all of them once on its driver (:meth:`InitialCodebooks.precompute`)
and sends them to its workers through Ray's object store (:meth:`InitialCodebooks.portable`).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from lsv_core.atomic import atomic_path
from lsv_core.quant.kmeans import kmeans_1d


class InitialCodebooks:
    """Centroids of k-means over reference (baseline) weights, cached per (layer, bits, seed, iterations)."""

    def __init__(self, reference: Mapping[str, Tensor], directory: str | os.PathLike[str] | None = None) -> None:
        self._reference = {name: w.detach().to("cpu", copy=True) for name, w in reference.items()}
        self._digests: dict[str, str] = {}
        self._memory: dict[tuple[str, int, int, int], Tensor] = {}
        self.directory = Path(directory) if directory is not None else None
        self.hits = 0
        self.misses = 0

    def centroids(self, name: str, weight: Tensor, n_clusters: int, *, seed: int = 0, max_iter: int = 100) -> Tensor:
        """``kmeans_1d(weight, n_clusters)[0]`` (on ``weight``'s device and dtype), from the cache when
        ``weight`` is the reference weight of layer ``name``."""
        if not self._is_reference(name, weight):
            return _kmeans(weight, n_clusters, seed, max_iter)
        key = (name, n_clusters, seed, max_iter)
        cached = self._memory.get(key)
        if cached is None:
            cached = self._load(key)
        if cached is None:
            self.misses += 1
            cached = _kmeans(self._reference[name], n_clusters, seed, max_iter)
            self._store(key, cached)
        else:
            self.hits += 1
        self._memory[key] = cached
        return cached.to(device=weight.device, dtype=weight.dtype, copy=True)

    def precompute(self, n_clusters: Iterable[int], *, seed: int = 0, max_iter: int = 100,
                   progress: bool = False) -> int:
        """Compute (or load) every layer's codebook at each of ``n_clusters`` now; returns how many entries.

        A study does this once on its driver and ships the result to every worker (:meth:`portable`), so
        no worker needs a shared folder or repeats k-means.
        """
        from tqdm import tqdm

        keys = [(name, int(k)) for name in self._reference for k in sorted(set(n_clusters))]
        for name, k in tqdm(keys, desc="initial codebooks", unit="codebook", disable=not progress):
            self.centroids(name, self._reference[name], k, seed=seed, max_iter=max_iter)
        return len(keys)

    def portable(self) -> InitialCodebooks:
        """A copy that keeps what is computed in memory and touches no disk (for another machine)."""
        twin = InitialCodebooks.__new__(InitialCodebooks)
        twin._reference, twin._digests, twin._memory = self._reference, dict(self._digests), dict(self._memory)
        twin.directory, twin.hits, twin.misses = None, 0, 0
        return twin

    def _is_reference(self, name: str, weight: Tensor) -> bool:
        ref = self._reference.get(name)
        return ref is not None and ref.shape == weight.shape and torch.equal(ref, weight.detach().to("cpu"))

    def _file(self, key: tuple[str, int, int, int]) -> Path | None:
        if self.directory is None:
            return None
        name, n_clusters, seed, max_iter = key
        if name not in self._digests:
            self._digests[name] = hashlib.sha256(self._reference[name].numpy().tobytes()).hexdigest()[:16]
        return self.directory / f"{name}.k{n_clusters}.s{seed}.i{max_iter}.{self._digests[name]}.safetensors"

    def _load(self, key: tuple[str, int, int, int]) -> Tensor | None:
        path = self._file(key)
        if path is None or not path.exists():
            return None
        try:
            centroids = load_file(str(path))["centroids"]
        except Exception:  # noqa: BLE001 - a damaged cache file is recomputed and replaced
            return None
        return centroids if centroids.numel() == key[1] else None

    def _store(self, key: tuple[str, int, int, int], centroids: Tensor) -> None:
        path = self._file(key)
        if path is None:
            return
        with atomic_path(path, overwrite=True) as tmp:
            save_file({"centroids": centroids.contiguous()}, str(tmp))


def _kmeans(weight: Tensor, n_clusters: int, seed: int, max_iter: int) -> Tensor:
    centroids, _ = kmeans_1d(weight.detach(), n_clusters, seed=seed, max_iter=max_iter)
    return centroids.to(dtype=weight.dtype, device=weight.device)
