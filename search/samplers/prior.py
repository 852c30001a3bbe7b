"""Samplers of our own, chosen by name like Optuna's (``study.sampler``, :data:`search.cluster.storage.SAMPLERS`).

:class:`HessianPriorSampler` (``sampler = "hessian"``) uses what a study already knows before any trial
runs: each unit's byte cost at every bit choice (exact, from :func:`lsv_core.quant.packed_size_bytes`) and
its Hessian sensitivity Ω (trace of the baseline's loss Hessian x k-means error, docs/method.md), both read
from the study record (:mod:`search.results.record`). Why not TPE or NSGA-II: with 16-64 trials they spend most of
them learning what Ω says up front (the stem conv is cheap and sensitive, the embedding layer expensive
and robust), and both sample many recipes that are far off the front. This sampler proposes

* **prior points** (every trial until ``n_startup`` have finished, then with probability ``prior_share``):
  the allocator's solution at a budget drawn uniformly over the feasible sizes, then perturbed. The
  allocations are the multiple-choice knapsack's Lagrangian path over units (each move is the unit step with
  the best Ω saved per byte), which visits the convex hull of min Σ Ω at every size; the budget picks one;
  each unit then moves one choice up or down with probability ``mutation_rate`` (default 1/units), so the
  proxy's mistakes get tried too;
* **front moves** (otherwise): a point of the study's current Pareto front (finished trials, real EERs),
  moved by one unit step, up or down at random, the step picked among the best ones by Ω per byte
  (rank r with probability ∝ 2^-r), sometimes with a second random step. The real results steer where to
  look (which front point, so which size), the prior steers what to change.

:class:`ProbePriorSampler` (``sampler = "probe"``) keeps the same machinery with two changes. Its prior is
measured instead of estimated: the unit probes of the study record (:mod:`lsv_core.quant.probe`: each unit
alone quantized one-shot to 1 bit and to its lowest multi-bit width, the EER damage on the evaluation
trials), in place of Ω. And it proposes by **predicted hypervolume gain** (``acquisition``): the candidates
are the prior's allocation path and every one-unit move of a front point; a candidate's EER is predicted
from its summed damage through a non-decreasing curve fitted to the finished trials (isotonic regression),
a move from a front point shifting that point's measured EER by the curve's difference; running trials
count at their predicted EER; the candidate that adds the most hypervolume is asked. One proposal in four
(``explore``) is a random front move or prior point as above, so the prior's mistakes still get tried.

Every proposal fits the size budget (it is repaired along the Ω-per-byte order, so the driver's own repair
never changes it) and was not asked before in this study (duplicates are drawn again; the driver would
answer them from memory anyway). Without Hessian traces in the record (a study with no allocator seeds and
no sensitivity order) Ω falls back to the k-means error alone, with a warning. A study without an lsv
record (plain Optuna use) is sampled at random.

"EER" above is the study's accuracy objective, its first Optuna value: the EER in percent, or the minDCF
when ``[objectives] accuracy = "min_dcf"`` (:mod:`search.objectives`). Fronts, the reference point and the
calibration curve all use that value; the probes' EER damage only ranks recipes, and the fitted curve maps
it onto the objective's scale. Trials are read by the params that ran (the driver rewrites a repaired
trial's params, :func:`search.study.searcher.record_ran_params`).

Cost per suggestion is flat in the number of trials: the unit table is built once per study, and the trial
history is read incrementally (only trials finished since the last call are looked at).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution
from optuna.trial import FrozenTrial, TrialState

from lsv_core.errors import LsvError

if TYPE_CHECKING:
    from torch import nn

    from lsv_core.quant.probe import ProbeResult
    from search.space import SearchSpace

__all__ = ["HessianPriorSampler", "ProbePriorSampler", "UnitTable", "hull_path", "unit_table"]


# -- the prior: per-unit bytes and sensitivity -----------------------------------------------------------
@dataclass(frozen=True)
class UnitTable:
    """What a recipe costs, unit by unit. ``cost[u, c]``: bytes added over choice 0 (sizes are additive
    over layers, as the allocator also relies on); ``omega[u, c]``: Σ Ω of the unit's layers (tied
    shortcuts included) at choice ``c``. Choices are tokens, smallest first."""

    params: tuple[str, ...]  # Optuna parameter names, "b:<unit>"
    choices: tuple[str, ...]
    cost: np.ndarray  # (units, choices) int64
    omega: np.ndarray  # (units, choices) float64
    base_bytes: int  # every unit at choice 0 (fixed layers as configured)

    def size(self, idx: Sequence[int] | np.ndarray) -> int:
        """Packed bytes of the recipe that puts unit ``u`` at choice ``idx[u]``."""
        return self.base_bytes + int(self.cost[np.arange(len(self.params)), np.asarray(idx)].sum())

    def to_params(self, idx: Sequence[int] | np.ndarray) -> dict[str, str]:
        return {p: self.choices[int(i)] for p, i in zip(self.params, idx, strict=True)}

    def from_params(self, params: Mapping[str, Any]) -> tuple[int, ...] | None:
        """Choice indices of ``params``; None when a unit is missing or its value is not a choice."""
        try:
            return tuple(self.choices.index(params[p]) for p in self.params)
        except (KeyError, ValueError):
            return None


def unit_table(model: nn.Module, space: SearchSpace, traces: Mapping[str, float] | None, *,
               seed: int = 0, probe: ProbeResult | None = None) -> UnitTable:
    """Byte costs and sensitivity of every (unit, choice) of ``space`` over ``model`` (the float baseline).

    The sensitivity is Ω from ``traces`` (the baseline's per-layer Hessian traces,
    :meth:`Workbench.hessian_traces`; None means the k-means error alone, every trace 1), or, when
    ``probe`` is given, the probes' EER damage (:func:`lsv_core.quant.probe.estimated_damage`).
    """
    from lsv_core.quant import packed_size_bytes
    from lsv_core.quant.recipe import LayerSpec
    from lsv_core.quant.sensitivity import quantization_errors, sensitivity

    params = tuple(f"b:{u}" for u in space.units)
    choices = space.choices
    specs = [LayerSpec.from_token(t) for t in choices]
    layers = space.unit_layers()
    needed = [n for ls in layers.values() for n in ls]
    bit_choices = sorted({s.bits for s in specs})
    omega_of: dict[str, dict[str, float]] = {}
    if probe is not None:
        from lsv_core.quant.probe import estimated_damage

        multi = [b for b in bit_choices if b > 1]
        errors = quantization_errors(model, multi, seed=seed, layers=needed) if multi else {}
        unit_errors = {u: {b: sum(errors[n][b] for n in ls) for b in multi} for u, ls in layers.items()}
        missing = sorted(set(space.units) - set(probe.damage))
        if missing:
            raise LsvError(f"the unit probes do not cover units {missing} of the search space")
        omega_of = estimated_damage(probe, unit_errors, choices)
    else:
        omega_by_mode: dict[str | None, dict[str, dict[int, float]]] = {}
        for mode in sorted({s.mode for s in specs if s.bits == 1} or {"adaptive"}):
            errors = quantization_errors(model, bit_choices, seed=seed, binary_mode=mode, layers=needed)
            use = traces if traces is not None else dict.fromkeys(needed, 1.0)
            omega_by_mode[mode] = sensitivity({n: float(use[n]) for n in needed}, errors)
        for unit in space.units:
            omega_of[unit] = {}
            for tok, spec in zip(choices, specs, strict=True):
                table = omega_by_mode[spec.mode if spec.bits == 1 else next(iter(omega_by_mode))]
                omega_of[unit][tok] = sum(table[n][spec.bits] for n in layers[unit])
    base = {p: choices[0] for p in params}
    base_bytes = packed_size_bytes(model, space.recipe_from_params(base))
    cost = np.zeros((len(params), len(choices)), dtype=np.int64)
    omega = np.zeros((len(params), len(choices)))
    for u, (unit, name) in enumerate(zip(space.units, params, strict=True)):
        for c in range(len(choices)):
            if c:
                cost[u, c] = packed_size_bytes(model, space.recipe_from_params({**base, name: choices[c]})) - base_bytes
            omega[u, c] = omega_of[unit][choices[c]]
    return UnitTable(params, choices, cost, omega, int(base_bytes))


def hull_path(table: UnitTable) -> list[tuple[int, ...]]:
    """The allocations of the Lagrangian path, smallest first: from every unit at its cheapest choice,
    apply unit steps along each unit's lower convex hull of (bytes, Ω), best Ω saved per byte first.

    Each allocation minimises Σ Ω among the recipes no bigger than it on the hull of the problem (the
    greedy solution of the multiple-choice knapsack's linear relaxation at that budget).
    """
    n_units, _ = table.cost.shape
    moves: list[tuple[float, int, int]] = []  # (-Ω saved per byte, unit, choice reached)
    start = []
    for u in range(n_units):
        order = sorted(range(len(table.choices)), key=lambda c, u=u: (table.cost[u, c], table.omega[u, c]))
        hull: list[int] = []
        for c in order:  # lower-left convex hull, Ω decreasing as bytes grow
            if hull and table.omega[u, c] >= table.omega[u, hull[-1]]:
                continue
            while len(hull) >= 2 and _slope(table, u, hull[-2], hull[-1]) >= _slope(table, u, hull[-1], c):
                hull.pop()
            hull.append(c)
        start.append(hull[0])
        moves += [(_slope(table, u, a, b), u, b) for a, b in zip(hull, hull[1:], strict=False)]
    moves.sort()  # most negative slope (most Ω saved per byte) first; a unit's own steps stay in order
    path = [tuple(start)]
    current = list(start)
    for _, u, c in moves:
        current[u] = c
        path.append(tuple(current))
    return path


def _slope(table: UnitTable, u: int, a: int, b: int) -> float:
    """ΔΩ per byte from choice ``a`` to ``b`` of unit ``u`` (negative: more bytes, less Ω)."""
    return float(table.omega[u, b] - table.omega[u, a]) / max(1, int(table.cost[u, b] - table.cost[u, a]))


# -- the sampler ---------------------------------------------------------------------------------------
@dataclass
class _StudyState:
    """What the sampler keeps per study: the prior, and the trial history read so far."""

    table: UnitTable | None
    space: SearchSpace | None
    distributions: dict[str, BaseDistribution]
    budget: int | None
    path: list[tuple[int, ...]]
    path_sizes: list[int] = field(default_factory=list)
    next_number: int = 0  # trials below this number have been read at least once
    pending: set[int] = field(default_factory=set)  # read while unfinished: read again
    asked: set[tuple[int, ...]] = field(default_factory=set)  # every recipe proposed or told so far
    points: dict[tuple[int, ...], tuple[float, int]] = field(default_factory=dict)  # recipe -> (eer, bytes)
    front: list[tuple[int, ...]] = field(default_factory=list)
    n_complete: int = 0
    running: dict[int, tuple[int, ...]] = field(default_factory=dict)  # unfinished trial number -> recipe
    worst_eer: float = -math.inf  # over every finished trial (the acquisition's reference EER)


class HessianPriorSampler(optuna.samplers.BaseSampler):
    """See the module docstring. ``seed`` seeds the sampler's own generator.

    Args:
        n_startup: finished trials before front moves start (the study's seed trials count).
        prior_share: probability of a prior point once front moves have started.
        mutation_rate: per-unit probability of a random step on prior points (default 1/units).
        second_step: probability that a front move takes a second, random unit step.
    """

    _MAX_DRAWS = 64
    _MAX_CANDIDATES = 512

    def __init__(self, seed: int | None = None, *, n_startup: int = 6, prior_share: float = 0.25,
                 mutation_rate: float | None = None, second_step: float = 0.3, acquisition: bool = False,
                 explore: float = 0.25) -> None:
        if n_startup < 0 or not 0.0 <= prior_share <= 1.0 or not 0.0 <= second_step <= 1.0:
            raise ValueError(f"n_startup={n_startup} should be >= 0, prior_share={prior_share} and "
                             f"second_step={second_step} in [0, 1]")
        if not 0.0 <= explore <= 1.0:
            raise ValueError(f"explore={explore} should be in [0, 1]")
        if mutation_rate is not None and not 0.0 <= mutation_rate <= 1.0:
            raise ValueError(f"mutation_rate={mutation_rate} should be in [0, 1] or None")
        self._rng = np.random.default_rng(seed)
        self._seed = seed
        self.n_startup = n_startup
        self.prior_share = prior_share
        self.mutation_rate = mutation_rate
        self.second_step = second_step
        self.acquisition = acquisition
        self.explore = explore
        self._random = optuna.samplers.RandomSampler(seed=seed)
        self._states: dict[int, _StudyState] = {}

    def reseed_rng(self) -> None:
        self._rng = np.random.default_rng()
        self._random.reseed_rng()

    # -- Optuna's interface --------------------------------------------------------------------------
    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        return dict(self._state(study).distributions)

    def sample_relative(self, study: optuna.Study, trial: FrozenTrial,
                        search_space: dict[str, BaseDistribution]) -> dict[str, Any]:
        state = self._state(study)
        if state.table is None or not search_space:
            return {}
        self._read_history(study, state)
        idx = self._propose(state)
        state.asked.add(idx)
        return {k: v for k, v in state.table.to_params(idx).items() if k in search_space}

    def sample_independent(self, study: optuna.Study, trial: FrozenTrial, param_name: str,
                           param_distribution: BaseDistribution) -> Any:
        return self._random.sample_independent(study, trial, param_name, param_distribution)

    # -- per-study state -------------------------------------------------------------------------------
    _prior = "hessian"

    def _state(self, study: optuna.Study) -> _StudyState:
        key = study._study_id
        if key not in self._states:
            self._states[key] = _build_state(study, seed=0 if self._seed is None else int(self._seed),
                                             prior=self._prior)
        return self._states[key]

    def _read_history(self, study: optuna.Study, state: _StudyState) -> None:
        """Take in the trials that finished since the last call (and every recipe already asked).

        Only new trials and those unfinished at the last call are looked at. (Optuna's cached storage
        fetches just the unfinished and new trials from the database, so the read stays flat too.)
        """
        assert state.table is not None
        trials = study.get_trials(deepcopy=False)
        n_trials = len(trials)
        for number in sorted(state.pending | set(range(state.next_number, n_trials))):
            t = trials[number]
            idx = _trained_choices(state, t)
            if idx is not None:
                state.asked.add(idx)
            if not t.state.is_finished():
                state.pending.add(number)
                if idx is not None:
                    state.running[number] = idx
                continue
            state.pending.discard(number)
            state.running.pop(number, None)
            if t.state == TrialState.COMPLETE and idx is not None and t.values is not None:
                eer, size = float(t.values[0]), int(t.values[1])
                if math.isfinite(eer):
                    state.n_complete += 1
                    old = state.points.get(idx)
                    state.points[idx] = (eer, size) if old is None else (min(old[0], eer), size)
                    state.front = _add_to_front(state.front, state.points, idx)
                    state.worst_eer = max(state.worst_eer, eer)
        state.next_number = max(state.next_number, n_trials)

    # -- proposals ---------------------------------------------------------------------------------------
    def _propose(self, state: _StudyState) -> tuple[int, ...]:
        table = state.table
        assert table is not None
        if self.acquisition and self._rng.random() >= self.explore:
            best = self._acquire(state)
            if best is not None:
                return best
        use_front = state.n_complete >= self.n_startup and state.front and self._rng.random() >= self.prior_share
        for attempt in range(self._MAX_DRAWS):
            # Later attempts widen the perturbation so a crowded neighbourhood still yields a new recipe.
            extra = attempt // 8
            idx = self._front_move(state, extra) if use_front and attempt < self._MAX_DRAWS // 2 \
                else self._prior_point(state, extra)
            idx = self._fit_budget(state, idx)
            if idx is not None and idx not in state.asked:
                return idx
        # The neighbourhood is exhausted: any feasible recipe not asked yet.
        for _ in range(self._MAX_DRAWS):
            idx = self._fit_budget(state, tuple(int(c) for c in self._rng.integers(0, len(table.choices), len(table.params))))
            if idx is not None and idx not in state.asked:
                return idx
        return idx if idx is not None else state.path[0]

    def _prior_point(self, state: _StudyState, extra: int) -> tuple[int, ...]:
        table = state.table
        assert table is not None
        sizes = state.path_sizes
        top = sizes[-1] if state.budget is None else min(sizes[-1], state.budget)
        target = self._rng.uniform(sizes[0], max(sizes[0], top))
        k = max(i for i, s in enumerate(sizes) if s <= target) if sizes[0] <= target else 0
        idx = list(state.path[k])
        rate = self.mutation_rate if self.mutation_rate is not None else 1.0 / len(idx)
        for u in range(len(idx)):
            if self._rng.random() < rate:
                idx[u] = self._step(idx[u], int(self._rng.choice((-1, 1))), len(table.choices))
        for _ in range(extra):
            u = int(self._rng.integers(len(idx)))
            idx[u] = self._step(idx[u], int(self._rng.choice((-1, 1))), len(table.choices))
        return tuple(idx)

    def _front_move(self, state: _StudyState, extra: int) -> tuple[int, ...]:
        table = state.table
        assert table is not None
        parent = list(state.front[int(self._rng.integers(len(state.front)))])
        direction = int(self._rng.choice((-1, 1)))
        moves = _ranked_steps(table, parent, direction)
        if not moves:
            moves = _ranked_steps(table, parent, -direction)
        if moves:
            # Rank r is taken with probability proportional to 2^-r: mostly the best steps, never only.
            weights = 0.5 ** np.arange(len(moves))
            u, c = moves[int(self._rng.choice(len(moves), p=weights / weights.sum()))]
            parent[u] = c
        for _ in range(extra + (self._rng.random() < self.second_step)):
            u = int(self._rng.integers(len(parent)))
            parent[u] = self._step(parent[u], int(self._rng.choice((-1, 1))), len(table.choices))
        return tuple(parent)

    def _acquire(self, state: _StudyState) -> tuple[int, ...] | None:
        """The candidate with the largest predicted hypervolume gain, or None when none gains.

        Candidates: the prior's path and every single-unit step from a front point (at most
        ``_MAX_CANDIDATES`` of those, drawn at random), fitted to the budget, not asked before. The EER of
        a candidate is predicted from its prior score (Σ Ω, or the probes' summed damage) through the
        monotone map the finished trials calibrate (:func:`_calibrate`); a step from a front point moves
        that point's measured EER by the map's difference instead, so the prior's additive error is only
        paid once. Running trials count at their predicted EER (nothing lands on top of them).
        """
        table = state.table
        assert table is not None
        known = list(state.points.items())
        curve = _calibrate([_prior_score(table, idx) for idx, _ in known], [p[0] for _, p in known])
        if curve is None:
            return None

        def predict(idx: tuple[int, ...], parent: tuple[int, ...] | None = None) -> float:
            value = float(np.interp(_prior_score(table, idx), *curve))
            if parent is not None:
                value += state.points[parent][0] - float(np.interp(_prior_score(table, parent), *curve))
            return value

        candidates: dict[tuple[int, ...], tuple[int, ...] | None] = {}
        for p in state.path:
            fitted = self._fit_budget(state, p)
            if fitted is not None and fitted not in state.asked:
                candidates.setdefault(fitted, None)
        steps = [(f, u, c) for f in state.front for u in range(len(f)) for c in range(len(table.choices)) if c != f[u]]
        if len(steps) > self._MAX_CANDIDATES:
            steps = [steps[i] for i in self._rng.choice(len(steps), self._MAX_CANDIDATES, replace=False)]
        for f, u, c in steps:
            moved = self._fit_budget(state, f[:u] + (c,) + f[u + 1:])
            if moved is not None and moved not in state.asked:
                candidates[moved] = f if moved[:u] + moved[u + 1:] == f[:u] + f[u + 1:] else None
        if not candidates:
            return None
        # The front alone spans the finished trials' hypervolume; the reference EER is the worst finished one.
        base = [state.points[f] for f in state.front] + [(predict(idx), table.size(idx)) for idx in state.running.values()]
        ref = (max([state.worst_eer] + [e for e, _ in base]),
               float(state.budget if state.budget is not None else state.path_sizes[-1] + 1))
        stairs = _staircase(base)
        gains = [(_hv_gain(stairs, (predict(idx, parent), table.size(idx)), ref), idx)
                 for idx, parent in candidates.items()]
        gain, best = max(gains, key=lambda g: g[0])
        return best if gain > 0 else None

    @staticmethod
    def _step(c: int, direction: int, n: int) -> int:
        return min(n - 1, max(0, c + direction))

    def _fit_budget(self, state: _StudyState, idx: tuple[int, ...]) -> tuple[int, ...] | None:
        """``idx`` stepped down, least Ω added per byte saved first, until it fits the budget."""
        table = state.table
        assert table is not None
        if state.budget is None:
            return idx
        current = list(idx)
        size = table.size(current)
        while size > state.budget:
            moves = _ranked_steps(table, current, -1)
            if not moves:
                return None
            u, c = moves[0]
            current[u] = c
            size = table.size(current)
        return tuple(current)


def _prior_score(table: UnitTable, idx: Sequence[int]) -> float:
    """Σ over units of the prior's sensitivity at the recipe's choices (Ω, or probe damage)."""
    return float(table.omega[np.arange(len(idx)), np.asarray(idx)].sum())


def _staircase(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """The Pareto front of (eer, size) points as (size, eer), size ascending and EER strictly descending."""
    out: list[tuple[float, float]] = []
    for eer, size in sorted(points, key=lambda p: (p[1], p[0])):
        if not out or eer < out[-1][1]:
            if out and out[-1][0] == size:
                out.pop()
            out.append((float(size), float(eer)))
    return out


def _hv_gain(stairs: Sequence[tuple[float, float]], point: tuple[float, float], ref: tuple[float, float]) -> float:
    """Hypervolume (EER x bytes, against ``ref``) that ``point`` adds to the front ``stairs`` (from
    :func:`_staircase`): the area under the front's step function and above the point's EER, from the
    point's size to the reference size. O(front) at worst, usually a few steps."""
    import bisect

    eer, size = point
    ref_eer, ref_size = ref
    if eer >= ref_eer or size >= ref_size:
        return 0.0
    k = bisect.bisect_right(stairs, (size, math.inf))  # front points no larger than the new one
    level = min(ref_eer, stairs[k - 1][1]) if k else ref_eer
    gain, x = 0.0, size
    for s, e in stairs[k:]:
        if level <= eer or s >= ref_size:
            break
        gain += (level - eer) * (s - x)
        x, level = s, min(level, e)
    if level > eer:
        gain += (level - eer) * (ref_size - x)
    return gain


def _calibrate(scores: Sequence[float], eers: Sequence[float]) -> tuple[np.ndarray, np.ndarray] | None:
    """Knots of the non-decreasing map from prior score to EER that fits the finished trials best
    (isotonic least squares, pool-adjacent-violators), for ``np.interp`` (flat beyond the ends). None
    until two distinct scores have finished."""
    if len({round(x, 12) for x in scores}) < 2:
        return None
    order = np.argsort(np.asarray(scores), kind="stable")
    xs = np.asarray(scores, dtype=float)[order]
    blocks: list[list[float]] = []  # [sum of eer, count, x sum]
    for x, y in zip(xs, np.asarray(eers, dtype=float)[order], strict=True):
        blocks.append([y, 1.0, x])
        while len(blocks) > 1 and blocks[-2][0] / blocks[-2][1] >= blocks[-1][0] / blocks[-1][1]:
            y2, n2, x2 = blocks.pop()
            blocks[-1][0] += y2
            blocks[-1][1] += n2
            blocks[-1][2] += x2
    knots_x = np.array([b[2] / b[1] for b in blocks])
    knots_y = np.array([b[0] / b[1] for b in blocks])
    return knots_x, knots_y


class ProbePriorSampler(HessianPriorSampler):
    """``sampler = "probe"``: :class:`HessianPriorSampler` with the unit probes' measured EER damage
    (:mod:`lsv_core.quant.probe`) as its prior instead of Ω, and proposals chosen by predicted hypervolume
    gain (``acquisition``; one in four, ``explore``, is the parent's random move instead)."""

    _prior = "probe"

    def __init__(self, seed: int | None = None, **kwargs: Any) -> None:
        kwargs.setdefault("acquisition", True)
        super().__init__(seed, **kwargs)


def _ranked_steps(table: UnitTable, idx: Sequence[int], direction: int) -> list[tuple[int, int]]:
    """Single-unit steps ``(unit, new choice)`` toward smaller (``direction=-1``) or larger (+1) recipes
    that change the size, best first: least Ω added per byte saved, or most Ω saved per byte added."""
    out = []
    n = len(table.choices)
    for u, c in enumerate(idx):
        for new in range(n):
            d_bytes = int(table.cost[u, new] - table.cost[u, c])
            if d_bytes == 0 or (d_bytes < 0) != (direction < 0):
                continue
            d_omega = float(table.omega[u, new] - table.omega[u, c])
            # Going down: Ω added per byte saved (low is good). Going up: Ω change per byte (negative is good).
            score = d_omega / -d_bytes if direction < 0 else d_omega / d_bytes
            out.append((score, abs(d_bytes), u, new))
    out.sort()
    return [(u, new) for _, _, u, new in out]


def _add_to_front(front: list[tuple[int, ...]], points: Mapping[tuple[int, ...], tuple[float, int]],
                  new: tuple[int, ...]) -> list[tuple[int, ...]]:
    """The Pareto front (of (EER, bytes), both minimised) after ``points[new]`` arrived or improved, in
    O(front) instead of re-sorting every point. Equal points do not dominate each other (search.results.pareto)."""
    eer, size = points[new]

    def dominates(a: tuple[float, int], b: tuple[float, int]) -> bool:
        return a[0] <= b[0] and a[1] <= b[1] and a != b

    rest = [f for f in front if f != new]
    if any(dominates(points[f], (eer, size)) for f in rest):
        return rest
    return [f for f in rest if not dominates((eer, size), points[f])] + [new]


def _trained_choices(state: _StudyState, trial: FrozenTrial) -> tuple[int, ...] | None:
    """The choices of the recipe a trial really trained: the repaired one when the driver repaired it."""
    from lsv_core.quant import BitRecipe

    assert state.table is not None and state.space is not None
    recipe = trial.user_attrs.get("recipe")
    params: Mapping[str, Any] = trial.params
    if isinstance(recipe, Mapping) and recipe:
        try:
            params = state.space.params_from_recipe(BitRecipe.from_mapping(recipe))
        except LsvError:  # not expressible per unit: keep the params that were asked
            params = trial.params
    return state.table.from_params(params)


def _build_state(study: optuna.Study, *, seed: int, prior: str = "hessian") -> _StudyState:
    """The prior of ``study`` from its record: baseline, search space, budget, and its Hessian traces
    (``prior="hessian"``) or unit probes (``prior="probe"``)."""
    from search.results.record import stored_record

    record = stored_record(study)
    if record is None or not record.config:
        warnings.warn("HessianPriorSampler: the study has no lsv record (not run by `lsv run`); "
                      "sampling at random", stacklevel=3)
        return _StudyState(None, None, {}, None, [], [])
    from lsv_core.quant.sensitivity import state_dict_digest
    from search.config import StudyConfig
    from search.space import SearchSpace

    try:
        config = StudyConfig.model_validate(dict(record.config))
        model = _load_baseline(config)
        space = SearchSpace.build(model, config.space)
    except (LsvError, OSError, ValueError) as err:
        raise LsvError(f"HessianPriorSampler: cannot rebuild study {record.name!r}'s search space from its "
                       f"record ({err})") from err
    if record.baseline_digest is not None and state_dict_digest(model) != record.baseline_digest:
        raise LsvError(f"HessianPriorSampler: {config.model.checkpoint} is not the baseline study "
                       f"{record.name!r} was made with (state-dict digest differs)")
    if prior == "probe":
        from lsv_core.quant.probe import ProbeResult

        if not record.unit_probes:
            raise LsvError(f"study {record.name!r} has no unit probes in its record; `lsv run` measures them "
                           "before the first trial when study.sampler = \"probe\"")
        table = unit_table(model, space, None, seed=seed, probe=ProbeResult.from_dict(record.unit_probes))
        dists = {p: CategoricalDistribution(list(space.choices)) for p in table.params}
        path = hull_path(table)
        return _StudyState(table, space, dists, config.size_budget_bytes, path, [table.size(p) for p in path])
    traces = record.hessian_traces
    if traces is None:
        warnings.warn(f"study {record.name!r} has no Hessian traces in its record (no allocator seeds, no "
                      "sensitivity order): the hessian sampler ranks steps by k-means error alone",
                      stacklevel=3)
    table = unit_table(model, space, traces, seed=seed)
    dists = {p: CategoricalDistribution(list(space.choices)) for p in table.params}
    path = hull_path(table)
    return _StudyState(table, space, dists, config.size_budget_bytes, path, [table.size(p) for p in path])


def _load_baseline(config: Any) -> nn.Module:
    """The float baseline a study config names (our checkpoint, or a WeSpeaker .pt with model.arch)."""
    from lsv_core.errors import ConfigError
    from lsv_core.models import load_checkpoint, load_pretrained

    ckpt = config.model.checkpoint
    if ckpt.suffix in (".pt", ".pth"):
        if config.model.architecture is None:
            raise ConfigError(f"model.checkpoint={str(ckpt)!r} is a WeSpeaker state dict; set model.arch "
                              "(or model.factory)")
        return load_pretrained(ckpt, config.model.architecture, **config.model.arch_kwargs)
    return load_checkpoint(ckpt)[0]
