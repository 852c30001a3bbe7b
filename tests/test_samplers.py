"""The Hessian-prior sampler: its unit table and allocation path (checked against the packed size and a
brute-force knapsack), and the sampler driven through a real Optuna SQLite study with the project's
ask/tell searcher (no Ray), a real thin ResNet checkpoint and the study record it reads its prior from."""

from __future__ import annotations

import itertools
import math
import warnings
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch

from lsv_core.models import build_model
from lsv_core.models.checkpoint import save_checkpoint
from lsv_core.quant import BitRecipe, packed_size_bytes, quantizable_layers
from lsv_core.quant.sensitivity import state_dict_digest
from search.cluster.storage import SAMPLERS, open_study
from search.config import parse_study_config
from search.results.pareto import hypervolume
from search.results.record import StudyRecord, save_record
from search.samplers.prior import HessianPriorSampler, UnitTable, hull_path, unit_table
from search.space import SearchSpace
from search.study.searcher import AskTellSearcher


def thin_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model("ThinResNet", m_channels=4, first_stride=2, embed_dim=32)


def traces_for(model: torch.nn.Module) -> dict[str, float]:
    # Distinct, deterministic traces spanning two decades: the prior has something to rank.
    layers = quantizable_layers(model)
    return {n: float(10 ** (2 * i / max(1, len(layers) - 1))) for i, n in enumerate(layers)}


# -- unit table and path -------------------------------------------------------------------------------
def test_unit_table_sizes_are_the_packed_sizes_and_omega_falls_with_bits() -> None:
    model = thin_model()
    config = parse_study_config({"study": {"name": "t"}, "space": {"granularity": "block", "bits": [1, 2, 3, 4, 8]}})
    space = SearchSpace.build(model, config.space)
    table = unit_table(model, space, traces_for(model))
    assert table.choices == ("1a", "2", "3", "4", "8")
    rng = np.random.default_rng(0)
    for _ in range(20):
        idx = rng.integers(0, len(table.choices), len(table.params))
        recipe = space.recipe_from_params(table.to_params(idx))
        assert table.size(idx) == packed_size_bytes(model, recipe)
    # More bits: less k-means error, so less Ω (traces are positive). Bytes are the deployable ONNX file's:
    # they grow with the widths that divide a byte (2, 4, 8), but a 3-bit or an adaptive 1-bit unit carries
    # extra unpacking nodes, which on a layer this small can outweigh the bits it saves: the sampler must
    # not assume that cost is monotone in bits.
    widths = [table.choices.index(c) for c in ("2", "4", "8")]
    assert np.all(np.diff(table.cost[:, widths], axis=1) > 0)
    assert np.all(table.cost[:, -1] == table.cost.max(axis=1))
    assert np.all(np.diff(table.omega, axis=1) <= 0)
    assert np.all(table.omega[:, 0] > table.omega[:, -1])


def brute_force_min_omega(table: UnitTable, max_bytes: int) -> float:
    best = math.inf
    for idx in itertools.product(range(len(table.choices)), repeat=len(table.params)):
        if table.size(idx) <= max_bytes:
            best = min(best, float(table.omega[np.arange(len(idx)), idx].sum()))
    return best


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_every_allocation_on_the_path_is_optimal_at_its_own_size(seed: int) -> None:
    rng = np.random.default_rng(seed)
    units, choices = 4, 4
    # Random tables with bytes rising and Ω falling per unit, not necessarily convex.
    cost = np.concatenate([np.zeros((units, 1)), np.cumsum(rng.integers(1, 50, (units, choices - 1)), axis=1)], axis=1)
    omega = np.sort(rng.exponential(1.0, (units, choices)), axis=1)[:, ::-1] * rng.exponential(1.0, (units, 1))
    table = UnitTable(tuple(f"b:u{i}" for i in range(units)), ("a", "b", "c", "d"), cost.astype(np.int64),
                      omega, base_bytes=100)
    path = hull_path(table)
    sizes = [table.size(p) for p in path]
    assert sizes == sorted(sizes) and len(set(sizes)) == len(sizes)
    assert path[0] == (0,) * units
    assert path[-1] == tuple(int(np.argmin(omega[u])) for u in range(units))
    for p in path:
        assert float(omega[np.arange(units), p].sum()) == pytest.approx(brute_force_min_omega(table, table.size(p)))


def test_incremental_front_equals_the_front_of_all_points() -> None:
    from search.results.pareto import pareto_front
    from search.samplers.prior import _add_to_front

    rng = np.random.default_rng(0)
    points: dict[tuple[int, ...], tuple[float, int]] = {}
    front: list[tuple[int, ...]] = []
    for i in range(300):
        key = (int(rng.integers(0, 60)),)  # repeats: a recipe's EER may improve on a second run
        eer, size = float(rng.integers(0, 40)), int(rng.integers(0, 40))  # ties on purpose
        points[key] = (eer, size) if key not in points else (min(points[key][0], eer), points[key][1])
        front = _add_to_front(front, points, key)
        keys = list(points)
        assert sorted(front) == sorted(keys[j] for j in pareto_front([points[k] for k in keys])), i


# -- the sampler in a study ------------------------------------------------------------------------------
def make_study(tmp_path: Path, name: str, sampler: str, seed: int, *, traces: bool = True,
               budget_mb: float | None = None) -> tuple[optuna.Study, SearchSpace, torch.nn.Module, object]:
    model = thin_model()
    ckpt = tmp_path / "baseline.safetensors"
    if not ckpt.exists():
        save_checkpoint(model, ckpt)
    raw = {"study": {"name": name, "out_dir": str(tmp_path / "runs"), "sampler": sampler, "seed": seed},
           "model": {"checkpoint": str(ckpt), "train_if_missing": False},
           "space": {"granularity": "block", "bits": [1, 2, 3, 4, 8]},
           "objectives": {"size_budget_mb": budget_mb}}
    config = parse_study_config(raw)
    config.study_dir.mkdir(parents=True, exist_ok=True)
    study = open_study(config, create=True)
    record = StudyRecord(name=name, digest=config.digest(), config=config.model_dump(mode="json"),
                         layers=quantizable_layers(model), baseline_digest=state_dict_digest(model),
                         fp32_bytes=packed_size_bytes(model, BitRecipe({})),
                         hessian_traces=traces_for(model) if traces else None)
    save_record(study, None, record)
    return study, SearchSpace.build(model, config.space), model, config


def drive(study: optuna.Study, space: SearchSpace, model: torch.nn.Module, config: object, n: int,
          objective) -> list[dict]:
    """Run ``n`` trials through the project's searcher, finishing each at once with ``objective``."""
    searcher = AskTellSearcher(study, space, size_of=lambda r: packed_size_bytes(model, r),
                               budget_bytes=config.size_budget_bytes,
                               make_config=lambda r, k: {"recipe": r.to_dict(), "optuna_trial": k},
                               sink=lambda record: None, max_trials=n)
    out = []
    for i in range(n):
        cfg = searcher.suggest(f"t{i}")
        if cfg is None or cfg == AskTellSearcher.FINISHED:
            break
        recipe = BitRecipe.from_mapping(cfg["recipe"])
        size = packed_size_bytes(model, recipe)
        searcher.on_trial_complete(f"t{i}", {"final": True, "eer": objective(recipe), "size_bytes": size,
                                              "min_dcf_001": 0.1})
        out.append({"recipe": recipe, "size": size})
    return out


def proxy_objective(model: torch.nn.Module, seed: int):
    """A fake EER that the prior predicts only in part: Σ Ω over layers with per-layer weights the sampler
    does not know (log-normal), plus noise. Deterministic per recipe."""
    from lsv_core.quant.sensitivity import quantization_errors, sensitivity

    rng = np.random.default_rng(seed)
    omega = sensitivity(traces_for(model), quantization_errors(model, (1, 2, 3, 4, 8)))
    scale = {n: float(np.exp(rng.normal(0, 0.5))) for n in omega}
    norm = max(sum(v[1] for v in omega.values()), 1e-12)

    def eer(recipe: BitRecipe) -> float:
        total = sum(scale[n] * omega[n][spec.bits] for n, spec in recipe.items())
        noise = (int(recipe.digest()[:6], 16) % 1000) / 1000 * 0.05
        return 2.0 + 30.0 * total / norm + noise

    return eer


def test_registered_by_name_and_proposals_fit_the_budget_without_repeats(tmp_path: Path) -> None:
    assert isinstance(SAMPLERS["hessian"](0), HessianPriorSampler)
    model = thin_model()
    budget_mb = packed_size_bytes(model, BitRecipe.uniform(model, 4)) / 1e6
    study, space, model, config = make_study(tmp_path, "h", "hessian", 0, budget_mb=budget_mb)
    trials = drive(study, space, model, config, 30, proxy_objective(model, 0))
    assert len(trials) == 30
    assert all(t["size"] <= config.size_budget_bytes for t in trials)
    # The sampler fits its own proposals to the budget: the driver never had to repair one.
    assert not any(t.user_attrs.get("repaired") for t in study.trials)
    digests = [t["recipe"].digest() for t in trials]
    assert len(set(digests)) == len(digests)


def test_same_seed_same_proposals_other_seed_others(tmp_path: Path) -> None:
    runs = []
    # A tight budget (uniform 2 bit's deployed size), so the proposals are far from trivial.
    budget_mb = packed_size_bytes(thin_model(), BitRecipe.uniform(thin_model(), 2)) / 1e6
    for i, seed in enumerate((3, 3, 4)):
        study, space, model, config = make_study(tmp_path, f"s{i}", "hessian", seed, budget_mb=budget_mb)
        runs.append([t["recipe"].digest() for t in drive(study, space, model, config, 12, proxy_objective(model, 1))])
    assert len(runs[0]) == 12
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


def test_finds_a_better_front_than_random_search_on_a_proxy_objective(tmp_path: Path) -> None:
    model = thin_model()
    budget_mb = packed_size_bytes(model, BitRecipe.uniform(model, 4)) / 1e6
    fp32 = packed_size_bytes(model, BitRecipe({}))
    results: dict[str, list[float]] = {"hessian": [], "random": []}
    for seed in range(3):
        objective = proxy_objective(model, 10 + seed)
        for sampler in results:
            study, space, model, config = make_study(tmp_path, f"{sampler}{seed}", sampler, seed, budget_mb=budget_mb)
            trials = drive(study, space, model, config, 16, objective)
            points = [(objective(t["recipe"]), t["size"]) for t in trials]
            results[sampler].append(hypervolume(points, (40.0, config.size_budget_bytes), size_scale=fp32))
    assert np.mean(results["hessian"]) > np.mean(results["random"])
    assert sum(h > r for h, r in zip(results["hessian"], results["random"], strict=True)) >= 2


def test_without_traces_warns_and_still_proposes(tmp_path: Path) -> None:
    study, space, model, config = make_study(tmp_path, "nt", "hessian", 0, traces=False)
    with pytest.warns(UserWarning, match="no Hessian traces"):
        trials = drive(study, space, model, config, 3, proxy_objective(model, 0))
    assert len(trials) == 3


def test_a_study_without_record_is_sampled_at_random() -> None:
    study = optuna.create_study(directions=["minimize", "minimize"], sampler=HessianPriorSampler(seed=0))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trial = study.ask({"b:x": optuna.distributions.CategoricalDistribution(["2", "4"])})
    assert trial.params["b:x"] in ("2", "4")
    assert any("no lsv record" in str(w.message) for w in caught)


def test_every_sampler_name_the_config_accepts_has_a_factory() -> None:
    from search.config import StudySection
    from search.samplers.names import SAMPLER_NAMES

    assert sorted(SAMPLERS) == sorted(SAMPLER_NAMES)
    for name in SAMPLER_NAMES:
        assert StudySection(name="s", sampler=name).sampler == name
    with pytest.raises(ValueError, match="allowed samplers are"):
        StudySection(name="s", sampler="cmaes")
