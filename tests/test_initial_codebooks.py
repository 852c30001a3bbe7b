"""The baseline's initial codebooks: computed once, shared through memory and disk, never changing a result."""

from __future__ import annotations

from pathlib import Path

import torch

from lsv_core.models import build_model
from lsv_core.quant import BitRecipe, InitialCodebooks, kmeans_1d, quantizable_layers, quantize
from lsv_core.quant.quantize import dequantized_state_dict, latent_weight


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model("ThinResNet", m_channels=4, embed_dim=16, first_stride=2)


def _reference(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    modules = dict(model.named_modules())
    return {n: latent_weight(modules[n]) for n in quantizable_layers(model)}


def test_cached_centroids_equal_kmeans_and_are_computed_once(tmp_path: Path) -> None:
    model = _model()
    ref = _reference(model)
    name = quantizable_layers(model)[1]
    cache = InitialCodebooks(ref)
    want, _ = kmeans_1d(ref[name].detach(), 8, seed=3, max_iter=50)
    first = cache.centroids(name, ref[name], 8, seed=3, max_iter=50)
    second = cache.centroids(name, ref[name].clone(), 8, seed=3, max_iter=50)
    assert torch.equal(first, want) and torch.equal(second, want)
    assert (cache.misses, cache.hits) == (1, 1)
    second.add_(1.0)  # callers get copies: a quantizer training its centroids cannot corrupt the cache
    assert torch.equal(cache.centroids(name, ref[name], 8, seed=3, max_iter=50), want)

    moved = ref[name] + 1e-3  # a fine-tuned weight: clustered afresh, never served from the cache
    fresh = cache.centroids(name, moved, 8, seed=3, max_iter=50)
    assert torch.equal(fresh, kmeans_1d(moved, 8, seed=3, max_iter=50)[0])
    assert (cache.misses, cache.hits) == (1, 2)


def test_codebooks_on_disk_are_shared_and_keyed_by_the_baseline(tmp_path: Path) -> None:
    model = _model()
    names = quantizable_layers(model)[:3]
    ref = _reference(model)
    writer = InitialCodebooks(ref, directory=tmp_path)
    for n in names:
        writer.centroids(n, ref[n], 4)
    assert len(list(tmp_path.glob("*.safetensors"))) == 3 and writer.misses == 3

    reader = InitialCodebooks(_reference(_model()), directory=tmp_path)  # another worker, same baseline
    for n in names:
        assert torch.equal(reader.centroids(n, ref[n], 4), writer.centroids(n, ref[n], 4))
    assert (reader.misses, reader.hits) == (0, 3)

    other = _model(seed=1)  # another baseline in the same folder: its own entries
    other_ref = _reference(other)
    third = InitialCodebooks(other_ref, directory=tmp_path)
    got = third.centroids(names[0], other_ref[names[0]], 4)
    assert third.misses == 1 and torch.equal(got, kmeans_1d(other_ref[names[0]].detach(), 4)[0])

    damaged = sorted(tmp_path.glob("*.safetensors"))[0]
    damaged.write_bytes(b"not a safetensors file")
    healed = InitialCodebooks(ref, directory=tmp_path)
    for n in names:
        healed.centroids(n, ref[n], 4)
    assert healed.misses == 1  # the damaged entry was recomputed (and rewritten), the others read


def test_quantize_with_the_cache_gives_the_same_model() -> None:
    base = _model()
    layers = quantizable_layers(base)
    recipe = BitRecipe({n: [2, 4, (1, "adaptive"), 8][i % 4] for i, n in enumerate(layers)})
    cache = InitialCodebooks(_reference(base))
    plain = quantize(_model(), recipe)
    cached = quantize(_model(), recipe, codebooks=cache)
    again = quantize(_model(), recipe, codebooks=cache)
    a, b, c = (dequantized_state_dict(m) for m in (plain, cached, again))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) and torch.equal(a[k], c[k]) for k in a)
    n_cached = sum(1 for n in layers if recipe[n].bits > 1 or recipe[n].mode == "adaptive")
    assert cache.misses == n_cached and cache.hits == n_cached
