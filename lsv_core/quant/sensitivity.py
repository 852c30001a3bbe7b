"""Hessian-guided mixed precision: per-layer sensitivity and the exact bit allocation under a byte budget.

docs/method.md, "Mixed precision" (our choice, after HAWQ-V2, Dong et al. 2020):

1. :func:`hessian_traces` estimates ``Tr(H_i)``, the trace of the training loss's Hessian block of each
   quantizable layer's weight, by Hutchinson's estimator with Rademacher probes and Hessian-vector products
   from double back-propagation. :func:`cached_hessian_traces` stores them per model (JSON).
2. :func:`quantization_errors` gives ``||W_i - Q_b(W_i)||^2`` with ``Q_b`` the k-means quantizer that KMQAT
   uses (``2^b`` centroids per layer; at 1 bit the adaptive 2-means levels or the static ``±mean|W|``).
3. :func:`sensitivity` multiplies them: ``Omega_i(b) = Tr(H_i) * err_i(b)`` (a second-order estimate of the
   loss increase from quantizing layer i alone to b bits, up to the factor 1/2 and the unknown direction).
4. :func:`allocate_bits` picks one bit width per layer minimising ``sum_i Omega_i(b_i)`` subject to
   ``packed_size_bytes(model, recipe) <= budget_bytes``: a multiple-choice knapsack solved exactly as a
   0/1 integer program (HiGHS through ``scipy.optimize.milp``); :func:`allocate_for_sizes` does several
   budgets. :func:`trace_groups` is the coarse alternative space (layers sorted by trace into groups).

The allocations seed the multi-objective search; they are not the product's answer on their own.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.optimize import Bounds, LinearConstraint, milp
from torch import nn

from lsv_core.atomic import write_text_atomic
from lsv_core.errors import ConfigError
from lsv_core.quant.quantize import quantizer_of
from lsv_core.quant.recipe import (
    ALLOWED_BITS,
    BinaryMode,
    BitRecipe,
    LayerSpec,
    SpecLike,
    binary_modes,
    quantizable_layers,
)
from lsv_core.quant.size import packed_size_bytes

__all__ = [
    "allocate_bits",
    "allocate_for_sizes",
    "cached_hessian_traces",
    "hessian_traces",
    "quantization_errors",
    "recipe_sensitivity",
    "sensitivity",
    "state_dict_digest",
    "trace_groups",
]

LossFn = Callable[[nn.Module, Any], torch.Tensor]

DEFAULT_N_PROBES = 32
DEFAULT_BIT_CHOICES: tuple[int, ...] = ALLOWED_BITS
# Relative floor for trace estimates <= 0 (see sensitivity()).
DEFAULT_TRACE_FLOOR_RATIO = 1e-4
_CACHE_VERSION = 1
# Re-solves when the verified size exceeds the budget (only if the size model were not additive).
_MAX_TIGHTENINGS = 8


# ------------------------------------------------------------------------------------------ Hessian trace


def hessian_traces(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Iterable[Any],
    *,
    n_probes: int = DEFAULT_N_PROBES,
    seed: int = 0,
    layers: Sequence[str] | None = None,
) -> dict[str, float]:
    """Per-layer Hessian trace ``Tr(H_i)`` of the training loss by Hutchinson's estimator (HAWQ-V2).

    For each batch the loss gradient ``g`` w.r.t. all layer weights is built with ``create_graph=True``;
    each probe draws a Rademacher vector ``v`` (entries ±1) over all of them at once and one more
    back-propagation gives ``Hv = d(g·v)/dW``. Because ``E[v vᵀ] = I``, ``v_i·(Hv)_i`` is an unbiased
    estimate of the trace of layer i's diagonal Hessian block (the off-diagonal blocks average out), so one
    Hessian-vector product per probe serves every layer. The result is the mean over probes and batches.

    The model runs in eval mode during the estimate (its previous mode is restored): BatchNorm then uses
    its running statistics, so the loss is a deterministic function of the weights and of each batch alone,
    the estimate does not move the running statistics (train mode would update them on every forward), and
    the curvature is that of the network as it is deployed. Dropout, if any, is off for the same reason.

    Args:
        model: the float network (parameters may be frozen; the selected weights get ``requires_grad``
            temporarily).
        loss_fn: ``loss_fn(model, batch) -> scalar tensor``, e.g. the AAM-softmax cross-entropy of the
            model's embeddings (the head lives in the closure; it is not part of the traces).
        batches: a few batches (iterated once); each adds ``n_probes`` Hessian-vector products.
        n_probes: Rademacher probes per batch, >= 1. The estimator's standard error falls as
            ``1/sqrt(n_probes * n_batches)``; HAWQ-V2-style rankings are stable from a few dozen.
        seed: seeds the probes. Deterministic for a given seed on the CPU; on a GPU up to cuDNN's
            non-deterministic backward kernels.
        layers: weight-bearing module names; default :func:`quantizable_layers` of the model.

    Returns:
        ``{layer: trace}`` in the order of ``layers`` (units of loss per squared weight unit). Estimates can
        be slightly negative where the true trace is near zero or the loss is locally non-convex;
        :func:`sensitivity` handles that.
    """
    _check_int("n_probes", n_probes, minimum=1)
    _check_int("seed", seed, minimum=None)
    names = _resolve_layers(model, layers)
    weights = [_weight_of(model, name) for name in names]
    was_training = model.training
    saved_flags = [w.requires_grad for w in weights]
    gen = torch.Generator().manual_seed(int(seed))
    sums = [0.0] * len(names)
    n_samples = 0
    model.eval()
    try:
        for w in weights:
            w.requires_grad_(True)
        for batch in batches:
            n_samples += _hutchinson_batch(model, loss_fn, batch, weights, n_probes, gen, sums)
    finally:
        for w, flag in zip(weights, saved_flags, strict=True):
            w.requires_grad_(flag)
        model.train(was_training)
    if n_samples == 0:
        raise ConfigError("batches is empty; hessian_traces needs at least one batch")
    return {name: s / n_samples for name, s in zip(names, sums, strict=True)}


def _hutchinson_batch(model: nn.Module, loss_fn: LossFn, batch: Any, weights: list[torch.Tensor], n_probes: int,
                      gen: torch.Generator, sums: list[float]) -> int:
    """Add ``v_i·(Hv)_i`` of ``n_probes`` Rademacher probes on one batch to ``sums`` (per weight); returns
    the number of probes (see :func:`hessian_traces`)."""
    loss = loss_fn(model, batch)
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise ConfigError(f"loss_fn returned {type(loss).__name__}; it should return a scalar tensor")
    grads = torch.autograd.grad(loss.reshape(()), weights, create_graph=True, allow_unused=True)
    # A weight the loss does not reach, or reaches only linearly, has no second-order term: its
    # trace contribution is 0 and it must not be an output of the second back-propagation.
    live = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
    for probe in range(n_probes):
        # Drawn for every layer (live or not) so a layer's probes do not depend on the others.
        vs = [_rademacher(w, gen) for w in weights]
        if live:
            hvs = torch.autograd.grad(
                [grads[i] for i in live],
                weights,
                grad_outputs=[vs[i] for i in live],
                retain_graph=probe < n_probes - 1,
                allow_unused=True,
            )
            for i, hv in enumerate(hvs):
                if hv is not None:
                    sums[i] += float(torch.sum(vs[i].double() * hv.double()))
    return n_probes


def state_dict_digest(module: nn.Module) -> str:
    """SHA-256 (hex) of a module's state dict: names, dtypes, shapes and raw bytes of every tensor.

    Used as the model part of the trace cache key; pass the digest of the training head (or of anything
    else ``loss_fn`` depends on) as ``data_key`` of :func:`cached_hessian_traces`.
    """
    h = hashlib.sha256()
    for key, value in module.state_dict().items():
        h.update(key.encode())
        if isinstance(value, torch.Tensor):
            t = value.detach().to("cpu").contiguous().reshape(-1)
            h.update(f"{t.dtype}{tuple(value.shape)}".encode())
            # Viewed as bytes: works for every dtype, bfloat16 included (numpy has no bfloat16).
            h.update(t.view(torch.uint8).numpy().tobytes())
        else:
            h.update(repr(value).encode())
    return h.hexdigest()


def cached_hessian_traces(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Iterable[Any],
    cache_path: str | os.PathLike[str],
    *,
    n_probes: int = DEFAULT_N_PROBES,
    seed: int = 0,
    layers: Sequence[str] | None = None,
    data_key: str = "",
) -> dict[str, float]:
    """:func:`hessian_traces`, reusing a result stored in the JSON file ``cache_path`` when there is one.

    The cache key is a hash of the model's state dict (:func:`state_dict_digest`), ``n_probes``, ``seed``,
    the layer list and ``data_key``. ``loss_fn`` and ``batches`` cannot be hashed in general: callers that
    vary them (another head, another data subset) must say so in ``data_key``, e.g. the manifest path plus
    ``state_dict_digest(head)``. On a hit neither ``loss_fn`` nor ``batches`` is touched.

    One file holds entries for many keys. It is rewritten atomically; two processes writing at once can
    drop one another's new entry (it is then recomputed next time), never corrupt the file. An unreadable
    file is treated as empty, with a warning, and replaced.
    """
    _check_int("n_probes", n_probes, minimum=1)
    _check_int("seed", seed, minimum=None)
    names = _resolve_layers(model, layers)
    ident = {
        "version": _CACHE_VERSION,
        "model": state_dict_digest(model),
        "n_probes": int(n_probes),
        "seed": int(seed),
        "layers": names,
        "data_key": str(data_key),
    }
    key = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()
    path = Path(cache_path)
    entries = _read_cache(path)
    hit = entries.get(key)
    if isinstance(hit, dict) and isinstance(hit.get("traces"), dict) and list(hit["traces"]) == names:
        return {name: float(hit["traces"][name]) for name in names}
    traces = hessian_traces(model, loss_fn, batches, n_probes=n_probes, seed=seed, layers=names)
    entries = _read_cache(path)  # re-read: another process may have added entries meanwhile
    entries[key] = {**ident, "traces": traces}
    write_text_atomic(
        path, json.dumps({"version": _CACHE_VERSION, "entries": entries}, indent=1), overwrite=True
    )
    return traces


def _read_cache(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
        entries = data["entries"] if data.get("version") == _CACHE_VERSION else {}
        if not isinstance(entries, dict):
            raise TypeError("entries is not an object")
        return entries
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
        warnings.warn(
            f"ignoring unreadable Hessian trace cache {path} ({exc}); it will be rewritten", stacklevel=3
        )
        return {}


# ----------------------------------------------------------------------------------- quantization error


def quantization_errors(
    model: nn.Module,
    bit_choices: Sequence[int] = DEFAULT_BIT_CHOICES,
    *,
    seed: int = 0,
    binary_mode: BinaryMode = "adaptive",
    layers: Sequence[str] | None = None,
) -> dict[str, dict[int, float]]:
    """``||W_i - Q_b(W_i)||^2`` for every layer and bit width (sum over the weights, squared weight units).

    ``Q_b`` is the k-means quantizer: ``2^b`` centroids from :func:`kmeans_1d` over the layer's weights,
    each weight replaced by its nearest centroid, which is where KMQAT starts fine-tuning from. At 1 bit,
    ``binary_mode="adaptive"`` uses the same 2-means levels (threshold at their midpoint) and
    ``binary_mode="static"`` the symmetric levels ``±mean|W|`` with threshold 0 (docs/method.md, "Binary").
    The error is 0 once ``2^b`` reaches the number of distinct weight values.

    Returns:
        ``{layer: {bits: error}}``, layers in the order of ``layers`` (default :func:`quantizable_layers`).
    """
    bits = _check_bit_choices(bit_choices)
    _check_binary_mode(binary_mode)
    out: dict[str, dict[int, float]] = {}
    for name in _resolve_layers(model, layers):
        w = _weight_of(model, name).detach().to("cpu", torch.float64).reshape(-1).numpy()
        errs: dict[int, float] = {}
        for b in bits:
            spec = LayerSpec(b, binary_mode if b == 1 else None)
            errs[b] = spec.quantizer_class.quantization_error(w, b, seed=seed)
        out[name] = errs
    return out


# ----------------------------------------------------------------------------------------- sensitivity


def sensitivity(
    traces: Mapping[str, float],
    errors: Mapping[str, Mapping[int, float]],
    *,
    trace_floor_ratio: float = DEFAULT_TRACE_FLOOR_RATIO,
) -> dict[str, dict[int, float]]:
    """``Omega_i(b) = max(Tr(H_i), floor) * err_i(b)`` for every layer of ``errors``.

    Hutchinson estimates of a near-zero trace (or of a layer in a locally non-convex region) can come out
    <= 0; taken as they are they would make quantization error look free or even beneficial, and the
    allocator would push such a layer to its lowest bit width regardless of its error. They are clipped
    to ``floor = trace_floor_ratio * max_i Tr(H_i)`` (or 1.0 if no trace is positive), which keeps them the
    least sensitive layers while their errors still order their own bit widths. Pass
    ``trace_floor_ratio=0`` to clip at exactly 0 instead.

    Returns:
        ``{layer: {bits: omega}}`` in the order of ``errors`` (units: loss, up to the second-order factor).
    """
    if not (isinstance(trace_floor_ratio, (int, float)) and 0.0 <= trace_floor_ratio <= 1.0):
        raise ConfigError(f"trace_floor_ratio={trace_floor_ratio!r} should be a number in [0, 1]")
    missing = [name for name in errors if name not in traces]
    if missing:
        raise ConfigError(f"errors has layers without a Hessian trace: {missing}")
    finite = [float(t) for t in traces.values() if math.isfinite(float(t))]
    if len(finite) != len(traces):
        raise ConfigError(
            f"traces has non-finite values: { {k: v for k, v in traces.items() if not math.isfinite(float(v))} }"
        )
    top = max((t for t in finite if t > 0), default=1.0)
    floor = trace_floor_ratio * top
    return {
        name: {int(b): max(float(traces[name]), floor) * float(e) for b, e in errs.items()}
        for name, errs in errors.items()
    }


def recipe_sensitivity(
    omega: Mapping[str, Mapping[int, float]], recipe: BitRecipe | Mapping[str, SpecLike]
) -> float:
    """``sum_i Omega_i(b_i)`` of a recipe (the allocator's objective); float layers and layers without an
    ``omega`` entry count 0."""
    recipe = recipe if isinstance(recipe, BitRecipe) else BitRecipe(recipe)
    return sum(float(omega[name][spec.bits]) for name, spec in recipe.items() if name in omega)


def trace_groups(traces: Mapping[str, float], n_groups: int = 4) -> list[list[str]]:
    """Layers sorted by trace, most sensitive first, split into ``n_groups`` groups of near-equal count.

    The coarse search space of one re-implementation (docs/method.md): one bit width per group and all
    combinations enumerated. Ties keep the order of ``traces``. Groups are never empty: with fewer layers
    than ``n_groups`` there are fewer groups.
    """
    _check_int("n_groups", n_groups, minimum=1)
    order = sorted(traces, key=lambda name: -float(traces[name]))  # stable: ties keep input order
    k = min(n_groups, len(order))
    if k == 0:
        return []
    # Sizes as numpy.array_split: the first len % k groups get one layer more.
    sizes = [len(order) // k + (i < len(order) % k) for i in range(k)]
    bounds = [0, *itertools.accumulate(sizes)]
    return [order[lo:hi] for lo, hi in itertools.pairwise(bounds)]


# ------------------------------------------------------------------------------------------ allocation


def allocate_bits(
    model: nn.Module,
    omega: Mapping[str, Mapping[int, float]],
    budget_bytes: int,
    *,
    bit_choices: Sequence[int] = DEFAULT_BIT_CHOICES,
    binary_mode: BinaryMode = "adaptive",
    fixed: Mapping[str, SpecLike] | None = None,
) -> BitRecipe:
    """The recipe minimising ``sum_i Omega_i(b_i)`` with ``packed_size_bytes(model, recipe) <= budget_bytes``.

    Every quantizable layer must be either in ``omega`` (its bit width is chosen from ``bit_choices`` among
    those ``omega`` has a value for) or in ``fixed`` (``{layer: bits}``, or ``None`` to keep it float32);
    ``fixed`` wins over ``omega``. A 1-bit choice becomes ``LayerSpec(1, binary_mode)``.

    The packed size is additive over layers: a fixed part (header, BatchNorm, biases, fixed layers) plus a
    per-layer cost of the chosen width (packed indices and codebook). The per-layer costs are measured with
    :func:`packed_size_bytes` itself (one source of truth for bytes), the multiple-choice knapsack is solved
    exactly as a 0/1 integer program by HiGHS with a zero relative optimality gap (its absolute gap, 1e-6,
    applies to the objective rescaled so the largest per-layer spread of Omega is 1), and the result is
    verified with :func:`packed_size_bytes` (if it ever exceeded the budget the program is re-solved with a
    tighter cap). A byte-resolution DP would be exact too but needs O(layers x budget) memory: megabytes
    of budget for ResNet34.

    Args:
        model: the float network the recipe is for.
        omega: ``{layer: {bits: sensitivity}}`` from :func:`sensitivity`.
        budget_bytes: the size limit in bytes of the deployed (packed) model.
        bit_choices: allowed widths (subset of 1, 2, 3, 4, 8).
        binary_mode: ``"adaptive"`` or ``"static"``, for 1-bit choices.
        fixed: layers whose precision is not searched.

    Returns:
        The optimal :class:`BitRecipe`; if the budget allows every optimised layer its widest choice, that
        recipe (no search needed).

    Raises:
        ConfigError: the budget is below the smallest reachable size (the message gives it in bytes), a
            quantizable layer is in neither ``omega`` nor ``fixed``, or the arguments are invalid.
    """
    return _CostTable(model, omega, bit_choices, binary_mode, fixed).solve(budget_bytes)


def allocate_for_sizes(
    model: nn.Module,
    omega: Mapping[str, Mapping[int, float]],
    budgets: Iterable[int],
    *,
    bit_choices: Sequence[int] = DEFAULT_BIT_CHOICES,
    binary_mode: BinaryMode = "adaptive",
    fixed: Mapping[str, SpecLike] | None = None,
) -> list[BitRecipe]:
    """:func:`allocate_bits` for each budget (bytes), measuring the per-layer costs once."""
    table = _CostTable(model, omega, bit_choices, binary_mode, fixed)
    return [table.solve(b) for b in budgets]


class _CostTable:
    """Per-layer byte costs of every allowed width, measured once with packed_size_bytes, and the solver."""

    def __init__(
        self,
        model: nn.Module,
        omega: Mapping[str, Mapping[int, float]],
        bit_choices: Sequence[int],
        binary_mode: str,
        fixed: Mapping[str, SpecLike] | None,
    ) -> None:
        bits = _check_bit_choices(bit_choices)
        _check_binary_mode(binary_mode)
        quantizable = quantizable_layers(model)
        fixed = {name: LayerSpec.parse(value, layer=name) for name, value in (fixed or {}).items()}
        unknown = [n for n in [*omega, *fixed] if n not in quantizable]
        if unknown:
            raise ConfigError(
                f"layers {unknown} are not quantizable layers of the model; allowed: {quantizable}"
            )
        missing = [n for n in quantizable if n not in omega and n not in fixed]
        if missing:
            raise ConfigError(
                f"quantizable layers {missing} are in neither omega nor fixed; "
                "pass fixed={name: None} to keep them float32"
            )
        self.model = model
        self.fixed = {n: fixed[n] for n in quantizable if n in fixed}
        self.layers = [n for n in quantizable if n in omega and n not in fixed]
        self.choices: list[list[LayerSpec]] = []
        self.values: list[list[float]] = []
        for name in self.layers:
            row = [b for b in bits if b in {int(k) for k in omega[name]}]
            if not row:
                raise ConfigError(
                    f"omega[{name!r}] has none of bit_choices={list(bits)} (it has {sorted(omega[name])})"
                )
            vals = [float(omega[name][b]) for b in row]
            if not all(math.isfinite(v) for v in vals):
                raise ConfigError(
                    f"omega[{name!r}] has non-finite values: {dict(zip(row, vals, strict=True))}"
                )
            self.choices.append([LayerSpec(1, binary_mode) if b == 1 else LayerSpec(b) for b in row])
            self.values.append(vals)
        # Reference recipe: every optimised layer at its first choice. Cost of choice c for layer i is
        # size(reference with layer i at c) - size(reference); additivity makes any recipe's size the
        # reference size plus the sum of its layers' costs (solve() verifies its result with packed_size_bytes).
        ref = {n: row[0] for n, row in zip(self.layers, self.choices, strict=True)}
        self.ref_size = self._size(ref)
        self.costs: list[list[int]] = []
        for name, row in zip(self.layers, self.choices, strict=True):
            self.costs.append([0] + [self._size({**ref, name: c}) - self.ref_size for c in row[1:]])
        self.min_recipe = self._pick([int(np.argmin(c)) for c in self.costs])
        self.min_size = self._size(self.min_recipe)
        widest = [max(range(len(row)), key=lambda j, row=row: (row[j].bits, j)) for row in self.choices]
        self.max_recipe = self._pick(widest)
        self.max_size = self._size(self.max_recipe)

    def _pick(self, idx: Sequence[int]) -> dict[str, LayerSpec]:
        return {n: row[j] for n, row, j in zip(self.layers, self.choices, idx, strict=True)}

    def _size(self, assignment: Mapping[str, LayerSpec]) -> int:
        return int(packed_size_bytes(self.model, BitRecipe({**self.fixed, **assignment})))

    def solve(self, budget_bytes: int) -> BitRecipe:
        _check_int("budget_bytes", budget_bytes, minimum=None)
        if budget_bytes < self.min_size:
            raise ConfigError(
                f"budget_bytes={budget_bytes} is below the smallest reachable size, {self.min_size} bytes "
                f"(every searched layer at its cheapest width, fixed layers as given)"
            )
        if budget_bytes >= self.max_size or not self.layers:
            return BitRecipe({**self.fixed, **self.max_recipe})
        cap = budget_bytes - self.ref_size
        for _ in range(_MAX_TIGHTENINGS):
            assignment = self._pick(self._solve_knapsack(cap))
            size = self._size(assignment)
            if size <= budget_bytes:
                return BitRecipe({**self.fixed, **assignment})
            # Only reachable if packed sizes were not additive over layers: ask for that much less.
            cap -= size - budget_bytes
        raise RuntimeError(
            f"could not meet budget_bytes={budget_bytes}: packed sizes are not additive over layers "
            f"(last attempt {size} bytes)"
        )

    def _solve_knapsack(self, cap: int) -> list[int]:
        """Indices of the chosen width per layer: min sum(value) s.t. sum(cost) <= cap, one choice per layer."""
        sizes = [len(row) for row in self.choices]
        offsets = np.concatenate([[0], np.cumsum(sizes)])
        n_var = int(offsets[-1])
        # Shift each layer's values by their minimum and scale to [0, 1]: the argmin is unchanged (one choice
        # per layer) and HiGHS's absolute tolerances then act on a well-scaled objective.
        shifted = np.concatenate([np.asarray(v) - min(v) for v in self.values])
        scale = float(shifted.max()) or 1.0
        objective = shifted / scale
        one_per_layer = np.zeros((len(sizes), n_var))
        for i in range(len(sizes)):
            one_per_layer[i, offsets[i] : offsets[i + 1]] = 1.0
        costs = np.concatenate([np.asarray(c, dtype=np.float64) for c in self.costs])
        res = milp(
            objective,
            integrality=np.ones(n_var),
            bounds=Bounds(0.0, 1.0),
            constraints=[
                LinearConstraint(one_per_layer, 1.0, 1.0),
                LinearConstraint(costs[None, :], -np.inf, float(cap)),
            ],
            options={"mip_rel_gap": 0.0},
        )
        if res.x is None:
            raise RuntimeError(f"the bit-allocation integer program failed: {res.message}")
        x = np.round(res.x).astype(np.int64)
        idx = [int(np.argmax(x[offsets[i] : offsets[i + 1]])) for i in range(len(sizes))]
        return idx


# ------------------------------------------------------------------------------------------- internals


def _resolve_layers(model: nn.Module, layers: Sequence[str] | None) -> list[str]:
    names = list(quantizable_layers(model)) if layers is None else list(layers)
    if not names:
        raise ConfigError("layers is empty; there is nothing to measure")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"layers has duplicates: {dup}")
    return names


def _weight_of(model: nn.Module, name: str) -> torch.Tensor:
    try:
        module = model.get_submodule(name)
    except AttributeError as exc:
        raise ConfigError(f"layer {name!r} is not a submodule of the model") from exc
    if quantizer_of(module) is not None:
        # Its weight is then a function of a latent weight (STE), not the float weight being measured.
        raise ConfigError(f"layer {name!r} is quantized; measure sensitivity on the float model")
    weight = getattr(module, "weight", None)
    if not isinstance(weight, nn.Parameter):
        raise ConfigError(f"layer {name!r} ({type(module).__name__}) has no weight parameter")
    return weight


def _rademacher(like: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    # Drawn on the CPU generator, then moved: the same probes on every device for a given seed.
    v = torch.randint(0, 2, like.shape, generator=gen, dtype=torch.int8).to(like.dtype) * 2 - 1
    return v.to(like.device)


def _check_bit_choices(bit_choices: Sequence[int]) -> tuple[int, ...]:
    bits = tuple(bit_choices)
    bad = [b for b in bits if isinstance(b, bool) or b not in ALLOWED_BITS]
    if not bits or bad:
        raise ConfigError(f"bit_choices={list(bits)} should be a non-empty subset of {list(ALLOWED_BITS)}")
    return tuple(sorted(set(bits)))


def _check_binary_mode(binary_mode: str) -> None:
    if binary_mode not in binary_modes():
        raise ConfigError(f"binary_mode={binary_mode!r}; allowed: {list(binary_modes())}")


def _check_int(name: str, value: object, minimum: int | None) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ConfigError(f"{name}={value!r} should be an integer")
    if minimum is not None and value < minimum:
        raise ConfigError(f"{name}={value!r} should be >= {minimum}")
