"""Hessian traces, quantization errors and the exact bit allocator (lsv_core/quant/sensitivity.py)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from lsv_core.errors import ConfigError
from lsv_core.models import AAMSoftmax, build_model
from lsv_core.quant import quantize
from lsv_core.quant.recipe import BitRecipe, quantizable_layers
from lsv_core.quant.sensitivity import (
    allocate_bits,
    allocate_for_sizes,
    cached_hessian_traces,
    hessian_traces,
    quantization_errors,
    recipe_sensitivity,
    sensitivity,
    trace_groups,
)
from lsv_core.quant.size import packed_size_bytes, packed_tensor_bytes

BITS = (1, 2, 3, 4, 8)


# ----------------------------------------------------------------------------------------- fixtures


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()


def _mlp_batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(6, 3, generator=g, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1, 2])


def _ce_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y)


def _thin_resnet() -> nn.Module:
    torch.manual_seed(0)
    return build_model("ThinResNet", m_channels=4, num_blocks=[1, 1, 1, 1], embed_dim=16)


# ------------------------------------------------------------------------------------- Hessian trace


def test_hutchinson_matches_explicit_hessian_within_its_standard_error() -> None:
    model = _mlp()
    batch = _mlp_batch()
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    flat0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def loss_of(flat: torch.Tensor) -> torch.Tensor:
        parts = torch.split(flat, [math.prod(s) for s in shapes])
        params = {n: t.reshape(s) for n, t, s in zip(names, parts, shapes, strict=True)}
        return F.cross_entropy(functional_call(model, params, (batch[0],)), batch[1])

    hess = torch.autograd.functional.hessian(loss_of, flat0)
    # Index ranges of the two weights (biases are not quantized, so they are not probed).
    offsets = np.cumsum([0] + [math.prod(s) for s in shapes])
    blocks = {"0": slice(offsets[0], offsets[1]), "2": slice(offsets[2], offsets[3])}
    weight_idx = torch.cat([torch.arange(b.start, b.stop) for b in blocks.values()])

    n_probes = 4000
    est = hessian_traces(model, _ce_loss, [batch], n_probes=n_probes, seed=3, layers=["0", "2"])
    assert list(est) == ["0", "2"]
    for name, blk in blocks.items():
        h_ii = hess[blk, blk]
        exact = float(torch.trace(h_ii))
        # Variance of one Rademacher sample of v_i.(Hv)_i when v spans both weights:
        # 2 * sum of squared off-diagonal entries within the block + sum of squares of the cross block.
        others = weight_idx[(weight_idx < blk.start) | (weight_idx >= blk.stop)]
        var = 2 * float((h_ii**2).sum() - (torch.diagonal(h_ii) ** 2).sum()) + float(
            (hess[blk][:, others] ** 2).sum()
        )
        assert abs(est[name] - exact) <= 5 * math.sqrt(var / n_probes) + 1e-12, (name, est[name], exact)


class _TwoWeights(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 2, bias=False)
        self.b = nn.Linear(2, 2, bias=False)


def test_hutchinson_is_exact_for_a_diagonal_hessian() -> None:
    # Separable loss sum_j c_j w_j^2 + w_j^4: diagonal Hessian, so v_j^2 = 1 makes every probe exact.
    model = _TwoWeights().double()
    coef = {"a": torch.arange(6.0).reshape(2, 3).double(), "b": -torch.ones(2, 2).double()}

    def loss_fn(m: nn.Module, batch: object) -> torch.Tensor:
        return sum(
            (coef[n] * getattr(m, n).weight ** 2 + getattr(m, n).weight ** 4).sum() for n in ("a", "b")
        )

    est = hessian_traces(model, loss_fn, [None], n_probes=3, seed=0, layers=["a", "b"])
    for n in ("a", "b"):
        w = getattr(model, n).weight.detach()
        assert est[n] == pytest.approx(float((2 * coef[n] + 12 * w**2).sum()), rel=1e-12)


def test_hessian_traces_are_deterministic_and_leave_the_model_unchanged() -> None:
    model, head = _thin_resnet(), AAMSoftmax(16, 5, margin=0.2, scale=32.0)
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(2, 40, 80, generator=g), torch.tensor([0, 3])) for _ in range(2)]

    def loss_fn(m: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(head(m(x), y), y)

    for p in model.parameters():
        p.requires_grad_(False)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    t1 = hessian_traces(model, loss_fn, batches, n_probes=2, seed=7)
    t2 = hessian_traces(model, loss_fn, iter(batches), n_probes=2, seed=7)
    assert list(t1) == quantizable_layers(model)
    assert "seg_1" in t1 and "conv1" in t1
    assert t1 == t2
    assert all(math.isfinite(v) for v in t1.values())
    assert model.training and not any(p.requires_grad for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # BN stats untouched
    assert hessian_traces(model, loss_fn, batches, n_probes=2, seed=8) != t1


def test_hessian_traces_rejects_empty_batches() -> None:
    with pytest.raises(ConfigError, match="batches is empty"):
        hessian_traces(_mlp(), _ce_loss, [], n_probes=1, layers=["0"])


def test_trace_cache_hit_skips_the_computation(tmp_path) -> None:
    model = _mlp()
    calls = {"n": 0}

    def loss_fn(m: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        calls["n"] += 1
        return _ce_loss(m, batch)

    path = tmp_path / "traces.json"
    kw = {"n_probes": 4, "seed": 1, "layers": ["0", "2"]}
    first = cached_hessian_traces(model, loss_fn, [_mlp_batch()], path, **kw)
    assert calls["n"] == 1 and path.exists()
    again = cached_hessian_traces(model, loss_fn, [_mlp_batch()], path, **kw)
    assert again == first and calls["n"] == 1
    assert first == hessian_traces(model, _ce_loss, [_mlp_batch()], **kw)
    # Another data key, another seed, or changed weights are misses; the earlier entry survives.
    cached_hessian_traces(model, loss_fn, [_mlp_batch()], path, **kw, data_key="other")
    assert calls["n"] == 2
    saved = model[0].weight.detach().clone()
    with torch.no_grad():
        model[0].weight.add_(0.1)
    cached_hessian_traces(model, loss_fn, [_mlp_batch()], path, **kw)
    assert calls["n"] == 3
    with torch.no_grad():
        model[0].weight.copy_(saved)
    assert cached_hessian_traces(model, loss_fn, [_mlp_batch()], path, **kw) == first
    assert calls["n"] == 3


def test_unreadable_cache_is_replaced_with_a_warning(tmp_path) -> None:
    path = tmp_path / "traces.json"
    path.write_text("{not json")
    with pytest.warns(UserWarning, match="unreadable"):
        out = cached_hessian_traces(_mlp(), _ce_loss, [_mlp_batch()], path, n_probes=1, layers=["0"])
    assert cached_hessian_traces(_mlp(), _ce_loss, [], path, n_probes=1, layers=["0"]) == out


# ------------------------------------------------------------------------------------ quantization error


def test_quantization_errors_fall_with_bits_and_vanish_with_enough_centroids() -> None:
    model = _thin_resnet()
    errs = quantization_errors(model)
    assert list(errs) == quantizable_layers(model)
    for name, e in errs.items():
        vals = [e[b] for b in BITS]
        assert all(a >= b for a, b in itertools.pairwise(vals)), (name, vals)
        assert vals[0] > 0
    # Four distinct values: exact from 2 bits on.
    with torch.no_grad():
        w = model.conv1.weight
        w.copy_(torch.tensor([-1.0, 0.0, 0.5, 2.0])[torch.arange(w.numel()) % 4].reshape(w.shape))
    e = quantization_errors(model, layers=["conv1"])["conv1"]
    assert e[1] > 0 and e[2] == e[3] == e[4] == e[8] == 0.0


def test_static_binary_error_is_sign_times_mean_abs_and_not_below_adaptive() -> None:
    model = _thin_resnet()
    static = quantization_errors(model, (1,), binary_mode="static", layers=["conv1"])["conv1"][1]
    adaptive = quantization_errors(model, (1,), layers=["conv1"])["conv1"][1]
    w = model.conv1.weight.detach().double()
    alpha = w.abs().mean()
    assert static == pytest.approx(float(((w - torch.where(w >= 0, alpha, -alpha)) ** 2).sum()), rel=1e-12)
    assert adaptive <= static


# ----------------------------------------------------------------------------------------- sensitivity


def test_sensitivity_multiplies_and_floors_negative_traces() -> None:
    errors = {"a": {1: 4.0, 2: 1.0}, "b": {1: 2.0, 2: 0.5}}
    omega = sensitivity({"a": 10.0, "b": -3.0}, errors, trace_floor_ratio=0.01)
    assert omega == {"a": {1: 40.0, 2: 10.0}, "b": {1: 0.2, 2: 0.05}}
    assert sensitivity({"a": 10.0, "b": -3.0}, errors, trace_floor_ratio=0)["b"] == {1: 0.0, 2: 0.0}
    with pytest.raises(ConfigError, match="without a Hessian trace"):
        sensitivity({"a": 1.0}, errors)


def test_trace_groups_sorts_by_trace_into_even_groups() -> None:
    traces = {"a": 1.0, "b": 5.0, "c": 3.0, "d": 0.5, "e": 4.0}
    assert trace_groups(traces, 2) == [["b", "e", "c"], ["a", "d"]]
    assert trace_groups(traces, 9) == [["b"], ["e"], ["c"], ["a"], ["d"]]


# ------------------------------------------------------------------------------------------ allocation


def _random_omega(layers: list[str], seed: int) -> dict[str, dict[int, float]]:
    rng = np.random.default_rng(seed)
    out = {}
    for name in layers:
        scale = 10.0 ** rng.uniform(-3, 2)
        vals = np.sort(rng.uniform(0, 1, len(BITS)))[::-1] * scale
        out[name] = {b: float(v) for b, v in zip(BITS, vals, strict=True)}
    return out


def test_allocator_is_exactly_optimal_against_brute_force() -> None:
    model = _thin_resnet()
    layers = quantizable_layers(model)
    searched = ["conv1", "layer3.0.conv2", "layer4.0.conv1", "seg_1"]
    fixed = {n: (4 if i % 2 else None) for i, n in enumerate(layers) if n not in searched}
    omega = _random_omega(searched, seed=0)
    fixed_recipe = {n: b for n, b in fixed.items() if b is not None}

    # Brute force over all 5^4 assignments with the real size function.
    table = []
    for combo in itertools.product(BITS, repeat=len(searched)):
        recipe = BitRecipe({**fixed_recipe, **dict(zip(searched, combo, strict=True))})
        table.append(
            (packed_size_bytes(model, recipe), sum(omega[n][b] for n, b in zip(searched, combo, strict=True)))
        )
    sizes = sorted({s for s, _ in table})
    budgets = [sizes[0], *np.quantile(sizes, [0.1, 0.3, 0.5, 0.7, 0.9]).astype(int).tolist(), sizes[-1] - 1]
    recipes = allocate_for_sizes(model, omega, budgets, fixed=fixed)
    for budget, recipe in zip(budgets, recipes, strict=True):
        best = min(v for s, v in table if s <= budget)
        assert packed_size_bytes(model, recipe) <= budget
        assert recipe_sensitivity(omega, recipe) == pytest.approx(best, rel=1e-9, abs=1e-12), budget
        for n, b in fixed.items():
            assert recipe.bits(n) == b


def test_allocator_beats_uniform_precision_of_the_same_size() -> None:
    model = _thin_resnet()
    layers = quantizable_layers(model)
    omega = _random_omega(layers, seed=1)
    for b in BITS:
        uniform = BitRecipe.uniform(model, b)
        budget = packed_size_bytes(model, uniform)
        recipe = allocate_bits(model, omega, budget)
        assert packed_size_bytes(model, recipe) <= budget
        assert recipe_sensitivity(omega, recipe) <= recipe_sensitivity(omega, uniform) + 1e-12


def test_allocator_budget_limits() -> None:
    model = _thin_resnet()
    layers = quantizable_layers(model)
    omega = _random_omega(layers, seed=2)
    # The cheapest width of each layer: the file's per-layer graph makes a tiny layer whose 1-bit indices
    # do not fill whole bytes (conv1: 36 weights) cheaper at 2 bits. Sizes are additive over layers.
    base = packed_size_bytes(model, {})
    smallest = base + sum(min(packed_size_bytes(model, {n: b}) - base for b in BITS) for n in layers)
    with pytest.raises(ConfigError, match=f"{smallest} bytes"):
        allocate_bits(model, omega, smallest - 1)
    assert packed_size_bytes(model, allocate_bits(model, omega, smallest)) == smallest
    assert allocate_bits(model, omega, 10**9) == BitRecipe.uniform(model, 8)
    # Restricted choices: 2 and 4 bits only, static binary never appears.
    mid = allocate_bits(
        model, omega, packed_size_bytes(model, BitRecipe.uniform(model, 3)), bit_choices=(2, 4)
    )
    assert {spec.bits for spec in mid.values()} == {2, 4}


def test_allocator_rejects_uncovered_layers_and_unknown_names() -> None:
    model = _thin_resnet()
    layers = quantizable_layers(model)
    omega = _random_omega(layers[1:], seed=3)
    with pytest.raises(ConfigError, match="neither omega nor fixed"):
        allocate_bits(model, omega, 10**6)
    recipe = allocate_bits(model, omega, 10**9, fixed={layers[0]: None})
    assert layers[0] not in recipe and len(recipe) == len(layers) - 1
    with pytest.raises(ConfigError, match="not quantizable"):
        allocate_bits(model, {**omega, "nope": {1: 0.0}}, 10**6, fixed={layers[0]: None})


def test_static_binary_allocation_uses_the_static_layout() -> None:
    model = _thin_resnet()
    layers = quantizable_layers(model)
    omega = _random_omega(layers, seed=4)
    static, adaptive = BitRecipe.uniform(model, 1, "static"), BitRecipe.uniform(model, 1, "adaptive")
    recipe = allocate_bits(model, omega, packed_size_bytes(model, static), binary_mode="static", bit_choices=(1,))
    assert recipe == static
    # Adaptive binary stores two levels, static one; in the deployable file static also needs two small
    # nodes per layer to form [-alpha, +alpha], so each layout is only reachable with its own mode.
    assert packed_tensor_bytes(model, adaptive) == packed_tensor_bytes(model, static) + 4 * len(layers)
    cheaper, dearer = sorted((static, adaptive), key=lambda r: packed_size_bytes(model, r))
    mode = next(iter(cheaper.values())).mode
    other = next(iter(dearer.values())).mode
    with pytest.raises(ConfigError, match=f"{packed_size_bytes(model, dearer)} bytes"):
        allocate_bits(model, omega, packed_size_bytes(model, cheaper), binary_mode=other, bit_choices=(1,))
    assert allocate_bits(model, omega, packed_size_bytes(model, cheaper), binary_mode=mode, bit_choices=(1,)) == cheaper


def test_sensitivity_refuses_quantized_layers() -> None:
    model = _thin_resnet()
    quantize(model, {"conv1": 4})
    with pytest.raises(ConfigError, match="'conv1' is quantized"):
        quantization_errors(model, layers=["conv1"])
    assert "seg_1" in quantization_errors(model, (2,), layers=["seg_1"])
